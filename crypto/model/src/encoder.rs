//! Transformer encoders as data (issue 8): the `[encoder]` section of a manifest.
//!
//! An encoder bundle describes its forward pass as an ordered graph of operations on named
//! values, each with a placement. Cloud operations are linear maps only (each a protocol
//! `layer_id`: its index in [`EncoderSpec::linears`]); everything else — embedding lookup,
//! LayerNorm, attention, GELU, residual adds, mean pooling, L2 normalisation — runs on the
//! device. Values are `[T, w]` token matrices (`T` tokens of width `w`) or, after pooling,
//! `[w]` vectors.
//!
//! Tensors: the device weights file holds the embedding tables, the LayerNorm parameters and,
//! per linear layer, its int8 per-output-channel weight scales and float bias; the cloud
//! weights file holds only the int8 weights of the linear layers. The tokenizer
//! (`tokenizer.json`) is a third file in the bundle, bound by its SHA-256 like the weights.
//!
//! Quantisation rule (the integer pipeline the encrypted cloud computes exactly): weights
//! int8 per output channel (`W ≈ Wq · s_w[r]`), activations int8 per token with a scale the
//! device chooses and keeps (`|x| ≤ input_bound`), float bias added on the device after
//! dequantisation, so the cloud's bias and its signed bound are 0. The HE plan of each cloud
//! layer is derived from the public fields of [`CloudLinear`] and [`EncoderSpec::batch`]
//! (TDM-MOD-8).

use serde::{Deserialize, Serialize};

use crate::manifest::{Placement, WeightsRef, INT8_MAX};

/// Most operations in an encoder graph.
pub const MAX_OPS: usize = 4096;
/// Most cloud linear layers in an encoder.
pub const MAX_LINEARS: usize = 1024;
/// Largest vocabulary / position table.
pub const MAX_TABLE_ROWS: usize = 1 << 20;
/// Largest planned batch (rows per request), the HE engine's batch limit.
pub const MAX_PLANNED_BATCH: usize = 64;
/// Link rate the HE plans weigh bytes at when the `[encoder]` section names none (kbit/s).
pub const DEFAULT_LINK_KBIT_S: u32 = 25_000;
/// Largest signed link rate (kbit/s): 100 Gbit/s.
pub const MAX_LINK_KBIT_S: u32 = 100_000_000;
/// Largest signed `max_bodies`: secrets that may share one GLWE mask in an HE plan.
pub const MAX_BODIES: u32 = 8;

/// The `[encoder]` section: a transformer encoder described as an op graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderSpec {
    /// Hidden width `H` (the embedding's width and the output vector's length).
    pub hidden: usize,
    /// Longest token sequence accepted (special tokens included).
    pub max_tokens: usize,
    /// Rows (tokens) per cloud request the HE layouts are planned for, `1..=64`; longer
    /// sequences are sent as several requests of at most this many rows.
    pub batch: usize,
    /// Rows of the word-embedding table.
    pub vocab_size: usize,
    /// Rows of the position-embedding table (`>= max_tokens`).
    pub max_position_embeddings: usize,
    /// Rows of the token-type table.
    pub type_vocab_size: usize,
    /// The tokenizer file (`tokenizer.json` of the `tokenizers` library), bound by digest.
    pub tokenizer: WeightsRef,
    /// The cloud linear layers; index = protocol `layer_id`.
    pub linears: Vec<CloudLinear>,
    /// The forward pass, in execution order.
    pub ops: Vec<OpSpec>,
    /// Name of the value the graph returns (a `[hidden]` vector).
    pub output: String,
    /// Link rate (kbit/s, `1..=`[`MAX_LINK_KBIT_S`]) the HE plans of the cloud layers weigh
    /// bytes at; absent = [`DEFAULT_LINK_KBIT_S`]. Public and signed: device and cloud plan
    /// with the same value (TDM-PAR-HE-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_kbit_s: Option<u32>,
    /// Most secrets (`1..=`[`MAX_BODIES`]) one GLWE mask may be shared by in the HE plans of
    /// the cloud layers (shared-mask "multi-body" ciphertexts, Peikert–Vaikuntanathan–Waters
    /// 2008; specs/parameters.md): r row blocks of a request travel as r bodies under r
    /// independent secrets with one mask, so a download carries one mask per r bodies.
    /// Absent = 1 (one secret, one mask per body). Public and signed: device and cloud plan
    /// with the same value (TDM-PAR-HE-3), and the device's evaluation key covers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bodies: Option<u32>,
}

/// One linear layer evaluated by the cloud: `acc = Xq · Wqᵀ` on int8 rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudLinear {
    /// Name (informational, e.g. `encoder.layer.0.attention.self.qkv`).
    pub name: String,
    /// Input width.
    #[serde(rename = "in")]
    pub n_in: usize,
    /// Output width.
    #[serde(rename = "out")]
    pub n_out: usize,
    /// int8 weights `[out, in]`, cloud weights file.
    pub weight: String,
    /// f32 per-output-channel weight scales `[out]` (each > 0), device weights file.
    pub scales: String,
    /// f32 bias `[out]`, device weights file (added on the device).
    pub bias: String,
    /// Public bound on the quantised inputs, `|xq| <= input_bound` (127: int8).
    pub input_bound: i64,
    /// Public bound on the weights, `|wq| <= weight_bound` (127: int8).
    pub weight_bound: i64,
    /// Public bound on the cloud's integer bias (0: the bias is added on the device).
    pub bias_bound: i64,
    /// Signed bound on every row's Σ|wq| (`1..=in · weight_bound`); absent = the entry bound
    /// `in · weight_bound`. The HE plan relies on it (TDM-PAR-HE-3); the cloud refuses, at
    /// load, weights that break it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_row_l1: Option<u64>,
    /// Signed bound on every row's Σwq² (`1..=in · weight_bound²`); absent = the entry bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_row_sq: Option<u64>,
}

impl CloudLinear {
    /// The public bounds its HE plan uses: `(max |wq|, max row Σ|wq|, max row Σwq², max |b|)`
    /// (what `tandem_he::WeightBounds` takes; `None` = derived from the entry bound).
    pub fn plan_bounds(&self) -> (u64, Option<u64>, Option<u64>, u64) {
        (
            self.weight_bound.unsigned_abs(),
            self.max_row_l1,
            self.max_row_sq,
            self.bias_bound.unsigned_abs(),
        )
    }
}

/// One operation of the graph.
///
/// `op` is one of `embedding` (no inputs; `tensors` = word, position, token-type tables),
/// `layer_norm` (`[x]`; `tensors` = gamma, beta of width `w`; `eps`), `linear` (`[x]`;
/// `linear` = index into [`EncoderSpec::linears`]; placement `cloud`), `attention`
/// (`[qkv]` of width `3H` → `H`, `heads` dividing `H`, masked scaled dot-product per head),
/// `gelu` (`[x]`, erf form), `add` (`[x, y]` of equal shape), `mean_pool` (`[x]` → vector,
/// over the real tokens), `l2_normalize` (`[v]` vector → unit vector).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpSpec {
    /// The operation's name (see the type's docs).
    pub op: String,
    /// Names of the values it reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// Name of the value it defines (defined once).
    pub output: String,
    /// Who runs it: `cloud` only for `linear`.
    pub placement: Placement,
    /// Tensors it reads (device weights file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tensors: Vec<String>,
    /// `linear`: index into [`EncoderSpec::linears`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear: Option<usize>,
    /// `attention`: number of heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads: Option<usize>,
    /// `layer_norm`: epsilon (finite, > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
}

impl OpSpec {
    /// A device-placed op `op` reading the values `inputs` and defining `output`, with no
    /// tensors, linear index, heads or epsilon (set those fields as the op needs).
    pub fn device(op: &str, inputs: &[&str], output: &str) -> OpSpec {
        OpSpec {
            op: op.into(),
            inputs: inputs.iter().map(|s| (*s).to_string()).collect(),
            output: output.into(),
            placement: Placement::Device,
            tensors: Vec::new(),
            linear: None,
            heads: None,
            eps: None,
        }
    }
}

/// The operations an encoder graph may use.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Word + position + token-type embedding lookup.
    Embedding,
    /// LayerNorm over the last axis.
    LayerNorm,
    /// Cloud linear layer.
    Linear,
    /// Multi-head self-attention on a fused `[T, 3H]` Q/K/V value.
    Attention,
    /// GELU (erf form).
    Gelu,
    /// Element-wise sum of two values.
    Add,
    /// Mean over the real tokens.
    MeanPool,
    /// Divide a vector by its L2 norm.
    L2Normalize,
}

impl OpKind {
    /// Parses an op name.
    pub fn parse(s: &str) -> Option<OpKind> {
        Some(match s {
            "embedding" => OpKind::Embedding,
            "layer_norm" => OpKind::LayerNorm,
            "linear" => OpKind::Linear,
            "attention" => OpKind::Attention,
            "gelu" => OpKind::Gelu,
            "add" => OpKind::Add,
            "mean_pool" => OpKind::MeanPool,
            "l2_normalize" => OpKind::L2Normalize,
            _ => return None,
        })
    }

    /// The op's name in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::LayerNorm => "layer_norm",
            OpKind::Linear => "linear",
            OpKind::Attention => "attention",
            OpKind::Gelu => "gelu",
            OpKind::Add => "add",
            OpKind::MeanPool => "mean_pool",
            OpKind::L2Normalize => "l2_normalize",
        }
    }

    fn arity(self) -> usize {
        match self {
            OpKind::Embedding => 0,
            OpKind::Add => 2,
            _ => 1,
        }
    }
}

/// The shape of a graph value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueShape {
    /// `[T, width]`: one row per token.
    Tokens(usize),
    /// `[width]`: a pooled vector.
    Vector(usize),
}

/// What is wrong with an encoder graph (typed: tests and tools match on it).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// An op reads a value that only a later (or the same) op defines: the graph has a cycle
    /// or is not in execution order.
    #[error("op {op} ({kind}) reads {value:?}, defined by op {defined_at}: a cycle or an op out of execution order")]
    Cycle {
        /// Index of the reading op.
        op: usize,
        /// Its op name.
        kind: String,
        /// The value.
        value: String,
        /// Index of the op defining it.
        defined_at: usize,
    },
    /// An op reads a value no op defines.
    #[error("op {op} ({kind}) reads {value:?}, which no op defines")]
    Undefined {
        /// Index of the reading op.
        op: usize,
        /// Its op name.
        kind: String,
        /// The value.
        value: String,
    },
    /// Two ops define the same value.
    #[error("value {value:?} is defined twice (ops {first} and {second})")]
    Redefined {
        /// The value.
        value: String,
        /// First definition.
        first: usize,
        /// Second definition.
        second: usize,
    },
    /// An op name this format does not know.
    #[error("op {op}: unknown op {name:?} (known: embedding, layer_norm, linear, attention, gelu, add, mean_pool, l2_normalize)")]
    UnknownOp {
        /// Index of the op.
        op: usize,
        /// The name found.
        name: String,
    },
    /// A non-linear op is placed in the cloud (the cloud only evaluates linear maps with
    /// cleartext weights), or a linear op on the device.
    #[error("op {op} ({kind}) has placement {placement:?}: only `linear` runs in the cloud, and it runs only there")]
    Placement {
        /// Index of the op.
        op: usize,
        /// Its op name.
        kind: String,
        /// The placement found.
        placement: Placement,
    },
    /// Shapes or parameters do not fit.
    #[error("op {op} ({kind}): {reason}")]
    Shape {
        /// Index of the op (or `usize::MAX` for the graph as a whole).
        op: usize,
        /// Its op name.
        kind: String,
        /// What does not fit.
        reason: String,
    },
    /// A linear layer that no op uses, or a field of the section out of range.
    #[error("encoder: {0}")]
    Invalid(String),
}

fn check_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && !s.contains('\0')
}

impl EncoderSpec {
    /// The link rate the HE plans weigh bytes at, kbit/s: the signed `link_kbit_s`, else
    /// [`DEFAULT_LINK_KBIT_S`].
    pub fn link_kbit_per_s(&self) -> u32 {
        self.link_kbit_s.unwrap_or(DEFAULT_LINK_KBIT_S)
    }

    /// Most secrets one mask may be shared by in the HE plans: the signed `max_bodies`,
    /// else 1.
    pub fn max_bodies(&self) -> usize {
        self.max_bodies.unwrap_or(1) as usize
    }

    /// Tensors of the encoder with the party whose weights file holds each.
    pub fn tensor_owners(&self) -> Vec<(String, Placement)> {
        let mut v = Vec::new();
        for op in &self.ops {
            for t in &op.tensors {
                v.push((t.clone(), Placement::Device));
            }
        }
        for l in &self.linears {
            v.push((l.weight.clone(), Placement::Cloud));
            v.push((l.scales.clone(), Placement::Device));
            v.push((l.bias.clone(), Placement::Device));
        }
        v
    }

    /// Expected shape of every device tensor the ops name (`(name, shape)`), from the graph.
    /// Call after [`EncoderSpec::validate`].
    pub fn device_tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let mut shapes: Vec<(&str, ValueShape)> = Vec::new();
        let find = |shapes: &Vec<(&str, ValueShape)>, n: &str| {
            shapes
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, s)| *s)
                .unwrap_or(ValueShape::Tokens(0))
        };
        for op in &self.ops {
            let kind = OpKind::parse(&op.op);
            let out_shape = match kind {
                Some(OpKind::Embedding) => {
                    let h = self.hidden;
                    let rows = [
                        self.vocab_size,
                        self.max_position_embeddings,
                        self.type_vocab_size,
                    ];
                    for (t, r) in op.tensors.iter().zip(rows) {
                        out.push((t.clone(), vec![r, h]));
                    }
                    ValueShape::Tokens(h)
                }
                Some(OpKind::LayerNorm) => {
                    let s = op
                        .inputs
                        .first()
                        .map_or(ValueShape::Tokens(0), |i| find(&shapes, i));
                    let w = match s {
                        ValueShape::Tokens(w) | ValueShape::Vector(w) => w,
                    };
                    for t in &op.tensors {
                        out.push((t.clone(), vec![w]));
                    }
                    s
                }
                Some(OpKind::Linear) => ValueShape::Tokens(
                    op.linear
                        .and_then(|i| self.linears.get(i))
                        .map_or(0, |l| l.n_out),
                ),
                Some(OpKind::Attention) => ValueShape::Tokens(self.hidden),
                Some(OpKind::MeanPool) | Some(OpKind::L2Normalize) => {
                    ValueShape::Vector(self.hidden)
                }
                _ => op
                    .inputs
                    .first()
                    .map_or(ValueShape::Tokens(0), |i| find(&shapes, i)),
            };
            shapes.push((op.output.as_str(), out_shape));
        }
        for l in &self.linears {
            out.push((l.scales.clone(), vec![l.n_out]));
            out.push((l.bias.clone(), vec![l.n_out]));
        }
        out
    }

    /// Checks the graph: known ops, placements (only linear maps in the cloud), execution
    /// order (no cycles, every value defined once before use), shapes and parameters, every
    /// linear layer used, the output a `[hidden]` vector.
    ///
    /// # Errors
    /// The first [`GraphError`] found, in op order.
    pub fn validate(&self, max_dim: usize) -> Result<(), GraphError> {
        let inv = |m: String| Err(GraphError::Invalid(m));
        let dim_ok = |d: usize| (1..=max_dim).contains(&d);
        if !dim_ok(self.hidden) {
            return inv(format!("hidden = {} (1..={max_dim})", self.hidden));
        }
        if self.max_tokens < 3 || self.max_tokens > self.max_position_embeddings {
            return inv(format!(
                "max_tokens = {} (3..=max_position_embeddings = {})",
                self.max_tokens, self.max_position_embeddings
            ));
        }
        if !(1..=MAX_PLANNED_BATCH).contains(&self.batch) {
            return inv(format!("batch = {} (1..={MAX_PLANNED_BATCH})", self.batch));
        }
        for (what, n) in [
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if !(1..=MAX_TABLE_ROWS).contains(&n) {
                return inv(format!("{what} = {n} (1..={MAX_TABLE_ROWS})"));
            }
        }
        let f = &self.tokenizer.file;
        if f.is_empty() || f.len() > 255 || f.contains(['/', '\\', '\0']) || f.starts_with('.') {
            return inv(format!("tokenizer.file {f:?} must be a plain file name"));
        }
        if self.tokenizer.sha256.len() != 64
            || !self
                .tokenizer
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return inv("tokenizer.sha256 must be 64 lower-case hex digits".into());
        }
        if let Some(k) = self.link_kbit_s {
            if !(1..=MAX_LINK_KBIT_S).contains(&k) {
                return inv(format!(
                    "link_kbit_s = {k} (1..={MAX_LINK_KBIT_S}; omit it for {DEFAULT_LINK_KBIT_S})"
                ));
            }
        }
        if let Some(r) = self.max_bodies {
            if !(1..=MAX_BODIES).contains(&r) {
                return inv(format!(
                    "max_bodies = {r} (1..={MAX_BODIES}; omit it for 1)"
                ));
            }
        }
        if self.linears.is_empty() || self.linears.len() > MAX_LINEARS {
            return inv(format!(
                "{} linear layers (1..={MAX_LINEARS})",
                self.linears.len()
            ));
        }
        for (i, l) in self.linears.iter().enumerate() {
            if !dim_ok(l.n_in) || !dim_ok(l.n_out) {
                return inv(format!("linear {i} ({:?}): in/out out of range", l.name));
            }
            if !(1..=INT8_MAX).contains(&l.input_bound) || !(1..=INT8_MAX).contains(&l.weight_bound)
            {
                return inv(format!(
                    "linear {i} ({:?}): input_bound and weight_bound must be in 1..=127 (int8)",
                    l.name
                ));
            }
            if l.bias_bound != 0 {
                return inv(format!(
                    "linear {i} ({:?}): bias_bound must be 0 (the bias is added on the device)",
                    l.name
                ));
            }
            // Row bounds: at least 1 and at most what the entry bound allows (n_in values of
            // at most weight_bound); anything else is a lie or an overflow.
            let wb = l.weight_bound.unsigned_abs();
            let n = l.n_in as u64;
            for (what, v, cap) in [
                ("max_row_l1", l.max_row_l1, n.saturating_mul(wb)),
                ("max_row_sq", l.max_row_sq, n.saturating_mul(wb * wb)),
            ] {
                if let Some(v) = v {
                    if v == 0 || v > cap {
                        return inv(format!(
                            "linear {i} ({:?}): {what} = {v} (1..={cap} = in · weight_bound{}); \
                             re-import the model to recompute it",
                            l.name,
                            if what == "max_row_sq" { "²" } else { "" }
                        ));
                    }
                }
            }
            if !check_name(&l.name)
                || !check_name(&l.weight)
                || !check_name(&l.scales)
                || !check_name(&l.bias)
            {
                return inv(format!("linear {i}: empty or oversized name"));
            }
        }
        if self.ops.is_empty() || self.ops.len() > MAX_OPS {
            return inv(format!("{} ops (1..={MAX_OPS})", self.ops.len()));
        }
        // Where each value is defined (first definition), for cycle vs undefined.
        let mut defs: Vec<(&str, usize)> = Vec::with_capacity(self.ops.len());
        for (i, op) in self.ops.iter().enumerate() {
            if !check_name(&op.output) {
                return inv(format!("op {i}: empty or oversized output name"));
            }
            if let Some(&(_, first)) = defs.iter().find(|(n, _)| *n == op.output) {
                return Err(GraphError::Redefined {
                    value: op.output.clone(),
                    first,
                    second: i,
                });
            }
            defs.push((op.output.as_str(), i));
        }
        let mut shapes: Vec<(&str, ValueShape)> = Vec::with_capacity(self.ops.len());
        let mut used = vec![false; self.linears.len()];
        let h = self.hidden;
        for (i, op) in self.ops.iter().enumerate() {
            let kind = OpKind::parse(&op.op).ok_or_else(|| GraphError::UnknownOp {
                op: i,
                name: op.op.clone(),
            })?;
            let shape_err = |reason: String| GraphError::Shape {
                op: i,
                kind: kind.name().into(),
                reason,
            };
            let want_placement = if kind == OpKind::Linear {
                Placement::Cloud
            } else {
                Placement::Device
            };
            if op.placement != want_placement {
                return Err(GraphError::Placement {
                    op: i,
                    kind: kind.name().into(),
                    placement: op.placement,
                });
            }
            if op.inputs.len() != kind.arity() {
                return Err(shape_err(format!(
                    "{} inputs, takes {}",
                    op.inputs.len(),
                    kind.arity()
                )));
            }
            let mut ins = Vec::with_capacity(op.inputs.len());
            for v in &op.inputs {
                match shapes.iter().find(|(n, _)| n == v) {
                    Some((_, s)) => ins.push(*s),
                    None => {
                        return Err(match defs.iter().find(|(n, _)| n == v) {
                            Some(&(_, at)) => GraphError::Cycle {
                                op: i,
                                kind: kind.name().into(),
                                value: v.clone(),
                                defined_at: at,
                            },
                            None => GraphError::Undefined {
                                op: i,
                                kind: kind.name().into(),
                                value: v.clone(),
                            },
                        })
                    }
                }
            }
            let want_tensors = match kind {
                OpKind::Embedding => 3,
                OpKind::LayerNorm => 2,
                _ => 0,
            };
            if op.tensors.len() != want_tensors || !op.tensors.iter().all(|t| check_name(t)) {
                return Err(shape_err(format!(
                    "names {} tensors, takes {want_tensors}",
                    op.tensors.len()
                )));
            }
            let tokens = |s: ValueShape| match s {
                ValueShape::Tokens(w) => Ok(w),
                ValueShape::Vector(_) => Err(shape_err("needs a [T, w] token value".into())),
            };
            let out = match kind {
                OpKind::Embedding => ValueShape::Tokens(h),
                OpKind::LayerNorm => {
                    match op.eps {
                        Some(e) if e.is_finite() && e > 0.0 => {}
                        _ => return Err(shape_err("eps must be given, finite and > 0".into())),
                    }
                    ins[0]
                }
                OpKind::Linear => {
                    let idx = op
                        .linear
                        .ok_or_else(|| shape_err("no `linear` index".into()))?;
                    let l = self.linears.get(idx).ok_or_else(|| {
                        shape_err(format!(
                            "linear {idx} out of range ({} linear layers)",
                            self.linears.len()
                        ))
                    })?;
                    let w = tokens(ins[0])?;
                    if w != l.n_in {
                        return Err(shape_err(format!(
                            "input width {w}, linear {idx} ({:?}) takes {}",
                            l.name, l.n_in
                        )));
                    }
                    used[idx] = true;
                    ValueShape::Tokens(l.n_out)
                }
                OpKind::Attention => {
                    let heads = op.heads.unwrap_or(0);
                    if heads == 0 || !h.is_multiple_of(heads) {
                        return Err(shape_err(format!(
                            "heads = {heads} must divide hidden = {h}"
                        )));
                    }
                    let w = tokens(ins[0])?;
                    if w != 3 * h {
                        return Err(shape_err(format!(
                            "input width {w}, attention takes fused Q/K/V of width 3·{h}"
                        )));
                    }
                    ValueShape::Tokens(h)
                }
                OpKind::Gelu => ValueShape::Tokens(tokens(ins[0])?),
                OpKind::Add => {
                    if ins[0] != ins[1] {
                        return Err(shape_err(format!("adds {:?} and {:?}", ins[0], ins[1])));
                    }
                    ins[0]
                }
                OpKind::MeanPool => ValueShape::Vector(tokens(ins[0])?),
                OpKind::L2Normalize => match ins[0] {
                    ValueShape::Vector(w) => ValueShape::Vector(w),
                    ValueShape::Tokens(_) => return Err(shape_err("needs a pooled vector".into())),
                },
            };
            if kind != OpKind::Linear && (op.linear.is_some()) {
                return Err(shape_err("`linear` is only for linear ops".into()));
            }
            if kind != OpKind::Attention && op.heads.is_some() {
                return Err(shape_err("`heads` is only for attention".into()));
            }
            if kind != OpKind::LayerNorm && op.eps.is_some() {
                return Err(shape_err("`eps` is only for layer_norm".into()));
            }
            shapes.push((op.output.as_str(), out));
        }
        if let Some(i) = used.iter().position(|u| !u) {
            return inv(format!(
                "linear {i} ({:?}) is not used by any op",
                self.linears[i].name
            ));
        }
        match shapes.iter().find(|(n, _)| *n == self.output) {
            Some((_, ValueShape::Vector(w))) if *w == h => Ok(()),
            Some((_, s)) => Err(GraphError::Shape {
                op: usize::MAX,
                kind: "output".into(),
                reason: format!("output {:?} is {s:?}, expected a [{h}] vector", self.output),
            }),
            None => inv(format!("output {:?} is not defined by any op", self.output)),
        }
    }
}
