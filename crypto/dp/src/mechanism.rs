//! Clip → quantise → exact discrete noise, with sensitivity and calibration.
//!
//! Neighbouring relation (local DP): **any two inputs of one device**, i.e. substitution of
//! the whole activation vector `x` by any other `x'` of the same length. The sensitivities
//! below bound `‖Q(x) − Q(x')‖` over all such pairs, where `Q` is clip-then-quantise; they are
//! derived in `specs/dp.md` §2 and tested with adversarial pairs in `tests/sensitivity.rs`.
//!
//! Accounting is done by opendp: [`Mechanism::cost_rho`] / [`Mechanism::cost_epsilon`] evaluate
//! the privacy map of opendp's own `make_gaussian` / `make_laplace` (vector domain of `i64`,
//! `L2Distance<f64>` / `L1Distance<f64>`) at our sensitivity, and (ε, δ) comes from opendp's
//! `make_zCDP_to_approxDP` + `make_fix_delta`. [`Mechanism::to_opendp`] wraps our exact sampler in
//! an opendp `Measurement` with that same privacy map.

use crate::error::{DpError, Result};
use crate::ledger::Receipt;
use crate::rng::SecureBits;
use crate::sampler::{DiscreteGaussian, DiscreteLaplace, Rational, Sampler};
use opendp::combinators::{make_fix_delta, make_zCDP_to_approxDP};
use opendp::core::{Function, Measurement};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::{make_gaussian, make_laplace};
use opendp::measures::{MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{L1Distance, L2Distance};

/// Clipping norm applied before quantisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clip {
    /// Scale the vector down so that its L2 norm is ≤ C.
    L2(f64),
    /// Clamp every coordinate to `[−C, C]`.
    LInf(f64),
    /// Scale the vector down so that its L1 norm is ≤ C.
    L1(f64),
}

impl Clip {
    fn bound(self) -> f64 {
        match self {
            Clip::L2(c) | Clip::LInf(c) | Clip::L1(c) => c,
        }
    }
}

/// Clipping and quantisation to the integer grid `round(s·x)` (round half away from zero).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantizer {
    clip: Clip,
    scale: f64,
    dim: usize,
}

/// Sensitivities of the quantised vector under the substitution relation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sensitivity {
    /// Upper bound on `‖Q(x) − Q(x')‖₂`.
    pub l2: f64,
    /// Upper bound on `‖Q(x) − Q(x')‖₁`.
    pub l1: f64,
}

/// Largest dimension accepted (keeps all integer norms far from overflow).
pub const MAX_DIM: usize = 1 << 24;

/// Upward-rounded f64 (one ulp up): used so that float bounds never under-state a real bound.
pub(crate) fn up(x: f64) -> f64 {
    if x.is_finite() && x >= 0.0 {
        f64::from_bits(x.to_bits() + 1)
    } else {
        x
    }
}

impl Quantizer {
    /// A quantiser for vectors of length `dim` with clipping `clip` and grid scale `scale`.
    ///
    /// Requires `C > 0`, `s > 0`, finite, `s·C ≤ 2^40`, `1 ≤ dim ≤ 2^24`.
    pub fn new(clip: Clip, scale: f64, dim: usize) -> Result<Self> {
        let c = clip.bound();
        if !(c.is_finite() && c > 0.0 && scale.is_finite() && scale > 0.0) {
            return Err(DpError::InvalidParameter(format!(
                "clip bound ({c}) and scale ({scale}) must be positive and finite"
            )));
        }
        if c * scale > 2f64.powi(40) {
            return Err(DpError::InvalidParameter("s·C must be ≤ 2^40".into()));
        }
        if dim == 0 || dim > MAX_DIM {
            return Err(DpError::InvalidParameter(format!(
                "dimension {dim} out of range"
            )));
        }
        Ok(Quantizer { clip, scale, dim })
    }

    /// The clipping rule.
    pub fn clip(&self) -> Clip {
        self.clip
    }
    /// The grid scale `s`.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// The vector length `n`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bound `R₂` on `‖Q(x)‖₂` for every input (specs/dp.md §2): `sC + min(√n, 2sC)/2`,
    /// rounded up. The quantiser enforces it exactly on the integer vector.
    pub fn l2_radius(&self) -> f64 {
        let n = self.dim as f64;
        match self.clip {
            Clip::L2(c) => {
                let sc = up(self.scale * c);
                up(sc + up(n.sqrt()).min(2.0 * sc) / 2.0)
            }
            Clip::LInf(_) => up(self.linf_cap() as f64 * up(n.sqrt())),
            Clip::L1(_) => self.l1_cap() as f64,
        }
    }

    /// Bound on `‖Q(x)‖₁` for every input.
    pub fn l1_radius(&self) -> f64 {
        match self.clip {
            Clip::L2(_) => up(self.l2_radius() * up((self.dim as f64).sqrt())),
            Clip::LInf(_) => self.linf_cap() as f64 * self.dim as f64,
            Clip::L1(_) => self.l1_cap() as f64,
        }
    }

    /// Integer cap `m = ⌊sC + 1/2⌋` on each coordinate for the L∞ clip.
    fn linf_cap(&self) -> i64 {
        (self.scale * self.clip.bound() + 0.5).floor() as i64
    }

    /// Integer cap `⌊sC + min(n, 2sC)/2⌋` on the L1 norm for the L1 clip.
    fn l1_cap(&self) -> i64 {
        let sc = self.scale * self.clip.bound();
        (sc + (self.dim as f64).min(2.0 * sc) / 2.0).floor() as i64
    }

    /// Sensitivities of [`Quantizer::quantize`] under substitution: `2·R` by the triangle
    /// inequality through 0 (specs/dp.md §2).
    pub fn sensitivity(&self) -> Sensitivity {
        Sensitivity {
            l2: up(2.0 * self.l2_radius()),
            l1: up(2.0 * self.l1_radius()),
        }
    }

    /// Clip and quantise. Errors on wrong length or non-finite entries.
    ///
    /// The output always satisfies the radius bounds exactly in integer arithmetic: if
    /// floating-point rounding in the clip ever pushed the integer vector past its bound, the
    /// largest coordinates are moved one step towards zero until it holds.
    pub fn quantize(&self, x: &[f64]) -> Result<Vec<i64>> {
        if x.len() != self.dim {
            return Err(DpError::InvalidInput(format!(
                "expected {} activations, got {}",
                self.dim,
                x.len()
            )));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(DpError::InvalidInput("non-finite activation".into()));
        }
        let s = self.scale;
        let mut q: Vec<i64> = match self.clip {
            Clip::L2(c) => {
                let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
                let f = if norm > c { c / norm } else { 1.0 };
                x.iter().map(|v| (v * f * s).round() as i64).collect()
            }
            Clip::L1(c) => {
                let norm = x.iter().map(|v| v.abs()).sum::<f64>();
                let f = if norm > c { c / norm } else { 1.0 };
                x.iter().map(|v| (v * f * s).round() as i64).collect()
            }
            Clip::LInf(c) => {
                let m = self.linf_cap();
                x.iter()
                    .map(|v| ((v.clamp(-c, c) * s).round() as i64).clamp(-m, m))
                    .collect()
            }
        };
        match self.clip {
            Clip::L2(_) => {
                // Exact integer check against ⌊R²⌋ (computed with margin, see specs §2).
                let r = self.l2_radius();
                let cap = ((r * r) * (1.0 - 2f64.powi(-50))).floor() as u128;
                let mut norm2: u128 = q.iter().map(|v| u128::from(v.unsigned_abs()).pow(2)).sum();
                while norm2 > cap {
                    shrink_largest(&mut q, |old, new| {
                        norm2 = norm2 - u128::from(old.unsigned_abs()).pow(2)
                            + u128::from(new.unsigned_abs()).pow(2);
                    });
                }
            }
            Clip::L1(_) => {
                let cap = self.l1_cap().unsigned_abs();
                let mut norm1: u64 = q.iter().map(|v| v.unsigned_abs()).sum();
                while norm1 > cap {
                    shrink_largest(&mut q, |_, _| norm1 -= 1);
                }
            }
            Clip::LInf(_) => {}
        }
        Ok(q)
    }
}

/// Moves the entry of largest magnitude one step towards zero.
fn shrink_largest(q: &mut [i64], mut on_change: impl FnMut(i64, i64)) {
    if let Some((i, _)) = q.iter().enumerate().max_by_key(|(_, v)| v.unsigned_abs()) {
        let old = q[i];
        let new = old - old.signum();
        q[i] = new;
        on_change(old, new);
    }
}

/// Which noise and at what scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NoiseKind {
    /// Discrete Gaussian with standard-deviation parameter σ (ρ-zCDP).
    Gaussian {
        /// σ, a dyadic rational exactly representable in f64.
        sigma: Rational,
    },
    /// Discrete Laplace with scale b (pure ε-DP, charged as ρ = ε²/2 in zCDP).
    Laplace {
        /// b, a dyadic rational exactly representable in f64.
        scale: Rational,
    },
}

/// The full mechanism: quantiser + calibrated exact noise.
#[derive(Clone, Debug)]
pub struct Mechanism {
    quantizer: Quantizer,
    kind: NoiseKind,
    sampler: Sampler,
}

/// opendp's discrete Gaussian on quantised vectors (zCDP, L2 sensitivity as `f64`).
pub type GaussianMeasurement = Measurement<
    VectorDomain<AtomDomain<i64>>,
    L2Distance<f64>,
    ZeroConcentratedDivergence,
    Vec<i64>,
>;
/// opendp's discrete Laplace on quantised vectors (pure DP, L1 sensitivity as `f64`).
pub type LaplaceMeasurement =
    Measurement<VectorDomain<AtomDomain<i64>>, L1Distance<f64>, MaxDivergence, Vec<i64>>;

fn vec_domain(n: usize) -> VectorDomain<AtomDomain<i64>> {
    VectorDomain::new(AtomDomain::<i64>::default()).with_size(n)
}

fn gaussian_meas(n: usize, sigma: f64) -> Result<GaussianMeasurement> {
    Ok(make_gaussian::<_, _, ZeroConcentratedDivergence>(
        vec_domain(n),
        L2Distance::<f64>::default(),
        sigma,
        None,
    )?)
}

fn laplace_meas(n: usize, scale: f64) -> Result<LaplaceMeasurement> {
    Ok(make_laplace::<_, _, MaxDivergence>(
        vec_domain(n),
        L1Distance::<f64>::default(),
        scale,
        None,
    )?)
}

/// ρ of opendp's `make_gaussian` map at sensitivity `l2` and scale `sigma`.
pub fn gaussian_rho(n: usize, l2: f64, sigma: f64) -> Result<f64> {
    Ok(gaussian_meas(n, sigma)?.map(&l2)?)
}

/// ε at the given δ of the Gaussian mechanism (opendp: zCDP → approx-DP → fix δ).
pub fn gaussian_epsilon(n: usize, l2: f64, sigma: f64, delta: f64) -> Result<f64> {
    let m = gaussian_meas(n, sigma)?;
    let approx = make_zCDP_to_approxDP(m)?;
    let fixed = make_fix_delta(&approx, delta)?;
    Ok(fixed.map(&l2)?.0)
}

/// ε at δ of a mechanism known to satisfy ρ-zCDP (opendp's conversion, via a carrier
/// measurement whose privacy map is the constant ρ).
pub fn rho_to_epsilon(rho: f64, delta: f64) -> Result<f64> {
    if !(rho.is_finite() && rho >= 0.0) {
        return Err(DpError::InvalidParameter(format!("rho {rho}")));
    }
    let carrier = Measurement::new(
        AtomDomain::<i64>::default(),
        opendp::metrics::AbsoluteDistance::<f64>::default(),
        ZeroConcentratedDivergence,
        Function::new(|x: &i64| *x),
        opendp::core::PrivacyMap::new(move |_d: &f64| rho),
    )?;
    let approx = make_zCDP_to_approxDP(carrier)?;
    let fixed = make_fix_delta(&approx, delta)?;
    Ok(fixed.map(&1.0)?.0)
}

/// The largest ρ (to relative precision 1e-9) whose zCDP→(ε,δ) conversion gives ≤ ε.
pub fn epsilon_delta_to_rho(epsilon: f64, delta: f64) -> Result<f64> {
    check_eps_delta(epsilon, delta)?;
    // ρ ≤ ε²/2 … and the classical bound ε = ρ + 2√(ρ ln 1/δ) gives a feasible start.
    let (mut lo, mut hi) = (0.0f64, epsilon * epsilon / 2.0 + epsilon);
    for _ in 0..200 {
        if hi - lo <= hi * 1e-12 {
            break;
        }
        let mid = 0.5 * (lo + hi);
        if rho_to_epsilon(mid, delta)? <= epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

fn check_eps_delta(epsilon: f64, delta: f64) -> Result<()> {
    if !(epsilon.is_finite() && epsilon > 0.0 && delta > 0.0 && delta < 1.0) {
        return Err(DpError::InvalidParameter(format!(
            "need ε > 0 finite and 0 < δ < 1, got ε={epsilon}, δ={delta}"
        )));
    }
    Ok(())
}

impl Mechanism {
    /// Discrete Gaussian with a given σ (the σ is rounded up to the dyadic grid).
    pub fn gaussian_with_sigma(quantizer: Quantizer, sigma: f64) -> Result<Self> {
        let sigma = Rational::ceil_dyadic(sigma)?;
        Ok(Mechanism {
            quantizer,
            kind: NoiseKind::Gaussian { sigma },
            sampler: Sampler::Gaussian(DiscreteGaussian::with_sigma(sigma)?),
        })
    }

    /// Discrete Laplace with a given scale (rounded up to the dyadic grid).
    pub fn laplace_with_scale(quantizer: Quantizer, scale: f64) -> Result<Self> {
        let scale = Rational::ceil_dyadic(scale)?;
        Ok(Mechanism {
            quantizer,
            kind: NoiseKind::Laplace { scale },
            sampler: Sampler::Laplace(DiscreteLaplace::new(scale)?),
        })
    }

    /// The smallest (dyadic) σ whose release costs ≤ ρ by opendp's map.
    pub fn gaussian_for_rho(quantizer: Quantizer, rho: f64) -> Result<Self> {
        if !(rho.is_finite() && rho > 0.0) {
            return Err(DpError::InvalidParameter(format!(
                "rho must be > 0, got {rho}"
            )));
        }
        let l2 = quantizer.sensitivity().l2;
        let mut sigma = l2 / (2.0 * rho).sqrt();
        for _ in 0..64 {
            let m = Self::gaussian_with_sigma(quantizer, sigma)?;
            if m.cost_rho()? <= rho {
                return Ok(m);
            }
            sigma = up(m.sigma_or_scale() * (1.0 + 1e-9));
        }
        Err(DpError::OpenDp(
            "gaussian calibration did not converge".into(),
        ))
    }

    /// The smallest σ (binary search on opendp's ε(δ) of the Gaussian) with ε(δ) ≤ ε.
    pub fn gaussian_for_epsilon_delta(
        quantizer: Quantizer,
        epsilon: f64,
        delta: f64,
    ) -> Result<Self> {
        check_eps_delta(epsilon, delta)?;
        let n = quantizer.dim();
        let l2 = quantizer.sensitivity().l2;
        let eps_at = |sigma: f64| gaussian_epsilon(n, l2, sigma, delta);
        let mut hi = l2 * (2.0 * (1.25 / delta).ln()).sqrt() / epsilon;
        while eps_at(hi)? > epsilon {
            hi *= 2.0;
            if !hi.is_finite() {
                return Err(DpError::InvalidParameter("calibration diverged".into()));
            }
        }
        let mut lo = hi / 64.0;
        while eps_at(lo)? <= epsilon && lo > 1e-9 {
            lo /= 2.0;
        }
        for _ in 0..100 {
            if hi - lo <= hi * 1e-10 {
                break;
            }
            let mid = 0.5 * (lo + hi);
            if eps_at(mid)? <= epsilon {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let m = Self::gaussian_with_sigma(quantizer, hi)?;
        // ceil_dyadic only increases σ, and ε(σ) is decreasing: re-check with opendp.
        if m.cost_epsilon(delta)? > epsilon {
            return Err(DpError::OpenDp(
                "gaussian (ε,δ) calibration check failed".into(),
            ));
        }
        Ok(m)
    }

    /// The release of a noise-trained bottleneck (issue 11, `specs/dp.md` §6): a `d`-vector
    /// normalised to unit L1 norm (`laplace = true`, discrete Laplace, pure ε-DP) or unit L2
    /// norm (discrete Gaussian at (ε, `delta`)), clip C = 1, grid `s = grid`. The device and
    /// the trainer both build the mechanism here, so training sees exactly what is released.
    ///
    /// # Errors
    /// [`DpError::InvalidParameter`] for a bad d, grid, ε or δ (a Gaussian needs `delta`).
    pub fn for_bottleneck(
        laplace: bool,
        d: usize,
        grid: f64,
        epsilon: f64,
        delta: Option<f64>,
    ) -> Result<Self> {
        if laplace {
            Mechanism::laplace_for_epsilon(Quantizer::new(Clip::L1(1.0), grid, d)?, epsilon)
        } else {
            let delta = delta.ok_or_else(|| {
                DpError::InvalidParameter("a Gaussian release needs delta".into())
            })?;
            Mechanism::gaussian_for_epsilon_delta(
                Quantizer::new(Clip::L2(1.0), grid, d)?,
                epsilon,
                delta,
            )
        }
    }

    /// The smallest (dyadic) Laplace scale with pure ε-DP by opendp's `make_laplace` map.
    pub fn laplace_for_epsilon(quantizer: Quantizer, epsilon: f64) -> Result<Self> {
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(DpError::InvalidParameter(format!(
                "epsilon must be > 0, got {epsilon}"
            )));
        }
        let l1 = quantizer.sensitivity().l1;
        let mut scale = l1 / epsilon;
        for _ in 0..64 {
            let m = Self::laplace_with_scale(quantizer, scale)?;
            if m.cost_pure_epsilon()?.is_some_and(|e| e <= epsilon) {
                return Ok(m);
            }
            scale = up(m.sigma_or_scale() * (1.0 + 1e-9));
        }
        Err(DpError::OpenDp(
            "laplace calibration did not converge".into(),
        ))
    }

    /// The quantiser.
    pub fn quantizer(&self) -> &Quantizer {
        &self.quantizer
    }

    /// The noise distribution and its scale.
    pub fn kind(&self) -> NoiseKind {
        self.kind
    }

    /// The exact sampler.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// σ (Gaussian) or b (Laplace) as f64 (exact).
    pub fn sigma_or_scale(&self) -> f64 {
        match self.kind {
            NoiseKind::Gaussian { sigma } => sigma.to_f64(),
            NoiseKind::Laplace { scale } => scale.to_f64(),
        }
    }

    /// Pure ε of a Laplace mechanism (opendp's `make_laplace` map), `None` for Gaussian.
    pub fn cost_pure_epsilon(&self) -> Result<Option<f64>> {
        match self.kind {
            NoiseKind::Laplace { scale } => Ok(Some(
                laplace_meas(self.quantizer.dim(), scale.to_f64())?
                    .map(&self.quantizer.sensitivity().l1)?,
            )),
            NoiseKind::Gaussian { .. } => Ok(None),
        }
    }

    /// zCDP cost ρ of one release: opendp's Gaussian map, or ε²/2 for pure ε-DP.
    pub fn cost_rho(&self) -> Result<f64> {
        match self.kind {
            NoiseKind::Gaussian { sigma } => gaussian_rho(
                self.quantizer.dim(),
                self.quantizer.sensitivity().l2,
                sigma.to_f64(),
            ),
            NoiseKind::Laplace { .. } => {
                let e = self.cost_pure_epsilon()?.unwrap_or(f64::INFINITY);
                Ok(up(e * e / 2.0))
            }
        }
    }

    /// The cost the ledger charges for one release: ρ, and for discrete Laplace also its pure
    /// ε (the ledger's pure track, `specs/dp.md` §5).
    ///
    /// # Errors
    /// As [`Mechanism::cost_rho`].
    pub fn cost(&self) -> Result<crate::ledger::Cost> {
        Ok(crate::ledger::Cost {
            rho: self.cost_rho()?,
            epsilon: self.cost_pure_epsilon()?,
        })
    }

    /// ε at δ of one release (Gaussian: opendp's zCDP → approx-DP conversion; Laplace: pure ε).
    pub fn cost_epsilon(&self, delta: f64) -> Result<f64> {
        match self.kind {
            NoiseKind::Gaussian { sigma } => gaussian_epsilon(
                self.quantizer.dim(),
                self.quantizer.sensitivity().l2,
                sigma.to_f64(),
                delta,
            ),
            NoiseKind::Laplace { .. } => Ok(self.cost_pure_epsilon()?.unwrap_or(f64::INFINITY)),
        }
    }

    /// Clip, quantise and noise `x`, consuming a ledger [`Receipt`] that must cover the cost.
    ///
    /// Obtain the receipt from [`crate::ledger::Accountant::charge`] *before* calling this: the
    /// charge is durable when the receipt exists, so the output may be sent right away.
    pub fn release(&self, x: &[f64], receipt: Receipt, rng: &mut SecureBits) -> Result<Vec<i64>> {
        let cost = self.cost_rho()?;
        if receipt.rho() < cost {
            return Err(DpError::ReceiptMismatch {
                receipt: receipt.rho(),
                cost,
            });
        }
        self.release_unaccounted(x, rng)
    }

    /// Clip, quantise and noise without a receipt (experiments, benchmarks, tests).
    pub fn release_unaccounted(&self, x: &[f64], rng: &mut SecureBits) -> Result<Vec<i64>> {
        let mut q = self.quantizer.quantize(x)?;
        self.sampler.add_noise(&mut q, rng)?;
        Ok(q)
    }

    /// The noise step alone as an opendp `Measurement` on quantised vectors, using our exact
    /// sampler and the privacy map of opendp's `make_gaussian` (zCDP).
    /// Evaluate `.map(&sensitivity().l2)` for the cost. `None` for Laplace.
    pub fn to_opendp(&self) -> Result<Option<GaussianMeasurement>> {
        let NoiseKind::Gaussian { sigma } = self.kind else {
            return Ok(None);
        };
        let reference = gaussian_meas(self.quantizer.dim(), sigma.to_f64())?;
        let sampler = self.sampler.clone();
        let function = Function::new_fallible(move |x: &Vec<i64>| {
            let failed = |_: DpError| {
                opendp::error::Error::from(opendp::error::ErrorVariant::FailedFunction)
            };
            let mut rng = SecureBits::new().map_err(failed)?;
            let mut out = x.clone();
            sampler.add_noise(&mut out, &mut rng).map_err(failed)?;
            Ok(out)
        });
        Ok(Some(Measurement::new(
            reference.input_domain.clone(),
            reference.input_metric.clone(),
            ZeroConcentratedDivergence,
            function,
            reference.privacy_map.clone(),
        )?))
    }
}

/// Wall-clock milliseconds to draw noise for one `mech.quantizer().dim()`-long vector,
/// for each of `runs` runs (after one warm-up run). Randomness refills are included.
pub fn bench_noise_ms(mech: &Mechanism, runs: usize) -> Result<Vec<f64>> {
    let mut rng = SecureBits::new()?;
    let n = mech.quantizer().dim();
    let _ = mech.sampler().noise_vec(n, &mut rng)?;
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = std::time::Instant::now();
        let v = mech.sampler().noise_vec(n, &mut rng)?;
        out.push(t0.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(v);
    }
    Ok(out)
}
