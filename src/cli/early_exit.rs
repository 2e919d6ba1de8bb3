//! The early-exit cascade (issue 10, `specs/planner.md` §7):
//! * `tandem exit-head --model <bundle>` trains the exit head by distillation from the full
//!   model, calibrates τ on rows held out of the training split, and re-signs the bundle
//!   (device weights file and manifest; the cloud file is untouched);
//! * `tandem bench early-exit --model <bundle>… [--json] [--svg FILE]` reports accuracy,
//!   offload rate, mean latency and energy against τ on the bundle's test split.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};
use ndarray::Array2;
use serde::Serialize;
use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::energy::{compute_mj, cpu_mj, Radio};
use tandem_device::{Device, DeviceOptions, EarlyExit, Protection};
use tandem_dp::exit_head::{
    calibrate, cascade_at, distill, exit_rows, write_svg, DistillConfig, RowOutcome, TauSeries,
    EXIT_SEED, HOLDOUT_PERCENT,
};
use tandem_dp::utility::{data_dir, Dataset};
use tandem_model::{
    attach_exit_head, read_signing_key, read_verifying_key, Bundle, ExitCalibration, ExitHead,
    ExitHeadSpec, Limits, Placement, Step, TestSet,
};
use tandem_tls::{client_config, server_config, DevPki};

use crate::cli::demo::repo_root;

/// Names of the head's tensors in the device weights file.
const HEAD_WEIGHT: &str = "exit.weight";
const HEAD_BIAS: &str = "exit.bias";

/// `tandem exit-head`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Bundle directory (re-signed in place).
    #[arg(long)]
    model: PathBuf,
    /// Signing key file (64 hex digits). Required: there is no default signer (the committed
    /// `models/dev-signing-key.txt` works and prints a warning).
    #[arg(long)]
    key: PathBuf,
    /// Verifying key the bundle is signed with now (default: the dev key).
    #[arg(long)]
    pubkey: Option<PathBuf>,
    /// Largest accuracy loss of the cascade against the full model on the held-out rows,
    /// in percentage points.
    #[arg(long, default_value_t = tandem_dp::exit_head::TARGET_LOSS_POINTS)]
    target_loss: f64,
}

/// `tandem bench early-exit`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Bundle directories with an exit head (repeat for several models).
    #[arg(long, required = true)]
    model: Vec<PathBuf>,
    /// One JSON object per (model, τ) line instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write an SVG plot of accuracy and offload rate against τ.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Test rows sent through a real encrypted offload (loopback mTLS) to measure its latency
    /// and bytes.
    #[arg(long, default_value_t = 40)]
    offload_samples: usize,
    /// Radio of the energy model (`wifi` or `lte`).
    #[arg(long, default_value = "wifi")]
    radio: String,
    /// Verifying key of the bundles' signer (default: the dev key,
    /// `models/dev-verifying-key.txt`).
    #[arg(long)]
    verifying_key: Option<PathBuf>,
}

/// The dataset file behind a bundle's `dataset` field.
fn dataset_of(bundle: &Bundle) -> anyhow::Result<Dataset> {
    let name = match bundle.manifest().dataset.as_str() {
        "digits" | "digits2" => "digits",
        "breast_cancer" => "breast_cancer",
        other => bail!("no dataset loader for {other:?} (digits, digits2, breast_cancer)"),
    };
    Ok(Dataset::load(name, &data_dir())?)
}

fn row_f32(ds: &Dataset, i: usize) -> Vec<f32> {
    ds.x.row(i).iter().map(|&v| v as f32).collect()
}

/// The split activation (input of the first cloud layer) of a raw input.
fn activation(bundle: &Bundle, x: &[f32]) -> anyhow::Result<Vec<f32>> {
    match bundle.start(x)? {
        Step::Cloud { activation, .. } => Ok(activation),
        Step::Done(_) => bail!("the model has no cloud layer"),
    }
}

fn outcomes(
    bundle: &Bundle,
    head: &ExitHead,
    xs: &[Vec<f32>],
    ys: &[usize],
) -> anyhow::Result<Vec<RowOutcome>> {
    xs.iter()
        .zip(ys)
        .map(|(x, &label)| {
            let o = head.evaluate(&activation(bundle, x)?)?;
            Ok(RowOutcome {
                confidence: o.confidence,
                head_class: o.class,
                full_class: bundle.predict_plain(x)?.class,
                label,
            })
        })
        .collect()
}

/// `--target-loss` in `[0, 100]` percentage points. Was: NaN and infinity were accepted and
/// signed into the bundle's calibration record with τ at the least confident held-out row
/// (no target at all); a negative value failed only after training, with a confusing message.
fn check_target_loss(points: f64) -> anyhow::Result<()> {
    if !(0.0..=100.0).contains(&points) {
        bail!("--target-loss {points}: must be in [0, 100] percentage points (e.g. 0.5)");
    }
    Ok(())
}

/// `tandem exit-head --model DIR`: trains, calibrates and re-signs.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    check_target_loss(args.target_loss)?;
    let root = repo_root();
    let key_file = args.key;
    let pub_file = args
        .pubkey
        .unwrap_or_else(|| root.join("models/dev-verifying-key.txt"));
    let key = read_signing_key(&key_file)?;
    if tandem_model::is_dev_key(&key.verifying_key()) {
        eprintln!(
            "warning: {} is the public DEVELOPMENT signing key: anyone can sign with it",
            key_file.display()
        );
    }
    let vk = read_verifying_key(&pub_file)?;
    let dir = args.model;
    let bundle = Bundle::load(&dir, &vk, &Limits::default())
        .with_context(|| format!("loading {}", dir.display()))?;
    let ds = dataset_of(&bundle)?;
    let rows = exit_rows(&ds);
    let test = TestSet::load(&dir.join("test.json"))?;
    if test.indices != rows.test {
        bail!(
            "{}: test.json does not hold the split the trainer made (seed 42, 70/30); the \
             held-out rows would not be disjoint from it",
            dir.display()
        );
    }
    let at_layer = bundle.cloud_index();
    let n_in = bundle.layers()[at_layer].spec().n_in;
    let classes = bundle.classes();

    // Activations and the full model's logits on the head's training rows.
    let fit_x: Vec<Vec<f32>> = rows.fit.iter().map(|&i| row_f32(&ds, i)).collect();
    let mut acts = Array2::<f64>::zeros((fit_x.len(), n_in));
    let mut teacher = Array2::<f64>::zeros((fit_x.len(), classes));
    for (r, x) in fit_x.iter().enumerate() {
        for (j, v) in activation(&bundle, x)?.into_iter().enumerate() {
            acts[[r, j]] = f64::from(v);
        }
        for (j, v) in bundle.predict_plain(x)?.logits.into_iter().enumerate() {
            teacher[[r, j]] = f64::from(v);
        }
    }
    let cfg = DistillConfig::default();
    let lin = distill(&acts, &teacher, &cfg)?;
    let w: Vec<f32> = lin.w.iter().map(|&v| v as f32).collect();
    let b: Vec<f32> = lin.b.iter().map(|&v| v as f32).collect();
    let mut spec = ExitHeadSpec {
        at_layer,
        n_in,
        weight: HEAD_WEIGHT.into(),
        bias: HEAD_BIAS.into(),
        threshold: 1.0,
        calibration: None,
    };
    let head = ExitHead::new(spec.clone(), classes, w.clone(), b.clone())?;

    // τ on the held-out rows, with exactly the f32 head the device will run.
    let hold_x: Vec<Vec<f32>> = rows.holdout.iter().map(|&i| row_f32(&ds, i)).collect();
    let hold_y: Vec<usize> = rows.holdout.iter().map(|&i| ds.y[i]).collect();
    let hold = outcomes(&bundle, &head, &hold_x, &hold_y)?;
    let cal = calibrate(&hold, args.target_loss)?;
    let test_rows = outcomes(&bundle, &head, &test.x, &test.y)?;
    let on_test = cascade_at(&test_rows, cal.tau);
    let m = bundle.manifest();
    spec.threshold = cal.tau;
    spec.calibration = Some(ExitCalibration {
        command: format!(
            "cargo run --release -- exit-head --model {} --target-loss {}",
            dir.display(),
            args.target_loss
        ),
        seed: EXIT_SEED,
        split: format!(
            "the bundle's training rows (SplitMix64 seed 42, first 70 %) reshuffled by \
             SplitMix64(seed {EXIT_SEED}); last {HOLDOUT_PERCENT} % held out for tau ({}), \
             the rest trains the head ({}); the test split ({}) is not used",
            rows.holdout.len(),
            rows.fit.len(),
            rows.test.len()
        ),
        temperature: cfg.temperature,
        epochs: cfg.epochs,
        fit_samples: rows.fit.len(),
        holdout_samples: rows.holdout.len(),
        target_loss_points: args.target_loss,
        holdout_full_accuracy: cal.full_accuracy,
        holdout_cascade_accuracy: cal.cascade_accuracy,
        holdout_local_fraction: cal.local_fraction,
        test_full_accuracy: on_test.full_accuracy,
        test_cascade_accuracy: on_test.cascade_accuracy,
        test_local_fraction: on_test.local_fraction,
    });
    attach_exit_head(&dir, spec, w, b, &key)?;
    let signed = Bundle::load(&dir, &vk, &Limits::default())?;
    println!(
        "{} ({}): exit head {n_in} → {classes} at layer {at_layer}, tau = {:.6}",
        dir.display(),
        m.id,
        cal.tau
    );
    println!(
        "  held-out ({} rows): full {:.4}, cascade {:.4}, local {:.1} %",
        hold.len(),
        cal.full_accuracy,
        cal.cascade_accuracy,
        100.0 * cal.local_fraction
    );
    println!(
        "  test ({} rows):     full {:.4}, cascade {:.4}, local {:.1} %",
        test_rows.len(),
        on_test.full_accuracy,
        on_test.cascade_accuracy,
        100.0 * on_test.local_fraction
    );
    println!(
        "  re-signed; model digest {}",
        tandem_model::Summary::of(&signed).digest
    );
    let test_loss = 100.0 * (on_test.full_accuracy - on_test.cascade_accuracy);
    if test_loss > args.target_loss {
        eprintln!(
            "warning: on the test split the cascade loses {test_loss:.2} points, more than the \
             target {} (tau was calibrated on held-out training rows); consider shipping this \
             bundle without a head or with a lower --target-loss",
            args.target_loss
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct Row {
    model: String,
    tau: Option<f64>,
    calibrated: bool,
    requests: usize,
    accuracy: f64,
    full_accuracy: f64,
    offload_rate: f64,
    mean_ms: f64,
    energy_mj: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    measured_mean_ms: Option<f64>,
}

/// Measured costs of one model.
struct Costs {
    /// Device prefix + head, ms (mean).
    local_ms: f64,
    /// Encrypted offload (device layers, encryption, loopback mTLS, cloud, decryption), ms.
    offload_ms: f64,
    network_ms: f64,
    up: f64,
    down: f64,
    /// Cascade at the signed τ, measured on the same rows, ms (mean).
    cascade_ms: f64,
    /// Device CPU time of encryption and decryption per offload, ms (mean).
    cpu_ms: f64,
}

fn macs(bundle: &Bundle, from: usize, to: usize) -> u64 {
    bundle
        .layers()
        .iter()
        .enumerate()
        .filter(|(i, l)| (from..to).contains(i) && l.spec().placement == Placement::Device)
        .map(|(_, l)| (l.spec().n_in * l.spec().n_out) as u64)
        .sum()
}

/// Measures on `xs` over loopback mTLS: encrypted offloads, then the cascade at the signed τ.
/// Returns the mean costs (`local_ms` left 0 for the caller).
async fn measure(dir: &Path, xs: &[Vec<f32>]) -> anyhow::Result<Costs> {
    let root = repo_root();
    let vk = read_verifying_key(&root.join("models/dev-verifying-key.txt"))?;
    let tmp = tempfile::tempdir()?;
    let pki = DevPki::generate(1)?;
    let mut opts = ServerOptions::new(
        "127.0.0.1:0".parse()?,
        server_config(pki.server_credentials())?,
        vk,
        tmp.path().join("keys.redb"),
    );
    opts.models = vec![dir.to_path_buf()];
    let cloud = Cloud::start(opts).await?;
    let dopts = DeviceOptions::new(
        cloud.local_addr(),
        client_config(pki.client_credentials("device-1")?)?,
        dir.to_path_buf(),
        vk,
        tmp.path().join("ledger.bin"),
    );
    let mut dev = Device::connect(dopts).await?;
    // Warm-up (key upload) outside the measurement.
    if let Some(x) = xs.first() {
        dev.infer(x, Protection::Encrypted).await?;
    }
    let (mut total, mut net, mut up, mut down, mut cpu) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for x in xs {
        let s = Instant::now();
        let r = dev.infer(x, Protection::Encrypted).await?;
        total += s.elapsed().as_secs_f64() * 1e3;
        net += r.timings.network_ms;
        cpu += r.timings.encrypt_ms + r.timings.decrypt_ms + r.timings.dp_ms;
        up += r.bytes_up as f64;
        down += r.bytes_down as f64;
    }
    dev.set_early_exit(EarlyExit::On);
    let mut cascade = 0.0;
    for x in xs {
        let s = Instant::now();
        dev.answer(x, Protection::Encrypted).await?;
        cascade += s.elapsed().as_secs_f64() * 1e3;
    }
    dev.close().await;
    cloud.shutdown().await;
    let n = xs.len().max(1) as f64;
    Ok(Costs {
        local_ms: 0.0,
        offload_ms: total / n,
        network_ms: net / n,
        up: up / n,
        down: down / n,
        cascade_ms: cascade / n,
        cpu_ms: cpu / n,
    })
}

/// `tandem bench early-exit`.
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let radio = match args.radio.as_str() {
        "wifi" => Radio::Wifi,
        "lte" => Radio::Lte,
        other => bail!("--radio {other:?}: wifi or lte"),
    };
    let vk = read_verifying_key(
        &args
            .verifying_key
            .clone()
            .unwrap_or_else(|| repo_root().join("models/dev-verifying-key.txt")),
    )?;
    // Fail before the measurements, not after them (was: "plot: backend error" at the end).
    if let Some(svg) = &args.svg {
        std::fs::File::create(svg)
            .with_context(|| format!("--svg {}: cannot create the file", svg.display()))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut series: Vec<TauSeries> = Vec::new();
    if !args.json {
        println!(
            "{:<16} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
            "model", "tau", "accuracy", "loss pt", "offload", "mean ms", "energy mJ"
        );
    }
    for dir in &args.model {
        let bundle = Bundle::load(dir, &vk, &Limits::default())
            .with_context(|| format!("loading {}", dir.display()))?;
        if bundle.encoder().is_some() {
            bail!(
                "{}: an encoder bundle; the early-exit cascade is for the MLP bundles \
                 (models/digits, models/breast_cancer)",
                dir.display()
            );
        }
        let Some(head) = bundle.exit_head() else {
            bail!(
                "{} has no exit head: run `tandem exit-head --model {}` first",
                dir.display(),
                dir.display()
            );
        };
        let test = TestSet::load(&dir.join("test.json"))?;
        let rows = outcomes(&bundle, head, &test.x, &test.y)?;
        // Device time of the head's verdict (device prefix + head), 5 passes.
        let s = Instant::now();
        for _ in 0..5 {
            for x in &test.x {
                bundle.exit_confidence(x)?;
            }
        }
        let local_ms = s.elapsed().as_secs_f64() * 1e3 / (5 * test.x.len()).max(1) as f64;
        let k = args.offload_samples.clamp(1, test.x.len());
        let c = Costs {
            local_ms,
            ..rt.block_on(measure(dir, &test.x[..k]))?
        };
        let split = bundle.cloud_index();
        let head_macs = (head.spec().n_in * bundle.classes()) as u64;
        let local_mj = compute_mj(macs(&bundle, 0, split) + head_macs);
        // Offload: the remaining device layers, the CPU time of encryption and decryption
        // (measured, at `energy::CPU_CORE_ACTIVE_MW`) and the radio.
        let offload_mj = compute_mj(macs(&bundle, split, bundle.layers().len()))
            + cpu_mj(c.cpu_ms)
            + radio
                .model()
                .transfer_mj(c.up as u64, c.down as u64, c.network_ms);
        let name = bundle.id().to_string();
        let signed = head.threshold();
        let mut taus: Vec<(Option<f64>, bool)> = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]
            .iter()
            .map(|&t| (Some(t), false))
            .collect();
        taus.push((Some(signed), true));
        taus.sort_by(|a, b| a.0.unwrap_or(2.0).total_cmp(&b.0.unwrap_or(2.0)));
        taus.push((None, false));
        let mut pts = Vec::new();
        for (tau, calibrated) in taus {
            // `None`: early exit off (τ above any confidence).
            let p = cascade_at(&rows, tau.unwrap_or(f64::INFINITY));
            let offload = 1.0 - p.local_fraction;
            let mean_ms = c.local_ms + offload * c.offload_ms;
            let energy = local_mj + offload * offload_mj;
            let row = Row {
                model: name.clone(),
                tau,
                calibrated,
                requests: rows.len(),
                accuracy: p.cascade_accuracy,
                full_accuracy: p.full_accuracy,
                offload_rate: offload,
                mean_ms,
                energy_mj: energy,
                measured_mean_ms: calibrated.then_some(c.cascade_ms),
            };
            if let Some(t) = tau {
                pts.push((t, p.cascade_accuracy, offload));
            }
            if args.json {
                println!("{}", serde_json::to_string(&row)?);
            } else {
                println!(
                    "{:<16} {:>9} {:>9.4} {:>9.2} {:>9.3} {:>10.3} {:>10.4}{}",
                    name,
                    tau.map_or("off".into(), |t| format!("{t:.4}")),
                    p.cascade_accuracy,
                    p.loss_points(),
                    offload,
                    mean_ms,
                    energy,
                    if calibrated {
                        format!("  <- signed tau (measured cascade {:.3} ms)", c.cascade_ms)
                    } else {
                        String::new()
                    }
                );
            }
        }
        if !args.json {
            println!(
                "{:<16} local {:.4} ms; encrypted offload {:.3} ms (network+cloud {:.3} ms, {:.0} B up, {:.0} B down, {k} rows, loopback mTLS); {} energy model",
                "", c.local_ms, c.offload_ms, c.network_ms, c.up, c.down, radio.name()
            );
        }
        series.push((name, pts));
    }
    if let Some(svg) = &args.svg {
        write_svg(
            svg,
            "Early exit: test accuracy and offload rate vs τ",
            &series,
        )?;
        if !args.json {
            println!("wrote {}", svg.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_loss_outside_0_100_points_is_refused_before_training() {
        assert!(check_target_loss(0.5).is_ok());
        assert!(check_target_loss(0.0).is_ok());
        for bad in [f64::NAN, f64::INFINITY, -1.0, 100.5, 1e300] {
            assert!(check_target_loss(bad).is_err(), "{bad} accepted");
        }
    }
}
