//! Parameter set 1 (q = 2^64 on the server, exact integers over four or five CRT primes) is
//! still served next to the default set 2: its exactness at the extremes, across the four/five
//! prime switch, with shared masks and on random shapes, in both output modes.
#![allow(clippy::unwrap_used)]

mod common;
use common::{fixture_of, reference, run_in, values, Fixture};
use proptest::prelude::*;
use std::sync::OnceLock;
use tandem_he::*;

const SET1: ParameterSet = PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64;

/// Set 1 with a two-body key (enough for the shared-mask plans below).
fn set1() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| fixture_of(SET1, 2))
}

#[allow(clippy::too_many_arguments)]
fn check(
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    w: &[i64],
    b: &[i64],
    xs: &[Vec<i64>],
    max_abs_input: u64,
    opts: PlanOptions,
) -> LayerPlan {
    let layer = PreparedLayer::prepare(
        set1().ctx.clone(),
        mode,
        n_in,
        n_out,
        w,
        b,
        max_abs_input,
        opts,
    )
    .unwrap();
    assert_eq!(layer.plan().params, SET1);
    for (x, y) in xs.iter().zip(run_in(set1(), &layer, xs)) {
        assert_eq!(
            y,
            reference(w, b, x, n_in, n_out),
            "set 1 {mode:?} {n_in}x{n_out} {:?}",
            layer.plan()
        );
    }
    *layer.plan()
}

#[test]
fn set1_worst_case_extremes_stay_exact() {
    let (n_in, n_out) = (1024, 1024);
    for mode in [OutputMode::NoKey, OutputMode::Packed] {
        check(
            mode,
            n_in,
            n_out,
            &vec![-128; n_in * n_out],
            &vec![1 << 20; n_out],
            &[vec![-128; n_in], vec![127; n_in]],
            128,
            PlanOptions::default(),
        );
    }
}

/// TDM-PAR-HE-4 under set 1: |w| ≤ 128 runs over four primes, wider weights over five.
#[test]
fn set1_four_and_five_prime_layers_stay_exact() {
    let (n_in, n_out) = (16, 40);
    for (w_max, x_max) in [(128i64, 128i64), (129, 128), ((1 << 20) - 1, 2)] {
        for mode in [OutputMode::NoKey, OutputMode::Packed] {
            let mut w = values(n_in * n_out, 31, -w_max, w_max);
            w[..n_in].iter_mut().for_each(|v| *v = w_max);
            w[n_in..2 * n_in].iter_mut().for_each(|v| *v = -w_max);
            let b = values(n_out, 32, -(1 << 16), 1 << 16);
            let xs = [vec![-x_max; n_in], values(n_in, 33, -x_max, x_max)];
            check(
                mode,
                n_in,
                n_out,
                &w,
                &b,
                &xs,
                x_max as u64,
                PlanOptions::default(),
            );
        }
    }
}

/// Shared masks (r = 2) and a short last block under set 1.
#[test]
fn set1_shared_mask_batches_stay_exact() {
    let (n_in, n_out) = (384, 384);
    let w = values(n_in * n_out, 41, -128, 127);
    let b = values(n_out, 42, -5000, 5000);
    let xs: Vec<Vec<i64>> = (0..13).map(|r| values(n_in, 50 + r, -128, 127)).collect();
    let plan = check(
        OutputMode::Packed,
        n_in,
        n_out,
        &w,
        &b,
        &xs,
        128,
        PlanOptions {
            chunk: Some(512),
            batch: Some(16),
            max_bodies: 2,
        },
    );
    assert_eq!(plan.bodies(), 2, "{plan:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, .. ProptestConfig::default() })]
    #[test]
    fn set1_random_shapes_stay_exact(
        n_in in 1usize..700,
        n_out in 1usize..300,
        rows in 1usize..6,
        packed in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mode = if packed { OutputMode::Packed } else { OutputMode::NoKey };
        let w = values(n_in * n_out, seed, -128, 127);
        let b = values(n_out, seed ^ 1, -1000, 1000);
        let xs: Vec<Vec<i64>> = (0..rows).map(|r| values(n_in, seed ^ (r as u64 + 7), -128, 127)).collect();
        check(mode, n_in, n_out, &w, &b, &xs, 128, PlanOptions { chunk: None, batch: Some(rows), max_bodies: 1 });
    }
}
