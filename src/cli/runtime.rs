//! `tandem cloud serve`, `tandem device infer`, `tandem pki …`, `tandem model …` and
//! `tandem bench load`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::{Answer, Device, DeviceOptions, DpOptions, EarlyExit, Protection};
use tandem_he::OutputMode;
use tandem_model::{read_verifying_key, TestSet};
use tandem_tls::{client_config, client_config_from_files, server_config, ClientFiles, DevPki};

use super::demo::{percentile, repo_root};

/// `tandem cloud …`
#[derive(Subcommand)]
pub enum CloudCommand {
    /// Serves devices until Ctrl-C.
    Serve {
        /// TOML configuration (see `CloudToml`).
        #[arg(long)]
        config: PathBuf,
    },
}

/// `tandem device …`
#[derive(Subcommand)]
pub enum DeviceCommand {
    /// One inference (or one per row) on a JSON input: `[f32, …]` or `[[f32, …], …]`.
    Infer {
        /// TOML configuration (see `DeviceToml`).
        #[arg(long)]
        config: PathBuf,
        /// JSON input file.
        #[arg(long)]
        input: PathBuf,
    },
}

/// `tandem pki …`
#[derive(Subcommand)]
pub enum PkiCommand {
    /// Writes a CA pair, a cloud certificate, N device certificates and a CRL.
    Init {
        /// Output directory.
        dir: PathBuf,
        /// Number of device certificates.
        #[arg(long, default_value_t = 2)]
        devices: usize,
    },
    /// Revokes a device certificate (adds it to the CRL).
    Revoke {
        /// PKI directory.
        dir: PathBuf,
        /// Device name, e.g. `device-1`.
        device: String,
    },
}

/// `tandem model …`
#[derive(Subcommand)]
pub enum ModelCommand {
    /// Signs `DIR/manifest.toml` with an Ed25519 signing key (always named explicitly: there
    /// is no default signer; the committed development key prints a warning).
    Sign {
        /// Bundle directory.
        dir: PathBuf,
        /// Signing-key file (one line of 64 hex digits, the Ed25519 seed).
        #[arg(long)]
        key: PathBuf,
    },
    /// Verifies a bundle (signature, digests, shapes) and prints its summary.
    Verify {
        /// Bundle directory.
        dir: PathBuf,
        /// Verifying-key file.
        #[arg(long, default_value = "models/dev-verifying-key.txt")]
        key: PathBuf,
    },
    /// Converts a sentence-transformers BERT directory (all-MiniLM-L6-v2 from
    /// `scripts/fetch-minilm.sh`) into a signed encoder bundle (issue 8).
    ImportBert(crate::cli::model_bert::ImportArgs),
}

/// `tandem bench load` arguments.
#[derive(Args)]
pub struct LoadArgs {
    /// Concurrent devices.
    #[arg(long, default_value_t = 64)]
    devices: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// `digits` or `breast_cancer`.
    #[arg(long, default_value = "digits")]
    model: String,
    /// Output mode: `packed` or `nokey`.
    #[arg(long, default_value = "packed")]
    mode: String,
    /// Tokio worker threads of the cloud.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Run the cloud as a separate `tandem cloud serve` process (its own address space; its
    /// peak RSS is reported separately) instead of in this process.
    #[arg(long)]
    cloud_process: bool,
    /// Cloud replicas, each its own `tandem cloud serve` process (implies `--cloud-process`;
    /// more than one needs `--postgres` and `--haproxy`).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Shared PostgreSQL key store (connection string) instead of a redb file per replica.
    #[arg(long)]
    postgres: Option<String>,
    /// HAProxy binary: the devices connect through it (`cloud/deploy/haproxy.cfg`, ports
    /// replaced), in TCP mode with TLS pass-through.
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// `device.toml`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceToml {
    cloud: SocketAddr,
    server_name: Option<String>,
    pki_dir: PathBuf,
    device: String,
    model: PathBuf,
    verifying_key: PathBuf,
    state_dir: PathBuf,
    output_mode: Option<String>,
    protection: Option<String>,
    epsilon: Option<f64>,
    clip_l2: Option<f64>,
    delta: Option<f64>,
    budget_epsilon: Option<f64>,
    window_secs: Option<u64>,
    /// Release at an ε the bundle has no noise-trained variant for, with the nearest variant
    /// (default false: refused with `UntrainedEpsilon` before anything is charged or sent).
    allow_untrained_epsilon: Option<bool>,
    /// Answer on the device when the bundle's signed exit head is confident (confidence ≥ its
    /// signed τ; default false). With `protection = "auto"` the planner decides per request.
    early_exit: Option<bool>,
    /// Connection attempts per operation (default 10).
    connect_attempts: Option<usize>,
    /// Give up retrying after this many seconds (default 30).
    connect_deadline_secs: Option<f64>,
    /// HE parameter-set ids offered, preferred first (default: every set this build knows, the
    /// default set 2 first); `[1]` pins the device to set 1.
    param_sets: Option<Vec<u16>>,
}

/// Warns on stderr when `key` is the public development key: anyone can sign with it.
fn warn_if_dev_key(key: &tandem_model::VerifyingKey, what: &str) {
    if tandem_model::is_dev_key(key) {
        eprintln!(
            "warning: {what} is the public DEVELOPMENT model-signing key (committed in the \
             repository, anyone can sign with it): use your own key outside development"
        );
    }
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}

fn parse_mode(s: &str) -> anyhow::Result<OutputMode> {
    Ok(match s {
        "packed" => OutputMode::Packed,
        "nokey" | "no-key" => OutputMode::NoKey,
        _ => bail!("output mode must be `packed` or `nokey`"),
    })
}

/// `tandem cloud serve`.
pub fn cloud(cmd: CloudCommand) -> anyhow::Result<()> {
    let CloudCommand::Serve { config } = cmd;
    init_tracing();
    // Parsing, limits and output-mode policies: `tandem_cloud::config` (documented keys).
    let opts = tandem_cloud::CloudToml::load(&config)?.into_options()?;
    runtime(std::thread::available_parallelism().map_or(2, |n| n.get()))?.block_on(async {
        let cloud = Cloud::start(opts).await?;
        eprintln!("tandem cloud listening on {}", cloud.local_addr());
        if let Some(m) = cloud.metrics_addr() {
            eprintln!("tandem cloud /healthz and /metrics on http://{m}");
        }
        tokio::signal::ctrl_c().await?;
        eprintln!("shutting down");
        cloud.shutdown().await;
        Ok(())
    })
}

#[derive(Serialize)]
struct InferJson {
    /// `"device"` (the exit head answered, nothing left the device) or `"cloud"`.
    answered_on: &'static str,
    /// The exit head's confidence, when it was evaluated.
    exit_confidence: Option<f64>,
    class: usize,
    logits: Vec<f32>,
    total_ms: f64,
    network_ms: f64,
    bytes_up: usize,
    bytes_down: usize,
    key_upload_bytes: usize,
    epsilon_spent: f64,
    /// The HE parameter set the session negotiated (wire id).
    param_set: u16,
}

/// `tandem device infer`.
pub fn device(cmd: DeviceCommand) -> anyhow::Result<()> {
    let DeviceCommand::Infer { config, input } = cmd;
    init_tracing();
    let c: DeviceToml = read_toml(&config)?;
    let text =
        std::fs::read_to_string(&input).with_context(|| format!("reading {}", input.display()))?;
    let rows: Vec<Vec<f32>> =
        match serde_json::from_str::<Vec<Vec<f32>>>(&text) {
            Ok(r) => r,
            Err(_) => vec![serde_json::from_str::<Vec<f32>>(&text)
                .context("input must be [f32…] or [[f32…]…]")?],
        };
    // An empty input is an error, not a silent success with no prediction.
    if rows.is_empty() || rows.iter().any(Vec::is_empty) {
        bail!(
            "{}: the input holds no values (expected [f32…] or [[f32…]…] with non-empty rows)",
            input.display()
        );
    }
    let tls = client_config_from_files(&ClientFiles::from_pki_dir(&c.pki_dir, &c.device)?)?;
    let vk = read_verifying_key(&c.verifying_key)?;
    warn_if_dev_key(&vk, &format!("verifying_key {}", c.verifying_key.display()));
    let mut opts = DeviceOptions::new(c.cloud, tls, c.model, vk, c.state_dir.join("ledger.bin"));
    if let Some(n) = c.connect_attempts {
        if n == 0 {
            bail!("connect_attempts must be at least 1");
        }
        opts.retry.max_attempts = n;
    }
    if let Some(s) = c.connect_deadline_secs {
        opts.retry.deadline = Duration::try_from_secs_f64(s)
            .context("connect_deadline_secs must be a non-negative number of seconds")?;
    }
    if let Some(sets) = c.param_sets {
        if sets.is_empty() {
            bail!(
                "param_sets must name at least one parameter set (known: {:?})",
                tandem_he::ALL_PARAMETER_SETS
                    .iter()
                    .map(|p| p.id)
                    .collect::<Vec<_>>()
            );
        }
        opts.param_sets = sets;
    }
    opts.server_name = c.server_name.unwrap_or_else(|| "localhost".into());
    opts.output_mode = parse_mode(c.output_mode.as_deref().unwrap_or("packed"))?;
    opts.ledger_id = c.device.as_bytes().to_vec();
    let d = DpOptions::default();
    opts.dp = DpOptions {
        clip_l2: c.clip_l2.unwrap_or(d.clip_l2),
        delta: c.delta.unwrap_or(d.delta),
        budget_epsilon: c.budget_epsilon.unwrap_or(d.budget_epsilon),
        budget_rho: None,
        window_secs: c.window_secs.unwrap_or(d.window_secs),
        allow_untrained_epsilon: c
            .allow_untrained_epsilon
            .unwrap_or(d.allow_untrained_epsilon),
    };
    opts.state_dir = Some(c.state_dir);
    let eps = c.epsilon.unwrap_or(4.0);
    let protection = match c.protection.as_deref().unwrap_or("encrypted") {
        "encrypted" => Protection::Encrypted,
        "noised" => Protection::Noised { epsilon: eps },
        "noised-encrypted" | "noised_encrypted" => Protection::NoisedEncrypted { epsilon: eps },
        "auto" => Protection::Auto,
        other => bail!("unknown protection {other} (encrypted, noised, noised-encrypted or auto)"),
    };
    runtime(2)?.block_on(async {
        let mut dev = Device::connect(opts).await?;
        if c.early_exit.unwrap_or(false) {
            dev.set_early_exit(EarlyExit::On);
        }
        for x in &rows {
            // `answer` is `infer` plus the exit head: with early exit off it offloads every row.
            let answer = dev.answer(x, protection).await?;
            let param_set = dev.parameter_set().id;
            let line = match answer {
                Answer::Local {
                    class,
                    confidence,
                    logits,
                    device_ms,
                } => InferJson {
                    answered_on: "device",
                    exit_confidence: Some(confidence),
                    class,
                    logits,
                    total_ms: device_ms,
                    network_ms: 0.0,
                    bytes_up: 0,
                    bytes_down: 0,
                    key_upload_bytes: 0,
                    epsilon_spent: 0.0,
                    param_set,
                },
                Answer::Offloaded {
                    confidence,
                    inference: r,
                } => InferJson {
                    answered_on: "cloud",
                    exit_confidence: confidence,
                    class: r.class,
                    total_ms: r.timings.total_ms(),
                    network_ms: r.timings.network_ms,
                    bytes_up: r.bytes_up,
                    bytes_down: r.bytes_down,
                    key_upload_bytes: r.key_upload_bytes,
                    epsilon_spent: r.epsilon_spent,
                    logits: r.logits,
                    param_set,
                },
            };
            println!("{}", serde_json::to_string(&line)?);
        }
        dev.close().await;
        Ok(())
    })
}

/// `tandem pki …`.
pub fn pki(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init { dir, devices } => {
            let s = tandem_tls::pki_init(&dir, devices)?;
            println!("wrote a development PKI to {}", s.dir.display());
            for d in &s.devices {
                println!("  {}  identity {}", d.name, d.identity.to_hex());
            }
        }
        PkiCommand::Revoke { dir, device } => {
            tandem_tls::pki_revoke(&dir, &device)?;
            println!("revoked {device}; restart the cloud to load the new CRL");
        }
    }
    Ok(())
}

/// `tandem model …`.
pub fn model(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Sign { dir, key } => {
            let sk = tandem_model::read_signing_key(&key)?;
            warn_if_dev_key(
                &sk.verifying_key(),
                &format!("signing key {}", key.display()),
            );
            tandem_model::sign_bundle(&dir, &key)?;
            println!("signed {}", dir.join("manifest.toml").display());
        }
        ModelCommand::Verify { dir, key } => {
            warn_if_dev_key(
                &read_verifying_key(&key)?,
                &format!("verifying key {}", key.display()),
            );
            let s = tandem_model::verify_bundle(&dir, &key)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        ModelCommand::ImportBert(args) => crate::cli::model_bert::run(args)?,
    }
    Ok(())
}

fn peak_rss_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[derive(Serialize)]
struct LoadJson {
    devices: usize,
    seconds: f64,
    model: String,
    mode: String,
    inferences: usize,
    errors: usize,
    throughput_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_mb: f64,
    cloud_process: bool,
    cloud_peak_rss_mb: Option<f64>,
    replicas: usize,
    key_store: &'static str,
    haproxy: bool,
    /// Mean key-store latency per operation over all replicas (from their /metrics), ms.
    key_store_mean_ms: Vec<(String, f64, u64)>,
}

/// `tandem bench load`: N devices on loopback mTLS against a cloud in this process, or with
/// `--cloud-process` in its own `tandem cloud serve` process (the devices' work still shares
/// the machine's cores, so this is a lower bound for the cloud alone).
pub fn bench_load(args: LoadArgs) -> anyhow::Result<()> {
    let root = repo_root();
    let model_dir = root.join("models").join(&args.model);
    let vk = read_verifying_key(&root.join("models/dev-verifying-key.txt"))?;
    let test = TestSet::load(&model_dir.join("test.json"))?;
    let mode = parse_mode(&args.mode)?;
    let tmp = tempfile::tempdir()?;
    let pki = DevPki::generate(args.devices.max(1))?;
    let rt = runtime(args.threads)?;
    let (lat, errors, wall, cloud_rss, store) = rt.block_on(async {
        let mut o = ServerOptions::new(
            "127.0.0.1:0".parse()?,
            server_config(pki.server_credentials())?,
            vk,
            tmp.path().join("keys.redb"),
        );
        o.models = vec![model_dir.clone()];
        o.admission.max_connections = args.devices + 8;
        if args.replicas > 1 && (args.postgres.is_none() || args.haproxy.is_none()) {
            anyhow::bail!("--replicas above 1 needs --postgres and --haproxy");
        }
        let separate = args.cloud_process || args.replicas > 1 || args.postgres.is_some();
        let mut children = Vec::new();
        let cloud = if separate {
            for r in 0..args.replicas.max(1) {
                let dir = tmp.path().join(format!("replica-{r}"));
                std::fs::create_dir_all(&dir)?;
                children.push(super::bench::CloudProcess::spawn(
                    &pki,
                    &model_dir,
                    &root.join("models/dev-verifying-key.txt"),
                    &dir,
                    args.devices + 8,
                    args.postgres.as_deref(),
                )?);
            }
            None
        } else {
            Some(Cloud::start(o).await?)
        };
        let balancer = match &args.haproxy {
            Some(bin) => Some(super::bench::Balancer::spawn(
                bin,
                &root.join("cloud/deploy/haproxy.cfg"),
                tmp.path(),
                &children
                    .iter()
                    .map(|c| (c.addr, c.metrics))
                    .collect::<Vec<_>>(),
            )?),
            None => None,
        };
        let addr = match (&cloud, children.first(), &balancer) {
            (_, _, Some(b)) => b.addr,
            (Some(c), _, None) => c.local_addr(),
            (None, Some(c), None) => c.addr,
            (None, None, None) => anyhow::bail!("no cloud"),
        };
        let mut devices = Vec::new();
        for i in 0..args.devices {
            let name = format!("device-{}", i + 1);
            let mut d = DeviceOptions::new(
                addr,
                client_config(pki.client_credentials(&name)?)?,
                model_dir.clone(),
                vk,
                tmp.path().join(format!("ledger-{i}.bin")),
            );
            d.output_mode = mode;
            d.state_dir = None;
            devices.push(Device::connect(d).await?);
        }
        // Warm-up: one inference each (uploads the keys).
        for d in devices.iter_mut() {
            d.infer(&test.x[0], Protection::Encrypted).await?;
        }
        let xs = Arc::new(test.x.clone());
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(args.seconds);
        let mut tasks = Vec::new();
        for (i, mut d) in devices.into_iter().enumerate() {
            let xs = xs.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0usize;
                let mut k = i;
                while Instant::now() < until {
                    let s = Instant::now();
                    match d.infer(&xs[k % xs.len()], Protection::Encrypted).await {
                        Ok(_) => lat.push(s.elapsed().as_secs_f64() * 1e3),
                        Err(_) => errors += 1,
                    }
                    k += 1;
                }
                d.close().await;
                (lat, errors)
            }));
        }
        let mut lat = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await?;
            lat.extend(l);
            errors += e;
        }
        let wall = start.elapsed().as_secs_f64();
        let mut cloud_rss = None;
        let mut store = Vec::new();
        if let Some(c) = cloud {
            c.shutdown().await;
        }
        for c in &children {
            if let Ok(body) = super::bench::http_get(c.metrics, "/metrics") {
                super::bench::add_store_latency(&body, &mut store);
            }
        }
        for c in children {
            cloud_rss = Some(cloud_rss.unwrap_or(0) + c.peak_rss_kb().unwrap_or(0));
            c.stop();
        }
        drop(balancer);
        Ok::<_, anyhow::Error>((lat, errors, wall, cloud_rss, store))
    })?;
    let mut lat = lat;
    let n = lat.len();
    let out = LoadJson {
        devices: args.devices,
        seconds: wall,
        model: args.model.clone(),
        mode: args.mode.clone(),
        inferences: n,
        errors,
        throughput_per_s: n as f64 / wall,
        p50_ms: percentile(&mut lat, 50.0),
        p99_ms: percentile(&mut lat, 99.0),
        peak_rss_mb: peak_rss_kb().map_or(0.0, |k| k as f64 / 1024.0),
        cloud_process: args.cloud_process || args.replicas > 1 || args.postgres.is_some(),
        cloud_peak_rss_mb: cloud_rss.map(|k| k as f64 / 1024.0),
        replicas: args.replicas.max(1),
        key_store: if args.postgres.is_some() {
            "postgres"
        } else {
            "redb"
        },
        haproxy: args.haproxy.is_some(),
        key_store_mean_ms: store
            .into_iter()
            .map(|(op, sum, n)| (op, if n > 0 { sum * 1e3 / n as f64 } else { 0.0 }, n))
            .collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "{} replica(s), {} key store{}: {} devices × {:.1} s ({} {}): {} inferences, {} errors, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, peak RSS {}",
            out.replicas, out.key_store, if out.haproxy { ", via HAProxy" } else { "" },
            out.devices, out.seconds, out.model, out.mode, out.inferences, out.errors,
            out.throughput_per_s, out.p50_ms, out.p99_ms,
            match out.cloud_peak_rss_mb {
                Some(c) => format!("{:.0} MB devices, {c:.0} MB cloud (own process)", out.peak_rss_mb),
                None => format!("{:.0} MB (cloud + devices, one process)", out.peak_rss_mb),
            }
        );
        for (op, ms, n) in &out.key_store_mean_ms {
            println!("  key store {op}: {n} ops, mean {ms:.3} ms");
        }
    }
    Ok(())
}
