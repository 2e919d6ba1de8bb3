//! Split depth for multi-block encoders (issue 10; `specs/planner.md` §9, TDM-SPLIT-2): at
//! depth `k` the device runs blocks `< k` in the clear and offloads the linear layers of the
//! rest under encryption (`tandem_ops::BundleEncoder::embed_encoded_split`, TDM-SPLIT-1);
//! `k = blocks` is the Local candidate (no encryption, nothing leaves the device).
//!
//! Pure data, like [`super::plan`]: the device's side comes from a [`SplitProfile`] measured
//! once and cached (`BundleEncoder::profile`), the link from a [`LinkEstimate`]. Per depth `k`
//! and one sentence:
//!
//! - device ms = the non-linear ops + Σ over the linears of blocks `< k` of their time in the
//!   clear + Σ over the offloaded linears of their encryption, decryption and the rest of
//!   the step on the device (quantise, dequantise);
//! - bytes = Σ over the offloaded linears of their request / reply blob bytes (exact, from the
//!   public `LayerPlan`s) + `framing_bytes` per request each way; the evaluation key
//!   (packed mode) once, when it is not registered yet;
//! - round trips = the offloaded requests (sequential within a sentence; + 1 for a key
//!   upload); network ms = bytes · 8 / bandwidth + round trips · RTT;
//! - cloud ms = Σ over the offloaded linears of the cloud's evaluation time (the profile's
//!   in-process measurement, or the per-layer times the cloud reports, [`SplitOptions::cloud_ms`]);
//! - latency = device + network + cloud; energy = device ms at
//!   [`crate::energy::CPU_CORE_ACTIVE_MW`] + the radio's transfer energy with the radio active
//!   for network + cloud ms ([`crate::energy::RadioModel::transfer_mj`]).

use std::fmt::Write as _;

use tandem_ops::{SplitProfile, MAX_PROFILE_BLOCKS};

use super::{LinkEstimate, Objective};
use crate::energy::Radio;

/// Protocol framing assumed around one HE blob (request or reply), bytes: measured on the
/// digits bundle (`tandem plan`'s `HE_FRAMING_BYTES`, 64 up / 62 down).
pub const ENCODER_FRAMING_BYTES: u64 = 64;

/// What the device allows and knows besides the profile and the link.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitOptions {
    /// Depths the device can run (`BundleEncoder::split_depths`); others are refused.
    pub depths: Vec<usize>,
    /// The evaluation key is already registered with the cloud (else its upload and one round
    /// trip are charged to this sentence).
    pub key_registered: bool,
    /// Framing bytes per request, each way.
    pub framing_bytes: u64,
    /// Per linear (index = `layer_id`): the cloud's own evaluation time, ms, replacing the
    /// profile's in-process measurement (`None` = use the profile).
    pub cloud_ms: Option<Vec<f64>>,
    /// Latency target, ms (`None` = none).
    pub latency_target_ms: Option<f64>,
    /// The radio transfers use.
    pub radio: Radio,
    /// What to minimise.
    pub objective: Objective,
}

impl SplitOptions {
    /// Every depth `0..=blocks` of `profile`, key registered, default framing, Wi-Fi, latency.
    #[must_use]
    pub fn all_depths(profile: &SplitProfile) -> Self {
        Self {
            depths: (0..=profile.blocks).collect(),
            key_registered: true,
            framing_bytes: ENCODER_FRAMING_BYTES,
            cloud_ms: None,
            latency_target_ms: None,
            radio: Radio::Wifi,
            objective: Objective::Latency,
        }
    }
}

/// Why a depth cannot be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitRefusal {
    /// The device does not hold the int8 weights of a block it would run (or has no
    /// encrypted path).
    NotRunnable,
    /// It offloads and there is no usable link.
    NoLink,
}

impl SplitRefusal {
    fn name(self) -> &'static str {
        match self {
            Self::NotRunnable => "device lacks the weights",
            Self::NoLink => "no link",
        }
    }
}

/// One split depth with its predicted costs for one sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitCandidate {
    /// Blocks run on the device (`blocks` = Local).
    pub depth: usize,
    /// Nothing leaves the device.
    pub local: bool,
    /// Predicted end-to-end latency, ms.
    pub latency_ms: f64,
    /// Device compute (ops, local linears, encryption and decryption), ms.
    pub device_ms: f64,
    /// Cloud evaluation, ms.
    pub cloud_ms: f64,
    /// Transfer and round-trip time, ms.
    pub network_ms: f64,
    /// Bytes sent.
    pub bytes_up: u64,
    /// Bytes received.
    pub bytes_down: u64,
    /// Request/reply exchanges.
    pub round_trips: u64,
    /// Predicted device energy (CPU + radio), mJ.
    pub energy_mj: f64,
    /// Why it cannot be chosen (`None` = feasible).
    pub refused: Option<SplitRefusal>,
    /// Feasible and meets the latency target.
    pub meets_target: bool,
}

impl SplitCandidate {
    /// Short name: `local` or `split{k}/encrypted`.
    #[must_use]
    pub fn name(&self) -> String {
        if self.local {
            format!("split{}/local", self.depth)
        } else {
            format!("split{}/encrypted", self.depth)
        }
    }
}

/// The planner's answer for an encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitPlan {
    /// One candidate per depth `0..=blocks`.
    pub candidates: Vec<SplitCandidate>,
    /// Index of the chosen one (`None` if none is feasible).
    pub chosen: Option<usize>,
    /// The objective used.
    pub objective: Objective,
    /// Tokens of the sentence priced.
    pub tokens: usize,
}

impl SplitPlan {
    /// The chosen candidate.
    #[must_use]
    pub fn choice(&self) -> Option<&SplitCandidate> {
        self.chosen.and_then(|i| self.candidates.get(i))
    }

    /// A table of every depth with its predicted costs; the choice is marked `*`.
    #[must_use]
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "  {:<18} {:>11} {:>10} {:>9} {:>10} {:>11} {:>11} {:>6} {:>10}  status",
            "candidate",
            "latency_ms",
            "device_ms",
            "cloud_ms",
            "network_ms",
            "bytes_up",
            "bytes_down",
            "rtts",
            "energy_mJ"
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
                "{mark} {:<18} {:>11.1} {:>10.1} {:>9.1} {:>10.1} {:>11} {:>11} {:>6} {:>10.1}  {status}",
                c.name(),
                c.latency_ms,
                c.device_ms,
                c.cloud_ms,
                c.network_ms,
                c.bytes_up,
                c.bytes_down,
                c.round_trips,
                c.energy_mj
            );
        }
        let obj = match self.objective {
            Objective::Latency => "latency",
            Objective::Energy => "energy",
        };
        match self.choice() {
            Some(c) => {
                let _ = writeln!(
                    out,
                    "choice (minimum {obj}, {} tokens): {} — {}",
                    self.tokens,
                    c.name(),
                    if c.local {
                        "every block on the device, nothing leaves".to_string()
                    } else {
                        format!(
                            "blocks 0..{} on the device in the clear, the linears of the rest \
                             offloaded encrypted",
                            c.depth
                        )
                    }
                );
            }
            None => {
                let _ = writeln!(out, "no feasible candidate");
            }
        }
        out
    }
}

fn nonneg(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

/// Prices every split depth of `profile` on `link` and picks one (TDM-SPLIT-2).
///
/// The choice is the feasible depth meeting the latency target with the lowest objective; if
/// none meets it, the feasible one with the lowest latency. Ties break on the lower depth.
#[must_use]
pub fn plan_split(profile: &SplitProfile, link: LinkEstimate, opts: &SplitOptions) -> SplitPlan {
    let radio = opts.radio.model();
    let ops_ms = profile.ops_ms();
    let mut candidates = Vec::with_capacity(profile.blocks.min(MAX_PROFILE_BLOCKS) + 1);
    for k in 0..=profile.blocks {
        let mut device_ms = ops_ms;
        let (mut cloud_ms, mut up, mut down, mut rtts) = (0.0, 0u64, 0u64, 0u64);
        for l in &profile.linears {
            if l.block < k {
                device_ms += nonneg(l.local_ms);
                continue;
            }
            device_ms += nonneg(l.encrypt_ms) + nonneg(l.decrypt_ms) + nonneg(l.offload_other_ms);
            cloud_ms += nonneg(
                opts.cloud_ms
                    .as_ref()
                    .and_then(|c| c.get(l.index).copied())
                    .unwrap_or(l.cloud_ms),
            );
            // Saturating: a profile built in memory is not checked ([`SplitProfile::validate`]).
            let framing = opts.framing_bytes.saturating_mul(l.requests);
            up = up.saturating_add(l.upload_bytes.saturating_add(framing));
            down = down.saturating_add(l.download_bytes.saturating_add(framing));
            rtts = rtts.saturating_add(l.requests);
        }
        let local = rtts == 0;
        if !local && !opts.key_registered && profile.key_bytes > 0 {
            up = up.saturating_add(profile.key_bytes.saturating_add(opts.framing_bytes));
            down = down.saturating_add(opts.framing_bytes);
            rtts = rtts.saturating_add(1);
        }
        let refused = if !opts.depths.contains(&k) {
            Some(SplitRefusal::NotRunnable)
        } else if !local && !link.usable() {
            Some(SplitRefusal::NoLink)
        } else {
            None
        };
        let network_ms = if local {
            0.0
        } else if link.usable() {
            link.transfer_ms(up) + link.transfer_ms(down) + rtts as f64 * link.rtt_ms
        } else {
            f64::INFINITY
        };
        let latency_ms = device_ms + network_ms + cloud_ms;
        let energy_mj = crate::energy::cpu_mj(device_ms)
            + if local {
                0.0
            } else {
                radio.transfer_mj(up, down, network_ms + cloud_ms)
            };
        // A cost that overflows (e.g. an RTT of f64::MAX ms) is no link either.
        let refused = refused.or_else(|| {
            (!local && (!latency_ms.is_finite() || !energy_mj.is_finite()))
                .then_some(SplitRefusal::NoLink)
        });
        let meets_target =
            refused.is_none() && opts.latency_target_ms.is_none_or(|t| latency_ms <= t);
        candidates.push(SplitCandidate {
            depth: k,
            local,
            latency_ms,
            device_ms,
            cloud_ms,
            network_ms,
            bytes_up: up,
            bytes_down: down,
            round_trips: rtts,
            energy_mj,
            refused,
            meets_target,
        });
    }
    let chosen = super::choose(&candidates, opts.objective, |c: &SplitCandidate| {
        c.refused.is_none().then_some(super::Costs {
            latency_ms: c.latency_ms,
            energy_mj: c.energy_mj,
            meets_target: c.meets_target,
        })
    });
    SplitPlan {
        candidates,
        chosen,
        objective: opts.objective,
        tokens: profile.tokens,
    }
}

#[cfg(test)]
mod tests {
    use tandem_ops::{LinearProfile, OpProfile};

    use super::*;

    /// Two blocks of one linear each: 10 ms in the clear, 2 + 1 ms to encrypt/decrypt,
    /// 5 ms in the cloud, 100 kB up / 50 kB down per request.
    fn profile() -> SplitProfile {
        let lin = |index: usize| LinearProfile {
            index,
            name: format!("l{index}"),
            block: index,
            n_in: 4,
            n_out: 4,
            macs: 64,
            local_ms: 10.0,
            encrypt_ms: 2.0,
            decrypt_ms: 1.0,
            offload_other_ms: 0.0,
            cloud_ms: 5.0,
            requests: 1,
            upload_bytes: 100_000,
            download_bytes: 50_000,
        };
        SplitProfile {
            format: tandem_ops::profile::PROFILE_FORMAT,
            model: "m".into(),
            model_digest: "00".into(),
            tokens: 4,
            batch: 4,
            blocks: 2,
            reps: 1,
            key_bytes: 1_000_000,
            ops: vec![OpProfile {
                step: 0,
                op: "embedding".into(),
                ms: 1.0,
            }],
            linears: vec![lin(0), lin(1)],
        }
    }

    fn link(mbit: f64, rtt_ms: f64) -> LinkEstimate {
        LinkEstimate {
            bandwidth_bps: mbit * 1e6,
            rtt_ms,
        }
    }

    #[test]
    fn costs_add_up_per_depth() {
        let p = profile();
        let mut o = SplitOptions::all_depths(&p);
        o.framing_bytes = 0;
        let plan = plan_split(&p, link(8.0, 10.0), &o);
        let c = &plan.candidates;
        assert_eq!(c.len(), 3);
        // k = 0: 1 + 2 × 3 ms device, 2 × 5 ms cloud, 300 kB at 1 MB/s + 2 RTTs.
        assert!((c[0].device_ms - 7.0).abs() < 1e-9);
        assert!((c[0].cloud_ms - 10.0).abs() < 1e-9);
        assert_eq!(
            (c[0].bytes_up, c[0].bytes_down, c[0].round_trips),
            (200_000, 100_000, 2)
        );
        assert!((c[0].network_ms - (300.0 + 20.0)).abs() < 1e-9);
        assert!((c[0].latency_ms - 337.0).abs() < 1e-9);
        // k = 1: one block local.
        assert!((c[1].latency_ms - (1.0 + 10.0 + 3.0 + 5.0 + 150.0 + 10.0)).abs() < 1e-9);
        // k = 2: Local, nothing leaves, no radio energy.
        assert!(c[2].local && c[2].bytes_up == 0 && c[2].round_trips == 0);
        assert!((c[2].latency_ms - 21.0).abs() < 1e-9);
        assert!((c[2].energy_mj - crate::energy::cpu_mj(21.0)).abs() < 1e-12);
        assert_eq!(plan.choice().map(|c| c.depth), Some(2));
        assert!(plan.explain().contains("* split2/local"));
    }

    /// Was: an RTT of f64::MAX ms priced the offloaded depths at an infinite latency that
    /// was still "ok" (feasible).
    #[test]
    fn an_overflowing_link_is_no_link() {
        let p = profile();
        let o = SplitOptions::all_depths(&p);
        let plan = plan_split(&p, link(10.0, f64::MAX), &o);
        for c in plan.candidates.iter().filter(|c| !c.local) {
            assert_eq!(c.refused, Some(SplitRefusal::NoLink), "depth {}", c.depth);
        }
        assert!(plan.choice().is_some_and(|c| c.local));
    }

    #[test]
    fn obvious_choices_at_the_extremes() {
        let mut p = profile();
        // A slow device (1 s per linear in the clear) and a fast link: offload everything.
        for l in &mut p.linears {
            l.local_ms = 1000.0;
        }
        let o = SplitOptions::all_depths(&p);
        assert_eq!(
            plan_split(&p, link(1000.0, 1.0), &o)
                .choice()
                .map(|c| c.depth),
            Some(0)
        );
        // No link: only Local is feasible.
        let none = plan_split(&p, LinkEstimate::NONE, &o);
        assert_eq!(none.choice().map(|c| c.depth), Some(2));
        assert_eq!(none.candidates[0].refused, Some(SplitRefusal::NoLink));
        // A device without the weights: only depth 0, even when Local would be faster.
        let mut o0 = SplitOptions::all_depths(&profile());
        o0.depths = vec![0];
        let plan = plan_split(&profile(), link(8.0, 10.0), &o0);
        assert_eq!(plan.choice().map(|c| c.depth), Some(0));
        assert_eq!(plan.candidates[2].refused, Some(SplitRefusal::NotRunnable));
    }

    #[test]
    fn key_upload_and_cloud_reported_times_are_charged() {
        let p = profile();
        let mut o = SplitOptions::all_depths(&p);
        let base = plan_split(&p, link(8.0, 10.0), &o).candidates[1].clone();
        o.key_registered = false;
        let with_key = plan_split(&p, link(8.0, 10.0), &o).candidates[1].clone();
        assert_eq!(with_key.round_trips, base.round_trips + 1);
        assert_eq!(
            with_key.bytes_up,
            base.bytes_up + p.key_bytes + ENCODER_FRAMING_BYTES
        );
        assert!(with_key.latency_ms > base.latency_ms + 1000.0);
        o.key_registered = true;
        o.cloud_ms = Some(vec![50.0, 70.0]);
        let reported = plan_split(&p, link(8.0, 10.0), &o);
        assert!((reported.candidates[0].cloud_ms - 120.0).abs() < 1e-9);
        assert!((reported.candidates[1].cloud_ms - 70.0).abs() < 1e-9);
    }
}
