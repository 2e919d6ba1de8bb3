//! Utility of noised split activations on real data (UCI digits, Wisconsin breast cancer).
//!
//! Deterministic setup (everything but the DP noise, which comes from the secure sampler):
//! * split: rows shuffled by Fisher–Yates with SplitMix64 seeded **42**; first 70 % train,
//!   last 30 % test; features standardised with the training mean/std;
//! * model: `input (d) → dense h + ReLU (device) → [clip L2 ≤ C, quantise s, noise] →
//!   dense k + softmax (cloud)`, trained by minibatch SGD (batch 32, seed 42) on clean data;
//! * C = 90th percentile of the training activations' L2 norms, s = 128 / C;
//! * noise: discrete Gaussian calibrated with opendp to (ε, δ = 1e-5) per released vector
//!   (local DP: any two inputs of one device are neighbours);
//! * "noise-aware head": the cloud layer is fine-tuned on training activations noised by the
//!   same (public) mechanism — the server can do this without any private data;
//! * accuracy on the test split, averaged over [`NOISE_REPEATS`] independent noise draws.
//!
//! [`NoisePoint::Input`] puts the mechanism on the standardised input features instead
//! (device = identity, cloud = the whole MLP), to show how dimension drives the cost.

use crate::error::{DpError, Result};
use crate::mechanism::{Clip, Mechanism, Quantizer};
use crate::rng::SecureBits;
use ndarray::{Array1, Array2, Axis};
use std::path::{Path, PathBuf};

/// δ used for every (ε, δ) point of the curve.
pub const DELTA: f64 = 1e-5;
/// The ε sweep; `None` is ε = ∞ (clip + quantise, no noise).
/// The sweep runs past the usual range (32) to show where local DP on a whole activation
/// vector starts to recover accuracy (opendp's calibration overflows at δ = 1e-5 near ε = 64).
pub const EPSILONS: [Option<f64>; 8] = [
    Some(0.5),
    Some(1.0),
    Some(2.0),
    Some(4.0),
    Some(8.0),
    Some(16.0),
    Some(32.0),
    None,
];
/// Independent noise draws averaged per accuracy figure.
pub const NOISE_REPEATS: usize = 5;
/// Seed of the split and of the initialisation.
pub const SEED: u64 = 42;

/// A labelled dataset.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Name (`digits` or `breast_cancer`).
    pub name: String,
    /// Features, one row per example.
    pub x: Array2<f64>,
    /// Labels in `0..classes`.
    pub y: Vec<usize>,
    /// Number of classes.
    pub classes: usize,
}

/// Where the datasets are looked for: `$TANDEM_DATA_DIR`, `./data`, then the repository's
/// `data/` (known at compile time).
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_DATA_DIR") {
        return PathBuf::from(d);
    }
    let local = PathBuf::from("data");
    if local.join("breast_cancer.csv").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data")
}

fn ds_err(path: &Path, reason: impl Into<String>) -> DpError {
    DpError::Dataset {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn parse_csv(path: &Path, text: &str, skip_header: bool) -> Result<(Array2<f64>, Vec<usize>)> {
    let mut rows: Vec<f64> = Vec::new();
    let mut y = Vec::new();
    let mut width = None;
    for (i, line) in text.lines().enumerate() {
        if (skip_header && i == 0) || line.trim().is_empty() {
            continue;
        }
        let vals: Vec<&str> = line.split(',').collect();
        let (label, feats) = vals
            .split_last()
            .ok_or_else(|| ds_err(path, format!("line {}: empty", i + 1)))?;
        if *width.get_or_insert(feats.len()) != feats.len() || feats.is_empty() {
            return Err(ds_err(path, format!("line {}: ragged row", i + 1)));
        }
        for f in feats {
            let v: f64 = f
                .trim()
                .parse()
                .map_err(|_| ds_err(path, format!("line {}: bad number {f:?}", i + 1)))?;
            rows.push(v);
        }
        let l: f64 = label
            .trim()
            .parse()
            .map_err(|_| ds_err(path, format!("line {}: bad label", i + 1)))?;
        if !(0.0..1000.0).contains(&l) || l.fract() != 0.0 {
            return Err(ds_err(path, format!("line {}: bad label", i + 1)));
        }
        y.push(l as usize);
    }
    let w = width.ok_or_else(|| ds_err(path, "no rows"))?;
    let x = Array2::from_shape_vec((y.len(), w), rows).map_err(|e| ds_err(path, e.to_string()))?;
    Ok((x, y))
}

impl Dataset {
    /// Loads `digits` (from `digits.csv.gz`) or `breast_cancer` (`breast_cancer.csv`).
    pub fn load(name: &str, dir: &Path) -> Result<Self> {
        let (path, text, header) = match name {
            "digits" => {
                let path = dir.join("digits.csv.gz");
                let f = std::fs::File::open(&path).map_err(|source| DpError::Io {
                    path: path.clone(),
                    source,
                })?;
                let mut s = String::new();
                std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(f), &mut s)
                    .map_err(|e| ds_err(&path, e.to_string()))?;
                (path, s, false)
            }
            "breast_cancer" | "breast-cancer" => {
                let path = dir.join("breast_cancer.csv");
                let s = std::fs::read_to_string(&path).map_err(|source| DpError::Io {
                    path: path.clone(),
                    source,
                })?;
                (path, s, true)
            }
            other => {
                return Err(DpError::InvalidParameter(format!(
                    "unknown dataset {other:?} (digits, breast_cancer)"
                )))
            }
        };
        let (x, y) = parse_csv(&path, &text, header)?;
        let classes = y.iter().max().map_or(0, |m| m + 1);
        Ok(Dataset {
            name: if name == "digits" {
                "digits"
            } else {
                "breast_cancer"
            }
            .into(),
            x,
            y,
            classes,
        })
    }
}

/// Deterministic SplitMix64 (splits and initialisation only; never for DP noise).
#[derive(Clone, Debug)]
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Train/test split, standardised.
#[derive(Clone, Debug)]
pub struct Split {
    /// Training features.
    pub x_train: Array2<f64>,
    /// Training labels.
    pub y_train: Vec<usize>,
    /// Test features.
    pub x_test: Array2<f64>,
    /// Test labels.
    pub y_test: Vec<usize>,
}

/// The fixed 70/30 split with seed 42, standardised with training statistics.
pub fn split(ds: &Dataset) -> Split {
    let n = ds.y.len();
    let mut idx: Vec<usize> = (0..n).collect();
    SplitMix(SEED).shuffle(&mut idx);
    let n_train = n * 7 / 10;
    let take = |ids: &[usize]| {
        let x = ds.x.select(Axis(0), ids);
        let y: Vec<usize> = ids.iter().map(|&i| ds.y[i]).collect();
        (x, y)
    };
    let (mut x_train, y_train) = take(&idx[..n_train]);
    let (mut x_test, y_test) = take(&idx[n_train..]);
    let mean = x_train
        .mean_axis(Axis(0))
        .unwrap_or_else(|| Array1::zeros(ds.x.ncols()));
    let std = x_train
        .std_axis(Axis(0), 0.0)
        .mapv(|v| if v > 1e-12 { v } else { 1.0 });
    for m in [&mut x_train, &mut x_test] {
        *m -= &mean;
        *m /= &std;
    }
    Split {
        x_train,
        y_train,
        x_test,
        y_test,
    }
}

/// A small fully connected network (ReLU between layers, softmax output).
#[derive(Clone, Debug)]
pub struct Mlp {
    layers: Vec<(Array2<f64>, Array1<f64>)>,
}

impl Mlp {
    /// Layer sizes `[d, h1, …, k]`, weights uniform in ±1/√fan_in from `seed`.
    pub fn new(sizes: &[usize], seed: u64) -> Self {
        let mut rng = SplitMix(seed);
        let layers = sizes
            .windows(2)
            .map(|w| {
                let a = 1.0 / (w[0] as f64).sqrt();
                let wm = Array2::from_shape_fn((w[0], w[1]), |_| (2.0 * rng.unit() - 1.0) * a);
                (wm, Array1::zeros(w[1]))
            })
            .collect();
        Mlp { layers }
    }

    fn forward_all(&self, x: &Array2<f64>) -> Vec<Array2<f64>> {
        let mut acts = vec![x.clone()];
        for (i, (w, b)) in self.layers.iter().enumerate() {
            let mut z = acts[acts.len() - 1].dot(w) + b;
            if i + 1 < self.layers.len() {
                z.mapv_inplace(|v| v.max(0.0));
            }
            acts.push(z);
        }
        acts
    }

    /// Logits.
    pub fn logits(&self, x: &Array2<f64>) -> Array2<f64> {
        self.forward_all(x).pop().unwrap_or_else(|| x.clone())
    }

    /// Predicted classes.
    pub fn predict(&self, x: &Array2<f64>) -> Vec<usize> {
        self.logits(x)
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
            .collect()
    }

    /// Splits after the first layer: `(device part, cloud part)`.
    pub fn split_first(&self) -> (Mlp, Mlp) {
        let (first, rest) = self.layers.split_at(1.min(self.layers.len()));
        (
            Mlp {
                layers: first.to_vec(),
            },
            Mlp {
                layers: rest.to_vec(),
            },
        )
    }

    /// Hidden activations of a one-layer "device" net (ReLU applied).
    pub fn device_forward(&self, x: &Array2<f64>) -> Array2<f64> {
        match self.layers.first() {
            Some((w, b)) => (x.dot(w) + b).mapv(|v| v.max(0.0)),
            None => x.clone(),
        }
    }

    /// One epoch of minibatch SGD on softmax cross-entropy; `transform` is applied to each
    /// minibatch's inputs first (e.g. fresh DP noise).
    pub fn train_epoch(
        &mut self,
        x: &Array2<f64>,
        y: &[usize],
        lr: f64,
        order_seed: u64,
        transform: &mut dyn FnMut(&mut Array2<f64>) -> Result<()>,
    ) -> Result<()> {
        let n = y.len();
        let mut idx: Vec<usize> = (0..n).collect();
        SplitMix(order_seed).shuffle(&mut idx);
        for chunk in idx.chunks(32) {
            let mut xb = x.select(Axis(0), chunk);
            transform(&mut xb)?;
            let acts = self.forward_all(&xb);
            let Some(out) = acts.last() else {
                return Ok(());
            };
            // softmax − onehot
            let mut delta = out.clone();
            for (r, mut row) in delta.rows_mut().into_iter().enumerate() {
                let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                row.mapv_inplace(|v| (v - m).exp());
                let s = row.sum();
                row /= s;
                row[y[chunk[r]]] -= 1.0;
            }
            delta /= chunk.len() as f64;
            for l in (0..self.layers.len()).rev() {
                let gw = acts[l].t().dot(&delta);
                let gb = delta.sum_axis(Axis(0));
                let back = if l > 0 {
                    let mut d = delta.dot(&self.layers[l].0.t());
                    d.zip_mut_with(&acts[l], |g, &a| {
                        if a <= 0.0 {
                            *g = 0.0
                        }
                    });
                    Some(d)
                } else {
                    None
                };
                self.layers[l].0.scaled_add(-lr, &gw);
                self.layers[l].1.scaled_add(-lr, &gb);
                if let Some(d) = back {
                    delta = d;
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn accuracy(pred: &[usize], y: &[usize]) -> f64 {
    let ok = pred.iter().zip(y).filter(|(a, b)| a == b).count();
    ok as f64 / y.len().max(1) as f64
}

/// Where the noise goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoisePoint {
    /// On the hidden layer of the given width (device = first layer + ReLU).
    Hidden(usize),
    /// On the standardised input features (device = identity; cloud MLP hidden width given).
    Input(usize),
}

/// One point of an accuracy-vs-ε curve.
#[derive(Clone, Debug, PartialEq)]
pub struct CurvePoint {
    /// ε at δ = [`DELTA`] per released vector, `None` for no noise.
    pub epsilon: Option<f64>,
    /// Test accuracy with the noise-aware cloud head.
    pub accuracy: f64,
    /// Test accuracy with the head trained on clean activations.
    pub accuracy_clean_head: f64,
    /// Dimension of the released vector.
    pub dim: usize,
    /// σ of the discrete Gaussian on the integer grid (0 for no noise).
    pub sigma: f64,
    /// σ relative to the clipped signal norm s·C.
    pub sigma_over_signal: f64,
}

/// Accuracy vs ε on one dataset for one noise placement.
pub fn privacy_curve(ds: &Dataset, point: NoisePoint) -> Result<Vec<CurvePoint>> {
    let sp = split(ds);
    let d = sp.x_train.ncols();
    let k = ds.classes;
    let (device, clean_head) = match point {
        NoisePoint::Hidden(h) => {
            let mut net = Mlp::new(&[d, h, k], SEED);
            for e in 0..60 {
                net.train_epoch(&sp.x_train, &sp.y_train, 0.05, SEED + e, &mut |_| Ok(()))?;
            }
            let (dev, head) = net.split_first();
            (Some(dev), head)
        }
        NoisePoint::Input(h) => (None, Mlp::new(&[d, h, k], SEED)),
    };
    let act = |x: &Array2<f64>| match &device {
        Some(dev) => dev.device_forward(x),
        None => x.clone(),
    };
    let a_train = act(&sp.x_train);
    let a_test = act(&sp.x_test);
    let dim = a_train.ncols();
    let mut norms: Vec<f64> = a_train
        .rows()
        .into_iter()
        .map(|r| r.dot(&r).sqrt())
        .collect();
    norms.sort_by(f64::total_cmp);
    let c = norms
        .get(norms.len() * 9 / 10)
        .copied()
        .filter(|v| *v > 0.0)
        .unwrap_or(1.0);
    let s = 128.0 / c;
    let q = Quantizer::new(Clip::L2(c), s, dim)?;
    let mut rng = SecureBits::new()?;
    let mut out = Vec::new();
    for eps in EPSILONS {
        let mech = match eps {
            Some(e) => Some(Mechanism::gaussian_for_epsilon_delta(q, e, DELTA)?),
            None => None,
        };
        let mut pipeline = |m: &mut Array2<f64>| -> Result<()> {
            for mut row in m.rows_mut() {
                let v: Vec<f64> = row.to_vec();
                let z = match &mech {
                    Some(mech) => mech.release_unaccounted(&v, &mut rng)?,
                    None => q.quantize(&v)?,
                };
                for (dst, src) in row.iter_mut().zip(z) {
                    *dst = src as f64 / s;
                }
            }
            Ok(())
        };
        // Clean head: for hidden mode, the jointly trained head fine-tuned on clipped,
        // quantised activations; for input mode, the MLP trained on clipped inputs.
        let mut clean = clean_head.clone();
        let mut noise_aware;
        {
            let mut no_noise = |m: &mut Array2<f64>| -> Result<()> {
                for mut row in m.rows_mut() {
                    let v: Vec<f64> = row.to_vec();
                    for (dst, src) in row.iter_mut().zip(q.quantize(&v)?) {
                        *dst = src as f64 / s;
                    }
                }
                Ok(())
            };
            let epochs = if device.is_some() { 20 } else { 60 };
            for e in 0..epochs {
                clean.train_epoch(&a_train, &sp.y_train, 0.05, SEED + 100 + e, &mut no_noise)?;
            }
            noise_aware = clean.clone();
            if mech.is_some() {
                for e in 0..40 {
                    noise_aware.train_epoch(
                        &a_train,
                        &sp.y_train,
                        0.02,
                        SEED + 200 + e,
                        &mut pipeline,
                    )?;
                }
            }
        }
        let mut acc = 0.0;
        let mut acc_clean = 0.0;
        for _ in 0..NOISE_REPEATS {
            let mut z = a_test.clone();
            pipeline(&mut z)?;
            acc += accuracy(&noise_aware.predict(&z), &sp.y_test);
            acc_clean += accuracy(&clean.predict(&z), &sp.y_test);
        }
        let sigma = mech.as_ref().map_or(0.0, |m| m.sigma_or_scale());
        out.push(CurvePoint {
            epsilon: eps,
            accuracy: acc / NOISE_REPEATS as f64,
            accuracy_clean_head: acc_clean / NOISE_REPEATS as f64,
            dim,
            sigma,
            sigma_over_signal: sigma / (s * c),
        });
    }
    Ok(out)
}
