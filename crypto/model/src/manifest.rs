//! The bundle manifest: a TOML document describing the model, its layers, their placement
//! (device or cloud), their integer quantisation, and the digest of the weights file.

use serde::{Deserialize, Serialize};

use crate::encoder::EncoderSpec;
use crate::error::{ModelError, Result};

/// The manifest `format` string this crate reads and writes.
///
/// Version 2 (issue 8): the layers are an ordered pipeline in which any number of quantised
/// dense layers may be placed in the cloud (each its own protocol layer id); the device runs
/// everything else (standardisation, float layers, activations, argmax). A version-1 manifest
/// (exactly one cloud layer) is the special case with one cloud layer: changing its `format`
/// line and re-signing it (`tandem model sign`) converts it.
pub const FORMAT: &str = "tandem-model/2";

/// Largest magnitude of a quantised value (int8, symmetric: `-127..=127`).
pub const INT8_MAX: i64 = 127;

/// Largest magnitude accepted for an integer bias (keeps `W·x + b` far from `i64` overflow and
/// within what the HE engine's plaintext space can represent).
pub const MAX_ABS_BIAS: i64 = 1 << 31;

/// A model bundle manifest (the signed part of a bundle).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Model identifier, e.g. `digits-mlp`.
    pub id: String,
    /// Model version, e.g. `1.0.0`.
    pub version: String,
    /// Dataset the model was trained on, e.g. `digits`.
    pub dataset: String,
    /// Length of a raw input vector.
    pub input_dim: usize,
    /// Number of output classes (length of the last layer's output).
    pub classes: usize,
    /// Layer indices that may be evaluated by the cloud (each must be quantised).
    pub split_points: Vec<usize>,
    /// The two weights files (device part and cloud part) and their digests.
    pub weights: Weights,
    /// Optional input standardisation applied on the device before layer 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
    /// The layers, applied in order.
    pub layers: Vec<LayerSpec>,
    /// Informational provenance (seed, split, measured accuracy); covered by the signature but
    /// not used for inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingInfo>,
    /// Optional early-exit head on the split activation and its calibrated τ (issue 10;
    /// [`crate::exit`]). Its tensors live in the device weights file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_head: Option<crate::exit::ExitHeadSpec>,
    /// A transformer encoder described as an op graph (issue 8; [`crate::EncoderSpec`]). When
    /// present, `layers`, `split_points` and `preprocess` are empty, `input_dim` is the
    /// encoder's `max_tokens`, `classes` its hidden width (the embedding's length), and the
    /// cloud layers (protocol `layer_id`s) are the indices of `encoder.linears`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<EncoderSpec>,
    /// Optional DP policy and noise-trained variants, one per supported ε (issue 11;
    /// [`crate::privacy`]). Each variant's tensors live in the file of their owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::privacy::PrivacySpec>,
}

/// The weights are split in two files so that each party holds only its own layers: the
/// device file has the preprocessing tensors and the device layers, the cloud file has the
/// cloud layer. Both are bound to the one signed manifest, so both parties share one digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    /// Tensors of the preprocessing and of the device layers.
    pub device: WeightsRef,
    /// Tensors of the cloud layer.
    pub cloud: WeightsRef,
}

impl Weights {
    /// The file of one party.
    pub fn of(&self, placement: Placement) -> &WeightsRef {
        match placement {
            Placement::Device => &self.device,
            Placement::Cloud => &self.cloud,
        }
    }

    /// Mutable access to the file of one party.
    pub fn of_mut(&mut self, placement: Placement) -> &mut WeightsRef {
        match placement {
            Placement::Device => &mut self.device,
            Placement::Cloud => &mut self.cloud,
        }
    }
}

/// Reference to a weights file, bound to the manifest by its SHA-256 digest and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsRef {
    /// File name, relative to the manifest's directory (a plain name, no path separators).
    pub file: String,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// Per-feature standardisation `x' = (x - mean) / std`, tensors of shape `[input_dim]`, f32.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Name of the f32 mean tensor.
    pub mean: String,
    /// Name of the f32 standard-deviation tensor (all entries must be > 0).
    pub std: String,
}

/// The kind of a layer. Only dense (fully connected) layers exist today.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// `y = W·x + b`.
    Dense,
}

/// Activation applied to a layer's output (on the device, wherever the layer ran).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `max(0, y)`.
    Relu,
    /// Identity.
    None,
    /// Identity, and the prediction is the index of the largest output (last layer only).
    Argmax,
}

/// Where a layer is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// On the device, in the clear.
    Device,
    /// In the cloud, on encrypted or DP-noised int8 inputs.
    Cloud,
}

/// Integer quantisation of a dense layer.
///
/// The layer's input `x` (f32) is quantised to `q = clamp(round(x / input_scale), -clip, clip)`;
/// weights are int8 (`W ≈ w_q · weight_scale`), the bias is an integer in units of
/// `input_scale · weight_scale`; the layer computes the exact integer `z = W_q·q + b_q` and its
/// real-valued output is `z · input_scale · weight_scale`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSpec {
    /// Scale of the quantised input (real value per integer step), finite and > 0.
    pub input_scale: f32,
    /// Scale of the int8 weights, finite and > 0.
    pub weight_scale: f32,
    /// Clipping bound of the quantised input, `1..=127`.
    pub input_clip: i64,
    /// Declared bound on the integer bias, `|b_r| <= max_abs_bias` (checked against the tensor
    /// when the bundle loads). Public and signed: the device and the cloud both plan the
    /// encrypted layer from it, so it must be tight — the default, [`MAX_ABS_BIAS`], costs
    /// encoding headroom (smaller input chunks, larger uploads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs_bias: Option<i64>,
}

impl QuantSpec {
    /// The bias bound both parties plan with.
    pub fn bias_bound(&self) -> i64 {
        self.max_abs_bias.unwrap_or(MAX_ABS_BIAS)
    }
}

/// One layer of the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Layer name (informational, used in errors).
    pub name: String,
    /// Layer kind.
    pub kind: LayerKind,
    /// Input length.
    #[serde(rename = "in")]
    pub n_in: usize,
    /// Output length.
    #[serde(rename = "out")]
    pub n_out: usize,
    /// Activation applied to the output.
    pub activation: Activation,
    /// Who evaluates the layer.
    pub placement: Placement,
    /// Weight tensor name: shape `[out, in]`, f32 for a float layer, i8 for a quantised one.
    pub weight: String,
    /// Bias tensor name: shape `[out]`, f32 for a float layer, i64 for a quantised one.
    pub bias: String,
    /// Integer quantisation; required for cloud layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantSpec>,
}

/// How the model was produced (informational).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingInfo {
    /// The command that produced the bundle.
    pub command: String,
    /// Seed of the split, initialisation and mini-batch order.
    pub seed: u64,
    /// Description of the train/test split.
    pub split: String,
    /// Number of training examples.
    pub train_samples: usize,
    /// Number of test examples.
    pub test_samples: usize,
    /// Test accuracy of the float model before quantisation.
    pub float_test_accuracy: f64,
    /// Test accuracy of this bundle's exact integer pipeline.
    pub quantised_test_accuracy: f64,
}

/// Limits applied to untrusted bundles before and while reading them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest manifest file accepted, in bytes.
    pub max_manifest_bytes: u64,
    /// Largest weights file accepted, in bytes.
    pub max_weights_bytes: u64,
    /// Most layers accepted.
    pub max_layers: usize,
    /// Largest input/output length of any layer.
    pub max_dim: usize,
}

impl Default for Limits {
    /// 64 KiB manifest, 64 MiB weights, 32 layers, dimensions up to 8192.
    fn default() -> Self {
        Limits {
            max_manifest_bytes: 64 * 1024,
            max_weights_bytes: 64 * 1024 * 1024,
            max_layers: 32,
            max_dim: 8192,
        }
    }
}

fn invalid(msg: impl Into<String>) -> ModelError {
    ModelError::InvalidManifest(msg.into())
}

fn positive_finite(v: f32) -> bool {
    v.is_finite() && v > 0.0
}

impl Manifest {
    /// Parses a manifest from TOML text (no signature check; see [`crate::Bundle::load`]).
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| ModelError::ManifestParse(e.to_string()))
    }

    /// The canonical TOML serialisation (what the signer writes and signs).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| invalid(format!("cannot serialise: {e}")))
    }

    /// Indices of the cloud layers, in pipeline order (the protocol `layer_id` of each). A
    /// model may have any number of cloud segments; validation requires at least one.
    pub fn cloud_indices(&self) -> Vec<usize> {
        if let Some(e) = &self.encoder {
            return (0..e.linears.len()).collect();
        }
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.placement == Placement::Cloud)
            .map(|(i, _)| i)
            .collect()
    }

    /// Index of the first cloud layer (the only one in a single-cloud-layer model).
    ///
    /// # Errors
    /// [`ModelError::InvalidManifest`] if no layer is placed in the cloud.
    pub fn cloud_index(&self) -> Result<usize> {
        self.cloud_indices()
            .first()
            .copied()
            .ok_or_else(|| invalid("no layer has placement = \"cloud\""))
    }

    /// Every tensor the manifest names, with the party whose weights file holds it.
    pub fn tensor_owners(&self) -> Vec<(String, Placement)> {
        let mut v = Vec::new();
        if let Some(p) = &self.preprocess {
            v.push((p.mean.clone(), Placement::Device));
            v.push((p.std.clone(), Placement::Device));
        }
        for l in &self.layers {
            v.push((l.weight.clone(), l.placement));
            v.push((l.bias.clone(), l.placement));
        }
        if let Some(h) = &self.exit_head {
            v.extend(h.tensor_owners());
        }
        if let Some(e) = &self.encoder {
            v.extend(e.tensor_owners());
        }
        if let Some(p) = &self.privacy {
            v.extend(p.tensor_owners());
        }
        v
    }

    /// Checks the manifest's internal consistency (not the tensors; see [`crate::Bundle`]).
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        if self.format != FORMAT {
            return Err(invalid(format!(
                "format is {:?}, expected {FORMAT:?} (a \"tandem-model/1\" bundle converts by \
                 changing its format line and re-signing it with `tandem model sign`)",
                self.format
            )));
        }
        for (what, s) in [
            ("id", &self.id),
            ("version", &self.version),
            ("dataset", &self.dataset),
        ] {
            if s.is_empty() || s.len() > 128 {
                return Err(invalid(format!("{what} must be 1..=128 bytes")));
            }
        }
        for (p, w) in [
            ("device", &self.weights.device),
            ("cloud", &self.weights.cloud),
        ] {
            let f = &w.file;
            if f.is_empty() || f.len() > 255 || f.contains(['/', '\\', '\0']) || f.starts_with('.')
            {
                return Err(invalid(format!(
                    "weights.{p}.file {f:?} must be a plain file name"
                )));
            }
            if w.sha256.len() != 64
                || !w
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(invalid(format!(
                    "weights.{p}.sha256 must be 64 lower-case hex digits"
                )));
            }
        }
        if self.weights.device.file == self.weights.cloud.file {
            return Err(invalid("the device and cloud weights files must differ"));
        }
        if let Some(e) = &self.encoder {
            return self.validate_encoder(e, limits);
        }
        if self.layers.is_empty() || self.layers.len() > limits.max_layers {
            return Err(invalid(format!(
                "{} layers (allowed 1..={})",
                self.layers.len(),
                limits.max_layers
            )));
        }
        let dim_ok = |d: usize| (1..=limits.max_dim).contains(&d);
        if !dim_ok(self.input_dim) {
            return Err(invalid(format!(
                "input_dim {} out of range",
                self.input_dim
            )));
        }
        let mut prev = self.input_dim;
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            let ctx = |m: &str| invalid(format!("layer {i} ({:?}): {m}", l.name));
            if !dim_ok(l.n_in) || !dim_ok(l.n_out) {
                return Err(ctx("in/out out of range"));
            }
            if l.n_in != prev {
                return Err(ctx(&format!(
                    "in = {} but previous output is {prev}",
                    l.n_in
                )));
            }
            prev = l.n_out;
            if l.weight.is_empty() || l.bias.is_empty() || l.weight == l.bias {
                return Err(ctx(
                    "weight and bias must be distinct non-empty tensor names",
                ));
            }
            if l.activation == Activation::Argmax && i != last {
                return Err(ctx("argmax is only allowed on the last layer"));
            }
            if i == last && l.activation == Activation::Relu {
                return Err(ctx("the last layer must have activation none or argmax"));
            }
            if let Some(q) = &l.quant {
                if !positive_finite(q.input_scale) || !positive_finite(q.weight_scale) {
                    return Err(ctx("quantisation scales must be finite and > 0"));
                }
                let s = q.input_scale * q.weight_scale;
                if !positive_finite(s) {
                    return Err(ctx("input_scale * weight_scale must be finite and > 0"));
                }
                if !(0..=MAX_ABS_BIAS).contains(&q.bias_bound()) {
                    return Err(ctx("max_abs_bias must be in 0..=2^31"));
                }
                if !(1..=INT8_MAX).contains(&q.input_clip) {
                    return Err(ctx("input_clip must be in 1..=127"));
                }
            } else if l.placement == Placement::Cloud {
                return Err(ctx("a cloud layer must be quantised"));
            }
        }
        if prev != self.classes || self.classes < 2 {
            return Err(invalid(format!(
                "classes = {} but the last layer outputs {prev} (need >= 2)",
                self.classes
            )));
        }
        let names = self.tensor_owners();
        let mut sorted: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!("tensor name {:?} is used twice", w[0])));
        }
        let clouds = self.cloud_indices();
        if clouds.is_empty() {
            return Err(invalid("no layer has placement = \"cloud\""));
        }
        if clouds.first() == Some(&0) {
            return Err(invalid(
                "a cloud layer cannot be layer 0: the device must run at least one layer \
                 so that raw inputs never leave it",
            ));
        }
        if self.split_points.is_empty() {
            return Err(invalid("split_points is empty"));
        }
        for &s in &self.split_points {
            match self.layers.get(s) {
                Some(l) if s > 0 && l.quant.is_some() => {}
                _ => {
                    return Err(invalid(format!(
                        "split point {s} is not a quantised layer after layer 0"
                    )))
                }
            }
        }
        if let Some(c) = clouds.iter().find(|c| !self.split_points.contains(c)) {
            return Err(invalid(format!(
                "cloud layer {c} is not among split_points"
            )));
        }
        if let Some(h) = &self.exit_head {
            h.validate(self)?;
        }
        if let Some(p) = &self.privacy {
            p.validate(self, limits)?;
        }
        Ok(())
    }

    /// An encoder manifest (no dense layers; see [`Manifest::encoder`]) for `encoder`, with
    /// weights files `device.safetensors` and `cloud.safetensors` (digests filled in when the
    /// bundle is written, [`crate::write_bundle`]) and every other optional section absent.
    ///
    /// # Errors
    /// [`ModelError::ManifestParse`] if `id`, `version` or `dataset` cannot be represented.
    pub fn for_encoder(
        id: &str,
        version: &str,
        dataset: &str,
        encoder: EncoderSpec,
    ) -> Result<Manifest> {
        #[derive(Serialize)]
        struct Head<'a> {
            format: &'a str,
            id: &'a str,
            version: &'a str,
            dataset: &'a str,
            input_dim: usize,
            classes: usize,
            split_points: [usize; 0],
            layers: [usize; 0],
            weights: Weights,
        }
        let wref = |f: &str| WeightsRef {
            file: f.into(),
            sha256: "0".repeat(64),
            bytes: 0,
        };
        let head = Head {
            format: FORMAT,
            id,
            version,
            dataset,
            input_dim: encoder.max_tokens,
            classes: encoder.hidden,
            split_points: [],
            layers: [],
            weights: Weights {
                device: wref("device.safetensors"),
                cloud: wref("cloud.safetensors"),
            },
        };
        // Through the schema's own defaults, so sections added later stay absent.
        let text = toml::to_string(&head).map_err(|e| ModelError::ManifestParse(e.to_string()))?;
        let mut m = Manifest::from_toml(&text)?;
        m.encoder = Some(encoder);
        Ok(m)
    }

    /// The checks of an encoder manifest after the common ones.
    fn validate_encoder(&self, e: &EncoderSpec, limits: &Limits) -> Result<()> {
        if !self.layers.is_empty()
            || !self.split_points.is_empty()
            || self.preprocess.is_some()
            || self.exit_head.is_some()
        {
            return Err(invalid(
                "an encoder manifest has no layers, split_points, preprocess or exit_head (its \
                 graph is the [encoder] section)",
            ));
        }
        e.validate(limits.max_dim)?;
        if self.input_dim != e.max_tokens || self.classes != e.hidden {
            return Err(invalid(format!(
                "an encoder manifest has input_dim = encoder.max_tokens ({}) and classes = \
                 encoder.hidden ({}); found {} and {}",
                e.max_tokens, e.hidden, self.input_dim, self.classes
            )));
        }
        let files = [&self.weights.device.file, &self.weights.cloud.file];
        if files.contains(&&e.tokenizer.file) {
            return Err(invalid(
                "the tokenizer file must differ from the weights files",
            ));
        }
        let names = self.tensor_owners();
        let mut sorted: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!("tensor name {:?} is used twice", w[0])));
        }
        Ok(())
    }
}
