//! Sensitivity after quantisation (specs/dp.md §2): adversarial and random pairs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use tandem_dp::{Clip, Quantizer};

fn l2(a: &[i64], b: &[i64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}
fn l1(a: &[i64], b: &[i64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).unsigned_abs() as f64)
        .sum()
}

#[test]
fn dense_rounding_up_is_tight() {
    // n = 64, every coordinate at s·v = m + 1/2 rounds away from zero: the rounding slack
    // √n/2 is attained, and x' = −x attains the bound 2sC + √n exactly.
    let n = 64usize;
    let (m, s) = (3.0f64, 4.0f64);
    let v = (m + 0.5) / s; // per coordinate, exact in binary
    let c = v * (n as f64).sqrt(); // ‖x‖₂ = C exactly, so no clip scaling
    let q = Quantizer::new(Clip::L2(c), s, n).unwrap();
    let x = vec![v; n];
    let xn = vec![-v; n];
    let (a, b) = (q.quantize(&x).unwrap(), q.quantize(&xn).unwrap());
    let d = l2(&a, &b);
    let bound = q.sensitivity().l2;
    assert_eq!(a[0], 4);
    assert!(d <= bound, "{d} > {bound}");
    assert!(d >= bound * (1.0 - 1e-9), "bound not tight: {d} vs {bound}");
    // The naive bound 2sC (no rounding slack) is violated by this pair:
    assert!(d > 2.0 * s * c);
}

#[test]
fn sparse_rounding_is_tight_with_min_term() {
    // n = 1024 but s·C = 2: sixteen coordinates at exactly 1/2 each round to 1, so
    // ‖Q(x)‖ = 4 = 2sC; the bound 2sC + min(√n, 2sC) = 8 is attained by (x, −x).
    let n = 1024;
    let s = 1.0;
    let c = 2.0;
    let q = Quantizer::new(Clip::L2(c), s, n).unwrap();
    let mut x = vec![0.0; n];
    for xi in x.iter_mut().take(16) {
        *xi = 0.5;
    }
    let xn: Vec<f64> = x.iter().map(|v| -v).collect();
    let d = l2(&q.quantize(&x).unwrap(), &q.quantize(&xn).unwrap());
    assert_eq!(
        q.sensitivity().l2,
        8.0_f64.next_up().next_up().max(q.sensitivity().l2)
    );
    assert!(d <= q.sensitivity().l2 && d >= 8.0 - 1e-12, "d={d}");
}

#[test]
fn linf_and_l1_adversarial() {
    let n = 32;
    let q = Quantizer::new(Clip::LInf(1.0), 10.0, n).unwrap();
    let a = q.quantize(&vec![5.0; n]).unwrap();
    let b = q.quantize(&vec![-5.0; n]).unwrap();
    assert!(l2(&a, &b) <= q.sensitivity().l2 && l1(&a, &b) <= q.sensitivity().l1);
    assert!(l1(&a, &b) >= q.sensitivity().l1 * (1.0 - 1e-9));

    let q = Quantizer::new(Clip::L1(2.0), 1.0, 1024).unwrap();
    let mut x = vec![0.0; 1024];
    for xi in x.iter_mut().take(4) {
        *xi = 0.5;
    }
    let xn: Vec<f64> = x.iter().map(|v| -v).collect();
    let (a, b) = (q.quantize(&x).unwrap(), q.quantize(&xn).unwrap());
    assert!(l1(&a, &b) <= q.sensitivity().l1);
    assert!(l1(&a, &b) >= 8.0);
}

#[test]
fn rejects_bad_input() {
    let q = Quantizer::new(Clip::L2(1.0), 16.0, 4).unwrap();
    assert!(q.quantize(&[0.0; 3]).is_err());
    assert!(q.quantize(&[f64::NAN, 0.0, 0.0, 0.0]).is_err());
    assert!(q.quantize(&[f64::INFINITY, 0.0, 0.0, 0.0]).is_err());
    assert!(Quantizer::new(Clip::L2(0.0), 1.0, 4).is_err());
    assert!(Quantizer::new(Clip::L2(1.0), f64::NAN, 4).is_err());
    assert!(Quantizer::new(Clip::L2(1.0), 1.0, 0).is_err());
}

fn coord() -> impl Strategy<Value = f64> {
    prop_oneof![
        -1e6f64..1e6,
        -3.0f64..3.0,
        (-40i32..40).prop_map(|k| k as f64 / 8.0 + 1.0 / 16.0), // rounding ties
        Just(0.0),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_pairs_respect_bounds(
        xs in proptest::collection::vec((coord(), coord()), 1..80),
        c in 0.01f64..50.0,
        s in prop_oneof![Just(1.0f64), Just(8.0), Just(256.0), 0.1f64..300.0],
        which in 0u8..3,
    ) {
        let n = xs.len();
        let clip = match which { 0 => Clip::L2(c), 1 => Clip::LInf(c), _ => Clip::L1(c) };
        let q = Quantizer::new(clip, s, n).unwrap();
        let x: Vec<f64> = xs.iter().map(|p| p.0).collect();
        let y: Vec<f64> = xs.iter().map(|p| p.1).collect();
        let (a, b) = (q.quantize(&x).unwrap(), q.quantize(&y).unwrap());
        let sens = q.sensitivity();
        prop_assert!(l2(&a, &b) <= sens.l2, "l2 {} > {}", l2(&a, &b), sens.l2);
        prop_assert!(l1(&a, &b) <= sens.l1, "l1 {} > {}", l1(&a, &b), sens.l1);
        let zero = vec![0i64; n];
        prop_assert!(l2(&a, &zero) <= q.l2_radius());
    }
}

#[test]
fn l1_dense_rounding_is_tight_on_the_bottleneck() {
    // The trained pipeline's Laplace channel: d = 8, C = 1, s = 256. With seven coordinates at
    // s·x = 31.5 and one at 35.5 (‖s·x‖₁ = 256 = sC, no clip scaling) every coordinate
    // rounds away from zero: ‖Q(x)‖₁ = 260 = sC + d/2 = R₁, and x' = −x attains Δ₁ = 2R₁ = 520.
    let (d, s) = (8usize, 256.0f64);
    let q = Quantizer::new(Clip::L1(1.0), s, d).unwrap();
    let mut x = vec![31.5 / s; d];
    x[d - 1] = 35.5 / s;
    assert_eq!(x.iter().sum::<f64>(), 1.0);
    let xn: Vec<f64> = x.iter().map(|v| -v).collect();
    let (a, b) = (q.quantize(&x).unwrap(), q.quantize(&xn).unwrap());
    assert_eq!(l1(&a, &[0; 8]), 260.0);
    assert_eq!(l1(&a, &b), 520.0);
    assert!(l1(&a, &b) <= q.sensitivity().l1);
    assert!(l1(&a, &b) >= q.sensitivity().l1 * (1.0 - 1e-12));
    // The naive bound 2sC (no rounding slack) is exceeded by this pair.
    assert!(l1(&a, &b) > 2.0 * s);
}
