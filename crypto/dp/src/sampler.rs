//! Exact discrete Laplace and discrete Gaussian samplers (CKS20) in integer arithmetic.
//!
//! # Derivation
//!
//! Canonne, Kamath, Steinke, *The Discrete Gaussian for Differential Privacy* (NeurIPS 2020,
//! arXiv:2004.00010), give three exact algorithms that only need fair coins, uniform integers
//! and Bernoulli trials with rational success probability. We follow them step by step, with
//! every rational kept as a pair of unsigned integers (`u64`/`u128`, checked arithmetic) and an
//! arbitrary-precision ([`dashu`]) path for the rare candidates whose numbers overflow.
//! No floating-point number is ever involved in sampling.
//!
//! **Bernoulli(n/d)**, `0 ≤ n ≤ d`: draw `U` uniform on `{0..d−1}` (rejection sampling from the
//! next power of two, exact) and return `U < n`; `P = n/d`.
//!
//! **Bernoulli(exp(−γ)) for γ = n/d ∈ [0,1]** (CKS20 Alg. 1): `K ← 1`; repeat: draw
//! `A ~ Bernoulli(γ/K)`; if `A = 0` stop, else `K ← K+1`; return `K` odd. The loop stops at
//! `K = k` with probability `γ^{k−1}/(k−1)! − γ^k/k!`, so `P[K odd] = Σ_k (−γ)^k/k! = e^{−γ}`.
//! We draw `Bernoulli(γ/K)` as the AND of two independent draws `Bernoulli(n/d)` and
//! `Bernoulli(1/K)`: `P = (n/d)(1/K)`, which avoids forming the product `d·K`.
//!
//! **Bernoulli(exp(−γ)) for γ > 1**: with `γ = ⌊γ⌋ + r`, `e^{−γ} = (e^{−1})^{⌊γ⌋} e^{−r}`;
//! draw `⌊γ⌋` independent `Bernoulli(e^{−1})` and then one `Bernoulli(e^{−r})`, returning
//! their AND (stopping at the first 0, which does not change the law of the AND).
//!
//! **Discrete Laplace with scale t/s** (`t, s ≥ 1` integers; pmf ∝ `exp(−|x|·s/t)`; CKS20
//! Alg. 2): repeat: `U` uniform on `{0..t−1}`; `D ~ Bernoulli(e^{−U/t})`, retry if `D = 0`;
//! `V` = number of successes before the first failure of `Bernoulli(e^{−1})` trials
//! (geometric, `P[V=v] = (1−e^{−1})e^{−v}`); `X = U + t·V`. Conditioned on `D = 1`,
//! `P[X = x] ∝ e^{−(x mod t)/t} · e^{−⌊x/t⌋} = e^{−x/t}`, i.e. `X` is geometric with ratio
//! `e^{−1/t}`. `Y = ⌊X/s⌋` is then geometric with ratio `e^{−s/t}`
//! (sum of `s` consecutive terms of a geometric series). Draw a sign coin `B`; reject
//! `(B = 1, Y = 0)` so that zero is not counted twice; return `±Y`. The result has
//! `P[Y = y] ∝ e^{−|y| s/t}` on all of ℤ.
//!
//! **Discrete Gaussian with variance parameter σ² = a/b** (`a, b ≥ 1`; pmf ∝
//! `exp(−x²/(2σ²))`; CKS20 Alg. 3): `t = ⌊σ⌋ + 1` (computed as `isqrt(⌊a/b⌋) + 1`, since
//! `⌊√x⌋ = ⌊√⌊x⌋⌋`); repeat: `Y ~ DLap(t)` (scale `t/1`); accept with probability
//! `exp(−(|Y| − σ²/t)² / (2σ²))`. CKS20 Thm. 1 shows the accepted `Y` has the discrete Gaussian
//! law (the acceptance ratio is `exp(−x²/2σ² + |x|/t − σ²/2t²)`, proportional to the target
//! divided by the proposal). In integers:
//! `|Y| − σ²/t = (|Y|·b·t − a)/(b·t)`, hence
//! `γ = (|Y|·b·t − a)² / (2·a·b·t²)`, a ratio of two integers computed exactly in `u128`;
//! if either overflows, the same ratio is formed in [`UBig`] and the same Bernoulli algorithm
//! runs on big integers. The two paths compute the *same* rational, so the law is unchanged.
//!
//! Scales are given as rationals. [`Rational::ceil_dyadic`] turns a calibrated `f64` scale into
//! `p/2^k` rounded **up** (more noise, never less), with `p < 2^21`, so that numbers stay
//! small (`u128` path for all candidates within ~2^20 standard deviations) and the same value
//! is exactly representable as the `f64` handed to opendp's privacy maps.
//!
//! Statistical tests against the exact pmf and against opendp's own
//! `sample_discrete_gaussian` / `sample_discrete_laplace` are in `tests/sampler_stats.rs`.

use crate::error::{DpError, Result};
use crate::rng::SecureBits;
use dashu::integer::UBig;

/// A positive rational `num/den` (both `u64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rational {
    /// Numerator.
    pub num: u64,
    /// Denominator (≥ 1).
    pub den: u64,
}

impl Rational {
    /// The smallest `p/2^k ≥ x` with `p < 2^21` (or `k = 0` for large `x`), for `x > 0` finite.
    ///
    /// The result is exactly representable as `f64` ([`Rational::to_f64`] is exact).
    pub fn ceil_dyadic(x: f64) -> Result<Self> {
        if !(x.is_finite() && x > 0.0) {
            return Err(DpError::InvalidParameter(format!(
                "noise scale must be positive and finite, got {x}"
            )));
        }
        if x >= 2f64.powi(52) {
            return Err(DpError::InvalidParameter(format!(
                "noise scale {x} too large"
            )));
        }
        // k = max(0, 20 − ⌈log2 x⌉), at most 40.
        let mut k: i32 = 0;
        while k < 40 && x * 2f64.powi(k + 1) < 2f64.powi(21) {
            k += 1;
        }
        let scaled = x * 2f64.powi(k); // exact: multiplication by a power of two
        let p = scaled.ceil();
        // p ≥ scaled, both exact in f64; p fits u64.
        let p = p as u64;
        let den = 1u64 << k;
        Ok(Self::reduced(p.max(1), den))
    }

    fn reduced(num: u64, den: u64) -> Self {
        let g = gcd(num, den).max(1);
        Rational {
            num: num / g,
            den: den / g,
        }
    }

    /// The value as `f64` (exact for values produced by [`Rational::ceil_dyadic`]).
    pub fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let r = a % b;
        a = b;
        b = r;
    }
    a
}

fn isqrt_u64(x: u64) -> u64 {
    if x < 2 {
        return x;
    }
    // Newton iteration on integers, starting above the root.
    let mut r = (x as f64).sqrt() as u64 + 2;
    while r.checked_mul(r).is_none_or(|sq| sq > x) {
        r = (r + x / r) / 2;
        if r.checked_mul(r).is_some_and(|sq| sq <= x) {
            break;
        }
    }
    while (r + 1).checked_mul(r + 1).is_some_and(|sq| sq <= x) {
        r += 1;
    }
    r
}

/// Bernoulli(n/d) for `n ≤ d`, `d ≥ 1`.
fn bern_frac(rng: &mut SecureBits, n: u128, d: u128) -> Result<bool> {
    if n == 0 {
        return Ok(false);
    }
    if n >= d {
        return Ok(true);
    }
    Ok(rng.uniform_below_u128(d)? < n)
}

/// Bernoulli(exp(−n/d)) for `n ≤ d` (CKS20 Alg. 1).
fn bern_exp_le1(rng: &mut SecureBits, n: u128, d: u128) -> Result<bool> {
    if n == 0 {
        return Ok(true);
    }
    let mut k: u64 = 1;
    loop {
        // Bernoulli(γ/k) = Bernoulli(γ) AND Bernoulli(1/k), independent.
        let a = bern_frac(rng, u128::from(1u8), u128::from(k))? && bern_frac(rng, n, d)?;
        if !a {
            return Ok(k % 2 == 1);
        }
        k = k.saturating_add(1);
    }
}

/// Bernoulli(exp(−1)).
fn bern_exp1(rng: &mut SecureBits) -> Result<bool> {
    bern_exp_le1(rng, 1, 1)
}

/// Bernoulli(exp(−n/d)) for any `n ≥ 0`, `d ≥ 1`.
fn bern_exp(rng: &mut SecureBits, n: u128, d: u128) -> Result<bool> {
    let mut whole = n / d;
    while whole > 0 {
        if !bern_exp1(rng)? {
            return Ok(false);
        }
        whole -= 1;
    }
    bern_exp_le1(rng, n % d, d)
}

/// Bernoulli(exp(−n/d)) on big integers (same algorithm as [`bern_exp`]).
fn bern_exp_big(rng: &mut SecureBits, n: &UBig, d: &UBig) -> Result<bool> {
    let mut whole = n / d;
    let r = n % d;
    while whole > UBig::ZERO {
        if !bern_exp1(rng)? {
            return Ok(false);
        }
        whole -= UBig::ONE;
    }
    if r == UBig::ZERO {
        return Ok(true);
    }
    let mut k: u64 = 1;
    loop {
        let a = bern_frac(rng, 1, u128::from(k))? && rng.uniform_below_big(d)? < r;
        if !a {
            return Ok(k % 2 == 1);
        }
        k = k.saturating_add(1);
    }
}

/// Exact sampler for the discrete Laplace distribution `P[x] ∝ exp(−|x|/scale)` on ℤ.
#[derive(Clone, Copy, Debug)]
pub struct DiscreteLaplace {
    scale: Rational,
}

impl DiscreteLaplace {
    /// A sampler with the given rational scale (`t/s` in CKS20 notation).
    pub fn new(scale: Rational) -> Result<Self> {
        if scale.num == 0 || scale.den == 0 {
            return Err(DpError::InvalidParameter(
                "laplace scale must be > 0".into(),
            ));
        }
        Ok(DiscreteLaplace { scale })
    }

    /// The scale.
    pub fn scale(&self) -> Rational {
        self.scale
    }

    /// One exact sample.
    pub fn sample(&self, rng: &mut SecureBits) -> Result<i64> {
        sample_dlap(rng, self.scale.num, self.scale.den)
    }
}

/// CKS20 Alg. 2 with scale t/s.
fn sample_dlap(rng: &mut SecureBits, t: u64, s: u64) -> Result<i64> {
    loop {
        let u = rng.uniform_below_u64(t)?;
        if !bern_exp(rng, u128::from(u), u128::from(t))? {
            continue;
        }
        let mut v: u64 = 0;
        while bern_exp1(rng)? {
            v = v.saturating_add(1);
        }
        let x = u128::from(u) + u128::from(t) * u128::from(v);
        let y = x / u128::from(s);
        let negative = rng.coin()?;
        if negative && y == 0 {
            continue;
        }
        let y = i64::try_from(y).unwrap_or(i64::MAX);
        return Ok(if negative { -y } else { y });
    }
}

/// Exact sampler for the discrete Gaussian `P[x] ∝ exp(−x²/(2σ²))` on ℤ, σ² rational.
#[derive(Clone, Debug)]
pub struct DiscreteGaussian {
    sigma2: Rational,
    t: u64,
    /// `2·a·b·t²` if it fits in `u128`.
    den: Option<u128>,
}

impl DiscreteGaussian {
    /// A sampler with standard-deviation parameter σ (rational): σ² = σ.num²/σ.den².
    pub fn with_sigma(sigma: Rational) -> Result<Self> {
        let a = sigma
            .num
            .checked_mul(sigma.num)
            .ok_or_else(|| DpError::InvalidParameter("sigma numerator too large".into()))?;
        let b = sigma
            .den
            .checked_mul(sigma.den)
            .ok_or_else(|| DpError::InvalidParameter("sigma denominator too large".into()))?;
        Self::with_sigma2(Rational { num: a, den: b })
    }

    /// A sampler with variance parameter σ² = a/b.
    pub fn with_sigma2(sigma2: Rational) -> Result<Self> {
        if sigma2.num == 0 || sigma2.den == 0 {
            return Err(DpError::InvalidParameter("sigma^2 must be > 0".into()));
        }
        let t = isqrt_u64(sigma2.num / sigma2.den) + 1;
        let den = u128::from(sigma2.num)
            .checked_mul(u128::from(sigma2.den))
            .and_then(|v| v.checked_mul(2))
            .and_then(|v| v.checked_mul(u128::from(t)))
            .and_then(|v| v.checked_mul(u128::from(t)));
        Ok(DiscreteGaussian { sigma2, t, den })
    }

    /// σ² as a rational.
    pub fn sigma2(&self) -> Rational {
        self.sigma2
    }

    /// One exact sample.
    pub fn sample(&self, rng: &mut SecureBits) -> Result<i64> {
        let (a, b, t) = (self.sigma2.num, self.sigma2.den, self.t);
        loop {
            let y = sample_dlap(rng, t, 1)?;
            let abs_y = u128::from(y.unsigned_abs());
            // u = |Y|·b·t − a, possibly negative; γ = u² / (2abt²).
            let fast = abs_y
                .checked_mul(u128::from(b))
                .and_then(|v| v.checked_mul(u128::from(t)))
                .and_then(|ybt| {
                    let diff = ybt.abs_diff(u128::from(a));
                    diff.checked_mul(diff)
                })
                .zip(self.den);
            let accept = match fast {
                Some((num, den)) => bern_exp(rng, num, den)?,
                None => {
                    let ybt = UBig::from(abs_y) * UBig::from(b) * UBig::from(t);
                    let a_big = UBig::from(a);
                    let diff = if ybt >= a_big {
                        ybt - a_big
                    } else {
                        a_big - ybt
                    };
                    let num = &diff * &diff;
                    let den = UBig::from(2u8)
                        * UBig::from(a)
                        * UBig::from(b)
                        * UBig::from(t)
                        * UBig::from(t);
                    bern_exp_big(rng, &num, &den)?
                }
            };
            if accept {
                return Ok(y);
            }
        }
    }
}

/// Either exact sampler.
#[derive(Clone, Debug)]
pub enum Sampler {
    /// Discrete Gaussian (zCDP).
    Gaussian(DiscreteGaussian),
    /// Discrete Laplace (pure ε-DP).
    Laplace(DiscreteLaplace),
}

impl Sampler {
    /// One exact sample.
    pub fn sample(&self, rng: &mut SecureBits) -> Result<i64> {
        match self {
            Sampler::Gaussian(g) => g.sample(rng),
            Sampler::Laplace(l) => l.sample(rng),
        }
    }

    /// Adds independent noise to every entry of `x` (saturating at the `i64` range).
    pub fn add_noise(&self, x: &mut [i64], rng: &mut SecureBits) -> Result<()> {
        rng.check_fork()?;
        for v in x.iter_mut() {
            *v = v.saturating_add(self.sample(rng)?);
        }
        Ok(())
    }

    /// `n` independent noise values.
    pub fn noise_vec(&self, n: usize, rng: &mut SecureBits) -> Result<Vec<i64>> {
        let mut v = vec![0i64; n];
        self.add_noise(&mut v, rng)?;
        Ok(v)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn isqrt_matches() {
        for x in [
            0u64,
            1,
            2,
            3,
            4,
            15,
            16,
            17,
            99,
            100,
            101,
            u64::MAX,
            (1 << 62) + 5,
        ] {
            let r = isqrt_u64(x);
            assert!(u128::from(r) * u128::from(r) <= u128::from(x));
            assert!(u128::from(r + 1) * u128::from(r + 1) > u128::from(x));
        }
    }

    #[test]
    fn ceil_dyadic_rounds_up_and_is_exact() {
        for x in [1e-3, 0.1, 1.0, 3.7, 1234.567, 9.9e6, 1e12] {
            let r = Rational::ceil_dyadic(x).unwrap();
            assert!(r.to_f64() >= x);
            assert!(r.to_f64() <= x * (1.0 + 1e-6) + 1.0);
            assert!(r.num < (1 << 21) || r.den == 1);
        }
        assert!(Rational::ceil_dyadic(f64::NAN).is_err());
        assert!(Rational::ceil_dyadic(0.0).is_err());
    }

    #[test]
    fn big_path_agrees_in_distribution_roughly() {
        // Force the big-integer path: σ² = (2^64−2)/(2^63−1) = 2 exactly, but 2·a·b·t²
        // overflows u128, so every candidate goes through UBig arithmetic.
        let g = DiscreteGaussian::with_sigma2(Rational {
            num: u64::MAX - 1,
            den: u64::MAX / 2,
        })
        .unwrap();
        assert!(g.den.is_none());
        let mut rng = SecureBits::new().unwrap();
        let n = 20_000;
        let mut ss = 0.0;
        for _ in 0..n {
            let x = g.sample(&mut rng).unwrap() as f64;
            ss += x * x;
        }
        // Var of N_Z(0, σ²=2) is 2 − O(e^{−2π²σ²}) ≈ 2. Sample variance has sd ≈ 2·√(2/n)
        // ≈ 0.02; a tolerance of 0.25 (> 12 sd) has a false-positive rate < 1e-30.
        let var = ss / n as f64 / 2.0;
        assert!((var - 1.0).abs() < 0.25, "var {var}");
    }
}
