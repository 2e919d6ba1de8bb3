//! Measured output noise against the engine's prediction, and against its bound.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use tandem_he::*;

/// Runs one layer and returns (measured variance, predicted variance, max |noise|, bound variance).
fn measure(
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    batch: usize,
    opts: PlanOptions,
) -> (f64, f64, f64, f64) {
    let f = fixture();
    let mut client = f.client.lock().unwrap_or_else(|e| e.into_inner());
    measure_with(&mut client, &f.prepared_key, mode, n_in, n_out, batch, opts)
}

/// [`measure`] with the caller's client and packing key (multi-body plans need a key with as
/// many bodies as the plan).
#[allow(clippy::too_many_arguments)]
fn measure_with(
    client: &mut Client,
    prepared_key: &PreparedEvaluationKey,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    batch: usize,
    opts: PlanOptions,
) -> (f64, f64, f64, f64) {
    let f = fixture();
    let w = values(n_in * n_out, 99, -128, 127);
    let b = values(n_out, 98, -1000, 1000);
    let layer =
        PreparedLayer::prepare(f.ctx.clone(), mode, n_in, n_out, &w, &b, 128, opts).unwrap();
    let plan = *layer.plan();
    assert_eq!(plan.bodies, opts.max_bodies.max(1), "{plan:?}");
    let xs: Vec<Vec<i64>> = (0..batch)
        .map(|i| values(n_in, 200 + i as u64, -128, 127))
        .collect();
    let ct = client.encrypt(&plan, &xs).unwrap();
    let key = (mode == OutputMode::Packed).then_some(prepared_key);
    let out = layer.eval(&ct, key, EvalOptions::default()).unwrap();
    let got = client.decrypt_with_noise(&plan, &out).unwrap();
    let mut sum_sq = 0.0;
    let mut max_abs = 0f64;
    let mut count = 0.0;
    for (x, row) in xs.iter().zip(&got) {
        let expect = reference(&w, &b, x, n_in, n_out);
        for ((y, e), r) in row.iter().zip(&expect) {
            assert_eq!(y, r);
            sum_sq += (*e as f64).powi(2);
            max_abs = max_abs.max((*e as f64).abs());
            count += 1.0;
        }
    }
    // Average block norm: every output's noise is driven by its own block's weights.
    let rows = plan.rows();
    let mean_block: f64 = (0..plan.out_blocks())
        .map(|o| {
            w[o * rows * n_in..((o + 1) * rows).min(n_out) * n_in]
                .iter()
                .map(|&v| (v * v) as f64)
                .sum::<f64>()
        })
        .sum::<f64>()
        / plan.out_blocks() as f64;
    let key_weight = DEFAULT_PARAMETERS.poly_size as f64 / 2.0;
    let stats = weight_stats(&w, n_in, n_out, &b, rows);
    let bound = plan.download_variance(
        plan.pre_switch_variance(stats, plan.upload_bits),
        plan.download_bits,
        plan.body_bits,
    );
    (
        sum_sq / count,
        plan.expected_variance(mean_block, key_weight),
        max_abs,
        bound,
    )
}

/// The plan's bound is a bound on the noise *variance* (it feeds the failure probability,
/// TDM-PAR-HE-1), not on one run's sample variance. Where it is tight — NoKey, whose bound
/// differs from the prediction only by the largest block norm against the mean one and a
/// secret of weight N against N/2 (pred/bound 0.993 for 1024×1024) — a sample variance above
/// the bound is the estimator's noise, not a broken bound. So: the bound must dominate the
/// prediction, and the measurement may exceed the bound by no more than the band allows.
fn assert_bound_dominates(mode: OutputMode, predicted: f64, measured: f64, bound: f64) {
    assert!(
        predicted <= bound,
        "{mode:?}: the bound ({bound:.3e}) must dominate the prediction ({predicted:.3e})"
    );
    assert!(
        measured <= 1.25 * bound,
        "{mode:?}: measured {measured:.3e} is beyond the band above the bound {bound:.3e}"
    );
}

/// The sample variance fluctuates around the true variance: over 30 runs of this file
/// (2026-12-01) the measured/predicted ratio ranged over 0.946–1.066 (a relative standard
/// deviation of about 2.5 %; the outputs of one block share the same noise polynomial, so they
/// are not independent samples). The −20 %/+25 % band is > 8 standard deviations wide.
#[test]
fn measured_noise_variance_matches_prediction() {
    let row = PlanOptions::default();
    let batched = PlanOptions {
        chunk: None,
        batch: Some(16),
        max_bodies: 1,
    };
    // Row-by-row layout, then the batch layout (16 rows per request, 16 × 1536 = 24 576
    // outputs: the same ±20 % band is wider still in standard deviations).
    for (mode, n_in, n_out, batch, opts) in [
        (OutputMode::NoKey, 1024, 1024, 4, row),
        (OutputMode::Packed, 1024, 1024, 4, row),
        (OutputMode::NoKey, 384, 1536, 16, batched),
        (OutputMode::Packed, 384, 1536, 16, batched),
    ] {
        let (measured, predicted, max_abs, bound) = measure(mode, n_in, n_out, batch, opts);
        let ratio = measured / predicted;
        eprintln!("{mode:?} {n_in}x{n_out} batch {batch}: measured {measured:.3e}, predicted {predicted:.3e}, ratio {ratio:.3}, max |e| 2^{:.1}, bound std 2^{:.1}", max_abs.log2(), bound.sqrt().log2());
        assert!((0.8..=1.25).contains(&ratio), "{mode:?}: ratio {ratio}");
        assert_bound_dominates(mode, predicted, measured, bound);
    }
}

/// TDM-PAR-HE-1, shared masks: with r = 2 bodies per mask every body's noise is the
/// single-secret analysis under its own secret (same products, same key-switch term, same mask
/// rounding times its own secret), so the same prediction holds: measured against it over
/// 16 rows × 1536 outputs (both bodies), in both modes, with the same ±20 % band.
#[test]
fn two_body_noise_variance_matches_the_single_secret_prediction() {
    let f = fixture();
    let mut client = Client::from_seed(f.ctx.clone(), 0x5eed_0002);
    let key = client.evaluation_key_for(1024, 2).unwrap();
    let key = PreparedEvaluationKey::prepare(&key, &f.ctx).unwrap();
    // chunk 512: b₁ = 8 rows per polynomial, r = 2 bodies: the 16 rows share one mask.
    let opts = PlanOptions {
        chunk: Some(512),
        batch: Some(16),
        max_bodies: 2,
    };
    for mode in [OutputMode::NoKey, OutputMode::Packed] {
        let (measured, predicted, max_abs, bound) =
            measure_with(&mut client, &key, mode, 384, 1536, 16, opts);
        let ratio = measured / predicted;
        eprintln!("{mode:?} 384x1536 batch 16, r = 2: measured {measured:.3e}, predicted {predicted:.3e}, ratio {ratio:.3}, max |e| 2^{:.1}, bound std 2^{:.1}", max_abs.log2(), bound.sqrt().log2());
        assert!((0.8..=1.25).contains(&ratio), "{mode:?}: ratio {ratio}");
        assert_bound_dominates(mode, predicted, measured, bound);
    }
}
