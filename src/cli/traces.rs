//! `tandem bench traces`: the planner against fixed strategies and the per-request oracle on
//! shaped loopback links that follow the committed link traces (`data/traces/*.csv`,
//! `specs/planner.md` §6).
//!
//! Real requests: the cloud runs in-process on 127.0.0.1 behind mutual TLS; two devices (one
//! per output mode) reach it through an in-process shaping proxy ([`ShapedLink`]) whose
//! bandwidth and RTT the harness sets from the trace before each request. Request `i` of a
//! trace runs at trace time `i · duration / N` (a time slot) and every strategy's request of
//! that slot sees the same link, so the oracle — the best candidate in hindsight among those
//! the planner's policy allows for that request — is the minimum of the measured candidates.
//!
//! The planner's link input is the trace's value in the slot (what a link monitor reports);
//! its other inputs are measured once (`super::plan::measure`) and the local path profiled.
//! Its policy: encrypted offload in either output mode; answering locally only when the
//! exit head is confident (confidence ≥ τ), since its accuracy otherwise falls below the
//! floor; DP releases in the clear are not offered (their accuracy on these bundles is far
//! below offloading: `BENCHMARKS.md`). The fixed `noised` strategy still runs, for comparison.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use tandem::device::energy::{self, Radio};
use tandem::device::planner::{
    plan, AppPolicy, DeviceProfile, LinkEstimate, ModelCosts, Objective, PlanInputs, PlanProtection,
};
use tandem::he::OutputMode;
use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::{Device, DeviceOptions, Protection};
use tandem_dp::utility::{self, Dataset};
use tandem_model::{read_verifying_key, Bundle, Limits, TestSet};
use tandem_tls::{client_config, server_config, DevPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::demo::percentile;

/// `tandem bench traces` arguments.
#[derive(clap::Args)]
pub struct TracesArgs {
    /// Model bundle directory.
    #[arg(long, default_value = "models/digits")]
    model: PathBuf,
    /// Verifying key of the bundle's signer.
    #[arg(long, default_value = "models/dev-verifying-key.txt")]
    verifying_key: PathBuf,
    /// Directory of the link traces (`*.csv`: `time_s,bandwidth_kbit,rtt_ms`).
    #[arg(long, default_value = "data/traces")]
    traces: PathBuf,
    /// Requests (time slots) per trace.
    #[arg(long, default_value_t = 80)]
    requests: usize,
    /// ε of the fixed `noised` strategy.
    #[arg(long, default_value_t = 4.0)]
    epsilon: f64,
    /// One JSON object per (trace, strategy) instead of a table.
    #[arg(long)]
    json: bool,
}

/// One link trace.
#[derive(Debug, Clone)]
pub struct Trace {
    /// File stem (`3g`, `lte`, `wifi`).
    pub name: String,
    /// (time s, bandwidth bit/s, RTT ms), time ascending.
    pub samples: Vec<(f64, f64, f64)>,
}

impl Trace {
    /// Reads `time_s,bandwidth_kbit,rtt_ms` (header line first).
    ///
    /// # Errors
    /// An unreadable file, a malformed line (named with its number), a non-finite or negative
    /// value, time not ascending, or no samples.
    pub fn load(path: &Path) -> anyhow::Result<Trace> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading trace {}", path.display()))?;
        let mut samples = Vec::new();
        for (no, line) in text.lines().enumerate().skip(1) {
            if line.trim().is_empty() {
                continue;
            }
            let v: Vec<f64> = line
                .split(',')
                .map(|f| f.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}:{}: expected numbers", path.display(), no + 1))?;
            let [t, kbit, rtt] = v[..] else {
                bail!(
                    "{}:{}: expected time_s,bandwidth_kbit,rtt_ms",
                    path.display(),
                    no + 1
                );
            };
            if ![t, kbit, rtt].iter().all(|x| x.is_finite() && *x >= 0.0) || kbit == 0.0 {
                bail!(
                    "{}:{}: values must be finite, non-negative, bandwidth > 0",
                    path.display(),
                    no + 1
                );
            }
            if samples.last().is_some_and(|&(p, _, _)| t <= p) {
                bail!("{}:{}: time must ascend", path.display(), no + 1);
            }
            samples.push((t, kbit * 1e3, rtt));
        }
        if samples.is_empty() {
            bail!("{}: no samples", path.display());
        }
        let name = path
            .file_stem()
            .map_or_else(|| "trace".into(), |s| s.to_string_lossy().into_owned());
        Ok(Trace { name, samples })
    }

    /// Duration, s (last sample time + 1 s of holding it).
    pub fn duration_s(&self) -> f64 {
        self.samples.last().map_or(0.0, |s| s.0 + 1.0)
    }

    /// The link at time `t` (the last sample at or before `t`).
    pub fn at(&self, t: f64) -> LinkEstimate {
        let i = self.samples.partition_point(|s| s.0 <= t).saturating_sub(1);
        let (_, bps, rtt) = self.samples[i.min(self.samples.len() - 1)];
        LinkEstimate {
            bandwidth_bps: bps,
            rtt_ms: rtt,
        }
    }

    /// The radio whose energy constants apply (`wifi` traces: Wi-Fi; cellular: LTE, the
    /// only cellular model in `tandem_device::energy`).
    pub fn radio(&self) -> Radio {
        if self.name.contains("wifi") {
            Radio::Wifi
        } else {
            Radio::Lte
        }
    }
}

/// A loopback link with settable bandwidth and RTT: each direction of every proxied TCP
/// connection is a paced queue (a token bucket with a burst of one read, ≤ 4 KiB): a chunk
/// leaves at `max(arrival, previous departure) + 8·len / bandwidth` and is delivered RTT/2
/// later, in order.
#[derive(Clone)]
pub struct ShapedLink {
    state: Arc<Mutex<LinkEstimate>>,
}

impl ShapedLink {
    /// A link with the given bandwidth and RTT.
    pub fn new(link: LinkEstimate) -> Self {
        ShapedLink {
            state: Arc::new(Mutex::new(link)),
        }
    }

    /// Changes the link (applies to chunks read from now on).
    pub fn set(&self, link: LinkEstimate) {
        if let Ok(mut s) = self.state.lock() {
            *s = link;
        }
    }

    fn get(&self) -> LinkEstimate {
        self.state.lock().map_or(
            LinkEstimate {
                bandwidth_bps: 1e9,
                rtt_ms: 0.0,
            },
            |s| *s,
        )
    }

    /// Listens on 127.0.0.1 (ephemeral port) and forwards every connection to `upstream`
    /// through this link. Returns the listening address; the proxy runs until the runtime
    /// stops.
    ///
    /// # Errors
    /// The listener cannot be bound.
    pub async fn proxy(&self, upstream: SocketAddr) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let link = self.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let link = link.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::spawn(pump(dr, uw, link.clone()));
                    tokio::spawn(pump(ur, dw, link));
                });
            }
        });
        Ok(addr)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: ShapedLink,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut free_at = tokio::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let l = link.get();
        let now = tokio::time::Instant::now();
        let tx_s = if l.bandwidth_bps > 0.0 {
            n as f64 * 8.0 / l.bandwidth_bps
        } else {
            0.0
        };
        free_at = free_at.max(now) + Duration::from_secs_f64(tx_s);
        let at = free_at + Duration::from_secs_f64((l.rtt_ms / 2e3).max(0.0));
        if tx.send((at, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A softmax head on the split activation: the device's local answer and its confidence.
#[derive(Debug, Clone)]
pub struct ExitHead {
    /// Weights, `classes × dim`, row-major.
    w: Vec<f32>,
    /// Bias, `classes`.
    b: Vec<f32>,
    dim: usize,
    /// Answer locally when the top probability is at least this.
    pub tau: f32,
}

impl ExitHead {
    /// (class, top softmax probability) of `a`.
    pub fn answer(&self, a: &[f32]) -> (usize, f32) {
        let classes = self.b.len();
        let mut z: Vec<f32> = (0..classes)
            .map(|c| {
                let row = &self.w[c * self.dim..(c + 1) * self.dim];
                self.b[c] + row.iter().zip(a).map(|(w, x)| w * x).sum::<f32>()
            })
            .collect();
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in &mut z {
            *v = (*v - max).exp();
            sum += *v;
        }
        let (mut best, mut p) = (0, 0.0);
        for (c, v) in z.iter().enumerate() {
            if *v > p {
                (best, p) = (c, *v);
            }
        }
        (best, if sum > 0.0 { p / sum } else { 0.0 })
    }

    /// Multiply-adds of one answer.
    pub fn macs(&self) -> u64 {
        (self.w.len()) as u64
    }

    /// Fits the head by distillation — labels are the full model's predictions — on the
    /// bundle's training rows (the dataset minus the test split), 3 of every 4 rows, by full
    /// batch gradient descent (fixed: zero start, 400 steps, step 0.5 on standardised-scale
    /// inputs), and calibrates τ on the 4th rows: the smallest τ whose cascade accuracy (local
    /// when confident, else the full model) loses at most `max_loss` against the full model.
    ///
    /// # Errors
    /// A dataset that cannot be loaded or does not match the bundle.
    pub fn fit(bundle: &Bundle, test: &TestSet, max_loss: f64) -> anyhow::Result<ExitHead> {
        let name = &bundle.manifest().dataset;
        let ds = Dataset::load(name, &utility::data_dir())
            .with_context(|| format!("loading dataset {name} for the exit head"))?;
        let held: std::collections::HashSet<usize> = test.indices.iter().copied().collect();
        let (mut fit, mut cal) = (Vec::new(), Vec::new());
        for (k, i) in (0..ds.y.len()).filter(|i| !held.contains(i)).enumerate() {
            let x: Vec<f32> = ds.x.row(i).iter().map(|v| *v as f32).collect();
            let a = bundle.device_prefix(&x)?;
            let full = bundle.predict_plain(&x)?.class;
            let row = (a, full, ds.y[i]);
            if k % 2 == 1 {
                cal.push(row);
            } else {
                fit.push(row);
            }
        }
        let dim = fit.first().map_or(0, |r| r.0.len());
        let classes = bundle.classes();
        if dim == 0 || fit.is_empty() || cal.is_empty() {
            bail!("{name}: no training rows outside the test split");
        }
        // Scale: the mean activation magnitude, so one step size fits every bundle.
        let scale = fit
            .iter()
            .flat_map(|r| r.0.iter())
            .map(|v| v.abs())
            .sum::<f32>()
            / (fit.len() * dim) as f32;
        let s = if scale > 0.0 { 1.0 / scale } else { 1.0 };
        let mut head = ExitHead {
            w: vec![0.0; classes * dim],
            b: vec![0.0; classes],
            dim,
            tau: 1.0,
        };
        let n = fit.len() as f32;
        for _ in 0..400 {
            let mut gw = vec![0.0f32; classes * dim];
            let mut gb = vec![0.0f32; classes];
            for (a, t, _) in &fit {
                let xs: Vec<f32> = a.iter().map(|v| v * s).collect();
                let mut z: Vec<f32> = (0..classes)
                    .map(|c| {
                        head.b[c]
                            + head.w[c * dim..(c + 1) * dim]
                                .iter()
                                .zip(&xs)
                                .map(|(w, x)| w * x)
                                .sum::<f32>()
                    })
                    .collect();
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = z
                    .iter_mut()
                    .map(|v| {
                        *v = (*v - max).exp();
                        *v
                    })
                    .sum();
                for c in 0..classes {
                    let g = z[c] / sum - if c == *t { 1.0 } else { 0.0 };
                    gb[c] += g;
                    for j in 0..dim {
                        gw[c * dim + j] += g * xs[j];
                    }
                }
            }
            for (w, g) in head.w.iter_mut().zip(&gw) {
                *w -= 0.5 * g / n;
            }
            for (b, g) in head.b.iter_mut().zip(&gb) {
                *b -= 0.5 * g / n;
            }
        }
        // Fold the input scale into the weights.
        for w in &mut head.w {
            *w *= s;
        }
        // τ: the smallest threshold (over the calibration confidences) within the loss.
        let answers: Vec<(usize, f32, usize, usize)> = cal
            .iter()
            .map(|(a, full, y)| {
                let (c, p) = head.answer(a);
                (c, p, *full, *y)
            })
            .collect();
        let full_acc = answers.iter().filter(|r| r.2 == r.3).count() as f64 / answers.len() as f64;
        let mut taus: Vec<f32> = answers.iter().map(|r| r.1).collect();
        taus.push(1.0);
        taus.sort_by(f32::total_cmp);
        let _ = full_acc;
        for tau in taus {
            // Harm only: local answers that are wrong where the full model is right (local
            // answers that fix a full-model error do not buy extra harm).
            let harm = answers
                .iter()
                .filter(|&&(c, p, full, y)| p >= tau && c != full && (c != y || full == y))
                .count() as f64
                / answers.len() as f64;
            if harm <= max_loss {
                head.tau = tau;
                break;
            }
        }
        Ok(head)
    }
}

/// What the planner's decision reads besides the request.
struct Decider<'a> {
    bundle: &'a Bundle,
    /// The fitted head, when the bundle carries none.
    head: Option<&'a ExitHead>,
    split: &'a tandem::device::planner::SplitCosts,
    local_macs: u64,
    ns_per_mac: f64,
}

/// The planner's decision for input `x` on `link`: the exit head's class, whether it is
/// confident (≥ τ), and the plan. Policy: encrypted offload in either output mode; local
/// only when confident (then at the offloaded accuracy: the cascade's calibrated loss).
fn decide(
    d: &Decider<'_>,
    radio: Radio,
    link: LinkEstimate,
    x: &[f32],
) -> anyhow::Result<(usize, bool, tandem::device::planner::Plan)> {
    let (class, confident) = local_answer(d.bundle, d.head, x)?;
    let inputs = PlanInputs {
        model: ModelCosts {
            local_macs: d.local_macs,
            local_accuracy: d.split.offload_accuracy,
            splits: vec![d.split.clone()],
        },
        device: DeviceProfile {
            ns_per_mac: d.ns_per_mac,
            radio,
        },
        link,
        policy: AppPolicy {
            allow_local: confident,
            allow_encrypted: true,
            noised: Vec::new(),
            noised_encrypted: Vec::new(),
            output_modes: vec![OutputMode::Packed, OutputMode::NoKey],
            accuracy_floor: 0.0,
            latency_target_ms: None,
        },
        remaining_rho: 0.0,
        objective: Objective::Latency,
        exit: None,
    };
    Ok((class, confident, plan(&inputs)))
}

/// The device's local answer for `x` and whether it is confident: the bundle's signed exit
/// head (TDM-EXIT-1, `Bundle::exit_confidence`) when it has one, else the fitted `head`.
fn local_answer(
    bundle: &Bundle,
    head: Option<&ExitHead>,
    x: &[f32],
) -> anyhow::Result<(usize, bool)> {
    if let Some(o) = bundle.exit_confidence(x)? {
        return Ok((o.class, o.exit));
    }
    let head = head.context("the bundle has no exit head and none was fitted")?;
    let (class, conf) = head.answer(&bundle.device_prefix(x)?);
    Ok((class, conf >= head.tau))
}

/// One measured request.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ms: f64,
    energy_mj: f64,
    correct: bool,
    epsilon: f64,
}

#[derive(Serialize)]
struct Row {
    trace: String,
    strategy: &'static str,
    requests: usize,
    mean_ms: f64,
    p95_ms: f64,
    energy_mj: f64,
    accuracy: f64,
    epsilon_spent: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    median_prediction_error: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offload_rate: Option<f64>,
    /// Median prediction error over the planner's offloaded requests only.
    #[serde(skip_serializing_if = "Option::is_none")]
    offload_prediction_error: Option<f64>,
}

fn row(trace: &str, strategy: &'static str, s: &[Sample]) -> Row {
    let n = s.len().max(1) as f64;
    let mut ms: Vec<f64> = s.iter().map(|x| x.ms).collect();
    Row {
        trace: trace.to_string(),
        strategy,
        requests: s.len(),
        mean_ms: ms.iter().sum::<f64>() / n,
        p95_ms: percentile(&mut ms, 95.0),
        energy_mj: s.iter().map(|x| x.energy_mj).sum::<f64>() / n,
        accuracy: s.iter().filter(|x| x.correct).count() as f64 / n,
        epsilon_spent: s.iter().map(|x| x.epsilon).sum(),
        median_prediction_error: None,
        offload_rate: None,
        offload_prediction_error: None,
    }
}

/// `tandem bench traces …`.
pub fn run(a: TracesArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

async fn run_async(a: TracesArgs) -> anyhow::Result<()> {
    if a.requests == 0 {
        bail!("--requests must be at least 1");
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&a.traces)
        .with_context(|| format!("reading trace directory {}", a.traces.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    paths.sort();
    let traces: Vec<Trace> = paths
        .iter()
        .map(|p| Trace::load(p))
        .collect::<anyhow::Result<_>>()?;
    if traces.is_empty() {
        bail!("{}: no *.csv traces", a.traces.display());
    }
    let vk = read_verifying_key(&a.verifying_key)?;
    let bundle = Bundle::load(&a.model, &vk, &Limits::default())
        .with_context(|| format!("loading bundle {}", a.model.display()))?;
    let test = TestSet::load(&a.model.join("test.json"))?;
    let measured = super::plan::measure(&bundle, &a.model, true)?;
    // The bundle's signed exit head if it has one; else one fitted here (no disagreement
    // with the full model on the calibration rows).
    let fitted = match bundle.exit_head() {
        Some(_) => None,
        None => Some(ExitHead::fit(&bundle, &test, 0.0)?),
    };
    let (tau, head_macs, head_source) = match (bundle.exit_head(), &fitted) {
        (Some(h), _) => (
            h.threshold(),
            (measured.n_in * bundle.classes()) as u64,
            "signed",
        ),
        (None, Some(h)) => (f64::from(h.tau), h.macs(), "fitted by the bench"),
        (None, None) => bail!("no exit head"),
    };
    let local_macs = measured.prefix_macs + head_macs;
    let ctx = Decider {
        bundle: &bundle,
        head: fitted.as_ref(),
        split: &measured.split,
        local_macs,
        ns_per_mac: measured.ns_per_mac,
    };
    // Profile the planner's local path once (device layers, head, plan): the median over
    // repeated runs is the local candidate's predicted latency, and the decision overhead of
    // an offloaded one.
    let probe = test.x.first().context("empty test split")?;
    let mut t_local = Vec::new();
    for _ in 0..501 {
        let s = Instant::now();
        std::hint::black_box(decide(&ctx, Radio::Wifi, LinkEstimate::NONE, probe)?);
        t_local.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let local_ms = percentile(&mut t_local, 50.0);
    // Clip for the noised strategy: median activation norm on the training side is not
    // needed for a fixed comparison; the device default is used.
    let tmp = tempfile::tempdir()?;
    let pki = DevPki::generate(2)?;
    let mut sopts = ServerOptions::new(
        "127.0.0.1:0".parse()?,
        server_config(pki.server_credentials())?,
        vk,
        tmp.path().join("keys.redb"),
    );
    sopts.models = vec![a.model.clone()];
    let cloud = Cloud::start(sopts).await?;
    let link = ShapedLink::new(LinkEstimate {
        bandwidth_bps: 1e10,
        rtt_ms: 0.0,
    });
    let addr = link.proxy(cloud.local_addr()).await?;
    let mut devices = Vec::new();
    for (k, mode) in [OutputMode::Packed, OutputMode::NoKey]
        .into_iter()
        .enumerate()
    {
        let mut o = DeviceOptions::new(
            addr,
            client_config(pki.client_credentials(&format!("device-{}", k + 1))?)?,
            a.model.clone(),
            vk,
            tmp.path().join(format!("ledger-{k}.bin")),
        );
        o.output_mode = mode;
        o.dp.budget_rho = Some(1e9);
        let mut d = Device::connect(o).await?;
        // Register the evaluation key on the fast link: the traces measure steady state.
        d.infer(probe, Protection::Encrypted).await?;
        devices.push(d);
    }
    let mut rows = Vec::new();
    // The local path's predicted time: the profile, then the EWMA of the planner's own local
    // answers (in a request stream the path runs with colder caches than in the profile loop).
    let mut local_est = local_ms;
    for trace in &traces {
        let radio = trace.radio().model();
        let mut by: std::collections::BTreeMap<&'static str, Vec<Sample>> = Default::default();
        let mut errors = Vec::new();
        let mut errors_off = Vec::new();
        let mut offloads = 0usize;
        let offload_energy = |r: &tandem_device::Inference| {
            energy::compute_mj(
                measured.split.device_prefix_macs + measured.split.device_suffix_macs,
            ) + radio.transfer_mj(
                (r.bytes_up + r.key_upload_bytes) as u64,
                r.bytes_down as u64,
                r.timings.network_ms,
            )
        };
        for i in 0..a.requests {
            let t = i as f64 * trace.duration_s() / a.requests as f64;
            let l = trace.at(t);
            link.set(l);
            let k = i * test.x.len() / a.requests;
            let (x, y) = (&test.x[k], test.y[k]);

            // The planner: exit head first, then the plan, then the chosen request.
            let s = Instant::now();
            let (local_class, confident, p) = decide(&ctx, trace.radio(), l, x)?;
            let choice = p.choice().context("planner found no feasible candidate")?;
            let predicted = match choice.protection {
                PlanProtection::Local => local_est,
                _ => choice.latency_ms + local_est,
            };
            let sample = match (choice.protection, choice.mode) {
                (PlanProtection::Local, _) => Sample {
                    ms: s.elapsed().as_secs_f64() * 1e3,
                    energy_mj: energy::compute_mj(local_macs),
                    correct: local_class == y,
                    epsilon: 0.0,
                },
                (_, mode) => {
                    offloads += 1;
                    let d = if mode == Some(OutputMode::NoKey) {
                        1
                    } else {
                        0
                    };
                    let r = devices[d].infer(x, Protection::Encrypted).await?;
                    Sample {
                        ms: s.elapsed().as_secs_f64() * 1e3,
                        energy_mj: offload_energy(&r) + energy::compute_mj(head_macs),
                        correct: r.class == y,
                        epsilon: 0.0,
                    }
                }
            };
            if choice.protection == PlanProtection::Local {
                // The device learns its local path's time from its own answers (EWMA).
                local_est += 0.3 * (sample.ms - local_est);
            }
            let err = (predicted - sample.ms).abs() / sample.ms.max(1e-9);
            errors.push(err);
            if choice.protection != PlanProtection::Local {
                errors_off.push(err);
            }
            by.entry("planner").or_default().push(sample);

            // Fixed strategies, same slot.
            let s = Instant::now();
            let (c, _) = local_answer(&bundle, fitted.as_ref(), x)?;
            let local = Sample {
                ms: s.elapsed().as_secs_f64() * 1e3,
                energy_mj: energy::compute_mj(local_macs),
                correct: c == y,
                epsilon: 0.0,
            };
            by.entry("local").or_default().push(local);
            let mut offl = Vec::new();
            for (d, name) in [(0, "encrypted_packed"), (1, "encrypted_nokey")] {
                let s = Instant::now();
                let r = devices[d].infer(x, Protection::Encrypted).await?;
                let smp = Sample {
                    ms: s.elapsed().as_secs_f64() * 1e3,
                    energy_mj: offload_energy(&r),
                    correct: r.class == y,
                    epsilon: 0.0,
                };
                offl.push(smp);
                by.entry(name).or_default().push(smp);
            }
            let s = Instant::now();
            let r = devices[0]
                .infer(x, Protection::Noised { epsilon: a.epsilon })
                .await?;
            by.entry("noised").or_default().push(Sample {
                ms: s.elapsed().as_secs_f64() * 1e3,
                energy_mj: offload_energy(&r),
                correct: r.class == y,
                epsilon: r.epsilon_spent,
            });
            // The oracle: the fastest measured candidate the policy allows for this request.
            let mut allowed = offl;
            if confident {
                allowed.push(local);
            }
            if let Some(best) = allowed.into_iter().min_by(|p, q| p.ms.total_cmp(&q.ms)) {
                by.entry("oracle").or_default().push(best);
            }
        }
        for name in [
            "planner",
            "oracle",
            "local",
            "encrypted_packed",
            "encrypted_nokey",
            "noised",
        ] {
            let s = by.get(name).map(Vec::as_slice).unwrap_or_default();
            let mut r = row(&trace.name, name, s);
            if name == "planner" {
                r.median_prediction_error = Some(percentile(&mut errors, 50.0));
                r.offload_rate = Some(offloads as f64 / a.requests as f64);
                if !errors_off.is_empty() {
                    r.offload_prediction_error = Some(percentile(&mut errors_off, 50.0));
                }
            }
            rows.push(r);
        }
    }
    for d in devices {
        d.close().await;
    }
    cloud.shutdown().await;

    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "exit head ({head_source}): tau {tau:.3}; local path {local_ms:.4} ms (profiled); {} \
             requests per trace",
            a.requests
        );
        println!(
            "{:<6} {:<17} {:>9} {:>9} {:>10} {:>9} {:>8}  pred.err",
            "trace", "strategy", "mean ms", "p95 ms", "energy mJ", "accuracy", "eps"
        );
        for r in &rows {
            println!(
                "{:<6} {:<17} {:>9.2} {:>9.2} {:>10.2} {:>9.4} {:>8.1}  {}",
                r.trace,
                r.strategy,
                r.mean_ms,
                r.p95_ms,
                r.energy_mj,
                r.accuracy,
                r.epsilon_spent,
                r.median_prediction_error
                    .map_or(String::new(), |e| format!("{:.1}%", e * 100.0))
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn trace_lookup_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "time_s,bandwidth_kbit,rtt_ms\n0,1000,50\n1,2000,60\n").unwrap();
        let t = Trace::load(&p).unwrap();
        assert_eq!(t.at(0.5).bandwidth_bps, 1e6);
        assert_eq!(t.at(1.0).rtt_ms, 60.0);
        assert_eq!(t.at(99.0).bandwidth_bps, 2e6);
        assert_eq!(t.duration_s(), 2.0);
        for bad in [
            "h\n0,0,50\n",
            "h\n0,1,x\n",
            "h\n1,1,1\n0,1,1\n",
            "h\n",
            "h\n0,1\n",
        ] {
            std::fs::write(&p, bad).unwrap();
            assert!(Trace::load(&p).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn committed_traces_load() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/traces");
        for name in ["3g", "lte", "wifi"] {
            let t = Trace::load(&dir.join(format!("{name}.csv"))).unwrap();
            assert!(t.duration_s() >= 120.0, "{name}: a few minutes");
        }
    }

    /// The shaped link delays a transfer by RTT/2 + bytes / bandwidth each way (real sockets).
    #[test]
    fn shaped_link_paces_and_delays() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let up = echo.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = echo.accept().await.unwrap();
                let mut b = vec![0u8; 40_000];
                s.read_exact(&mut b).await.unwrap();
                s.write_all(&b[..1000]).await.unwrap();
            });
            let link = ShapedLink::new(LinkEstimate {
                bandwidth_bps: 8e6,
                rtt_ms: 100.0,
            });
            let addr = link.proxy(up).await.unwrap();
            let mut c = TcpStream::connect(addr).await.unwrap();
            let start = Instant::now();
            c.write_all(&[7u8; 40_000]).await.unwrap();
            let mut back = vec![0u8; 1000];
            c.read_exact(&mut back).await.unwrap();
            let ms = start.elapsed().as_secs_f64() * 1e3;
            // 41 000 bytes at 1 MB/s = 41 ms, plus one RTT of 100 ms.
            assert!(ms >= 140.0, "{ms} ms: not shaped");
            assert!(back.iter().all(|&b| b == 7));
        });
    }
}
