//! Unit tests of `plan` (split from plan.rs: pure move).
#![allow(clippy::unwrap_used)]
use super::*;
use crate::params::DEFAULT_PARAMETERS as P;

#[test]
fn worst_case_int8_1024_square_plans_in_both_modes() {
    for mode in [OutputMode::NoKey, OutputMode::Packed] {
        let probe = LayerPlan::new(
            P,
            mode,
            1024,
            1024,
            128,
            WeightStats::worst_case(1024, 4096, 128, 0),
            PlanOptions::default(),
        )
        .unwrap();
        assert!(probe.log2_p_fail <= -64.0);
        assert!(
            probe.upload_bits < 64 && probe.download_bits < 64,
            "{probe:?}"
        );
    }
}

#[test]
fn packed_1024_matches_the_dense_layout() {
    let stats = WeightStats::worst_case(1024, 4, 128, 1 << 20);
    let p = LayerPlan::new(
        P,
        OutputMode::Packed,
        1024,
        1024,
        128,
        stats,
        PlanOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (p.chunk, p.rows(), p.out_blocks(), p.out_ciphertexts()),
        (1024, 4, 256, 1)
    );
    assert_eq!(p.key_switches(), 255 + 2);
    // Every output gets its own slot.
    let mut seen = std::collections::HashSet::new();
    for j in 0..1024 {
        assert!(seen.insert(p.output_slot(j)));
    }
}

/// TDM-PAR-HE-1: the body is returned at its own width, about log2 √N bits below the mask,
/// within the failure bound; the download of the 16×384@384×1536 batch shrinks
/// accordingly against one width for both.
#[test]
fn download_body_is_narrower_than_the_mask_within_the_bound() {
    let stats = WeightStats::worst_case(384, 8, 127, 0);
    let opts = PlanOptions {
        chunk: Some(32),
        batch: Some(16),
        max_bodies: 1,
    };
    let p = LayerPlan::new(P, OutputMode::Packed, 384, 1536, 128, stats, opts).unwrap();
    assert!(p.body_bits + 4 <= p.download_bits, "{p:?}");
    // The body carries the output range plus a few bits of margin, no more.
    let range_bits = 64 - p.delta_out_log2;
    assert!(
        (range_bits + 1..=range_bits + 5).contains(&p.body_bits),
        "{p:?}"
    );
    let v_pre = p.pre_switch_variance(stats, p.upload_bits);
    let bound = log2_fail(
        p.download_variance(v_pre, p.download_bits, p.body_bits),
        p.delta_out_log2,
    );
    assert!(bound <= -64.0 && (bound - p.log2_p_fail).abs() < 1e-9);
    // One bit fewer on either side breaks the bound (the widths are the narrowest pair
    // for their cost).
    let fail = |m: u32, b: u32| log2_fail(p.download_variance(v_pre, m, b), p.delta_out_log2);
    assert!(fail(p.download_bits, p.body_bits - 1) > -64.0);
    let single_width = 51 + (p.out_ciphertexts() * 4096 + 16 * 1536) * p.download_bits as usize / 8;
    assert!(
        p.download_bytes(16) + 10_000 < single_width,
        "{} vs {single_width}",
        p.download_bytes(16)
    );
}

#[test]
fn too_wide_outputs_are_refused() {
    let stats = WeightStats {
        max_row_l1: u64::MAX / 2,
        max_abs_bias: 0,
        max_block_sq_norm: 1.0,
    };
    assert!(LayerPlan::new(
        P,
        OutputMode::NoKey,
        4,
        4,
        128,
        stats,
        PlanOptions::default()
    )
    .is_err());
}

#[test]
fn huge_noise_is_refused_with_typed_error() {
    let stats = WeightStats {
        max_row_l1: 1 << 20,
        max_abs_bias: 0,
        max_block_sq_norm: 1e30,
    };
    let e = LayerPlan::new(
        P,
        OutputMode::Packed,
        1024,
        1024,
        128,
        stats,
        PlanOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, HeError::FailureBoundExceeded { .. }), "{e}");
}

#[test]
fn hand_built_extremes_give_finite_estimates_and_are_refused() {
    let plan = LayerPlan::new(
        P,
        OutputMode::Packed,
        384,
        1536,
        128,
        WeightStats::worst_case(384, 1536, 128, 0),
        PlanOptions {
            batch: Some(16),
            ..PlanOptions::default()
        },
    )
    .unwrap();
    let wild = LayerPlan {
        hoisted_levels: u32::MAX,
        key_first_level: u32::MAX,
        ..plan
    };
    // Estimates stay finite (no endless loop, no shift overflow)...
    assert!(wild.key_switches() > 0);
    assert!(plan_cost(&wild, 16).is_finite());
    assert!(wild.eval_key_bytes() > 0);
    // ...and the plan itself is refused before anything evaluates with it.
    assert!(matches!(wild.check_layout(), Err(HeError::Shape(_))));
}
