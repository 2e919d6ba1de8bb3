//! Model configuration files, as serde structs mirroring the checkpoint's JSON.

use std::path::Path;

use serde::Deserialize;

use crate::weights::{read_limited, MAX_CONFIG_BYTES};
use crate::OpsError;

/// Largest sizes accepted from a configuration, so a foreign file cannot make the loader plan a
/// huge model (the checkpoint's own size limit bounds what is actually read).
const MAX_VOCAB: usize = 1 << 20;
const MAX_HIDDEN: usize = 8192;
const MAX_LAYERS: usize = 128;
const MAX_POSITIONS: usize = 1 << 16;
const MAX_TYPE_VOCAB: usize = 1024;

/// A BERT encoder's `config.json` (Hugging Face `BertConfig`); fields not listed are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Rows of the word embedding table.
    pub vocab_size: usize,
    /// Width `H` of every token's activation.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer; only `gelu` (exact erf form) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Rows of the position embedding table (longest sequence).
    pub max_position_embeddings: usize,
    /// Rows of the token type embedding table.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Only `absolute` is supported.
    #[serde(default = "default_position")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Reads and validates `config.json`.
    ///
    /// # Errors
    /// [`OpsError::Io`] / [`OpsError::FileTooLarge`] (1 MiB), [`OpsError::Config`] if it does not
    /// parse, [`OpsError::InvalidConfig`] for unsupported or out-of-range values.
    pub fn from_file(path: &Path) -> Result<Self, OpsError> {
        let cfg: Self = read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Width of one attention head.
    #[must_use]
    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks sizes and supported options; `path` names the file in the error.
    ///
    /// # Errors
    /// [`OpsError::InvalidConfig`].
    pub fn validate(&self, path: &Path) -> Result<(), OpsError> {
        let bad = |reason: String| {
            Err(OpsError::InvalidConfig {
                path: path.to_path_buf(),
                reason,
            })
        };
        let ranges = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_HIDDEN),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HIDDEN),
            ("intermediate_size", self.intermediate_size, 8 * MAX_HIDDEN),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
            ("type_vocab_size", self.type_vocab_size, MAX_TYPE_VOCAB),
        ];
        for (name, value, max) in ranges {
            if value == 0 || value > max {
                return bad(format!("{name} = {value}, supported 1..={max}"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "num_attention_heads = {} does not divide hidden_size = {}",
                self.num_attention_heads, self.hidden_size
            ));
        }
        if self.hidden_act != "gelu" {
            return bad(format!(
                "hidden_act = {:?}; only \"gelu\" (exact erf form) is supported",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type = {:?}; only \"absolute\" is supported",
                self.position_embedding_type
            ));
        }
        if !(self.layer_norm_eps.is_finite()
            && self.layer_norm_eps > 0.0
            && self.layer_norm_eps < 1.0)
        {
            return bad(format!(
                "layer_norm_eps = {} outside (0, 1)",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}

/// sentence-transformers' `sentence_bert_config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SentenceConfig {
    /// Longest token sequence (special tokens included); longer texts are truncated.
    pub max_seq_length: usize,
}

/// sentence-transformers' `1_Pooling/config.json`; only mean pooling is supported.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PoolingConfig {
    /// Width of the token embeddings pooled.
    pub word_embedding_dimension: usize,
    /// Mean over unmasked tokens.
    #[serde(default)]
    pub pooling_mode_mean_tokens: bool,
    /// The `[CLS]` token's embedding.
    #[serde(default)]
    pub pooling_mode_cls_token: bool,
    /// Maximum over tokens.
    #[serde(default)]
    pub pooling_mode_max_tokens: bool,
    /// Mean scaled by √length.
    #[serde(default)]
    pub pooling_mode_mean_sqrt_len_tokens: bool,
}

/// One entry of sentence-transformers' `modules.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModuleEntry {
    /// Python class, e.g. `sentence_transformers.models.Normalize`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// Reads a JSON file of at most [`MAX_CONFIG_BYTES`] into `T`.
///
/// # Errors
/// [`OpsError::Io`], [`OpsError::FileTooLarge`], [`OpsError::Config`].
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, OpsError> {
    let bytes = read_limited(path, MAX_CONFIG_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|source| OpsError::Config {
        path: path.to_path_buf(),
        source,
    })
}
