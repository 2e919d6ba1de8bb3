//! Criterion micro-benchmarks of the engine's cost-model units (one thread): the N = 4096
//! transform both ways, one key switch, one ciphertext × plaintext product, and whole packed
//! layers. `cargo bench -p tandem-he`; figures and machine in BENCHMARKS.md.
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::Arc;
use tandem_he::bench_api::Fixture;
use tandem_he::{
    Client, Context, EvalOptions, OutputMode, PlanOptions, PreparedEvaluationKey, PreparedLayer,
    DEFAULT_PARAMETERS,
};

fn units(c: &mut Criterion) {
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    let f = Fixture::new(ctx).unwrap();
    c.bench_function("ntt/forward_u64", |b| b.iter(|| black_box(f.ntt_forward())));
    c.bench_function("ntt/inverse_u64", |b| b.iter(|| black_box(f.ntt_inverse())));
    c.bench_function("key_switch", |b| b.iter(|| black_box(f.key_switch())));
    c.bench_function("ct_pt_product", |b| b.iter(|| black_box(f.ct_product())));
    // Multi-body units (TDM-PAR-HE-3 cost model): one shared mask, 4 bodies. The per-body
    // cost is (bodies4 − single) / 3.
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    let f4 = Fixture::with_bodies(ctx, 4).unwrap();
    c.bench_function("key_switch/bodies4", |b| {
        b.iter(|| black_box(f4.key_switch()))
    });
    c.bench_function("ct_pt_product/bodies4", |b| {
        b.iter(|| black_box(f4.ct_product()))
    });
}

fn int8(len: usize, seed: u64) -> Vec<i64> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 255) as i64 - 127
        })
        .collect()
}

fn layer(c: &mut Criterion, batch: usize, n_in: usize, n_out: usize) {
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    let (w, bias) = (int8(n_in * n_out, 1), int8(n_out, 2));
    let opts = PlanOptions {
        chunk: None,
        batch: (batch > 1).then_some(batch),
        max_bodies: 1,
    };
    let layer = PreparedLayer::prepare(
        ctx.clone(),
        OutputMode::Packed,
        n_in,
        n_out,
        &w,
        &bias,
        128,
        opts,
    )
    .unwrap();
    let mut client = Client::from_seed(ctx.clone(), 9);
    let key = client.evaluation_key(layer.plan().chunk).unwrap();
    let key = PreparedEvaluationKey::prepare(&key, &ctx).unwrap();
    let xs: Vec<Vec<i64>> = (0..batch).map(|r| int8(n_in, 3 + r as u64)).collect();
    let input = client.encrypt(layer.plan(), &xs).unwrap();
    let mut g = c.benchmark_group("layer");
    g.sample_size(10);
    g.bench_function(format!("packed_{batch}x{n_in}@{n_in}x{n_out}"), |b| {
        b.iter(|| {
            black_box(
                layer
                    .eval(&input, Some(&key), EvalOptions::default())
                    .unwrap(),
            )
        })
    });
    g.finish();
}

fn layers(c: &mut Criterion) {
    layer(c, 1, 1024, 1024);
    layer(c, 16, 384, 1536);
}

criterion_group!(benches, units, layers);
criterion_main!(benches);
