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
        let full_key = LayerPlan {
            key_first_level: 1,
            ..plan
        };
        let l = plan.hoisted_levels as usize;
        let leaves = plan.leaves_per_group();
        let trace = (plan.chunk / leaves).trailing_zeros() as usize;
        assert_eq!(
            full_key.key_switches(),
            ((leaves >> l) - 1 + trace) * plan.out_ciphertexts()
                + ((1 << l) - 1) * plan.in_chunks()
        );
        let plain_plan = LayerPlan {
            hoisted_levels: 0,
            ..full_key
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

/// Set 2 keeps keys within `MAX_PLAN_KEY_BYTES` by starting them at a larger stride: the
/// plan's key (from `evaluation_key_for_plans`) has only the strides from
/// `key_first_level_alone` up, survives the wire, evaluates exactly (the smaller strides
/// composed from the first automorphism), and so does a full key; a key that starts above the
/// level a plan accepts is refused with a typed error, as is a blob whose first automorphism
/// is not allowed.
#[test]
fn keys_from_a_larger_stride_are_within_budget_and_exact() {
    let f = fixture();
    let (rows, n_in, n_out) = (16, 384, 1536);
    let w = values(n_in * n_out, 21, -127, 127);
    let bias = values(n_out, 22, -1000, 1000);
    let opts = PlanOptions {
        chunk: None,
        batch: Some(rows),
        max_bodies: 2,
    };
    let layer = PreparedLayer::prepare(
        f.ctx.clone(),
        OutputMode::Packed,
        n_in,
        n_out,
        &w,
        &bias,
        128,
        opts,
    )
    .unwrap();
    let plan = *layer.plan();
    assert!(plan.key_first_level > 1, "{plan:?}");
    assert!(plan.eval_key_bytes() <= MAX_PLAN_KEY_BYTES, "{plan:?}");
    assert!(
        LayerPlan {
            key_first_level: 1,
            ..plan
        }
        .eval_key_bytes()
            > MAX_PLAN_KEY_BYTES
    );
    let client = Client::from_seed(f.ctx.clone(), 0x5eed_0003);
    let key = client.evaluation_key_for_plans(&[plan]).unwrap();
    assert_eq!(key.first_level(), plan.key_first_level_alone());
    assert!(key.first_level() <= plan.key_first_level);
    assert_eq!(key.max_chunk(), plan.chunk);
    let blob = key.to_bytes();
    assert_eq!(blob.len(), plan.eval_key_bytes());
    let back = EvaluationKey::from_bytes(&blob, blob.len(), &f.ctx.params()).unwrap();
    assert_eq!(back, key);
    let full = client.evaluation_key_for(plan.chunk, plan.bodies).unwrap();
    let xs = inputs(&w, rows, n_in);
    let want: Vec<Vec<i64>> = xs
        .iter()
        .map(|x| reference(&w, &bias, x, n_in, n_out))
        .collect();
    let mut client = client;
    for k in [&back, &full] {
        let prepared = PreparedEvaluationKey::prepare(k, &f.ctx).unwrap();
        let ct = client.encrypt(&plan, &xs).unwrap();
        let out = layer
            .eval(&ct, Some(&prepared), EvalOptions::default())
            .unwrap();
        assert_eq!(client.decrypt(&plan, &out).unwrap(), want);
    }
    // A plan that accepts only keys starting below this key's first level refuses it.
    let strict = PreparedLayer::prepare_with_plan(
        f.ctx.clone(),
        LayerPlan {
            key_first_level: key.first_level() - 1,
            ..plan
        },
        &w,
        &bias,
    )
    .unwrap();
    let prepared = PreparedEvaluationKey::prepare(&back, &f.ctx).unwrap();
    let ct = client.encrypt(strict.plan(), &xs).unwrap();
    assert!(matches!(
        strict.eval(&ct, Some(&prepared), EvalOptions::default()),
        Err(HeError::MissingEvaluationKey(_))
    ));
    // First automorphisms beyond the composable range (or not a stride's) are refused.
    assert!(client.evaluation_key_from(7, 4096, 1).is_err());
    let n = f.ctx.params().poly_size;
    let count = back.automorphisms().len();
    let at = 60; // kind 6: header 40, r 1, seed 16, base log, levels, count (he-formats.md)
    assert_eq!(usize::from(blob[at - 1]), count);
    for first in [7usize, 0] {
        let mut bad = blob.clone();
        for k in 0..count {
            let g = if first == 0 {
                3
            } else {
                2 * n / (1 << (first + k)) + 1
            };
            bad[at + 2 * k..at + 2 * k + 2].copy_from_slice(&(g as u16).to_le_bytes());
        }
        assert!(matches!(
            EvaluationKey::from_bytes(&bad, bad.len(), &f.ctx.params()),
            Err(HeError::Malformed { .. })
        ));
    }
}
