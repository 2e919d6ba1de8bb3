//! The in-process cloud admits the device's honest evaluation key for a model whose widest
//! packing chunk and most bodies per mask come from two different layers (shared-mask plans,
//! TDM-PAR-HE-3): the device generates one key for the largest chunk AND the most bodies
//! (`BundleEncoder::upload_key`, `EncryptedLinears::upload_key`), which is larger than any
//! single layer's plan asks for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use ndarray::{Array1, Array2};
use tandem_he::{
    Client, Context, EncryptedOutput, EvalOptions, LayerPlan, LinkModel, OutputMode, PreparedLayer,
    WeightBounds, DEFAULT_PARAMETERS,
};
use tandem_ops::quant::{ActivationBits, QuantizedWeights};
use tandem_ops::{CloudLayers, InProcessCloud, LinearSpec};

fn plan(n_in: usize, n_out: usize, batch: usize, max_bodies: usize) -> LayerPlan {
    PreparedLayer::plan_int8_batch_bounded(
        DEFAULT_PARAMETERS,
        OutputMode::Packed,
        n_in,
        n_out,
        WeightBounds::entries(127, 0),
        batch,
        LinkModel { kbit_per_s: 1_000 },
        max_bodies,
    )
    .unwrap()
}

fn weights(n_in: usize, n_out: usize) -> QuantizedWeights {
    let w: Vec<f32> = (0..n_in * n_out)
        .map(|i| ((i * 37 % 255) as f32 - 127.0) / 127.0)
        .collect();
    let spec = LinearSpec {
        name: format!("layer.{n_in}x{n_out}"),
        weight: Array2::from_shape_vec((n_out, n_in), w).unwrap(),
        bias: Array1::zeros(n_out),
    };
    QuantizedWeights::quantize(&spec, ActivationBits::Int8).unwrap()
}

#[test]
fn the_key_for_the_widest_chunk_and_the_most_bodies_is_admitted() {
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    // A single-secret layer with a wide chunk (16 rows per request) and a shared-mask one
    // with a narrower chunk (64 rows per request: 2 bodies of 32 rows).
    let layers = [(384, 64, 16, 1), (128, 128, 64, 4)];
    let plans: Vec<LayerPlan> = layers
        .iter()
        .map(|&(i, o, b, r)| plan(i, o, b, r))
        .collect();
    assert!(
        plans[0].chunk > plans[1].chunk && plans[1].bodies() > plans[0].bodies(),
        "the premise: chunk and bodies peak in different layers ({plans:?})"
    );
    let cloud = InProcessCloud::new(ctx.clone(), EvalOptions::default());
    let qw: Vec<QuantizedWeights> = layers.iter().map(|&(i, o, _, _)| weights(i, o)).collect();
    for (index, (p, w)) in plans.iter().zip(&qw).enumerate() {
        cloud.load(index, p, w).unwrap();
    }
    let mut client = Client::new(ctx);
    let chunk = plans.iter().map(|p| p.chunk).max().unwrap();
    let bodies = plans.iter().map(LayerPlan::bodies).max().unwrap();
    let key = client.evaluation_key_for(chunk, bodies).unwrap().to_bytes();
    assert!(plans.iter().all(|p| key.len() > p.eval_key_bytes()));
    cloud
        .upload_key(&key)
        .unwrap_or_else(|e| panic!("the honest {}-byte key: {e}", key.len()));
    // Both layers evaluate exactly under it.
    for (index, (p, w)) in plans.iter().zip(&qw).enumerate() {
        let rows: Vec<Vec<i64>> = (0..layers[index].2)
            .map(|t| {
                (0..p.n_in)
                    .map(|i| ((t * 7 + i) % 255) as i64 - 127)
                    .collect()
            })
            .collect();
        let reply = cloud
            .evaluate(index, &client.encrypt(p, &rows).unwrap().to_bytes())
            .unwrap();
        let out = EncryptedOutput::from_bytes(&reply, reply.len(), p, &client.key_id()).unwrap();
        let expect: Vec<Vec<i64>> = rows
            .iter()
            .map(|x| {
                w.weights
                    .rows()
                    .into_iter()
                    .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
                    .collect()
            })
            .collect();
        assert_eq!(client.decrypt(p, &out).unwrap(), expect, "{p:?}");
    }
    // Larger than the widest chunk and the most bodies together: still refused.
    let big = client
        .evaluation_key_for(chunk, bodies + 1)
        .unwrap()
        .to_bytes();
    assert!(cloud.upload_key(&big).is_err());
}
