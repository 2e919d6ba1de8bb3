//! Loading a signed bundle and running its exact integer split pipeline.

use std::io::Read;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, VerifyingKey};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::error::{io_err, ModelError, Result};
use crate::manifest::{
    Activation, LayerSpec, Limits, Manifest, Placement, WeightsRef, MAX_ABS_BIAS,
};

/// File name of the manifest inside a bundle directory.
pub const MANIFEST_FILE: &str = "manifest.toml";
/// File name of the signature inside a bundle directory.
pub const SIGNATURE_FILE: &str = "manifest.sig";
/// Domain-separation prefix of the signed message: the signature is over
/// `SIGNING_CONTEXT || manifest bytes`.
pub const SIGNING_CONTEXT: &[u8] = b"tandem-model-manifest/v1\n";
/// Largest signature file accepted (hex text plus whitespace).
const MAX_SIG_FILE_BYTES: u64 = 1024;

/// The weights of one layer, as loaded and checked.
#[derive(Clone, Debug)]
enum Params {
    /// f32 weights `[out][in]` and bias `[out]`.
    Float { w: Vec<f32>, b: Vec<f32> },
    /// int8 weights (held as i64) `[out][in]` and integer bias `[out]`; the scales are in the
    /// layer's [`crate::QuantSpec`].
    Int { w: Vec<i64>, b: Vec<i64> },
}

/// Which part of a bundle is loaded: each party needs only its own weights file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Both weights files (plaintext reference, tests, tools).
    Full,
    /// Only the device file: preprocessing and device layers (what a device holds).
    Device,
    /// Only the cloud file: the cloud layer (what the cloud holds).
    Cloud,
}

impl Part {
    /// Whether this part includes the weights of layers placed on `p`.
    pub fn has(self, p: Placement) -> bool {
        matches!(
            (self, p),
            (Part::Full, _) | (Part::Device, Placement::Device) | (Part::Cloud, Placement::Cloud)
        )
    }
}

fn not_loaded(what: &str) -> ModelError {
    ModelError::NotLoaded(what.to_string())
}

/// One layer: its manifest entry and, if its party's part is loaded, its checked parameters.
#[derive(Clone, Debug)]
pub struct Layer {
    spec: LayerSpec,
    params: Option<Params>,
}

impl Layer {
    /// The manifest entry of this layer.
    pub fn spec(&self) -> &LayerSpec {
        &self.spec
    }

    /// Whether the layer is integer-quantised.
    pub fn is_quantised(&self) -> bool {
        self.spec.quant.is_some()
    }

    /// Whether the layer's weights are loaded (its party's part of the bundle is).
    pub fn is_loaded(&self) -> bool {
        self.params.is_some()
    }

    fn params(&self) -> Result<&Params> {
        self.params
            .as_ref()
            .ok_or_else(|| not_loaded(&format!("weights of layer {:?}", self.spec.name)))
    }

    /// Evaluates the layer on a real-valued input and returns its real-valued output (before
    /// the activation) and, for a quantised layer, the exact integer output `W_q·q + b_q`.
    fn eval(&self, x: &[f32]) -> Result<(Vec<f32>, Option<Vec<i64>>)> {
        match (self.params()?, &self.spec.quant) {
            (Params::Float { w, b }, _) => {
                let y = dense_f32(w, b, x);
                check_finite(&y, || format!("layer {}", self.spec.name))?;
                Ok((y, None))
            }
            (Params::Int { .. }, Some(qs)) => {
                let q = quantize(x, qs.input_scale, qs.input_clip, &self.spec.name)?;
                let z = self.eval_int(&q)?;
                Ok((self.dequantize(&z)?, Some(z)))
            }
            (Params::Int { .. }, None) => Err(ModelError::InvalidManifest(format!(
                "layer {:?} has int8 weights but no quant section",
                self.spec.name
            ))),
        }
    }

    /// Exact `W_q·q + b_q` of a quantised layer (any integer `q`, e.g. DP-noised).
    fn eval_int(&self, q: &[i64]) -> Result<Vec<i64>> {
        let Params::Int { w, b } = self.params()? else {
            return Err(ModelError::InvalidInput(format!(
                "layer {:?} is not quantised",
                self.spec.name
            )));
        };
        let n_in = self.spec.n_in;
        if q.len() != n_in {
            return Err(ModelError::InvalidInput(format!(
                "layer {:?} takes {n_in} values, got {}",
                self.spec.name,
                q.len()
            )));
        }
        let mut out = Vec::with_capacity(b.len());
        for (row, &bias) in w.chunks_exact(n_in).zip(b) {
            let acc = row.iter().zip(q).fold(i128::from(bias), |a, (&wi, &qi)| {
                a + i128::from(wi) * i128::from(qi)
            });
            out.push(i64::try_from(acc).map_err(|_| ModelError::Overflow(self.spec.name.clone()))?);
        }
        Ok(out)
    }

    /// Real value of an integer output: `z · input_scale · weight_scale` (computed in f64,
    /// then rounded to f32). Needs only the manifest, not the weights.
    ///
    /// # Errors
    /// [`ModelError::NonFinite`] if a value does not fit a finite f32.
    fn dequantize(&self, z: &[i64]) -> Result<Vec<f32>> {
        let s = self.spec.quant.as_ref().map_or(1.0, |q| {
            f64::from(q.input_scale) * f64::from(q.weight_scale)
        });
        let y: Vec<f32> = z.iter().map(|&v| (v as f64 * s) as f32).collect();
        check_finite(&y, || format!("dequantisation of {}", self.spec.name))?;
        Ok(y)
    }
}

/// The integer layer the cloud evaluates: `z = W·x + b` with int8 `W` and `x`, i64 `b`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudLayer {
    /// Index of the layer in the manifest.
    pub index: usize,
    /// Layer name.
    pub name: String,
    /// Input length.
    pub n_in: usize,
    /// Output length.
    pub n_out: usize,
    /// Weights, row-major `[n_out][n_in]`, each in `-127..=127`.
    pub weights: Vec<i64>,
    /// Bias, length `n_out`, each of magnitude at most [`MAX_ABS_BIAS`].
    pub bias: Vec<i64>,
    /// Bound of the (un-noised) quantised inputs: `|x_i| <= input_clip`.
    pub input_clip: i64,
    /// The manifest's declared bias bound (what both sides plan the encrypted layer with).
    pub bias_bound: i64,
}

/// A prediction: the class and the last layer's real-valued outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Index of the largest output (first one on ties).
    pub class: usize,
    /// The last layer's outputs (for a quantised last layer, dequantised).
    pub logits: Vec<f32>,
}

/// A verified, fully checked model bundle.
#[derive(Clone, Debug)]
pub struct Bundle {
    manifest: Manifest,
    digest: [u8; 32],
    preprocess: Option<(Vec<f32>, Vec<f32>)>,
    layers: Vec<Layer>,
    /// Indices of the cloud layers, in pipeline order (never empty).
    clouds: Vec<usize>,
    /// The cloud layers in integer form, same order (empty unless the cloud part is loaded).
    cloud_layers: Vec<CloudLayer>,
    part: Part,
    /// The early-exit head, if the manifest has one and the device part is loaded.
    exit_head: Option<crate::exit::ExitHead>,
    /// An encoder bundle's device tensors (f32, shapes checked against the graph), by name.
    device_tensors: std::collections::BTreeMap<String, Vec<f32>>,
    /// An encoder bundle's tokenizer file (digest checked), when the device part is loaded.
    tokenizer: Option<Vec<u8>>,
    /// The noise-trained variants of the `[privacy]` section (issue 11), in manifest order.
    variants: Vec<crate::privacy::Variant>,
    /// In a variant's own pipeline: the bottleneck entering the cloud layer is normalised to
    /// unit L1 (Laplace) or L2 (Gaussian) norm before it is quantised and released.
    normalize: Option<crate::privacy::DpMechanism>,
}

/// Where a split inference stands after a device segment ([`Bundle::start`],
/// [`Bundle::resume`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// The cloud must evaluate layer `layer` (its manifest index, the protocol `layer_id`) on
    /// `input`, the int8-quantised activation; `activation` is the real-valued activation it
    /// was quantised from (what a DP release noises).
    Cloud {
        /// Manifest index of the cloud layer.
        layer: usize,
        /// `clamp(round(activation / input_scale), -input_clip, input_clip)`, length `n_in`.
        input: Vec<i64>,
        /// Real-valued activation entering the layer, length `n_in`.
        activation: Vec<f32>,
    },
    /// The pipeline is finished.
    Done(Prediction),
}

/// Reads a file of at most `limit` bytes, refusing larger files before reading them.
pub(crate) fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let size = f.metadata().map_err(io_err(path))?.len();
    if size > limit {
        return Err(ModelError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit,
        });
    }
    let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // The file may grow between the size check and the read: never read past the limit.
    f.take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > limit {
        return Err(ModelError::TooLarge {
            path: path.to_path_buf(),
            size: buf.len() as u64,
            limit,
        });
    }
    Ok(buf)
}

/// Lower-case hex.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(H[usize::from(b >> 4)]));
        s.push(char::from(H[usize::from(b & 15)]));
    }
    s
}

/// Parses hex (either case) into exactly `N` bytes.
pub(crate) fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let nib = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (nib(pair[0])? << 4) | nib(pair[1])?;
    }
    Some(out)
}

/// SHA-256 of `data`.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Resolves a bundle directory or manifest path into (manifest path, signature path).
pub(crate) fn bundle_paths(path: &Path) -> (PathBuf, PathBuf) {
    if path.is_dir() {
        (path.join(MANIFEST_FILE), path.join(SIGNATURE_FILE))
    } else {
        (path.to_path_buf(), path.with_extension("sig"))
    }
}

/// Parses a hex signature file.
pub(crate) fn read_signature(path: &Path) -> Result<Signature> {
    let bytes = read_limited(path, MAX_SIG_FILE_BYTES)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ModelError::SignatureFormat {
        path: path.to_path_buf(),
        reason: "not UTF-8".into(),
    })?;
    let raw = from_hex::<64>(text.trim()).ok_or_else(|| ModelError::SignatureFormat {
        path: path.to_path_buf(),
        reason: "expected 128 hex digits".into(),
    })?;
    Ok(Signature::from_bytes(&raw))
}

/// The message that is signed for a manifest.
pub(crate) fn signed_message(manifest_bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + manifest_bytes.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(manifest_bytes);
    m
}

fn tensor_err(name: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Tensor {
        name: name.to_string(),
        reason: reason.into(),
    }
}

fn get_tensor<'a>(
    st: &SafeTensors<'a>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<TensorView<'a>> {
    let t = st
        .tensor(name)
        .map_err(|_| tensor_err(name, "missing from the weights file"))?;
    if t.dtype() != dtype {
        return Err(tensor_err(
            name,
            format!("dtype {:?}, expected {dtype:?}", t.dtype()),
        ));
    }
    if t.shape() != shape {
        return Err(tensor_err(
            name,
            format!("shape {:?}, expected {shape:?}", t.shape()),
        ));
    }
    Ok(t)
}

pub(crate) fn read_f32(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = get_tensor(st, name, Dtype::F32, shape)?;
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if v.iter().any(|x| !x.is_finite()) {
        return Err(tensor_err(name, "non-finite value"));
    }
    Ok(v)
}

fn read_i8(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<i64>> {
    let t = get_tensor(st, name, Dtype::I8, shape)?;
    let v: Vec<i64> = t
        .data()
        .iter()
        .map(|&b| i64::from(i8::from_le_bytes([b])))
        .collect();
    if v.contains(&-128) {
        return Err(tensor_err(name, "int8 weights must be in -127..=127"));
    }
    Ok(v)
}

fn read_i64(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<i64>> {
    let t = get_tensor(st, name, Dtype::I64, shape)?;
    let v: Vec<i64> = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    if v.iter()
        .any(|b| b.unsigned_abs() > MAX_ABS_BIAS.unsigned_abs())
    {
        return Err(tensor_err(name, "integer bias magnitude above 2^31"));
    }
    Ok(v)
}

/// Fails with [`ModelError::NonFinite`] naming `stage` and the first index where `v` holds
/// NaN or ±∞.
pub(crate) fn check_finite(v: &[f32], stage: impl FnOnce() -> String) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(ModelError::NonFinite {
            stage: stage(),
            index,
        }),
    }
}

/// Round-to-nearest (ties away from zero), clip to `-clip..=clip`; rejects non-finite input.
/// (A finite `v` whose quotient `v / scale` overflows is clipped, which is exact.)
fn quantize(x: &[f32], scale: f32, clip: i64, layer: &str) -> Result<Vec<i64>> {
    check_finite(x, || format!("quantisation of the input of {layer}"))?;
    let c = clip as f32;
    // `as` saturates; the clamp keeps the value in the int8 range anyway.
    Ok(x.iter()
        .map(|&v| (v / scale).round().clamp(-c, c) as i64)
        .collect())
}

fn dense_f32(w: &[f32], b: &[f32], x: &[f32]) -> Vec<f32> {
    let n_in = x.len();
    w.chunks_exact(n_in.max(1))
        .zip(b)
        .map(|(row, &bias)| row.iter().zip(x).fold(bias, |a, (&wi, &xi)| a + wi * xi))
        .collect()
}

/// Applies a layer's activation. A NaN is refused, never mapped to a number (ReLU would
/// otherwise turn it into a plausible 0).
fn activate(a: Activation, mut y: Vec<f32>, layer: &str) -> Result<Vec<f32>> {
    check_finite(&y, || format!("activation of {layer}"))?;
    if a == Activation::Relu {
        for v in &mut y {
            if *v <= 0.0 {
                *v = 0.0;
            }
        }
    }
    Ok(y)
}

fn argmax_f32(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if v.get(best).is_some_and(|&b| x > b) {
            best = i;
        }
    }
    best
}

fn argmax_i64(v: &[i64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if v.get(best).is_some_and(|&b| x > b) {
            best = i;
        }
    }
    best
}

/// Loads the parameters of `specs` from the loaded weights files (a layer whose party's file
/// is not loaded gets none).
fn load_layers(
    specs: &[LayerSpec],
    dev: Option<&SafeTensors<'_>>,
    cl: Option<&SafeTensors<'_>>,
) -> Result<Vec<Layer>> {
    let mut layers = Vec::with_capacity(specs.len());
    for spec in specs {
        let st = match spec.placement {
            Placement::Device => dev.as_ref(),
            Placement::Cloud => cl.as_ref(),
        };
        let wshape = [spec.n_out, spec.n_in];
        let bshape = [spec.n_out];
        let params = match (st, &spec.quant) {
            (None, _) => None,
            (Some(st), None) => Some(Params::Float {
                w: read_f32(st, &spec.weight, &wshape)?,
                b: read_f32(st, &spec.bias, &bshape)?,
            }),
            (Some(st), Some(q)) => {
                let b = read_i64(st, &spec.bias, &bshape)?;
                if b.iter()
                    .any(|v| v.unsigned_abs() > q.bias_bound().unsigned_abs())
                {
                    return Err(tensor_err(
                        &spec.bias,
                        "bias above the manifest's max_abs_bias",
                    ));
                }
                Some(Params::Int {
                    w: read_i8(st, &spec.weight, &wshape)?,
                    b,
                })
            }
        };
        layers.push(Layer {
            spec: spec.clone(),
            params,
        });
    }
    Ok(layers)
}

/// Parses the weights file of party `p` (if `part` includes it) and checks that it holds exactly
/// the tensors that party owns: no more (nothing leaks into the wrong party's file), no fewer.
fn parse_part<'a>(
    owners: &[(String, Placement)],
    part: Part,
    bytes: Option<&'a [u8]>,
    p: Placement,
) -> Result<Option<SafeTensors<'a>>> {
    if !part.has(p) {
        return Ok(None);
    }
    let bytes = bytes.ok_or_else(|| not_loaded("weights file"))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))?;
    let mut want: Vec<&str> = owners
        .iter()
        .filter(|(_, o)| *o == p)
        .map(|(n, _)| n.as_str())
        .collect();
    want.sort_unstable();
    let mut have = st.names();
    have.sort_unstable();
    if let Some(extra) = have.iter().find(|n| want.binary_search(n).is_err()) {
        return Err(tensor_err(
            extra,
            format!("not expected in the {p:?} weights file"),
        ));
    }
    if let Some(missing) = want.iter().find(|n| have.binary_search(n).is_err()) {
        return Err(tensor_err(
            missing,
            format!("missing from the {p:?} weights file"),
        ));
    }
    Ok(Some(st))
}

impl Bundle {
    /// Loads a whole bundle (both weights files) from its directory (`manifest.toml`,
    /// `manifest.sig`, weights) or from the path of its manifest (the signature is then the
    /// same path with extension `.sig`). Same as [`Bundle::load_part`] with [`Part::Full`].
    pub fn load(path: &Path, key: &VerifyingKey, limits: &Limits) -> Result<Bundle> {
        Bundle::load_part(path, key, limits, Part::Full)
    }

    /// Loads the part of a bundle one party needs: the signed manifest and that party's
    /// weights file (the other file need not be present).
    ///
    /// Order of checks: manifest size limit; Ed25519 signature (`verify_strict`) over
    /// [`SIGNING_CONTEXT`] followed by the exact manifest bytes — before the TOML is parsed;
    /// manifest schema and consistency; each weights file's size against the limit and against
    /// the manifest, before reading it; its SHA-256; safetensors structure; the exact set of
    /// tensor names in each file; every tensor's dtype, shape and value range.
    pub fn load_part(
        path: &Path,
        key: &VerifyingKey,
        limits: &Limits,
        part: Part,
    ) -> Result<Bundle> {
        let (manifest_path, sig_path) = bundle_paths(path);
        let manifest_bytes = read_limited(&manifest_path, limits.max_manifest_bytes)?;
        let sig = read_signature(&sig_path)?;
        key.verify_strict(&signed_message(&manifest_bytes), &sig)
            .map_err(|_| ModelError::BadSignature {
                path: manifest_path.clone(),
            })?;
        let manifest = parse_manifest(&manifest_bytes, limits).map_err(|e| match e {
            ModelError::ManifestParse(m) => {
                ModelError::ManifestParse(format!("{}: {m}", manifest_path.display()))
            }
            ModelError::InvalidManifest(m) => {
                ModelError::InvalidManifest(format!("{}: {m}", manifest_path.display()))
            }
            e => e,
        })?;
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let mut files = [None, None];
        for (slot, p) in files.iter_mut().zip([Placement::Device, Placement::Cloud]) {
            if part.has(p) {
                let r = manifest.weights.of(p);
                *slot = Some(read_weights(&dir.join(&r.file), r, limits)?);
            }
        }
        let [device, cloud] = files;
        // An encoder's tokenizer is the device's: bound to the signed manifest by its digest.
        let tokenizer = match (&manifest.encoder, part.has(Placement::Device)) {
            (Some(e), true) => Some(read_weights(
                &dir.join(&e.tokenizer.file),
                &e.tokenizer,
                limits,
            )?),
            _ => None,
        };
        let mut bundle = Bundle::build(
            manifest,
            &manifest_bytes,
            device.as_deref(),
            cloud.as_deref(),
            part,
        )
        .map_err(|e| match e {
            ModelError::Safetensors(m) => ModelError::Safetensors(format!(
                "bundle {}: {m} (restore the bundle from its source)",
                dir.display()
            )),
            e => e,
        })?;
        bundle.tokenizer = tokenizer;
        Ok(bundle)
    }

    /// Builds a bundle from a validated manifest and the weights files of `part`, whose
    /// digests have been checked.
    pub(crate) fn build(
        manifest: Manifest,
        manifest_bytes: &[u8],
        device: Option<&[u8]>,
        cloud: Option<&[u8]>,
        part: Part,
    ) -> Result<Bundle> {
        let owners = manifest.tensor_owners();
        let dev = parse_part(&owners, part, device, Placement::Device)?;
        let cl = parse_part(&owners, part, cloud, Placement::Cloud)?;
        if manifest.encoder.is_some() {
            return Bundle::build_encoder(
                manifest,
                manifest_bytes,
                dev.as_ref(),
                cl.as_ref(),
                part,
            );
        }
        let preprocess = match (&manifest.preprocess, &dev) {
            (Some(p), Some(st)) => {
                let mean = read_f32(st, &p.mean, &[manifest.input_dim])?;
                let std = read_f32(st, &p.std, &[manifest.input_dim])?;
                if std.iter().any(|&s| s.is_nan() || s <= 0.0) {
                    return Err(tensor_err(&p.std, "standard deviations must be > 0"));
                }
                Some((mean, std))
            }
            _ => None,
        };
        let layers = load_layers(&manifest.layers, dev.as_ref(), cl.as_ref())?;
        let clouds = manifest.cloud_indices();
        if clouds.is_empty() {
            return Err(ModelError::InvalidManifest(
                "no layer has placement = \"cloud\"".into(),
            ));
        }
        let exit_head = match (&manifest.exit_head, &dev) {
            (Some(h), Some(st)) => Some(crate::exit::load_head(h, manifest.classes, st)?),
            _ => None,
        };
        let mut bundle = Bundle {
            manifest,
            digest: sha256(manifest_bytes),
            preprocess,
            layers,
            clouds,
            cloud_layers: Vec::new(),
            part,
            exit_head,
            device_tensors: std::collections::BTreeMap::new(),
            tokenizer: None,
            variants: Vec::new(),
            normalize: None,
        };
        if part.has(Placement::Cloud) {
            bundle.cloud_layers = bundle
                .clouds
                .iter()
                .map(|&i| bundle.layer_as_cloud(i))
                .collect::<Result<_>>()?;
        }
        bundle.variants = bundle.load_variants(dev.as_ref(), cl.as_ref())?;
        if part.has(Placement::Cloud) {
            for v in &bundle.variants {
                bundle.cloud_layers.push(v.cloud_layer()?);
            }
        }
        Ok(bundle)
    }

    /// The variants of the `[privacy]` section, each a pipeline of its own layers with the
    /// outer bundle's preprocessing (TDM-DPVAR-1).
    fn load_variants(
        &self,
        dev: Option<&SafeTensors<'_>>,
        cl: Option<&SafeTensors<'_>>,
    ) -> Result<Vec<crate::privacy::Variant>> {
        let Some(p) = &self.manifest.privacy else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(p.variants.len());
        for (i, v) in p.variants.iter().enumerate() {
            let m = crate::privacy::PrivacySpec::variant_manifest(&self.manifest, v);
            let layers = load_layers(&m.layers, dev, cl)?;
            let clouds = m.cloud_indices();
            let local = clouds.first().copied().ok_or_else(|| {
                ModelError::InvalidManifest("privacy: a variant has no cloud layer".into())
            })?;
            let inner = Bundle {
                manifest: m,
                layers,
                clouds,
                cloud_layers: Vec::new(),
                variants: Vec::new(),
                normalize: Some(p.mechanism),
                ..self.clone()
            };
            out.push(crate::privacy::Variant {
                epsilon: v.epsilon,
                layer_id: crate::privacy::PrivacySpec::layer_id(&self.manifest, i),
                local,
                mechanism: p.mechanism,
                delta: p.delta,
                inner: Box::new(inner),
            });
        }
        Ok(out)
    }

    /// The `[privacy]` section (DP policy and variants), if the manifest has one.
    pub fn privacy(&self) -> Option<&crate::privacy::PrivacySpec> {
        self.manifest.privacy.as_ref()
    }

    /// The noise-trained variants, in increasing ε (empty without a `[privacy]` section).
    pub fn variants(&self) -> &[crate::privacy::Variant] {
        &self.variants
    }

    /// The variant trained for exactly `epsilon` (relative tolerance 1e-9), if any.
    pub fn variant_for(&self, epsilon: f64) -> Option<&crate::privacy::Variant> {
        self.variants
            .iter()
            .find(|v| (v.epsilon - epsilon).abs() <= 1e-9 * v.epsilon.abs())
    }

    /// [`Bundle::build`] for an encoder manifest (validated): the device tensors the graph
    /// names with the shapes it implies, the cloud linear layers' int8 weights.
    fn build_encoder(
        manifest: Manifest,
        manifest_bytes: &[u8],
        dev: Option<&SafeTensors<'_>>,
        cl: Option<&SafeTensors<'_>>,
        part: Part,
    ) -> Result<Bundle> {
        let enc = manifest
            .encoder
            .as_ref()
            .ok_or_else(|| ModelError::InvalidManifest("no [encoder] section".into()))?;
        let mut device_tensors = std::collections::BTreeMap::new();
        if let Some(st) = dev {
            for (name, shape) in enc.device_tensor_shapes() {
                let v = read_f32(st, &name, &shape)?;
                device_tensors.insert(name, v);
            }
            for l in &enc.linears {
                if device_tensors
                    .get(&l.scales)
                    .is_some_and(|s| s.iter().any(|&x| x <= 0.0))
                {
                    return Err(tensor_err(&l.scales, "weight scales must be > 0"));
                }
            }
        }
        let mut cloud_layers = Vec::new();
        if let Some(st) = cl {
            for (index, l) in enc.linears.iter().enumerate() {
                let weights = read_i8(st, &l.weight, &[l.n_out, l.n_in])?;
                if weights.iter().any(|w| w.abs() > l.weight_bound) {
                    return Err(tensor_err(
                        &l.weight,
                        "weights above the manifest's weight_bound",
                    ));
                }
                cloud_layers.push(CloudLayer {
                    index,
                    name: l.name.clone(),
                    n_in: l.n_in,
                    n_out: l.n_out,
                    weights,
                    bias: vec![0; l.n_out],
                    input_clip: l.input_bound,
                    bias_bound: l.bias_bound,
                });
            }
        }
        let clouds = manifest.cloud_indices();
        Ok(Bundle {
            manifest,
            digest: sha256(manifest_bytes),
            preprocess: None,
            layers: Vec::new(),
            clouds,
            cloud_layers,
            part,
            exit_head: None,
            device_tensors,
            tokenizer: None,
            variants: Vec::new(),
            normalize: None,
        })
    }

    /// The encoder section of an encoder bundle ([`crate::EncoderSpec`]).
    pub fn encoder(&self) -> Option<&crate::encoder::EncoderSpec> {
        self.manifest.encoder.as_ref()
    }

    /// An f32 device tensor of an encoder bundle, row-major, with the shape the graph gives it
    /// ([`crate::EncoderSpec::device_tensor_shapes`]).
    ///
    /// # Errors
    /// [`ModelError::NotLoaded`] without the device part, [`ModelError::Tensor`] for a name
    /// the graph does not give the device.
    pub fn device_tensor(&self, name: &str) -> Result<&[f32]> {
        if !self.part.has(Placement::Device) {
            return Err(not_loaded("device part of the bundle"));
        }
        self.device_tensors
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| tensor_err(name, "not a device tensor of this encoder"))
    }

    /// An encoder bundle's tokenizer file (`tokenizer.json`), its digest checked against the
    /// signed manifest.
    ///
    /// # Errors
    /// [`ModelError::NotLoaded`] without the device part or for a bundle without encoder.
    pub fn tokenizer_json(&self) -> Result<&[u8]> {
        self.tokenizer
            .as_deref()
            .ok_or_else(|| not_loaded("tokenizer of an encoder bundle (device part)"))
    }

    fn refuse_encoder(&self) -> Result<()> {
        if self.manifest.encoder.is_some() {
            return Err(ModelError::InvalidInput(
                "an encoder bundle is run by its graph (tandem-ops `SentenceEncoder`), not by \
                 the dense-layer pipeline"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the exact signed manifest bytes: the model digest a device sends in its
    /// ClientHello. It covers both weights files through the manifest's digests.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Model id (from the manifest).
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// Length of a raw input vector.
    pub fn input_dim(&self) -> usize {
        self.manifest.input_dim
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.manifest.classes
    }

    /// All layers, in order.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The layers the device evaluates, with their indices.
    pub fn device_layers(&self) -> impl Iterator<Item = (usize, &Layer)> {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.spec.placement == Placement::Device)
    }

    /// Index of the first layer the cloud evaluates (the only one in a single-cloud-layer
    /// model).
    pub fn cloud_index(&self) -> usize {
        self.clouds.first().copied().unwrap_or_default()
    }

    /// Indices of every cloud layer, in pipeline order: the valid protocol `layer_id`s.
    pub fn cloud_indices(&self) -> &[usize] {
        &self.clouds
    }

    /// Which part of the bundle is loaded.
    pub fn part(&self) -> Part {
        self.part
    }

    /// The signed early-exit head (TDM-EXIT-2), if the manifest has one and the device part
    /// is loaded.
    pub fn exit_head(&self) -> Option<&crate::exit::ExitHead> {
        self.exit_head.as_ref()
    }

    /// The early-exit head's verdict on a raw input (TDM-EXIT-1): runs the device layers up
    /// to the first cloud layer and the head on that activation. `Ok(None)` if the bundle
    /// has no head. What the planner asks to know whether answering locally is a candidate.
    ///
    /// # Errors
    /// As [`Bundle::device_prefix`], and [`crate::exit::ExitHead::evaluate`].
    pub fn exit_confidence(&self, x: &[f32]) -> Result<Option<crate::exit::ExitOutput>> {
        match &self.exit_head {
            None => Ok(None),
            Some(h) => h.evaluate(&self.device_prefix(x)?).map(Some),
        }
    }

    /// The first layer the cloud evaluates, in the integer form the HE engine takes (needs the
    /// cloud part).
    ///
    /// # Errors
    /// [`ModelError::NotLoaded`] without the cloud part.
    pub fn cloud_layer(&self) -> Result<&CloudLayer> {
        self.cloud_layers
            .first()
            .ok_or_else(|| not_loaded("cloud part of the bundle"))
    }

    /// Every cloud layer in integer form, in pipeline order (needs the cloud part).
    ///
    /// # Errors
    /// [`ModelError::NotLoaded`] without the cloud part.
    pub fn cloud_layers(&self) -> Result<&[CloudLayer]> {
        if self.cloud_layers.is_empty() {
            return Err(not_loaded("cloud part of the bundle"));
        }
        Ok(&self.cloud_layers)
    }

    /// The cloud layer with manifest index `index` (a protocol `layer_id`), in integer form.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] if `index` is not a cloud layer,
    /// [`ModelError::NotLoaded`] without the cloud part.
    pub fn cloud_layer_at(&self, index: usize) -> Result<&CloudLayer> {
        if !self.clouds.contains(&index) && !self.variants.iter().any(|v| v.layer_id == index) {
            return Err(ModelError::InvalidInput(format!(
                "layer {index} is not a cloud layer"
            )));
        }
        self.cloud_layers()?
            .iter()
            .find(|c| c.index == index)
            .ok_or_else(|| not_loaded("cloud part of the bundle"))
    }

    /// Any quantised layer (e.g. another allowed split point) in the cloud's integer form.
    pub fn layer_as_cloud(&self, index: usize) -> Result<CloudLayer> {
        let l = self
            .layers
            .get(index)
            .ok_or_else(|| ModelError::InvalidInput(format!("no layer {index}")))?;
        match (l.params()?, &l.spec.quant) {
            (Params::Int { w, b }, Some(q)) => Ok(CloudLayer {
                index,
                name: l.spec.name.clone(),
                n_in: l.spec.n_in,
                n_out: l.spec.n_out,
                weights: w.clone(),
                bias: b.clone(),
                input_clip: q.input_clip,
                bias_bound: q.bias_bound(),
            }),
            _ => Err(ModelError::InvalidInput(format!(
                "layer {index} is not quantised"
            ))),
        }
    }

    /// Standardises a raw input (if the manifest has a `preprocess` section) after checking
    /// its length and that it is finite.
    pub fn preprocess(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.refuse_encoder()?;
        if !self.part.has(Placement::Device) {
            return Err(not_loaded("device part of the bundle"));
        }
        if x.len() != self.manifest.input_dim {
            return Err(ModelError::InvalidInput(format!(
                "expected {} features, got {}",
                self.manifest.input_dim,
                x.len()
            )));
        }
        check_finite(x, || "input".into())?;
        let y: Vec<f32> = match &self.preprocess {
            None => x.to_vec(),
            Some((mean, std)) => x
                .iter()
                .zip(mean.iter().zip(std))
                .map(|(&v, (&m, &s))| (v - m) / s)
                .collect(),
        };
        // A finite input can still overflow here (e.g. f32::MAX minus a negative mean).
        check_finite(&y, || "standardisation".into())?;
        Ok(y)
    }

    /// Runs the device layers before the first cloud layer on a raw input and returns the
    /// real-valued activation entering it (after the previous layer's activation).
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] / [`ModelError::NonFinite`] for a bad input.
    pub fn device_prefix(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut a = self.preprocess(x)?;
        for l in self.layers.get(..self.cloud_index()).unwrap_or_default() {
            let (y, _) = l.eval(&a)?;
            a = activate(l.spec.activation, y, &l.spec.name)?;
        }
        Ok(a)
    }

    /// Quantises the first cloud layer's real-valued input to int8:
    /// `clamp(round(a / input_scale), -input_clip, input_clip)`.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for a wrong length, [`ModelError::NonFinite`].
    pub fn quantize_input(&self, activation: &[f32]) -> Result<Vec<i64>> {
        self.quantize_for(self.cloud_index(), activation)
    }

    /// Quantises the real-valued input of cloud layer `index` to int8.
    fn quantize_for(&self, index: usize, activation: &[f32]) -> Result<Vec<i64>> {
        let l = self
            .layers
            .get(index)
            .ok_or_else(|| ModelError::InvalidInput(format!("no layer {index}")))?;
        match &l.spec.quant {
            Some(q) if activation.len() == l.spec.n_in => {
                quantize(activation, q.input_scale, q.input_clip, &l.spec.name)
            }
            _ => Err(ModelError::InvalidInput(format!(
                "cloud layer {index} takes {} values, got {}",
                l.spec.n_in,
                activation.len()
            ))),
        }
    }

    /// Device side before the first cloud layer: [`Bundle::device_prefix`] then
    /// [`Bundle::quantize_input`]. The result is what gets (noised and) encrypted.
    ///
    /// # Errors
    /// As [`Bundle::device_prefix`].
    pub fn device_encode(&self, x: &[f32]) -> Result<Vec<i64>> {
        self.quantize_input(&self.device_prefix(x)?)
    }

    /// The first cloud layer's computation in the clear (see [`Bundle::cloud_eval_plain_at`]).
    ///
    /// # Errors
    /// As [`Bundle::cloud_eval_plain_at`].
    pub fn cloud_eval_plain(&self, q: &[i64]) -> Result<Vec<i64>> {
        self.cloud_eval_plain_at(self.cloud_index(), q)
    }

    /// The cloud's computation in the clear for cloud layer `index`: the exact integer
    /// `W·q + b`, for any integer input (e.g. DP-noised, possibly outside the int8 range).
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] if `index` is not a cloud layer or `q` has the wrong
    /// length, [`ModelError::NotLoaded`] without the cloud part, [`ModelError::Overflow`].
    pub fn cloud_eval_plain_at(&self, index: usize, q: &[i64]) -> Result<Vec<i64>> {
        if let Some(v) = self.variants.iter().find(|v| v.layer_id == index) {
            return v.cloud_eval_plain(q);
        }
        if !self.clouds.contains(&index) {
            return Err(ModelError::InvalidInput(format!(
                "layer {index} is not a cloud layer"
            )));
        }
        if self.manifest.encoder.is_some() {
            let c = self.cloud_layer_at(index)?;
            if q.len() != c.n_in {
                return Err(ModelError::InvalidInput(format!(
                    "cloud layer {index} takes {} values, got {}",
                    c.n_in,
                    q.len()
                )));
            }
            return c
                .weights
                .chunks_exact(c.n_in.max(1))
                .map(|row| {
                    row.iter()
                        .zip(q)
                        .try_fold(0i64, |a, (&w, &x)| a.checked_add(w.checked_mul(x)?))
                        .ok_or_else(|| ModelError::Overflow(c.name.clone()))
                })
                .collect();
        }
        self.layers
            .get(index)
            .ok_or_else(|| ModelError::InvalidInput(format!("no layer {index}")))?
            .eval_int(q)
    }

    /// Device side, first segment (TDM-MOD: the general split executor): standardises `x`,
    /// runs the device layers up to the first cloud layer and quantises its input.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] / [`ModelError::NonFinite`] for a bad input,
    /// [`ModelError::NotLoaded`] without the device part.
    pub fn start(&self, x: &[f32]) -> Result<Step> {
        let a = self.preprocess(x)?;
        self.run_device_from(0, a)
    }

    /// Device side after cloud layer `layer` returned its exact integer output `z`:
    /// dequantises it, applies the layer's activation and runs the device layers up to the
    /// next cloud layer (quantising its input) or to the end (argmax). Needs the device part
    /// only: the scales are in the manifest.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] if `layer` is not a cloud layer or `z` has the wrong
    /// length, [`ModelError::NonFinite`] if a value leaves the f32 range,
    /// [`ModelError::NotLoaded`] without the device part.
    pub fn resume(&self, layer: usize, z: &[i64]) -> Result<Step> {
        self.refuse_encoder()?;
        if !self.part.has(Placement::Device) {
            return Err(not_loaded("device part of the bundle"));
        }
        if !self.clouds.contains(&layer) {
            return Err(ModelError::InvalidInput(format!(
                "layer {layer} is not a cloud layer"
            )));
        }
        let l = &self.layers[layer];
        if z.len() != l.spec.n_out {
            return Err(ModelError::InvalidInput(format!(
                "cloud layer {layer} outputs {} values, got {}",
                l.spec.n_out,
                z.len()
            )));
        }
        let y = l.dequantize(z)?;
        if layer + 1 == self.layers.len() {
            check_finite(&y, || "output".into())?;
            return Ok(Step::Done(Prediction {
                class: argmax_i64(z),
                logits: y,
            }));
        }
        let a = activate(l.spec.activation, y, &l.spec.name)?;
        self.run_device_from(layer + 1, a)
    }

    /// Runs layers `from..` on the activation `a` until a cloud layer (returned with its
    /// quantised input) or the end.
    fn run_device_from(&self, from: usize, mut a: Vec<f32>) -> Result<Step> {
        let last = self.layers.len() - 1;
        for (j, l) in self.layers.iter().enumerate().skip(from) {
            if l.spec.placement == Placement::Cloud {
                if let Some(m) = self.normalize {
                    a = crate::privacy::normalize(m, a);
                }
                let input = self.quantize_for(j, &a)?;
                return Ok(Step::Cloud {
                    layer: j,
                    input,
                    activation: a,
                });
            }
            let (y, z) = l.eval(&a)?;
            if j == last {
                let class = match &z {
                    Some(z) => argmax_i64(z),
                    None => argmax_f32(&y),
                };
                check_finite(&y, || "output".into())?;
                return Ok(Step::Done(Prediction { class, logits: y }));
            }
            a = activate(l.spec.activation, y, &l.spec.name)?;
        }
        Err(ModelError::InvalidInput("empty model".into()))
    }

    /// Device side after the first cloud layer of a single-cloud-layer model (a special case
    /// of [`Bundle::resume`]).
    ///
    /// # Errors
    /// As [`Bundle::resume`]; [`ModelError::InvalidInput`] if another cloud layer follows.
    pub fn finish_on_device(&self, cloud_output: &[i64]) -> Result<Prediction> {
        match self.resume(self.cloud_index(), cloud_output)? {
            Step::Done(p) => Ok(p),
            Step::Cloud { layer, .. } => Err(ModelError::InvalidInput(format!(
                "cloud layer {layer} follows: continue with Bundle::resume"
            ))),
        }
    }

    /// The plaintext reference: exactly the split pipeline (device segments, quantisation, each
    /// cloud layer's integer `W·q + b`, device finish) run locally. An encrypted inference whose
    /// decryption is exact returns the same prediction by construction.
    ///
    /// # Errors
    /// As [`Bundle::start`], [`Bundle::cloud_eval_plain_at`] and [`Bundle::resume`].
    pub fn predict_plain(&self, x: &[f32]) -> Result<Prediction> {
        let mut step = self.start(x)?;
        loop {
            match step {
                Step::Done(p) => return Ok(p),
                Step::Cloud { layer, input, .. } => {
                    let z = self.cloud_eval_plain_at(layer, &input)?;
                    step = self.resume(layer, &z)?;
                }
            }
        }
    }

    /// Accuracy of [`Bundle::predict_plain`] on labelled examples.
    pub fn accuracy(&self, x: &[Vec<f32>], y: &[usize]) -> Result<f64> {
        if x.len() != y.len() || x.is_empty() {
            return Err(ModelError::InvalidInput(
                "need as many labels as inputs, at least one".into(),
            ));
        }
        let mut ok = 0usize;
        for (xi, &yi) in x.iter().zip(y) {
            if self.predict_plain(xi)?.class == yi {
                ok += 1;
            }
        }
        Ok(ok as f64 / x.len() as f64)
    }
}

/// Parses and validates manifest bytes.
pub(crate) fn parse_manifest(bytes: &[u8], limits: &Limits) -> Result<Manifest> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ModelError::ManifestParse("manifest is not UTF-8".into()))?;
    let manifest = Manifest::from_toml(text)?;
    manifest.validate(limits)?;
    Ok(manifest)
}

/// Reads a weights file named by a manifest, checking size (before reading) and digest.
pub(crate) fn read_weights(path: &Path, wref: &WeightsRef, limits: &Limits) -> Result<Vec<u8>> {
    let size = std::fs::metadata(path).map_err(io_err(path))?.len();
    if size > limits.max_weights_bytes {
        return Err(ModelError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: limits.max_weights_bytes,
        });
    }
    if size != wref.bytes {
        return Err(ModelError::SizeMismatch {
            path: path.to_path_buf(),
            expected: wref.bytes,
            actual: size,
        });
    }
    let data = read_limited(path, wref.bytes.min(limits.max_weights_bytes))?;
    let actual = to_hex(&sha256(&data));
    if actual != wref.sha256 {
        return Err(ModelError::DigestMismatch {
            path: path.to_path_buf(),
            expected: wref.sha256.clone(),
            actual,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::manifest::{LayerKind, QuantSpec};

    fn spec(name: &str, n_in: usize, n_out: usize, quant: Option<QuantSpec>) -> LayerSpec {
        LayerSpec {
            name: name.into(),
            kind: LayerKind::Dense,
            n_in,
            n_out,
            activation: Activation::Relu,
            placement: Placement::Device,
            weight: "w".into(),
            bias: "b".into(),
            quant,
        }
    }

    fn stage_of(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(ModelError::NonFinite { stage, .. }) => stage,
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }

    #[test]
    fn float_layer_overflow_is_refused() {
        let l = Layer {
            spec: spec("fc", 2, 1, None),
            params: Some(Params::Float {
                w: vec![f32::MAX, f32::MAX],
                b: vec![0.0],
            }),
        };
        assert_eq!(stage_of(l.eval(&[2.0, 2.0])), "layer fc");
        // inf - inf = NaN is refused as well, not mapped to a number.
        let l = Layer {
            spec: spec("fc", 2, 1, None),
            params: Some(Params::Float {
                w: vec![f32::MAX, -f32::MAX],
                b: vec![0.0],
            }),
        };
        assert_eq!(stage_of(l.eval(&[4.0, 4.0])), "layer fc");
        assert!(l.eval(&[1.0, 1.0]).is_ok());
    }

    #[test]
    fn relu_refuses_nan_instead_of_zeroing_it() {
        assert_eq!(
            stage_of(activate(Activation::Relu, vec![1.0, f32::NAN], "fc")),
            "activation of fc"
        );
        assert_eq!(
            stage_of(activate(Activation::None, vec![f32::INFINITY], "fc")),
            "activation of fc"
        );
        assert_eq!(
            activate(Activation::Relu, vec![-1.0, 2.0], "fc").unwrap(),
            vec![0.0, 2.0]
        );
    }

    #[test]
    fn dequantisation_overflow_is_refused() {
        let q = QuantSpec {
            input_scale: 1e19,
            weight_scale: 1e19,
            input_clip: 127,
            max_abs_bias: None,
        };
        let l = Layer {
            spec: spec("fc1", 1, 2, Some(q)),
            params: None,
        };
        assert_eq!(l.dequantize(&[0, 1]).unwrap()[1], 1e38);
        assert_eq!(
            stage_of(l.dequantize(&[0, 100_000])),
            "dequantisation of fc1"
        );
    }

    #[test]
    fn quantisation_refuses_non_finite_and_clips_huge_finite() {
        assert_eq!(
            stage_of(quantize(&[0.0, f32::NAN], 0.1, 127, "fc1")),
            "quantisation of the input of fc1"
        );
        assert_eq!(
            quantize(&[f32::MAX, -f32::MAX], 1e-3, 127, "fc1").unwrap(),
            vec![127, -127]
        );
    }
}
