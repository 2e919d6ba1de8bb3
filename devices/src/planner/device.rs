//! The planner in the device API: [`crate::Device::plan`] and [`crate::Protection::Auto`]
//! (issue 10; `specs/planner.md` §7, TDM-PLAN-6).
//!
//! The device builds the planner's inputs from what it knows: the cloud layers' HE plans
//! (exact byte sizes) under the parameter set in use, in its own output mode; cloud, encryption
//! and decryption times (modelled by `tandem_he::plan_cost` until measured, then the EWMA of
//! its own requests); ρ of each allowed ε from the very mechanism a release would use; the
//! ledger's remaining budget; and a link estimate (the caller's, or the EWMA of its own
//! transfers, [`super::LinkEstimator`]).

use tandem_he::{OutputMode, COST_BYTE_MS, COST_CT_TRANSFORM_MS};

use super::{
    plan, AppPolicy, DeviceProfile, ExitVerdict, LinkEstimate, LinkEstimator, ModeCosts,
    ModelCosts, NoiseOption, Objective, Plan, PlanInputs, PlanProtection, SplitCosts,
};
use crate::energy::Radio;
use crate::{Device, DeviceError, Inference, Protection};

/// What [`Protection::Auto`] and [`Device::plan`] may choose from (TDM-PLAN-3, TDM-PLAN-6).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoPolicy {
    /// Encrypted offload allowed.
    pub allow_encrypted: bool,
    /// Noised-in-the-clear releases allowed: ε and the model's accuracy at that ε (`rho` is
    /// ignored: the device computes it with the mechanism a release would use).
    pub noised: Vec<NoiseOption>,
    /// Noised-then-encrypted releases allowed (same convention).
    pub noised_encrypted: Vec<NoiseOption>,
    /// Lowest acceptable accuracy, in [0, 1].
    pub accuracy_floor: f64,
    /// Latency target, ms.
    pub latency_target_ms: Option<f64>,
    /// Minimise latency or energy.
    pub objective: Objective,
    /// The radio transfers use (energy constants).
    pub radio: Radio,
    /// Link assumed until the device has observed its own transfers.
    pub fallback_link: LinkEstimate,
    /// Device ns per f32 multiply-add (profile it once; the default is a conservative 1 ns).
    pub ns_per_mac: f64,
    /// The app accepts the device model's own accuracy (in [0, 1]) for every request:
    /// answering locally with the bundle's exit head is then a candidate whatever its
    /// confidence, priced at this accuracy (issue 10: "or the app accepts the device model's
    /// accuracy"). `None` (default): local only when the head is confident (early exit on).
    /// Needs a bundle with an exit head (the device has nothing else to answer with).
    pub accept_local_accuracy: Option<f64>,
}

impl Default for AutoPolicy {
    /// Encrypted only (no DP release is ever planned unless the app lists one), latency
    /// objective, Wi-Fi, a 10 Mbit/s, 50 ms link until measured, 1 ns per multiply-add.
    fn default() -> Self {
        AutoPolicy {
            allow_encrypted: true,
            noised: Vec::new(),
            noised_encrypted: Vec::new(),
            accuracy_floor: 0.0,
            latency_target_ms: None,
            objective: Objective::Latency,
            radio: Radio::Wifi,
            fallback_link: LinkEstimate {
                bandwidth_bps: 10e6,
                rtt_ms: 50.0,
            },
            ns_per_mac: 1.0,
            accept_local_accuracy: None,
        }
    }
}

/// The device's planner state: the app's policy, the link estimator and the EWMA of its own
/// stage times.
#[derive(Debug, Clone)]
pub(crate) struct AutoState {
    pub(crate) policy: AutoPolicy,
    pub(crate) link: LinkEstimator,
    /// EWMA of (encrypt, network-minus-transfer, decrypt) ms of encrypted requests.
    encrypt_ms: Option<f64>,
    decrypt_ms: Option<f64>,
    /// EWMA of the wall time of this device's own local answers (device layers, exit head
    /// and the plan), ms: the `local` candidate's latency once measured.
    pub(crate) local_ms: Option<f64>,
    /// The link an app's link monitor reported ([`Device::set_link_report`]); used instead of
    /// the EWMA of the device's own transfers while set.
    link_report: Option<LinkEstimate>,
    /// The plan of the last [`Protection::Auto`] request.
    pub(crate) last_plan: Option<Plan>,
}

impl Default for AutoState {
    fn default() -> Self {
        AutoState {
            policy: AutoPolicy::default(),
            link: LinkEstimator::new(0.3),
            encrypt_ms: None,
            decrypt_ms: None,
            local_ms: None,
            link_report: None,
            last_plan: None,
        }
    }
}

fn mix(old: Option<f64>, x: f64) -> Option<f64> {
    if !x.is_finite() || x < 0.0 {
        return old;
    }
    Some(old.map_or(x, |o| o + 0.3 * (x - o)))
}

impl Device {
    /// Sets what [`Protection::Auto`] and [`Device::plan`] may choose from.
    pub fn set_auto_policy(&mut self, policy: AutoPolicy) {
        self.auto.policy = policy;
    }

    /// The policy in use for [`Protection::Auto`].
    pub fn auto_policy(&self) -> &AutoPolicy {
        &self.auto.policy
    }

    /// The current link estimate: the link monitor's report if the app set one
    /// ([`Device::set_link_report`]), else the EWMA of this device's own transfers, else the
    /// policy's fallback link.
    pub fn link_estimate(&self) -> LinkEstimate {
        self.auto
            .link_report
            .unwrap_or_else(|| self.auto.link.estimate(self.auto.policy.fallback_link))
    }

    /// Sets (or with `None` clears) the link an app's link monitor measured (bandwidth in
    /// bit/s, RTT in ms): [`Protection::Auto`] plans with it instead of the EWMA of the
    /// device's own transfers until cleared.
    pub fn set_link_report(&mut self, link: Option<LinkEstimate>) {
        self.auto.link_report = link;
    }

    /// The plan the last [`Protection::Auto`] request followed ([`Plan::explain`] prints it,
    /// including whether the exit head answered), or `None` before the first one.
    pub fn last_plan(&self) -> Option<&Plan> {
        self.auto.last_plan.as_ref()
    }

    /// The measured time of this device's local answers (EWMA, ms): the `local` candidate's
    /// predicted latency. `None` until the device has answered locally once.
    pub fn local_answer_ms(&self) -> Option<f64> {
        self.auto.local_ms
    }

    /// Feeds the link estimator a round trip of `seconds` (e.g. from a ping the app makes).
    pub fn observe_rtt(&mut self, seconds: f64) {
        self.auto.link.observe_rtt(seconds);
    }

    /// What [`Protection::Auto`] would do for the next request, with every candidate's
    /// predicted latency (ms), energy (mJ), bytes, accuracy and ρ: [`Plan::explain`] prints
    /// it. `link`: the link to plan for (`None`: [`Device::link_estimate`]).
    ///
    /// Candidates: encrypted, noised-encrypted and noised releases as [`AutoPolicy`] allows,
    /// in this device's output mode only (the keys are per mode); answering locally only if
    /// the app accepts the device model's accuracy ([`AutoPolicy::accept_local_accuracy`]: no
    /// input, so no exit-head verdict here; [`Device::plan_for`] has one). A release whose ρ
    /// (summed over the cloud layers) the ledger would refuse now is refused with
    /// `Refusal::Budget` (TDM-PLAN-3).
    ///
    /// # Errors
    /// [`DeviceError::Dp`] if a mechanism for an allowed ε cannot be built (ε ≤ 0, …).
    pub fn plan(&mut self, link: Option<LinkEstimate>) -> Result<Plan, DeviceError> {
        let inputs = self.plan_inputs(link, None)?;
        Ok(plan(&inputs))
    }

    /// What [`Device::answer`]`(input, Protection::Auto)` would do for `input`: as
    /// [`Device::plan`], plus — when early exit is on ([`Device::set_early_exit`]) and the
    /// bundle carries a signed exit head — the head's verdict on `input`: answering locally
    /// is a candidate exactly when its confidence is at least τ (TDM-EXIT-1, TDM-PLAN-6).
    ///
    /// # Errors
    /// [`DeviceError::Model`] for an input of the wrong length or with non-finite values;
    /// otherwise as [`Device::plan`].
    pub fn plan_for(
        &mut self,
        input: &[f32],
        link: Option<LinkEstimate>,
    ) -> Result<Plan, DeviceError> {
        let exit = self.exit_verdict(input)?.map(|(v, _)| v);
        let inputs = self.plan_inputs(link, exit)?;
        Ok(plan(&inputs))
    }

    /// The exit head's verdict on `input` and its output, when early exit is on and the
    /// bundle has a head.
    pub(crate) fn exit_verdict(
        &self,
        input: &[f32],
    ) -> Result<Option<(ExitVerdict, tandem_model::ExitOutput)>, DeviceError> {
        if self.early_exit != crate::EarlyExit::On {
            return Ok(None);
        }
        let Some(out) = self.bundle.exit_confidence(input)? else {
            return Ok(None);
        };
        let threshold = self.exit_threshold().unwrap_or(1.0);
        Ok(Some((
            ExitVerdict {
                confidence: out.confidence,
                threshold,
                local_ms: self.auto.local_ms,
            },
            out,
        )))
    }

    /// Records the wall time of a local answer (EWMA).
    pub(crate) fn learn_local(&mut self, ms: f64) {
        self.auto.local_ms = mix(self.auto.local_ms, ms);
    }

    pub(crate) fn plan_inputs(
        &mut self,
        link: Option<LinkEstimate>,
        exit: Option<ExitVerdict>,
    ) -> Result<PlanInputs, DeviceError> {
        let pol = self.auto.policy.clone();
        let mode = self.opts.output_mode;
        let now = crate::pipeline::now_secs();
        // The top-level split's cloud layers (a bundle's noise-trained variants add further
        // protocol layers to `clouds`, used only by the releases that route through them).
        let top: Vec<usize> = self.bundle.cloud_indices().to_vec();
        // ρ of one inference at each ε: one release per cloud layer the release goes through
        // (the ε's noise-trained variant if the bundle has them, else the top-level split),
        // priced with the mechanism the release uses; an ε the bundle has no variant for is
        // not offered (the release would be refused).
        let mut clear_steps: Option<Vec<crate::pipeline::CloudStep>> = None;
        let mut price = |dev: &mut Device,
                         opts: &[NoiseOption],
                         encrypted: bool|
         -> Result<Vec<NoiseOption>, DeviceError> {
            let mut out = Vec::new();
            for n in opts {
                let prot = if encrypted {
                    Protection::NoisedEncrypted { epsilon: n.epsilon }
                } else {
                    Protection::Noised { epsilon: n.epsilon }
                };
                let Ok(variant) = dev.variant_index(prot) else {
                    continue;
                };
                let layers: Vec<usize> = match variant {
                    Some(i) => vec![dev.variant_layer(i)?],
                    None => top.clone(),
                };
                let steps: Vec<_> = dev
                    .clouds
                    .iter()
                    .filter(|c| layers.contains(&c.index))
                    .copied()
                    .collect();
                let mut rho = 0.0;
                let mut refused = false;
                let mut spent = tandem_dp::ledger::Cost::rho(0.0);
                for c in &steps {
                    let cost = dev.mechanism(*c, n.epsilon)?.cost()?;
                    rho += cost.rho;
                    spent = tandem_dp::ledger::Cost {
                        rho: spent.rho + cost.rho,
                        epsilon: match (spent.epsilon, cost.epsilon) {
                            (Some(a), Some(b)) => Some(a + b),
                            (None, Some(b)) if spent.rho == 0.0 => Some(b),
                            _ => None,
                        },
                    };
                    // Exactly the ledger's test: what it would refuse is unpayable here.
                    refused |= dev
                        .accountant
                        .would_exceed_cost(&dev.opts.ledger_id, now, spent);
                }
                if !encrypted && clear_steps.is_none() {
                    clear_steps = Some(steps);
                }
                out.push(NoiseOption {
                    epsilon: n.epsilon,
                    rho: if refused { f64::INFINITY } else { rho },
                    accuracy: n.accuracy,
                });
            }
            Ok(out)
        };
        let noised = price(self, &pol.noised, false)?;
        let noised_encrypted = price(self, &pol.noised_encrypted, true)?;
        let budget = self.accountant.policy().rho_per_window;
        let remaining_rho = (budget - self.accountant.spent(&self.opts.ledger_id, now)).max(0.0);

        let (mut up, mut down, mut key, mut cloud_ms, mut dec) = (0u64, 0u64, 0u64, 0.0, 0.0);
        let (mut clear_up, mut clear_down, mut clear_macs) = (0u64, 0u64, 0u64);
        for c in clear_steps.as_deref().unwrap_or_default() {
            clear_up += 4 * c.shape.n_in as u64 + FRAMING;
            clear_down += 8 * c.shape.n_out as u64 + FRAMING;
            clear_macs += (c.shape.n_in * c.shape.n_out) as u64;
        }
        for (c, p) in self.clouds.iter().zip(&self.he.plans) {
            if !top.contains(&c.index) {
                continue;
            }
            up += p.upload_bytes(1) as u64 + FRAMING;
            down += p.download_bytes(1) as u64 + FRAMING;
            key += p.eval_key_bytes() as u64;
            // TDM-EVAL-2: the cloud's reported evaluation time of this layer (EWMA,
            // `Device::cloud_eval_ms`) once it has reported one, else the cost model.
            let reported = u32::try_from(c.index)
                .ok()
                .and_then(|l| self.cloud_eval_ms(l));
            cloud_ms += reported.unwrap_or_else(|| {
                (tandem_he::plan_cost(p, 1)
                    - (p.upload_bytes(1) + p.download_bytes(1)) as f64 * COST_BYTE_MS)
                    .max(0.0)
            });
            dec += p.out_ciphertexts() as f64 * COST_CT_TRANSFORM_MS;
        }
        let enc = self.auto.encrypt_ms.unwrap_or(dec);
        let dec = self.auto.decrypt_ms.unwrap_or(dec);
        let device_macs: u64 = self
            .bundle
            .device_layers()
            .map(|(_, l)| (l.spec().n_in * l.spec().n_out) as u64)
            .sum();
        let offload_accuracy = self
            .bundle
            .manifest()
            .training
            .as_ref()
            .map_or(0.0, |t| t.quantised_test_accuracy);
        let mode_costs = ModeCosts {
            mode,
            upload_bytes: up,
            download_bytes: down,
            key_bytes: if mode == OutputMode::NoKey { 0 } else { key },
            key_registered: mode == OutputMode::NoKey || self.key_acked == Some(self.he.key_id),
            cloud_ms,
            encrypt_ms: enc,
            decrypt_ms: dec,
        };
        let ns = pol.ns_per_mac;
        // The local path: the device layers up to the split and the exit head; its accuracy
        // is the cascade's on the bundle's test split (signed calibration record), else —
        // without a record — the offloaded model's less the calibration target.
        let accepted_local = pol
            .accept_local_accuracy
            .filter(|_| self.bundle.exit_head().is_some());
        let (head_macs, local_accuracy) = match self.bundle.exit_head() {
            Some(h) => {
                let spec = h.spec();
                let acc = spec
                    .calibration
                    .as_ref()
                    .map_or_else(|| offload_accuracy - 0.005, |c| c.test_cascade_accuracy);
                ((spec.n_in * self.bundle.classes()) as u64, acc)
            }
            None => (0, 0.0),
        };
        Ok(PlanInputs {
            model: ModelCosts {
                local_macs: device_macs + head_macs,
                local_accuracy: accepted_local.unwrap_or(local_accuracy),
                splits: vec![SplitCosts {
                    depth: top.first().copied().unwrap_or(0),
                    device_prefix_macs: device_macs,
                    device_suffix_macs: 0,
                    offload_accuracy,
                    modes: vec![mode_costs],
                    clear_upload_bytes: clear_up,
                    clear_download_bytes: clear_down,
                    clear_cloud_ms: clear_macs as f64 * ns / 1e6,
                    noise_ms: clear_macs as f64 * 1e-6,
                }],
            },
            device: DeviceProfile {
                ns_per_mac: ns,
                radio: pol.radio,
            },
            link: link.unwrap_or_else(|| self.link_estimate()),
            policy: AppPolicy {
                // The app's acceptance counts only with a head to answer with.
                allow_local: accepted_local.is_some(),
                allow_encrypted: pol.allow_encrypted,
                noised,
                noised_encrypted,
                output_modes: vec![mode],
                accuracy_floor: pol.accuracy_floor,
                latency_target_ms: pol.latency_target_ms,
            },
            remaining_rho,
            objective: pol.objective,
            exit,
        })
    }

    /// Resolves [`Protection::Auto`] for one request: the plan's choice as a concrete
    /// protection, and its predicted cloud time (ms) for the link estimator.
    pub(crate) fn resolve_auto(&mut self) -> Result<(Protection, f64), DeviceError> {
        // `infer` returns an `Inference`: it has no way to answer locally.
        match self.resolve_auto_with(None, false)? {
            Some(r) => Ok(r),
            // Not offered without an exit verdict (allow_local is false): refuse rather
            // than guess.
            None => Err(DeviceError::NoFeasiblePlan(
                self.auto
                    .last_plan
                    .as_ref()
                    .map(Plan::explain)
                    .unwrap_or_default(),
            )),
        }
    }

    /// Plans one request with the exit head's verdict (if any) and keeps the plan
    /// ([`Device::last_plan`]). `Ok(None)`: the plan answers locally; otherwise the concrete
    /// protection to offload with and its predicted cloud time (ms, for the link estimator).
    pub(crate) fn resolve_auto_with(
        &mut self,
        exit: Option<ExitVerdict>,
        can_answer_locally: bool,
    ) -> Result<Option<(Protection, f64)>, DeviceError> {
        let mut inputs = self.plan_inputs(None, exit)?;
        if !can_answer_locally {
            inputs.policy.allow_local = false;
            inputs.exit = None;
        }
        let cloud_ms = inputs
            .model
            .splits
            .first()
            .and_then(|s| s.modes.first())
            .map_or(0.0, |m| m.cloud_ms);
        let clear_cloud_ms = inputs
            .model
            .splits
            .first()
            .map_or(0.0, |s| s.clear_cloud_ms);
        let p = plan(&inputs);
        let protection = p.choice().map(|c| c.protection);
        self.auto.last_plan = Some(p);
        let Some(protection) = protection else {
            return Err(DeviceError::NoFeasiblePlan(
                self.auto
                    .last_plan
                    .as_ref()
                    .map(Plan::explain)
                    .unwrap_or_default(),
            ));
        };
        Ok(match protection {
            PlanProtection::Encrypted => Some((Protection::Encrypted, cloud_ms)),
            PlanProtection::Noised { epsilon } => {
                Some((Protection::Noised { epsilon }, clear_cloud_ms))
            }
            PlanProtection::NoisedEncrypted { epsilon } => {
                Some((Protection::NoisedEncrypted { epsilon }, cloud_ms))
            }
            PlanProtection::Local => None,
        })
    }

    /// Learns from a finished request: stage times and the link (its transfer time is the
    /// network time minus the predicted cloud time).
    pub(crate) fn learn(&mut self, r: &Inference, cloud_ms: f64) {
        if r.timings.encrypt_ms > 0.0 {
            self.auto.encrypt_ms = mix(self.auto.encrypt_ms, r.timings.encrypt_ms);
            self.auto.decrypt_ms = mix(self.auto.decrypt_ms, r.timings.decrypt_ms);
        }
        let bytes = (r.bytes_up + r.bytes_down + r.key_upload_bytes) as u64;
        let s = (r.timings.network_ms - cloud_ms.max(0.0)) / 1e3;
        self.auto.link.observe_transfer(bytes, s);
    }
}

/// Protocol framing assumed around each request and answer (`src/cli/plan.rs`: measured 64
/// up and 62 down on the digits bundle).
const FRAMING: u64 = 64;
