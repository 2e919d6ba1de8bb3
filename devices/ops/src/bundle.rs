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
use std::sync::Arc;

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
pub struct BundleEncoder {
    tokenizer_path: PathBuf,
    tokenizer: Tokenizer,
    max_tokens: usize,
    hidden: usize,
    steps: Vec<Step>,
    slots: usize,
    output: usize,
    linears: Vec<Box<dyn Linear>>,
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
            .field("linears", &self.linears.len())
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

        let session = match &linears {
            BundleLinears::Integer => None,
            BundleLinears::Encrypted { ctx, .. } => Some(Arc::new(DeviceSession::new(ctx.clone()))),
        };
        let cloud_layers = match &linears {
            BundleLinears::Integer => Some(bundle.cloud_layers()?),
            BundleLinears::Encrypted { .. } => bundle.cloud_layers().ok(),
        };
        let mut built: Vec<Box<dyn Linear>> = Vec::with_capacity(enc.linears.len());
        let mut plans = Vec::new();
        for (index, l) in enc.linears.iter().enumerate() {
            let device = DeviceQuant {
                name: l.name.clone(),
                in_features: l.n_in,
                bits: ActivationBits::Int8,
                weight_scales: vector(bundle, &l.scales)?,
                bias: vector(bundle, &l.bias)?,
            };
            let weights = match cloud_layers.and_then(|c| c.get(index)) {
                Some(c) => Array2::from_shape_vec((c.n_out, c.n_in), c.weights.clone())
                    .map_err(|e| OpsError::shape(l.name.clone(), e.to_string()))?,
                None => Array2::zeros((0, 0)),
            };
            let qw = QuantizedWeights {
                weights,
                device: device.clone(),
            };
            match &linears {
                BundleLinears::Integer => built.push(Box::new(QuantizedLinear::new(qw))),
                BundleLinears::Encrypted { ctx, mode, cloud } => {
                    let plan = plan_encoder_layer(ctx, *mode, l, enc.batch, enc.link_kbit_per_s())
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
                    built.push(Box::new(EncryptedLinear::new(
                        index,
                        device,
                        plan,
                        enc.batch,
                        cloud.clone(),
                        session,
                    )));
                }
            }
        }
        let (cloud, mode) = match linears {
            BundleLinears::Integer => (None, None),
            BundleLinears::Encrypted { mode, cloud, .. } => (Some(cloud), Some(mode)),
        };
        Ok(Self {
            tokenizer_path,
            tokenizer,
            max_tokens: enc.max_tokens,
            hidden: h,
            slots: names.len(),
            steps,
            output,
            linears: built,
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

    /// In packed mode, generates the evaluation key covering every layer's chunk and uploads
    /// it to the cloud; returns its size in bytes (0 for the integer path and no-key mode).
    ///
    /// # Errors
    /// [`OpsError::He`] if the key cannot be generated; the cloud's errors.
    pub fn upload_key(&self) -> Result<usize, OpsError> {
        let (Some(session), Some(cloud), Some(OutputMode::Packed)) =
            (&self.session, &self.cloud, self.mode)
        else {
            return Ok(0);
        };
        let max_chunk = self.plans.iter().map(|p| p.chunk).max().unwrap_or(1);
        let key = session
            .client()
            .evaluation_key(max_chunk)
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
        self.linears.len()
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
        for step in &self.steps {
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
                    let l = self.linears.get(*linear).ok_or_else(|| OpsError::Cloud {
                        index: *linear,
                        reason: "no such linear layer".into(),
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
        }
        let y = get(&vals, self.output)?;
        Ok(y.row(0).to_owned())
    }
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
