//! Hoisted packing levels on awkward shapes and hand-built plans (issue 9, engine v2): every
//! hoisting depth a plan's tree allows decrypts to the reference, sequentially and in
//! parallel, on short last groups, short last batch blocks (fewer rows and fewer bodies than
//! r), several input chunks and chunks below 8; hoisting under parameter set 1, whose exact
//! CRT arithmetic does not cover multiplying key-switch outputs by weights, is refused with a
//! typed error.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;
use common::*;
use tandem_he::*;

/// (planned batch, n_in, n_out, max_bodies, forced chunk, request rows).
type Shape = (usize, usize, usize, usize, Option<usize>, usize);

/// Encrypts `xs`, evaluates with `parallel`, decrypts.
fn run_par(f: &Fixture, layer: &PreparedLayer, xs: &[Vec<i64>], parallel: bool) -> Vec<Vec<i64>> {
    let plan = *layer.plan();
    let mut client = f.client.lock().unwrap_or_else(|e| e.into_inner());
    let ct = client.encrypt(&plan, xs).unwrap();
    let key = (plan.mode == OutputMode::Packed).then_some(&f.prepared_key);
    let out = layer.eval(&ct, key, EvalOptions { parallel }).unwrap();
    client.decrypt(&plan, &out).unwrap()
}

/// For each shape (planned batch, n_in, n_out, max_bodies, forced chunk, request rows): the
/// planner's layout with every hoisting depth 0..=log2(leaves) set by hand gives the reference
/// outputs. Small weights so that every depth meets the failure bound.
#[test]
fn every_hoisting_depth_is_exact_on_awkward_shapes() {
    let f = fixture_of(DEFAULT_PARAMETERS, 4);
    let shapes: &[Shape] = &[
        // r = 4 bodies of b₁ = 2 rows; 9 rows: the last block carries one row, one body.
        (9, 100, 300, 4, Some(2048), 9),
        // r = 2 bodies of b₁ = 4 rows; 5 rows: the last body of the only block is absent.
        (8, 37, 70, 2, Some(1024), 5),
        // Several input chunks (300 / 16), three groups of 16 leaves, the last one short.
        (2, 300, 4100, 2, Some(16), 3),
        // Chunk 4 (two tree levels), 21 output blocks: a short last group of 1 leaf.
        (1, 20, 21_000, 1, Some(4), 1),
        // Chunk 2 (one tree level) with several chunks.
        (3, 7, 3000, 1, Some(2), 3),
        // 129 outputs at chunk 64: 3 blocks in a 4-leaf tree (one absent leaf).
        (1, 100, 129, 1, Some(64), 5),
        // Planner's own choice for 16 rows, asked with 13 (a short block).
        (16, 100, 300, 4, None, 13),
    ];
    let mut hoisted_depths = 0;
    for &(batch, n_in, n_out, max_bodies, chunk, rows) in shapes {
        let w = values(n_in * n_out, 3 + n_out as u64, -2, 2);
        let bias = values(n_out, 12, -100, 100);
        let opts = PlanOptions {
            chunk,
            batch: Some(batch),
            max_bodies,
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
        let xs: Vec<Vec<i64>> = (0..rows)
            .map(|k| values(n_in, 70 + k as u64, -128, 127))
            .collect();
        let want: Vec<Vec<i64>> = xs
            .iter()
            .map(|x| reference(&w, &bias, x, n_in, n_out))
            .collect();
        for l in 0..=plan.leaves_per_group().trailing_zeros() {
            let p = LayerPlan {
                hoisted_levels: l,
                ..plan
            };
            let layer = PreparedLayer::prepare_with_plan(f.ctx.clone(), p, &w, &bias)
                .unwrap_or_else(|e| panic!("L = {l}, {p:?}: {e}"));
            for parallel in [false, true] {
                assert_eq!(
                    run_par(&f, &layer, &xs, parallel),
                    want,
                    "L = {l}, parallel {parallel}, {rows} rows, {p:?}"
                );
            }
            hoisted_depths += usize::from(l > 0);
        }
    }
    assert!(hoisted_depths >= 15, "the shapes exercise hoisting");
}

/// Parameter set 1 never hoists (its planner says so); a set-1 plan edited by hand to hoist
/// is refused with a typed error by `check_layout`, `prepare_with_plan` and the client, not
/// evaluated outside the exactness bound of its CRT arithmetic (TDM-PAR-HE-4).
#[test]
fn set1_plans_edited_to_hoist_are_refused() {
    let f = fixture_of(PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64, 1);
    // Chunk 2 and ±1 weights: a shape whose failure bound even set 1's hoisted noise meets.
    let (n_in, n_out) = (20, 3000);
    let w = values(n_in * n_out, 5, -1, 1);
    let bias = vec![0; n_out];
    let layer = PreparedLayer::prepare(
        f.ctx.clone(),
        OutputMode::Packed,
        n_in,
        n_out,
        &w,
        &bias,
        128,
        PlanOptions {
            chunk: Some(2),
            batch: None,
            max_bodies: 1,
        },
    )
    .unwrap();
    let plan = *layer.plan();
    assert_eq!(plan.hoisted_levels, 0);
    assert_eq!(plan.leaves_per_group(), 2, "{plan:?}");
    let hoisted = LayerPlan {
        hoisted_levels: 1,
        ..plan
    };
    assert!(matches!(hoisted.check_layout(), Err(HeError::Shape(_))));
    match PreparedLayer::prepare_with_plan(f.ctx.clone(), hoisted, &w, &bias) {
        Err(HeError::Shape(m)) => assert!(m.contains("hoisted_levels"), "{m}"),
        other => panic!("a hoisted set-1 plan: {other:?}"),
    }
    let mut client = f.client.lock().unwrap_or_else(|e| e.into_inner());
    assert!(matches!(
        client.encrypt(&hoisted, &[vec![1; n_in]]),
        Err(HeError::Shape(_))
    ));
    drop(client);
    // The plan itself stays exact.
    let x = values(n_in, 9, -128, 127);
    assert_eq!(
        run_in(&f, &layer, std::slice::from_ref(&x)),
        vec![reference(&w, &bias, &x, n_in, n_out)]
    );
}
