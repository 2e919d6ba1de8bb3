//! Sentence embeddings with a sentence-transformers BERT model directory (all-MiniLM-L6-v2):
//! tokenise with `tokenizer.json`, run the encoder, mean-pool over the mask, L2-normalise.

use std::path::{Path, PathBuf};

use ndarray::{Array1, ArrayView1};
use tokenizers::{Tokenizer, TruncationParams};

use crate::bert::BertModel;
use crate::config::{read_json, BertConfig, ModuleEntry, PoolingConfig, SentenceConfig};
use crate::linear::{FloatLinears, LinearFactory};
use crate::weights::{read_limited, Checkpoint, MAX_TOKENIZER_BYTES};
use crate::{ops, OpsError};

/// Where the MiniLM files are looked for: `$TANDEM_MINILM_DIR` if set, else
/// `${TANDEM_CACHE:-$HOME/.cache/tandem}/minilm` (where `scripts/fetch-minilm.sh` puts them).
#[must_use]
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_MINILM_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("TANDEM_CACHE").map_or_else(
        || {
            std::env::var_os("HOME")
                .map_or_else(|| PathBuf::from("."), PathBuf::from)
                .join(".cache/tandem")
        },
        PathBuf::from,
    );
    cache.join("minilm")
}

/// A tokenised text: one entry per token, special tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Vocabulary ids.
    pub ids: Vec<u32>,
    /// Token type (segment) ids.
    pub type_ids: Vec<u32>,
    /// `true` for real tokens, `false` for padding.
    pub mask: Vec<bool>,
}

/// A loaded sentence encoder: tokenizer, BERT encoder, mean pooling, optional L2 normalisation.
pub struct SentenceEncoder {
    tokenizer_path: PathBuf,
    tokenizer: Tokenizer,
    model: BertModel,
    max_seq_length: usize,
    normalize: bool,
}

impl SentenceEncoder {
    /// Loads `dir` with every linear layer computed in float on the device.
    ///
    /// # Errors
    /// As [`SentenceEncoder::load_with`].
    pub fn load(dir: &Path) -> Result<Self, OpsError> {
        Self::load_with(dir, &mut FloatLinears)
    }

    /// Loads `dir` (`config.json`, `sentence_bert_config.json`, `1_Pooling/config.json`,
    /// `modules.json`, `tokenizer.json`, `model.safetensors`), building each linear layer with
    /// `factory`.
    ///
    /// # Errors
    /// [`OpsError::Io`] for a missing file (run `scripts/fetch-minilm.sh`), size-limit, parse and
    /// validation errors naming the file, [`OpsError::InvalidConfig`] for pooling other than mean
    /// or a sequence length outside `3..=max_position_embeddings`, checkpoint errors, or the
    /// factory's error.
    pub fn load_with(dir: &Path, factory: &mut dyn LinearFactory) -> Result<Self, OpsError> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;

        let sentence_path = dir.join("sentence_bert_config.json");
        let sentence: SentenceConfig = read_json(&sentence_path)?;
        let max_seq_length = sentence.max_seq_length;
        if !(3..=config.max_position_embeddings).contains(&max_seq_length) {
            return Err(OpsError::InvalidConfig {
                path: sentence_path,
                reason: format!(
                    "max_seq_length = {max_seq_length}, supported 3..={}",
                    config.max_position_embeddings
                ),
            });
        }

        let pooling_path = dir.join("1_Pooling").join("config.json");
        let pooling: PoolingConfig = read_json(&pooling_path)?;
        if !pooling.pooling_mode_mean_tokens
            || pooling.pooling_mode_cls_token
            || pooling.pooling_mode_max_tokens
            || pooling.pooling_mode_mean_sqrt_len_tokens
            || pooling.word_embedding_dimension != config.hidden_size
        {
            return Err(OpsError::InvalidConfig {
                path: pooling_path,
                reason: format!(
                    "only mean pooling of width hidden_size = {} is supported",
                    config.hidden_size
                ),
            });
        }
        let modules: Vec<ModuleEntry> = read_json(&dir.join("modules.json"))?;
        let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));

        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = load_tokenizer(&tokenizer_path, max_seq_length)?;

        let checkpoint = Checkpoint::open(&dir.join("model.safetensors"))?;
        let tensors = checkpoint.tensors()?;
        let model = BertModel::load(&tensors, config, factory)?;
        Ok(Self {
            tokenizer_path,
            tokenizer,
            model,
            max_seq_length,
            normalize,
        })
    }

    /// Tokenises `text` (`[CLS] … [SEP]`, lower-cased WordPiece), truncated to
    /// [`SentenceEncoder::max_seq_length`] tokens, no padding.
    ///
    /// # Errors
    /// [`OpsError::Tokenizer`].
    pub fn encode(&self, text: &str) -> Result<Encoded, OpsError> {
        tokenize(&self.tokenizer, &self.tokenizer_path, text)
    }

    /// The sentence embedding of `text`: `[H]`, unit L2 norm when the model normalises.
    ///
    /// # Errors
    /// [`OpsError::Tokenizer`], or see [`SentenceEncoder::embed_encoded`].
    pub fn embed(&self, text: &str) -> Result<Array1<f32>, OpsError> {
        self.embed_encoded(&self.encode(text)?)
    }

    /// The sentence embedding of an already tokenised text.
    ///
    /// # Errors
    /// See [`BertModel::forward`] and [`ops::mean_pool`].
    pub fn embed_encoded(&self, e: &Encoded) -> Result<Array1<f32>, OpsError> {
        let _span = tracing::trace_span!("sentence_embedding", tokens = e.ids.len()).entered();
        let hidden = self.model.forward(&e.ids, &e.type_ids, &e.mask)?;
        let pooled = ops::mean_pool(hidden.view(), ArrayView1::from(&e.mask[..]))?;
        Ok(if self.normalize {
            ops::l2_normalize(pooled.view())
        } else {
            pooled
        })
    }

    /// The encoder.
    #[must_use]
    pub fn model(&self) -> &BertModel {
        &self.model
    }

    /// Longest token sequence, special tokens included.
    #[must_use]
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }
}

fn load_tokenizer(path: &Path, max_seq_length: usize) -> Result<Tokenizer, OpsError> {
    let err = |source| OpsError::Tokenizer {
        path: path.to_path_buf(),
        source,
    };
    let bytes = read_limited(path, MAX_TOKENIZER_BYTES)?;
    let mut tokenizer = Tokenizer::from_bytes(&bytes).map_err(err)?;
    // sentence-transformers tokenises with truncation at max_seq_length and pads only a batch
    // to its longest member; tokenizer.json's own fixed padding to 128 is not what it runs.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_seq_length,
            ..TruncationParams::default()
        }))
        .map_err(err)?;
    Ok(tokenizer)
}

/// Tokenises `text` with `tokenizer` (loaded from `path`, named in errors): ids, type ids and
/// the attention mask, as the tokenizer's truncation leaves them, no padding.
pub(crate) fn tokenize(
    tokenizer: &Tokenizer,
    path: &Path,
    text: &str,
) -> Result<Encoded, OpsError> {
    let enc = tokenizer
        .encode(text, true)
        .map_err(|source| OpsError::Tokenizer {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Encoded {
        ids: enc.get_ids().to_vec(),
        type_ids: enc.get_type_ids().to_vec(),
        mask: enc.get_attention_mask().iter().map(|&m| m != 0).collect(),
    })
}
