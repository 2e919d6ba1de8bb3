//! `tandem eval embeddings`: how all-MiniLM-L6-v2 embeddings computed under encryption agree with
//! the float model and with the committed PyTorch reference, over a corpus (issue 8).
//!
//! Three paths embed every corpus sentence: float (the device computes everything in `f32`), the
//! cleartext integer pipeline (int8 weights and activations, [`PrecisionPolicy::minilm`]) and the
//! encrypted one (every linear layer evaluated by an in-process cloud under tandem-he, the rest
//! on the device). The encrypted path runs on every `--encrypt-every`-th sentence (index 0, n,
//! 2n, …; `1` = all); each of those must equal the integer pipeline bit for bit (the HE product
//! is exact), which is what lets the integer pipeline stand for the encrypted path on the other
//! sentences. The agreement figures use the encrypted embedding where there is one and the
//! integer one elsewhere.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array1, Array2};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tandem_he::{Context, EvalOptions, OutputMode, DEFAULT_PARAMETERS};
use tandem_model::{read_verifying_key, Bundle, Limits, Part};
use tandem_ops::encrypted::DeviceSession;
use tandem_ops::metrics::{agreement, cosine_summary};
use tandem_ops::{
    default_model_dir, BundleEncoder, BundleLinears, EncryptedLinears, HeStats, InProcessCloud,
    OpsError, PrecisionPolicy, QuantizedLinears, SentenceEncoder,
};

use super::demo::repo_root;

/// `tandem eval …`.
#[derive(Subcommand)]
pub enum EvalCommand {
    /// MiniLM sentence embeddings: float vs the PyTorch reference, encrypted vs float (cosine,
    /// top-10 nearest-neighbour overlap), encrypted vs the integer pipeline (bit for bit).
    Embeddings(EmbeddingsArgs),
}

/// Arguments of `tandem eval embeddings`.
#[derive(Args, Debug, Clone)]
pub struct EmbeddingsArgs {
    /// `minilm` (the directory in TANDEM_MINILM_DIR, else the cache scripts/fetch-minilm.sh
    /// fills), the path of a MiniLM directory, or a signed encoder bundle (`tandem model
    /// import-bert`), whose integer and encrypted paths then run from the bundle.
    #[arg(long, default_value = "minilm")]
    pub model: String,
    /// With a bundle: the MiniLM directory of the float path (`minilm` as for --model).
    #[arg(long, default_value = "minilm")]
    pub float_model: String,
    /// With a bundle: the key it is verified with.
    #[arg(long, default_value = "models/dev-verifying-key.txt")]
    pub verifying_key: PathBuf,
    /// One sentence per line (default: data/minilm-corpus.txt).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Only the first N sentences of the corpus.
    #[arg(long)]
    pub limit: Option<usize>,
    /// PyTorch reference embeddings (default: data/minilm-reference.json.gz); sentences are
    /// matched by text.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Encrypt every N-th sentence (index 0, N, 2N, …); 1 encrypts them all (about 3–4 s of
    /// cloud time per 16 tokens on one core: hours for the whole corpus).
    #[arg(long, default_value_t = 16)]
    pub encrypt_every: usize,
    /// HE output mode of the cloud layers: `packed` (evaluation key uploaded once, fewer bytes)
    /// or `nokey`.
    #[arg(long, default_value = "packed")]
    pub mode: String,
    /// Tokens per request the encrypted layers are planned for (1..=64).
    #[arg(long, default_value_t = 16)]
    pub plan_batch: usize,
    /// k of the top-k nearest-neighbour overlap.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Print one JSON object as the last line (figures only, no table).
    #[arg(long)]
    pub json: bool,
}

/// Runs `tandem eval …`.
///
/// # Errors
/// See [`embeddings`].
pub fn run(cmd: EvalCommand) -> anyhow::Result<()> {
    match cmd {
        EvalCommand::Embeddings(args) => embeddings(&args),
    }
}

/// A loaded MiniLM encoder: from its sentence-transformers directory, or from a signed encoder
/// bundle (`tandem model import-bert`).
pub enum Encoder {
    /// Directory-loaded ([`SentenceEncoder`]).
    Dir(Box<SentenceEncoder>),
    /// Bundle-loaded ([`BundleEncoder`]: the manifest's op graph).
    Bundle(Box<BundleEncoder>),
}

impl Encoder {
    /// The sentence embedding of `text` (`[H]`).
    ///
    /// # Errors
    /// Tokenizer, shape and (encrypted) cloud errors.
    pub fn embed(&self, text: &str) -> Result<Array1<f32>, OpsError> {
        match self {
            Self::Dir(e) => e.embed(text),
            Self::Bundle(e) => e.embed(text),
        }
    }

    /// Tokens of `text` (special tokens included, truncated).
    ///
    /// # Errors
    /// Tokenizer errors.
    pub fn tokens(&self, text: &str) -> Result<usize, OpsError> {
        Ok(match self {
            Self::Dir(e) => e.encode(text)?.ids.len(),
            Self::Bundle(e) => e.encode(text)?.ids.len(),
        })
    }
}

/// An encrypted encoder, its device session (counters) and the evaluation key's size.
pub struct EncryptedEncoder {
    /// The encoder.
    pub encoder: Encoder,
    /// The device's HE session.
    pub session: Arc<DeviceSession>,
    /// Bytes of the evaluation key uploaded (0 in no-key mode).
    pub key_upload_bytes: usize,
    /// Tokens per request the cloud layers are planned for.
    pub plan_batch: usize,
}

/// Where a MiniLM model comes from: the float path always needs the sentence-transformers
/// directory (a bundle holds int8 weights only); the integer and encrypted paths run from the
/// bundle when one is given, else from the directory.
#[derive(Debug, Clone)]
pub struct MiniLm {
    /// The sentence-transformers directory.
    pub dir: PathBuf,
    /// A signed encoder bundle and the key it is verified with.
    pub bundle: Option<(PathBuf, PathBuf)>,
}

fn resolve_dir(spec: &str, what: &str) -> anyhow::Result<PathBuf> {
    let (dir, named) = if spec == "minilm" {
        (default_model_dir(), true)
    } else {
        (PathBuf::from(spec), false)
    };
    if dir.join("model.safetensors").is_file() && dir.join("config.json").is_file() {
        return Ok(dir);
    }
    if named {
        bail!(
            "no MiniLM model in {} (model.safetensors and config.json expected){what}: run \
             `bash scripts/fetch-minilm.sh` (it prints the directory; export \
             TANDEM_MINILM_DIR=<that directory> if you passed it another one)",
            dir.display()
        );
    }
    bail!(
        "{} is not a MiniLM directory (model.safetensors and config.json expected){what}; \
         `bash scripts/fetch-minilm.sh DIR` fetches one",
        dir.display()
    )
}

impl MiniLm {
    /// Resolves `spec`: `minilm` → `$TANDEM_MINILM_DIR`, else the fetch script's cache; a
    /// directory holding `manifest.toml` → a signed bundle verified with `key`, whose float
    /// counterpart is `float_spec` (resolved the same way); any other value → a MiniLM
    /// directory.
    ///
    /// # Errors
    /// The model is not there (with the command that fetches it).
    pub fn resolve(spec: &str, float_spec: &str, key: &Path) -> anyhow::Result<Self> {
        let path = PathBuf::from(spec);
        if spec != "minilm" && path.join("manifest.toml").is_file() {
            let dir = resolve_dir(
                float_spec,
                " — a bundle holds int8 weights only, the float path needs the MiniLM \
                 directory it was imported from (--float-model)",
            )?;
            return Ok(Self {
                dir,
                bundle: Some((path, key.to_path_buf())),
            });
        }
        Ok(Self {
            dir: resolve_dir(spec, "")?,
            bundle: None,
        })
    }

    /// What the encrypted path runs (for messages and JSON).
    pub fn describe(&self) -> String {
        match &self.bundle {
            Some((b, _)) => b.display().to_string(),
            None => self.dir.display().to_string(),
        }
    }

    fn load_bundle(&self, part: Part) -> anyhow::Result<Option<Bundle>> {
        let Some((dir, key)) = &self.bundle else {
            return Ok(None);
        };
        let vk = read_verifying_key(key)
            .with_context(|| format!("reading the verifying key {}", key.display()))?;
        let b = Bundle::load_part(dir, &vk, &Limits::default(), part)
            .with_context(|| format!("loading the bundle {}", dir.display()))?;
        Ok(Some(b))
    }

    /// Every linear layer in float on the device (from the directory).
    ///
    /// # Errors
    /// Loading errors naming the file.
    pub fn float(&self) -> anyhow::Result<SentenceEncoder> {
        SentenceEncoder::load(&self.dir)
            .with_context(|| format!("loading MiniLM from {}", self.dir.display()))
    }

    /// The cleartext integer pipeline (int8 weights per output channel, int8 activations):
    /// the bundle's, or the directory quantised with [`PrecisionPolicy::minilm`].
    ///
    /// # Errors
    /// Loading errors naming the file.
    pub fn integer(&self) -> anyhow::Result<Encoder> {
        if let Some(b) = self.load_bundle(Part::Full)? {
            return Ok(Encoder::Bundle(Box::new(BundleEncoder::from_bundle(
                &b,
                BundleLinears::Integer,
            )?)));
        }
        Ok(Encoder::Dir(Box::new(
            SentenceEncoder::load_with(
                &self.dir,
                &mut QuantizedLinears {
                    policy: PrecisionPolicy::minilm(),
                },
            )
            .with_context(|| format!("loading MiniLM (integer) from {}", self.dir.display()))?,
        )))
    }

    /// Every linear layer evaluated under encryption by `cloud` (the bundle's planned batch,
    /// or `batch` tokens per request for a directory); the evaluation key is uploaded (packed
    /// mode).
    ///
    /// # Errors
    /// Loading and planning errors; the cloud's errors.
    pub fn encrypted(
        &self,
        ctx: Arc<Context>,
        mode: OutputMode,
        batch: usize,
        cloud: Arc<InProcessCloud>,
    ) -> anyhow::Result<EncryptedEncoder> {
        // The in-process cloud takes the int8 weights from the bundle's cloud part.
        if let Some(b) = self.load_bundle(Part::Full)? {
            let plan_batch = b.encoder().map_or(0, |e| e.batch);
            let enc =
                BundleEncoder::from_bundle(&b, BundleLinears::Encrypted { ctx, mode, cloud })?;
            let key_upload_bytes = enc.upload_key()?;
            let session = enc
                .session()
                .context("the bundle encoder built no HE session")?;
            return Ok(EncryptedEncoder {
                encoder: Encoder::Bundle(Box::new(enc)),
                session,
                key_upload_bytes,
                plan_batch,
            });
        }
        let mut factory = EncryptedLinears::new(ctx, mode, PrecisionPolicy::minilm(), batch, cloud);
        let enc = SentenceEncoder::load_with(&self.dir, &mut factory)
            .with_context(|| format!("loading MiniLM (encrypted) from {}", self.dir.display()))?;
        let key_upload_bytes = factory.upload_key()?;
        Ok(EncryptedEncoder {
            encoder: Encoder::Dir(Box::new(enc)),
            session: factory.session(),
            key_upload_bytes,
            plan_batch: batch,
        })
    }
}

/// Parses `packed` / `nokey`.
///
/// # Errors
/// Any other value.
pub fn parse_mode(s: &str) -> anyhow::Result<OutputMode> {
    match s {
        "packed" => Ok(OutputMode::Packed),
        "nokey" | "no-key" => Ok(OutputMode::NoKey),
        _ => bail!("--mode {s}: expected `packed` or `nokey`"),
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn bar(len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<28} [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Reads a corpus: one sentence per line, blank lines skipped.
///
/// # Errors
/// The file cannot be read or holds no sentence.
pub fn read_corpus(path: &Path, limit: Option<usize>) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the corpus {} (one sentence per line)",
            path.display()
        )
    })?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(limit.unwrap_or(usize::MAX))
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        bail!("the corpus {} holds no sentence", path.display());
    }
    Ok(lines)
}

/// Embeds every sentence with `embed` on rayon's pool, ticking `bar`; rows in input order.
///
/// # Errors
/// The first sentence that fails, with its index.
pub fn embed_all(
    embed: impl Fn(&str) -> Result<Array1<f32>, OpsError> + Sync,
    sentences: &[&str],
    bar: &ProgressBar,
) -> anyhow::Result<Array2<f32>> {
    let rows: Vec<Array1<f32>> = sentences
        .par_iter()
        .enumerate()
        .map(|(i, s)| {
            let e = embed(s).with_context(|| format!("embedding sentence {i}"));
            bar.inc(1);
            e
        })
        .collect::<anyhow::Result<_>>()?;
    let width = rows.first().map_or(0, Array1::len);
    let mut out = Array2::<f32>::zeros((rows.len(), width));
    for (mut dst, src) in out.outer_iter_mut().zip(&rows) {
        dst.assign(src);
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Reference {
    subset: Vec<RefEntry>,
}

#[derive(Deserialize)]
struct RefEntry {
    text: String,
    embedding: Vec<f32>,
}

fn read_reference(path: &Path) -> anyhow::Result<HashMap<String, Vec<f32>>> {
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "opening the PyTorch reference {} (committed as data/minilm-reference.json.gz)",
            path.display()
        )
    })?;
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .take(64 << 20)
        .read_to_string(&mut json)
        .with_context(|| format!("reading {} (gzip JSON expected)", path.display()))?;
    let r: Reference = serde_json::from_str(&json)
        .with_context(|| format!("parsing {} (the subset of the reference)", path.display()))?;
    Ok(r.subset
        .into_iter()
        .map(|e| (e.text, e.embedding))
        .collect())
}

/// What `tandem eval embeddings --json` prints (the last line).
#[derive(Serialize, Debug)]
pub struct EvalJson {
    /// What the integer and encrypted paths ran: the bundle, or the MiniLM directory.
    pub model: String,
    /// The MiniLM directory of the float path.
    pub float_model: String,
    /// Corpus path.
    pub corpus: String,
    /// Sentences embedded by every path.
    pub sentences: usize,
    /// Corpus sentences the PyTorch reference holds (matched by text).
    pub reference_sentences: usize,
    /// Smallest cosine of the float path against PyTorch (null without overlap).
    pub float_vs_reference_min_cosine: Option<f64>,
    /// Mean cosine of the float path against PyTorch.
    pub float_vs_reference_mean_cosine: Option<f64>,
    /// Smallest cosine of the encrypted path (integer where not encrypted) against PyTorch.
    pub encrypted_vs_reference_min_cosine: Option<f64>,
    /// Mean per-sentence cosine, encrypted (integer where not encrypted) vs float.
    pub encrypted_vs_float_mean_cosine: f64,
    /// Smallest per-sentence cosine, encrypted vs float.
    pub encrypted_vs_float_min_cosine: f64,
    /// Corpus index of that sentence.
    pub encrypted_vs_float_worst_index: usize,
    /// Mean over sentences of |top-k(encrypted) ∩ top-k(float)| / k among the corpus.
    pub top10_overlap: f64,
    /// The k of `top10_overlap` (10 unless `--k`).
    pub k: usize,
    /// Sentences actually run under encryption.
    pub encrypted_sentences: usize,
    /// Which ones: every `encrypt_every`-th from index 0.
    pub encrypt_every: usize,
    /// Every encrypted sentence's embedding equals the integer pipeline's bit for bit.
    pub encrypted_equals_integer_path: bool,
    /// Encrypted sentences whose embedding differs from the integer pipeline.
    pub encrypted_mismatches: usize,
    /// HE output mode.
    pub mode: String,
    /// Planned tokens per request.
    pub plan_batch: usize,
    /// Cloud layer requests, summed over the encrypted sentences.
    pub requests: u64,
    /// Request blob bytes, summed.
    pub bytes_up: u64,
    /// Reply blob bytes, summed.
    pub bytes_down: u64,
    /// Evaluation key bytes (uploaded once).
    pub key_upload_bytes: usize,
    /// Wall-clock seconds of the encrypted phase.
    pub encrypted_wall_s: f64,
    /// Cloud evaluation seconds, summed over sentences (they run concurrently on rayon's pool).
    pub cloud_s: f64,
    /// Threads of rayon's pool.
    pub threads: usize,
    /// Wall-clock seconds of the whole evaluation (loading included).
    pub wall_s: f64,
}

/// `tandem eval embeddings`.
///
/// # Errors
/// A model, corpus or reference that cannot be read; fewer than k + 1 sentences; an encrypted
/// embedding that differs from the integer pipeline (after printing the figures).
pub fn embeddings(args: &EmbeddingsArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = repo_root();
    let key = if args.verifying_key.is_relative() && !args.verifying_key.exists() {
        root.join(&args.verifying_key)
    } else {
        args.verifying_key.clone()
    };
    let model = MiniLm::resolve(&args.model, &args.float_model, &key)?;
    let mode = parse_mode(&args.mode)?;
    if args.encrypt_every == 0 {
        bail!("--encrypt-every 0: use 1 to encrypt every sentence");
    }
    if !(1..=tandem_he::limits::MAX_BATCH).contains(&args.plan_batch) {
        bail!(
            "--plan-batch {}: supported 1..={}",
            args.plan_batch,
            tandem_he::limits::MAX_BATCH
        );
    }
    let corpus_path = args
        .corpus
        .clone()
        .unwrap_or_else(|| root.join("data/minilm-corpus.txt"));
    let reference_path = args
        .reference
        .clone()
        .unwrap_or_else(|| root.join("data/minilm-reference.json.gz"));
    let corpus = read_corpus(&corpus_path, args.limit)?;
    let n = corpus.len();
    if args.k == 0 || n <= args.k {
        bail!(
            "{n} sentences: the top-{} overlap needs more than k sentences (use a longer corpus or a smaller --k)",
            args.k
        );
    }
    let reference = read_reference(&reference_path)?;
    let texts: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let enc_idx: Vec<usize> = (0..n).step_by(args.encrypt_every).collect();

    let bar = bar(2 * n + enc_idx.len());
    bar.set_message("loading (float, integer)");
    let float_enc = model.float()?;
    let int_enc = model.integer()?;
    bar.set_message("float path");
    let float = embed_all(|t| float_enc.embed(t), &texts, &bar)?;
    bar.set_message("integer pipeline");
    let integer = embed_all(|t| int_enc.embed(t), &texts, &bar)?;
    drop(float_enc);

    bar.set_message("planning the cloud layers");
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    // Sentences run concurrently on rayon's pool, each layer evaluation on one thread.
    let cloud = Arc::new(InProcessCloud::new(
        ctx.clone(),
        EvalOptions { parallel: false },
    ));
    let EncryptedEncoder {
        encoder: enc,
        session,
        key_upload_bytes,
        plan_batch,
    } = model.encrypted(ctx, mode, args.plan_batch, cloud.clone())?;
    session.reset_stats();
    bar.set_message(format!("encrypted ({})", mode.name()));
    let t_enc = Instant::now();
    let busy0 = cloud.busy();
    let encrypted: Vec<(usize, Array1<f32>)> = enc_idx
        .par_iter()
        .map(|&i| {
            let e = enc
                .embed(texts[i])
                .with_context(|| format!("encrypted embedding of sentence {i}"));
            bar.inc(1);
            e.map(|e| (i, e))
        })
        .collect::<anyhow::Result<_>>()?;
    let encrypted_wall_s = t_enc.elapsed().as_secs_f64();
    let cloud_s = (cloud.busy() - busy0).as_secs_f64();
    let stats: HeStats = session.stats();
    bar.finish_and_clear();

    let mut mismatches = 0usize;
    let mut test = integer.clone();
    for (i, e) in &encrypted {
        let same = e
            .iter()
            .zip(integer.row(*i))
            .all(|(a, b)| a.to_bits() == b.to_bits());
        if !same {
            mismatches += 1;
        }
        test.row_mut(*i).assign(e);
    }
    let vs_float = agreement(float.view(), test.view(), args.k)?;

    // The PyTorch reference, on the corpus sentences it holds.
    let matched: Vec<(usize, &Vec<f32>)> = texts
        .iter()
        .enumerate()
        .filter_map(|(i, t)| reference.get(*t).map(|e| (i, e)))
        .filter(|(_, e)| e.len() == float.ncols())
        .collect();
    let (mut fr, mut tr, mut pt) = (
        Array2::<f32>::zeros((matched.len(), float.ncols())),
        Array2::<f32>::zeros((matched.len(), float.ncols())),
        Array2::<f32>::zeros((matched.len(), float.ncols())),
    );
    for (k, (i, e)) in matched.iter().enumerate() {
        fr.row_mut(k).assign(&float.row(*i));
        tr.row_mut(k).assign(&test.row(*i));
        pt.row_mut(k).assign(&ndarray::ArrayView1::from(&e[..]));
    }
    let (fvr, tvr) = if matched.is_empty() {
        (None, None)
    } else {
        (
            Some(cosine_summary(pt.view(), fr.view())?),
            Some(cosine_summary(pt.view(), tr.view())?),
        )
    };

    let out = EvalJson {
        model: model.describe(),
        float_model: model.dir.display().to_string(),
        corpus: corpus_path.display().to_string(),
        sentences: n,
        reference_sentences: matched.len(),
        float_vs_reference_min_cosine: fvr.map(|s| s.min),
        float_vs_reference_mean_cosine: fvr.map(|s| s.mean),
        encrypted_vs_reference_min_cosine: tvr.map(|s| s.min),
        encrypted_vs_float_mean_cosine: vs_float.mean_cosine,
        encrypted_vs_float_min_cosine: vs_float.min_cosine,
        encrypted_vs_float_worst_index: vs_float.worst,
        top10_overlap: vs_float.top_k_overlap,
        k: args.k,
        encrypted_sentences: encrypted.len(),
        encrypt_every: args.encrypt_every,
        encrypted_equals_integer_path: mismatches == 0,
        encrypted_mismatches: mismatches,
        mode: mode.name().to_string(),
        plan_batch,
        requests: stats.requests,
        bytes_up: stats.bytes_up,
        bytes_down: stats.bytes_down,
        key_upload_bytes,
        encrypted_wall_s,
        cloud_s,
        threads: rayon::current_num_threads(),
        wall_s: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        print_table(&out);
    }
    if mismatches > 0 {
        bail!(
            "{mismatches} of {} encrypted embeddings differ from the integer pipeline (the HE product must be exact)",
            encrypted.len()
        );
    }
    Ok(())
}

fn print_table(o: &EvalJson) {
    let opt = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.8}"));
    println!(
        "tandem eval embeddings — {} on {} sentences of {}",
        o.model, o.sentences, o.corpus
    );
    println!(
        "float vs PyTorch ({} sentences):     min cosine {}  mean {}",
        o.reference_sentences,
        opt(o.float_vs_reference_min_cosine),
        opt(o.float_vs_reference_mean_cosine)
    );
    println!(
        "encrypted vs PyTorch:                 min cosine {}",
        opt(o.encrypted_vs_reference_min_cosine)
    );
    println!(
        "encrypted vs float ({} sentences):  mean cosine {:.6}  min {:.6} (sentence {})  top-{} overlap {:.4}",
        o.sentences,
        o.encrypted_vs_float_mean_cosine,
        o.encrypted_vs_float_min_cosine,
        o.encrypted_vs_float_worst_index,
        o.k,
        o.top10_overlap
    );
    println!(
        "encrypted ({}, every {}th sentence): {} sentences, equal to the integer pipeline bit for bit: {} ({} differ)",
        o.mode,
        o.encrypt_every,
        o.encrypted_sentences,
        if o.encrypted_equals_integer_path { "yes" } else { "NO" },
        o.encrypted_mismatches
    );
    println!(
        "  {} requests, {:.1} MB up, {:.1} MB down, key {:.2} MB; {:.1} s wall on {} threads, {:.1} s cloud",
        o.requests,
        o.bytes_up as f64 / 1e6,
        o.bytes_down as f64 / 1e6,
        o.key_upload_bytes as f64 / 1e6,
        o.encrypted_wall_s,
        o.threads,
        o.cloud_s
    );
}
