//! A layer plan edited by hand (its fields are public) with an inconsistent layout is refused
//! with a typed `Shape` error by the cloud's `prepare_with_plan`, the device's `encrypt` and
//! `decrypt` — before anything indexes a polynomial with it (a chunk × rows beyond N used to
//! index past the end of the input polynomial in `Client::encrypt`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use tandem_he::{
    Client, Context, EvalOptions, HeError, LayerPlan, OutputMode, PreparedLayer, DEFAULT_PARAMETERS,
};

const N_IN: usize = 64;
const N_OUT: usize = 8;
const BATCH: usize = 4;

fn good() -> LayerPlan {
    PreparedLayer::plan_int8_batch(DEFAULT_PARAMETERS, OutputMode::NoKey, N_IN, N_OUT, 0, BATCH)
        .unwrap()
}

#[test]
fn inconsistent_layouts_are_typed_errors_on_both_sides() {
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    let n = DEFAULT_PARAMETERS.poly_size;
    let weights: Vec<i64> = (0..N_IN * N_OUT).map(|i| (i % 11) as i64 - 5).collect();
    let bias = vec![0; N_OUT];
    let x: Vec<Vec<i64>> = (0..BATCH)
        .map(|r| (0..N_IN).map(|i| ((r * 7 + i) % 9) as i64 - 4).collect())
        .collect();
    // The untouched plan works end to end (so the refusals below are about the edits).
    let plan = good();
    plan.check_layout().unwrap();
    let layer = PreparedLayer::prepare_with_plan(ctx.clone(), plan, &weights, &bias).unwrap();
    let mut client = Client::from_seed(ctx.clone(), 7);
    let out = layer
        .eval(
            &client.encrypt(&plan, &x).unwrap(),
            None,
            EvalOptions::default(),
        )
        .unwrap();
    assert_eq!(client.decrypt(&plan, &out).unwrap().len(), BATCH);

    type Edit = fn(&mut LayerPlan, usize);
    let edits: [(&str, Edit); 8] = [
        ("chunk", |p, _| p.chunk = 0),
        ("chunk", |p, _| p.chunk = 3),
        ("chunk", |p, n| p.chunk = 2 * n),
        ("batch_rows", |p, n| p.batch_rows = n / p.chunk + 1),
        ("bodies", |p, _| p.bodies = 9),
        ("upload_bits", |p, _| p.upload_bits = 0),
        ("body_bits", |p, _| p.body_bits = 65),
        ("delta", |p, _| p.delta_in_log2 = p.delta_out_log2 + 1),
    ];
    for (field, edit) in edits {
        let mut bad = plan;
        edit(&mut bad, n);
        let is_shape = |r: Result<(), HeError>| matches!(r, Err(HeError::Shape(m)) if m.contains("layer plan"));
        assert!(is_shape(bad.check_layout()), "{field}");
        assert!(
            is_shape(
                PreparedLayer::prepare_with_plan(ctx.clone(), bad, &weights, &bias).map(|_| ())
            ),
            "prepare_with_plan, {field}"
        );
        assert!(
            is_shape(client.encrypt(&bad, &x).map(|_| ())),
            "encrypt, {field}"
        );
        assert!(
            is_shape(client.decrypt(&bad, &out).map(|_| ())),
            "decrypt, {field}"
        );
    }
}
