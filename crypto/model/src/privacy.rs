//! The DP policy of a bundle and its noise-trained variants (issue 11, `specs/dp.md` §6).
//!
//! The manifest's optional `[privacy]` section ([`PrivacySpec`]) names the mechanism the
//! device must use in the `Noised` and `NoisedEncrypted` modes (`laplace`: discrete Laplace on
//! an L1-normalised bottleneck, pure ε-DP; `gaussian`: discrete Gaussian on an L2-normalised
//! one at `delta`), the bottleneck width `d`, and one **variant** per ε the model was trained
//! for (TDM-DPVAR-1). A variant is a complete small pipeline of its own (`[[privacy.variants
//! .layers]]`, same schema as the top-level `[[layers]]`): device `dense h + ReLU → dense d`
//! (the bottleneck, activation `none`), which the device normalises to unit L1 (L2) norm; one
//! quantised cloud layer `dense d → h` whose `input_scale` is `1/s` (`s` the integer grid of
//! the release, clip C = 1 on the normalised vector); then device layers up to the argmax.
//!
//! Weights: the variant's device tensors are in the device weights file and its cloud
//! tensors in the cloud weights file — one bundle, one signature, one model digest for every
//! ε, and each party still holds only its own tensors (`specs/dp.md` §6.2 says why this
//! rather than a bundle per ε).
//!
//! Protocol: the cloud layer of variant `i` (in manifest order) is served under layer id
//! `layers.len() + i` ([`PrivacySpec::layer_id`]): after the top-level layers, so the ids of
//! the encrypted pipeline are unchanged. The cloud serves it like any other cloud layer
//! (plaintext noised requests and HE requests).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bundle::{read_limited, MANIFEST_FILE};
use crate::error::{ModelError, Result};
use crate::manifest::{Activation, LayerSpec, Limits, Manifest, Placement};
use crate::sign::{write_bundle, NamedTensor, TensorData};

/// Most variants one bundle may carry.
pub const MAX_VARIANTS: usize = 16;

/// The noise distribution of the model's DP releases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpMechanism {
    /// Discrete Laplace on the L1-normalised bottleneck: pure ε-DP per release.
    Laplace,
    /// Discrete Gaussian on the L2-normalised bottleneck: (ε, δ)-DP per release at `delta`.
    Gaussian,
}

impl DpMechanism {
    /// `laplace` or `gaussian`.
    pub fn name(self) -> &'static str {
        match self {
            DpMechanism::Laplace => "laplace",
            DpMechanism::Gaussian => "gaussian",
        }
    }
}

/// Provenance of the variants (informational; covered by the signature).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyTraining {
    /// The command that trained the variants and wrote this section.
    pub command: String,
    /// Seed of the split, initialisation and mini-batch order.
    pub seed: u64,
    /// How the bottleneck width was chosen and what the training schedule was.
    pub method: String,
}

/// One variant: the pipeline trained end to end with the exact noise of `epsilon`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    /// ε per release this variant was trained for (finite, > 0).
    pub epsilon: f64,
    /// Accuracy on the bundle's test split (`test.json`) through this bundle's exact pipeline
    /// with the calibrated noise, mean of 5 noise draws (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    /// The variant's layers, applied in order (exactly one placed in the cloud).
    pub layers: Vec<LayerSpec>,
}

/// The manifest's `[privacy]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// Mechanism of every DP release of this model.
    pub mechanism: DpMechanism,
    /// δ of each release (Gaussian only; absent for Laplace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// Width `d` of the bottleneck (the released vector's length).
    pub bottleneck: usize,
    /// How the variants were produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<PrivacyTraining>,
    /// One variant per supported ε, in increasing ε.
    pub variants: Vec<VariantSpec>,
}

fn bad(m: impl Into<String>) -> ModelError {
    ModelError::InvalidManifest(format!("privacy: {}", m.into()))
}

impl PrivacySpec {
    /// Protocol layer id of variant `i`'s cloud layer: `layers.len() + i`.
    pub fn layer_id(manifest: &Manifest, i: usize) -> usize {
        manifest.layers.len() + i
    }

    /// The manifest of variant `i` alone: the outer manifest with the variant's layers as its
    /// pipeline (same preprocessing, weights files and ids), no sections of its own.
    pub(crate) fn variant_manifest(manifest: &Manifest, v: &VariantSpec) -> Manifest {
        let mut m = manifest.clone();
        m.layers = v.layers.clone();
        m.split_points = m.cloud_indices();
        m.training = None;
        m.exit_head = None;
        m.encoder = None;
        m.privacy = None;
        m
    }

    /// Checks the section against the rest of the manifest: δ present exactly for Gaussian,
    /// 1..=[`MAX_VARIANTS`] variants in strictly increasing finite ε > 0, each a valid
    /// pipeline on the model's input with exactly one cloud layer, fed by a device bottleneck
    /// of width `bottleneck` with activation `none`, and an integer grid `1/input_scale ≥ 1`.
    ///
    /// # Errors
    /// [`ModelError::InvalidManifest`] naming what is wrong.
    pub fn validate(&self, manifest: &Manifest, limits: &Limits) -> Result<()> {
        match (self.mechanism, self.delta) {
            (DpMechanism::Laplace, None) => {}
            (DpMechanism::Gaussian, Some(d)) if d > 0.0 && d < 1.0 => {}
            (m, d) => {
                return Err(bad(format!(
                    "mechanism {} with delta {d:?}: Laplace takes no delta, Gaussian needs \
                     0 < delta < 1",
                    m.name()
                )))
            }
        }
        if self.variants.is_empty() || self.variants.len() > MAX_VARIANTS {
            return Err(bad(format!(
                "{} variants (allowed 1..={MAX_VARIANTS})",
                self.variants.len()
            )));
        }
        let mut prev = 0.0;
        for (i, v) in self.variants.iter().enumerate() {
            let ctx = |m: String| bad(format!("variant {i} (epsilon {}): {m}", v.epsilon));
            if !(v.epsilon.is_finite() && v.epsilon > prev) {
                return Err(ctx("epsilons must be finite, > 0 and increasing".into()));
            }
            prev = v.epsilon;
            let inner = Self::variant_manifest(manifest, v);
            inner.validate(limits).map_err(|e| ctx(e.to_string()))?;
            let clouds = inner.cloud_indices();
            let [c] = clouds.as_slice() else {
                return Err(ctx(format!(
                    "{} cloud layers, a variant has exactly one",
                    clouds.len()
                )));
            };
            let before = &v.layers[c - 1];
            if before.placement != Placement::Device
                || before.activation != Activation::None
                || before.n_out != self.bottleneck
            {
                return Err(ctx(format!(
                    "layer {} must be the device bottleneck: out = {}, activation none",
                    c - 1,
                    self.bottleneck
                )));
            }
            let grid = v.layers[*c]
                .quant
                .as_ref()
                .map_or(0.0, |q| 1.0 / f64::from(q.input_scale));
            if !(grid.is_finite() && grid >= 1.0) {
                return Err(ctx(
                    "the cloud layer's input_scale must be 1/s with s >= 1".into()
                ));
            }
        }
        Ok(())
    }

    /// Every tensor the variants name, with its owner.
    pub(crate) fn tensor_owners(&self) -> Vec<(String, Placement)> {
        self.variants
            .iter()
            .flat_map(|v| v.layers.iter())
            .flat_map(|l| {
                [
                    (l.weight.clone(), l.placement),
                    (l.bias.clone(), l.placement),
                ]
            })
            .collect()
    }
}

/// A loaded variant: its spec and its pipeline (a [`crate::Bundle`] of its own layers).
#[derive(Clone, Debug)]
pub struct Variant {
    pub(crate) epsilon: f64,
    pub(crate) layer_id: usize,
    pub(crate) local: usize,
    pub(crate) mechanism: DpMechanism,
    pub(crate) delta: Option<f64>,
    pub(crate) inner: Box<crate::Bundle>,
}

impl Variant {
    /// ε per release the variant was trained for.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// Protocol layer id of the variant's cloud layer.
    pub fn layer_id(&self) -> usize {
        self.layer_id
    }

    /// The mechanism of the model's policy.
    pub fn mechanism(&self) -> DpMechanism {
        self.mechanism
    }

    /// δ per release (Gaussian only).
    pub fn delta(&self) -> Option<f64> {
        self.delta
    }

    /// Spec of the variant's cloud layer.
    pub fn cloud_spec(&self) -> Result<&LayerSpec> {
        self.inner
            .layers()
            .get(self.local)
            .map(|l| l.spec())
            .ok_or_else(|| bad("variant has no cloud layer"))
    }

    /// Integer grid `s` of the release (`1 / input_scale` of the cloud layer): the
    /// normalised bottleneck (norm C = 1) is released as integers `round(s·x) + noise`.
    pub fn grid(&self) -> f64 {
        self.cloud_spec()
            .ok()
            .and_then(|l| l.quant.as_ref())
            .map_or(1.0, |q| 1.0 / f64::from(q.input_scale))
    }

    /// Width `d` of the released vector.
    pub fn bottleneck(&self) -> usize {
        self.cloud_spec().map_or(0, |l| l.n_in)
    }

    fn remap(&self, step: crate::Step) -> crate::Step {
        match step {
            crate::Step::Cloud {
                input, activation, ..
            } => crate::Step::Cloud {
                layer: self.layer_id,
                input,
                activation,
            },
            done => done,
        }
    }

    /// Device side up to the release: standardisation, the variant's device layers, the
    /// bottleneck normalised to unit L1 (Laplace) or L2 (Gaussian) norm. The returned
    /// [`crate::Step::Cloud`] carries the protocol layer id, the normalised bottleneck as
    /// `activation` (what the mechanism releases) and its noise-free quantisation as `input`.
    ///
    /// # Errors
    /// As [`crate::Bundle::start`].
    pub fn start(&self, x: &[f32]) -> Result<crate::Step> {
        Ok(self.remap(self.inner.start(x)?))
    }

    /// Device side after the cloud layer returned `z` (for `layer` = [`Variant::layer_id`]).
    ///
    /// # Errors
    /// As [`crate::Bundle::resume`]; [`ModelError::InvalidInput`] for another layer id.
    pub fn resume(&self, layer: usize, z: &[i64]) -> Result<crate::Step> {
        if layer != self.layer_id {
            return Err(ModelError::InvalidInput(format!(
                "layer {layer} is not the cloud layer of the ε = {} variant",
                self.epsilon
            )));
        }
        Ok(self.remap(self.inner.resume(self.local, z)?))
    }

    /// The cloud layer in integer form, with `index` = [`Variant::layer_id`] (cloud part).
    ///
    /// # Errors
    /// [`ModelError::NotLoaded`] without the cloud part.
    pub fn cloud_layer(&self) -> Result<crate::CloudLayer> {
        let mut c = self.inner.layer_as_cloud(self.local)?;
        c.index = self.layer_id;
        Ok(c)
    }

    /// `W·q + b` of the cloud layer for any integer `q` (cloud part).
    ///
    /// # Errors
    /// As [`crate::Bundle::cloud_eval_plain_at`].
    pub fn cloud_eval_plain(&self, q: &[i64]) -> Result<Vec<i64>> {
        self.inner.cloud_eval_plain_at(self.local, q)
    }

    /// The whole variant pipeline with `release` applied to the normalised bottleneck (its
    /// result, integers on the grid, goes to the cloud layer as is): with a DP mechanism this
    /// is exactly a noised inference, locally (needs both parts).
    ///
    /// # Errors
    /// As [`Variant::start`], [`Variant::resume`], and whatever `release` returns.
    pub fn predict_with(
        &self,
        x: &[f32],
        release: &mut dyn FnMut(&[f32]) -> Result<Vec<i64>>,
    ) -> Result<crate::Prediction> {
        let mut step = self.start(x)?;
        loop {
            match step {
                crate::Step::Done(p) => return Ok(p),
                crate::Step::Cloud {
                    layer, activation, ..
                } => {
                    let q = release(&activation)?;
                    let z = self.cloud_eval_plain(&q)?;
                    step = self.resume(layer, &z)?;
                }
            }
        }
    }
}

fn read_tensors(path: &Path, limits: &Limits) -> Result<Vec<NamedTensor>> {
    let bytes = read_limited(path, limits.max_weights_bytes)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::Safetensors(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let data = match view.dtype() {
            safetensors::Dtype::F32 => TensorData::F32(
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            safetensors::Dtype::I8 => TensorData::I8(d.iter().map(|&v| v as i8).collect()),
            safetensors::Dtype::I64 => TensorData::I64(
                d.chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            other => {
                return Err(ModelError::Tensor {
                    name,
                    reason: format!("unexpected dtype {other:?} in {}", path.display()),
                })
            }
        };
        out.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    Ok(out)
}

/// Sets (or replaces) the `[privacy]` section of the bundle in `dir` and re-signs it: the
/// tensors of a previous section are dropped from both weights files, `tensors` (each named by
/// `spec`'s layers) are added to the file of their owner, every other tensor is kept byte for
/// byte, and the manifest is rewritten and signed with `key` ([`write_bundle`]). The top-level
/// layers are untouched, so the encrypted pipeline's results are unchanged (the model digest
/// changes, as for any re-signing).
///
/// # Errors
/// Any [`ModelError`] from reading, validating, writing or signing the bundle.
pub fn attach_privacy(
    dir: &Path,
    spec: PrivacySpec,
    tensors: Vec<NamedTensor>,
    key: &crate::SigningKey,
) -> Result<()> {
    let limits = Limits::default();
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = read_limited(&manifest_path, limits.max_manifest_bytes)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ModelError::ManifestParse("manifest is not UTF-8".into()))?;
    let mut manifest = Manifest::from_toml(text)?;
    let old: Vec<String> = manifest
        .privacy
        .take()
        .map(|p| p.tensor_owners().into_iter().map(|(n, _)| n).collect())
        .unwrap_or_default();
    let mut all = Vec::new();
    for file in [&manifest.weights.device.file, &manifest.weights.cloud.file] {
        for t in read_tensors(&dir.join(file), &limits)? {
            if !old.contains(&t.name) {
                all.push(t);
            }
        }
    }
    all.extend(tensors);
    manifest.privacy = Some(spec);
    write_bundle(dir, &manifest, &all, key)
}

/// `a / ‖a‖₁` (Laplace) or `a / ‖a‖₂` (Gaussian), the norm floored at 1e-9 (a zero vector
/// stays zero): the released vector has norm at most 1 = C, so the clip never changes it.
pub(crate) fn normalize(m: DpMechanism, a: Vec<f32>) -> Vec<f32> {
    let n = match m {
        DpMechanism::Laplace => a.iter().map(|v| f64::from(v.abs())).sum::<f64>(),
        DpMechanism::Gaussian => a
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt(),
    }
    .max(1e-9);
    a.into_iter().map(|v| (f64::from(v) / n) as f32).collect()
}

/// Keeps only the variants whose ε is in `keep` (relative tolerance 1e-9) in the bundle in
/// `dir` and re-signs it with `key`: an operator ships a bundle that offers exactly the ε it
/// allows. The tensors of the dropped variants leave both weights files.
///
/// # Errors
/// Any [`ModelError`] from reading, validating, writing or signing the bundle;
/// [`ModelError::InvalidManifest`] if the bundle has no `[privacy]` section or no variant
/// would remain.
pub fn retain_variants(dir: &Path, keep: &[f64], key: &crate::SigningKey) -> Result<()> {
    let limits = Limits::default();
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = read_limited(&manifest_path, limits.max_manifest_bytes)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ModelError::ManifestParse("manifest is not UTF-8".into()))?;
    let manifest = Manifest::from_toml(text)?;
    let mut spec = manifest
        .privacy
        .clone()
        .ok_or_else(|| bad("the bundle has no [privacy] section"))?;
    spec.variants.retain(|v| {
        keep.iter()
            .any(|&e| (v.epsilon - e).abs() <= 1e-9 * e.abs())
    });
    let wanted: Vec<String> = spec.tensor_owners().into_iter().map(|(n, _)| n).collect();
    let mut tensors = Vec::new();
    for file in [&manifest.weights.device.file, &manifest.weights.cloud.file] {
        for t in read_tensors(&dir.join(file), &limits)? {
            if wanted.contains(&t.name) {
                tensors.push(t);
            }
        }
    }
    attach_privacy(dir, spec, tensors, key)
}
