//! decrypt(eval(W, enc(x))) = W·x + b, exactly, in both output modes.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use proptest::prelude::*;
use tandem_he::*;

fn check(mode: OutputMode, n_in: usize, n_out: usize, w: Vec<i64>, b: Vec<i64>, xs: Vec<Vec<i64>>) {
    check_with(mode, n_in, n_out, w, b, xs, PlanOptions::default());
}

fn check_with(
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    w: Vec<i64>,
    b: Vec<i64>,
    xs: Vec<Vec<i64>>,
    opts: PlanOptions,
) {
    let f = fixture();
    let layer =
        PreparedLayer::prepare(f.ctx.clone(), mode, n_in, n_out, &w, &b, 128, opts).unwrap();
    let got = run(&layer, &xs);
    assert_eq!(got.len(), xs.len());
    for (x, y) in xs.iter().zip(&got) {
        assert_eq!(
            y,
            &reference(&w, &b, x, n_in, n_out),
            "mode {mode:?} {n_in}x{n_out} plan {:?}",
            layer.plan()
        );
    }
}

#[test]
fn worst_case_all_extremes_1024_square() {
    let (n_in, n_out) = (1024, 1024);
    for mode in [OutputMode::NoKey, OutputMode::Packed] {
        // All +127 weights against all −128 inputs, maximal bias, and the mirror case.
        check(
            mode,
            n_in,
            n_out,
            vec![127; n_in * n_out],
            vec![1 << 20; n_out],
            vec![vec![-128; n_in]],
        );
        check(
            mode,
            n_in,
            n_out,
            vec![-128; n_in * n_out],
            vec![-(1 << 20); n_out],
            vec![vec![-128; n_in], vec![127; n_in]],
        );
    }
}

#[test]
fn tiny_and_odd_shapes() {
    for mode in [OutputMode::NoKey, OutputMode::Packed] {
        for (n_in, n_out) in [(1, 1), (3, 5), (64, 10), (65, 7), (30, 2), (5, 300)] {
            let w = values(n_in * n_out, (n_in * 31 + n_out) as u64, -128, 127);
            let b = values(n_out, 7, -5000, 5000);
            let xs = vec![values(n_in, 3, -128, 127), values(n_in, 4, -128, 127)];
            check(mode, n_in, n_out, w, b, xs);
        }
    }
}

#[test]
fn forced_chunks_cover_multi_chunk_and_multi_group_layouts() {
    let f = fixture();
    let (n_in, n_out) = (300, 700);
    let w = values(n_in * n_out, 11, -128, 127);
    let b = values(n_out, 12, -100, 100);
    let x = vec![values(n_in, 13, -128, 127)];
    for (mode, chunk) in [
        (OutputMode::Packed, 64),
        (OutputMode::Packed, 128),
        (OutputMode::NoKey, 1024),
        (OutputMode::NoKey, 2),
    ] {
        let layer = PreparedLayer::prepare(
            f.ctx.clone(),
            mode,
            n_in,
            n_out,
            &w,
            &b,
            128,
            PlanOptions {
                chunk: Some(chunk),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            run(&layer, &x)[0],
            reference(&w, &b, &x[0], n_in, n_out),
            "{mode:?} chunk {chunk}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
    #[test]
    fn random_shapes_decrypt_exactly(
        n_in in 1usize..=2048,
        n_out in 1usize..=2048,
        batch in 1usize..=8,
        packed in any::<bool>(),
        seed in any::<u64>(),
        extreme in any::<bool>(),
    ) {
        let mode = if packed { OutputMode::Packed } else { OutputMode::NoKey };
        // Keep packed cases affordable: the key-switch count grows with n_out·chunk/N.
        let batch = if packed { batch.min(2) } else { batch };
        let w = if extreme { vec![-128; n_in * n_out] } else { values(n_in * n_out, seed, -128, 127) };
        let b = values(n_out, seed ^ 1, -(1 << 16), 1 << 16);
        let xs: Vec<Vec<i64>> = (0..batch).map(|i| if extreme { vec![-128; n_in] } else { values(n_in, seed ^ (i as u64 + 2), -128, 127) }).collect();
        check(mode, n_in, n_out, w, b, xs);
    }
}

/// int16 activations: the plan widens Δ and, in packed mode, picks a smaller chunk so the
/// failure bound still holds; results stay exact.
#[test]
fn int16_inputs_decrypt_exactly() {
    let f = fixture();
    let (n_in, n_out) = (256, 64);
    let w = values(n_in * n_out, 21, -128, 127);
    let b = values(n_out, 22, -1000, 1000);
    let xs = vec![values(n_in, 23, -32768, 32767), vec![-32768; n_in]];
    for mode in [OutputMode::NoKey, OutputMode::Packed] {
        let layer = PreparedLayer::prepare(
            f.ctx.clone(),
            mode,
            n_in,
            n_out,
            &w,
            &b,
            32768,
            PlanOptions::default(),
        )
        .unwrap();
        assert!(layer.plan().log2_p_fail <= -64.0);
        let got = run(&layer, &xs);
        for (x, y) in xs.iter().zip(&got) {
            assert_eq!(
                y,
                &reference(&w, &b, x, n_in, n_out),
                "{mode:?} plan {:?}",
                layer.plan()
            );
        }
    }
}

/// The batch layout (several rows per input polynomial): full blocks, a short last block,
/// fewer rows than planned, forced chunks, both modes, worst-case extremes.
#[test]
fn batch_layout_decrypts_exactly() {
    for mode in [OutputMode::NoKey, OutputMode::Packed] {
        for (n_in, n_out, planned, rows, chunk) in [
            (384, 1536, 16, 16, None),
            (384, 384, 16, 5, None),
            (100, 70, 3, 7, Some(16)),
            (64, 10, 4, 4, Some(2)),
            (33, 257, 8, 9, Some(64)),
            (1024, 300, 64, 64, Some(64)),
        ] {
            let w = values(n_in * n_out, (n_in + n_out) as u64, -128, 127);
            let b = values(n_out, 5, -5000, 5000);
            let xs: Vec<Vec<i64>> = (0..rows)
                .map(|r| values(n_in, 40 + r as u64, -128, 127))
                .collect();
            let opts = PlanOptions {
                chunk,
                batch: Some(planned),
                max_bodies: 1,
            };
            check_with(mode, n_in, n_out, w, b, xs, opts);
        }
        // Worst case: all extremes, a full and a short block.
        let (n_in, n_out) = (512, 512);
        check_with(
            mode,
            n_in,
            n_out,
            vec![-128; n_in * n_out],
            vec![1 << 20; n_out],
            vec![vec![-128; n_in]; 11],
            PlanOptions {
                chunk: None,
                batch: Some(8),
                max_bodies: 1,
            },
        );
    }
}

/// A batch plan puts several rows in one polynomial, so it needs fewer key switches and
/// bytes than the row-by-row plan for the same batch (the point of the layout).
#[test]
fn batch_plan_beats_row_by_row() {
    for (b, n_in, n_out) in [(16, 384, 1536), (16, 1536, 384), (8, 768, 768)] {
        let row =
            PreparedLayer::plan_int8(DEFAULT_PARAMETERS, OutputMode::Packed, n_in, n_out, 1 << 12)
                .unwrap();
        let bat = PreparedLayer::plan_int8_batch(
            DEFAULT_PARAMETERS,
            OutputMode::Packed,
            n_in,
            n_out,
            1 << 12,
            b,
        )
        .unwrap();
        assert!(bat.batch_rows > 1, "{bat:?}");
        assert!(plan_cost(&bat, b) < plan_cost(&row, b));
        assert!(bat.key_switches_for(b) < row.key_switches_for(b), "{bat:?}");
        assert!(bat.download_bytes(b) < row.download_bytes(b), "{bat:?}");
        assert_eq!(
            PreparedLayer::plan_int8_batch(
                DEFAULT_PARAMETERS,
                OutputMode::Packed,
                n_in,
                n_out,
                1 << 12,
                1
            )
            .unwrap(),
            row
        );
    }
}

/// TDM-PAR-HE-3: the link rate is a public planning input. A slower link makes the batch
/// planner trade key switches for bytes (all-MiniLM-L6-v2's fused Q/K/V layer, 16 tokens, at
/// 2 Mbit/s: 3 input polynomials instead of 12); the plan the device derives from public values
/// is the one the cloud prepares its weights under, and the results stay exact with all-127
/// weights against all −128 inputs.
#[test]
fn slower_link_plans_fewer_bytes_and_stays_exact() {
    let (b, n_in, n_out) = (16, 384, 1152);
    let plan = |kbit| {
        PreparedLayer::plan_int8_batch_with_link(
            DEFAULT_PARAMETERS,
            OutputMode::Packed,
            n_in,
            n_out,
            0,
            b,
            LinkModel { kbit_per_s: kbit },
        )
        .unwrap()
    };
    assert_eq!(
        plan(25_000),
        PreparedLayer::plan_int8_batch(DEFAULT_PARAMETERS, OutputMode::Packed, n_in, n_out, 0, b)
            .unwrap(),
        "the default link is 25 Mbit/s"
    );
    // Parameter set 2's hoisted packing levels make key switches cheap enough that the default
    // link already plans dense inputs; a 100 Gbit/s link still trades bytes for key switches.
    let fast = plan(100_000_000);
    let slow = plan(2_000);
    let bytes = |p: &LayerPlan| p.upload_bytes(b) + p.download_bytes(b);
    assert!(bytes(&slow) < bytes(&fast), "{slow:?} vs {fast:?}");
    assert!(
        slow.upload_bytes(b) < fast.upload_bytes(b),
        "{slow:?} vs {fast:?}"
    );
    assert!(slow.key_switches_for(b) > fast.key_switches_for(b));
    // Each plan is the cheapest at its own link rate.
    for kbit in [100_000_000, 2_000] {
        let link = LinkModel { kbit_per_s: kbit };
        let (own, other) = if kbit == 100_000_000 {
            (fast, slow)
        } else {
            (slow, fast)
        };
        assert!(plan_cost_on(&own, b, link) <= plan_cost_on(&other, b, link));
    }
    let w = vec![127; n_in * n_out];
    let bias = vec![0; n_out];
    let xs = vec![vec![-128; n_in]; b];
    let layer = PreparedLayer::prepare_with_plan(fixture().ctx.clone(), slow, &w, &bias).unwrap();
    let expect = reference(&w, &bias, &xs[0], n_in, n_out);
    for y in run(&layer, &xs) {
        assert_eq!(y, expect);
    }
}

/// Signed row bounds (`WeightBounds`) plan tighter than the int8 worst case — fewer bytes
/// both ways for weights shaped like a trained layer's (|w| reaches 127, rows mostly small) —
/// stay exact at the bounds' worst case, and weights that break the bounds are refused by the
/// cloud's `prepare_with_plan` instead of decrypting wrongly.
#[test]
fn signed_row_bounds_plan_fewer_bytes_and_refuse_weights_beyond_them() {
    let (b, n_in, n_out) = (16, 384, 384);
    // One 127 per row, the rest in [−31, 31].
    let mut w = values(n_in * n_out, 7, -31, 31);
    for r in 0..n_out {
        w[r * n_in + r % n_in] = if r % 2 == 0 { 127 } else { -127 };
    }
    let bias = vec![0; n_out];
    let bounds = WeightBounds::of(&w, n_in, &bias);
    assert_eq!(bounds.max_abs_weight, 127);
    // A link slow enough that bytes decide the layout (at faster ones the planner may spend
    // the bounds' margin on a cheaper layout instead, see the cost comparison below).
    let link = LinkModel { kbit_per_s: 1_000 };
    let worst = PreparedLayer::plan_int8_batch_with_link(
        DEFAULT_PARAMETERS,
        OutputMode::Packed,
        n_in,
        n_out,
        0,
        b,
        link,
    )
    .unwrap();
    let tight = PreparedLayer::plan_int8_batch_bounded(
        DEFAULT_PARAMETERS,
        OutputMode::Packed,
        n_in,
        n_out,
        bounds,
        b,
        link,
        1,
    )
    .unwrap();
    assert_eq!(
        PreparedLayer::plan_int8_batch_bounded(
            DEFAULT_PARAMETERS,
            OutputMode::Packed,
            n_in,
            n_out,
            WeightBounds::entries(127, 0),
            b,
            link,
            1
        )
        .unwrap(),
        worst,
        "entry bounds alone give the int8 plan"
    );
    assert!(tight.delta_out_log2 > worst.delta_out_log2, "{tight:?}");
    for kbit in [1_000, 25_000] {
        let at = LinkModel { kbit_per_s: kbit };
        let plan_at = |bounds| {
            PreparedLayer::plan_int8_batch_bounded(
                DEFAULT_PARAMETERS,
                OutputMode::Packed,
                n_in,
                n_out,
                bounds,
                b,
                at,
                1,
            )
            .unwrap()
        };
        let (t, w) = (plan_at(bounds), plan_at(WeightBounds::entries(127, 0)));
        assert!(
            plan_cost_on(&t, b, at) <= plan_cost_on(&w, b, at),
            "{t:?} vs {w:?}"
        );
    }
    assert!(
        tight.upload_bytes(b) < worst.upload_bytes(b),
        "{tight:?} vs {worst:?}"
    );
    assert!(
        tight.download_bytes(b) < worst.download_bytes(b),
        "{tight:?} vs {worst:?}"
    );
    // Exact with these weights against extreme inputs of both signs.
    let layer = PreparedLayer::prepare_with_plan(fixture().ctx.clone(), tight, &w, &bias).unwrap();
    let xs: Vec<Vec<i64>> = (0..b)
        .map(|k| {
            if k % 2 == 0 {
                (0..n_in)
                    .map(|i| if w[i] < 0 { -128 } else { 127 })
                    .collect()
            } else {
                values(n_in, 40 + k as u64, -128, 127)
            }
        })
        .collect();
    for (y, x) in run(&layer, &xs).iter().zip(&xs) {
        assert_eq!(*y, reference(&w, &bias, x, n_in, n_out));
    }
    // Full-scale int8 rows break the bounds: refused, never a wrong decryption.
    let heavy = vec![127; n_in * n_out];
    assert!(PreparedLayer::prepare_with_plan(fixture().ctx.clone(), tight, &heavy, &bias).is_err());
}

proptest! {
    // Large shapes up to 128×2048@2048×2048 cost seconds each: few cases.
    #![proptest_config(ProptestConfig { cases: 6, .. ProptestConfig::default() })]
    #[test]
    fn random_batched_shapes_decrypt_exactly(
        n_in in 1usize..=2048,
        n_out in 1usize..=2048,
        rows in 1usize..=64,
        planned in 2usize..=64,
        packed in any::<bool>(),
        seed in any::<u64>(),
        extreme in any::<bool>(),
    ) {
        let mode = if packed { OutputMode::Packed } else { OutputMode::NoKey };
        let w = if extreme { vec![127; n_in * n_out] } else { values(n_in * n_out, seed, -128, 127) };
        let b = values(n_out, seed ^ 1, -(1 << 16), 1 << 16);
        let xs: Vec<Vec<i64>> = (0..rows).map(|i| if extreme { vec![-128; n_in] } else { values(n_in, seed ^ (i as u64 + 2), -128, 127) }).collect();
        check_with(mode, n_in, n_out, w, b, xs, PlanOptions { chunk: None, batch: Some(planned), max_bodies: 1 });
    }
}

/// The largest shape, 128×2048@2048×2048: packed as two requests of 64 rows (the
/// request limit), no-key one request; exact.
#[test]
fn largest_batched_shape_decrypts_exactly() {
    let (n_in, n_out) = (2048, 2048);
    let w = values(n_in * n_out, 77, -128, 127);
    let b = values(n_out, 78, -1000, 1000);
    for (mode, requests) in [(OutputMode::Packed, 2u64), (OutputMode::NoKey, 1)] {
        for half in 0..requests {
            let xs: Vec<Vec<i64>> = (0..64)
                .map(|i| values(n_in, 100 * half + i, -128, 127))
                .collect();
            check_with(
                mode,
                n_in,
                n_out,
                w.clone(),
                b.clone(),
                xs,
                PlanOptions {
                    chunk: None,
                    batch: Some(64),
                    max_bodies: 1,
                },
            );
        }
    }
}

/// TDM-PAR-HE-4: layers whose weights all satisfy |w| ≤ 128 run over four CRT primes, wider
/// weights (up to 2^20 − 1) over five; both stay exact at their extremes (128 and 129 sit on
/// either side of the switch, ±(2^20 − 1) is the widest weight the engine accepts).
#[test]
fn four_and_five_prime_layers_are_exact_at_their_extremes() {
    let f = fixture();
    let (n_in, n_out) = (16, 40);
    for (w_max, x_max) in [(128i64, 128u64), (129, 128), ((1 << 20) - 1, 2)] {
        for mode in [OutputMode::NoKey, OutputMode::Packed] {
            let mut w = values(n_in * n_out, 31, -w_max, w_max);
            // Full-magnitude rows of both signs.
            w[..n_in].iter_mut().for_each(|v| *v = w_max);
            w[n_in..2 * n_in].iter_mut().for_each(|v| *v = -w_max);
            let b = values(n_out, 32, -(1 << 16), 1 << 16);
            let x_max = x_max as i64;
            let xs = vec![
                vec![-x_max; n_in],
                vec![x_max; n_in],
                values(n_in, 33, -x_max, x_max),
            ];
            let layer = PreparedLayer::prepare(
                f.ctx.clone(),
                mode,
                n_in,
                n_out,
                &w,
                &b,
                x_max as u64,
                PlanOptions::default(),
            )
            .unwrap();
            let got = run(&layer, &xs);
            for (x, y) in xs.iter().zip(&got) {
                assert_eq!(
                    y,
                    &reference(&w, &b, x, n_in, n_out),
                    "|w| <= {w_max}, {mode:?}"
                );
            }
        }
    }
}
