//! Each device operation against small cases worked out by hand.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use ndarray::{array, Array1, Array2};
use tandem_ops::ops;
use tandem_ops::{DenseLinear, Linear, LinearSpec, OpsError};

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn embed_sums_word_position_and_type_rows() {
    let word = array![[1.0f32, 0.0], [0.0, 1.0], [2.0, 2.0]];
    let position = array![[10.0f32, 10.0], [20.0, 20.0], [30.0, 30.0]];
    let types = array![[0.0f32, 0.0], [0.5, -0.5]];
    let out = ops::embed(word.view(), position.view(), types.view(), &[2, 0], &[0, 1]).unwrap();
    // token 0: word[2] + pos[0] + type[0] = (12, 12); token 1: word[0] + pos[1] + type[1] = (21.5, 19.5)
    assert_eq!(out, array![[12.0, 12.0], [21.5, 19.5]]);
}

#[test]
fn embed_refuses_bad_ids_and_lengths() {
    let word = Array2::<f32>::zeros((3, 2));
    let position = Array2::<f32>::zeros((2, 2));
    let types = Array2::<f32>::zeros((2, 2));
    let e = ops::embed(word.view(), position.view(), types.view(), &[3], &[0]);
    assert!(matches!(
        e,
        Err(OpsError::TokenOutOfRange {
            table: "word",
            id: 3,
            rows: 3
        })
    ));
    let e = ops::embed(word.view(), position.view(), types.view(), &[0], &[2]);
    assert!(matches!(
        e,
        Err(OpsError::TokenOutOfRange {
            table: "token_type",
            ..
        })
    ));
    let e = ops::embed(
        word.view(),
        position.view(),
        types.view(),
        &[0, 0, 0],
        &[0, 0, 0],
    );
    assert!(matches!(e, Err(OpsError::Sequence { tokens: 3, .. })));
    let e = ops::embed(word.view(), position.view(), types.view(), &[], &[]);
    assert!(matches!(e, Err(OpsError::Sequence { tokens: 0, .. })));
    let e = ops::embed(word.view(), position.view(), types.view(), &[0], &[0, 0]);
    assert!(matches!(e, Err(OpsError::Shape { .. })));
    let narrow = Array2::<f32>::zeros((2, 1));
    let e = ops::embed(word.view(), narrow.view(), types.view(), &[0], &[0]);
    assert!(matches!(e, Err(OpsError::Shape { .. })));
}

#[test]
fn layer_norm_matches_hand_computation() {
    // Row (1, 2, 3, 4): mean 2.5, biased variance 1.25, so (x - 2.5) / sqrt(1.25) =
    // (-1.341641, -0.447214, 0.447214, 1.341641); then * gamma + beta.
    let x = array![[1.0f32, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]];
    let gamma = array![1.0f32, 1.0, 2.0, 2.0];
    let beta = array![0.0f32, 1.0, 0.0, -1.0];
    let y = ops::layer_norm(x.view(), gamma.view(), beta.view(), 0.0).unwrap();
    let row0 = [-1.341641, 0.552786, 0.894427, 1.683282];
    assert!(close(y.row(0).as_slice().unwrap(), &row0, 1e-5), "{y}");
    // A constant row with eps > 0 normalises to 0, then beta.
    let y = ops::layer_norm(x.view(), gamma.view(), beta.view(), 1e-12).unwrap();
    assert!(
        close(y.row(1).as_slice().unwrap(), &[0.0, 1.0, 0.0, -1.0], 1e-6),
        "{y}"
    );
    let short = array![1.0f32];
    assert!(matches!(
        ops::layer_norm(x.view(), short.view(), beta.view(), 1e-12),
        Err(OpsError::Shape { .. })
    ));
}

#[test]
fn gelu_is_the_exact_erf_form() {
    // 0.5 x (1 + erf(x / sqrt 2)); erf(1/sqrt 2) = 0.682689492, erf(3/sqrt 2) = 0.997300204.
    assert_eq!(ops::gelu(0.0), 0.0);
    assert!((ops::gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    assert!((ops::gelu(-1.0) + 0.158_655_3).abs() < 1e-6);
    assert!((ops::gelu(3.0) - 2.995_950_3).abs() < 1e-6);
    // The tanh approximation gives 0.841192 at 1: farther than 1e-6, so this tells them apart.
    assert!((ops::gelu(1.0) - 0.841_192).abs() > 1e-4);
    let mut m = array![[1.0f32, -1.0], [0.0, 3.0]];
    ops::gelu_inplace(m.view_mut());
    assert!(close(
        m.as_slice().unwrap(),
        &[0.841_344_7, -0.158_655_3, 0.0, 2.995_950_3],
        1e-6
    ));
}

#[test]
fn softmax_hand_cases() {
    // exp(ln 1), exp(ln 2), exp(ln 3) normalised: 1/6, 2/6, 3/6.
    let mut x = array![[0.0f32, 2f32.ln(), 3f32.ln()], [1000.0, 1000.0, 1000.0]];
    ops::softmax_rows(x.view_mut()).unwrap();
    assert!(close(
        x.row(0).as_slice().unwrap(),
        &[1.0 / 6.0, 2.0 / 6.0, 0.5],
        1e-6
    ));
    // Large logits do not overflow.
    assert!(close(x.row(1).as_slice().unwrap(), &[1.0 / 3.0; 3], 1e-6));

    let mut y = array![[0.0f32, 100.0, 0.0]];
    ops::softmax_rows_masked(y.view_mut(), array![true, false, true].view()).unwrap();
    assert_eq!(y, array![[0.5, 0.0, 0.5]]);

    let mut z = array![[1.0f32, 2.0]];
    assert!(matches!(
        ops::softmax_rows_masked(z.view_mut(), array![false, false].view()),
        Err(OpsError::Sequence { .. })
    ));
    assert!(matches!(
        ops::softmax_rows_masked(z.view_mut(), array![true].view()),
        Err(OpsError::Shape { .. })
    ));
}

#[test]
fn attention_one_head_by_hand() {
    // Q = K = I (2 x 2), V = [[1, 2], [3, 4]], d = 2, scale 1/sqrt 2.
    // Row 0 scores (1/sqrt 2, 0): p = (s, 1 - s) with s = 1 / (1 + exp(-1/sqrt 2)).
    let q = array![[1.0f32, 0.0], [0.0, 1.0]];
    let v = array![[1.0f32, 2.0], [3.0, 4.0]];
    let all = array![true, true];
    let out = ops::attention(q.view(), q.view(), v.view(), 1, all.view()).unwrap();
    let s = 1.0 / (1.0 + (-std::f32::consts::FRAC_1_SQRT_2).exp());
    let row0 = [s * 1.0 + (1.0 - s) * 3.0, s * 2.0 + (1.0 - s) * 4.0];
    let row1 = [(1.0 - s) * 1.0 + s * 3.0, (1.0 - s) * 2.0 + s * 4.0];
    assert!(close(out.row(0).as_slice().unwrap(), &row0, 1e-6), "{out}");
    assert!(close(out.row(1).as_slice().unwrap(), &row1, 1e-6), "{out}");

    // With the second key masked every query attends only to the first value row.
    let out = ops::attention(q.view(), q.view(), v.view(), 1, array![true, false].view()).unwrap();
    assert_eq!(out, array![[1.0, 2.0], [1.0, 2.0]]);
}

#[test]
fn attention_heads_are_independent_column_blocks() {
    // Two heads of width 1: head 0 sees column 0 only, head 1 column 1 only.
    // Head 0: q = k = (1, 1) → uniform weights → mean of v[:, 0] = (10 + 30) / 2 = 20.
    // Head 1: q = (0, 8), k = (0, 8), scale 1: row 0 scores (0, 0) → mean 3;
    //         row 1 scores (0, 64) → all weight on token 1 (exp(-64) ≈ 1.6e-28) → 4.
    let q = array![[1.0f32, 0.0], [1.0, 8.0]];
    let v = array![[10.0f32, 2.0], [30.0, 4.0]];
    let out = ops::attention(q.view(), q.view(), v.view(), 2, array![true, true].view()).unwrap();
    assert!(
        close(out.as_slice().unwrap(), &[20.0, 3.0, 20.0, 4.0], 1e-5),
        "{out}"
    );
    assert!(matches!(
        ops::attention(q.view(), q.view(), v.view(), 3, array![true, true].view()),
        Err(OpsError::Shape { .. })
    ));
    assert!(matches!(
        ops::attention(q.view(), q.view(), v.view(), 0, array![true, true].view()),
        Err(OpsError::Shape { .. })
    ));
}

#[test]
fn residual_add_adds_and_checks_shapes() {
    let mut x = array![[1.0f32, 2.0]];
    ops::residual_add(x.view_mut(), array![[0.5f32, -2.0]].view()).unwrap();
    assert_eq!(x, array![[1.5, 0.0]]);
    assert!(matches!(
        ops::residual_add(x.view_mut(), array![[1.0f32]].view()),
        Err(OpsError::Shape { .. })
    ));
}

#[test]
fn mean_pool_skips_masked_tokens() {
    let x = array![[1.0f32, 2.0], [3.0, 4.0], [100.0, 100.0]];
    let p = ops::mean_pool(x.view(), array![true, true, false].view()).unwrap();
    assert_eq!(p, array![2.0, 3.0]);
    assert!(matches!(
        ops::mean_pool(x.view(), array![false, false, false].view()),
        Err(OpsError::Sequence { .. })
    ));
    assert!(matches!(
        ops::mean_pool(x.view(), array![true].view()),
        Err(OpsError::Shape { .. })
    ));
}

#[test]
fn l2_normalize_by_hand() {
    assert!(close(
        ops::l2_normalize(array![3.0f32, 4.0].view())
            .as_slice()
            .unwrap(),
        &[0.6, 0.8],
        1e-7
    ));
    // The zero vector stays zero (norm clamped to 1e-12), no NaN.
    assert_eq!(
        ops::l2_normalize(Array1::<f32>::zeros(3).view()),
        Array1::<f32>::zeros(3)
    );
}

#[test]
fn dense_linear_is_x_wt_plus_b() {
    let layer = DenseLinear::new(LinearSpec {
        name: "t".into(),
        weight: array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]],
        bias: array![1.0f32, 0.0, -1.0],
    })
    .unwrap();
    assert_eq!((layer.in_features(), layer.out_features()), (2, 3));
    // (1, 1): (1 + 2 + 1, 3 + 4, 5 + 6 - 1); (2, 0): (2 + 1, 6, 10 - 1).
    let y = layer
        .forward(array![[1.0f32, 1.0], [2.0, 0.0]].view())
        .unwrap();
    assert_eq!(y, array![[4.0, 7.0, 10.0], [3.0, 6.0, 9.0]]);
    assert!(matches!(
        layer.forward(array![[1.0f32, 1.0, 1.0]].view()),
        Err(OpsError::Shape { .. })
    ));
    assert!(matches!(
        DenseLinear::new(LinearSpec {
            name: "bad".into(),
            weight: Array2::zeros((3, 2)),
            bias: Array1::zeros(2),
        }),
        Err(OpsError::Shape { .. })
    ));
}
