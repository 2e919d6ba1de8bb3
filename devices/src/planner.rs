//! The per-request planner (issue 10; `specs/planner.md`): which split depth, protection and
//! output mode a request uses, from plain data only (no runtime, no I/O, no clock).
//!
//! [`plan`] lists every candidate (split depth × protection × output mode), prices each with
//! the cost model of `specs/planner.md` §2 (TDM-PLAN-2), drops those the policy forbids, the
//! accuracy floor rules out, the privacy budget cannot pay or the link cannot carry
//! (TDM-PLAN-3), and picks the cheapest by the objective among those meeting the latency
//! target (TDM-PLAN-4). Ties break on the candidate's position in the list, so the same inputs
//! give the same plan. [`Plan::explain`] prints every candidate with its predicted costs.
//!
//! [`LinkEstimator`] turns observed transfers into the bandwidth and RTT estimates (EWMA).

use std::fmt::Write as _;

use tandem_he::OutputMode;

use crate::energy::Radio;

mod device;
mod encoder;
pub use device::AutoPolicy;
pub(crate) use device::AutoState;
pub use encoder::{
    plan_split, SplitCandidate, SplitOptions, SplitPlan, SplitRefusal, ENCODER_FRAMING_BYTES,
};

/// How a candidate protects (or keeps) the split activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PlanProtection {
    /// Nothing leaves the device: the device model answers.
    Local,
    /// Encrypted under the device's HE key.
    Encrypted,
    /// DP-noised, sent in the clear.
    Noised {
        /// ε of this release.
        epsilon: f64,
    },
    /// DP-noised, then encrypted.
    NoisedEncrypted {
        /// ε of this release.
        epsilon: f64,
    },
}

impl PlanProtection {
    /// ε this release charges (0 for Local and Encrypted).
    pub fn epsilon(self) -> f64 {
        match self {
            Self::Local | Self::Encrypted => 0.0,
            Self::Noised { epsilon } | Self::NoisedEncrypted { epsilon } => epsilon,
        }
    }
    fn encrypted(self) -> bool {
        matches!(self, Self::Encrypted | Self::NoisedEncrypted { .. })
    }
    fn name(self) -> String {
        match self {
            Self::Local => "local".into(),
            Self::Encrypted => "encrypted".into(),
            Self::Noised { epsilon } => format!("noised(eps={epsilon})"),
            Self::NoisedEncrypted { epsilon } => format!("noised_encrypted(eps={epsilon})"),
        }
    }
}

/// One DP release the app allows: ε, its cost in the ledger's unit (zCDP ρ, from
/// `tandem_dp::Mechanism::cost_rho`) and the model's accuracy with that noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseOption {
    /// ε of the release.
    pub epsilon: f64,
    /// What the ledger charges for it (ρ).
    pub rho: f64,
    /// Test accuracy with this noise, in [0, 1].
    pub accuracy: f64,
}

/// What the app allows (TDM-PLAN-3).
#[derive(Debug, Clone, PartialEq)]
pub struct AppPolicy {
    /// The app accepts the device model's own accuracy (answering locally is a candidate).
    pub allow_local: bool,
    /// Encrypted offload allowed.
    pub allow_encrypted: bool,
    /// Noised-in-the-clear releases allowed (empty = none).
    pub noised: Vec<NoiseOption>,
    /// Noised-then-encrypted releases allowed (empty = none).
    pub noised_encrypted: Vec<NoiseOption>,
    /// Output modes allowed for encrypted candidates.
    pub output_modes: Vec<OutputMode>,
    /// Lowest acceptable accuracy, in [0, 1].
    pub accuracy_floor: f64,
    /// Latency target, ms (`None` = no target).
    pub latency_target_ms: Option<f64>,
}

/// Sizes and cloud time of one output mode at one split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModeCosts {
    /// The output mode.
    pub mode: OutputMode,
    /// Upload bytes of one request (`LayerPlan::upload_bytes(1)`).
    pub upload_bytes: u64,
    /// Download bytes of one answer (`LayerPlan::download_bytes(1)`).
    pub download_bytes: u64,
    /// Evaluation-key bytes (`LayerPlan::eval_key_bytes`; 0 in no-key mode).
    pub key_bytes: u64,
    /// The key for this mode is already registered with the cloud (else its upload and one
    /// round trip are charged once, to this request).
    pub key_registered: bool,
    /// Cloud evaluation time of the offloaded layers, ms.
    pub cloud_ms: f64,
    /// Device encryption time, ms.
    pub encrypt_ms: f64,
    /// Device decryption time, ms.
    pub decrypt_ms: f64,
}

impl ModeCosts {
    /// The sizes of `plan` for one request (exact wire lengths: `LayerPlan::upload_bytes(1)`,
    /// `download_bytes(1)`, `eval_key_bytes()`), with the given times in ms.
    pub fn from_plan(
        plan: &tandem_he::LayerPlan,
        key_registered: bool,
        cloud_ms: f64,
        encrypt_ms: f64,
        decrypt_ms: f64,
    ) -> Self {
        Self {
            mode: plan.mode,
            upload_bytes: plan.upload_bytes(1) as u64,
            download_bytes: plan.download_bytes(1) as u64,
            key_bytes: plan.eval_key_bytes() as u64,
            key_registered,
            cloud_ms,
            encrypt_ms,
            decrypt_ms,
        }
    }
}

/// One split depth: what runs where.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitCosts {
    /// Blocks run on the device before the split.
    pub depth: usize,
    /// Device multiply-adds before the split.
    pub device_prefix_macs: u64,
    /// Device multiply-adds after the cloud's answer.
    pub device_suffix_macs: u64,
    /// Accuracy of the exact (unnoised) offloaded model.
    pub offload_accuracy: f64,
    /// Encrypted candidates, one per output mode.
    pub modes: Vec<ModeCosts>,
    /// Bytes up and down of a noised request in the clear.
    pub clear_upload_bytes: u64,
    /// Bytes down of a clear answer.
    pub clear_download_bytes: u64,
    /// Cloud time of the offloaded layers in the clear, ms.
    pub clear_cloud_ms: f64,
    /// Time to draw the noise and charge the ledger, ms.
    pub noise_ms: f64,
}

/// The model's side of the cost model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCosts {
    /// Multiply-adds of answering entirely on the device.
    pub local_macs: u64,
    /// Accuracy of the local answer.
    pub local_accuracy: f64,
    /// The split depths (one for the MLP bundles).
    pub splits: Vec<SplitCosts>,
}

/// The device's profile: timings measured once, and its radio.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceProfile {
    /// Nanoseconds per f32 multiply-add on this device.
    pub ns_per_mac: f64,
    /// The radio transfers use (energy constants, [`crate::energy`]).
    pub radio: Radio,
}

/// The current link estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkEstimate {
    /// Bits per second, both directions (0 = no link).
    pub bandwidth_bps: f64,
    /// Round-trip time, ms.
    pub rtt_ms: f64,
}

impl LinkEstimate {
    /// No usable link.
    pub const NONE: LinkEstimate = LinkEstimate {
        bandwidth_bps: 0.0,
        rtt_ms: f64::INFINITY,
    };
    fn usable(&self) -> bool {
        self.bandwidth_bps.is_finite()
            && self.bandwidth_bps > 0.0
            && self.rtt_ms.is_finite()
            && self.rtt_ms >= 0.0
    }
    fn transfer_ms(&self, bytes: u64) -> f64 {
        bytes as f64 * 8.0 / self.bandwidth_bps * 1e3
    }
}

/// What to minimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Predicted latency.
    Latency,
    /// Predicted device energy.
    Energy,
}

/// The early-exit head's verdict on this request (TDM-EXIT-1, `specs/planner.md` §7): given
/// when the bundle carries a signed exit head and the app turned early exit on.
///
/// Answering locally is a candidate when `confidence >= threshold` (the cascade's calibrated
/// accuracy then applies, [`ModelCosts::local_accuracy`]); below τ the `local` candidate is
/// refused with [`Refusal::NotConfident`] unless the app accepts the device model's accuracy
/// ([`AppPolicy::allow_local`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExitVerdict {
    /// The head's confidence (largest softmax probability), in `(0, 1]`.
    pub confidence: f64,
    /// The signed τ.
    pub threshold: f64,
    /// Measured time of the device's local path (device layers, head and plan), ms: the
    /// `local` candidate's latency. `None`: `local_macs × ns_per_mac` until measured.
    pub local_ms: Option<f64>,
}

impl ExitVerdict {
    /// Whether the head is confident enough to answer (`confidence >= threshold`).
    pub fn confident(&self) -> bool {
        self.confidence >= self.threshold
    }
}

/// Everything [`plan`] reads.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInputs {
    /// The model's costs.
    pub model: ModelCosts,
    /// The device profile.
    pub device: DeviceProfile,
    /// The link estimate.
    pub link: LinkEstimate,
    /// The app's policy.
    pub policy: AppPolicy,
    /// Privacy budget the ledger would still accept in this window (ρ).
    pub remaining_rho: f64,
    /// What to minimise.
    pub objective: Objective,
    /// The exit head's verdict on this request (`None`: early exit off or no head; then
    /// `local` is a candidate only if [`AppPolicy::allow_local`]).
    pub exit: Option<ExitVerdict>,
}

/// Why a candidate cannot be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The app's policy forbids it.
    Policy,
    /// Below the accuracy floor.
    Accuracy,
    /// Its ρ exceeds the remaining budget: the ledger would refuse it.
    Budget,
    /// No usable link.
    NoLink,
    /// `local` only: the exit head's confidence is below τ and the app does not accept the
    /// device model's accuracy.
    NotConfident,
}

impl Refusal {
    /// Stable short name, as printed by [`Plan::explain`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Accuracy => "accuracy",
            Self::Budget => "budget",
            Self::NoLink => "no link",
            Self::NotConfident => "exit head below tau",
        }
    }

    /// What the refusal means and what would lift it, for [`Plan::explain`].
    pub fn reason(self) -> &'static str {
        match self {
            Self::Policy => "the app's policy does not allow this protection or output mode",
            Self::Accuracy => "predicted accuracy below the policy's accuracy floor",
            Self::Budget => {
                "its epsilon would exceed the privacy budget left in this window (the ledger \
                 would refuse it)"
            }
            Self::NoLink => "no usable link (bandwidth 0 or RTT unknown)",
            Self::NotConfident => {
                "the exit head's confidence is below its signed tau and the app does not \
                 accept the device model's own accuracy"
            }
        }
    }
}

/// One candidate with its predicted costs.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Split depth (blocks on the device; `None` for Local).
    pub split: Option<usize>,
    /// Protection.
    pub protection: PlanProtection,
    /// Output mode (encrypted candidates only).
    pub mode: Option<OutputMode>,
    /// Predicted end-to-end latency, ms.
    pub latency_ms: f64,
    /// Predicted device energy (compute + radio), mJ.
    pub energy_mj: f64,
    /// Bytes sent.
    pub bytes_up: u64,
    /// Bytes received.
    pub bytes_down: u64,
    /// Predicted accuracy.
    pub accuracy: f64,
    /// ρ charged to the ledger.
    pub rho: f64,
    /// Why it cannot be chosen (`None` = feasible).
    pub refused: Option<Refusal>,
    /// Feasible and meets the latency target.
    pub meets_target: bool,
}

impl Candidate {
    /// Short name, e.g. `split1/encrypted/packed`.
    pub fn name(&self) -> String {
        let mut s = match self.split {
            Some(d) => format!("split{d}/{}", self.protection.name()),
            None => self.protection.name(),
        };
        if let Some(m) = self.mode {
            s.push('/');
            s.push_str(m.name());
        }
        s
    }
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Every candidate, in a fixed order.
    pub candidates: Vec<Candidate>,
    /// Index of the chosen one (`None` if none is feasible).
    pub chosen: Option<usize>,
    /// The objective used.
    pub objective: Objective,
    /// The exit head's verdict the plan used (`None`: early exit off or no head).
    pub exit: Option<ExitVerdict>,
}

impl Plan {
    /// The chosen candidate.
    pub fn choice(&self) -> Option<&Candidate> {
        self.chosen.and_then(|i| self.candidates.get(i))
    }

    /// Whether the chosen candidate answers on the device (early exit or accepted local).
    pub fn answers_locally(&self) -> bool {
        self.choice()
            .is_some_and(|c| c.protection == PlanProtection::Local)
    }

    /// A table of every candidate with its predicted costs (latency in ms, device energy in
    /// mJ, bytes per request including a not-yet-registered key, accuracy in [0, 1], ρ in
    /// zCDP units); the choice is marked `*`, refused candidates say why, and the last lines
    /// say whether the request is answered locally through the exit head or offloaded.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "  {:<40} {:>11} {:>10} {:>10} {:>10} {:>8} {:>9}  status",
            "candidate", "latency_ms", "energy_mJ", "bytes_up", "bytes_down", "accuracy", "rho"
        );
        for (i, c) in self.candidates.iter().enumerate() {
            let mark = if Some(i) == self.chosen { '*' } else { ' ' };
            let status = match c.refused {
                Some(r) => format!("refused: {}", r.name()),
                None if c.meets_target => "ok".into(),
                None => "misses latency target".into(),
            };
            let _ = writeln!(
                out,
                "{mark} {:<40} {:>11.3} {:>10.3} {:>10} {:>10} {:>8.4} {:>9.4}  {status}",
                c.name(),
                c.latency_ms,
                c.energy_mj,
                c.bytes_up,
                c.bytes_down,
                c.accuracy,
                c.rho
            );
        }
        let obj = match self.objective {
            Objective::Latency => "latency",
            Objective::Energy => "energy",
        };
        let mut reasons: Vec<Refusal> = self.candidates.iter().filter_map(|c| c.refused).collect();
        reasons.sort_by_key(|r| *r as u8);
        reasons.dedup();
        for r in reasons {
            let _ = writeln!(out, "refused: {}: {}", r.name(), r.reason());
        }
        match self.exit {
            Some(e) if e.confident() => {
                let _ = writeln!(
                    out,
                    "early exit: exit head confidence {:.4} >= tau {:.4}: answering locally is a candidate",
                    e.confidence, e.threshold
                );
            }
            Some(e) => {
                let _ = writeln!(
                    out,
                    "early exit: exit head confidence {:.4} < tau {:.4}: not confident, the request is offloaded",
                    e.confidence, e.threshold
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "early exit: not evaluated (off, or no exit head in the bundle)"
                );
            }
        }
        match self.choice() {
            Some(c) => {
                let how = if c.protection == PlanProtection::Local {
                    "answered on the device, nothing sent"
                } else {
                    "offloaded"
                };
                let _ = writeln!(out, "choice (minimum {obj}): {} ({how})", c.name());
            }
            None => {
                let _ = writeln!(out, "no feasible candidate");
            }
        }
        out
    }
}

/// Plans one request (TDM-PLAN-1..4).
///
/// What [`choose`] reads of a feasible candidate.
pub(crate) struct Costs {
    pub(crate) latency_ms: f64,
    pub(crate) energy_mj: f64,
    pub(crate) meets_target: bool,
}

/// The index of the chosen candidate, the one rule both planners follow: among the feasible
/// candidates (`costs` is `None` for a refused one) that meet the latency target, the lowest
/// objective (latency or energy); if none meets the target, the feasible one with the lowest
/// latency. Ties break on list order; `None` only when nothing is feasible.
pub(crate) fn choose<T>(
    candidates: &[T],
    objective: Objective,
    costs: impl Fn(&T) -> Option<Costs>,
) -> Option<usize> {
    let key = |c: &Costs| match objective {
        Objective::Latency => c.latency_ms,
        Objective::Energy => c.energy_mj,
    };
    let best = |pred: &dyn Fn(&Costs) -> bool, by: &dyn Fn(&Costs) -> f64| {
        candidates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| costs(c).filter(|k| pred(k)).map(|k| (i, by(&k))))
            .min_by(|(i, a), (j, b)| a.total_cmp(b).then(i.cmp(j)))
            .map(|(i, _)| i)
    };
    best(&|c| c.meets_target, &key).or_else(|| best(&|_| true, &|c| c.latency_ms))
}

/// The choice is the feasible candidate meeting the latency target with the lowest objective
/// (latency or energy); if no feasible candidate meets the target, the feasible one with the
/// lowest latency. Ties break on list order. `None` is chosen only when nothing is feasible.
pub fn plan(inputs: &PlanInputs) -> Plan {
    let candidates = candidates(inputs);
    let chosen = choose(&candidates, inputs.objective, |c| {
        c.refused.is_none().then_some(Costs {
            latency_ms: c.latency_ms,
            energy_mj: c.energy_mj,
            meets_target: c.meets_target,
        })
    });
    Plan {
        candidates,
        chosen,
        objective: inputs.objective,
        exit: inputs.exit,
    }
}

fn finite_nonneg(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

fn candidates(inp: &PlanInputs) -> Vec<Candidate> {
    let pol = &inp.policy;
    let dev = inp.device;
    let radio = dev.radio.model();
    let compute_ms = |macs: u64| macs as f64 * finite_nonneg(dev.ns_per_mac) / 1e6;
    let mut out = Vec::new();

    // Local: nothing leaves the device. A candidate only when the exit head is confident or
    // the app accepts the device model's accuracy (issue 10).
    let confident = inp.exit.is_some_and(|e| e.confident());
    let local_refused = if !pol.allow_local && !confident {
        Some(match inp.exit {
            Some(_) => Refusal::NotConfident,
            None => Refusal::Policy,
        })
    } else if below_floor(inp.model.local_accuracy, pol.accuracy_floor) {
        Some(Refusal::Accuracy)
    } else {
        None
    };
    let local_ms = inp
        .exit
        .and_then(|e| e.local_ms)
        .filter(|t| t.is_finite() && *t >= 0.0)
        .unwrap_or_else(|| compute_ms(inp.model.local_macs));
    out.push(Candidate {
        split: None,
        protection: PlanProtection::Local,
        mode: None,
        latency_ms: local_ms,
        energy_mj: crate::energy::compute_mj(inp.model.local_macs),
        bytes_up: 0,
        bytes_down: 0,
        accuracy: inp.model.local_accuracy,
        rho: 0.0,
        refused: local_refused,
        meets_target: false,
    });

    let link = inp.link;
    for s in &inp.model.splits {
        let device_macs = s.device_prefix_macs + s.device_suffix_macs;
        let device_ms = compute_ms(device_macs);
        // One request/response exchange = one round trip.
        // `cpu_ms`: the device's CPU time besides the multiply-adds (noise sampling,
        // encryption, decryption), priced at the CPU's active power (TDM-PLAN-2).
        let price =
            |up: u64, down: u64, local_ms: f64, cpu_ms: f64, cloud_ms: f64, extra_rtts: f64| {
                if !link.usable() {
                    return (f64::INFINITY, f64::INFINITY);
                }
                let net_ms = link.transfer_ms(up)
                    + link.transfer_ms(down)
                    + (1.0 + extra_rtts) * link.rtt_ms;
                let latency = local_ms + net_ms + finite_nonneg(cloud_ms);
                // The radio stays active while waiting for the cloud.
                let energy = crate::energy::compute_mj(device_macs)
                    + crate::energy::cpu_mj(cpu_ms)
                    + radio.transfer_mj(up, down, net_ms + finite_nonneg(cloud_ms));
                (latency, energy)
            };
        // Encrypted and noised-encrypted: one per output mode.
        let mut protections: Vec<(PlanProtection, f64, f64, bool)> = Vec::new();
        protections.push((
            PlanProtection::Encrypted,
            s.offload_accuracy,
            0.0,
            pol.allow_encrypted,
        ));
        for n in &pol.noised_encrypted {
            protections.push((
                PlanProtection::NoisedEncrypted { epsilon: n.epsilon },
                n.accuracy,
                n.rho,
                true,
            ));
        }
        for (prot, accuracy, rho, allowed) in protections {
            for m in &s.modes {
                let noise_ms = if prot.encrypted() && prot.epsilon() > 0.0 {
                    s.noise_ms
                } else {
                    0.0
                };
                let (key_up, key_rtt) = if m.key_registered {
                    (0, 0.0)
                } else {
                    (m.key_bytes, 1.0)
                };
                let cpu_ms = finite_nonneg(noise_ms)
                    + finite_nonneg(m.encrypt_ms)
                    + finite_nonneg(m.decrypt_ms);
                let local_ms = device_ms + cpu_ms;
                let up = m.upload_bytes + key_up;
                let (latency_ms, energy_mj) =
                    price(up, m.download_bytes, local_ms, cpu_ms, m.cloud_ms, key_rtt);
                let refused = refusal(
                    allowed && pol.output_modes.contains(&m.mode),
                    accuracy,
                    rho,
                    inp,
                );
                out.push(Candidate {
                    split: Some(s.depth),
                    protection: prot,
                    mode: Some(m.mode),
                    latency_ms,
                    energy_mj,
                    bytes_up: up,
                    bytes_down: m.download_bytes,
                    accuracy,
                    rho,
                    refused,
                    meets_target: false,
                });
            }
        }
        // Noised in the clear: no output mode.
        for n in &pol.noised {
            let local_ms = device_ms + finite_nonneg(s.noise_ms);
            let (latency_ms, energy_mj) = price(
                s.clear_upload_bytes,
                s.clear_download_bytes,
                local_ms,
                finite_nonneg(s.noise_ms),
                s.clear_cloud_ms,
                0.0,
            );
            out.push(Candidate {
                split: Some(s.depth),
                protection: PlanProtection::Noised { epsilon: n.epsilon },
                mode: None,
                latency_ms,
                energy_mj,
                bytes_up: s.clear_upload_bytes,
                bytes_down: s.clear_download_bytes,
                accuracy: n.accuracy,
                rho: n.rho,
                refused: refusal(true, n.accuracy, n.rho, inp),
                meets_target: false,
            });
        }
    }
    for c in &mut out {
        // A link so slow or so far away that a cost overflows (e.g. an RTT of f64::MAX ms:
        // latency finite at f64::MAX, energy infinite) is no link either.
        if c.refused.is_none() && !(c.latency_ms.is_finite() && c.energy_mj.is_finite()) {
            c.refused = Some(Refusal::NoLink);
        }
        c.meets_target =
            c.refused.is_none() && pol.latency_target_ms.is_none_or(|t| c.latency_ms <= t);
    }
    out
}

/// An accuracy the floor refuses; fails closed: a NaN accuracy or a NaN floor refuses (a NaN
/// floor compared false everywhere and so was no floor at all).
fn below_floor(accuracy: f64, floor: f64) -> bool {
    accuracy.is_nan() || floor.is_nan() || accuracy < floor
}

fn refusal(allowed: bool, accuracy: f64, rho: f64, inp: &PlanInputs) -> Option<Refusal> {
    // A release that charges nothing needs no budget; any other must fit what remains
    // (NaN budget or ρ pays nothing).
    let pays = rho == 0.0 || (rho.is_finite() && rho > 0.0 && rho <= inp.remaining_rho);
    if !allowed {
        Some(Refusal::Policy)
    } else if below_floor(accuracy, inp.policy.accuracy_floor) {
        Some(Refusal::Accuracy)
    } else if !pays {
        // TDM-PLAN-3: never plan a release the ledger would refuse.
        Some(Refusal::Budget)
    } else if !inp.link.usable() {
        Some(Refusal::NoLink)
    } else {
        None
    }
}

/// EWMA estimator of bandwidth and RTT from the session's own transfers (TDM-PLAN-5).
///
/// `observe_rtt` takes a round trip with a negligible payload; `observe_transfer` a transfer
/// of `bytes` that took `seconds` end to end, from which the current RTT estimate is removed
/// before computing throughput. Non-finite, negative or zero observations are ignored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkEstimator {
    alpha: f64,
    bandwidth_bps: Option<f64>,
    rtt_ms: Option<f64>,
}

impl LinkEstimator {
    /// A new estimator with weight `alpha` ∈ (0, 1] for the newest sample (clamped; NaN → 0.2).
    pub fn new(alpha: f64) -> Self {
        let alpha = if alpha.is_nan() {
            0.2
        } else {
            alpha.clamp(1e-3, 1.0)
        };
        Self {
            alpha,
            bandwidth_bps: None,
            rtt_ms: None,
        }
    }

    fn mix(old: Option<f64>, sample: f64, alpha: f64) -> Option<f64> {
        Some(match old {
            None => sample,
            Some(o) => o + alpha * (sample - o),
        })
    }

    /// Records a round trip of `seconds`.
    pub fn observe_rtt(&mut self, seconds: f64) {
        if seconds.is_finite() && seconds > 0.0 {
            self.rtt_ms = Self::mix(self.rtt_ms, seconds * 1e3, self.alpha);
        }
    }

    /// Records a transfer of `bytes` that took `seconds` end to end.
    pub fn observe_transfer(&mut self, bytes: u64, seconds: f64) {
        if bytes == 0 || !seconds.is_finite() || seconds <= 0.0 {
            return;
        }
        let rtt_s = self.rtt_ms.unwrap_or(0.0) / 1e3;
        // At least a tenth of the observed time is attributed to the payload.
        let payload_s = (seconds - rtt_s).max(seconds / 10.0);
        let bps = bytes as f64 * 8.0 / payload_s;
        self.bandwidth_bps = Self::mix(self.bandwidth_bps, bps, self.alpha);
    }

    /// The current estimate, or `fallback` for what has not been observed yet.
    pub fn estimate(&self, fallback: LinkEstimate) -> LinkEstimate {
        LinkEstimate {
            bandwidth_bps: self.bandwidth_bps.unwrap_or(fallback.bandwidth_bps),
            rtt_ms: self.rtt_ms.unwrap_or(fallback.rtt_ms),
        }
    }
}

#[cfg(test)]
mod tests;
