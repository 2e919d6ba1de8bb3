//! Statistical tests of the exact samplers.
//!
//! Every test rejects at α = 1e-9: under the null hypothesis (the sampler is correct) each of
//! the 10 χ² tests of this file fails with probability ≈ 1e-9 (χ² asymptotics; all bins
//! expect ≥ 50 resp. ≥ 20 counts, which adds at most 1/50 resp. 1/20 of the variance per bin:
//! the 1e-9 tail is then off by a factor of 2 at most), so a correct sampler fails a run with
//! probability ≈ 1e-8. (Was α = 1e-6: ≈ 1e-5 per run.) The samplers draw from the OS, so
//! this is the test's false-failure rate in CI.
//!
//! The two power checks (a wrong σ or b must be rejected) are sized so that they miss with
//! probability < 1e-20 at this α; the sizes are derived next to them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chi2_gof, chi2_gof_binned, chi2_two_sample};
use dashu::integer::{IBig, UBig};
use dashu::rational::RBig;
use tandem_dp::{DiscreteGaussian, DiscreteLaplace, Rational, SecureBits};

const ALPHA: f64 = 1e-9;

fn gauss_pmf(sigma: f64) -> impl Fn(i64) -> f64 {
    let support = (40.0 * sigma + 10.0) as i64;
    let z: f64 = (-support..=support)
        .map(|x| (-(x as f64).powi(2) / (2.0 * sigma * sigma)).exp())
        .sum();
    move |x| (-(x as f64).powi(2) / (2.0 * sigma * sigma)).exp() / z
}

fn lap_pmf(scale: f64) -> impl Fn(i64) -> f64 {
    let r = (-1.0 / scale).exp();
    let z = (1.0 + r) / (1.0 - r);
    move |x| r.powi(x.unsigned_abs() as i32) / z
}

fn draw(n: usize, f: impl Fn(&mut SecureBits) -> i64) -> Vec<i64> {
    let mut rng = SecureBits::new().unwrap();
    (0..n).map(|_| f(&mut rng)).collect()
}

#[test]
fn discrete_gaussian_matches_pmf() {
    // σ = 0.75 (t = 1), 3.5, 37.25 — the last exercises large t and many bins.
    for (num, den, n) in [
        (3u64, 4u64, 1_000_000usize),
        (7, 2, 2_000_000),
        (149, 4, 2_000_000),
    ] {
        let sigma = num as f64 / den as f64;
        let g = DiscreteGaussian::with_sigma(Rational { num, den }).unwrap();
        let s = draw(n, |r| g.sample(r).unwrap());
        let pmf = gauss_pmf(sigma);
        let (stat, df, p) = chi2_gof(&s, &pmf, (12.0 * sigma + 5.0) as i64);
        eprintln!("gaussian σ={sigma}: n={n} χ²={stat:.1} df={df} p={p:.3e}");
        assert!(p > ALPHA, "σ={sigma}: χ²={stat} df={df} p={p}");
    }
}

#[test]
fn discrete_laplace_matches_pmf() {
    for (num, den, n) in [
        (1u64, 3u64, 1_000_000usize),
        (5, 2, 1_000_000),
        (40, 1, 1_000_000),
    ] {
        let b = num as f64 / den as f64;
        let l = DiscreteLaplace::new(Rational { num, den }).unwrap();
        let s = draw(n, |r| l.sample(r).unwrap());
        let pmf = lap_pmf(b);
        let (stat, df, p) = chi2_gof(&s, &pmf, (40.0 * b + 5.0) as i64);
        eprintln!("laplace b={b}: n={n} χ²={stat:.1} df={df} p={p:.3e}");
        assert!(p > ALPHA, "b={b}: χ²={stat} df={df} p={p}");
    }
}

fn rbig(num: u64, den: u64) -> RBig {
    RBig::from_parts(IBig::from(num), UBig::from(den))
}

fn to_i64(x: IBig) -> i64 {
    i64::try_from(x).unwrap()
}

#[test]
fn discrete_gaussian_matches_opendp_sampler() {
    // Two-sample χ² homogeneity test against opendp's own exact sampler.
    let (num, den) = (13u64, 4u64); // σ = 3.25
    let ours = {
        let g = DiscreteGaussian::with_sigma(Rational { num, den }).unwrap();
        draw(400_000, |r| g.sample(r).unwrap())
    };
    let theirs: Vec<i64> = (0..40_000)
        .map(|_| {
            to_i64(opendp::traits::samplers::sample_discrete_gaussian(rbig(num, den)).unwrap())
        })
        .collect();
    let (stat, df, p) = chi2_two_sample(&ours, &theirs);
    eprintln!("gaussian vs opendp: χ²={stat:.1} df={df} p={p:.3e}");
    assert!(p > ALPHA, "χ²={stat} df={df} p={p}");
}

#[test]
fn discrete_laplace_matches_opendp_sampler() {
    let (num, den) = (9u64, 4u64); // b = 2.25
    let ours = {
        let l = DiscreteLaplace::new(Rational { num, den }).unwrap();
        draw(400_000, |r| l.sample(r).unwrap())
    };
    let theirs: Vec<i64> = (0..40_000)
        .map(|_| to_i64(opendp::traits::samplers::sample_discrete_laplace(rbig(num, den)).unwrap()))
        .collect();
    let (stat, df, p) = chi2_two_sample(&ours, &theirs);
    eprintln!("laplace vs opendp: χ²={stat:.1} df={df} p={p:.3e}");
    assert!(p > ALPHA, "χ²={stat} df={df} p={p}");
}

#[test]
fn discrete_laplace_at_the_bottleneck_scale() {
    // b = 131/2 = 65.5: the trained pipeline's noise at ε = 8 on a 12-d L1-normalised
    // bottleneck (Δ₁ = 2·⌊256 + 6⌋ = 524, b = Δ₁/ε). Against the exact pmf and against
    // opendp's sampler at the same scale.
    let (num, den) = (131u64, 2u64);
    let b = num as f64 / den as f64;
    let l = DiscreteLaplace::new(Rational { num, den }).unwrap();
    let s = draw(1_000_000, |r| l.sample(r).unwrap());
    let (stat, df, p) = chi2_gof(&s, &lap_pmf(b), (40.0 * b) as i64);
    eprintln!("laplace b={b}: χ²={stat:.1} df={df} p={p:.3e}");
    assert!(p > ALPHA, "b={b}: χ²={stat} df={df} p={p}");
    let theirs: Vec<i64> = (0..40_000)
        .map(|_| to_i64(opendp::traits::samplers::sample_discrete_laplace(rbig(num, den)).unwrap()))
        .collect();
    let (stat, df, p) = chi2_two_sample(&s[..400_000], &theirs);
    eprintln!("laplace b={b} vs opendp: χ²={stat:.1} df={df} p={p:.3e}");
    assert!(p > ALPHA, "χ²={stat} df={df} p={p}");
    // Power: a 2 % error in the scale is detected. Against the pmf of 1.02·b the statistic
    // is noncentral χ² with λ = n·Σ(p−q)²/q: with ≥ 50 counts per bin (df 772, λ ≈ 385) it
    // missed α = 1e-6 with probability 2.7e-4 (a false failure every few thousand runs) and
    // would miss α = 1e-9 one run in 100. A scale error is smooth, so wide bins keep λ and
    // shed degrees of freedom: ≥ 20 000 counts per bin gives df 44, λ ≈ 364, and a miss
    // probability of 5e-21 at α = 1e-9 (Poisson mixture of central χ², n = 1 000 000).
    let (stat, df, p) = chi2_gof_binned(&s, &lap_pmf(b * 1.02), (40.0 * b) as i64, 20_000.0);
    eprintln!("laplace b={b} vs pmf of 1.02·b: χ²={stat:.1} df={df} p={p:.3e}");
    assert!(
        p < ALPHA,
        "a 2% error in b should be detected, χ²={stat} df={df} p={p}"
    );
}

#[test]
fn chi2_helpers_are_sane() {
    // Q(df/2, x/2) at known quantiles: χ²_1 at 3.841 → 0.05; χ²_10 at 18.307 → 0.05.
    assert!((common::chi2_sf(3.841_458_8, 1) - 0.05).abs() < 1e-6);
    assert!((common::chi2_sf(18.307_038, 10) - 0.05).abs() < 1e-6);
    assert!((common::chi2_sf(149.449, 100) - 0.001).abs() < 1e-5);
    // A deliberately wrong σ must be rejected (power check): df 28, λ ≈ 391, so the
    // statistic misses α = 1e-9 with probability ≈ 1e-27.
    let g = DiscreteGaussian::with_sigma(Rational { num: 7, den: 2 }).unwrap();
    let s = draw(1_000_000, |r| g.sample(r).unwrap());
    let (stat, df, p) = chi2_gof(&s, &gauss_pmf(3.55), 50);
    eprintln!("gaussian σ=3.5 vs pmf of σ=3.55: χ²={stat:.1} df={df} p={p:.3e}");
    assert!(p < ALPHA, "a 1.4% error in σ should be detected, p={p}");
}
