//! `tandem bench traces`: the planner against fixed strategies and the per-request oracle on
//! shaped loopback links that follow the committed link traces (`data/traces/*.csv`,
//! `specs/planner.md` §6).
//!
//! Real requests: the cloud runs in-process on 127.0.0.1 behind mutual TLS; two devices (one
//! session per output mode) reach it through an in-process shaping proxy ([`ShapedLink`]) whose
//! bandwidth and RTT the harness sets from the trace before each request. Request `i` of a
//! trace runs at trace time `i · duration / N` (a time slot) and every strategy's request of
//! that slot sees the same link, so the oracle — the best candidate in hindsight among those
//! the planner's policy allows for that request — is the minimum of the measured candidates
//! (the planner's own run included).
//!
//! The `planner` strategy is the product's own path: `Device::answer(x, Protection::Auto)`
//! with early exit on (the bundle's signed exit head; off with `--no-early-exit`), which
//! answers locally when the head is confident (confidence ≥ τ) and otherwise offloads as its
//! plan says. A session's output mode is fixed at connect, so the output-mode choice is made
//! by asking both sessions' `Device::plan_for` and letting the cheaper one answer. The link
//! input is the trace's value in the slot (`Device::set_link_report`, what a link monitor
//! reports); the device's stage times and local-answer time are its own EWMAs after a profile
//! run. Policy: encrypted offload; DP releases are not offered (their accuracy on these bundles
//! is far below offloading: `BENCHMARKS.md`). The fixed `noised` strategy still runs, for
//! comparison. `--plot FILE` writes an SVG of the latencies (`plotters`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use tandem::device::energy::{self, Radio};
use tandem::device::planner::{AutoPolicy, LinkEstimate, PlanProtection};
use tandem::he::OutputMode;
use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::{Answer, Device, DeviceOptions, EarlyExit, Protection};
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
    /// Early exit off: the planner and the oracle never answer locally (the comparison then
    /// rests on offloads only; the `local` row still shows the exit head alone).
    #[arg(long)]
    no_early_exit: bool,
    /// Also write an SVG plot of mean and p95 latency per (trace, strategy) to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
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

/// The oracle's sample of one request: the fastest of the measured runs of the candidates the
/// planner's policy allows (the fixed offloads, the exit head's local answer when it is
/// allowed, and the planner's own run, which is one of those candidates measured in the same
/// slot). Was: the planner's run was left out, so the "oracle" could be slower than the
/// planner it bounds (3g, 10 requests: oracle 43.71 ms, planner 43.65 ms).
fn oracle_sample(planner: Sample, offloads: &[Sample], local: Option<Sample>) -> Sample {
    offloads
        .iter()
        .copied()
        .chain(local)
        .fold(planner, |best, s| if s.ms < best.ms { s } else { best })
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
    /// Whether the planner (and the oracle) could answer locally through the exit head.
    early_exit: bool,
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

fn row(trace: &str, strategy: &'static str, s: &[Sample], early_exit: bool) -> Row {
    let n = s.len().max(1) as f64;
    let mut ms: Vec<f64> = s.iter().map(|x| x.ms).collect();
    Row {
        trace: trace.to_string(),
        strategy,
        early_exit,
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

/// The energy of one measured offload (`specs/planner.md` §2 on the measured values): the
/// device's multiply-adds (`macs`), the CPU time of noise, encryption and decryption at the
/// CPU's active power, and the radio for the measured bytes and network time.
fn offload_energy(r: &tandem_device::Inference, macs: u64, radio: energy::RadioModel) -> f64 {
    energy::compute_mj(macs)
        + energy::cpu_mj(r.timings.dp_ms + r.timings.encrypt_ms + r.timings.decrypt_ms)
        + radio.transfer_mj(
            (r.bytes_up + r.key_upload_bytes) as u64,
            r.bytes_down as u64,
            r.timings.network_ms,
        )
}

/// Most requests per trace (each is a real request of every strategy: 100 000 take hours).
const MAX_REQUESTS: usize = 100_000;

/// `--requests` in `1..=MAX_REQUESTS`. Was: 0 refused, but 2^64 − 1 accepted (a run that never
/// ends, and `i · rows` overflowing the row index).
fn check_requests(n: usize) -> anyhow::Result<()> {
    if n == 0 || n > MAX_REQUESTS {
        bail!("--requests {n}: must be in 1..={MAX_REQUESTS}");
    }
    Ok(())
}

fn ms_since(s: Instant) -> f64 {
    s.elapsed().as_secs_f64() * 1e3
}

/// EWMA step (weight 0.3 for the new sample).
fn ewma(old: Option<f64>, x: f64) -> Option<f64> {
    Some(old.map_or(x, |o| o + 0.3 * (x - o)))
}

async fn run_async(a: TracesArgs) -> anyhow::Result<()> {
    check_requests(a.requests)?;
    if !(a.epsilon.is_finite() && a.epsilon > 0.0) {
        bail!("--epsilon {}: must be positive and finite", a.epsilon);
    }
    // Fail before minutes of measurements, not after them.
    if let Some(path) = &a.plot {
        std::fs::File::create(path)
            .with_context(|| format!("--plot {}: cannot create the file", path.display()))?;
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
    if bundle.encoder().is_some() {
        bail!(
            "{}: an encoder bundle; `bench traces` runs the MLP bundles (one cloud layer and a \
             test.json, e.g. models/digits); for an encoder's split depths use `tandem bench \
             sentence --split`",
            a.model.display()
        );
    }
    let test = TestSet::load(&a.model.join("test.json"))?;
    let measured = super::plan::measure(&bundle, &a.model, true)?;
    let Some(head) = bundle.exit_head() else {
        bail!(
            "{}: no signed exit head; the planner's local candidate needs one (`tandem exit-head \
             --model {} --key <signing key>` trains, calibrates and signs it)",
            a.model.display(),
            a.model.display()
        );
    };
    let tau = head.threshold();
    let head_macs = (measured.n_in * bundle.classes()) as u64;
    let local_macs = measured.prefix_macs + head_macs;
    let offload_macs = measured.split.device_prefix_macs + measured.split.device_suffix_macs;
    let early_exit = !a.no_early_exit;
    let probe = test.x.first().context("empty test split")?;
    // A confident and an unconfident row, to profile both paths of the device.
    let mut confident_row = None;
    let mut unconfident_row = None;
    for x in &test.x {
        match bundle.exit_confidence(x)? {
            Some(o) if o.exit => confident_row = confident_row.or(Some(x)),
            Some(_) => unconfident_row = unconfident_row.or(Some(x)),
            None => {}
        }
    }

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
    let fast = LinkEstimate {
        bandwidth_bps: 1e10,
        rtt_ms: 0.0,
    };
    let link = ShapedLink::new(fast);
    let addr = link.proxy(cloud.local_addr()).await?;
    // One device (one session, one evaluation key) per output mode: a session's output mode
    // is fixed at connect, so the planner's output-mode choice is the choice of session.
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
        d.set_early_exit(if early_exit {
            EarlyExit::On
        } else {
            EarlyExit::Off
        });
        d.set_auto_policy(AutoPolicy {
            ns_per_mac: measured.ns_per_mac,
            ..AutoPolicy::default()
        });
        d.set_link_report(Some(fast));
        // Register the evaluation key on the fast link (the traces measure steady state),
        // then profile the device's own paths once: its local answers (device layers, head,
        // plan) and its encrypted offloads (encryption, decryption), through `Protection::Auto`
        // itself; the device keeps the EWMA of both.
        d.infer(probe, Protection::Encrypted).await?;
        for _ in 0..10 {
            if let Some(x) = unconfident_row {
                d.answer(x, Protection::Auto).await?;
            }
        }
        if early_exit {
            for _ in 0..200 {
                if let Some(x) = confident_row {
                    d.answer(x, Protection::Auto).await?;
                }
            }
        }
        devices.push(d);
    }
    let local_profile_ms = devices[0].local_answer_ms();

    let mut rows = Vec::new();
    // The bench's own overhead around the device call: planning the other session too (the
    // output-mode choice), as an EWMA per kind of answer.
    let (mut pre_local, mut pre_offload): (Option<f64>, Option<f64>) = (None, None);
    for trace in &traces {
        let radio = trace.radio().model();
        for d in &mut devices {
            d.set_auto_policy(AutoPolicy {
                ns_per_mac: measured.ns_per_mac,
                radio: trace.radio(),
                ..AutoPolicy::default()
            });
        }
        let mut by: std::collections::BTreeMap<&'static str, Vec<Sample>> = Default::default();
        let mut errors = Vec::new();
        let mut errors_off = Vec::new();
        let mut offloads = 0usize;
        for i in 0..a.requests {
            let t = i as f64 * trace.duration_s() / a.requests as f64;
            let l = trace.at(t);
            link.set(l);
            for d in &mut devices {
                d.set_link_report(Some(l));
            }
            // `i < requests <= 100 000` and the rows of a size-limited file: no overflow.
            let k = i * test.x.len() / a.requests;
            let (Some(x), Some(&y)) = (test.x.get(k), test.y.get(k)) else {
                bail!("test row {k} out of range");
            };
            let verdict = bundle.exit_confidence(x)?;
            let confident = early_exit && verdict.as_ref().is_some_and(|o| o.exit);

            // The planner: the device's own `Protection::Auto` (exit head, plan, request).
            // Its plan for this request on the packed session decides; if it offloads, the
            // no-key session's plan is asked too and the cheaper offload's session answers.
            let s = Instant::now();
            let p0 = devices[0].plan_for(x, None)?;
            let (d, plan) = if p0.answers_locally() {
                (0, p0)
            } else {
                let p1 = devices[1].plan_for(x, None)?;
                let lat = |p: &tandem_device::planner::Plan| {
                    p.choice().map_or(f64::INFINITY, |c| c.latency_ms)
                };
                if lat(&p1) < lat(&p0) {
                    (1, p1)
                } else {
                    (0, p0)
                }
            };
            let pre_ms = ms_since(s);
            let choice = plan
                .choice()
                .context("the planner found no feasible candidate")?;
            let local = choice.protection == PlanProtection::Local;
            let pre_est = if local { pre_local } else { pre_offload };
            let predicted = choice.latency_ms + pre_est.unwrap_or(pre_ms);
            let answer = devices[d].answer(x, Protection::Auto).await?;
            let ms = ms_since(s);
            if local {
                pre_local = ewma(pre_local, pre_ms);
            } else {
                pre_offload = ewma(pre_offload, pre_ms);
            }
            let sample = match &answer {
                Answer::Local { class, .. } => Sample {
                    ms,
                    energy_mj: energy::compute_mj(local_macs),
                    correct: *class == y,
                    epsilon: 0.0,
                },
                Answer::Offloaded { inference: r, .. } => {
                    offloads += 1;
                    let head = if early_exit { head_macs } else { 0 };
                    Sample {
                        ms,
                        energy_mj: offload_energy(r, offload_macs + head, radio),
                        correct: r.class == y,
                        epsilon: r.epsilon_spent,
                    }
                }
            };
            let err = (predicted - sample.ms).abs() / sample.ms.max(1e-9);
            errors.push(err);
            if !answer.is_local() {
                errors_off.push(err);
            }
            by.entry("planner").or_default().push(sample);
            let planner_sample = sample;

            // Fixed strategies, same slot.
            let s = Instant::now();
            let c = bundle.exit_confidence(x)?.map_or(usize::MAX, |o| o.class);
            let local_sample = Sample {
                ms: ms_since(s),
                energy_mj: energy::compute_mj(local_macs),
                correct: c == y,
                epsilon: 0.0,
            };
            by.entry("local").or_default().push(local_sample);
            let mut offl = Vec::new();
            for (d, name) in [(0, "encrypted_packed"), (1, "encrypted_nokey")] {
                let s = Instant::now();
                let r = devices[d].infer(x, Protection::Encrypted).await?;
                let smp = Sample {
                    ms: ms_since(s),
                    energy_mj: offload_energy(&r, offload_macs, radio),
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
                ms: ms_since(s),
                energy_mj: offload_energy(&r, offload_macs, radio),
                correct: r.class == y,
                epsilon: r.epsilon_spent,
            });
            // The oracle: the fastest measured candidate the planner's policy allows for this
            // request (local only when early exit is on and the head is confident), the
            // planner's own run among them (its choice is one of those candidates, measured in
            // the same slot): the oracle is never slower than the planner on a request.
            let best = oracle_sample(planner_sample, &offl, confident.then_some(local_sample));
            by.entry("oracle").or_default().push(best);
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
            let mut r = row(&trace.name, name, s, early_exit);
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
            "exit head (signed): tau {tau:.4}, early exit {}; device local answer {} (profiled, \
             then learnt); {} requests per trace",
            if early_exit { "on" } else { "off" },
            local_profile_ms.map_or("not profiled".into(), |m| format!("{m:.4} ms")),
            a.requests
        );
        println!(
            "{:<6} {:<17} {:>9} {:>9} {:>10} {:>9} {:>8}  pred.err (all / offloads)",
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
                match (r.median_prediction_error, r.offload_prediction_error) {
                    (Some(e), Some(o)) => format!("{:.1}% / {:.1}%", e * 100.0, o * 100.0),
                    (Some(e), None) => format!("{:.1}%", e * 100.0),
                    _ => String::new(),
                }
            );
        }
    }
    if let Some(path) = &a.plot {
        write_plot(path, &rows, early_exit)?;
        if !a.json {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Plots mean (filled circle) and p95 (triangle) latency per strategy, one colour per trace,
/// on a log axis, as SVG (`plotters`, SVG backend: no system fonts).
///
/// # Errors
/// The file cannot be written.
fn write_plot(path: &Path, rows: &[Row], early_exit: bool) -> anyhow::Result<()> {
    use plotters::prelude::*;
    const STRATEGIES: [&str; 6] = [
        "planner",
        "oracle",
        "local",
        "encrypted_packed",
        "encrypted_nokey",
        "noised",
    ];
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plotting {}: {e}", path.display());
    let mut traces: Vec<&str> = rows.iter().map(|r| r.trace.as_str()).collect();
    traces.dedup();
    let floor = 1e-3;
    let ys = rows.iter().flat_map(|r| [r.mean_ms, r.p95_ms]);
    let (lo, hi) = ys.fold((f64::INFINITY, 0.0f64), |(lo, hi), y| {
        (lo.min(y.max(floor)), hi.max(y))
    });
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        (lo / 2.0, hi * 2.0)
    } else {
        (floor, 1.0)
    };
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "tandem bench traces: latency per strategy (early exit {})",
        if early_exit { "on" } else { "off" }
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..5.5f64, (lo..hi).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_labels(STRATEGIES.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                STRATEGIES
                    .get(i as usize)
                    .copied()
                    .unwrap_or("")
                    .to_string()
            } else {
                String::new()
            }
        })
        .y_desc("ms per request (circle: mean, triangle: p95), log scale")
        .draw()
        .map_err(|e| err(&e))?;
    for (k, t) in traces.iter().enumerate() {
        const COLORS: [RGBColor; 4] = [
            RGBColor(215, 48, 39),
            RGBColor(69, 117, 180),
            RGBColor(26, 152, 80),
            RGBColor(90, 90, 90),
        ];
        let color = COLORS[k % COLORS.len()].to_rgba();
        let dx = (k as f64 - (traces.len() as f64 - 1.0) / 2.0) * 0.18;
        let pts: Vec<(f64, f64, f64)> = STRATEGIES
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                rows.iter()
                    .find(|r| r.trace == *t && r.strategy == *s)
                    .map(|r| (i as f64 + dx, r.mean_ms.max(floor), r.p95_ms.max(floor)))
            })
            .collect();
        chart
            .draw_series(
                pts.iter()
                    .map(|&(x, m, _)| Circle::new((x, m), 5, color.filled())),
            )
            .map_err(|e| err(&e))?
            .label(t.to_string())
            .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
        chart
            .draw_series(
                pts.iter()
                    .map(|&(x, _, p)| TriangleMarker::new((x, p), 6, color.stroke_width(2))),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
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

    /// The oracle is never slower than the planner on a request: the planner's own run is
    /// one of the candidates it takes the minimum of (it was left out before).
    #[test]
    fn the_oracle_is_never_slower_than_the_planner() {
        let smp = |ms: f64, correct: bool| Sample {
            ms,
            energy_mj: ms,
            correct,
            epsilon: 0.0,
        };
        // The planner's offload happened to be faster than the fixed runs of the same slot.
        let o = oracle_sample(smp(40.0, true), &[smp(45.0, true), smp(44.0, true)], None);
        assert_eq!((o.ms, o.energy_mj), (40.0, 40.0));
        // A faster fixed run or an allowed local answer wins.
        let o = oracle_sample(smp(40.0, true), &[smp(39.0, true)], None);
        assert_eq!(o.ms, 39.0);
        let o = oracle_sample(smp(40.0, true), &[smp(39.0, true)], Some(smp(0.01, false)));
        assert_eq!((o.ms, o.correct), (0.01, false));
    }

    #[test]
    fn request_counts_are_bounded() {
        assert!(check_requests(1).is_ok());
        assert!(check_requests(MAX_REQUESTS).is_ok());
        assert!(check_requests(0).is_err());
        assert!(check_requests(usize::MAX).is_err());
    }

    /// `--plot` writes an SVG naming every trace and strategy (plotters, no system fonts).
    #[test]
    fn plot_names_every_trace_and_strategy() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.svg");
        let samples = |ms: f64| {
            vec![Sample {
                ms,
                energy_mj: 1.0,
                correct: true,
                epsilon: 0.0,
            }]
        };
        let mut rows = Vec::new();
        for (k, t) in ["3g", "wifi"].into_iter().enumerate() {
            for (i, s) in [
                "planner",
                "oracle",
                "local",
                "encrypted_packed",
                "encrypted_nokey",
                "noised",
            ]
            .into_iter()
            .enumerate()
            {
                rows.push(row(t, s, &samples((1 + i + k) as f64 * 3.0), true));
            }
        }
        write_plot(&p, &rows, true).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"));
        for name in [
            "3g",
            "wifi",
            "planner",
            "encrypted_nokey",
            "noised",
            "early exit on",
        ] {
            assert!(svg.contains(name), "{name} missing");
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
