//! all-MiniLM-L6-v2 with every one of its 36 linear layers quantised (TDM issue 8):
//!
//! - `encrypted_minilm_equals_integer_pipeline_bit_for_bit`: a few corpus sentences run fully
//!   encrypted in-process (every linear layer through tandem-he), in both output modes (packed
//!   with the fused 384 → 1152 Q/K/V layer, no-key with three separate layers); the
//!   embeddings equal those of the cleartext integer pipeline bit for bit (the HE result is
//!   exact).
//! - `integer_pipeline_meets_the_issue_bars_over_the_corpus`: the cleartext integer pipeline
//!   over ALL 1,024 corpus sentences against the float path: mean cosine ≥ 0.99, min ≥ 0.97,
//!   top-10 nearest-neighbour overlap (neighbours among the corpus) ≥ 0.9. This runs the
//!   cleartext integer pipeline, not HE, so that CI stays fast: the first test proves the two
//!   bit-identical. The float path stands in for PyTorch on the 768 sentences the committed
//!   reference does not hold (it agrees with PyTorch to 6.2e-7 per coordinate, checked by
//!   `minilm_reference.rs`); on the 256-sentence subset and the 7 long texts the integer path
//!   is also compared with the PyTorch embeddings directly.
//!
//! Needs the model from `scripts/fetch-minilm.sh`; without it each test prints `SKIPPED: …`;
//! with `TANDEM_MINILM_DIR` set (as `.ci/run` does) a missing model is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::Array2;
use serde::Deserialize;
use tandem_he::{Context, EvalOptions, OutputMode, DEFAULT_PARAMETERS};
use tandem_ops::metrics::{agreement, cosine};
use tandem_ops::{
    EncryptedLinears, InProcessCloud, PrecisionPolicy, QuantizedLinears, SentenceEncoder,
};

mod common;
use common::model_dir;

const MEAN_COSINE: f64 = 0.99;
const MIN_COSINE: f64 = 0.97;
const TOP10_OVERLAP: f64 = 0.9;

#[derive(Deserialize)]
struct Reference {
    subset: Vec<Entry>,
    long: Vec<Long>,
}

#[derive(Deserialize)]
struct Entry {
    index: usize,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct Long {
    text: String,
    embedding: Vec<f32>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn reference() -> Reference {
    let mut json = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(repo().join("data/minilm-reference.json.gz")).unwrap(),
    )
    .read_to_string(&mut json)
    .unwrap();
    serde_json::from_str(&json).unwrap()
}

fn corpus() -> Vec<String> {
    std::fs::read_to_string(repo().join("data/minilm-corpus.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn integer_encoder(dir: &Path) -> SentenceEncoder {
    SentenceEncoder::load_with(
        dir,
        &mut QuantizedLinears {
            policy: PrecisionPolicy::minilm(),
        },
    )
    .unwrap()
}

#[test]
fn encrypted_minilm_equals_integer_pipeline_bit_for_bit() {
    let Some(dir) = model_dir("encrypted == integer pipeline") else {
        return;
    };
    let integer = integer_encoder(&dir);
    let lines = corpus();
    // Two sentences: the shortest of the corpus and one of average length.
    let texts = [lines[0].as_str(), lines[501].as_str()];
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    // No-key with Q/K/V as three layers (36 cloud layers), packed with Q/K/V fused (24): the
    // integer pipeline keeps them separate, so the packed case also proves fusion exact.
    for (mode, fused, layers) in [
        (OutputMode::NoKey, false, 36),
        (OutputMode::Packed, true, 24),
    ] {
        let cloud = Arc::new(InProcessCloud::new(
            ctx.clone(),
            EvalOptions { parallel: true },
        ));
        let mut factory = EncryptedLinears::new(
            ctx.clone(),
            mode,
            PrecisionPolicy::minilm(),
            16,
            cloud.clone(),
        )
        .with_fused_qkv(fused);
        let encrypted = SentenceEncoder::load_with(&dir, &mut factory).unwrap();
        assert_eq!(factory.planned().len(), layers);
        assert_eq!(encrypted.model().linears().len(), layers);
        for p in factory.planned() {
            assert!(
                p.plan.log2_p_fail <= -64.0,
                "{}: failure bound 2^{}",
                p.name,
                p.plan.log2_p_fail
            );
        }
        factory.upload_key().unwrap();
        let session = factory.session();
        for text in texts {
            let e = integer.encode(text).unwrap();
            let expect = integer.embed_encoded(&e).unwrap();
            session.reset_stats();
            let got = encrypted.embed_encoded(&e).unwrap();
            let st = session.stats();
            // Every linear layer went through the cloud, once (the sentence is < 64 tokens).
            assert_eq!(st.requests, layers as u64, "{mode:?}");
            assert_eq!(
                st.encrypted_macs,
                (e.ids.len() * 6 * (4 * 384 * 384 + 2 * 384 * 1536)) as u64
            );
            let same = got
                .iter()
                .zip(&expect)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{mode:?}, {} tokens: encrypted embedding differs from the integer pipeline",
                e.ids.len()
            );
            eprintln!(
                "{{\"mode\":\"{}\",\"tokens\":{},\"bytes_up\":{},\"bytes_down\":{},\"equal\":true}}",
                mode.name(),
                e.ids.len(),
                st.bytes_up,
                st.bytes_down
            );
        }
    }
}

#[test]
fn integer_pipeline_meets_the_issue_bars_over_the_corpus() {
    let Some(dir) = model_dir("the integer pipeline over the corpus") else {
        return;
    };
    let float = SentenceEncoder::load(&dir).unwrap();
    let integer = integer_encoder(&dir);
    let lines = corpus();
    assert_eq!(lines.len(), 1024);
    let mut f = Array2::<f32>::zeros((lines.len(), 384));
    let mut q = Array2::<f32>::zeros((lines.len(), 384));
    for (i, l) in lines.iter().enumerate() {
        f.row_mut(i).assign(&float.embed(l).unwrap());
        q.row_mut(i).assign(&integer.embed(l).unwrap());
    }
    let a = agreement(f.view(), q.view(), 10).unwrap();
    eprintln!(
        "{{\"vs\":\"float\",\"sentences\":{},\"mean_cosine\":{:.6},\"min_cosine\":{:.6},\"worst\":{},\"top10_overlap\":{:.4}}}",
        a.sentences, a.mean_cosine, a.min_cosine, a.worst, a.top_k_overlap
    );
    assert_eq!(a.sentences, 1024);
    assert!(
        a.mean_cosine >= MEAN_COSINE,
        "mean cosine {}",
        a.mean_cosine
    );
    assert!(
        a.min_cosine >= MIN_COSINE,
        "min cosine {} (sentence {})",
        a.min_cosine,
        a.worst
    );
    assert!(
        a.top_k_overlap >= TOP10_OVERLAP,
        "top-10 overlap {}",
        a.top_k_overlap
    );
    // Quantisation does change the embeddings (a pipeline that fell back to float would not).
    assert!(
        a.mean_cosine < 0.999_99,
        "integer path is suspiciously equal to float"
    );

    // Directly against PyTorch where the committed reference has embeddings.
    let r = reference();
    let mut pt = Array2::<f32>::zeros((r.subset.len(), 384));
    let mut qs = Array2::<f32>::zeros((r.subset.len(), 384));
    for (k, e) in r.subset.iter().enumerate() {
        pt.row_mut(k)
            .assign(&ndarray::ArrayView1::from(&e.embedding[..]));
        qs.row_mut(k).assign(&q.row(e.index));
    }
    let b = agreement(pt.view(), qs.view(), 10).unwrap();
    eprintln!(
        "{{\"vs\":\"pytorch_subset\",\"sentences\":{},\"mean_cosine\":{:.6},\"min_cosine\":{:.6},\"top10_overlap_within_subset\":{:.4}}}",
        b.sentences, b.mean_cosine, b.min_cosine, b.top_k_overlap
    );
    assert!(b.mean_cosine >= MEAN_COSINE && b.min_cosine >= MIN_COSINE);
    assert!(b.top_k_overlap >= TOP10_OVERLAP);
    for l in &r.long {
        let c = cosine(
            integer.embed(&l.text).unwrap().view(),
            ndarray::ArrayView1::from(&l.embedding[..]),
        );
        assert!(c >= MIN_COSINE, "long text: cosine {c}");
    }
}
