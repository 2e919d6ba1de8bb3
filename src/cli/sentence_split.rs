//! `tandem bench sentence --split K[,K..|auto]` (issue 10, TDM-SPLIT-1/2): one sentence
//! embedding per token count, split depth and repetition, the first `K` blocks run on the
//! device in the clear and the linears of the rest by the cloud under encryption, over mutual
//! TLS — the loopback cloud of `tandem bench sentence` (optionally behind the shaped link of
//! `tandem bench traces`: `--bandwidth`, `--rtt`) or `--cloud`.
//!
//! The device needs the int8 weights of the blocks it runs: the bundle is loaded with its
//! cloud weights file (`Part::Full`). `auto` takes the depth `tandem plan` would choose for the
//! link given by `--bandwidth`/`--rtt`; with `--bandwidth` every line also carries the
//! planner's prediction (`predicted_e2e_s`) from the cached device profile
//! (`plan_encoder::load_or_profile`). JSON lines keep the keys of `bench sentence` and add
//! `split`, `split_requested`, `rep`, `bandwidth_bps`, `rtt_ms` and `predicted_e2e_s`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use serde::Serialize;
use tandem::device::energy::Radio;
use tandem::device::planner::{plan_split, LinkEstimate, Objective, SplitOptions};
use tandem_device::RemoteLayers;
use tandem_he::{Context as HeContext, OutputMode};
use tandem_model::{Bundle, Part};
use tandem_ops::{
    BundleEncoder, BundleLinears, CloudLayers, OpsError, QuantizedWeights, SplitProfile,
};

use super::sentence::{CloudArgs, Endpoint, RunLine};

/// The split-depth options of `tandem bench sentence`.
#[derive(Args, Clone, Default)]
pub struct SplitArgs {
    /// Split depths to measure, comma-separated: a number of blocks to run on the device in
    /// the clear (0 = every linear offloaded, the default path without --split; the block
    /// count = all on the device), or `auto` (the planner's choice for --bandwidth/--rtt).
    #[arg(long, value_delimiter = ',')]
    pub split: Vec<String>,
    /// Shape the loopback link to this bandwidth (e.g. `20mbit`; the token-bucket proxy of
    /// `tandem bench traces`) and predict each run's latency for it; with --cloud only the
    /// link the planner assumes.
    #[arg(long)]
    pub bandwidth: Option<String>,
    /// Round-trip time of the shaped link / the planner's link (e.g. `20ms`).
    #[arg(long, default_value = "0ms")]
    pub rtt: String,
    /// Runs per (tokens, split): one JSON line each.
    #[arg(long, default_value_t = 1)]
    pub reps: usize,
    /// The device profile file for predictions and `auto` (default: the cache path of
    /// `tandem plan`).
    #[arg(long)]
    pub split_profile: Option<PathBuf>,
}

impl SplitArgs {
    /// Whether `--split` was given.
    pub fn active(&self) -> bool {
        !self.split.is_empty()
    }
}

/// The session's cloud layers, recording per layer the evaluation time the cloud reported in
/// its answers (`InferResponse.cloud_eval_us`, advisory): a sentence's requests are sequential,
/// so the session counter's change around one request is that layer's report.
struct ReportedTimes {
    remote: Arc<RemoteLayers>,
    /// Per layer: (sum of reported ms, reports).
    per_layer: Mutex<Vec<(f64, u64)>>,
}

impl ReportedTimes {
    /// Mean reported ms per layer, `profile`'s in-process time where none was reported yet.
    fn cloud_ms(&self, profile: &SplitProfile) -> Vec<f64> {
        let r = self
            .per_layer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        profile
            .linears
            .iter()
            .map(|l| match r.get(l.index) {
                Some(&(sum, n)) if n > 0 => sum / n as f64,
                _ => l.cloud_ms,
            })
            .collect()
    }
}

impl CloudLayers for ReportedTimes {
    fn load(
        &self,
        index: usize,
        plan: &tandem_he::LayerPlan,
        weights: &QuantizedWeights,
    ) -> Result<(), OpsError> {
        self.remote.load(index, plan, weights)
    }

    fn upload_key(&self, key: &[u8]) -> Result<(), OpsError> {
        self.remote.upload_key(key)
    }

    fn evaluate(&self, index: usize, request: &[u8]) -> Result<Vec<u8>, OpsError> {
        let before = self.remote.stats();
        let reply = self.remote.evaluate(index, request)?;
        let after = self.remote.stats();
        if after.cloud_eval_reports > before.cloud_eval_reports {
            let mut r = self
                .per_layer
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if r.len() <= index {
                r.resize(index + 1, (0.0, 0));
            }
            if let Some(e) = r.get_mut(index) {
                e.0 += (after.cloud_eval_s - before.cloud_eval_s) * 1e3;
                e.1 += 1;
            }
        }
        Ok(reply)
    }
}

#[derive(Serialize)]
struct Line {
    /// The keys of `bench sentence`.
    #[serde(flatten)]
    run: RunLine,
    /// Blocks run on the device in the clear.
    split: usize,
    /// What was asked (`auto` or the number).
    split_requested: String,
    rep: usize,
    /// Shaped / assumed link (`null` without --bandwidth).
    bandwidth_bps: Option<f64>,
    rtt_ms: Option<f64>,
    /// The planner's prediction for this depth and link (`null` without --bandwidth), cloud
    /// time from the device profile (in-process evaluation, measured once).
    predicted_e2e_s: Option<f64>,
    /// The same with the cloud time of each layer taken from what the cloud reported on this
    /// session so far (mean per layer; the profile's where none yet).
    predicted_reported_e2e_s: Option<f64>,
}

/// Runs the split-depth benchmark (`tandem bench sentence --split ...`).
pub fn bench(
    model: &std::path::Path,
    c: &CloudArgs,
    tokens: &[usize],
    threads: usize,
    json: bool,
    a: &SplitArgs,
) -> anyhow::Result<()> {
    let (bundle, vk) = super::sentence::load_encoder_bundle(model, &c.key, Part::Full)?;
    let link = match &a.bandwidth {
        Some(b) => Some(LinkEstimate {
            bandwidth_bps: super::plan::parse_bandwidth(b)?,
            rtt_ms: super::plan::parse_rtt_ms(&a.rtt)?,
        }),
        None => None,
    };
    if link.is_some_and(|l| l.bandwidth_bps <= 0.0) {
        bail!("--bandwidth must be > 0 for a shaped link");
    }
    let wants_auto = a.split.iter().any(|s| s == "auto");
    if wants_auto && link.is_none() {
        bail!("--split auto needs --bandwidth and --rtt (the link the planner plans for)");
    }
    // Profiles first (in process, before the loopback cloud holds its own copy of the layers).
    let mut profiles: Vec<(usize, SplitProfile)> = Vec::new();
    if link.is_some() {
        for &t in tokens {
            // One file per token count: --split-profile names it for a single --tokens value.
            let path = a.split_profile.clone().filter(|_| tokens.len() == 1);
            let (p, _) = super::plan_encoder::load_or_profile(&bundle, t, path.as_deref())?;
            profiles.push((t, p));
        }
    }

    // The session: loopback cloud (shaped) or --cloud.
    let endpoint = Endpoint::open(
        model,
        c,
        vk,
        threads,
        link,
        "sentence-split",
        OutputMode::Packed,
    )?;
    let remote = endpoint.connect(&bundle, OutputMode::Packed, Duration::from_secs(300))?;
    let reported = Arc::new(ReportedTimes {
        remote: remote.clone(),
        per_layer: Mutex::new(Vec::new()),
    });
    let encoder = BundleEncoder::from_bundle(
        &bundle,
        BundleLinears::Encrypted {
            ctx: Arc::new(HeContext::new(remote.params())),
            mode: OutputMode::Packed,
            cloud: reported.clone(),
        },
    )?;
    encoder.upload_key()?;
    let key_upload_bytes = remote.stats().key_upload_bytes;
    let depths = encoder.split_depths();
    let result = run_lines(
        &bundle,
        &encoder,
        &remote,
        &reported,
        tokens,
        threads,
        json,
        a,
        link,
        &profiles,
        &depths,
        key_upload_bytes,
    );
    remote.close();
    endpoint.shutdown();
    result
}

#[allow(clippy::too_many_arguments)]
fn run_lines(
    bundle: &Bundle,
    encoder: &BundleEncoder,
    remote: &RemoteLayers,
    reported: &ReportedTimes,
    tokens: &[usize],
    threads: usize,
    json: bool,
    a: &SplitArgs,
    link: Option<LinkEstimate>,
    profiles: &[(usize, SplitProfile)],
    depths: &[usize],
    key_upload_bytes: u64,
) -> anyhow::Result<()> {
    for &t in tokens {
        let e = super::plan_encoder::sentence(encoder, t)?;
        let profile = profiles.iter().find(|(pt, _)| *pt == t).map(|(_, p)| p);
        let plan_with = |cloud_ms: Option<Vec<f64>>| match (link, profile) {
            (Some(l), Some(p)) => {
                let mut o = SplitOptions::all_depths(p);
                o.depths = depths.to_vec();
                o.radio = Radio::Wifi;
                o.objective = Objective::Latency;
                o.cloud_ms = cloud_ms;
                Some(plan_split(p, l, &o))
            }
            _ => None,
        };
        let plan = plan_with(None);
        // One unreported sentence first at the lowest depth asked for, so that the cloud has
        // reported every layer the measured runs offload.
        if let (Some(_), Some(min)) = (
            plan.as_ref(),
            a.split.iter().filter_map(|s| s.parse::<usize>().ok()).min(),
        ) {
            if depths.contains(&min) {
                encoder.embed_encoded_split(&e, min)?;
            }
        }
        for requested in &a.split {
            let k = if requested == "auto" {
                match plan.as_ref().and_then(|p| p.choice()) {
                    Some(c) => c.depth,
                    None => bail!("--split auto: no feasible depth on this link"),
                }
            } else {
                requested.parse::<usize>().with_context(|| {
                    format!("--split {requested}: expected a block count or `auto`")
                })?
            };
            if !depths.contains(&k) {
                bail!(
                    "--split {k}: this device can run depths {depths:?} of {}",
                    bundle.id()
                );
            }
            let predicted = plan
                .as_ref()
                .and_then(|p| p.candidates.get(k))
                .map(|c| c.latency_ms / 1e3);
            for rep in 0..a.reps.max(1) {
                let predicted_reported = profile
                    .and_then(|p| plan_with(Some(reported.cloud_ms(p))))
                    .and_then(|p| p.candidates.get(k).map(|c| c.latency_ms / 1e3));
                let before = remote.stats();
                let he = encoder.session().map(|x| x.stats()).unwrap_or_default();
                let start = Instant::now();
                encoder.embed_encoded_split(&e, k)?;
                let e2e = start.elapsed().as_secs_f64();
                let after = remote.stats();
                let he_after = encoder.session().map(|x| x.stats()).unwrap_or_default();
                let wait = after.wait_s - before.wait_s;
                let cloud = after.cloud_eval_s - before.cloud_eval_s;
                let up = after.bytes_up - before.bytes_up;
                let down = after.bytes_down - before.bytes_down;
                let line = Line {
                    run: RunLine {
                        model: bundle.id().to_string(),
                        tokens: t,
                        threads,
                        e2e_s: e2e,
                        cloud_s: cloud,
                        device_s: (e2e - wait).max(0.0),
                        round_trips: after.round_trips - before.round_trips,
                        bytes_up: up,
                        bytes_down: down,
                        key_upload_bytes,
                        encrypted_macs: he_after.encrypted_macs - he.encrypted_macs,
                        s_per_token: e2e / t as f64,
                        bytes_per_token: (up + down) as f64 / t as f64,
                        bytes_counted: "protocol frames on the mTLS session (TLS plaintext)",
                        wait_s: wait,
                        cloud_s_source:
                            "cloud-reported evaluation time (InferResponse.cloud_eval_us)",
                        output_mode: "packed",
                    },
                    split: k,
                    split_requested: requested.clone(),
                    rep,
                    bandwidth_bps: link.map(|l| l.bandwidth_bps),
                    rtt_ms: link.map(|l| l.rtt_ms),
                    predicted_e2e_s: predicted,
                    predicted_reported_e2e_s: predicted_reported,
                };
                if !json {
                    eprintln!(
                        "{t} tokens, split {k} ({requested}), rep {rep}: {e2e:.2} s end to end \
                         ({wait:.2} s waiting), {} round trips, {up} B up, {down} B down{}",
                        line.run.round_trips,
                        predicted.map_or(String::new(), |p| format!(", predicted {p:.2} s"))
                    );
                }
                println!("{}", serde_json::to_string(&line)?);
            }
        }
    }
    Ok(())
}
