//! `tandem demo`: a throw-away PKI, the cloud in-process on 127.0.0.1, and the digits test
//! split through every protection mode, with a summary (human-readable or JSON).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::{Device, DeviceOptions, Inference, Protection};
use tandem_model::{read_verifying_key, Bundle, TestSet};
use tandem_tls::{client_config, server_config, DevPki};

/// Repository root: where `models/` lives (the current directory, or the build-time root).
pub fn repo_root() -> PathBuf {
    let cwd = PathBuf::from(".");
    if cwd.join("models/digits/manifest.toml").exists() {
        return cwd;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Nearest-rank percentile of `v` (sorted in place), `p` in 0..=100.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[derive(Serialize)]
struct ModeJson {
    mode: String,
    epsilon: Option<f64>,
    accuracy: f64,
    predictions_match_plaintext: bool,
    p50_ms: f64,
    p99_ms: f64,
    bytes_up: f64,
    bytes_down: f64,
    /// Noised rows: the test accuracy the signed manifest records for the variant trained for
    /// this ε (measured by `tandem privacy-train` through the same pipeline, 5 noise draws).
    trained_variant_accuracy: Option<f64>,
}

#[derive(Serialize)]
struct DemoJson {
    plaintext_accuracy: f64,
    samples: usize,
    key_upload_bytes: usize,
    epsilon_spent_total: f64,
    /// DP releases made by the demo (one per noised inference).
    dp_releases: usize,
    /// The device's default budget (`DpOptions::default`), ε per device per day.
    default_budget_epsilon_per_day: f64,
    /// The HE parameter set the session negotiated (its frozen name).
    param_set: &'static str,
    modes: Vec<ModeJson>,
}

struct ModeRun {
    name: &'static str,
    epsilon: Option<f64>,
    results: Vec<Inference>,
}

fn protection(name: &str, eps: Option<f64>) -> Protection {
    match (name, eps) {
        ("noised", Some(epsilon)) => Protection::Noised { epsilon },
        ("noised_encrypted", Some(epsilon)) => Protection::NoisedEncrypted { epsilon },
        _ => Protection::Encrypted,
    }
}

/// Runs the demo.
pub fn run(json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(json))
}

async fn run_async(json: bool) -> anyhow::Result<()> {
    let root = repo_root();
    let model_dir = root.join("models/digits");
    let vk = read_verifying_key(&root.join("models/dev-verifying-key.txt"))?;
    let full =
        Bundle::load(&model_dir, &vk, &Default::default()).context("loading the digits bundle")?;
    let test = TestSet::load(&model_dir.join("test.json"))?;
    let plain: Vec<usize> = test
        .x
        .iter()
        .map(|x| full.predict_plain(x).map(|p| p.class))
        .collect::<Result<_, _>>()?;
    let correct = |pred: &[usize]| {
        pred.iter().zip(&test.y).filter(|(a, b)| a == b).count() as f64 / test.y.len() as f64
    };
    let plaintext_accuracy = correct(&plain);
    // DP clipping bound: the median L2 norm of the split activation over the split itself
    // (a demo calibration; a deployment fixes it from training data).
    let mut norms: Vec<f64> = test
        .x
        .iter()
        .map(|x| {
            full.device_prefix(x)
                .map(|a| a.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt())
        })
        .collect::<Result<_, _>>()?;
    let clip = percentile(&mut norms, 50.0).max(1e-3);

    let tmp = tempfile::tempdir()?;
    let pki = DevPki::generate(1)?;
    let mut opts = ServerOptions::new(
        "127.0.0.1:0".parse()?,
        server_config(pki.server_credentials())?,
        vk,
        tmp.path().join("keys.redb"),
    );
    opts.models = vec![model_dir.clone()];
    let cloud = Cloud::start(opts).await?;
    let mut dopts = DeviceOptions::new(
        cloud.local_addr(),
        client_config(pki.client_credentials("device-1")?)?,
        model_dir,
        vk,
        tmp.path().join("ledger.bin"),
    );
    dopts.dp.clip_l2 = clip;
    // Each test sample stands for one user's request: the demo's one ledger makes thousands
    // of releases, so it uses a demo budget (stated in the output); a device's default is
    // ε = 8 per day (`DpOptions::default`, specs/dp.md §5.1).
    dopts.dp.budget_rho = Some(1e9);
    let mut dev = Device::connect(dopts).await?;

    let plan: Vec<(&'static str, Option<f64>)> = vec![
        ("encrypted", None),
        ("noised", Some(4.0)),
        ("noised", Some(8.0)),
        ("noised", Some(16.0)),
        ("noised_encrypted", Some(8.0)),
    ];
    let n = test.x.len();
    let bar = ProgressBar::new((n * plan.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<22} [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut key_upload = 0;
    for (name, eps) in plan {
        bar.set_message(match eps {
            Some(e) => format!("{name} ε={e}"),
            None => name.to_string(),
        });
        let mut results = Vec::with_capacity(n);
        for x in &test.x {
            let r = dev.infer(x, protection(name, eps)).await?;
            key_upload += r.key_upload_bytes;
            results.push(r);
            bar.inc(1);
        }
        runs.push(ModeRun {
            name,
            epsilon: eps,
            results,
        });
    }
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    let eps_total = dev.epsilon_spent_total()?;
    let key_blob = dev.key_blob_len();
    let plan_info = *dev.he_plan();
    let param_set = dev.parameter_set().name;
    dev.close().await;
    cloud.shutdown().await;

    let mut modes = Vec::new();
    if !json {
        println!("tandem demo — digits ({n} test samples), cloud on loopback mTLS, {wall:.1} s");
        println!(
            "HE plan ({param_set}): chunk {}, upload {} bits, download {} bits, log2 p_fail {:.1}; key upload {} bytes (blob {})",
            plan_info.chunk, plan_info.upload_bits, plan_info.download_bits, plan_info.log2_p_fail, key_upload, key_blob
        );
        match full.privacy() {
            Some(p) => println!(
                "DP: the signed bundle's noise-trained variants ({}, {}-d bottleneck normalised to \
                 norm 1, one variant per ε: {:?}); each noised inference is one release of its ε",
                p.mechanism.name(),
                p.bottleneck,
                p.variants.iter().map(|v| v.epsilon).collect::<Vec<_>>()
            ),
            None => println!(
                "DP: discrete Gaussian, δ = 1e-5 per release, L2 clip {clip:.3} (median activation norm)"
            ),
        }
        println!("plaintext accuracy: {:.2}%", plaintext_accuracy * 100.0);
        println!();
        println!(
            "{:<20} {:>8} {:>6} {:>8} {:>8} | {:>7} {:>7} {:>7} {:>7} {:>7} (p50/p99 ms) | {:>7} {:>7}",
            "mode", "acc", "=plain", "p50 ms", "p99 ms", "device", "dp", "encrypt", "net+cl", "decrypt", "up B", "down B"
        );
    }
    for run in &runs {
        let preds: Vec<usize> = run.results.iter().map(|r| r.class).collect();
        let acc = correct(&preds);
        let matches = preds == plain;
        let stage = |f: &dyn Fn(&Inference) -> f64| {
            let mut v: Vec<f64> = run.results.iter().map(f).collect();
            (percentile(&mut v, 50.0), percentile(&mut v, 99.0))
        };
        let (p50, p99) = stage(&|r| r.timings.total_ms());
        let dv = stage(&|r| r.timings.device_ms);
        let dp = stage(&|r| r.timings.dp_ms);
        let en = stage(&|r| r.timings.encrypt_ms);
        let nw = stage(&|r| r.timings.network_ms);
        let de = stage(&|r| r.timings.decrypt_ms);
        let up = run.results.iter().map(|r| r.bytes_up as f64).sum::<f64>() / n as f64;
        let down = run.results.iter().map(|r| r.bytes_down as f64).sum::<f64>() / n as f64;
        let trained = run.epsilon.and_then(|e| {
            full.privacy()
                .and_then(|p| p.variants.iter().find(|v| v.epsilon == e))
                .and_then(|v| v.test_accuracy)
        });
        let label = match run.epsilon {
            Some(e) => format!("{} ε={e}", run.name),
            None => run.name.to_string(),
        };
        if !json {
            let f = |(a, b): (f64, f64)| format!("{a:.2}/{b:.2}");
            println!(
                "{label:<20} {:>7.2}% {:>6} {p50:>8.2} {p99:>8.2} | {} {} {} {} {} | {up:>7.0} {down:>7.0}",
                acc * 100.0,
                if matches { "yes" } else { "no" },
                f(dv),
                f(dp),
                f(en),
                f(nw),
                f(de),
            );
        }
        modes.push(ModeJson {
            mode: run.name.to_string(),
            epsilon: run.epsilon,
            accuracy: acc,
            predictions_match_plaintext: matches,
            p50_ms: p50,
            p99_ms: p99,
            bytes_up: up,
            bytes_down: down,
            trained_variant_accuracy: trained,
        });
    }
    let releases: usize = runs
        .iter()
        .filter(|r| r.epsilon.is_some())
        .map(|r| r.results.len())
        .sum();
    let default_budget = tandem_device::DpOptions::default().budget_epsilon;
    if !json {
        println!();
        for run in runs.iter().filter(|r| r.epsilon.is_some()) {
            if let Some(e) = run.epsilon {
                let t = full
                    .privacy()
                    .and_then(|p| p.variants.iter().find(|v| v.epsilon == e))
                    .and_then(|v| v.test_accuracy);
                if let Some(t) = t {
                    println!(
                        "{} ε={e}: trained variant's recorded test accuracy {:.2}%",
                        run.name,
                        t * 100.0
                    );
                }
            }
        }
        println!(
            "ε spent: {releases} releases, each of its row's ε per release (each test sample stands \
             for one user's request). A device's default budget is ε = {default_budget} per day: \
             one ε = 8 release (or two at ε = 4). This demo's one ledger has a demo budget \
             (ρ = 1e9) and composed all of them to ε = {eps_total:.0}."
        );
    }
    let out = DemoJson {
        plaintext_accuracy,
        samples: n,
        key_upload_bytes: key_upload,
        epsilon_spent_total: eps_total,
        dp_releases: releases,
        default_budget_epsilon_per_day: default_budget,
        param_set,
        modes,
    };
    if json {
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}
