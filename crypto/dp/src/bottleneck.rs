//! Noise-aware training with a split bottleneck (cargo feature `tools`; issue 11).
//!
//! Network: `input (n) → dense h + ReLU → dense d (linear bottleneck) → normalise to unit
//! L1 (Laplace) or L2 (Gaussian) norm` on the device, then the exact mechanism
//! ([`Mechanism::release_unaccounted`]: clip `C = 1`, grid `s =` [`GRID`], exact discrete noise)
//! and `dense h + ReLU → dense k + softmax` in the cloud. Because the normalised vector always
//! has norm 1, the clip never changes it and the noise is sized for substituting it by any
//! other unit vector (sensitivity in `specs/dp.md` §2).
//!
//! Training (Adam, batch 32, seed [`SEED`]): [`CLEAN_EPOCHS`] epochs without noise, then one
//! variant per ε: [`RAMP_EPOCHS`] epochs in which the exact noise draw is multiplied by
//! `λ = (e+1)/RAMP_EPOCHS` (learning rate 3e-3), then [`FULL_EPOCHS`] epochs with the exact
//! calibrated noise (λ = 1, learning rate 2e-3); the clean phase uses 2e-3. Gradients pass straight through the rounding and the additive noise.
//!
//! The bottleneck width `d` is chosen from [`DIMS`] on a validation split carved from the
//! training rows (the last 20 % of the shuffled training set) at ε = [`SELECT_EPSILON`] with
//! discrete Laplace; the test split is never used for any choice.

use crate::error::{DpError, Result};
use crate::mechanism::{Clip, Mechanism, Quantizer};
use crate::rng::SecureBits;
use crate::utility::{accuracy, split, Dataset, SplitMix, DELTA, NOISE_REPEATS, SEED};
use ndarray::{Array1, Array2, Axis};

/// Candidate bottleneck widths, chosen on the validation split.
pub const DIMS: [usize; 4] = [4, 8, 12, 16];
/// ε (per release, discrete Laplace) at which the bottleneck width is chosen.
pub const SELECT_EPSILON: f64 = 8.0;
/// Grid scale `s` (clip bound C = 1).
pub const GRID: f64 = 256.0;
/// Hidden width on each side of the split.
pub const HIDDEN: usize = 64;
/// Epochs of clean training before noise is injected.
pub const CLEAN_EPOCHS: usize = 60;
/// Epochs over which the noise is ramped from 0 to its calibrated size.
pub const RAMP_EPOCHS: usize = 40;
/// Epochs with the exact calibrated noise.
pub const FULL_EPOCHS: usize = 500;
/// The ε sweep of the trained pipeline; `None` = no noise.
pub const EPSILONS: [Option<f64>; 7] = [
    Some(1.0),
    Some(2.0),
    Some(4.0),
    Some(8.0),
    Some(16.0),
    Some(32.0),
    None,
];

/// Noise distribution on the split activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// L1-normalised bottleneck, discrete Laplace, pure ε-DP.
    Laplace,
    /// L2-normalised bottleneck, discrete Gaussian at (ε, δ = [`DELTA`]).
    Gaussian,
}

impl Channel {
    /// `laplace` or `gaussian`.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Laplace => "laplace",
            Channel::Gaussian => "gaussian",
        }
    }

    fn quantizer(self, d: usize, grid: f64) -> Result<Quantizer> {
        let clip = match self {
            Channel::Laplace => Clip::L1(1.0),
            Channel::Gaussian => Clip::L2(1.0),
        };
        Quantizer::new(clip, grid, d)
    }

    /// The calibrated mechanism on a `d`-wide bottleneck on the grid [`GRID`] (`None` for no
    /// noise).
    pub fn mechanism(self, d: usize, epsilon: Option<f64>) -> Result<Option<Mechanism>> {
        self.mechanism_at(d, epsilon, GRID)
    }

    /// The calibrated mechanism on a `d`-wide bottleneck on the grid `s = grid` (clip C = 1;
    /// `None` for no noise).
    pub fn mechanism_at(
        self,
        d: usize,
        epsilon: Option<f64>,
        grid: f64,
    ) -> Result<Option<Mechanism>> {
        let q = self.quantizer(d, grid)?;
        epsilon
            .map(|e| match self {
                Channel::Laplace => Mechanism::laplace_for_epsilon(q, e),
                Channel::Gaussian => Mechanism::gaussian_for_epsilon_delta(q, e, DELTA),
            })
            .transpose()
    }
}

/// One point of the trained pipeline's curve.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainedPoint {
    /// ε per release (`None`: no noise).
    pub epsilon: Option<f64>,
    /// Noise distribution.
    pub channel: Channel,
    /// Bottleneck width.
    pub dim: usize,
    /// Test accuracy averaged over [`NOISE_REPEATS`] noise draws.
    pub accuracy: f64,
    /// Noise scale on the grid (σ or b; 0 for no noise).
    pub scale: f64,
}

/// Four dense layers: device `n→h` (ReLU), `h→d` (linear, normalised); cloud `d→h` (ReLU),
/// `h→k`.
#[derive(Clone, Debug)]
struct Net {
    w: Vec<Array2<f64>>,
    b: Vec<Array1<f64>>,
    mw: Vec<Array2<f64>>,
    vw: Vec<Array2<f64>>,
    mb: Vec<Array1<f64>>,
    vb: Vec<Array1<f64>>,
    step: i32,
    channel: Channel,
    /// Grid `s` of the release.
    grid: f64,
    /// Released integers are clamped to `±clamp` (post-processing; `f64::INFINITY`: none).
    clamp: f64,
}

struct Fwd {
    z1: Array2<f64>,
    a1: Array2<f64>,
    z2: Array2<f64>,
    norm: Array1<f64>,
    u: Array2<f64>,
    v: Array2<f64>,
    z3: Array2<f64>,
    a3: Array2<f64>,
    logits: Array2<f64>,
}

impl Net {
    fn new(sizes: [usize; 5], channel: Channel, seed: u64) -> Self {
        Self::new_at(sizes, channel, seed, GRID, f64::INFINITY)
    }

    fn new_at(sizes: [usize; 5], channel: Channel, seed: u64, grid: f64, clamp: f64) -> Self {
        let mut rng = SplitMix(seed);
        let mut w = Vec::new();
        let mut b = Vec::new();
        for i in 0..4 {
            let (fi, fo) = (sizes[i], sizes[i + 1]);
            let a = (6.0 / (fi + fo) as f64).sqrt();
            w.push(Array2::from_shape_fn((fi, fo), |_| {
                (2.0 * rng.unit() - 1.0) * a
            }));
            b.push(Array1::zeros(fo));
        }
        let mw = w.iter().map(|m| Array2::zeros(m.raw_dim())).collect();
        let vw = w.iter().map(|m| Array2::zeros(m.raw_dim())).collect();
        let mb = b.iter().map(|m| Array1::zeros(m.raw_dim())).collect();
        let vb = b.iter().map(|m| Array1::zeros(m.raw_dim())).collect();
        Net {
            w,
            b,
            mw,
            vw,
            mb,
            vb,
            step: 0,
            channel,
            grid,
            clamp,
        }
    }

    fn dim(&self) -> usize {
        self.b[1].len()
    }

    /// Device part: the unit-norm bottleneck activations (and intermediates).
    fn device(&self, x: &Array2<f64>) -> (Array2<f64>, Array2<f64>, Array2<f64>, Array1<f64>) {
        let z1 = x.dot(&self.w[0]) + &self.b[0];
        let a1 = z1.mapv(|v| v.max(0.0));
        let z2 = a1.dot(&self.w[1]) + &self.b[1];
        let norm: Array1<f64> = z2
            .rows()
            .into_iter()
            .map(|r| match self.channel {
                Channel::Laplace => r.iter().map(|v| v.abs()).sum::<f64>(),
                Channel::Gaussian => r.dot(&r).sqrt(),
            })
            .map(|n| n.max(1e-9))
            .collect();
        (z1, z2, a1, norm)
    }

    fn forward(
        &self,
        x: &Array2<f64>,
        noise: &mut dyn FnMut(&mut Array2<f64>) -> Result<()>,
    ) -> Result<Fwd> {
        let (z1, z2, a1, norm) = self.device(x);
        let u = &z2 / &norm.view().insert_axis(Axis(1));
        let mut v = u.clone();
        noise(&mut v)?;
        let z3 = v.dot(&self.w[2]) + &self.b[2];
        let a3 = z3.mapv(|t| t.max(0.0));
        let logits = a3.dot(&self.w[3]) + &self.b[3];
        Ok(Fwd {
            z1,
            a1,
            z2,
            norm,
            u,
            v,
            z3,
            a3,
            logits,
        })
    }

    fn predict(
        &self,
        x: &Array2<f64>,
        noise: &mut dyn FnMut(&mut Array2<f64>) -> Result<()>,
    ) -> Result<Vec<usize>> {
        let f = self.forward(x, noise)?;
        Ok(f.logits
            .rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &v)| {
                        if v > bv {
                            (i, v)
                        } else {
                            (bi, bv)
                        }
                    })
                    .0
            })
            .collect())
    }

    fn adam(&mut self, gw: Vec<Array2<f64>>, gb: Vec<Array1<f64>>, lr: f64) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        self.step += 1;
        let c1 = 1.0 - B1.powi(self.step);
        let c2 = 1.0 - B2.powi(self.step);
        for (i, g) in gw.iter().enumerate() {
            self.mw[i].zip_mut_with(g, |m, &g| *m = B1 * *m + (1.0 - B1) * g);
            self.vw[i].zip_mut_with(g, |v, &g| *v = B2 * *v + (1.0 - B2) * g * g);
            let (m, v) = (&self.mw[i], &self.vw[i]);
            ndarray::Zip::from(&mut self.w[i])
                .and(m)
                .and(v)
                .for_each(|w, &m, &v| *w -= lr * (m / c1) / ((v / c2).sqrt() + 1e-8));
        }
        for (i, g) in gb.iter().enumerate() {
            self.mb[i].zip_mut_with(g, |m, &g| *m = B1 * *m + (1.0 - B1) * g);
            self.vb[i].zip_mut_with(g, |v, &g| *v = B2 * *v + (1.0 - B2) * g * g);
            let (m, v) = (&self.mb[i], &self.vb[i]);
            ndarray::Zip::from(&mut self.b[i])
                .and(m)
                .and(v)
                .for_each(|w, &m, &v| *w -= lr * (m / c1) / ((v / c2).sqrt() + 1e-8));
        }
    }

    /// Gradients of the mean softmax cross-entropy over the batch `(xb, y)` with `noise`
    /// applied at the split (straight through).
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        xb: &Array2<f64>,
        y: &[usize],
        noise: &mut dyn FnMut(&mut Array2<f64>) -> Result<()>,
    ) -> Result<(Vec<Array2<f64>>, Vec<Array1<f64>>)> {
        let f = self.forward(xb, noise)?;
        let mut g = f.logits.clone();
        for (r, mut row) in g.rows_mut().into_iter().enumerate() {
            let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            row.mapv_inplace(|v| (v - m).exp());
            let s = row.sum();
            row /= s;
            row[y[r]] -= 1.0;
        }
        g /= y.len() as f64;
        let gw3 = f.a3.t().dot(&g);
        let gb3 = g.sum_axis(Axis(0));
        let mut g3 = g.dot(&self.w[3].t());
        g3.zip_mut_with(&f.z3, |d, &z| {
            if z <= 0.0 {
                *d = 0.0
            }
        });
        let gw2 = f.v.t().dot(&g3);
        let gb2 = g3.sum_axis(Axis(0));
        // Straight through rounding and noise: ∂v/∂u = I.
        let gu = g3.dot(&self.w[2].t());
        // u = z/‖z‖: ∂L/∂z = (g − (g·u)·∂‖z‖/∂z)/‖z‖ with ∂‖z‖₁/∂z = sign z, ∂‖z‖₂/∂z = u.
        let mut gz = gu.clone();
        for (r, mut row) in gz.rows_mut().into_iter().enumerate() {
            let ur = f.u.row(r);
            let dot = row.dot(&ur);
            let n = f.norm[r];
            for (j, gv) in row.iter_mut().enumerate() {
                let dn = match self.channel {
                    Channel::Laplace => f.z2[[r, j]].signum(),
                    Channel::Gaussian => ur[j],
                };
                *gv = (*gv - dot * dn) / n;
            }
        }
        let gw1 = f.a1.t().dot(&gz);
        let gb1 = gz.sum_axis(Axis(0));
        let mut g1 = gz.dot(&self.w[1].t());
        g1.zip_mut_with(&f.z1, |d, &z| {
            if z <= 0.0 {
                *d = 0.0
            }
        });
        let gw0 = xb.t().dot(&g1);
        let gb0 = g1.sum_axis(Axis(0));
        Ok((vec![gw0, gw1, gw2, gw3], vec![gb0, gb1, gb2, gb3]))
    }

    /// One epoch of Adam on softmax cross-entropy with `noise` applied at the split.
    fn epoch(
        &mut self,
        x: &Array2<f64>,
        y: &[usize],
        lr: f64,
        order_seed: u64,
        noise: &mut dyn FnMut(&mut Array2<f64>) -> Result<()>,
    ) -> Result<()> {
        let mut idx: Vec<usize> = (0..y.len()).collect();
        SplitMix(order_seed).shuffle(&mut idx);
        for chunk in idx.chunks(32) {
            let xb = x.select(Axis(0), chunk);
            let yb: Vec<usize> = chunk.iter().map(|&i| y[i]).collect();
            let (gw, gb) = self.grads(&xb, &yb, noise)?;
            self.adam(gw, gb, lr);
        }
        Ok(())
    }
}

/// Applies the mechanism (exact) to each row of unit-norm activations, with the noise scaled
/// by `lambda` (1 = the calibrated mechanism), and maps back to activation units.
fn channel_noise(
    q: &Quantizer,
    mech: Option<&Mechanism>,
    lambda: f64,
    clamp: f64,
    rng: &mut SecureBits,
    m: &mut Array2<f64>,
) -> Result<()> {
    let s = q.scale();
    for mut row in m.rows_mut() {
        let v: Vec<f64> = row.to_vec();
        let z = q.quantize(&v)?;
        let noise = match mech {
            Some(mech) => mech.sampler().noise_vec(z.len(), rng)?,
            None => vec![0; z.len()],
        };
        for ((dst, zi), ni) in row.iter_mut().zip(z).zip(noise) {
            *dst = (zi as f64 + lambda * ni as f64).clamp(-clamp, clamp) / s;
        }
    }
    Ok(())
}

fn clean_net(
    x: &Array2<f64>,
    y: &[usize],
    classes: usize,
    d: usize,
    channel: Channel,
) -> Result<Net> {
    let n = x.ncols();
    clean_from(
        Net::new([n, HIDDEN, d, HIDDEN, classes], channel, SEED),
        x,
        y,
    )
}

fn clean_from(mut net: Net, x: &Array2<f64>, y: &[usize]) -> Result<Net> {
    let q = net.channel.quantizer(net.dim(), net.grid)?;
    let clamp = net.clamp;
    let mut rng = SecureBits::new()?;
    for e in 0..CLEAN_EPOCHS {
        net.epoch(x, y, 2e-3, SEED + e as u64, &mut |m| {
            channel_noise(&q, None, 0.0, clamp, &mut rng, m)
        })?;
    }
    Ok(net)
}

/// Fine-tunes a copy of `clean` with the calibrated noise ramped in.
fn noise_train(clean: &Net, x: &Array2<f64>, y: &[usize], mech: Option<&Mechanism>) -> Result<Net> {
    let mut net = clean.clone();
    let Some(mech) = mech else {
        return Ok(net);
    };
    let q = *mech.quantizer();
    let clamp = net.clamp;
    let mut rng = SecureBits::new()?;
    for e in 0..RAMP_EPOCHS + FULL_EPOCHS {
        let lambda = ((e + 1) as f64 / RAMP_EPOCHS as f64).min(1.0);
        let lr = if e < RAMP_EPOCHS { 3e-3 } else { 2e-3 };
        net.epoch(x, y, lr, SEED + 1000 + e as u64, &mut |m| {
            channel_noise(&q, Some(mech), lambda, clamp, &mut rng, m)
        })?;
    }
    Ok(net)
}

fn evaluate(net: &Net, x: &Array2<f64>, y: &[usize], mech: Option<&Mechanism>) -> Result<f64> {
    let q = net.channel.quantizer(net.dim(), net.grid)?;
    let clamp = net.clamp;
    let mut rng = SecureBits::new()?;
    let mut acc = 0.0;
    for _ in 0..NOISE_REPEATS {
        let pred = net.predict(x, &mut |m| match mech {
            // The release exactly as the device makes it.
            Some(mech) => {
                for mut row in m.rows_mut() {
                    let v: Vec<f64> = row.to_vec();
                    let z = mech.release_unaccounted(&v, &mut rng)?;
                    for (dst, zi) in row.iter_mut().zip(z) {
                        *dst = (zi as f64).clamp(-clamp, clamp) / q.scale();
                    }
                }
                Ok(())
            }
            None => channel_noise(&q, None, 0.0, clamp, &mut rng, m),
        })?;
        acc += accuracy(&pred, y);
    }
    Ok(acc / NOISE_REPEATS as f64)
}

/// The bottleneck width with the best validation accuracy at [`SELECT_EPSILON`] (Laplace),
/// the validation split being the last 20 % of the training rows. Returns `(d, accuracy)`
/// per candidate as well.
pub fn choose_dim(ds: &Dataset) -> Result<(usize, Vec<(usize, f64)>)> {
    choose_dim_at(ds, GRID, f64::INFINITY)
}

/// [`choose_dim`] with the release on the grid `grid` and clamped to `±clamp` (as
/// [`train_variants`]).
///
/// # Errors
/// [`DpError::InvalidParameter`] for a bad grid.
pub fn choose_dim_at(ds: &Dataset, grid: f64, clamp: f64) -> Result<(usize, Vec<(usize, f64)>)> {
    let sp = split(ds);
    let n = sp.y_train.len();
    let n_fit = n * 4 / 5;
    let rows: Vec<usize> = (0..n).collect();
    let x_fit = sp.x_train.select(Axis(0), &rows[..n_fit]);
    let x_val = sp.x_train.select(Axis(0), &rows[n_fit..]);
    let (y_fit, y_val) = sp.y_train.split_at(n_fit);
    let mut scores = Vec::new();
    for d in DIMS {
        let n = x_fit.ncols();
        let net = Net::new_at(
            [n, HIDDEN, d, HIDDEN, ds.classes],
            Channel::Laplace,
            SEED,
            grid,
            clamp,
        );
        let clean = clean_from(net, &x_fit, y_fit)?;
        let mech = Channel::Laplace.mechanism_at(d, Some(SELECT_EPSILON), grid)?;
        let net = noise_train(&clean, &x_fit, y_fit, mech.as_ref())?;
        scores.push((d, evaluate(&net, &x_val, y_val, mech.as_ref())?));
    }
    let best = scores
        .iter()
        .copied()
        .fold((0, f64::NEG_INFINITY), |b, s| if s.1 > b.1 { s } else { b });
    if best.0 == 0 {
        return Err(DpError::InvalidParameter("no bottleneck width".into()));
    }
    Ok((best.0, scores))
}

/// Accuracy vs ε of the trained pipeline for one channel and bottleneck width `d`: one
/// variant per ε of [`EPSILONS`], trained on the whole training split, tested on the test
/// split.
pub fn trained_curve(ds: &Dataset, channel: Channel, d: usize) -> Result<Vec<TrainedPoint>> {
    let sp = split(ds);
    let clean = clean_net(&sp.x_train, &sp.y_train, ds.classes, d, channel)?;
    let mut out = Vec::new();
    for eps in EPSILONS {
        let mech = channel.mechanism(d, eps)?;
        let net = noise_train(&clean, &sp.x_train, &sp.y_train, mech.as_ref())?;
        out.push(TrainedPoint {
            epsilon: eps,
            channel,
            dim: d,
            accuracy: evaluate(&net, &sp.x_test, &sp.y_test, mech.as_ref())?,
            scale: mech.as_ref().map_or(0.0, |m| m.sigma_or_scale()),
        });
    }
    Ok(out)
}

/// One dense layer of a trained variant: `y = W·x + b`, `W` row-major `[n_out][n_in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseWeights {
    /// Input length.
    pub n_in: usize,
    /// Output length.
    pub n_out: usize,
    /// Weights, row-major `[n_out][n_in]`.
    pub w: Vec<f64>,
    /// Bias, length `n_out`.
    pub b: Vec<f64>,
}

/// A variant trained for one ε, as it goes into a signed bundle (`tandem privacy-train`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainedVariant {
    /// ε per release it was trained for.
    pub epsilon: f64,
    /// The four layers: device `n → h` (ReLU), device `h → d` (bottleneck, normalised),
    /// cloud `d → h` (ReLU), head `h → k`.
    pub layers: [DenseWeights; 4],
    /// Test accuracy of the float net with the exact mechanism (mean of
    /// [`NOISE_REPEATS`] draws).
    pub float_test_accuracy: f64,
}

/// Trains one variant per ε in `epsilons` for bundles (issue 11): the schedule of
/// [`trained_curve`] (clean phase shared, then ramp and full noise per ε) on the whole
/// training split, with the release on the grid `grid` and the released integers clamped to
/// `±clamp` (post-processing, what an int8 cloud layer takes), so training sees exactly what
/// the device releases.
///
/// # Errors
/// [`DpError::InvalidParameter`] for a bad ε or grid.
pub fn train_variants(
    ds: &Dataset,
    channel: Channel,
    d: usize,
    grid: f64,
    clamp: f64,
    epsilons: &[f64],
) -> Result<Vec<TrainedVariant>> {
    let sp = split(ds);
    let n = sp.x_train.ncols();
    let net = Net::new_at(
        [n, HIDDEN, d, HIDDEN, ds.classes],
        channel,
        SEED,
        grid,
        clamp,
    );
    let clean = clean_from(net, &sp.x_train, &sp.y_train)?;
    let mut out = Vec::new();
    for &eps in epsilons {
        let mech = channel.mechanism_at(d, Some(eps), grid)?;
        let net = noise_train(&clean, &sp.x_train, &sp.y_train, mech.as_ref())?;
        let acc = evaluate(&net, &sp.x_test, &sp.y_test, mech.as_ref())?;
        let dense = |i: usize| {
            let w = &net.w[i];
            DenseWeights {
                n_in: w.nrows(),
                n_out: w.ncols(),
                w: w.t().iter().copied().collect(),
                b: net.b[i].to_vec(),
            }
        };
        out.push(TrainedVariant {
            epsilon: eps,
            layers: [dense(0), dense(1), dense(2), dense(3)],
            float_test_accuracy: acc,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn loss(net: &Net, x: &Array2<f64>, y: &[usize]) -> f64 {
        let f = net.forward(x, &mut |_| Ok(())).unwrap();
        let mut l = 0.0;
        for (r, row) in f.logits.rows().into_iter().enumerate() {
            let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
            l += -(row[y[r]] - m - z.ln());
        }
        l / y.len() as f64
    }

    /// The hand-written backward pass (through both normalisations) agrees with central
    /// finite differences of the loss on every weight of a small net.
    #[test]
    fn gradients_match_finite_differences() {
        for channel in [Channel::Laplace, Channel::Gaussian] {
            let mut net = Net::new([5, 6, 3, 4, 3], channel, 7);
            let mut rng = SplitMix(3);
            for b in net.b.iter_mut() {
                b.mapv_inplace(|_| rng.unit() - 0.5);
            }
            let x = Array2::from_shape_fn((4, 5), |_| 2.0 * rng.unit() - 1.0);
            let y = [0usize, 2, 1, 2];
            let (gw, gb) = net.grads(&x, &y, &mut |_| Ok(())).unwrap();
            let h = 1e-6;
            for l in 0..4 {
                for idx in 0..net.w[l].len() {
                    let (i, j) = (idx / net.w[l].ncols(), idx % net.w[l].ncols());
                    let mut p = net.clone();
                    p.w[l][[i, j]] += h;
                    let mut m = net.clone();
                    m.w[l][[i, j]] -= h;
                    let fd = (loss(&p, &x, &y) - loss(&m, &x, &y)) / (2.0 * h);
                    let an = gw[l][[i, j]];
                    assert!(
                        (fd - an).abs() < 1e-5 * (1.0 + fd.abs()),
                        "{channel:?} w{l}[{i},{j}]: fd {fd} vs {an}"
                    );
                }
                for (j, &an) in gb[l].iter().enumerate() {
                    let mut p = net.clone();
                    p.b[l][j] += h;
                    let mut m = net.clone();
                    m.b[l][j] -= h;
                    let fd = (loss(&p, &x, &y) - loss(&m, &x, &y)) / (2.0 * h);
                    assert!(
                        (fd - an).abs() < 1e-5 * (1.0 + fd.abs()),
                        "{channel:?} b{l}[{j}]"
                    );
                }
            }
        }
    }

    /// The released vector of the trained pipeline is the mechanism's: unit-norm activations
    /// are never changed by the clip, so the quantised vector stays within the integer cap
    /// and the sensitivity used for calibration is `2·cap` (specs/dp.md §2).
    #[test]
    fn bottleneck_release_is_the_calibrated_mechanism() {
        let mech = Channel::Laplace.mechanism(8, Some(8.0)).unwrap().unwrap();
        let q = mech.quantizer();
        // cap = ⌊s + min(d, 2s)/2⌋ = 256 + 4; Δ₁ = 2·260, b = Δ₁/ε rounded up.
        assert_eq!(q.sensitivity().l1, crate::mechanism::up(520.0));
        assert!(mech.sigma_or_scale() >= 520.0 / 8.0);
        assert!(mech.sigma_or_scale() <= 520.0 / 8.0 * (1.0 + 1e-6));
        let eps = mech.cost_pure_epsilon().unwrap().unwrap();
        assert!((8.0 * (1.0 - 1e-6)..=8.0).contains(&eps), "charged ε {eps}");
    }
}
