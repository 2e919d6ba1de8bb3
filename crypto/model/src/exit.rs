//! The early-exit head (issue 10, `specs/planner.md` §7): a small dense layer on the split
//! activation that lets the device answer on its own when it is confident.
//!
//! The head reads the real-valued activation entering the first cloud layer (what
//! [`crate::Bundle::start`] returns in [`crate::Step::Cloud`]), computes `classes` logits
//! `W·a + b` (f32, `W` of shape `[classes, in]`) and its confidence, the largest softmax
//! probability of those logits (in `(1/classes, 1]`, computed in f64). The device answers
//! locally when `confidence >= threshold` (τ), otherwise it offloads (TDM-EXIT-1).
//!
//! The head is part of the signed bundle: the manifest's optional `[exit_head]` section
//! ([`ExitHeadSpec`]) names its two f32 tensors, which live in the **device** weights file
//! (the cloud never needs them), and carries τ and how it was calibrated ([`ExitCalibration`]).
//! Tampering with the section, τ or the tensors fails the bundle's signature or digest check
//! like any other part of the bundle (TDM-EXIT-2).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bundle::{check_finite, read_limited, MANIFEST_FILE};
use crate::error::{ModelError, Result};
use crate::manifest::{Limits, Manifest, Placement};
use crate::sign::{serialize_tensors, sign_manifest, NamedTensor, TensorData};

/// The manifest's `[exit_head]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitHeadSpec {
    /// Manifest index of the cloud layer whose input the head reads; must be the first cloud
    /// layer (the split activation of the default split).
    pub at_layer: usize,
    /// Length of the activation the head reads (= `in` of layer `at_layer`).
    #[serde(rename = "in")]
    pub n_in: usize,
    /// Name of the f32 weight tensor, shape `[classes, in]`, in the device weights file.
    pub weight: String,
    /// Name of the f32 bias tensor, shape `[classes]`, in the device weights file.
    pub bias: String,
    /// τ: the device answers locally when the head's confidence (largest softmax
    /// probability) is at least this. In `(0, 1]`.
    pub threshold: f64,
    /// How the head was trained and τ calibrated (informational, signed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<ExitCalibration>,
}

/// Provenance of an exit head and of its τ (informational; covered by the signature).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitCalibration {
    /// The command that trained the head and calibrated τ.
    pub command: String,
    /// Seed of the held-out split and of the head's training.
    pub seed: u64,
    /// How the bundle's training rows were split into head-training and held-out rows.
    pub split: String,
    /// Distillation temperature (soft targets `softmax(full logits / T)`).
    pub temperature: f64,
    /// Training epochs of the head.
    pub epochs: usize,
    /// Rows the head was trained on.
    pub fit_samples: usize,
    /// Held-out rows τ was calibrated on.
    pub holdout_samples: usize,
    /// Target: largest accuracy loss of the cascade against the full model on the held-out
    /// rows, in percentage points.
    pub target_loss_points: f64,
    /// Full model's (`Bundle::predict_plain`) accuracy on the held-out rows.
    pub holdout_full_accuracy: f64,
    /// The cascade's accuracy at τ on the held-out rows.
    pub holdout_cascade_accuracy: f64,
    /// Fraction of held-out rows answered locally at τ.
    pub holdout_local_fraction: f64,
    /// Full model's accuracy on the bundle's test split (`test.json`).
    pub test_full_accuracy: f64,
    /// The cascade's accuracy at τ on the test split.
    pub test_cascade_accuracy: f64,
    /// Fraction of test rows answered locally at τ.
    pub test_local_fraction: f64,
}

impl ExitHeadSpec {
    /// Checks the section against the rest of the manifest: `at_layer` is the first cloud
    /// layer, `in` matches it, the tensor names are distinct and non-empty, τ is in `(0, 1]`.
    ///
    /// # Errors
    /// [`ModelError::InvalidManifest`] naming what is wrong.
    pub fn validate(&self, manifest: &Manifest) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidManifest(format!("exit_head: {m}")));
        let first = manifest.cloud_indices().first().copied();
        if first != Some(self.at_layer) {
            return bad(format!(
                "at_layer = {} but the first cloud layer is {first:?}",
                self.at_layer
            ));
        }
        let n_in = manifest.layers.get(self.at_layer).map(|l| l.n_in);
        if n_in != Some(self.n_in) {
            return bad(format!(
                "in = {} but layer {} takes {n_in:?}",
                self.n_in, self.at_layer
            ));
        }
        if self.weight.is_empty() || self.bias.is_empty() || self.weight == self.bias {
            return bad("weight and bias must be distinct non-empty tensor names".into());
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return bad(format!("threshold {} is not in (0, 1]", self.threshold));
        }
        Ok(())
    }

    /// The two tensors the section names, both owned by the device.
    pub(crate) fn tensor_owners(&self) -> [(String, Placement); 2] {
        [
            (self.weight.clone(), Placement::Device),
            (self.bias.clone(), Placement::Device),
        ]
    }
}

/// What the head says about one input.
#[derive(Clone, Debug, PartialEq)]
pub struct ExitOutput {
    /// The head's class (index of its largest logit, first one on ties).
    pub class: usize,
    /// Largest softmax probability of the head's logits, in `(0, 1]`.
    pub confidence: f64,
    /// Whether `confidence >= threshold`: the device may answer locally.
    pub exit: bool,
    /// The head's logits, length `classes`.
    pub logits: Vec<f32>,
}

/// A loaded, checked exit head.
#[derive(Clone, Debug, PartialEq)]
pub struct ExitHead {
    spec: ExitHeadSpec,
    classes: usize,
    /// Row-major `[classes][n_in]`.
    w: Vec<f32>,
    b: Vec<f32>,
}

impl ExitHead {
    /// A head from its section and weights (`w` row-major `[classes][spec.n_in]`, `b` of
    /// length `classes`), e.g. while calibrating τ before the head is signed.
    ///
    /// # Errors
    /// [`ModelError::Tensor`] for a wrong length or a non-finite value.
    pub fn new(spec: ExitHeadSpec, classes: usize, w: Vec<f32>, b: Vec<f32>) -> Result<Self> {
        let t = |name: &str, reason: String| ModelError::Tensor {
            name: name.to_string(),
            reason,
        };
        if classes < 2 || spec.n_in == 0 || w.len() != classes * spec.n_in {
            return Err(t(
                &spec.weight,
                format!(
                    "{} values, expected classes × in = {classes} × {}",
                    w.len(),
                    spec.n_in
                ),
            ));
        }
        if b.len() != classes {
            return Err(t(
                &spec.bias,
                format!("{} values, expected {classes}", b.len()),
            ));
        }
        if w.iter().chain(&b).any(|v| !v.is_finite()) {
            return Err(t(&spec.weight, "non-finite value".into()));
        }
        Ok(ExitHead {
            spec,
            classes,
            w,
            b,
        })
    }

    /// The manifest section.
    pub fn spec(&self) -> &ExitHeadSpec {
        &self.spec
    }

    /// τ.
    pub fn threshold(&self) -> f64 {
        self.spec.threshold
    }

    /// The same head with another τ (benchmarks sweep τ; a bundle's τ is the signed one).
    pub fn with_threshold(&self, threshold: f64) -> Self {
        let mut h = self.clone();
        h.spec.threshold = threshold;
        h
    }

    /// Evaluates the head on the split activation `a` (length `in`).
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for a wrong length, [`ModelError::NonFinite`] if the
    /// activation or a logit is not finite.
    pub fn evaluate(&self, a: &[f32]) -> Result<ExitOutput> {
        if a.len() != self.spec.n_in {
            return Err(ModelError::InvalidInput(format!(
                "exit head takes {} values, got {}",
                self.spec.n_in,
                a.len()
            )));
        }
        check_finite(a, || "exit head input".into())?;
        let logits: Vec<f32> = self
            .w
            .chunks_exact(self.spec.n_in)
            .zip(&self.b)
            .map(|(row, &bias)| row.iter().zip(a).fold(bias, |s, (&wi, &ai)| s + wi * ai))
            .collect();
        check_finite(&logits, || "exit head".into())?;
        let (class, max) =
            logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                });
        // Largest softmax probability = 1 / Σ exp(l_i − max), in (1/classes, 1].
        let denom: f64 = logits
            .iter()
            .map(|&v| (f64::from(v) - f64::from(max)).exp())
            .sum();
        let confidence = 1.0 / denom;
        debug_assert!(self.classes == logits.len());
        Ok(ExitOutput {
            class,
            confidence,
            exit: confidence >= self.spec.threshold,
            logits,
        })
    }
}

/// Adds (or replaces) the exit head of the bundle in `dir` and re-signs it: appends the two
/// f32 tensors to the device weights file (any tensors of a previous head are dropped), sets
/// the manifest's `[exit_head]` section to `spec` and signs the manifest with `key`
/// ([`sign_manifest`]). The cloud weights file is not touched, so the cloud's weights and
/// the encrypted results are unchanged (the model digest changes, as for any re-signing).
///
/// `w` is row-major `[classes][spec.n_in]`, `b` has length `classes`.
///
/// # Errors
/// Any [`ModelError`] from reading, validating, writing or signing the bundle.
pub fn attach_exit_head(
    dir: &Path,
    spec: ExitHeadSpec,
    w: Vec<f32>,
    b: Vec<f32>,
    key: &crate::SigningKey,
) -> Result<()> {
    let limits = Limits::default();
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = read_limited(&manifest_path, limits.max_manifest_bytes)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ModelError::ManifestParse("manifest is not UTF-8".into()))?;
    let mut manifest = Manifest::from_toml(text)?;
    let head = ExitHead::new(spec.clone(), manifest.classes, w, b)?;
    let old = manifest.exit_head.take();
    manifest.validate(&limits)?;
    let device_path = dir.join(&manifest.weights.device.file);
    let device = read_limited(&device_path, limits.max_weights_bytes)?;
    let st = safetensors::SafeTensors::deserialize(&device)
        .map_err(|e| ModelError::Safetensors(format!("{}: {e}", device_path.display())))?;
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let is_head = [&spec.weight, &spec.bias].contains(&&name)
            || old
                .as_ref()
                .is_some_and(|o| o.weight == name || o.bias == name);
        if is_head {
            continue;
        }
        let data = view.data();
        let data = match view.dtype() {
            safetensors::Dtype::F32 => TensorData::F32(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            safetensors::Dtype::I8 => {
                TensorData::I8(data.iter().map(|&v| i8::from_le_bytes([v])).collect())
            }
            safetensors::Dtype::I64 => TensorData::I64(
                data.chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            other => {
                return Err(ModelError::Tensor {
                    name,
                    reason: format!("unexpected dtype {other:?} in the device file"),
                })
            }
        };
        tensors.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    let classes = manifest.classes;
    tensors.push(NamedTensor {
        name: spec.weight.clone(),
        shape: vec![classes, spec.n_in],
        data: TensorData::F32(head.w),
    });
    tensors.push(NamedTensor {
        name: spec.bias.clone(),
        shape: vec![classes],
        data: TensorData::F32(head.b),
    });
    manifest.exit_head = Some(spec);
    manifest.validate(&limits)?;
    let out = serialize_tensors(&tensors)?;
    std::fs::write(&device_path, &out).map_err(crate::error::io_err(&device_path))?;
    let text = manifest.to_toml()?;
    std::fs::write(&manifest_path, text).map_err(crate::error::io_err(&manifest_path))?;
    sign_manifest(&manifest_path, key)
}

/// Reads the head's tensors from the device weights file (called by the bundle loader).
pub(crate) fn load_head(
    spec: &ExitHeadSpec,
    classes: usize,
    st: &safetensors::SafeTensors<'_>,
) -> Result<ExitHead> {
    let w = crate::bundle::read_f32(st, &spec.weight, &[classes, spec.n_in])?;
    let b = crate::bundle::read_f32(st, &spec.bias, &[classes])?;
    ExitHead::new(spec.clone(), classes, w, b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(threshold: f64) -> ExitHeadSpec {
        ExitHeadSpec {
            at_layer: 1,
            n_in: 2,
            weight: "exit.weight".into(),
            bias: "exit.bias".into(),
            threshold,
            calibration: None,
        }
    }

    #[test]
    fn confidence_is_the_largest_softmax_probability_and_gates_the_exit() {
        // logits = (a0, a1, 0): with a = (ln 2, 0) softmax = (2, 1, 1) / 4.
        let w = vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let h = ExitHead::new(spec(0.5), 3, w.clone(), vec![0.0; 3]).unwrap();
        let o = h.evaluate(&[std::f32::consts::LN_2, 0.0]).unwrap();
        assert_eq!(o.class, 0);
        assert!((o.confidence - 0.5).abs() < 1e-6, "{}", o.confidence);
        // τ = 0.5 exits at 0.5 (>=); τ just above does not.
        let h_hi = h.with_threshold(0.5 + 1e-3);
        assert!(!h_hi.evaluate(&[std::f32::consts::LN_2, 0.0]).unwrap().exit);
        assert!(h.evaluate(&[5.0, 0.0]).unwrap().exit);
        assert!(h.evaluate(&[f32::NAN, 0.0]).is_err());
        assert!(h.evaluate(&[1.0]).is_err());
    }

    #[test]
    fn wrong_shapes_and_thresholds_are_refused() {
        assert!(ExitHead::new(spec(0.9), 3, vec![0.0; 5], vec![0.0; 3]).is_err());
        assert!(ExitHead::new(spec(0.9), 3, vec![0.0; 6], vec![0.0; 2]).is_err());
        assert!(ExitHead::new(spec(0.9), 3, vec![f32::INFINITY; 6], vec![0.0; 3]).is_err());
    }
}
