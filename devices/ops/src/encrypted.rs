//! Linear layers computed by the cloud under encryption (TDM issue 8, in-process step).
//!
//! Each layer runs exactly the integer computation of [`crate::QuantizedLinear`]: the device
//! quantises its input per row ([`DeviceQuant::quantize_input`]), encrypts all rows of the batch
//! in one [`Client::encrypt`] call, the cloud multiplies them by its int8 weights
//! ([`PreparedLayer::eval`], bias 0), the device decrypts the exact integer products and
//! dequantises them, adding the float bias ([`DeviceQuant::dequantize`]). The HE result is exact,
//! so an [`EncryptedLinear`] returns bit for bit what a [`crate::QuantizedLinear`] returns.
//!
//! Plans come from public bounds only — shape, planning batch, `|w| ≤ 127`, the activation
//! bound of the layer's precision (128 for int8 via [`PreparedLayer::plan_int8_batch`], 32767
//! for int16 via [`PreparedLayer::plan_public`]) and the signed bias bound 0 (the bias is added
//! on the device) — so device and cloud derive the same plan, and every layer's failure bound is
//! checked against the parameter set's limit (2^-64) when it is planned.
//!
//! The cloud is a trait object ([`CloudLayers`]: "evaluate layer `i` on this encrypted batch",
//! bytes in, bytes out), so a later step can route the same layers over the network;
//! [`InProcessCloud`] is the in-process implementation used by the tests and the example.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView2};
use tandem_he::limits::MAX_BATCH;
use tandem_he::{
    Client, Context, EncryptedInput, EncryptedOutput, EvalOptions, EvaluationKey, HeError,
    LayerPlan, OutputMode, PlanOptions, PreparedEvaluationKey, PreparedLayer,
};

use crate::linear::{Linear, LinearFactory, LinearSpec};
use crate::quant::{ActivationBits, DeviceQuant, PrecisionPolicy, QuantizedWeights, WEIGHT_Q_MAX};
use crate::OpsError;

/// The signed bias bound of every cloud layer: the bias is added on the device in float
/// (see [`crate::quant`]), so the cloud's bias is 0.
pub const CLOUD_BIAS_BOUND: u64 = 0;

/// The plan of a layer of `n_in → n_out` at activation precision `bits`, for requests shaped by
/// `batch` rows, from public bounds only (`|w| ≤ 127`, bias bound [`CLOUD_BIAS_BOUND`]).
///
/// # Errors
/// [`HeError::FailureBoundExceeded`] if no layout keeps the failure bound below the parameter
/// set's limit; [`HeError::Shape`] / [`HeError::OutOfRange`] for a shape or batch the engine
/// cannot take.
pub fn plan_layer(
    ctx: &Context,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    bits: ActivationBits,
    batch: usize,
) -> Result<LayerPlan, HeError> {
    let params = ctx.params();
    match bits {
        ActivationBits::Int8 => {
            PreparedLayer::plan_int8_batch(params, mode, n_in, n_out, CLOUD_BIAS_BOUND, batch)
        }
        ActivationBits::Int16 => {
            if batch == 0 || batch > MAX_BATCH {
                return Err(HeError::Shape(format!(
                    "batch of {batch} (1..={MAX_BATCH})"
                )));
            }
            PreparedLayer::plan_public(
                params,
                mode,
                n_in,
                n_out,
                bits.q_max().unsigned_abs(),
                WEIGHT_Q_MAX.unsigned_abs(),
                CLOUD_BIAS_BOUND,
                PlanOptions {
                    chunk: None,
                    batch: (batch > 1).then_some(batch),
                    max_bodies: 1,
                },
            )
        }
    }
}

/// The plan of an encoder bundle's cloud linear layer `l` for requests of `batch` rows, from
/// its signed public fields only: int8 inputs, `weight_bound`, the signed row bounds
/// (`max_row_l1`, `max_row_sq`; absent = entry bounds), the signed link rate `link_kbit_s`
/// and the signed `max_bodies` (most secrets one GLWE mask may be shared by; 1 = one secret)
/// (TDM-PAR-HE-3). The cloud plans the same layer from the same fields
/// (`tandem_cloud`'s registry), so both sides agree on the layout.
///
/// # Errors
/// As [`plan_layer`].
pub fn plan_encoder_layer(
    ctx: &Context,
    mode: OutputMode,
    l: &tandem_model::CloudLinear,
    batch: usize,
    link_kbit_s: u32,
    max_bodies: usize,
) -> Result<LayerPlan, HeError> {
    let (max_abs_weight, max_row_l1, max_row_sq, max_abs_bias) = l.plan_bounds();
    PreparedLayer::plan_int8_batch_bounded(
        ctx.params(),
        mode,
        l.n_in,
        l.n_out,
        tandem_he::WeightBounds {
            max_abs_weight,
            max_row_l1,
            max_row_sq,
            max_abs_bias,
        },
        batch,
        tandem_he::LinkModel {
            kbit_per_s: link_kbit_s,
        },
        max_bodies,
    )
}

/// The cloud side of the encrypted linear layers of one model, indexed by execution order.
///
/// Bytes in, bytes out: a request is an [`EncryptedInput`] blob, a reply an [`EncryptedOutput`]
/// blob, the key an [`EvaluationKey`] blob — what a network transport would carry.
pub trait CloudLayers: Send + Sync {
    /// Makes layer `index` ready under `plan`. In process this prepares `weights` (NTT domain);
    /// a remote cloud holds the weights from the signed bundle and only checks that it serves
    /// `index` under the same plan.
    ///
    /// # Errors
    /// [`OpsError::He`] if the weights do not fit the plan; [`OpsError::Cloud`] if `index` is
    /// already loaded.
    fn load(
        &self,
        index: usize,
        plan: &LayerPlan,
        weights: &QuantizedWeights,
    ) -> Result<(), OpsError>;

    /// Stores the device's evaluation key (packed mode).
    ///
    /// # Errors
    /// [`OpsError::He`] for a blob that does not decode under the parameter set.
    fn upload_key(&self, key: &[u8]) -> Result<(), OpsError>;

    /// Evaluates layer `index` on an encrypted batch; returns the encrypted result.
    ///
    /// # Errors
    /// [`OpsError::Cloud`] for an unknown layer or a missing key; [`OpsError::He`] for a request
    /// that does not decode or match the layer's plan.
    fn evaluate(&self, index: usize, request: &[u8]) -> Result<Vec<u8>, OpsError>;
}

/// [`CloudLayers`] in the same process: prepared layers, the prepared evaluation key, and the
/// time spent evaluating (decode + evaluation + encode of each request).
pub struct InProcessCloud {
    ctx: Arc<Context>,
    parallel: AtomicBool,
    layers: RwLock<Vec<Option<(String, PreparedLayer)>>>,
    key: RwLock<Option<PreparedEvaluationKey>>,
    busy: Mutex<Duration>,
}

impl std::fmt::Debug for InProcessCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessCloud")
            .field("parallel", &self.parallel)
            .finish_non_exhaustive()
    }
}

impl InProcessCloud {
    /// An empty cloud; `opts.parallel` spreads each evaluation over rayon's current pool.
    #[must_use]
    pub fn new(ctx: Arc<Context>, opts: EvalOptions) -> Self {
        Self {
            ctx,
            parallel: AtomicBool::new(opts.parallel),
            layers: RwLock::new(Vec::new()),
            key: RwLock::new(None),
            busy: Mutex::new(Duration::ZERO),
        }
    }

    /// Total time spent in [`CloudLayers::evaluate`] so far.
    #[must_use]
    pub fn busy(&self) -> Duration {
        *self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the evaluation options (e.g. to compare 1 and 2 threads on the same layers).
    pub fn set_eval_options(&self, opts: EvalOptions) {
        self.parallel.store(opts.parallel, Ordering::Relaxed);
    }

    /// The plan layer `index` was loaded under.
    ///
    /// # Errors
    /// [`OpsError::Cloud`] if no layer has that index.
    pub fn layer_plan(&self, index: usize) -> Result<LayerPlan, OpsError> {
        let layers = self.layers.read().unwrap_or_else(PoisonError::into_inner);
        match layers.get(index) {
            Some(Some((_, l))) => Ok(*l.plan()),
            _ => Err(OpsError::Cloud {
                index,
                reason: "no such layer in this model; load it first".into(),
            }),
        }
    }
}

impl CloudLayers for InProcessCloud {
    fn load(
        &self,
        index: usize,
        plan: &LayerPlan,
        weights: &QuantizedWeights,
    ) -> Result<(), OpsError> {
        let name = weights.device.name.clone();
        let bias = vec![0i64; weights.device.out_features()];
        let prepared = PreparedLayer::prepare_with_plan(
            self.ctx.clone(),
            *plan,
            &weights.weights_row_major(),
            &bias,
        )
        .map_err(|source| OpsError::He {
            layer: name.clone(),
            source,
        })?;
        let mut layers = self.layers.write().unwrap_or_else(PoisonError::into_inner);
        if layers.len() <= index {
            layers.resize_with(index + 1, || None);
        }
        match &mut layers[index] {
            Some((old, _)) => Err(OpsError::Cloud {
                index,
                reason: format!("already holds `{old}`; a model's layer indices are unique"),
            }),
            slot => {
                *slot = Some((name, prepared));
                Ok(())
            }
        }
    }

    fn upload_key(&self, key: &[u8]) -> Result<(), OpsError> {
        let he = |source| OpsError::He {
            layer: "evaluation key".into(),
            source,
        };
        let params = self.ctx.params();
        // The key the device sends covers every loaded layer at once: the widest chunk (its
        // automorphisms cover every smaller one) and the most bodies per mask, which may come
        // from two different layers (`upload_key` of the encoders), so size the limit from both
        // maxima rather than from any one plan (as the cloud's `wire_sizes` does).
        let limit = {
            let layers = self.layers.read().unwrap_or_else(PoisonError::into_inner);
            let packed = || {
                layers
                    .iter()
                    .flatten()
                    .map(|(_, l)| l.plan())
                    .filter(|p| p.mode == OutputMode::Packed)
            };
            packed()
                .next()
                .map(|first| {
                    let mut widest = *first;
                    widest.chunk = packed().map(|p| p.chunk).max().unwrap_or(first.chunk);
                    widest.bodies = packed().map(LayerPlan::bodies).max().unwrap_or(1);
                    // The largest key the plans accept: the full one (every stride).
                    widest.key_first_level = 1;
                    widest.eval_key_bytes()
                })
                .unwrap_or(0)
        };
        let key = EvaluationKey::from_bytes(key, limit, &params).map_err(he)?;
        let prepared = PreparedEvaluationKey::prepare(&key, &self.ctx).map_err(he)?;
        *self.key.write().unwrap_or_else(PoisonError::into_inner) = Some(prepared);
        Ok(())
    }

    fn evaluate(&self, index: usize, request: &[u8]) -> Result<Vec<u8>, OpsError> {
        let start = Instant::now();
        let layers = self.layers.read().unwrap_or_else(PoisonError::into_inner);
        let Some(Some((name, layer))) = layers.get(index) else {
            return Err(OpsError::Cloud {
                index,
                reason: "no such layer in this model".into(),
            });
        };
        let he = |source| OpsError::He {
            layer: name.clone(),
            source,
        };
        let plan = layer.plan();
        let input =
            EncryptedInput::from_bytes(request, plan.upload_bytes(MAX_BATCH), plan).map_err(he)?;
        let key = self.key.read().unwrap_or_else(PoisonError::into_inner);
        if plan.mode == OutputMode::Packed && key.is_none() {
            return Err(OpsError::Cloud {
                index,
                reason: "packed mode needs the device's evaluation key; upload it first".into(),
            });
        }
        let opts = EvalOptions {
            parallel: self.parallel.load(Ordering::Relaxed),
        };
        let out = layer.eval(&input, key.as_ref(), opts).map_err(he)?;
        let bytes = out.to_bytes();
        *self.busy.lock().unwrap_or_else(PoisonError::into_inner) += start.elapsed();
        Ok(bytes)
    }
}

/// Counters of the encrypted layers of one device session.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HeStats {
    /// Requests sent (one per layer call per batch of at most `MAX_BATCH` rows).
    pub requests: u64,
    /// Request blob bytes (device → cloud).
    pub bytes_up: u64,
    /// Reply blob bytes (cloud → device).
    pub bytes_down: u64,
    /// Multiply-adds done under encryption (`rows · n_in · n_out` per request).
    pub encrypted_macs: u64,
    /// Seconds spent quantising, encrypting and encoding requests.
    pub encrypt_s: f64,
    /// Seconds spent decoding, decrypting and dequantising replies.
    pub decrypt_s: f64,
    /// Seconds spent waiting for [`CloudLayers::evaluate`].
    pub cloud_wait_s: f64,
}

/// The device's HE state shared by all its encrypted layers: the secret key (inside
/// [`Client`]) and the counters.
#[derive(Debug)]
pub struct DeviceSession {
    client: Mutex<Client>,
    stats: Mutex<HeStats>,
}

impl DeviceSession {
    /// A session with a fresh secret key.
    #[must_use]
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            client: Mutex::new(Client::new(ctx)),
            stats: Mutex::new(HeStats::default()),
        }
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> HeStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the counters back to zero.
    pub fn reset_stats(&self) {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = HeStats::default();
    }

    pub(crate) fn client(&self) -> std::sync::MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A linear layer evaluated by the cloud under encryption: the device part of the quantised
/// layer, its plan, the layer's index at the cloud, and the shared session.
pub struct EncryptedLinear {
    index: usize,
    quant: DeviceQuant,
    plan: LayerPlan,
    /// Most rows per request (the cloud's batch limit; the plan's batch for bundle layers).
    max_rows: usize,
    cloud: Arc<dyn CloudLayers>,
    session: Arc<DeviceSession>,
}

impl EncryptedLinear {
    /// A layer whose weights the cloud already holds (e.g. from a signed bundle): `quant` is
    /// the device's part (scales, float bias, precision), `plan` the public plan both sides
    /// derive, `max_rows` (`1..=MAX_BATCH`) the most rows sent per request, `index` the
    /// layer's protocol `layer_id`.
    #[must_use]
    pub fn new(
        index: usize,
        quant: DeviceQuant,
        plan: LayerPlan,
        max_rows: usize,
        cloud: Arc<dyn CloudLayers>,
        session: Arc<DeviceSession>,
    ) -> Self {
        Self {
            index,
            quant,
            plan,
            max_rows: max_rows.clamp(1, MAX_BATCH),
            cloud,
            session,
        }
    }

    /// The layer's public plan.
    #[must_use]
    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// The layer's index at the cloud (execution order).
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The exact integer products `Xq · Wqᵀ` (`[T, out]`) for quantised rows, computed by the
    /// cloud under encryption in requests of at most `MAX_BATCH` rows.
    ///
    /// # Errors
    /// [`OpsError::He`] if encryption, the reply's decoding or decryption fails;
    /// the cloud's errors.
    pub fn encrypted_product(&self, q: &[Vec<i64>]) -> Result<Array2<i64>, OpsError> {
        let he = |source| OpsError::He {
            layer: self.quant.name.clone(),
            source,
        };
        let n_out = self.quant.out_features();
        let mut acc = Vec::with_capacity(q.len() * n_out);
        for rows in q.chunks(self.max_rows) {
            let t0 = Instant::now();
            let request = self
                .session
                .client()
                .encrypt(&self.plan, rows)
                .map_err(he)?
                .to_bytes();
            let t1 = Instant::now();
            let reply = self.cloud.evaluate(self.index, &request)?;
            let t2 = Instant::now();
            let client = self.session.client();
            let out = EncryptedOutput::from_bytes(
                &reply,
                self.plan.download_bytes(rows.len()),
                &self.plan,
                &client.key_id(),
            )
            .map_err(he)?;
            if out.batch != rows.len() {
                return Err(he(HeError::Shape(format!(
                    "reply carries {} rows, request had {}",
                    out.batch,
                    rows.len()
                ))));
            }
            let y = client.decrypt(&self.plan, &out).map_err(he)?;
            drop(client);
            if y.len() != rows.len() || y.iter().any(|r| r.len() != n_out) {
                return Err(he(HeError::Shape(format!(
                    "decrypted {} rows, expected {} of {n_out}",
                    y.len(),
                    rows.len()
                ))));
            }
            acc.extend(y.into_iter().flatten());
            let t3 = Instant::now();
            let mut s = self
                .session
                .stats
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            s.requests += 1;
            s.bytes_up += request.len() as u64;
            s.bytes_down += reply.len() as u64;
            s.encrypted_macs += (rows.len() * self.quant.in_features * n_out) as u64;
            s.encrypt_s += (t1 - t0).as_secs_f64();
            s.cloud_wait_s += (t2 - t1).as_secs_f64();
            s.decrypt_s += (t3 - t2).as_secs_f64();
        }
        Array2::from_shape_vec((q.len(), n_out), acc)
            .map_err(|e| OpsError::shape(self.quant.name.clone(), e.to_string()))
    }
}

impl Linear for EncryptedLinear {
    fn name(&self) -> &str {
        &self.quant.name
    }

    fn in_features(&self) -> usize {
        self.quant.in_features
    }

    fn out_features(&self) -> usize {
        self.quant.out_features()
    }

    fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>, OpsError> {
        let q = self.quant.quantize_input(x)?;
        let acc = self.encrypted_product(&q.to_vecs())?;
        self.quant.dequantize(acc.view(), &q.scales)
    }
}

/// What loading a model through [`EncryptedLinears`] planned for one layer.
#[derive(Debug, Clone)]
pub struct PlannedLayer {
    /// Index at the cloud (execution order).
    pub index: usize,
    /// Checkpoint path.
    pub name: String,
    /// Activation precision.
    pub bits: ActivationBits,
    /// The public plan (its `log2_p_fail` is the layer's failure bound).
    pub plan: LayerPlan,
}

/// The factory of encrypted layers: quantises each layer per [`PrecisionPolicy`], plans it from
/// public bounds for requests of `batch` rows, has the cloud load it, and returns an
/// [`EncryptedLinear`]; Q/K/V are fused unless [`EncryptedLinears::with_fused_qkv`] says
/// otherwise. After the model is loaded, call [`EncryptedLinears::upload_key`] (packed
/// mode) before the first forward pass.
pub struct EncryptedLinears {
    ctx: Arc<Context>,
    mode: OutputMode,
    policy: PrecisionPolicy,
    batch: usize,
    cloud: Arc<dyn CloudLayers>,
    session: Arc<DeviceSession>,
    planned: Vec<PlannedLayer>,
    fuse_qkv: bool,
}

impl EncryptedLinears {
    /// A factory for `mode`, with a fresh device session; `batch` (1..=`MAX_BATCH`) is the
    /// number of rows (tokens) per request the layouts are planned for.
    #[must_use]
    pub fn new(
        ctx: Arc<Context>,
        mode: OutputMode,
        policy: PrecisionPolicy,
        batch: usize,
        cloud: Arc<dyn CloudLayers>,
    ) -> Self {
        let session = Arc::new(DeviceSession::new(ctx.clone()));
        Self {
            ctx,
            mode,
            policy,
            batch,
            cloud,
            session,
            planned: Vec::new(),
            fuse_qkv: true,
        }
    }

    /// Whether attention's Q, K and V go to the cloud as one fused `H → 3H` layer (default:
    /// yes — one request and one upload of the input instead of three; the result is the same
    /// bit for bit, since the per-token input scale and the per-row weight scales do not
    /// change).
    #[must_use]
    pub fn with_fused_qkv(mut self, fuse: bool) -> Self {
        self.fuse_qkv = fuse;
        self
    }

    /// The layers planned so far, in execution order.
    #[must_use]
    pub fn planned(&self) -> &[PlannedLayer] {
        &self.planned
    }

    /// The device session (counters, secret key) shared by the layers built.
    #[must_use]
    pub fn session(&self) -> Arc<DeviceSession> {
        self.session.clone()
    }

    /// In packed mode, generates the evaluation key covering every planned layer's chunk and
    /// uploads it; returns the key blob's size in bytes (0 in no-key mode, where nothing is
    /// sent).
    ///
    /// # Errors
    /// [`OpsError::He`] if the key cannot be generated; the cloud's errors.
    pub fn upload_key(&self) -> Result<usize, OpsError> {
        if self.mode == OutputMode::NoKey {
            return Ok(0);
        }
        let plans: Vec<_> = self.planned.iter().map(|p| p.plan).collect();
        let key = self
            .session
            .client()
            .evaluation_key_for_plans(&plans)
            .map_err(|source| OpsError::He {
                layer: "evaluation key".into(),
                source,
            })?
            .to_bytes();
        self.cloud.upload_key(&key)?;
        Ok(key.len())
    }
}

impl LinearFactory for EncryptedLinears {
    fn fuse_qkv(&self) -> bool {
        self.fuse_qkv
    }

    fn build(&mut self, spec: LinearSpec) -> Result<Box<dyn Linear>, OpsError> {
        let bits = self.policy.bits_for(&spec.name);
        let weights = QuantizedWeights::quantize(&spec, bits)?;
        let (n_out, n_in) = weights.weights.dim();
        let plan =
            plan_layer(&self.ctx, self.mode, n_in, n_out, bits, self.batch).map_err(|source| {
                OpsError::He {
                    layer: spec.name.clone(),
                    source,
                }
            })?;
        let index = self.planned.len();
        self.cloud.load(index, &plan, &weights)?;
        self.planned.push(PlannedLayer {
            index,
            name: spec.name,
            bits,
            plan,
        });
        Ok(Box::new(EncryptedLinear {
            index,
            quant: weights.device,
            plan,
            max_rows: MAX_BATCH,
            cloud: self.cloud.clone(),
            session: self.session.clone(),
        }))
    }
}
