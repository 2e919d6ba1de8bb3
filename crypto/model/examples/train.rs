//! Reproducible trainer for the committed demo bundles.
//!
//! ```text
//! cargo run -p tandem-model --release --example train -- --dataset digits --out models/digits
//! cargo run -p tandem-model --release --example train -- --dataset breast_cancer --out models/breast_cancer
//! cargo run -p tandem-model --release --example train -- --dataset digits2 --out models/digits2
//! ```
//!
//! `digits2` is the digits data with two cloud layers: `64 → 32` (device) `→ 32` (cloud,
//! its ReLU on the device) `→ 16` (cloud) `→ 10` (device, argmax). Every cloud layer is
//! quantised the same way (its own input and weight scales and bias bound).
//!
//! * Data: `data/digits.csv.gz` (1797 × 64, label last, no header) and `data/breast_cancer.csv`
//!   (569 × 30, label last, one header line).
//! * Split: rows shuffled by SplitMix64 seeded with [`SEED`] (= 42, Fisher–Yates), first 70 %
//!   train, last 30 % test — the same split as `tandem_dp::utility::split`. Features are
//!   standardised with the training mean and (population) standard deviation; the bundle
//!   carries both so the device standardises raw inputs itself.
//! * Model: MLP `in → h1 → h2 → classes` with ReLU, f32, He-normal initialisation from the same
//!   SplitMix64 stream, Adam (lr 3e-3, β = 0.9/0.999), mini-batches of 32 in a freshly
//!   shuffled order each epoch, softmax cross-entropy, L2 1e-4.
//! * Bundle: `manifest.toml` + `manifest.sig`, `device.safetensors` (standardisation, layers 0
//!   and 2) and `cloud.safetensors` (layer 1): each party gets only its own weights file.
//! * Split inference: layer 0 on the device (f32), layer 1 in the cloud (int8 weights with a
//!   per-layer scale, integer bias, int8 input with a scale calibrated as the largest layer-0
//!   activation on the training set), layer 2 on the device (f32) followed by argmax.
//! * Reported: float test accuracy and the test accuracy of the signed bundle's exact integer
//!   pipeline (`Bundle::predict_plain`), both written into the manifest's `[training]` table.
//!
//! Bit-exact reproduction of the float weights across machines is not guaranteed (ndarray's
//! matrix product picks SIMD kernels at run time); the committed bundles are the reference.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, Axis};
use sha2::{Digest, Sha256};
use tandem_model::{
    format_signing_key, format_verifying_key, read_signing_key, read_verifying_key, write_bundle,
    Activation, Bundle, LayerKind, LayerSpec, Limits, Manifest, NamedTensor, Placement, Preprocess,
    QuantSpec, SigningKey, TensorData, TestSet, TrainingInfo, Weights, WeightsRef, FORMAT,
};

/// Seed of the split, the initialisation and the mini-batch order.
const SEED: u64 = 42;
const BATCH: usize = 32;
const LR: f32 = 3e-3;
const L2: f32 = 1e-4;

type Error = Box<dyn std::error::Error>;

/// SplitMix64 (the same generator and split as `tandem_dp::utility`).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

struct Data {
    x: Vec<Vec<f32>>,
    y: Vec<usize>,
}

fn load(name: &str, dir: &Path) -> Result<Data, Error> {
    let (text, header) = match name {
        "digits" => {
            let f = std::fs::File::open(dir.join("digits.csv.gz"))?;
            let mut s = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(f), &mut s)?;
            (s, false)
        }
        "breast_cancer" => (
            std::fs::read_to_string(dir.join("breast_cancer.csv"))?,
            true,
        ),
        other => return Err(format!("unknown dataset {other:?} (digits, breast_cancer)").into()),
    };
    let mut d = Data {
        x: Vec::new(),
        y: Vec::new(),
    };
    for line in text.lines().skip(usize::from(header)) {
        if line.trim().is_empty() {
            continue;
        }
        let vals: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<Result<_, _>>()?;
        let (label, feats) = vals.split_last().ok_or("empty line")?;
        d.x.push(feats.to_vec());
        d.y.push(*label as usize);
    }
    Ok(d)
}

struct Mlp {
    w: Vec<Array2<f32>>, // [out, in]
    b: Vec<Array1<f32>>,
}

impl Mlp {
    fn new(sizes: &[usize], rng: &mut SplitMix) -> Mlp {
        let mut w = Vec::new();
        let mut b = Vec::new();
        for p in sizes.windows(2) {
            let std = (2.0 / p[0] as f64).sqrt();
            w.push(Array2::from_shape_fn((p[1], p[0]), |_| {
                (rng.normal() * std) as f32
            }));
            b.push(Array1::zeros(p[1]));
        }
        Mlp { w, b }
    }

    /// Pre-activations and activations of every layer for a batch `x` [n, in].
    fn forward(&self, x: &Array2<f32>) -> (Vec<Array2<f32>>, Vec<Array2<f32>>) {
        let mut acts = vec![x.clone()];
        let mut pre = Vec::new();
        for (i, (w, b)) in self.w.iter().zip(&self.b).enumerate() {
            let z = acts[i].dot(&w.t()) + b;
            let a = if i + 1 < self.w.len() {
                z.mapv(|v| v.max(0.0))
            } else {
                z.clone()
            };
            pre.push(z);
            acts.push(a);
        }
        (pre, acts)
    }

    fn predict(&self, x: &Array2<f32>) -> Vec<usize> {
        let (_, acts) = self.forward(x);
        let Some(logits) = acts.last() else {
            return Vec::new();
        };
        logits
            .rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold(
                        (0, f32::MIN),
                        |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                    )
                    .0
            })
            .collect()
    }
}

struct Adam {
    m: Vec<Array2<f32>>,
    v: Vec<Array2<f32>>,
    mb: Vec<Array1<f32>>,
    vb: Vec<Array1<f32>>,
    t: i32,
}

impl Adam {
    fn new(net: &Mlp) -> Adam {
        Adam {
            m: net.w.iter().map(|w| Array2::zeros(w.raw_dim())).collect(),
            v: net.w.iter().map(|w| Array2::zeros(w.raw_dim())).collect(),
            mb: net.b.iter().map(|b| Array1::zeros(b.raw_dim())).collect(),
            vb: net.b.iter().map(|b| Array1::zeros(b.raw_dim())).collect(),
            t: 0,
        }
    }

    fn step(&mut self, net: &mut Mlp, gw: &[Array2<f32>], gb: &[Array1<f32>]) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        self.t += 1;
        let c1 = 1.0 - b1.powi(self.t);
        let c2 = 1.0 - b2.powi(self.t);
        for l in 0..net.w.len() {
            self.m[l] = &self.m[l] * b1 + &gw[l] * (1.0 - b1);
            self.v[l] = &self.v[l] * b2 + &gw[l].mapv(|g| g * g) * (1.0 - b2);
            let upd = self.m[l].mapv(|m| m / c1) / self.v[l].mapv(|v| (v / c2).sqrt() + eps);
            net.w[l] -= &(upd * LR);
            self.mb[l] = &self.mb[l] * b1 + &gb[l] * (1.0 - b1);
            self.vb[l] = &self.vb[l] * b2 + &gb[l].mapv(|g| g * g) * (1.0 - b2);
            let upd = self.mb[l].mapv(|m| m / c1) / self.vb[l].mapv(|v| (v / c2).sqrt() + eps);
            net.b[l] -= &(upd * LR);
        }
    }
}

fn train_epoch(net: &mut Mlp, opt: &mut Adam, x: &Array2<f32>, y: &[usize], rng: &mut SplitMix) {
    let n = x.nrows();
    let classes = net.b.last().map_or(0, |b| b.len());
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    for chunk in order.chunks(BATCH) {
        let xb = x.select(Axis(0), chunk);
        let (pre, acts) = net.forward(&xb);
        // Softmax cross-entropy gradient w.r.t. the logits, averaged over the batch.
        let Some(logits) = acts.last() else {
            return;
        };
        let mut delta = Array2::<f32>::zeros((chunk.len(), classes));
        for (r, &i) in chunk.iter().enumerate() {
            let row = logits.row(r);
            let m = row.fold(f32::MIN, |a, &v| a.max(v));
            let e: Vec<f32> = row.iter().map(|&v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            for c in 0..classes {
                delta[[r, c]] = (e[c] / s - f32::from(u8::from(c == y[i]))) / chunk.len() as f32;
            }
        }
        let layers = net.w.len();
        let mut gw = vec![Array2::zeros((0, 0)); layers];
        let mut gb = vec![Array1::zeros(0); layers];
        for l in (0..layers).rev() {
            gw[l] = delta.t().dot(&acts[l]) + &net.w[l] * L2;
            gb[l] = delta.sum_axis(Axis(0));
            if l > 0 {
                let back = delta.dot(&net.w[l]);
                delta = back * &pre[l - 1].mapv(|v| if v > 0.0 { 1.0 } else { 0.0 });
            }
        }
        opt.step(net, &gw, &gb);
    }
}

fn accuracy(pred: &[usize], y: &[usize]) -> f64 {
    pred.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64
}

fn to_array(rows: &[Vec<f32>]) -> Result<Array2<f32>, Error> {
    let w = rows.first().map_or(0, Vec::len);
    Ok(Array2::from_shape_vec((rows.len(), w), rows.concat())?)
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn write_dev_keys(dir: &Path) -> Result<(), Error> {
    // Deterministic, public, DEV-ONLY key: anyone can re-derive it from this phrase.
    let seed: [u8; 32] = Sha256::digest(b"tandem dev-only model signing key v1").into();
    let key = SigningKey::from_bytes(&seed);
    let warn = "DEV-ONLY Ed25519 model signing key for Tandem's demo bundles.\n\
                It is public (committed, and derived as SHA-256(\"tandem dev-only model signing key v1\")):\n\
                anyone can sign with it. Never trust it outside development; use your own key\n\
                (a file with one line of 64 hex digits, the Ed25519 seed) for real bundles.";
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("dev-signing-key.txt"),
        format_signing_key(&key, warn),
    )?;
    std::fs::write(
        dir.join("dev-verifying-key.txt"),
        format_verifying_key(
            &key.verifying_key(),
            "DEV-ONLY Ed25519 verifying key matching dev-signing-key.txt (hex, 32 bytes).",
        ),
    )?;
    println!(
        "wrote {}/dev-signing-key.txt and dev-verifying-key.txt",
        dir.display()
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--write-dev-keys") {
        return write_dev_keys(&repo_root().join("models"));
    }
    let dataset = arg(&args, "--dataset").ok_or("--dataset digits|breast_cancer required")?;
    let out = PathBuf::from(arg(&args, "--out").ok_or("--out DIR required")?);
    let key_file = arg(&args, "--key")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/dev-signing-key.txt"));
    let pub_file = arg(&args, "--pubkey")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/dev-verifying-key.txt"));
    let data_dir = arg(&args, "--data")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("data"));

    // (model id, data file, hidden sizes, epochs, cloud layer indices)
    let (id, data_name, hidden, epochs, clouds): (&str, &str, Vec<usize>, usize, Vec<usize>) =
        match dataset.as_str() {
            "digits" => ("digits-mlp", "digits", vec![32, 16], 60, vec![1]),
            "breast_cancer" => (
                "breast-cancer-mlp",
                "breast_cancer",
                vec![16, 8],
                60,
                vec![1],
            ),
            "digits2" => (
                "digits-mlp-2cloud",
                "digits",
                vec![32, 32, 16],
                60,
                vec![1, 2],
            ),
            other => return Err(format!("unknown dataset {other:?}").into()),
        };
    let epochs = arg(&args, "--epochs").map_or(Ok(epochs), |e| e.parse())?;
    let data = load(data_name, &data_dir)?;
    let n = data.y.len();
    let dim = data.x.first().map_or(0, Vec::len);
    let classes = data.y.iter().max().ok_or("empty dataset")? + 1;

    // Split: SplitMix64(42) shuffle, 70 % train / 30 % test.
    let mut rng = SplitMix(SEED);
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    let n_train = n * 7 / 10;
    let (train_idx, test_idx) = idx.split_at(n_train);
    let pick = |ids: &[usize]| -> (Vec<Vec<f32>>, Vec<usize>) {
        (
            ids.iter().map(|&i| data.x[i].clone()).collect(),
            ids.iter().map(|&i| data.y[i]).collect(),
        )
    };
    let (xtr_raw, ytr) = pick(train_idx);
    let (xte_raw, yte) = pick(test_idx);

    // Standardisation from training statistics (computed in f64).
    let mut mean = vec![0f32; dim];
    let mut std = vec![1f32; dim];
    for j in 0..dim {
        let col: Vec<f64> = xtr_raw.iter().map(|r| f64::from(r[j])).collect();
        let m = col.iter().sum::<f64>() / col.len() as f64;
        let v = col.iter().map(|c| (c - m) * (c - m)).sum::<f64>() / col.len() as f64;
        mean[j] = m as f32;
        std[j] = if v.sqrt() > 1e-12 {
            v.sqrt() as f32
        } else {
            1.0
        };
    }
    let standardise = |rows: &[Vec<f32>]| -> Result<Array2<f32>, Error> {
        let mut a = to_array(rows)?;
        for mut r in a.rows_mut() {
            for j in 0..dim {
                r[j] = (r[j] - mean[j]) / std[j];
            }
        }
        Ok(a)
    };
    let xtr = standardise(&xtr_raw)?;
    let xte = standardise(&xte_raw)?;

    // Train.
    let sizes: Vec<usize> = std::iter::once(dim)
        .chain(hidden.iter().copied())
        .chain(std::iter::once(classes))
        .collect();
    let mut rng = SplitMix(SEED ^ 0x5EED);
    let mut net = Mlp::new(&sizes, &mut rng);
    let mut opt = Adam::new(&net);
    for e in 0..epochs {
        train_epoch(&mut net, &mut opt, &xtr, &ytr, &mut rng);
        if (e + 1) % 10 == 0 {
            println!(
                "epoch {:>3}: train acc {:.4}, test acc {:.4}",
                e + 1,
                accuracy(&net.predict(&xtr), &ytr),
                accuracy(&net.predict(&xte), &yte)
            );
        }
    }
    let float_acc = accuracy(&net.predict(&xte), &yte);

    // Quantise every cloud layer: int8 weights with one scale, integer bias, int8 input
    // whose scale is calibrated as the largest activation entering the layer on the training
    // set.
    let (_, acts) = net.forward(&xtr);
    let mut quants = Vec::new();
    for &i in &clouds {
        let max_act = acts[i].fold(0f32, |a, &v| a.max(v));
        let input_scale = max_act / 127.0;
        let w = &net.w[i];
        let weight_scale = w.fold(0f32, |a, &v| a.max(v.abs())) / 127.0;
        let wq: Vec<i8> = w
            .iter()
            .map(|&v| (v / weight_scale).round().clamp(-127.0, 127.0) as i8)
            .collect();
        let bias_scale = f64::from(input_scale) * f64::from(weight_scale);
        let bq: Vec<i64> = net.b[i]
            .iter()
            .map(|&v| (f64::from(v) / bias_scale).round() as i64)
            .collect();
        let spec = QuantSpec {
            input_scale,
            weight_scale,
            input_clip: 127,
            max_abs_bias: Some(bq.iter().map(|b| b.abs()).max().unwrap_or(0)),
        };
        quants.push((i, max_act, spec, wq, bq));
    }
    let quant_of = |i: usize| quants.iter().find(|q| q.0 == i);

    let layer =
        |i: usize, act: Activation, placement: Placement, quant: Option<QuantSpec>| LayerSpec {
            name: format!("fc{i}"),
            kind: LayerKind::Dense,
            n_in: sizes[i],
            n_out: sizes[i + 1],
            activation: act,
            placement,
            weight: format!("fc{i}.weight"),
            bias: format!("fc{i}.bias"),
            quant,
        };
    let n_layers = sizes.len() - 1;
    let layers: Vec<LayerSpec> = (0..n_layers)
        .map(|i| {
            let act = if i + 1 == n_layers {
                Activation::Argmax
            } else {
                Activation::Relu
            };
            match quant_of(i) {
                Some(q) => layer(i, act, Placement::Cloud, Some(q.2.clone())),
                None => layer(i, act, Placement::Device, None),
            }
        })
        .collect();
    let split_desc = format!(
        "rows shuffled by SplitMix64(seed {SEED}), first 70% train ({}), last 30% test ({}); \
         standardised with training mean/std",
        train_idx.len(),
        test_idx.len()
    );
    let mut manifest = Manifest {
        format: FORMAT.into(),
        id: id.into(),
        version: "1.0.0".into(),
        dataset: dataset.clone(),
        input_dim: dim,
        classes,
        split_points: clouds.clone(),
        weights: Weights {
            device: WeightsRef {
                file: "device.safetensors".into(),
                sha256: String::new(),
                bytes: 0,
            },
            cloud: WeightsRef {
                file: "cloud.safetensors".into(),
                sha256: String::new(),
                bytes: 0,
            },
        },
        preprocess: Some(Preprocess {
            mean: "input.mean".into(),
            std: "input.std".into(),
        }),
        layers,
        training: Some(TrainingInfo {
            command: format!(
                "cargo run -p tandem-model --release --example train -- --dataset {dataset} --out {}",
                out.display()
            ),
            seed: SEED,
            split: split_desc.clone(),
            train_samples: train_idx.len(),
            test_samples: test_idx.len(),
            float_test_accuracy: float_acc,
            quantised_test_accuracy: 0.0,
        }),
        exit_head: None,
        encoder: None,
        privacy: None,
    };
    let f32t = |name: &str, shape: Vec<usize>, v: Vec<f32>| NamedTensor {
        name: name.into(),
        shape,
        data: TensorData::F32(v),
    };
    let mut tensors = vec![
        f32t("input.mean", vec![dim], mean.clone()),
        f32t("input.std", vec![dim], std.clone()),
    ];
    for i in 0..n_layers {
        match quant_of(i) {
            Some((_, _, _, wq, bq)) => {
                tensors.push(NamedTensor {
                    name: format!("fc{i}.weight"),
                    shape: vec![sizes[i + 1], sizes[i]],
                    data: TensorData::I8(wq.clone()),
                });
                tensors.push(NamedTensor {
                    name: format!("fc{i}.bias"),
                    shape: vec![sizes[i + 1]],
                    data: TensorData::I64(bq.clone()),
                });
            }
            None => {
                tensors.push(f32t(
                    &format!("fc{i}.weight"),
                    vec![sizes[i + 1], sizes[i]],
                    net.w[i].iter().copied().collect(),
                ));
                tensors.push(f32t(
                    &format!("fc{i}.bias"),
                    vec![sizes[i + 1]],
                    net.b[i].to_vec(),
                ));
            }
        }
    }

    let key = read_signing_key(&key_file)?;
    let vk = read_verifying_key(&pub_file)?;
    if vk != key.verifying_key() {
        return Err("--pubkey does not match --key".into());
    }
    // Write once to measure the signed bundle's integer pipeline, then record it and re-sign.
    write_bundle(&out, &manifest, &tensors, &key)?;
    let bundle = Bundle::load(&out, &vk, &Limits::default())?;
    let q_acc = bundle.accuracy(&xte_raw, &yte)?;
    if let Some(t) = manifest.training.as_mut() {
        t.quantised_test_accuracy = q_acc;
    }
    write_bundle(&out, &manifest, &tensors, &key)?;
    let bundle = Bundle::load(&out, &vk, &Limits::default())?;

    TestSet {
        dataset: dataset.clone(),
        split: split_desc,
        indices: test_idx.to_vec(),
        x: xte_raw,
        y: yte,
    }
    .save(&out.join("test.json"))?;

    let (_, acts_te) = net.forward(&xte);
    println!(
        "{dataset}: {} train / {} test, layers {:?}",
        train_idx.len(),
        test_idx.len(),
        sizes
    );
    for (i, max_act, q, _, _) in &quants {
        let clipped = acts_te[*i].iter().filter(|&&v| v > *max_act).count();
        println!(
            "cloud layer {i} int8 (input scale {:.5}, weight scale {:.5}; {clipped} test activations clipped)",
            q.input_scale, q.weight_scale
        );
    }
    println!("float test accuracy     {float_acc:.4}");
    println!("quantised test accuracy {q_acc:.4}");
    println!(
        "bundle digest {}",
        tandem_model::Summary::of(&bundle).digest
    );
    Ok(())
}
