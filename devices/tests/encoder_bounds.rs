//! Issue 9, TDM-PAR-HE-3: an encoder bundle's signed row bounds and link rate drive the HE
//! plans of its cloud layers identically on the device (`tandem_ops`) and on the cloud
//! (`tandem_cloud::ModelRegistry`), and a manifest whose bounds lie about the cloud weights is
//! refused when the cloud loads it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use tandem_cloud::{CloudError, ModelRegistry, ModelSpec};
use tandem_he::{Context, OutputMode, WeightBounds, DEFAULT_PARAMETERS};
use tandem_model::{
    write_bundle, CloudLinear, EncoderSpec, Manifest, ModelError, NamedTensor, OpSpec, Placement,
    SigningKey, TensorData, WeightsRef,
};
use tandem_ops::encrypted::plan_encoder_layer;

const H: usize = 8;
const BATCH: usize = 8;

/// Small int8 weights (|w| <= 3): their row bounds are far below the entry bounds.
fn weights(n_in: usize, n_out: usize) -> Vec<i8> {
    (0..n_in * n_out).map(|i| (i % 7) as i8 - 3).collect()
}

fn linear(name: &str, n_in: usize, n_out: usize, bounds: Option<(u64, u64)>) -> CloudLinear {
    CloudLinear {
        name: name.into(),
        n_in,
        n_out,
        weight: format!("{name}.w"),
        scales: format!("{name}.s"),
        bias: format!("{name}.b"),
        input_bound: 127,
        weight_bound: 127,
        bias_bound: 0,
        max_row_l1: bounds.map(|b| b.0),
        max_row_sq: bounds.map(|b| b.1),
    }
}

/// The row bounds of [`weights`], computed by the HE engine (what `import-bert` signs).
fn true_bounds(n_in: usize, n_out: usize) -> (u64, u64) {
    let w: Vec<i64> = weights(n_in, n_out).iter().map(|&v| i64::from(v)).collect();
    let b = WeightBounds::of(&w, n_in, &[]);
    (b.max_row_l1.unwrap(), b.max_row_sq.unwrap())
}

fn manifest(link: Option<u32>, qkv: Option<(u64, u64)>, o: Option<(u64, u64)>) -> Manifest {
    let mut ops = vec![OpSpec::device("embedding", &[], "e")];
    ops[0].tensors = vec!["word".into(), "pos".into(), "type".into()];
    let mut ln = OpSpec::device("layer_norm", &["e"], "x");
    ln.tensors = vec!["ln.g".into(), "ln.b".into()];
    ln.eps = Some(1e-12);
    ops.push(ln);
    for (i, (input, output)) in [("x", "qkv"), ("ctx", "o")].into_iter().enumerate() {
        if i == 1 {
            let mut att = OpSpec::device("attention", &["qkv"], "ctx");
            att.heads = Some(2);
            ops.push(att);
        }
        let mut l = OpSpec::device("linear", &[input], output);
        l.placement = Placement::Cloud;
        l.linear = Some(i);
        ops.push(l);
    }
    ops.push(OpSpec::device("add", &["o", "x"], "r"));
    ops.push(OpSpec::device("mean_pool", &["r"], "p"));
    ops.push(OpSpec::device("l2_normalize", &["p"], "out"));
    Manifest::for_encoder(
        "tiny-encoder",
        "1",
        "none",
        EncoderSpec {
            hidden: H,
            max_tokens: 8,
            batch: BATCH,
            vocab_size: 10,
            max_position_embeddings: 8,
            type_vocab_size: 2,
            tokenizer: WeightsRef {
                file: "tokenizer.json".into(),
                sha256: "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a".into(),
                bytes: 2,
            },
            linears: vec![linear("qkv", H, 3 * H, qkv), linear("o", H, H, o)],
            ops,
            output: "out".into(),
            link_kbit_s: link,
            // The signed variant also lets 4 secrets share a mask: device and cloud must
            // derive the same multi-body plans from it.
            max_bodies: link.map(|_| 4),
        },
    )
    .unwrap()
}

fn f32t(name: &str, shape: &[usize]) -> NamedTensor {
    let n = shape.iter().product::<usize>();
    NamedTensor {
        name: name.into(),
        shape: shape.to_vec(),
        data: TensorData::F32((0..n).map(|i| 0.25 + (i % 7) as f32 * 0.1).collect()),
    }
}

fn write(dir: &std::path::Path, m: &Manifest, key: &SigningKey) {
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    let mut t = vec![
        f32t("word", &[10, H]),
        f32t("pos", &[8, H]),
        f32t("type", &[2, H]),
        f32t("ln.g", &[H]),
        f32t("ln.b", &[H]),
    ];
    for (name, n_in, n_out) in [("qkv", H, 3 * H), ("o", H, H)] {
        t.push(NamedTensor {
            name: format!("{name}.w"),
            shape: vec![n_out, n_in],
            data: TensorData::I8(weights(n_in, n_out)),
        });
        t.push(f32t(&format!("{name}.s"), &[n_out]));
        t.push(f32t(&format!("{name}.b"), &[n_out]));
    }
    write_bundle(dir, m, &t, key).unwrap();
}

fn load(m: &Manifest) -> Result<ModelRegistry, CloudError> {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[9u8; 32]);
    write(dir.path(), m, &key);
    ModelRegistry::load(
        vec![Arc::new(Context::new(DEFAULT_PARAMETERS))],
        &[ModelSpec {
            dir: dir.path().to_path_buf(),
            policy: Default::default(),
        }],
        &key.verifying_key(),
    )
}

#[test]
fn device_and_cloud_plan_encoder_layers_from_the_signed_bounds_and_link() {
    let qkv = true_bounds(H, 3 * H);
    let o = true_bounds(H, H);
    let signed = manifest(Some(2_000), Some(qkv), Some(o));
    let plain = manifest(None, None, None);
    let ctx = Context::new(DEFAULT_PARAMETERS);
    let mut tighter = 0;
    for (m, expect_link) in [(&signed, 2_000), (&plain, 25_000)] {
        let enc = m.encoder.as_ref().unwrap();
        assert_eq!(enc.link_kbit_per_s(), expect_link);
        let reg = load(m).unwrap_or_else(|e| panic!("{e}"));
        let entry = &reg.entries()[0];
        let served = reg.get(&entry.model_id, &entry.model_digest).unwrap();
        for mode in [OutputMode::Packed, OutputMode::NoKey] {
            for (i, l) in enc.linears.iter().enumerate() {
                let device = plan_encoder_layer(
                    &ctx,
                    mode,
                    l,
                    enc.batch,
                    enc.link_kbit_per_s(),
                    enc.max_bodies(),
                )
                .unwrap();
                let cloud = served
                    .layer(i as u32, DEFAULT_PARAMETERS.id, mode)
                    .unwrap()
                    .plan();
                assert_eq!(
                    &device, cloud,
                    "layer {i} {mode:?}: device and cloud plans differ"
                );
                if std::ptr::eq(m, &signed) {
                    let default = plan_encoder_layer(
                        &ctx,
                        mode,
                        &plain.encoder.as_ref().unwrap().linears[i],
                        BATCH,
                        25_000,
                        1,
                    )
                    .unwrap();
                    let bytes =
                        |p: &tandem_he::LayerPlan| p.upload_bytes(BATCH) + p.download_bytes(BATCH);
                    assert!(bytes(&device) <= bytes(&default), "layer {i} {mode:?}");
                    tighter += usize::from(bytes(&device) < bytes(&default));
                }
            }
        }
    }
    assert!(tighter > 0, "the signed bounds moved no byte");
}

#[test]
fn bounds_that_lie_about_the_cloud_weights_are_refused_at_load() {
    let (l1, sq) = true_bounds(H, H);
    // Just below the truth (the plan alone might still have room), and far below it.
    for lie in [(l1 - 1, sq), (l1, sq - 1), (1, 1)] {
        let m = manifest(None, Some(true_bounds(H, 3 * H)), Some(lie));
        match load(&m) {
            Err(CloudError::Model(ModelError::Tensor { name, reason })) => {
                assert_eq!(name, "o.w");
                assert!(reason.contains("manifest.toml"), "{reason}");
            }
            other => panic!("lie {lie:?}: expected a typed refusal, got {other:?}"),
        }
    }
}
