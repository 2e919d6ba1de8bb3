//! all-MiniLM-L6-v2 as a signed encoder bundle (issue 8): `import_bert` writes it, the
//! bundle's op graph run by [`BundleEncoder`] with the integer pipeline equals the checkpoint's
//! integer pipeline (the `SentenceEncoder` with `QuantizedLinears`) bit for bit, and the same
//! graph with every linear layer encrypted (in-process cloud, planned batch) equals both.
//!
//! Without the model (`scripts/fetch-minilm.sh`, `TANDEM_MINILM_DIR`) the test prints
//! `SKIPPED: …` and checks nothing; with `TANDEM_MINILM_DIR` set a missing model is a failure.
#![cfg(feature = "import")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use tandem_he::{Context, EvalOptions, OutputMode, DEFAULT_PARAMETERS};
use tandem_model::{Bundle, Limits, Part, SigningKey};
use tandem_ops::import::{import_bert, import_bert_with_link};
use tandem_ops::{
    BundleEncoder, BundleLinears, InProcessCloud, PrecisionPolicy, QuantizedLinears,
    SentenceEncoder,
};

mod common;
use common::model_dir;

const SENTENCES: [&str; 3] = [
    "A man is playing a guitar.",
    "The new movie is awesome, and the popcorn was great too!",
    "Encrypted inference keeps activations private.",
];

/// The bundle in `dir` with its cloud weights file, verified with `key`'s verifying key.
fn load_full(dir: &std::path::Path, key: &SigningKey) -> Bundle {
    Bundle::load_part(dir, &key.verifying_key(), &Limits::default(), Part::Full).unwrap()
}

/// `full`'s encoder with every linear encrypted through an in-process cloud (packed).
fn in_process_encrypted(full: &Bundle) -> BundleEncoder {
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    let cloud = Arc::new(InProcessCloud::new(ctx.clone(), EvalOptions::default()));
    BundleEncoder::from_bundle(
        full,
        BundleLinears::Encrypted {
            ctx,
            mode: OutputMode::Packed,
            cloud,
        },
    )
    .unwrap()
}

#[test]
fn minilm_bundle_integer_and_encrypted_equal_the_checkpoint_integer_pipeline() {
    let Some(src) = model_dir("the MiniLM bundle import") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[9u8; 32]);
    let s = import_bert(&src, out.path(), "all-minilm-l6-v2", 16, &key).unwrap();
    assert_eq!(s.linears, 24, "6 blocks × (fused QKV, O, FFN in, FFN out)");
    let full = load_full(out.path(), &key);
    let cloud_part = Bundle::load_part(
        out.path(),
        &key.verifying_key(),
        &Limits::default(),
        Part::Cloud,
    )
    .unwrap();
    assert_eq!(cloud_part.cloud_indices(), (0..24).collect::<Vec<_>>());

    let reference = SentenceEncoder::load_with(
        &src,
        &mut QuantizedLinears {
            policy: PrecisionPolicy::minilm(),
        },
    )
    .unwrap();
    let integer = BundleEncoder::from_bundle(&full, BundleLinears::Integer).unwrap();
    let encrypted = in_process_encrypted(&full);
    assert!(encrypted.upload_key().unwrap() > 0);
    for text in SENTENCES {
        let r = reference.embed(text).unwrap();
        let i = integer.embed(text).unwrap();
        assert_eq!(
            r.to_vec(),
            i.to_vec(),
            "bundle graph vs checkpoint pipeline: {text:?}"
        );
        let e = encrypted.embed(text).unwrap();
        assert_eq!(i.to_vec(), e.to_vec(), "encrypted vs integer: {text:?}");
    }
    let stats = encrypted.session().unwrap().stats();
    assert_eq!(stats.requests, 24 * SENTENCES.len() as u64);
}

/// Issue 9: `import_bert_with_link` signs the link rate and the exact row bounds of the int8
/// weights it ships; the encrypted graph planned from them (denser uploads, smaller ranges)
/// still equals the integer pipeline bit for bit.
#[test]
fn minilm_bundle_with_signed_bounds_and_link_stays_exact() {
    let Some(src) = model_dir("the MiniLM bundle with signed bounds") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[9u8; 32]);
    import_bert_with_link(&src, out.path(), "all-minilm-l6-v2", 16, Some(2_000), &key).unwrap();
    let full = load_full(out.path(), &key);
    let enc = full.encoder().unwrap();
    assert_eq!(enc.link_kbit_s, Some(2_000));
    let layers = full.cloud_layers().unwrap();
    assert_eq!(layers.len(), enc.linears.len());
    for (l, cl) in enc.linears.iter().zip(layers) {
        let actual = tandem_he::WeightBounds::of(&cl.weights, cl.n_in, &[]);
        assert_eq!(
            (l.max_row_l1, l.max_row_sq),
            (actual.max_row_l1, actual.max_row_sq),
            "{}",
            l.name
        );
        assert!(l.max_row_l1.unwrap() < (l.n_in as u64) * 127, "{}", l.name);
    }
    let integer = BundleEncoder::from_bundle(&full, BundleLinears::Integer).unwrap();
    let encrypted = in_process_encrypted(&full);
    encrypted.upload_key().unwrap();
    let text = SENTENCES[0];
    let i = integer.embed(text).unwrap();
    let e = encrypted.embed(text).unwrap();
    assert_eq!(i.to_vec(), e.to_vec(), "encrypted vs integer: {text:?}");
}

/// Issue 10, TDM-SPLIT-1: the MiniLM bundle loaded with its cloud weights file runs every split
/// depth 0..=6 (blocks `< k` on the device in the clear, the rest encrypted), each equal to the
/// integer pipeline bit for bit, sending exactly the linears of the offloaded blocks.
#[test]
fn minilm_every_split_depth_equals_the_integer_pipeline() {
    let Some(src) = model_dir("the MiniLM split depths") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[9u8; 32]);
    import_bert(&src, out.path(), "all-minilm-l6-v2", 16, &key).unwrap();
    let full = load_full(out.path(), &key);
    let integer = BundleEncoder::from_bundle(&full, BundleLinears::Integer).unwrap();
    let encrypted = in_process_encrypted(&full);
    assert_eq!(encrypted.blocks(), 6);
    assert_eq!(encrypted.split_depths(), (0..=6).collect::<Vec<_>>());
    encrypted.upload_key().unwrap();
    let session = encrypted.session().unwrap();
    let text = SENTENCES[0];
    let e = encrypted.encode(text).unwrap();
    let reference = integer.embed_encoded(&e).unwrap();
    for k in 0..=6 {
        session.reset_stats();
        let y = encrypted.embed_encoded_split(&e, k).unwrap();
        assert_eq!(y.to_vec(), reference.to_vec(), "split depth {k}: {text:?}");
        let s = session.stats();
        assert_eq!(s.requests, 4 * (6 - k as u64), "split depth {k}");
        assert_eq!(
            (s.requests, s.bytes_up, s.bytes_down),
            encrypted.offload_volume(e.ids.len(), k),
            "split depth {k}"
        );
    }
}
