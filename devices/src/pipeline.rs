//! The inference pipeline: device layers → (charge + noise) → (encrypt) → cloud →
//! (decrypt) → device layers, with retries that never charge twice.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_dp::{Accountant, Clip, Mechanism, Policy, Quantizer, SecureBits};
use tandem_he::{EncryptedOutput, OutputMode};
use tandem_model::{Bundle, DpMechanism, Part, Step, Variant};
use tandem_protocol::{
    BudgetCharge, DpMetadata, EncryptedBlock, ErrorCode, NoisedBlock, RequestPayload,
    ResponsePayload, Scale,
};

use crate::conn::{Conn, ConnectParams};
use crate::keys::{self, HeState, LayerShape};
use crate::{
    DeviceError, DeviceOptions, Inference, Protection, RetryPolicy, Timings, MAX_ABS_INPUT,
};

/// Largest encrypted output blob decoded.
const MAX_OUTPUT_BLOB: usize = 64 << 20;

/// One cloud layer of the model as the device sees it (public manifest data only).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CloudStep {
    /// Manifest index: the protocol `layer_id`.
    pub(crate) index: usize,
    /// Shape and bias bound (what the HE plan is made from).
    pub(crate) shape: LayerShape,
    /// Integer steps per real unit of the layer's input (`1 / input_scale`), as the DP
    /// quantiser takes it and as the request's DP metadata carries it.
    quant_scale: f64,
}

/// A connected device.
pub struct Device {
    pub(crate) opts: DeviceOptions,
    pub(crate) bundle: Bundle,
    /// Every cloud layer, in pipeline order (`he.plans` has the same order).
    pub(crate) clouds: Vec<CloudStep>,
    pub(crate) he: HeState,
    pub(crate) accountant: Accountant,
    /// [`Protection::Auto`]: the app's policy, link estimator, learnt stage times.
    pub(crate) auto: crate::planner::AutoState,
    rng: SecureBits,
    /// DP mechanisms by (cloud layer index, ε bits).
    mechanisms: HashMap<(usize, u64), Mechanism>,
    conn: Option<Conn>,
    epoch: Instant,
    key_uploads: u64,
    connects: u64,
    /// Key id the cloud last acknowledged (`KeyAck`) for this device. The cloud stores keys
    /// durably (TDM-KEY-4/8), so a later connection needs no new registration before a DP
    /// release; a key the cloud has since evicted comes back as `UnknownKey`, which uploads it
    /// and resends the same, already charged payload.
    pub(crate) key_acked: Option<[u8; 32]>,
    /// Whether [`Device::answer`] may answer with the exit head (`crate::early_exit`).
    pub(crate) early_exit: crate::early_exit::EarlyExit,
    /// EWMA of the evaluation times the cloud reported (TDM-MSG-14), per layer.
    pub(crate) cloud_eval: CloudEvalTimes,
}

/// Smoothing factor of [`CloudEvalTimes`] (the weight of the newest report).
const CLOUD_EVAL_ALPHA: f64 = 0.3;

/// Per-layer exponentially weighted moving averages of the cloud's reported evaluation times
/// (`cloud_eval_us`, TDM-MSG-14), in ms, kept apart for encrypted requests (Encrypted and
/// NoisedEncrypted: what the planner prices as cloud time) and cleartext (Noised) ones, whose
/// evaluations cost very different amounts on the same layer. Advisory (TDM-EVAL-2): used for
/// cost estimates only.
#[derive(Debug, Clone, Default)]
pub(crate) struct CloudEvalTimes {
    /// (layer id, encrypted request) → EWMA in ms.
    ewma_ms: HashMap<(u32, bool), f64>,
}

impl CloudEvalTimes {
    /// Folds one report of `us` microseconds for `layer_id` into its average; `0` ("not
    /// measured", TDM-EVAL-2) is ignored.
    pub(crate) fn observe(&mut self, layer_id: u32, encrypted: bool, us: u32) {
        if us == 0 {
            return;
        }
        let x = f64::from(us) / 1e3;
        self.ewma_ms
            .entry((layer_id, encrypted))
            .and_modify(|m| *m += CLOUD_EVAL_ALPHA * (x - *m))
            .or_insert(x);
    }

    /// The average for `layer_id` (ms), if the cloud has reported one.
    pub(crate) fn get(&self, layer_id: u32, encrypted: bool) -> Option<f64> {
        self.ewma_ms.get(&(layer_id, encrypted)).copied()
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("model", &self.bundle.id())
            .field("he", &self.he)
            .finish_non_exhaustive()
    }
}

/// What goes to the cloud, fixed once per inference (after any charge): retries resend it.
enum Body {
    /// Noised integers in the clear.
    Plain(RequestPayload),
    /// Integers to encrypt (noised or not); the encryption is cached per parameter set and
    /// redone only if a reconnect negotiates another set (same integers: no new charge).
    Encrypt {
        values: Vec<i64>,
        dp: Option<DpMetadata>,
        cached: Option<(u16, RequestPayload)>,
    },
}

impl Body {
    fn encrypted(&self) -> bool {
        matches!(self, Body::Encrypt { .. })
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn to_proto_mode(m: OutputMode) -> tandem_protocol::OutputMode {
    match m {
        OutputMode::NoKey => tandem_protocol::OutputMode::NoKey,
        OutputMode::Packed => tandem_protocol::OutputMode::Packed,
    }
}

/// Sleeps before the next attempt if the policy allows one; `false` when retries are spent.
async fn pause(retry: &RetryPolicy, attempt: usize, started: Instant) -> bool {
    if attempt >= retry.max_attempts {
        return false;
    }
    let d = retry.backoff(attempt, rand::random::<f64>());
    if started.elapsed() + d > retry.deadline {
        return false;
    }
    tokio::time::sleep(d).await;
    true
}

impl Device {
    /// Loads the bundle's device part, the HE keys and the ledger, then connects (retrying
    /// per [`DeviceOptions::retry`], so a cloud that is still starting is waited for).
    ///
    /// # Errors
    /// Any [`DeviceError`]: a bundle that does not verify, a damaged state file, a ledger
    /// that cannot be opened, or a connection that fails for good.
    pub async fn connect(opts: DeviceOptions) -> Result<Device, DeviceError> {
        let o = opts.clone();
        let mut dev = tokio::task::spawn_blocking(move || Device::load(o))
            .await
            .map_err(|e| DeviceError::Config(format!("load task failed: {e}")))??;
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match dev.connect_within(started).await {
                Ok(()) => break,
                Err(e) if e.is_transient() && pause(&dev.opts.retry, attempt, started).await => {
                    tracing::warn!(error = %e, attempt, "cloud unreachable: retrying");
                }
                Err(e) => return Err(e),
            }
        }
        dev.ensure_he().await?;
        Ok(dev)
    }

    fn load(opts: DeviceOptions) -> Result<Device, DeviceError> {
        if opts.retry.max_attempts == 0 {
            return Err(DeviceError::Config(
                "retry.max_attempts must be at least 1".into(),
            ));
        }
        let bundle = Bundle::load_part(
            &opts.bundle_dir,
            &opts.verifying_key,
            &tandem_model::Limits::default(),
            Part::Device,
        )?;
        let mut clouds = Vec::new();
        for &index in bundle.cloud_indices() {
            let spec = bundle
                .layers()
                .get(index)
                .ok_or_else(|| DeviceError::Config("bundle has no cloud layer".into()))?
                .spec();
            let quant = spec
                .quant
                .as_ref()
                .ok_or_else(|| DeviceError::Config("cloud layer is not quantised".into()))?;
            u32::try_from(index)
                .map_err(|_| DeviceError::Config("layer index out of range".into()))?;
            clouds.push(CloudStep {
                index,
                shape: LayerShape {
                    n_in: spec.n_in,
                    n_out: spec.n_out,
                    bias_bound: quant.bias_bound(),
                },
                quant_scale: 1.0 / f64::from(quant.input_scale),
            });
        }
        // The cloud layers of the noise-trained variants (issue 11): further protocol layer ids.
        for v in bundle.variants() {
            let spec = v.cloud_spec()?;
            let quant = spec.quant.as_ref().ok_or_else(|| {
                DeviceError::Config("variant cloud layer is not quantised".into())
            })?;
            clouds.push(CloudStep {
                index: v.layer_id(),
                shape: LayerShape {
                    n_in: spec.n_in,
                    n_out: spec.n_out,
                    bias_bound: quant.bias_bound(),
                },
                quant_scale: 1.0 / f64::from(quant.input_scale),
            });
        }
        let shapes: Vec<LayerShape> = clouds.iter().map(|c| c.shape).collect();
        // Keys for the preferred known set now; another negotiated set is loaded on connect.
        let first = opts
            .param_sets
            .first()
            .copied()
            .ok_or_else(|| DeviceError::Config("param_sets is empty".into()))?;
        let params = opts
            .param_sets
            .iter()
            .find_map(|&id| keys::parameter_set(id).ok())
            .ok_or(DeviceError::UnknownParameterSet(first))?;
        let he =
            HeState::load_layers(params, opts.output_mode, &shapes, opts.state_dir.as_deref())?;
        let policy = match opts.dp.budget_rho {
            Some(rho) => Policy::new(rho, opts.dp.window_secs)?,
            None => Policy::from_epsilon_delta(
                opts.dp.budget_epsilon,
                opts.dp.delta,
                opts.dp.window_secs,
            )?,
        };
        let (accountant, _report) = Accountant::open(&opts.ledger_path, policy)?;
        Ok(Device {
            clouds,
            bundle,
            he,
            accountant,
            rng: SecureBits::new()?,
            mechanisms: HashMap::new(),
            conn: None,
            epoch: Instant::now(),
            key_uploads: 0,
            connects: 0,
            key_acked: None,
            early_exit: crate::early_exit::EarlyExit::Off,
            cloud_eval: CloudEvalTimes::default(),
            auto: Default::default(),
            opts,
        })
    }

    /// The model's id.
    pub fn model_id(&self) -> &str {
        self.bundle.id()
    }

    /// The first cloud layer's HE plan (under the parameter set in use). (Was `plan()`, a
    /// name [`Device::plan`] — the request planner — now has.)
    pub fn he_plan(&self) -> &tandem_he::LayerPlan {
        &self.he.plan
    }

    /// Every cloud layer's HE plan, in pipeline order (under the parameter set in use).
    pub fn plans(&self) -> &[tandem_he::LayerPlan] {
        &self.he.plans
    }

    /// The HE parameter set in use (the one the last handshake negotiated).
    pub fn parameter_set(&self) -> tandem_he::ParameterSet {
        self.he.params
    }

    /// Size of the evaluation-key blob (0 in no-key mode).
    pub fn key_blob_len(&self) -> usize {
        self.he.key_blob.len()
    }

    /// The cloud's evaluation time of cloud layer `layer_id` (its manifest index, the protocol
    /// layer id), in ms: the exponentially weighted moving average (α = 0.3) of the
    /// `cloud_eval_us` the cloud reported in its responses to this device's encrypted requests
    /// for that layer (TDM-MSG-14). `None` until the cloud has reported one (a version-1 cloud,
    /// or one that sends 0, never does).
    ///
    /// Advisory (TDM-EVAL-2): the cloud's own claim, unverified. The device uses it only to
    /// price cloud time in its planner ([`Device::plan`], [`Protection::Auto`]), never for
    /// results, the ledger or timeouts.
    pub fn cloud_eval_ms(&self, layer_id: u32) -> Option<f64> {
        self.cloud_eval.get(layer_id, true)
    }

    /// Evaluation-key uploads so far.
    pub fn key_uploads(&self) -> u64 {
        self.key_uploads
    }

    /// Connections opened so far.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Records in the privacy ledger.
    pub fn ledger_records(&self) -> u64 {
        self.accountant.records()
    }

    /// ε spent in the current window (zCDP total converted at the configured δ).
    ///
    /// # Errors
    /// [`DeviceError::Dp`] if the conversion fails.
    pub fn epsilon_spent_total(&self) -> Result<f64, DeviceError> {
        Ok(self
            .accountant
            .spent_epsilon(&self.opts.ledger_id, now_secs(), self.opts.dp.delta)?)
    }

    /// Points the device at another cloud address (the next connection uses it).
    pub fn set_addr(&mut self, addr: std::net::SocketAddr) {
        self.opts.addr = addr;
    }

    /// Drops the current connection (the next inference reconnects).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Closes the session cleanly.
    pub async fn close(mut self) {
        if let Some(c) = self.conn.take() {
            c.close().await;
        }
    }

    /// One connection attempt (no retry), unless the current session is still open.
    async fn ensure_connected(&mut self) -> Result<(), DeviceError> {
        if self.conn.as_ref().is_some_and(Conn::is_open) {
            return Ok(());
        }
        self.conn = None;
        let conn = Conn::open(ConnectParams {
            addr: self.opts.addr,
            server_name: &self.opts.server_name,
            tls: self.opts.tls.clone(),
            model_id: self.bundle.id(),
            model_digest: self.bundle.digest(),
            param_sets: &self.opts.param_sets,
            io_timeout: self.opts.io_timeout,
            epoch: self.epoch,
            request_timeout_ms: None,
        })
        .await?;
        self.connects += 1;
        self.conn = Some(conn);
        Ok(())
    }

    /// [`Device::ensure_connected`], given at most what is left of the retry deadline counted
    /// from `started` (so an unanswered SYN cannot hold an attempt for the whole `io_timeout`).
    async fn connect_within(&mut self, started: Instant) -> Result<(), DeviceError> {
        let left = self
            .opts
            .retry
            .deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        tokio::time::timeout(left, self.ensure_connected())
            .await
            .unwrap_or(Err(DeviceError::Timeout))
    }

    /// Makes the HE state match the parameter set the current connection negotiated.
    async fn ensure_he(&mut self) -> Result<(), DeviceError> {
        let Some(params) = self.conn.as_ref().map(|c| c.params) else {
            return Ok(());
        };
        if params == self.he.params {
            return Ok(());
        }
        tracing::info!(
            param_set = params.id,
            "cloud negotiated another parameter set: loading its keys"
        );
        let mode = self.opts.output_mode;
        let dir = self.opts.state_dir.clone();
        let shapes: Vec<LayerShape> = self.clouds.iter().map(|c| c.shape).collect();
        self.he = tokio::task::spawn_blocking(move || {
            HeState::load_layers(params, mode, &shapes, dir.as_deref())
        })
        .await
        .map_err(|e| DeviceError::Config(format!("key task failed: {e}")))??;
        Ok(())
    }

    /// Uploads the evaluation key on the current connection and waits for its `KeyAck`.
    ///
    /// # Errors
    /// [`DeviceError::KeyRefused`] if the cloud closes the session with a final code instead
    /// of acknowledging (output mode not served, key invalid, quota); transient closes and
    /// connection errors as they are (the caller may retry).
    async fn upload_key(&mut self) -> Result<usize, DeviceError> {
        let mode = to_proto_mode(self.opts.output_mode);
        let conn = self
            .conn
            .as_mut()
            .ok_or(DeviceError::Closed(ErrorCode::NoError))?;
        let sent = match conn
            .upload_key(self.he.key_id, mode, self.he.key_blob.clone())
            .await
        {
            Ok(sent) => sent,
            Err(DeviceError::Closed(code)) if !DeviceError::Closed(code).is_transient() => {
                self.conn = None;
                return Err(key_refused(self.opts.output_mode, code));
            }
            Err(e) => return Err(e),
        };
        self.key_uploads += 1;
        self.key_acked = Some(self.he.key_id);
        tracing::info!(bytes = sent, "evaluation key uploaded");
        Ok(sent)
    }

    /// Learns every refusal the device can learn of before a DP release, so that none of
    /// them is charged: connects (retrying per [`DeviceOptions::retry`]), loads the keys of
    /// the negotiated set and, when the release will be encrypted, registers the key and
    /// awaits its `KeyAck` (once per device process: see `key_acked`). Returns the key-upload bytes.
    ///
    /// # Errors
    /// Connection errors once the retries are spent, handshake refusals,
    /// [`DeviceError::KeyRefused`].
    async fn ready_for_release(&mut self, encrypted: bool) -> Result<usize, DeviceError> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.ready_once(encrypted, started).await {
                Ok(n) => return Ok(n),
                Err(e) if e.is_transient() => {
                    self.conn = None;
                    if !pause(&self.opts.retry, attempt, started).await {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, attempt, "cloud not ready for a release: retrying");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn ready_once(
        &mut self,
        encrypted: bool,
        started: Instant,
    ) -> Result<usize, DeviceError> {
        self.connect_within(started).await?;
        self.ensure_he().await?;
        if !encrypted || self.key_acked == Some(self.he.key_id) {
            return Ok(0);
        }
        self.upload_key().await
    }

    pub(crate) fn mechanism(
        &mut self,
        c: CloudStep,
        epsilon: f64,
    ) -> Result<Mechanism, DeviceError> {
        let k = (c.index, epsilon.to_bits());
        if let Some(m) = self.mechanisms.get(&k) {
            return Ok(m.clone());
        }
        let m = match self.variant_at(c.index) {
            // A noise-trained variant: the model's signed policy (specs/dp.md §6.2).
            Some(v) => Mechanism::for_bottleneck(
                v.mechanism() == DpMechanism::Laplace,
                v.bottleneck(),
                v.grid(),
                epsilon,
                v.delta(),
            )?,
            None => {
                let q =
                    Quantizer::new(Clip::L2(self.opts.dp.clip_l2), c.quant_scale, c.shape.n_in)?;
                Mechanism::gaussian_for_epsilon_delta(q, epsilon, self.opts.dp.delta)?
            }
        };
        self.mechanisms.insert(k, m.clone());
        Ok(m)
    }

    /// Charges the ledger (durably) and noises the activation: called once per release, and
    /// only on a finite activation.
    fn release(
        &mut self,
        c: CloudStep,
        activation: &[f32],
        epsilon: f64,
    ) -> Result<(Vec<i64>, DpMetadata), DeviceError> {
        if let Some(index) = activation.iter().position(|v| !v.is_finite()) {
            return Err(tandem_model::ModelError::NonFinite {
                stage: "activation before release".into(),
                index,
            }
            .into());
        }
        let mech = self.mechanism(c, epsilon)?;
        // A discrete Laplace release is charged its pure ε beside ρ = ε²/2: the ledger's
        // pure track (specs/dp.md §5, TDM-LEDG-5).
        let cost = mech.cost()?;
        let rho = cost.rho;
        let now = now_secs();
        if self
            .accountant
            .would_exceed_cost(&self.opts.ledger_id, now, cost)
        {
            let policy = self.accountant.policy();
            let spent_epsilon = self
                .accountant
                .spent_epsilon(&self.opts.ledger_id, now, self.opts.dp.delta)
                .unwrap_or(f64::NAN);
            let w = policy.window_secs;
            return Err(DeviceError::BudgetExceeded {
                spent_epsilon,
                requested_epsilon: epsilon,
                budget_epsilon: policy.epsilon_per_window,
                resets_in_secs: w - now % w,
            });
        }
        let receipt = self
            .accountant
            .charge_cost(&self.opts.ledger_id, now, cost)?;
        let x: Vec<f64> = activation.iter().map(|&v| f64::from(v)).collect();
        let mut noised = mech.release(&x, receipt, &mut self.rng)?;
        let (mechanism, clip_bound) = match self.variant_at(c.index) {
            Some(v) => {
                // Clamping to the cloud layer's int8 input range is post-processing (no
                // privacy cost), and the variant was trained with it (both modes alike).
                let m = v.cloud_spec()?.quant.as_ref().map_or(127, |q| q.input_clip);
                noised.iter_mut().for_each(|z| *z = (*z).clamp(-m, m));
                let kind = match v.mechanism() {
                    DpMechanism::Laplace => tandem_protocol::Mechanism::DiscreteLaplace,
                    _ => tandem_protocol::Mechanism::DiscreteGaussian,
                };
                (kind, 1.0)
            }
            None => (
                tandem_protocol::Mechanism::DiscreteGaussian,
                self.opts.dp.clip_l2,
            ),
        };
        let meta = DpMetadata {
            mechanism,
            scale: Scale::Float(mech.sigma_or_scale()),
            charge: match cost.epsilon {
                Some(e) => BudgetCharge::Epsilon(e),
                None => BudgetCharge::Rho(rho),
            },
            clip_bound,
            quant_scale: c.quant_scale,
        };
        Ok((noised, meta))
    }

    fn variant(&self, i: usize) -> Result<&Variant, DeviceError> {
        self.bundle
            .variants()
            .get(i)
            .ok_or_else(|| DeviceError::Config("no such variant".into()))
    }

    /// The protocol layer id of variant `i`'s cloud layer (the planner prices its release).
    pub(crate) fn variant_layer(&self, i: usize) -> Result<usize, DeviceError> {
        Ok(self.variant(i)?.layer_id())
    }

    /// The noise-trained variant whose cloud layer is protocol layer `index`, if any.
    fn variant_at(&self, index: usize) -> Option<&Variant> {
        self.bundle
            .variants()
            .iter()
            .find(|v| v.layer_id() == index)
    }

    /// Which noise-trained variant a DP release at `protection`'s ε uses (TDM-DPVAR-2):
    /// `None` for the encrypted mode and for a bundle without `[privacy]` section (the
    /// top-level split, Gaussian); the variant trained for exactly that ε; otherwise, only if
    /// [`crate::DpOptions::allow_untrained_epsilon`], the variant with the nearest ε (in
    /// ratio). Checked before anything is charged or sent.
    ///
    /// # Errors
    /// [`tandem_dp::DpError::UntrainedEpsilon`] for an ε no variant was trained for.
    pub fn variant_index(&self, protection: Protection) -> Result<Option<usize>, DeviceError> {
        let epsilon = match protection {
            Protection::Noised { epsilon } | Protection::NoisedEncrypted { epsilon } => epsilon,
            _ => return Ok(None),
        };
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(tandem_dp::DpError::InvalidParameter(format!(
                "epsilon must be finite and > 0, got {epsilon}; nothing charged or sent"
            ))
            .into());
        }
        let vs = self.bundle.variants();
        if vs.is_empty() {
            return Ok(None);
        }
        if let Some(v) = self.bundle.variant_for(epsilon) {
            return Ok(vs.iter().position(|w| w.layer_id() == v.layer_id()));
        }
        if self.opts.dp.allow_untrained_epsilon {
            let dist = |v: &Variant| (v.epsilon() / epsilon).ln().abs();
            return Ok(vs
                .iter()
                .enumerate()
                .min_by(|a, b| dist(a.1).total_cmp(&dist(b.1)))
                .map(|(i, _)| i));
        }
        Err(tandem_dp::DpError::UntrainedEpsilon {
            requested: epsilon,
            trained: vs.iter().map(Variant::epsilon).collect(),
        }
        .into())
    }

    /// The request for `body` under the HE state in use (encrypting at most once per set).
    fn request_for(&mut self, k: usize, body: &mut Body) -> Result<RequestPayload, DeviceError> {
        match body {
            Body::Plain(p) => Ok(p.clone()),
            Body::Encrypt { values, dp, cached } => {
                if let Some((id, p)) = cached {
                    if *id == self.he.params.id {
                        return Ok(p.clone());
                    }
                }
                let plan =
                    self.he.plans.get(k).ok_or_else(|| {
                        DeviceError::Config("no plan for this cloud layer".into())
                    })?;
                let input = self.he.client.encrypt(plan, std::slice::from_ref(values))?;
                let enc = EncryptedBlock {
                    param_set: self.he.params.id,
                    key_id: self.he.key_id,
                    output_mode: to_proto_mode(self.opts.output_mode),
                    ciphertexts: vec![input.to_bytes()],
                };
                let p = match *dp {
                    None => RequestPayload::Encrypted(enc),
                    Some(dp) => RequestPayload::NoisedEncrypted { dp, enc },
                };
                *cached = Some((self.he.params.id, p.clone()));
                Ok(p)
            }
        }
    }

    /// One attempt: connect if needed, match keys to the negotiated set, send, await.
    async fn attempt(
        &mut self,
        k: usize,
        body: &mut Body,
        started: Instant,
    ) -> Result<(ResponsePayload, usize, usize), DeviceError> {
        self.connect_within(started).await?;
        self.ensure_he().await?;
        let request = self.request_for(k, body)?;
        let layer_id = self
            .clouds
            .get(k)
            .and_then(|c| u32::try_from(c.index).ok())
            .ok_or_else(|| DeviceError::Config("no such cloud layer".into()))?;
        let conn = self
            .conn
            .as_mut()
            .ok_or(DeviceError::Closed(ErrorCode::NoError))?;
        let answer = conn.round_trip(layer_id, request).await?;
        // TDM-EVAL-2: the reported evaluation time feeds cost estimates only.
        if let Some(us) = conn.last_eval_us {
            self.cloud_eval.observe(layer_id, body.encrypted(), us);
        }
        Ok(answer)
    }

    /// Runs one inference on a raw input vector: every device segment locally, and one
    /// request per cloud layer, in pipeline order, on the one session.
    ///
    /// Every float stage (standardisation, each device layer and activation, quantisation,
    /// dequantisation of the cloud's output, the remaining layers) refuses non-finite values;
    /// an input of the wrong length (including empty) is refused. Both happen before anything
    /// is charged to the ledger or sent. In the DP modes each cloud layer's input is a separate
    /// release charged `epsilon` (the inference spends `epsilon` times the number of cloud
    /// layers; [`Inference::epsilon_spent`] reports the total).
    ///
    /// # Errors
    /// [`DeviceError::Model`] for such inputs, [`DeviceError::BudgetExceeded`],
    /// [`DeviceError::KeyRefused`] if the cloud will not register the key (learnt before any
    /// charge), [`DeviceError::Refused`] / [`DeviceError::Closed`] from the cloud, and connection
    /// errors once [`DeviceOptions::retry`] is spent.
    pub async fn infer(
        &mut self,
        input: &[f32],
        protection: Protection,
    ) -> Result<Inference, DeviceError> {
        if protection == Protection::Auto {
            // The planner picks the protection (policy and remaining budget respected), then
            // learns from the request's own times and bytes.
            let (p, cloud_ms) = self.resolve_auto()?;
            let r = Box::pin(self.infer(input, p)).await?;
            self.learn(&r, cloud_ms);
            return Ok(r);
        }
        let mut t = Timings::default();
        let start = Instant::now();
        let variant = self.variant_index(protection)?;
        let mut step = match variant {
            Some(i) => self.variant(i)?.start(input)?,
            None => self.bundle.start(input)?,
        };
        t.device_ms += ms(start);
        let mut out = Inference {
            class: 0,
            logits: Vec::new(),
            timings: Timings::default(),
            bytes_up: 0,
            bytes_down: 0,
            key_upload_bytes: 0,
            epsilon_spent: 0.0,
            attempts: 0,
        };
        loop {
            let (layer, q, activation) = match step {
                Step::Done(pred) => {
                    out.class = pred.class;
                    out.logits = pred.logits;
                    out.timings = t;
                    return Ok(out);
                }
                Step::Cloud {
                    layer,
                    input,
                    activation,
                } => (layer, input, activation),
            };
            let k = self
                .clouds
                .iter()
                .position(|c| c.index == layer)
                .ok_or_else(|| {
                    DeviceError::Config(format!("layer {layer} is not a cloud layer"))
                })?;
            let z = self
                .cloud_segment(k, q, &activation, protection, &mut t, &mut out)
                .await?;
            let s = Instant::now();
            // Dequantisation and the next device segment refuse non-finite values.
            step = match variant {
                Some(i) => self.variant(i)?.resume(layer, &z)?,
                None => self.bundle.resume(layer, &z)?,
            };
            t.device_ms += ms(s);
        }
    }

    /// One cloud layer: builds the body (charging and noising once in the DP modes), sends
    /// it with retries and a key upload if the cloud asks, and returns the exact integer
    /// output after decryption.
    async fn cloud_segment(
        &mut self,
        k: usize,
        q: Vec<i64>,
        activation: &[f32],
        protection: Protection,
        t: &mut Timings,
        out: &mut Inference,
    ) -> Result<Vec<i64>, DeviceError> {
        let c = *self
            .clouds
            .get(k)
            .ok_or_else(|| DeviceError::Config("no such cloud layer".into()))?;
        // Build the body exactly once: retries resend it (a release is charged once).
        let mut body = match protection {
            Protection::Encrypted => Body::Encrypt {
                values: q,
                dp: None,
                cached: None,
            },
            Protection::Noised { epsilon } => {
                // Connect first: a cloud that refuses the session costs no budget.
                self.ready_for_release(false).await?;
                let s = Instant::now();
                let (noised, dp) = self.release(c, activation, epsilon)?;
                t.dp_ms += ms(s);
                out.epsilon_spent += epsilon;
                let values = noised
                    .iter()
                    .map(|&v| v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32)
                    .collect();
                Body::Plain(RequestPayload::Noised(NoisedBlock { dp, values }))
            }
            Protection::Auto => {
                return Err(DeviceError::Config(
                    "Protection::Auto reached a cloud layer unresolved".into(),
                ))
            }
            Protection::NoisedEncrypted { epsilon } => {
                // Register the key and await its KeyAck before charging: a refused key (an
                // output mode the model is not served in, …) leaves the ledger untouched.
                out.key_upload_bytes += self.ready_for_release(true).await?;
                let s = Instant::now();
                let (noised, dp) = self.release(c, activation, epsilon)?;
                t.dp_ms += ms(s);
                out.epsilon_spent += epsilon;
                // Clamping after noising is post-processing: it costs no privacy.
                let m = MAX_ABS_INPUT as i64;
                Body::Encrypt {
                    values: noised.iter().map(|&v| v.clamp(-m, m)).collect(),
                    dp: Some(dp),
                    cached: None,
                }
            }
        };
        if body.encrypted() {
            let s = Instant::now();
            self.request_for(k, &mut body)?;
            t.encrypt_ms += ms(s);
        }
        let s = Instant::now();
        let mut attempts = 0;
        let mut key_tried = false;
        let (response, up, down) = loop {
            attempts += 1;
            match self.attempt(k, &mut body, s).await {
                Ok(v) => break v,
                Err(DeviceError::Refused(ErrorCode::UnknownKey))
                    if body.encrypted() && !key_tried =>
                {
                    key_tried = true;
                    out.key_upload_bytes += self.upload_key().await?;
                    attempts -= 1;
                }
                Err(e) if e.is_transient() => {
                    if !matches!(e, DeviceError::Refused(_)) {
                        self.conn = None;
                    }
                    if !pause(&self.opts.retry, attempts, s).await {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, attempt = attempts, "retrying with the same payload");
                }
                Err(e) => {
                    if !matches!(e, DeviceError::Refused(_)) {
                        self.conn = None;
                    }
                    return Err(e);
                }
            }
        };
        out.attempts += attempts;
        out.bytes_up += up;
        out.bytes_down += down;
        t.network_ms += ms(s);
        let s = Instant::now();
        let z = match response {
            ResponsePayload::Plain(z) => z,
            ResponsePayload::Encrypted(block) => {
                let [ct] = block.ciphertexts.as_slice() else {
                    return Err(DeviceError::Refused(ErrorCode::MalformedMessage));
                };
                let plan =
                    self.he.plans.get(k).ok_or_else(|| {
                        DeviceError::Config("no plan for this cloud layer".into())
                    })?;
                let enc = EncryptedOutput::from_bytes(
                    ct,
                    MAX_OUTPUT_BLOB,
                    plan,
                    &self.he.client.key_id(),
                )?;
                let mut rows = self.he.client.decrypt(plan, &enc)?;
                rows.pop()
                    .ok_or(DeviceError::Refused(ErrorCode::MalformedMessage))?
            }
        };
        if z.len() != c.shape.n_out {
            return Err(DeviceError::Refused(ErrorCode::MalformedMessage));
        }
        t.decrypt_ms += ms(s);
        Ok(z)
    }
}

/// The typed error for a key registration the cloud closed the session on.
fn key_refused(mode: OutputMode, code: ErrorCode) -> DeviceError {
    let hint = match code {
        ErrorCode::InvalidRequest => {
            "the model is not served in this output mode (cloud.toml output_modes) or the key \
             does not fit it: use an output mode the cloud serves for this model"
        }
        ErrorCode::LimitExceeded => {
            "the cloud's key quota or size limit for this device is exhausted: ask the operator"
        }
        _ => "the cloud would not store the key: see the cloud's log",
    };
    DeviceError::KeyRefused {
        mode: mode.name(),
        code,
        hint,
    }
}

/// How long [`Device::connect`] may wait in total under `retry` (sum of the largest pauses,
/// capped by the deadline): what a caller should allow before giving up on it.
pub fn worst_case_wait(retry: &RetryPolicy) -> Duration {
    let pauses: Duration = (1..retry.max_attempts).map(|k| retry.backoff(k, 1.0)).sum();
    pauses.min(retry.deadline)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::CloudEvalTimes;

    #[test]
    fn cloud_eval_times_average_per_layer_and_kind() {
        // TDM-EVAL-2: 0 ("not measured") is ignored; reports of one layer and kind are
        // smoothed with alpha = 0.3; other layers and cleartext reports stay apart.
        let mut t = CloudEvalTimes::default();
        t.observe(1, true, 0);
        assert_eq!(t.get(1, true), None);
        t.observe(1, true, 1_000);
        assert_eq!(t.get(1, true), Some(1.0));
        t.observe(1, true, 2_000);
        assert!((t.get(1, true).unwrap() - 1.3).abs() < 1e-12);
        t.observe(1, true, 0);
        assert!((t.get(1, true).unwrap() - 1.3).abs() < 1e-12);
        t.observe(1, false, 50);
        t.observe(2, true, u32::MAX);
        assert!((t.get(1, true).unwrap() - 1.3).abs() < 1e-12);
        assert_eq!(t.get(1, false), Some(0.05));
        assert_eq!(t.get(2, true), Some(f64::from(u32::MAX) / 1e3));
        assert_eq!(t.get(3, true), None);
    }
}
