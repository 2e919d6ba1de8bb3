//! Signed model bundles for Tandem and the exact integer split-inference pipeline.
//!
//! A bundle is a directory with
//! * `manifest.toml` — the [`Manifest`]: model id, version, dataset, layers (shapes,
//!   activations, placement on the device or in the cloud, int8 quantisation scales), allowed
//!   split points, and the SHA-256 digests and sizes of the two weights files;
//! * `device.safetensors` — the device's tensors (f32 input standardisation and f32 device
//!   layers) and `cloud.safetensors` — the cloud layer's int8 weights and i64 bias: each party
//!   holds only its own file ([`Bundle::load_part`]);
//! * `manifest.sig` — hex Ed25519 signature over [`SIGNING_CONTEXT`] followed by the exact
//!   manifest bytes.
//!
//! Verifying the signature and then the weights digests covers the whole bundle.
//! [`Bundle::digest`] (SHA-256 of the manifest bytes) is the model digest of the protocol.
//!
//! # The split pipeline
//! The device standardises the input and runs the layers before the cloud layer in f32, then
//! quantises the activation to int8 ([`Bundle::device_encode`]). The cloud computes the exact
//! integer `W·q + b` (int8 `W`, i64 `b`; [`Bundle::cloud_layer`], [`Bundle::cloud_eval_plain`]),
//! which is what the HE engine evaluates under encryption. The device dequantises and finishes
//! ([`Bundle::finish_on_device`]). [`Bundle::predict_plain`] chains exactly these three steps,
//! so an exact encrypted evaluation yields the plaintext prediction by construction.
//!
//! A model may have any number of cloud layers (each a quantised dense layer, each its own
//! protocol `layer_id` = manifest index). The general executor is [`Bundle::start`] (device
//! segment up to the first cloud layer) and [`Bundle::resume`] (after a cloud layer's integer
//! output, up to the next cloud layer or the end), each returning a [`Step`]; the
//! single-cloud-layer calls above are that executor with one cloud step.
#![forbid(unsafe_code)]

mod bundle;
pub mod encoder;
mod error;
pub mod exit;
mod manifest;
pub mod privacy;
mod sign;
mod testset;

pub use bundle::{
    Bundle, CloudLayer, Layer, Part, Prediction, Step, MANIFEST_FILE, SIGNATURE_FILE,
    SIGNING_CONTEXT,
};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use encoder::{CloudLinear, EncoderSpec, GraphError, OpKind, OpSpec};
pub use error::{ModelError, Result};
pub use exit::{attach_exit_head, ExitCalibration, ExitHead, ExitHeadSpec, ExitOutput};
pub use manifest::{
    Activation, LayerKind, LayerSpec, Limits, Manifest, Placement, Preprocess, QuantSpec,
    TrainingInfo, Weights, WeightsRef, FORMAT, INT8_MAX, MAX_ABS_BIAS,
};
pub use privacy::{
    attach_privacy, retain_variants, DpMechanism, PrivacySpec, PrivacyTraining, Variant,
    VariantSpec,
};
pub use sign::{
    dev_signing_key, format_signing_key, format_verifying_key, is_dev_key, read_signing_key,
    read_verifying_key, serialize_tensors, sign_bundle, sign_manifest, verify_bundle, write_bundle,
    LayerSummary, NamedTensor, Summary, TensorData, DEV_KEY_LABEL,
};
pub use testset::TestSet;
