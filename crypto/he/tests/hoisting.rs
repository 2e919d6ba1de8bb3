//! Hoisted packing levels (parameter set 2, `specs/parameters.md` § "Hoisted packing levels"):
//! the same outputs as the plain packing tree with far fewer key switches, the same bytes on
//! the wire, set 1 untouched, and plans that ask for more levels than the tree has refused.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use tandem_he::*;

fn batched(batch: usize) -> PlanOptions {
    PlanOptions {
        chunk: None,
        batch: Some(batch),
        max_bodies: 1,
    }
}

/// Extreme inputs against the weights' signs on even rows, random full-range rows otherwise.
fn inputs(w: &[i64], rows: usize, n_in: usize) -> Vec<Vec<i64>> {
    (0..rows)
        .map(|k| {
            if k % 2 == 0 {
                (0..n_in)
                    .map(|i| if w[i] < 0 { -128 } else { 127 })
                    .collect()
            } else {
                values(n_in, 70 + k as u64, -128, 127)
            }
        })
        .collect()
}

/// A hoisted plan and the same plan with nothing hoisted decrypt to the reference, bit for
/// bit, on full-group and short-group shapes (absent leaves in the last group); the hoisted one
/// needs the key switches its formula says, fewer than the tree's.
#[test]
fn hoisted_and_plain_trees_give_the_same_exact_outputs() {
    let f = fixture();
    for (rows, n_in, n_out) in [(16, 384, 1536), (16, 100, 300), (5, 1024, 64)] {
        let w = values(n_in * n_out, 11 + n_out as u64, -127, 127);
        let bias = values(n_out, 12, -1000, 1000);
        let layer = PreparedLayer::prepare(
            f.ctx.clone(),
            OutputMode::Packed,
            n_in,
            n_out,
            &w,
            &bias,
            128,
            batched(rows),
        )
        .unwrap();
        let plan = *layer.plan();
        assert!(plan.hoisted_levels > 0, "{plan:?}");
        let l = plan.hoisted_levels as usize;
        let leaves = plan.leaves_per_group();
        let trace = (plan.chunk / leaves).trailing_zeros() as usize;
        assert_eq!(
            plan.key_switches(),
            ((leaves >> l) - 1 + trace) * plan.out_ciphertexts()
                + ((1 << l) - 1) * plan.in_chunks()
        );
        let plain_plan = LayerPlan {
            hoisted_levels: 0,
            ..plan
        };
        assert!(plain_plan.key_switches() > plan.key_switches());
        assert_eq!(plain_plan.upload_bytes(rows), plan.upload_bytes(rows));
        assert_eq!(plain_plan.download_bytes(rows), plan.download_bytes(rows));
        let plain = PreparedLayer::prepare_with_plan(f.ctx.clone(), plain_plan, &w, &bias).unwrap();
        let xs = inputs(&w, rows, n_in);
        let want: Vec<Vec<i64>> = xs
            .iter()
            .map(|x| reference(&w, &bias, x, n_in, n_out))
            .collect();
        assert_eq!(run(&layer, &xs), want, "hoisted {plan:?}");
        assert_eq!(run(&plain, &xs), want, "plain");
    }
}

/// Set 1's key switching (noise 2^48.4) is never hoisted; set 2's row-by-row 1024-wide plan
/// has no room for it with worst-case weights either (the bound decides, not the shape).
#[test]
fn hoisting_only_where_the_failure_bound_allows_it() {
    let set1 = PreparedLayer::plan_int8_batch(
        PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64,
        OutputMode::Packed,
        384,
        1536,
        0,
        16,
    )
    .unwrap();
    assert_eq!(set1.hoisted_levels, 0, "{set1:?}");
    let row =
        PreparedLayer::plan_int8(DEFAULT_PARAMETERS, OutputMode::Packed, 1024, 1024, 0).unwrap();
    assert_eq!(row.hoisted_levels, 0, "{row:?}");
    let batch =
        PreparedLayer::plan_int8_batch(DEFAULT_PARAMETERS, OutputMode::Packed, 384, 1536, 0, 16)
            .unwrap();
    assert!(batch.hoisted_levels > 0, "{batch:?}");
    assert!(batch.log2_p_fail <= -64.0);
}

/// A plan asking for more hoisted levels than its packing tree has is refused with a typed
/// error (no node to hoist to), as is one whose bound the extra noise breaks.
#[test]
fn plans_with_impossible_hoisting_are_refused() {
    let f = fixture();
    let (n_in, n_out) = (1024, 1024);
    let w = vec![127; n_in * n_out];
    let bias = vec![0; n_out];
    let plan =
        PreparedLayer::plan_int8(DEFAULT_PARAMETERS, OutputMode::Packed, n_in, n_out, 0).unwrap();
    let too_deep = LayerPlan {
        hoisted_levels: plan.leaves_per_group().trailing_zeros() + 1,
        ..plan
    };
    assert!(matches!(
        PreparedLayer::prepare_with_plan(f.ctx.clone(), too_deep, &w, &bias),
        Err(HeError::Shape(_))
    ));
    // Worst-case weights leave no room for hoisted key-switch noise at this plan's widths.
    let noisy = LayerPlan {
        hoisted_levels: 4,
        ..plan
    };
    assert!(matches!(
        PreparedLayer::prepare_with_plan(f.ctx.clone(), noisy, &w, &bias),
        Err(HeError::FailureBoundExceeded { .. })
    ));
}
