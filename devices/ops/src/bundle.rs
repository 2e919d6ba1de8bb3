//! Sentence encoders from a signed Tandem bundle (issue 8): the manifest's `[encoder]` op
//! graph ([`tandem_model::EncoderSpec`]) executed on `ndarray`, its linear layers computed
//! either by the cleartext integer pipeline ([`BundleLinears::Integer`], needs the cloud part:
//! the reference) or by the cloud under encryption ([`BundleLinears::Encrypted`], needs only
//! the device part).
//!
//! Both run exactly the same integer computation per linear layer (int8 weights per output
//! channel from the bundle, int8 activations with a per-token scale the device keeps, float
//! bias on the device), and the HE product is exact, so an encrypted embedding equals the
//! integer one bit for bit.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ndarray::{Array1, Array2, ArrayView1, Axis};
use tandem_he::{Context, LayerPlan, OutputMode};
use tandem_model::{Bundle, EncoderSpec, OpKind};
use tokenizers::{Tokenizer, TruncationParams};

use crate::encrypted::{plan_encoder_layer, CloudLayers, DeviceSession, EncryptedLinear};
use crate::linear::Linear;
use crate::quant::{ActivationBits, DeviceQuant, QuantizedLinear, QuantizedWeights};
use crate::sentence::Encoded;
use crate::{ops, OpsError};

/// How the linear layers of a bundle encoder are computed.
pub enum BundleLinears {
    /// In the clear, by the integer pipeline (the bundle's cloud part must be loaded:
    /// [`tandem_model::Part::Full`]). The reference the encrypted path equals.
    Integer,
    /// By `cloud` under encryption in `mode`, with HE context `ctx` (its parameter set must be
    /// the one the cloud serves — over the network, the one the handshake negotiated).
    Encrypted {
        /// HE context (parameter set).
        ctx: Arc<Context>,
        /// Output mode (packed needs [`BundleEncoder::upload_key`] before the first embedding).
        mode: OutputMode,
        /// The cloud.
        cloud: Arc<dyn CloudLayers>,
    },
}

/// One compiled op: value slots instead of names.
enum Step {
    Embedding {
        word: Array2<f32>,
        position: Array2<f32>,
        token_type: Array2<f32>,
        out: usize,
    },
    LayerNorm {
        x: usize,
        gamma: Array1<f32>,
        beta: Array1<f32>,
        eps: f32,
        out: usize,
    },
    Linear {
        x: usize,
        linear: usize,
        out: usize,
    },
    Attention {
        x: usize,
        heads: usize,
        out: usize,
    },
    Gelu {
        x: usize,
        out: usize,
    },
    Add {
        x: usize,
        y: usize,
        out: usize,
    },
    MeanPool {
        x: usize,
        out: usize,
    },
    L2Normalize {
        x: usize,
        out: usize,
    },
}

/// A sentence encoder loaded from a verified bundle: tokenizer, op graph, linear layers.
///
/// Split depth (issue 10, TDM-SPLIT-1): the linear layers are grouped in blocks (a block starts
/// at each linear whose output feeds an `attention` op: all-MiniLM-L6-v2 has 6 blocks of 4
/// linears). At split depth `k` the linears of blocks `< k` run on the device in the clear
/// (integer pipeline, needs their int8 weights: the bundle loaded with its cloud weights file)
/// and the rest go to the cloud under encryption. The placement is chosen per linear at run
/// time ([`BundleEncoder::embed_encoded_split`]); the result is the integer pipeline's, bit for
/// bit, at every depth.
pub struct BundleEncoder {
    tokenizer_path: PathBuf,
    tokenizer: Tokenizer,
    max_tokens: usize,
    hidden: usize,
    steps: Vec<Step>,
    slots: usize,
    output: usize,
    /// Per linear: its in-the-clear implementation (when the device holds its int8 weights).
    local: Vec<Option<Box<dyn Linear>>>,
    /// Per linear: its encrypted implementation (encrypted path only).
    remote: Vec<Option<Box<dyn Linear>>>,
    /// Per linear: its block.
    block_of: Vec<usize>,
    /// Number of blocks (at least 1).
    blocks: usize,
    /// Split depth [`BundleEncoder::embed_encoded`] uses.
    split: usize,
    batch: usize,
    plans: Vec<LayerPlan>,
    session: Option<Arc<DeviceSession>>,
    cloud: Option<Arc<dyn CloudLayers>>,
    mode: Option<OutputMode>,
}

impl std::fmt::Debug for BundleEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleEncoder")
            .field("hidden", &self.hidden)
            .field("max_tokens", &self.max_tokens)
            .field("ops", &self.steps.len())
            .field("linears", &self.local.len())
            .field("blocks", &self.blocks)
            .field("split", &self.split)
            .finish_non_exhaustive()
    }
}

fn matrix(b: &Bundle, name: &str, cols: usize) -> Result<Array2<f32>, OpsError> {
    let v = b.device_tensor(name)?.to_vec();
    let rows = v.len() / cols.max(1);
    Array2::from_shape_vec((rows, cols), v).map_err(|e| OpsError::shape(name, e.to_string()))
}

fn vector(b: &Bundle, name: &str) -> Result<Array1<f32>, OpsError> {
    Ok(Array1::from(b.device_tensor(name)?.to_vec()))
}

impl BundleEncoder {
    /// Builds the encoder of a verified encoder bundle (loaded with its device part, and its
    /// cloud part too for [`BundleLinears::Integer`]). In encrypted mode each cloud layer is
    /// planned from the manifest's public bounds (row bounds and link rate included,
    /// [`plan_encoder_layer`]) for requests of `encoder.batch` rows (as the
    /// cloud plans it) and announced to the cloud with [`CloudLayers::load`] (the device part
    /// has no int8 weights: an in-process cloud gets them from the bundle if its cloud part is
    /// loaded, a remote cloud already holds them).
    ///
    /// Split depth: when the bundle was loaded with its cloud weights file (`Part::Full`), the
    /// encrypted path also keeps every linear's int8 weights so that the device can run any
    /// prefix of blocks in the clear ([`BundleEncoder::embed_encoded_split`],
    /// [`BundleEncoder::split_depths`] = `0..=blocks`); with the device part only it can run
    /// depth 0 only. The integer path runs every block on the device.
    ///
    /// # Errors
    /// [`OpsError::Bundle`] for a bundle without `[encoder]` or without the parts needed,
    /// [`OpsError::Tokenizer`] for a tokenizer the `tokenizers` crate refuses, [`OpsError::He`]
    /// if a layer cannot be planned, the cloud's errors.
    pub fn from_bundle(bundle: &Bundle, linears: BundleLinears) -> Result<Self, OpsError> {
        let enc: &EncoderSpec = bundle.encoder().ok_or_else(|| {
            OpsError::Bundle(tandem_model::ModelError::InvalidManifest(format!(
                "model {:?} has no [encoder] section: not a sentence encoder bundle",
                bundle.id()
            )))
        })?;
        let tokenizer_path = PathBuf::from(&enc.tokenizer.file);
        let tokenizer =
            tokenizer_from_bytes(&tokenizer_path, bundle.tokenizer_json()?, enc.max_tokens)?;
        let h = enc.hidden;
        let mut names: Vec<&str> = Vec::with_capacity(enc.ops.len());
        let slot = |names: &Vec<&str>, v: &str| {
            names.iter().position(|n| *n == v).ok_or_else(|| {
                OpsError::Bundle(tandem_model::ModelError::InvalidManifest(format!(
                    "encoder value {v:?} used before it is defined"
                )))
            })
        };
        let mut steps = Vec::with_capacity(enc.ops.len());
        for op in &enc.ops {
            let kind = OpKind::parse(&op.op).ok_or_else(|| {
                OpsError::Bundle(tandem_model::ModelError::InvalidManifest(format!(
                    "unknown op {:?}",
                    op.op
                )))
            })?;
            let input = |i: usize| -> Result<usize, OpsError> {
                let v = op.inputs.get(i).map_or("", String::as_str);
                slot(&names, v)
            };
            let tensor = |i: usize| op.tensors.get(i).map_or("", String::as_str);
            let out = names.len();
            let step = match kind {
                OpKind::Embedding => Step::Embedding {
                    word: matrix(bundle, tensor(0), h)?,
                    position: matrix(bundle, tensor(1), h)?,
                    token_type: matrix(bundle, tensor(2), h)?,
                    out,
                },
                OpKind::LayerNorm => Step::LayerNorm {
                    x: input(0)?,
                    gamma: vector(bundle, tensor(0))?,
                    beta: vector(bundle, tensor(1))?,
                    eps: op.eps.unwrap_or(1e-12) as f32,
                    out,
                },
                OpKind::Linear => Step::Linear {
                    x: input(0)?,
                    linear: op.linear.unwrap_or(usize::MAX),
                    out,
                },
                OpKind::Attention => Step::Attention {
                    x: input(0)?,
                    heads: op.heads.unwrap_or(1),
                    out,
                },
                OpKind::Gelu => Step::Gelu { x: input(0)?, out },
                OpKind::Add => Step::Add {
                    x: input(0)?,
                    y: input(1)?,
                    out,
                },
                OpKind::MeanPool => Step::MeanPool { x: input(0)?, out },
                OpKind::L2Normalize => Step::L2Normalize { x: input(0)?, out },
                _ => {
                    return Err(OpsError::Bundle(tandem_model::ModelError::InvalidManifest(
                        format!("op {:?} is not supported by this device", op.op),
                    )))
                }
            };
            steps.push(step);
            names.push(&op.output);
        }
        let output = slot(&names, &enc.output)?;
        let (block_of, blocks) = linear_blocks(enc);

        let session = match &linears {
            BundleLinears::Integer => None,
            BundleLinears::Encrypted { ctx, .. } => Some(Arc::new(DeviceSession::new(ctx.clone()))),
        };
        let cloud_layers = match &linears {
            BundleLinears::Integer => Some(bundle.cloud_layers()?),
            BundleLinears::Encrypted { .. } => bundle.cloud_layers().ok(),
        };
        let mut local: Vec<Option<Box<dyn Linear>>> = Vec::with_capacity(enc.linears.len());
        let mut remote: Vec<Option<Box<dyn Linear>>> = Vec::with_capacity(enc.linears.len());
        let mut plans = Vec::new();
        for (index, l) in enc.linears.iter().enumerate() {
            let device = DeviceQuant {
                name: l.name.clone(),
                in_features: l.n_in,
                bits: ActivationBits::Int8,
                weight_scales: vector(bundle, &l.scales)?,
                bias: vector(bundle, &l.bias)?,
            };
            let held = cloud_layers.and_then(|c| c.get(index));
            let weights = match held {
                Some(c) => Array2::from_shape_vec((c.n_out, c.n_in), c.weights.clone())
                    .map_err(|e| OpsError::shape(l.name.clone(), e.to_string()))?,
                None => Array2::zeros((0, 0)),
            };
            let qw = QuantizedWeights {
                weights,
                device: device.clone(),
            };
            if let BundleLinears::Encrypted { ctx, mode, cloud } = &linears {
                let plan = plan_encoder_layer(
                    ctx,
                    *mode,
                    l,
                    enc.batch,
                    enc.link_kbit_per_s(),
                    enc.max_bodies(),
                )
                .map_err(|source| OpsError::He {
                    layer: l.name.clone(),
                    source,
                })?;
                cloud.load(index, &plan, &qw)?;
                plans.push(plan);
                let session = session.clone().ok_or_else(|| OpsError::Cloud {
                    index,
                    reason: "no device session".into(),
                })?;
                remote.push(Some(Box::new(EncryptedLinear::new(
                    index,
                    device,
                    plan,
                    enc.batch,
                    cloud.clone(),
                    session,
                ))));
            } else {
                remote.push(None);
            }
            // The device runs a linear in the clear only with its int8 weights (the signed
            // cloud weights file, digest-checked when the bundle loaded). On the encrypted path
            // they are kept as int8 and expanded on first local use (MiniLM: 22 MB instead of
            // 360 MB when every block is offloaded).
            local.push(match (held, &linears) {
                (None, _) => None,
                (Some(_), BundleLinears::Integer) => {
                    Some(Box::new(QuantizedLinear::new(qw)) as Box<dyn Linear>)
                }
                (Some(_), BundleLinears::Encrypted { .. }) => {
                    Some(Box::new(LazyLocal::new(qw)?) as Box<dyn Linear>)
                }
            });
        }
        let (cloud, mode, split) = match linears {
            BundleLinears::Integer => (None, None, blocks),
            BundleLinears::Encrypted { mode, cloud, .. } => (Some(cloud), Some(mode), 0),
        };
        Ok(Self {
            tokenizer_path,
            tokenizer,
            max_tokens: enc.max_tokens,
            hidden: h,
            slots: names.len(),
            steps,
            output,
            local,
            remote,
            block_of,
            blocks,
            split,
            batch: enc.batch,
            plans,
            session,
            cloud,
            mode,
        })
    }

    /// Loads and verifies the bundle in `dir` (the parts `linears` needs) and builds its encoder.
    ///
    /// # Errors
    /// As [`Bundle::load_part`] and [`BundleEncoder::from_bundle`].
    pub fn load(
        dir: &Path,
        key: &tandem_model::VerifyingKey,
        linears: BundleLinears,
    ) -> Result<Self, OpsError> {
        let part = match linears {
            BundleLinears::Integer => tandem_model::Part::Full,
            BundleLinears::Encrypted { .. } => tandem_model::Part::Device,
        };
        let bundle = Bundle::load_part(dir, key, &tandem_model::Limits::default(), part)?;
        Self::from_bundle(&bundle, linears)
    }

    /// In packed mode, generates the evaluation key covering every layer's chunk and number of
    /// bodies ([`tandem_he::LayerPlan::bodies`]) and uploads it to the cloud; returns its size in bytes (0 for the integer path and no-key mode).
    ///
    /// # Errors
    /// [`OpsError::He`] if the key cannot be generated; the cloud's errors.
    pub fn upload_key(&self) -> Result<usize, OpsError> {
        let (Some(session), Some(cloud), Some(OutputMode::Packed)) =
            (&self.session, &self.cloud, self.mode)
        else {
            return Ok(0);
        };
        let key = session
            .client()
            .evaluation_key_for_plans(&self.plans)
            .map_err(|source| OpsError::He {
                layer: "evaluation key".into(),
                source,
            })?
            .to_bytes();
        cloud.upload_key(&key)?;
        Ok(key.len())
    }

    /// The device's HE session (counters), `None` for the integer path.
    #[must_use]
    pub fn session(&self) -> Option<Arc<DeviceSession>> {
        self.session.clone()
    }

    /// The public plan of each cloud layer (encrypted path; empty for the integer path).
    #[must_use]
    pub fn plans(&self) -> &[LayerPlan] {
        &self.plans
    }

    /// Number of cloud linear layers (requests per batch of tokens).
    #[must_use]
    pub fn linear_count(&self) -> usize {
        self.local.len()
    }

    /// Number of blocks (split depths are `0..=blocks`; `blocks` = everything on the device).
    #[must_use]
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// The block of linear layer `index` (`None` for an unknown index).
    #[must_use]
    pub fn block_of(&self, index: usize) -> Option<usize> {
        self.block_of.get(index).copied()
    }

    /// Rows (tokens) per cloud request (the bundle's `encoder.batch`).
    #[must_use]
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The split depths this encoder can run: `k` such that the device holds the int8
    /// weights of every linear of blocks `< k` and has an encrypted path for the rest.
    #[must_use]
    pub fn split_depths(&self) -> Vec<usize> {
        (0..=self.blocks)
            .filter(|&k| self.check_split(k).is_ok())
            .collect()
    }

    /// The split depth [`BundleEncoder::embed_encoded`] uses (integer path: all blocks;
    /// encrypted path: 0 until [`BundleEncoder::set_split`]).
    #[must_use]
    pub fn split(&self) -> usize {
        self.split
    }

    /// Sets the split depth [`BundleEncoder::embed`] and [`BundleEncoder::embed_encoded`] use.
    ///
    /// # Errors
    /// [`OpsError::Split`] if `k` cannot run (see [`BundleEncoder::split_depths`]).
    pub fn set_split(&mut self, k: usize) -> Result<(), OpsError> {
        self.check_split(k)?;
        self.split = k;
        Ok(())
    }

    /// Whether linear `index` runs on the device at split depth `k`.
    fn runs_locally(&self, index: usize, k: usize) -> bool {
        self.block_of.get(index).is_some_and(|&b| b < k)
    }

    fn check_split(&self, k: usize) -> Result<(), OpsError> {
        let err = |reason: String| OpsError::Split {
            requested: k,
            blocks: self.blocks,
            reason,
        };
        if k > self.blocks {
            return Err(err(format!("the encoder has {} blocks", self.blocks)));
        }
        for i in 0..self.local.len() {
            let name = self.remote.get(i).and_then(Option::as_ref).map_or_else(
                || {
                    self.local
                        .get(i)
                        .and_then(Option::as_ref)
                        .map_or("?", |l| l.name())
                },
                |l| l.name(),
            );
            if self.runs_locally(i, k) {
                if self.local.get(i).and_then(Option::as_ref).is_none() {
                    return Err(err(format!(
                        "linear {i} ({name}) would run on the device, which does not hold its \
                         int8 weights: load the bundle with its cloud weights file (Part::Full) \
                         or choose a depth from split_depths()"
                    )));
                }
            } else if self.remote.get(i).and_then(Option::as_ref).is_none() {
                return Err(err(format!(
                    "linear {i} ({name}) would be offloaded, but this encoder has no encrypted \
                     path (BundleLinears::Integer): build it with BundleLinears::Encrypted"
                )));
            }
        }
        Ok(())
    }

    /// Request counts and bytes of one sentence of `tokens` tokens at split depth `k`, from the
    /// public plans: `(requests, bytes_up, bytes_down)` of the HE blobs (protocol framing not
    /// included). Encrypted path only (0s otherwise).
    #[must_use]
    pub fn offload_volume(&self, tokens: usize, k: usize) -> (u64, u64, u64) {
        let (mut n, mut up, mut down) = (0u64, 0u64, 0u64);
        for (i, p) in self.plans.iter().enumerate() {
            if self.runs_locally(i, k) {
                continue;
            }
            let mut left = tokens;
            while left > 0 {
                let rows = left.min(self.batch.max(1));
                n += 1;
                up += p.upload_bytes(rows) as u64;
                down += p.download_bytes(rows) as u64;
                left -= rows;
            }
        }
        (n, up, down)
    }

    /// Longest token sequence, special tokens included.
    #[must_use]
    pub fn max_seq_length(&self) -> usize {
        self.max_tokens
    }

    /// Width of the embedding.
    #[must_use]
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Tokenises `text` with the bundle's tokenizer, truncated to
    /// [`BundleEncoder::max_seq_length`] tokens, no padding.
    ///
    /// # Errors
    /// [`OpsError::Tokenizer`].
    pub fn encode(&self, text: &str) -> Result<Encoded, OpsError> {
        crate::sentence::tokenize(&self.tokenizer, &self.tokenizer_path, text)
    }

    /// The sentence embedding of `text` (`[hidden]`).
    ///
    /// # Errors
    /// [`OpsError::Tokenizer`], or see [`BundleEncoder::embed_encoded`].
    pub fn embed(&self, text: &str) -> Result<Array1<f32>, OpsError> {
        self.embed_encoded(&self.encode(text)?)
    }

    /// Runs the graph on a tokenised text; returns the output vector (`[hidden]`).
    ///
    /// # Errors
    /// [`OpsError::Shape`] for an empty or over-long sequence or mismatched lengths, the ops'
    /// and the linear layers' errors (over the network: the cloud's refusals).
    pub fn embed_encoded(&self, e: &Encoded) -> Result<Array1<f32>, OpsError> {
        self.embed_encoded_split(e, self.split)
    }

    /// [`BundleEncoder::embed_encoded`] at split depth `k`: the linears of blocks `< k` on
    /// the device in the clear, the rest offloaded under encryption.
    ///
    /// # Errors
    /// [`OpsError::Split`] for a depth this encoder cannot run; as
    /// [`BundleEncoder::embed_encoded`].
    pub fn embed_encoded_split(&self, e: &Encoded, k: usize) -> Result<Array1<f32>, OpsError> {
        self.check_split(k)?;
        self.run(e, k, None)
    }

    /// Runs the graph at split depth `k` (checked by the caller); with `times`, adds each
    /// step's wall time (and, for an offloaded linear, the session's counters) to it.
    pub(crate) fn run(
        &self,
        e: &Encoded,
        k: usize,
        mut times: Option<&mut [StepTime]>,
    ) -> Result<Array1<f32>, OpsError> {
        let t = e.ids.len();
        if t == 0 || t > self.max_tokens || e.type_ids.len() != t || e.mask.len() != t {
            return Err(OpsError::shape(
                "encoder",
                format!(
                    "{t} tokens ({} type ids, {} mask entries), 1..={} supported",
                    e.type_ids.len(),
                    e.mask.len(),
                    self.max_tokens
                ),
            ));
        }
        let mask = ArrayView1::from(&e.mask[..]);
        let mut vals: Vec<Option<Array2<f32>>> = vec![None; self.slots];
        let get = |vals: &Vec<Option<Array2<f32>>>, i: usize| -> Result<Array2<f32>, OpsError> {
            vals.get(i)
                .and_then(Option::as_ref)
                .cloned()
                .ok_or_else(|| OpsError::shape("encoder", format!("value {i} not computed")))
        };
        for (index, step) in self.steps.iter().enumerate() {
            let started = std::time::Instant::now();
            let he_before = match (&times, &self.session) {
                (Some(_), Some(s)) => Some(s.stats()),
                _ => None,
            };
            let (out, v) = match step {
                Step::Embedding {
                    word,
                    position,
                    token_type,
                    out,
                } => (
                    *out,
                    ops::embed(
                        word.view(),
                        position.view(),
                        token_type.view(),
                        &e.ids,
                        &e.type_ids,
                    )?,
                ),
                Step::LayerNorm {
                    x,
                    gamma,
                    beta,
                    eps,
                    out,
                } => (
                    *out,
                    ops::layer_norm(get(&vals, *x)?.view(), gamma.view(), beta.view(), *eps)?,
                ),
                Step::Linear { x, linear, out } => {
                    let placed = if self.runs_locally(*linear, k) {
                        &self.local
                    } else {
                        &self.remote
                    };
                    let l = placed
                        .get(*linear)
                        .and_then(Option::as_ref)
                        .ok_or_else(|| OpsError::Cloud {
                            index: *linear,
                            reason: "no such linear layer at this split depth".into(),
                        })?;
                    (*out, l.forward(get(&vals, *x)?.view())?)
                }
                Step::Attention { x, heads, out } => {
                    let y = get(&vals, *x)?;
                    let h = self.hidden;
                    if y.ncols() != 3 * h {
                        return Err(OpsError::shape(
                            "attention",
                            format!("input {:?}, expected {} columns", y.dim(), 3 * h),
                        ));
                    }
                    let part =
                        |i: usize| y.slice_axis(Axis(1), ndarray::Slice::from(i * h..(i + 1) * h));
                    (
                        *out,
                        ops::attention(part(0), part(1), part(2), *heads, mask)?,
                    )
                }
                Step::Gelu { x, out } => {
                    let mut y = get(&vals, *x)?;
                    ops::gelu_inplace(y.view_mut());
                    (*out, y)
                }
                Step::Add { x, y, out } => {
                    let mut a = get(&vals, *x)?;
                    ops::residual_add(a.view_mut(), get(&vals, *y)?.view())?;
                    (*out, a)
                }
                Step::MeanPool { x, out } => {
                    let p = ops::mean_pool(get(&vals, *x)?.view(), mask)?;
                    (*out, p.insert_axis(Axis(0)))
                }
                Step::L2Normalize { x, out } => {
                    let v = get(&vals, *x)?;
                    let n = ops::l2_normalize(v.row(0));
                    (*out, n.insert_axis(Axis(0)))
                }
            };
            if let Some(s) = vals.get_mut(out) {
                *s = Some(v);
            }
            if let Some(slot) = times.as_deref_mut().and_then(|t| t.get_mut(index)) {
                slot.total_s += started.elapsed().as_secs_f64();
                slot.runs += 1;
                if let (Some(b), Some(s)) = (he_before, &self.session) {
                    let a = s.stats();
                    slot.encrypt_s += a.encrypt_s - b.encrypt_s;
                    slot.decrypt_s += a.decrypt_s - b.decrypt_s;
                    slot.cloud_s += a.cloud_wait_s - b.cloud_wait_s;
                    slot.requests += a.requests - b.requests;
                    slot.bytes_up += a.bytes_up - b.bytes_up;
                    slot.bytes_down += a.bytes_down - b.bytes_down;
                }
            }
        }
        let y = get(&vals, self.output)?;
        Ok(y.row(0).to_owned())
    }
}

/// A linear run in the clear on the device, its int8 weights expanded into the integer
/// pipeline ([`QuantizedLinear`]) on first use.
struct LazyLocal {
    device: DeviceQuant,
    n_out: usize,
    weights: Vec<i8>,
    built: OnceLock<QuantizedLinear>,
}

impl LazyLocal {
    fn new(qw: QuantizedWeights) -> Result<Self, OpsError> {
        let (n_out, n_in) = qw.weights.dim();
        if n_in != qw.device.in_features {
            return Err(OpsError::shape(
                qw.device.name.clone(),
                format!(
                    "weights {n_out}x{n_in}, layer input {}",
                    qw.device.in_features
                ),
            ));
        }
        let weights = qw
            .weights
            .iter()
            .map(|&v| i8::try_from(v))
            .collect::<Result<Vec<i8>, _>>()
            .map_err(|_| {
                OpsError::shape(
                    qw.device.name.clone(),
                    "a weight outside the int8 range in the cloud weights file",
                )
            })?;
        Ok(Self {
            device: qw.device,
            n_out,
            weights,
            built: OnceLock::new(),
        })
    }

    fn get(&self) -> Result<&QuantizedLinear, OpsError> {
        if let Some(l) = self.built.get() {
            return Ok(l);
        }
        let w = Array2::from_shape_vec(
            (self.n_out, self.device.in_features),
            self.weights.iter().map(|&v| i64::from(v)).collect(),
        )
        .map_err(|e| OpsError::shape(self.device.name.clone(), e.to_string()))?;
        let l = QuantizedLinear::new(QuantizedWeights {
            weights: w,
            device: self.device.clone(),
        });
        Ok(self.built.get_or_init(|| l))
    }
}

impl Linear for LazyLocal {
    fn name(&self) -> &str {
        &self.device.name
    }

    fn in_features(&self) -> usize {
        self.device.in_features
    }

    fn out_features(&self) -> usize {
        self.n_out
    }

    fn forward(&self, x: ndarray::ArrayView2<'_, f32>) -> Result<Array2<f32>, OpsError> {
        self.get()?.forward(x)
    }
}

/// Wall time of one graph step, summed over runs (profiling, [`crate::profile`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct StepTime {
    pub(crate) runs: u64,
    pub(crate) total_s: f64,
    pub(crate) encrypt_s: f64,
    pub(crate) decrypt_s: f64,
    pub(crate) cloud_s: f64,
    pub(crate) requests: u64,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
}

impl BundleEncoder {
    /// Per step: `(op name, linear index)` (profiling).
    pub(crate) fn step_kinds(&self) -> Vec<(&'static str, Option<usize>)> {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Embedding { .. } => ("embedding", None),
                Step::LayerNorm { .. } => ("layer_norm", None),
                Step::Linear { linear, .. } => ("linear", Some(*linear)),
                Step::Attention { .. } => ("attention", None),
                Step::Gelu { .. } => ("gelu", None),
                Step::Add { .. } => ("add", None),
                Step::MeanPool { .. } => ("mean_pool", None),
                Step::L2Normalize { .. } => ("l2_normalize", None),
            })
            .collect()
    }

    /// Name of linear `index`.
    pub(crate) fn linear_name(&self, index: usize) -> Option<String> {
        self.local
            .get(index)
            .and_then(Option::as_ref)
            .or_else(|| self.remote.get(index).and_then(Option::as_ref))
            .map(|l| l.name().to_string())
    }

    /// `(in, out)` of linear `index`.
    pub(crate) fn linear_shape(&self, index: usize) -> Option<(usize, usize)> {
        self.local
            .get(index)
            .and_then(Option::as_ref)
            .or_else(|| self.remote.get(index).and_then(Option::as_ref))
            .map(|l| (l.in_features(), l.out_features()))
    }
}

/// The block of every linear of `enc` and the number of blocks (TDM-SPLIT-1): in graph order, a
/// new block starts at each linear whose output an `attention` op reads (its fused Q/K/V); the
/// linears before the first such one belong to block 0. A linear no op uses is put in the
/// last block (it is never run).
fn linear_blocks(enc: &EncoderSpec) -> (Vec<usize>, usize) {
    let n = enc.linears.len();
    let mut produced_by: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut order: Vec<usize> = Vec::new();
    let mut starts = vec![false; n];
    for op in &enc.ops {
        match OpKind::parse(&op.op) {
            Some(OpKind::Linear) => {
                if let Some(i) = op.linear.filter(|&i| i < n) {
                    produced_by.insert(op.output.as_str(), i);
                    if !order.contains(&i) {
                        order.push(i);
                    }
                }
            }
            Some(OpKind::Attention) => {
                for v in &op.inputs {
                    if let Some(&i) = produced_by.get(v.as_str()) {
                        if let Some(s) = starts.get_mut(i) {
                            *s = true;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let mut block_of = vec![usize::MAX; n];
    let mut block = 0usize;
    let mut seen_start = false;
    for &i in &order {
        if starts.get(i).copied().unwrap_or(false) {
            if seen_start {
                block += 1;
            }
            seen_start = true;
        }
        if let Some(b) = block_of.get_mut(i) {
            *b = block;
        }
    }
    let blocks = block + 1;
    for b in &mut block_of {
        if *b == usize::MAX {
            *b = blocks - 1;
        }
    }
    (block_of, blocks)
}

/// A tokenizer from `tokenizer.json` bytes, set up as sentence-transformers runs it:
/// truncation at `max_tokens`, no padding.
fn tokenizer_from_bytes(
    path: &Path,
    bytes: &[u8],
    max_tokens: usize,
) -> Result<Tokenizer, OpsError> {
    let err = |source| OpsError::Tokenizer {
        path: path.to_path_buf(),
        source,
    };
    let mut tokenizer = Tokenizer::from_bytes(bytes).map_err(err)?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..TruncationParams::default()
        }))
        .map_err(err)?;
    Ok(tokenizer)
}
