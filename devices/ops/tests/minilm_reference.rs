//! The float MiniLM path against the independent PyTorch reference (issue 8: cosine ≥ 0.9999
//! per sentence). The reference was computed by `scripts/minilm-reference.py` with
//! sentence-transformers; `data/minilm-reference.json.gz` holds its versions, the corpus hash and
//! the embeddings of every 4th sentence of `data/minilm-corpus.txt`.
//!
//! Needs the model files from `scripts/fetch-minilm.sh`. Without them the model tests print
//! `SKIPPED: …` and check nothing; with `TANDEM_MINILM_DIR` set (as `.ci/run` does) a missing
//! model is a failure, not a skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tandem_ops::SentenceEncoder;

mod common;

const MIN_COSINE: f64 = 0.9999;
const MAX_ABS_DIFF: f64 = 1e-5;

#[derive(Deserialize)]
struct Reference {
    model: ModelInfo,
    corpus: CorpusInfo,
    subset: Vec<Entry>,
    long: Vec<Long>,
}

#[derive(Deserialize)]
struct Long {
    text: String,
    tokens: usize,
    embedding: Vec<f64>,
}

#[derive(Deserialize)]
struct ModelInfo {
    model_safetensors_sha256: String,
    max_seq_length: usize,
}

#[derive(Deserialize)]
struct CorpusInfo {
    file: String,
    sentences: usize,
    sha256: String,
}

#[derive(Deserialize)]
struct Entry {
    index: usize,
    text: String,
    tokens: usize,
    embedding: Vec<f64>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let path = repo().join("data/minilm-reference.json.gz");
        let mut json = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
            .read_to_string(&mut json)
            .unwrap();
        serde_json::from_str(&json).unwrap()
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The encoder, or `None` (after printing why) when the model files are absent and no
/// directory was asked for explicitly.
fn encoder() -> Option<&'static SentenceEncoder> {
    static E: OnceLock<Option<SentenceEncoder>> = OnceLock::new();
    E.get_or_init(|| {
        let dir = common::model_dir("the float path against the reference")?;
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        assert_eq!(
            hex(&Sha256::digest(&bytes)),
            reference().model.model_safetensors_sha256,
            "{} is not the checkpoint the reference was computed on",
            dir.display()
        );
        Some(SentenceEncoder::load(&dir).unwrap())
    })
    .as_ref()
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * y).sum();
    let na: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn committed_corpus_matches_the_reference_hash() {
    let r = reference();
    let text = std::fs::read_to_string(repo().join(&r.corpus.file)).unwrap();
    assert_eq!(hex(&Sha256::digest(text.as_bytes())), r.corpus.sha256);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), r.corpus.sentences);
    assert!(lines.len() >= 1000);
    assert!(r.subset.len() >= 64);
    for e in &r.subset {
        assert_eq!(lines[e.index], e.text, "subset entry {}", e.index);
        assert_eq!(e.embedding.len(), 384);
    }
}

#[test]
fn float_path_matches_pytorch_reference() {
    let Some(enc) = encoder() else { return };
    let r = reference();
    assert_eq!(enc.max_seq_length(), r.model.max_seq_length);
    let (mut min, mut worst) = (f64::INFINITY, 0);
    let mut max_abs = 0f64;
    for e in &r.subset {
        let encoded = enc.encode(&e.text).unwrap();
        assert_eq!(
            encoded.ids.len(),
            e.tokens,
            "token count of sentence {}",
            e.index
        );
        let emb = enc.embed_encoded(&encoded).unwrap();
        let c = cosine(emb.as_slice().unwrap(), &e.embedding);
        assert!(
            c >= MIN_COSINE,
            "sentence {} ({:?}): cosine {c} < {MIN_COSINE}",
            e.index,
            e.text
        );
        for (&x, &y) in emb.iter().zip(&e.embedding) {
            max_abs = max_abs.max((f64::from(x) - y).abs());
        }
        if c < min {
            (min, worst) = (c, e.index);
        }
    }
    // Cosine 0.9999 is the bar, but it is loose: the tanh approximation of GELU still
    // reaches 0.999997 (max abs diff 4.9e-4). The reference is rounded to 1e-6 and the float
    // path agrees to 6e-7, so also bound the largest coordinate difference.
    assert!(
        max_abs <= MAX_ABS_DIFF,
        "max abs diff {max_abs:e} > {MAX_ABS_DIFF:e}"
    );
    eprintln!(
        "{{\"sentences\":{},\"min_cosine\":{min:.12},\"worst_index\":{worst},\"max_abs_diff\":{max_abs:.3e}}}",
        r.subset.len()
    );
}

#[test]
fn minilm_has_36_linear_layers_in_checkpoint_order() {
    let Some(enc) = encoder() else { return };
    let linears = enc.model().linears();
    assert_eq!(linears.len(), 36);
    let suffixes = [
        ("attention.self.query", 384, 384),
        ("attention.self.key", 384, 384),
        ("attention.self.value", 384, 384),
        ("attention.output.dense", 384, 384),
        ("intermediate.dense", 384, 1536),
        ("output.dense", 1536, 384),
    ];
    for (i, l) in linears.iter().enumerate() {
        let (suffix, fan_in, fan_out) = suffixes[i % 6];
        assert_eq!(l.name(), format!("encoder.layer.{}.{suffix}", i / 6));
        assert_eq!((l.in_features(), l.out_features()), (fan_in, fan_out));
    }
}

#[test]
fn long_text_is_truncated_to_max_seq_length() {
    let Some(enc) = encoder() else { return };
    let text = "private inference on the device and the cloud ".repeat(100);
    let e = enc.encode(&text).unwrap();
    assert_eq!(e.ids.len(), enc.max_seq_length());
    assert_eq!(e.ids.first(), Some(&101)); // [CLS]
    assert_eq!(e.ids.last(), Some(&102)); // [SEP]
    let emb = enc.embed_encoded(&e).unwrap();
    let norm: f32 = emb.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[test]
fn long_texts_and_truncation_match_pytorch_reference() {
    let Some(enc) = encoder() else { return };
    let r = reference();
    assert!(r.long.iter().any(|l| l.tokens >= 128));
    assert!(r.long.iter().any(|l| l.tokens == r.model.max_seq_length));
    for l in &r.long {
        let e = enc.encode(&l.text).unwrap();
        assert_eq!(e.ids.len(), l.tokens);
        let emb = enc.embed_encoded(&e).unwrap();
        let c = cosine(emb.as_slice().unwrap(), &l.embedding);
        assert!(c >= MIN_COSINE, "{} tokens: cosine {c}", l.tokens);
        let max_abs = emb
            .iter()
            .zip(&l.embedding)
            .map(|(&x, &y)| (f64::from(x) - y).abs())
            .fold(0f64, f64::max);
        assert!(
            max_abs <= MAX_ABS_DIFF,
            "{} tokens: max abs diff {max_abs:e}",
            l.tokens
        );
        eprintln!("{{\"tokens\":{},\"cosine\":{c:.12}}}", l.tokens);
    }
}

#[test]
fn masked_padding_does_not_change_the_embedding() {
    let Some(enc) = encoder() else { return };
    let text = &reference().subset[0].text;
    let e = enc.encode(text).unwrap();
    let plain = enc.embed_encoded(&e).unwrap();
    let mut padded = e.clone();
    padded.ids.extend([0; 9]);
    padded.type_ids.extend([0; 9]);
    padded.mask.extend([false; 9]);
    let with_pad = enc.embed_encoded(&padded).unwrap();
    let diff = plain
        .iter()
        .zip(&with_pad)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "max abs diff {diff}");
    // The mask matters: the same padding left unmasked changes the embedding.
    padded.mask.iter_mut().for_each(|m| *m = true);
    let unmasked = enc.embed_encoded(&padded).unwrap();
    let moved = plain
        .iter()
        .zip(&unmasked)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-3,
        "unmasked padding moved the embedding by only {moved}"
    );
}
