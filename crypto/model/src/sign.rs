//! Key files, signing and verifying bundles, and writing new bundles.

use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::Serialize;

use crate::bundle::{
    bundle_paths, from_hex, read_limited, sha256, signed_message, to_hex, Bundle, Part,
    MANIFEST_FILE,
};
use crate::error::{io_err, ModelError, Result};
use crate::manifest::{Limits, Manifest, Placement, Weights};

/// Largest key file accepted.
const MAX_KEY_FILE_BYTES: u64 = 4096;

fn key_err(path: &Path, reason: &str) -> ModelError {
    ModelError::KeyFormat {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads the single 32-byte hex value of a key file (lines starting with `#` are comments).
fn read_key_hex(path: &Path) -> Result<[u8; 32]> {
    let bytes = read_limited(path, MAX_KEY_FILE_BYTES)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| key_err(path, "not UTF-8"))?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    match (lines.next(), lines.next()) {
        (Some(l), None) => from_hex::<32>(l).ok_or_else(|| key_err(path, "expected 64 hex digits")),
        _ => Err(key_err(path, "expected exactly one non-comment line")),
    }
}

/// Reads an Ed25519 signing key file: `#` comment lines and one line with the 32-byte seed in
/// hex.
pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    Ok(SigningKey::from_bytes(&read_key_hex(path)?))
}

/// Reads an Ed25519 verifying (public) key file: `#` comment lines and one line with the
/// 32-byte compressed point in hex.
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey> {
    VerifyingKey::from_bytes(&read_key_hex(path)?)
        .map_err(|_| key_err(path, "not a valid Ed25519 public key"))
}

/// What the committed development key is derived from: its Ed25519 seed is
/// `SHA-256(DEV_KEY_LABEL)` (see `models/dev-signing-key.txt`).
pub const DEV_KEY_LABEL: &[u8] = b"tandem dev-only model signing key v1";

/// The public development signing key (committed in `models/`, anyone can sign with it).
/// Never use it outside development.
pub fn dev_signing_key() -> SigningKey {
    SigningKey::from_bytes(&sha256(DEV_KEY_LABEL))
}

/// Whether `key` is the public development verifying key: a bundle that verifies under it
/// proves nothing, since the signing key is public. Callers print a warning when it is used.
pub fn is_dev_key(key: &VerifyingKey) -> bool {
    dev_signing_key().verifying_key() == *key
}

/// Text of a signing key file (`comment` lines are prefixed with `# `).
pub fn format_signing_key(key: &SigningKey, comment: &str) -> String {
    format_key(&key.to_bytes(), comment)
}

/// Text of a verifying key file (`comment` lines are prefixed with `# `).
pub fn format_verifying_key(key: &VerifyingKey, comment: &str) -> String {
    format_key(&key.to_bytes(), comment)
}

fn format_key(bytes: &[u8; 32], comment: &str) -> String {
    let mut s = String::new();
    for line in comment.lines() {
        s.push_str("# ");
        s.push_str(line);
        s.push('\n');
    }
    s.push_str(&to_hex(bytes));
    s.push('\n');
    s
}

/// Writes `data` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, data).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Binds `manifest` to the two weights files (digests and sizes), checks the whole bundle,
/// then writes the canonical manifest and its signature next to `manifest_path`.
fn finalize(
    manifest_path: &Path,
    mut manifest: Manifest,
    device: &[u8],
    cloud: &[u8],
    key: &SigningKey,
) -> Result<()> {
    for (p, bytes) in [(Placement::Device, device), (Placement::Cloud, cloud)] {
        let r = manifest.weights.of_mut(p);
        r.sha256 = to_hex(&sha256(bytes));
        r.bytes = bytes.len() as u64;
    }
    let limits = Limits::default();
    manifest.validate(&limits)?;
    let text = manifest.to_toml()?;
    // Refuse to sign anything that would not load.
    Bundle::build(
        manifest,
        text.as_bytes(),
        Some(device),
        Some(cloud),
        Part::Full,
    )?;
    let sig = key.sign(&signed_message(text.as_bytes()));
    let (_, sig_path) = bundle_paths(manifest_path);
    write_atomic(manifest_path, text.as_bytes())?;
    write_atomic(
        &sig_path,
        format!("{}\n", to_hex(&sig.to_bytes())).as_bytes(),
    )
}

/// Placeholder digest used while a manifest is being bound to its files.
fn unbind(m: &mut Manifest) {
    m.weights.device.sha256 = "0".repeat(64);
    m.weights.cloud.sha256 = "0".repeat(64);
}

/// Signs a manifest in place: re-computes the digests and sizes of the two weights files it
/// names, checks the whole bundle (tensor sets, shapes, dtypes, ranges), rewrites the manifest
/// in canonical form and writes `<manifest>.sig` (hex Ed25519 signature over
/// [`crate::SIGNING_CONTEXT`] followed by the manifest bytes).
pub fn sign_manifest(manifest_path: &Path, key: &SigningKey) -> Result<()> {
    let limits = Limits::default();
    let bytes = read_limited(manifest_path, limits.max_manifest_bytes)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ModelError::ManifestParse("manifest is not UTF-8".into()))?;
    let mut manifest = Manifest::from_toml(text)?;
    // Validate the file names before touching the file system with them.
    unbind(&mut manifest);
    manifest.validate(&limits)?;
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let device = read_limited(
        &dir.join(&manifest.weights.device.file),
        limits.max_weights_bytes,
    )?;
    let cloud = read_limited(
        &dir.join(&manifest.weights.cloud.file),
        limits.max_weights_bytes,
    )?;
    finalize(manifest_path, manifest, &device, &cloud, key)
}

/// `tandem model sign`: signs `dir/manifest.toml` with the key in `key_file`
/// (see [`sign_manifest`] and [`read_signing_key`]).
pub fn sign_bundle(dir: &Path, key_file: &Path) -> Result<()> {
    let key = read_signing_key(key_file)?;
    sign_manifest(&dir.join(MANIFEST_FILE), &key)
}

/// One layer in a [`Summary`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerSummary {
    /// Layer name.
    pub name: String,
    /// Input length.
    pub n_in: usize,
    /// Output length.
    pub n_out: usize,
    /// Who evaluates it.
    pub placement: Placement,
    /// Whether it is int8-quantised.
    pub quantised: bool,
}

/// What `tandem model verify` reports about a verified bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Model id.
    pub id: String,
    /// Model version.
    pub version: String,
    /// Training dataset.
    pub dataset: String,
    /// Raw input length.
    pub input_dim: usize,
    /// Number of classes.
    pub classes: usize,
    /// The layers.
    pub layers: Vec<LayerSummary>,
    /// Index of the first cloud layer.
    pub cloud_layer: usize,
    /// Indices of every cloud layer, in pipeline order (the valid protocol layer ids).
    pub cloud_layers: Vec<usize>,
    /// Hex SHA-256 of the manifest bytes (the protocol's model digest).
    pub digest: String,
    /// The two weights files with their digests and sizes.
    pub weights: Weights,
}

impl Summary {
    /// Summarises a loaded bundle.
    pub fn of(b: &Bundle) -> Summary {
        let m = b.manifest();
        Summary {
            id: m.id.clone(),
            version: m.version.clone(),
            dataset: m.dataset.clone(),
            input_dim: m.input_dim,
            classes: m.classes,
            layers: b
                .layers()
                .iter()
                .map(|l| LayerSummary {
                    name: l.spec().name.clone(),
                    n_in: l.spec().n_in,
                    n_out: l.spec().n_out,
                    placement: l.spec().placement,
                    quantised: l.is_quantised(),
                })
                .collect(),
            cloud_layer: b.cloud_index(),
            cloud_layers: b.cloud_indices().to_vec(),
            digest: to_hex(&b.digest()),
            weights: m.weights.clone(),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "model {} v{} (dataset {}): {} inputs, {} classes",
            self.id, self.version, self.dataset, self.input_dim, self.classes
        )?;
        for (i, l) in self.layers.iter().enumerate() {
            writeln!(
                f,
                "  layer {i} {:<8} {:>4} -> {:<4} {:?}{}",
                l.name,
                l.n_in,
                l.n_out,
                l.placement,
                if l.quantised { ", int8" } else { ", f32" }
            )?;
        }
        writeln!(f, "  digest  {}", self.digest)?;
        for (p, w) in [
            ("device", &self.weights.device),
            ("cloud", &self.weights.cloud),
        ] {
            writeln!(
                f,
                "  {p:<6} weights {} sha256 {} ({} bytes)",
                w.file, w.sha256, w.bytes
            )?;
        }
        Ok(())
    }
}

/// `tandem model verify`: loads the bundle in `dir` with default [`Limits`], verifying it
/// against the public key in `pubkey_file`.
pub fn verify_bundle(dir: &Path, pubkey_file: &Path) -> Result<Summary> {
    let key = read_verifying_key(pubkey_file)?;
    let b = Bundle::load(dir, &key, &Limits::default())?;
    Ok(Summary::of(&b))
}

/// Values of a tensor to write.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 8-bit signed integers.
    I8(Vec<i8>),
    /// 64-bit signed integers.
    I64(Vec<i64>),
}

/// A named tensor to write into a bundle's safetensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Tensor name.
    pub name: String,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Values.
    pub data: TensorData,
}

/// Serialises tensors into safetensors bytes.
pub fn serialize_tensors(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    let bytes: Vec<(Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|t| match &t.data {
            TensorData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            TensorData::I8(v) => (Dtype::I8, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            TensorData::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, (dtype, b)) in tensors.iter().zip(&bytes) {
        let v = TensorView::new(*dtype, t.shape.clone(), b)
            .map_err(|e| ModelError::Safetensors(format!("{}: {e}", t.name)))?;
        views.push((t.name.clone(), v));
    }
    safetensors::serialize(views, None).map_err(|e| ModelError::Safetensors(e.to_string()))
}

/// Writes a new bundle into `dir` (created if missing): the tensors, split by owner into the
/// device and cloud weights files the manifest names, then the manifest (with the files'
/// digests and sizes filled in) and its signature. Every tensor must be named by the manifest.
pub fn write_bundle(
    dir: &Path,
    manifest: &Manifest,
    tensors: &[NamedTensor],
    key: &SigningKey,
) -> Result<()> {
    let mut m = manifest.clone();
    unbind(&mut m);
    m.validate(&Limits::default())?;
    // Created only for a valid manifest: a refused one leaves no empty directory behind.
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let owners = m.tensor_owners();
    let mut parts: [Vec<NamedTensor>; 2] = [Vec::new(), Vec::new()];
    for t in tensors {
        let owner = owners
            .iter()
            .find(|(n, _)| *n == t.name)
            .map(|(_, p)| *p)
            .ok_or_else(|| ModelError::Tensor {
                name: t.name.clone(),
                reason: "not named by the manifest".into(),
            })?;
        parts[usize::from(owner == Placement::Cloud)].push(t.clone());
    }
    let device = serialize_tensors(&parts[0])?;
    let cloud = serialize_tensors(&parts[1])?;
    write_atomic(&dir.join(&m.weights.device.file), &device)?;
    write_atomic(&dir.join(&m.weights.cloud.file), &cloud)?;
    finalize(&dir.join(MANIFEST_FILE), m, &device, &cloud, key)
}
