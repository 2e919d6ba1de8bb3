//! `tandem plan`: what the per-request planner (`tandem_device::planner`, `specs/planner.md`)
//! would choose for a bundle on a given link, with every candidate's predicted costs.
//!
//! Inputs measured here, once: the device's ns per f32 multiply-add (the bundle's device layer
//! shapes, timed), the encryption time per output mode (a real `Client::encrypt` of the split
//! activation) and, when the bundle carries the cloud's weights, the cloud layer's evaluation
//! (one thread, this machine) and the decryption of its answer. Documented defaults otherwise:
//! cloud time from `tandem_he::plan_cost` without its byte term, decryption as one transform
//! per returned ciphertext (`COST_CT_TRANSFORM_MS`), clear request sizes as 4 bytes per value
//! plus 64 bytes of framing.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use tandem::device::energy::Radio;
use tandem::device::planner::{
    plan, AppPolicy, DeviceProfile, ExitVerdict, LinkEstimate, ModeCosts, ModelCosts, NoiseOption,
    Objective, PlanInputs, SplitCosts,
};
use tandem::dp::{Clip, Mechanism, Quantizer};
use tandem::he::{
    Client, Context, EvalOptions, OutputMode, PreparedEvaluationKey, PreparedLayer, COST_BYTE_MS,
    COST_CT_TRANSFORM_MS,
};
use tandem::model::{Bundle, Limits, Placement};

/// Framing bytes assumed around a clear (noised) request or answer.
const CLEAR_FRAMING_BYTES: u64 = 64;
/// Protocol framing around an HE blob (request or answer): measured on the digits bundle,
/// `tandem demo --json` bytes minus `LayerPlan::upload_bytes(1)` / `download_bytes(1)` =
/// 64 up, 62 down (2026-11-30); 64 is used both ways.
const HE_FRAMING_BYTES: u64 = 64;

/// `tandem plan` arguments.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// Model bundle directory.
    #[arg(long)]
    model: PathBuf,
    /// Verifying key of the bundle's signer.
    #[arg(long, default_value = "models/dev-verifying-key.txt")]
    verifying_key: PathBuf,
    /// Link bandwidth, e.g. `2mbit`, `500kbit`, `1gbit`, `0` (no link).
    #[arg(long, default_value = "2mbit")]
    bandwidth: String,
    /// Round-trip time, e.g. `80ms`, `0.08s`.
    #[arg(long, default_value = "80ms")]
    rtt: String,
    /// Minimise device energy instead of latency.
    #[arg(long)]
    energy: bool,
    /// Print every candidate with its predicted costs.
    #[arg(long)]
    explain: bool,
    /// Radio for the energy model: `wifi` or `lte`.
    #[arg(long, default_value = "wifi")]
    radio: String,
    /// Latency target, ms.
    #[arg(long)]
    latency_target_ms: Option<f64>,
    /// Lowest acceptable accuracy in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    accuracy_floor: f64,
    /// The app accepts answering on the device with this accuracy (a local head on the split
    /// activation); without it, local answering is not a candidate.
    #[arg(long)]
    local_accuracy: Option<f64>,
    /// Noised releases the app allows (repeatable), each with its `--noised-accuracy`.
    #[arg(long)]
    epsilon: Vec<f64>,
    /// Accuracy at each `--epsilon` (same order), e.g. from `tandem privacy-curve`.
    #[arg(long)]
    noised_accuracy: Vec<f64>,
    /// Also offer noised-then-encrypted releases at the same ε.
    #[arg(long)]
    noised_encrypted: bool,
    /// L2 clip of the split activation for noised releases (the device's default).
    #[arg(long, default_value_t = 20.0)]
    clip_l2: f64,
    /// δ of each release.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Remaining privacy budget, zCDP ρ (default: the device's default daily budget,
    /// `DpOptions::default()`: ε = 8 at δ = 1e-5, untouched).
    #[arg(long)]
    budget_rho: Option<f64>,
    /// Forbid an output mode (`packed` or `nokey`).
    #[arg(long)]
    forbid_mode: Vec<String>,
    /// The evaluation key is not registered with the cloud yet (charge its upload).
    #[arg(long)]
    key_not_registered: bool,
    /// Encoder bundles: sentence length priced, tokens (special tokens included) [default: 16].
    #[arg(long)]
    tokens: Option<usize>,
    /// Encoder bundles: the device profile file (default: a cache path, see plan_encoder.rs).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// One JSON line per candidate (encoder bundles: per split depth) instead of text.
    #[arg(long)]
    json: bool,
    /// Plan the request of this row of the bundle's `test.json` with early exit on: the
    /// bundle's signed exit head is evaluated on it, and answering locally is a candidate when
    /// its confidence is at least the signed τ (what `Protection::Auto` does per request).
    #[arg(long)]
    row: Option<usize>,
}

pub(crate) fn parse_bandwidth(s: &str) -> anyhow::Result<f64> {
    // Was: case folded, so `2MBps` (megabytes per second) read as 2 Mbit/s, 8x too slow.
    if s.contains('B') {
        bail!("--bandwidth {s}: byte units are not accepted; give bits, e.g. 16mbit for 2 MB/s");
    }
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .with_context(|| format!("--bandwidth {s}: expected e.g. 2mbit"))?;
    let mult = match unit.trim() {
        "" | "bit" | "bps" => 1.0,
        "kbit" | "kbps" => 1e3,
        "mbit" | "mbps" => 1e6,
        "gbit" | "gbps" => 1e9,
        u => bail!("--bandwidth {s}: unknown unit {u:?} (bit, kbit, mbit, gbit)"),
    };
    let bps = v * mult;
    if !bps.is_finite() || bps < 0.0 {
        bail!("--bandwidth {s}: must be finite and non-negative");
    }
    Ok(bps)
}

pub(crate) fn parse_rtt_ms(s: &str) -> anyhow::Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1e3)
    } else {
        (t.as_str(), 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("--rtt {s}: expected e.g. 80ms"))?;
    let ms = v * mult;
    if !ms.is_finite() || ms < 0.0 {
        bail!("--rtt {s}: must be finite and non-negative");
    }
    Ok(ms)
}

/// Times f32 multiply-adds over the device layer shapes; ns per multiply-add.
fn profile_ns_per_mac(shapes: &[(usize, usize)]) -> f64 {
    let macs: usize = shapes.iter().map(|(i, o)| i * o).sum();
    if macs == 0 {
        return 1.0;
    }
    let layers: Vec<(Vec<f32>, Vec<f32>, usize)> = shapes
        .iter()
        .map(|&(i, o)| (vec![0.5f32; i * o], vec![0.25f32; i], o))
        .collect();
    let reps = (2_000_000 / macs).clamp(10, 100_000);
    let start = Instant::now();
    for _ in 0..reps {
        for (w, x, o) in &layers {
            let mut acc = 0.0f32;
            for r in 0..*o {
                let row = &w[r * x.len()..(r + 1) * x.len()];
                acc += row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
            }
            black_box(acc);
        }
    }
    start.elapsed().as_secs_f64() * 1e9 / (reps * macs) as f64
}

/// What `tandem plan` and `tandem bench traces` measure once per bundle: the split's shape and
/// cost inputs of the planner (`specs/planner.md` §2).
pub struct Measured {
    /// Manifest index of the (single) cloud layer.
    pub cloud_at: usize,
    /// Cloud layer input width (the split activation).
    pub n_in: usize,
    /// Cloud layer output width.
    pub n_out: usize,
    /// Integer steps per real unit of the split activation (`1 / input_scale`).
    pub quant_scale: f64,
    /// Device multiply-adds before the split.
    pub prefix_macs: u64,
    /// Device ns per f32 multiply-add (timed on the device layer shapes).
    pub ns_per_mac: f64,
    /// The split's costs (both output modes; framing included).
    pub split: SplitCosts,
    /// The cloud time was measured (the bundle carries the cloud's weights).
    pub cloud_measured: bool,
}

/// Measures the planner's inputs for `bundle` (loaded from `dir`, named in errors): device
/// ns/MAC, encryption per output mode and, when the bundle carries the cloud's weights, the
/// cloud layer's evaluation (one thread) and the decryption of its answer, each after one
/// untimed warm-up run. `key_registered`: the evaluation keys count as already uploaded.
///
/// # Errors
/// A bundle with no cloud layer, several cloud layers, an unquantised cloud layer or no
/// `[training]` accuracy; HE failures.
pub fn measure(
    bundle: &Bundle,
    dir: &std::path::Path,
    key_registered: bool,
) -> anyhow::Result<Measured> {
    let m = bundle.manifest();
    let layers = &m.layers;
    let cloud_at = layers
        .iter()
        .position(|l| l.placement == Placement::Cloud)
        .with_context(|| format!("{}: no cloud layer", dir.display()))?;
    let cloud = &layers[cloud_at];
    let clouds = layers
        .iter()
        .filter(|l| l.placement == Placement::Cloud)
        .count();
    if clouds > 1 {
        bail!(
            "{}: {clouds} cloud layers; `tandem plan` prices bundles with one cloud layer so far \
             (multi-layer split candidates are the second part of issue 10)",
            dir.display()
        );
    }
    let quant = cloud
        .quant
        .as_ref()
        .with_context(|| format!("{}: cloud layer without quant", dir.display()))?;
    let bias_bound = quant.bias_bound();
    let quant_scale = 1.0 / f64::from(quant.input_scale);
    let prefix: Vec<(usize, usize)> = layers[..cloud_at]
        .iter()
        .map(|l| (l.n_in, l.n_out))
        .collect();
    let suffix: Vec<(usize, usize)> = layers[cloud_at + 1..]
        .iter()
        .map(|l| (l.n_in, l.n_out))
        .collect();
    let macs = |s: &[(usize, usize)]| s.iter().map(|(i, o)| (i * o) as u64).sum::<u64>();
    let ns_per_mac = profile_ns_per_mac(&[prefix.clone(), suffix.clone()].concat());
    let offload_accuracy = m
        .training
        .as_ref()
        .map(|t| t.quantised_test_accuracy)
        .with_context(|| format!("{}: manifest has no [training] accuracy", dir.display()))?;

    let params = tandem::he::DEFAULT_PARAMETERS;
    let ctx = Arc::new(Context::new(params));
    let mut client = Client::new(ctx.clone());
    // The cloud's weights, when this bundle carries them: the cloud time is then measured.
    let cloud_weights = bundle.cloud_layer().ok().cloned();
    let mut modes = Vec::new();
    let mut cloud_measured = false;
    for mode in [OutputMode::Packed, OutputMode::NoKey] {
        let p = tandem::device::cloud_plan(params, mode, cloud.n_in, cloud.n_out, bias_bound)?;
        let x = vec![vec![0i64; cloud.n_in]];
        let runs = 5;
        // One untimed run first (tables and allocations warm), then the timed runs.
        let mut input = Some(client.encrypt(&p, &x)?);
        let start = Instant::now();
        for _ in 0..runs {
            input = Some(client.encrypt(&p, &x)?);
        }
        let encrypt_ms = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
        let (up, down) = (p.upload_bytes(1), p.download_bytes(1));
        let mut cloud_ms =
            (tandem::he::plan_cost(&p, 1) - (up + down) as f64 * COST_BYTE_MS).max(0.0);
        let mut decrypt_ms = p.out_ciphertexts() as f64 * COST_CT_TRANSFORM_MS;
        if let (Some(cl), Some(input)) = (&cloud_weights, &input) {
            let layer = PreparedLayer::prepare_with_plan(ctx.clone(), p, &cl.weights, &cl.bias)?;
            let key = match mode {
                OutputMode::Packed => Some(PreparedEvaluationKey::prepare(
                    &client.evaluation_key_for_plans(&[p])?,
                    &ctx,
                )?),
                OutputMode::NoKey => None,
            };
            let opts = EvalOptions { parallel: false };
            let mut out = Some(layer.eval(input, key.as_ref(), opts)?);
            if let Some(o) = &out {
                black_box(client.decrypt(&p, o)?);
            }
            let start = Instant::now();
            for _ in 0..runs {
                out = Some(layer.eval(input, key.as_ref(), opts)?);
            }
            cloud_ms = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
            if let Some(out) = &out {
                let start = Instant::now();
                for _ in 0..runs {
                    black_box(client.decrypt(&p, out)?);
                }
                decrypt_ms = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
            }
            cloud_measured = true;
        }
        let mut costs = ModeCosts::from_plan(&p, key_registered, cloud_ms, encrypt_ms, decrypt_ms);
        costs.upload_bytes += HE_FRAMING_BYTES;
        costs.download_bytes += HE_FRAMING_BYTES;
        modes.push(costs);
    }
    Ok(Measured {
        cloud_at,
        n_in: cloud.n_in,
        n_out: cloud.n_out,
        quant_scale,
        prefix_macs: macs(&prefix),
        ns_per_mac,
        split: SplitCosts {
            depth: cloud_at,
            device_prefix_macs: macs(&prefix),
            device_suffix_macs: macs(&suffix),
            offload_accuracy,
            modes,
            clear_upload_bytes: 4 * cloud.n_in as u64 + CLEAR_FRAMING_BYTES,
            clear_download_bytes: 8 * cloud.n_out as u64 + CLEAR_FRAMING_BYTES,
            clear_cloud_ms: (cloud.n_in * cloud.n_out) as f64 * ns_per_mac / 1e6,
            noise_ms: cloud.n_in as f64 * 1e-3,
        },
        cloud_measured,
    })
}

/// Longest round-trip time accepted, ms (one hour: beyond it the link is no link).
const MAX_RTT_MS: f64 = 3_600_000.0;
/// Highest bandwidth accepted, bit/s (1 Tbit/s).
const MAX_BANDWIDTH_BPS: f64 = 1e12;

/// Checks the numeric arguments before anything is measured: a NaN, negative or out-of-range
/// value is refused by name instead of silently disabling a constraint (a NaN accuracy floor
/// or latency target compared false everywhere, i.e. no floor or no target).
fn check_args(a: &PlanArgs) -> anyhow::Result<()> {
    let unit = |name: &str, v: f64| -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&v) {
            bail!("{name} {v}: must be in [0, 1]");
        }
        Ok(())
    };
    unit("--accuracy-floor", a.accuracy_floor)?;
    if let Some(v) = a.local_accuracy {
        unit("--local-accuracy", v)?;
    }
    for &v in &a.noised_accuracy {
        unit("--noised-accuracy", v)?;
    }
    if let Some(t) = a.latency_target_ms {
        if !(t.is_finite() && t > 0.0) {
            bail!("--latency-target-ms {t}: must be a positive number of milliseconds");
        }
    }
    for &e in &a.epsilon {
        if !(e.is_finite() && e > 0.0) {
            bail!("--epsilon {e}: must be positive and finite");
        }
    }
    if !(a.delta > 0.0 && a.delta < 1.0) {
        bail!("--delta {}: must be in (0, 1)", a.delta);
    }
    if !(a.clip_l2.is_finite() && a.clip_l2 > 0.0) {
        bail!("--clip-l2 {}: must be positive and finite", a.clip_l2);
    }
    if let Some(r) = a.budget_rho {
        if !(r.is_finite() && r >= 0.0) {
            bail!("--budget-rho {r}: must be finite and non-negative");
        }
    }
    let bw = parse_bandwidth(&a.bandwidth)?;
    if bw > MAX_BANDWIDTH_BPS {
        bail!(
            "--bandwidth {}: above {} Gbit/s",
            a.bandwidth,
            MAX_BANDWIDTH_BPS / 1e9
        );
    }
    let rtt = parse_rtt_ms(&a.rtt)?;
    if rtt > MAX_RTT_MS {
        bail!(
            "--rtt {}: above one hour (use --bandwidth 0 for no link)",
            a.rtt
        );
    }
    Ok(())
}

/// `tandem plan …`.
pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    check_args(&a)?;
    let vk = tandem::read_verifying_key(&a.verifying_key)?;
    let bundle = Bundle::load(&a.model, &vk, &Limits::default())
        .with_context(|| format!("loading bundle {}", a.model.display()))?;
    if bundle.encoder().is_some() {
        return super::plan_encoder::run(&bundle, encoder_args(a)?);
    }
    if a.tokens.is_some() || a.profile.is_some() {
        bail!(
            "--tokens / --profile: inputs of encoder bundles; {} is an MLP bundle",
            a.model.display()
        );
    }
    let m = bundle.manifest();
    let forbidden: Vec<OutputMode> = a
        .forbid_mode
        .iter()
        .map(|s| match s.as_str() {
            "packed" => Ok(OutputMode::Packed),
            "nokey" => Ok(OutputMode::NoKey),
            _ => bail!("--forbid-mode {s}: expected packed or nokey"),
        })
        .collect::<anyhow::Result<_>>()?;
    let Measured {
        cloud_at,
        n_in,
        n_out,
        quant_scale,
        prefix_macs,
        ns_per_mac,
        split,
        cloud_measured,
    } = measure(&bundle, &a.model, !a.key_not_registered)?;

    if a.epsilon.len() != a.noised_accuracy.len() {
        bail!("give one --noised-accuracy per --epsilon (accuracy of the model at that ε)");
    }
    let mut noised = Vec::new();
    for (&epsilon, &accuracy) in a.epsilon.iter().zip(&a.noised_accuracy) {
        // What the device's ledger would charge: the same mechanism the device builds.
        let rho = Quantizer::new(Clip::L2(a.clip_l2), quant_scale, n_in)
            .and_then(|q| Mechanism::gaussian_for_epsilon_delta(q, epsilon, a.delta))
            .and_then(|mech| mech.cost_rho())
            .with_context(|| format!("--epsilon {epsilon} at --delta {}", a.delta))?;
        noised.push(NoiseOption {
            epsilon,
            rho,
            accuracy,
        });
    }
    let remaining_rho = match a.budget_rho {
        Some(r) => r,
        None => {
            let d = tandem::device::DpOptions::default();
            tandem::dp::mechanism::epsilon_delta_to_rho(d.budget_epsilon, d.delta)?
        }
    };
    let radio = match a.radio.as_str() {
        "wifi" => Radio::Wifi,
        "lte" => Radio::Lte,
        r => bail!("--radio {r}: expected wifi or lte"),
    };
    let bandwidth_bps = parse_bandwidth(&a.bandwidth)?;
    let rtt_ms = parse_rtt_ms(&a.rtt)?;
    let link = if bandwidth_bps > 0.0 {
        LinkEstimate {
            bandwidth_bps,
            rtt_ms,
        }
    } else {
        LinkEstimate::NONE
    };

    let local_macs = prefix_macs + (n_in * m.classes) as u64;
    // The exit head's verdict on `--row` (TDM-EXIT-1): the planner's `local` candidate.
    let head = bundle.exit_head();
    let exit = match a.row {
        None => None,
        Some(i) => {
            let h = head.with_context(|| {
                format!(
                    "--row: {} has no signed exit head (`tandem exit-head` adds one)",
                    a.model.display()
                )
            })?;
            let test = tandem::model::TestSet::load(&a.model.join("test.json"))?;
            let x = test.x.get(i).with_context(|| {
                format!(
                    "--row {i}: {}/test.json has {} rows",
                    a.model.display(),
                    test.x.len()
                )
            })?;
            let o = bundle
                .exit_confidence(x)?
                .context("the exit head gave no verdict")?;
            Some(ExitVerdict {
                confidence: o.confidence,
                threshold: h.threshold(),
                local_ms: None,
            })
        }
    };
    // Accuracy of answering locally: the app's figure if it gives one, else the cascade's
    // on the test split (the head's signed calibration record).
    let cascade_accuracy = head
        .and_then(|h| h.spec().calibration.as_ref())
        .map(|c| c.test_cascade_accuracy);
    let inputs = PlanInputs {
        model: ModelCosts {
            local_macs,
            local_accuracy: a.local_accuracy.or(cascade_accuracy).unwrap_or(0.0),
            splits: vec![split],
        },
        device: DeviceProfile { ns_per_mac, radio },
        link,
        policy: AppPolicy {
            allow_local: a.local_accuracy.is_some(),
            allow_encrypted: true,
            noised_encrypted: if a.noised_encrypted {
                noised.clone()
            } else {
                Vec::new()
            },
            noised,
            output_modes: [OutputMode::Packed, OutputMode::NoKey]
                .into_iter()
                .filter(|mo| !forbidden.contains(mo))
                .collect(),
            accuracy_floor: a.accuracy_floor,
            latency_target_ms: a.latency_target_ms,
        },
        remaining_rho,
        objective: if a.energy {
            Objective::Energy
        } else {
            Objective::Latency
        },
        exit,
    };
    let p = plan(&inputs);
    if !a.json {
        println!(
            "model {} ({}), split after layer {cloud_at}, cloud layer {}x{}; link {}, radio {}; \
         device {ns_per_mac:.3} ns/MAC (measured); cloud time {}; remaining rho {remaining_rho:.4}",
            m.id,
            a.model.display(),
            n_in,
            n_out,
            if bandwidth_bps > 0.0 {
                format!("{:.3} Mbit/s, RTT {rtt_ms} ms", bandwidth_bps / 1e6)
            } else {
                "none".to_string()
            },
            radio.name(),
            if cloud_measured {
                "measured here, one thread"
            } else {
                "modelled (tandem_he::plan_cost)"
            },
        );
    }
    if a.json {
        // One line per candidate, the keys of the encoder bundles' lines where they apply
        // (was: --json was silently ignored for these bundles).
        for (i, c) in p.candidates.iter().enumerate() {
            let line = serde_json::json!({
                "model": m.id,
                "bandwidth_bps": bandwidth_bps,
                "rtt_ms": rtt_ms,
                "candidate": c.name(),
                "split": c.split,
                "local": c.protection == tandem::device::planner::PlanProtection::Local,
                "chosen": p.chosen == Some(i),
                "predicted_e2e_ms": finite_or_null(c.latency_ms),
                "energy_mj": finite_or_null(c.energy_mj),
                "bytes_up": c.bytes_up,
                "bytes_down": c.bytes_down,
                "accuracy": finite_or_null(c.accuracy),
                "rho": finite_or_null(c.rho),
                "refused": c.refused.map(|r| r.name()),
            });
            println!("{line}");
        }
    } else if a.explain {
        println!(
            "latency = device compute + encryption/decryption/noise + bytes / bandwidth + round \
             trips x RTT + cloud time; energy = multiply-adds x {:.1} pJ + CPU time of \
             encryption/decryption/noise x {:.0} mW + radio ({}, Huang et al. MobiSys 2012); bytes \
             per request incl. 64 B framing each way{}",
            tandem::device::energy::F32_MAC_PJ,
            tandem::device::energy::CPU_CORE_ACTIVE_MW,
            radio.name(),
            if a.key_not_registered {
                " and the evaluation key's first upload"
            } else {
                ""
            }
        );
        print!("{}", p.explain());
        let local_policy = p.candidates.first().is_some_and(|c| {
            c.protection == tandem::device::planner::PlanProtection::Local
                && c.refused == Some(tandem::device::planner::Refusal::Policy)
        });
        if local_policy {
            println!(
                "hint: answering locally is a candidate with --row N (the bundle's exit head on \
                 test row N, local when its confidence >= tau{}) or --local-accuracy A (the app \
                 accepts the device model's accuracy A)",
                if head.is_some() {
                    ""
                } else {
                    "; this bundle has none"
                }
            );
        }
    } else {
        match p.choice() {
            Some(c) => println!(
                "choice: {} ({:.2} ms, {:.3} mJ)",
                c.name(),
                c.latency_ms,
                c.energy_mj
            ),
            None => println!("no feasible candidate (run with --explain for the reasons)"),
        }
    }
    if p.chosen.is_none() {
        bail!("no feasible candidate under this policy, budget and link");
    }
    Ok(())
}

/// `x` as a JSON number, or `null` when it is not finite (JSON has no infinity; serde_json
/// would print `null` anyway, this makes it explicit).
fn finite_or_null(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The split-depth planner's arguments (encoder bundles, `plan_encoder.rs`).
fn encoder_args(a: PlanArgs) -> anyhow::Result<super::plan_encoder::EncoderPlanArgs> {
    // Was: silently ignored for an encoder bundle (the split-depth planner has no such input).
    for (given, flag) in [
        (a.row.is_some(), "--row"),
        (
            !a.epsilon.is_empty() || !a.noised_accuracy.is_empty(),
            "--epsilon",
        ),
        (a.noised_encrypted, "--noised-encrypted"),
        (a.local_accuracy.is_some(), "--local-accuracy"),
        (a.accuracy_floor != 0.0, "--accuracy-floor"),
        (a.budget_rho.is_some(), "--budget-rho"),
        (!a.forbid_mode.is_empty(), "--forbid-mode"),
    ] {
        if given {
            bail!(
                "{flag}: not an input of the split-depth planner of an encoder bundle ({}); \
                 it prices encrypted (packed) offload per depth only",
                a.model.display()
            );
        }
    }
    let bandwidth_bps = parse_bandwidth(&a.bandwidth)?;
    let rtt_ms = parse_rtt_ms(&a.rtt)?;
    Ok(super::plan_encoder::EncoderPlanArgs {
        link: if bandwidth_bps > 0.0 {
            LinkEstimate {
                bandwidth_bps,
                rtt_ms,
            }
        } else {
            LinkEstimate::NONE
        },
        radio: match a.radio.as_str() {
            "wifi" => Radio::Wifi,
            "lte" => Radio::Lte,
            r => bail!("--radio {r}: expected wifi or lte"),
        },
        model: a.model,
        energy: a.energy,
        explain: a.explain,
        json: a.json,
        tokens: a.tokens.unwrap_or(16),
        profile: a.profile,
        latency_target_ms: a.latency_target_ms,
        key_not_registered: a.key_not_registered,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_link_units() {
        assert_eq!(parse_bandwidth("2mbit").unwrap(), 2e6);
        assert_eq!(parse_bandwidth("500kbit").unwrap(), 5e5);
        assert_eq!(parse_bandwidth("0").unwrap(), 0.0);
        assert!(parse_bandwidth("2 parsecs").is_err());
        assert!(parse_bandwidth("-1mbit").is_err());
        assert_eq!(parse_bandwidth("2Mbit").unwrap(), 2e6);
        assert!(parse_bandwidth("2MBps").is_err());
        assert!(parse_bandwidth("2MB").is_err());
        assert_eq!(parse_rtt_ms("80ms").unwrap(), 80.0);
        assert_eq!(parse_rtt_ms("0.08s").unwrap(), 80.0);
        assert!(parse_rtt_ms("fast").is_err());
    }

    fn args(extra: &[&str]) -> PlanArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            plan: PlanArgs,
        }
        let mut argv = vec!["plan", "--model", "m"];
        argv.extend_from_slice(extra);
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().plan
    }

    /// Was: NaN or out-of-range constraints were accepted and compared false (no floor, no
    /// target), `--local-accuracy 5` made local win, `--rtt 1e300s` printed 300-digit
    /// latencies, and a bad value was reported only after the measurements ran.
    #[test]
    fn out_of_range_arguments_are_refused_by_name() {
        assert!(check_args(&args(&[])).is_ok());
        assert!(check_args(&args(&["--epsilon", "1", "--noised-accuracy", "0.9"])).is_ok());
        for (bad, name) in [
            (&["--accuracy-floor", "NaN"][..], "--accuracy-floor"),
            (&["--accuracy-floor", "2"], "--accuracy-floor"),
            (&["--local-accuracy", "NaN"], "--local-accuracy"),
            (&["--local-accuracy", "5"], "--local-accuracy"),
            (
                &["--epsilon", "1", "--noised-accuracy", "NaN"],
                "--noised-accuracy",
            ),
            (&["--latency-target-ms", "NaN"], "--latency-target-ms"),
            (&["--latency-target-ms", "0"], "--latency-target-ms"),
            (
                &["--epsilon", "inf", "--noised-accuracy", "0.9"],
                "--epsilon",
            ),
            (&["--delta", "1"], "--delta"),
            (&["--delta", "NaN"], "--delta"),
            (&["--clip-l2", "NaN"], "--clip-l2"),
            (&["--budget-rho", "NaN"], "--budget-rho"),
            (&["--budget-rho", "inf"], "--budget-rho"),
            (&["--rtt", "1e300s"], "--rtt"),
            (&["--rtt", "NaNms"], "--rtt"),
            (&["--bandwidth", "9999999gbit"], "--bandwidth"),
        ] {
            let e = check_args(&args(bad)).unwrap_err().to_string();
            assert!(e.starts_with(name), "{bad:?}: {e}");
        }
    }
}
