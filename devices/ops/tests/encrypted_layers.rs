//! The integer pipeline and its encrypted twin on synthetic layers (no model files needed):
//! quantisation rules, encrypted == integer bit for bit in both output modes and both
//! precisions (TDM issue 8), and typed refusals from the cloud side.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use ndarray::{Array1, Array2};
use tandem_he::{Context, EvalOptions, OutputMode, DEFAULT_PARAMETERS};
use tandem_ops::metrics::cosine;
use tandem_ops::quant::quantize_rows;
use tandem_ops::{
    ActivationBits, CloudLayers, EncryptedLinears, InProcessCloud, Linear, LinearFactory,
    LinearSpec, OpsError, PrecisionPolicy, QuantizedLinears, QuantizedWeights,
};

/// Deterministic values in [-1, 1) (xorshift), so the test needs no RNG crate.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

fn spec(n_in: usize, n_out: usize) -> LinearSpec {
    let mut weight = Array2::from_shape_vec((n_out, n_in), values(1, n_in * n_out)).unwrap();
    // Rows of very different magnitude, and an all-zero row: per-channel scales matter.
    weight.row_mut(0).mapv_inplace(|w| w * 40.0);
    weight.row_mut(1).fill(0.0);
    LinearSpec {
        name: "test.layer".into(),
        weight,
        bias: Array1::from(values(2, n_out)),
    }
}

/// `rows` token rows; from 8 rows on, row 2 is zero and row 5 is 1000× larger than the others.
fn input(rows: usize, n_in: usize) -> Array2<f32> {
    let mut x = Array2::from_shape_vec((rows, n_in), values(3, rows * n_in)).unwrap();
    if rows >= 8 {
        x.row_mut(2).fill(0.0);
        x.row_mut(5).mapv_inplace(|v| v * 1000.0);
    }
    x
}

fn ctx() -> Arc<Context> {
    Arc::new(Context::new(DEFAULT_PARAMETERS))
}

#[test]
fn rows_are_quantised_with_their_own_scale() {
    let x = input(8, 32);
    for bits in [ActivationBits::Int8, ActivationBits::Int16] {
        let q = quantize_rows(x.view(), bits).unwrap();
        for t in 0..8 {
            let max = q.values.row(t).iter().map(|v| v.abs()).max().unwrap();
            if t == 2 {
                assert_eq!(max, 0);
                assert_eq!(q.scales[t], 1.0);
            } else {
                // The largest |value| of every row lands on the full range.
                assert_eq!(max, bits.q_max(), "row {t}");
                let back: Vec<f32> = q
                    .values
                    .row(t)
                    .iter()
                    .map(|&v| v as f32 * q.scales[t])
                    .collect();
                for (a, b) in back.iter().zip(x.row(t)) {
                    assert!(
                        (a - b).abs() <= q.scales[t] * 0.5 + 1e-6,
                        "row {t}: {a} vs {b}"
                    );
                }
            }
        }
    }
    let mut bad = input(2, 4);
    bad[[1, 1]] = f32::NAN;
    assert!(quantize_rows(bad.view(), ActivationBits::Int8).is_none());
}

#[test]
fn weights_are_int8_per_output_channel_and_the_product_is_exact() {
    let s = spec(48, 10);
    let w = QuantizedWeights::quantize(&s, ActivationBits::Int16).unwrap();
    for r in 0..10 {
        let max = w.weights.row(r).iter().map(|v| v.abs()).max().unwrap();
        assert_eq!(max, if r == 1 { 0 } else { 127 }, "row {r}");
    }
    // Row 0 is 40× larger than the others: its own scale, not a shared one.
    assert!(w.device.weight_scales[0] > 20.0 * w.device.weight_scales[2]);
    let x = input(7, 48);
    let q = w.device.quantize_input(x.view()).unwrap();
    let acc = w.integer_product(&q).unwrap();
    for t in 0..7 {
        for r in 0..10 {
            let naive: i64 = (0..48).map(|i| q.values[[t, i]] * w.weights[[r, i]]).sum();
            assert_eq!(acc[[t, r]], naive);
        }
    }
}

#[test]
fn integer_pipeline_is_close_to_float() {
    let s = spec(256, 64);
    let x = input(12, 256);
    let float = tandem_ops::DenseLinear::new(s.clone())
        .unwrap()
        .forward(x.view())
        .unwrap();
    for (bits, bar) in [
        (ActivationBits::Int8, 0.999),
        (ActivationBits::Int16, 0.9999),
    ] {
        let y = QuantizedLinears {
            policy: PrecisionPolicy::uniform(bits),
        }
        .build(s.clone())
        .unwrap()
        .forward(x.view())
        .unwrap();
        for t in 0..12 {
            let c = cosine(float.row(t), y.row(t));
            assert!(c >= bar, "{bits:?} row {t}: cosine {c}");
        }
    }
}

/// Encrypted == integer, bit for bit, for 70 rows (two requests: 64 + 6), both modes, both
/// precisions, with a bias the device adds.
#[test]
fn encrypted_layer_equals_integer_layer_bit_for_bit() {
    let ctx = ctx();
    let (n_in, n_out, rows) = (96, 40, 70);
    let s = spec(n_in, n_out);
    let x = input(rows, n_in);
    for bits in [ActivationBits::Int8, ActivationBits::Int16] {
        let policy = PrecisionPolicy::uniform(bits);
        let expect = QuantizedLinears {
            policy: policy.clone(),
        }
        .build(s.clone())
        .unwrap()
        .forward(x.view())
        .unwrap();
        for mode in [OutputMode::NoKey, OutputMode::Packed] {
            let cloud = Arc::new(InProcessCloud::new(ctx.clone(), EvalOptions::default()));
            let mut f = EncryptedLinears::new(ctx.clone(), mode, policy.clone(), 16, cloud.clone());
            let layer = f.build(s.clone()).unwrap();
            let key_bytes = f.upload_key().unwrap();
            assert_eq!(key_bytes == 0, mode == OutputMode::NoKey);
            let y = layer.forward(x.view()).unwrap();
            assert_eq!(y.dim(), (rows, n_out));
            let same = y
                .iter()
                .zip(&expect)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{bits:?} {mode:?}: encrypted differs from the integer pipeline"
            );
            let st = f.session().stats();
            assert_eq!(st.requests, 2);
            assert_eq!(st.encrypted_macs, (rows * n_in * n_out) as u64);
            assert!(st.bytes_up > 0 && st.bytes_down > 0);
            assert!(cloud.busy().as_nanos() > 0);
            assert!(f.planned()[0].plan.log2_p_fail <= -64.0);
        }
    }
}

type Damage = fn(Vec<u8>) -> Vec<u8>;

/// A cloud that tampers with the replies of an honest in-process cloud.
struct Tamper {
    inner: InProcessCloud,
    how: Damage,
}

impl CloudLayers for Tamper {
    fn load(
        &self,
        index: usize,
        plan: &tandem_he::LayerPlan,
        weights: &QuantizedWeights,
    ) -> Result<(), OpsError> {
        self.inner.load(index, plan, weights)
    }
    fn upload_key(&self, key: &[u8]) -> Result<(), OpsError> {
        self.inner.upload_key(key)
    }
    fn evaluate(&self, index: usize, request: &[u8]) -> Result<Vec<u8>, OpsError> {
        self.inner.evaluate(index, request).map(self.how)
    }
}

#[test]
fn damaged_replies_are_typed_errors() {
    let ctx = ctx();
    let s = spec(64, 16);
    let x = input(4, 64);
    let cases: [(&str, Damage); 3] = [
        ("truncated", |mut b| {
            b.truncate(b.len() - 1);
            b
        }),
        ("empty", |_| Vec::new()),
        ("extended", |mut b| {
            b.push(0);
            b
        }),
    ];
    for (what, how) in cases {
        let cloud = Arc::new(Tamper {
            inner: InProcessCloud::new(ctx.clone(), EvalOptions::default()),
            how,
        });
        let mut f = EncryptedLinears::new(
            ctx.clone(),
            OutputMode::NoKey,
            PrecisionPolicy::uniform(ActivationBits::Int8),
            4,
            cloud,
        );
        let layer = f.build(s.clone()).unwrap();
        match layer.forward(x.view()) {
            Err(OpsError::He { layer, .. }) => assert_eq!(layer, "test.layer", "{what}"),
            other => panic!("{what}: expected OpsError::He, got {other:?}"),
        }
    }
}

#[test]
fn cloud_refuses_unknown_layers_missing_keys_and_reloads() {
    let ctx = ctx();
    let cloud = Arc::new(InProcessCloud::new(ctx.clone(), EvalOptions::default()));
    let mut f = EncryptedLinears::new(
        ctx.clone(),
        OutputMode::Packed,
        PrecisionPolicy::uniform(ActivationBits::Int8),
        4,
        cloud.clone(),
    );
    let layer = f.build(spec(64, 16)).unwrap();
    // Packed mode before the key is uploaded.
    assert!(matches!(
        layer.forward(input(4, 64).view()),
        Err(OpsError::Cloud { index: 0, .. })
    ));
    // A request for a layer the model does not have.
    assert!(matches!(
        cloud.evaluate(7, &[0u8; 16]),
        Err(OpsError::Cloud { index: 7, .. })
    ));
    // Garbage for a real layer.
    assert!(matches!(
        cloud.evaluate(0, &[0u8; 16]),
        Err(OpsError::He { .. })
    ));
    // Loading index 0 again.
    let plan = f.planned()[0].plan;
    let w = QuantizedWeights::quantize(&spec(64, 16), ActivationBits::Int8).unwrap();
    assert!(matches!(
        cloud.load(0, &plan, &w),
        Err(OpsError::Cloud { index: 0, .. })
    ));
    // A key blob that is not a key.
    assert!(matches!(
        cloud.upload_key(&[1, 2, 3]),
        Err(OpsError::He { .. })
    ));
    f.upload_key().unwrap();
    assert!(layer.forward(input(4, 64).view()).is_ok());
    // Wrong width.
    assert!(matches!(
        layer.forward(input(4, 63).view()),
        Err(OpsError::Shape { .. })
    ));
}
