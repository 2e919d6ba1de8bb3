//! The exact integer split pipeline on the committed bundles and their test splits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use tandem_model::{Bundle, Limits, ModelError, TestSet, INT8_MAX};

fn bundle(name: &str) -> (Bundle, TestSet) {
    let b = Bundle::load(&models().join(name), &dev_pub(), &Limits::default()).unwrap();
    let t = TestSet::load(&models().join(name).join("test.json")).unwrap();
    (b, t)
}

/// Accuracy floors of the quantised pipeline on the test splits (measured: digits 0.9593,
/// breast cancer 0.9766).
const FLOORS: [(&str, f64, usize); 2] = [("digits", 0.94, 540), ("breast_cancer", 0.95, 171)];

#[test]
fn quantised_accuracy_on_the_test_split() {
    for (name, floor, n) in FLOORS {
        let (b, t) = bundle(name);
        assert_eq!(t.y.len(), n);
        assert_eq!(t.dataset, name);
        let acc = b.accuracy(&t.x, &t.y).unwrap();
        assert!(acc >= floor, "{name}: {acc} < {floor}");
        let info = b.manifest().training.as_ref().unwrap();
        assert_eq!(acc, info.quantised_test_accuracy, "{name}");
        assert_eq!(info.test_samples, n);
        assert!(
            (info.float_test_accuracy - acc).abs() <= 0.02,
            "{name}: float {} vs quantised {acc}",
            info.float_test_accuracy
        );
    }
}

#[test]
fn split_pipeline_is_the_plaintext_reference() {
    for (name, _, _) in FLOORS {
        let (b, t) = bundle(name);
        let cl = b.cloud_layer().unwrap();
        assert_eq!(cl.index, b.cloud_index());
        assert_eq!(cl.weights.len(), cl.n_in * cl.n_out);
        assert_eq!(cl.bias.len(), cl.n_out);
        assert!(cl.weights.iter().all(|w| w.abs() <= INT8_MAX));
        assert_eq!(b.device_layers().count(), b.layers().len() - 1);
        for x in &t.x {
            let q = b.device_encode(x).unwrap();
            assert_eq!(q.len(), cl.n_in);
            assert!(q.iter().all(|v| v.abs() <= cl.input_clip));
            // What the HE engine computes: an exact integer matrix-vector product.
            let z: Vec<i64> = cl
                .weights
                .chunks(cl.n_in)
                .zip(&cl.bias)
                .map(|(row, b)| b + row.iter().zip(&q).map(|(w, x)| w * x).sum::<i64>())
                .collect();
            assert_eq!(z, b.cloud_eval_plain(&q).unwrap());
            let p = b.finish_on_device(&z).unwrap();
            assert_eq!(p, b.predict_plain(x).unwrap());
            assert_eq!(p.logits.len(), b.classes());
            assert!(p.class < b.classes());
        }
    }
}

#[test]
fn noised_inputs_are_evaluated_exactly() {
    let (b, t) = bundle("digits");
    let q = b.device_encode(&t.x[0]).unwrap();
    // DP noise can push values out of the int8 range; the cloud result stays exact.
    let noised: Vec<i64> = q
        .iter()
        .enumerate()
        .map(|(i, v)| v + (i as i64 * 37 % 500) - 250)
        .collect();
    let z = b.cloud_eval_plain(&noised).unwrap();
    let cl = b.cloud_layer().unwrap();
    for (j, zj) in z.iter().enumerate() {
        let row = &cl.weights[j * cl.n_in..(j + 1) * cl.n_in];
        assert_eq!(
            *zj,
            cl.bias[j] + row.iter().zip(&noised).map(|(w, x)| w * x).sum::<i64>()
        );
    }
    assert!(b.finish_on_device(&z).is_ok());
    // Absurd values overflow into a typed error, not a panic or a wrapped result.
    let huge = vec![i64::MAX; cl.n_in];
    assert!(matches!(
        b.cloud_eval_plain(&huge),
        Err(ModelError::Overflow(_))
    ));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (b, t) = bundle("breast_cancer");
    assert!(matches!(
        b.predict_plain(&[1.0; 29]),
        Err(ModelError::InvalidInput(_))
    ));
    let mut x = t.x[0].clone();
    x[3] = f32::NAN;
    assert!(matches!(
        b.predict_plain(&x),
        Err(ModelError::NonFinite { index: 3, .. })
    ));
    x[3] = f32::INFINITY;
    assert!(matches!(
        b.device_encode(&x),
        Err(ModelError::NonFinite { index: 3, .. })
    ));
    assert!(matches!(
        b.predict_plain(&[]),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        b.quantize_input(&[0.0; 3]),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        b.cloud_eval_plain(&[0; 3]),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        b.finish_on_device(&[0; 3]),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        b.layer_as_cloud(0),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        b.layer_as_cloud(99),
        Err(ModelError::InvalidInput(_))
    ));
    // Huge but finite inputs saturate to the int8 range.
    let big = vec![1e30f32; 30];
    let q = b.device_encode(&big).unwrap();
    assert!(q.iter().all(|v| v.abs() <= INT8_MAX));
    assert!(b.predict_plain(&big).is_ok());
}

#[test]
fn test_sets_match_the_data_files() {
    // Indices point into the data rows: a spot check against breast_cancer.csv.
    let (_, t) = bundle("breast_cancer");
    let text = std::fs::read_to_string(repo().join("data/breast_cancer.csv")).unwrap();
    let rows: Vec<&str> = text.lines().skip(1).collect();
    for (k, &i) in t.indices.iter().enumerate().take(20) {
        let vals: Vec<f32> = rows[i].split(',').map(|v| v.parse().unwrap()).collect();
        assert_eq!(&vals[..30], &t.x[k][..]);
        assert_eq!(vals[30] as usize, t.y[k]);
    }
}

/// Issue 12 item 3: 64 copies of f32::MAX (finite) overflow the digits standardisation. This
/// used to yield NaN, which ReLU mapped to 0, and a confident prediction.
#[test]
fn finite_input_overflowing_standardisation_is_refused() {
    let (b, _) = bundle("digits");
    let x = vec![3.402_823_4e38_f32; 64];
    for r in [
        b.device_prefix(&x).map(|_| ()),
        b.device_encode(&x).map(|_| ()),
        b.predict_plain(&x).map(|_| ()),
    ] {
        match r {
            Err(ModelError::NonFinite { stage, .. }) => assert_eq!(stage, "standardisation"),
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }
    match b.predict_plain(&[f32::NAN; 64]) {
        Err(ModelError::NonFinite { stage, index: 0 }) => assert_eq!(stage, "input"),
        other => panic!("expected NonFinite, got {other:?}"),
    }
}
