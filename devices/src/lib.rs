//! # tandem-device: the device runtime
//!
//! What an app calls: [`Device::connect`] once, then [`Device::infer`] per input with a
//! [`Protection`] (for an encoder bundle — a sentence encoder such as all-MiniLM-L6-v2 — use
//! [`SentenceDevice`] instead: [`SentenceDevice::embed`], [`SentenceDevice::embed_batch`]):
//! * [`Protection::Encrypted`] — the split activation is encrypted ([`tandem_he`]); the cloud
//!   evaluates its layer on ciphertexts and never sees the activation or the result.
//! * [`Protection::Noised`] — the activation is clipped, quantised and noised with exact
//!   discrete Gaussian noise ([`tandem_dp`]), charged to the durable ledger **before** it is
//!   sent; the cloud computes on the noised integers in the clear.
//! * [`Protection::NoisedEncrypted`] — both: noised (and charged), then encrypted.
//!
//! Order of a DP release: connect (handshake), register the evaluation key and await the
//! cloud's `KeyAck` (noised-encrypted, once per `Device`), **then** charge, then send. A
//! refusal the device can learn of first — no cloud, a refused handshake, a key for an output
//! mode the model is not served in ([`DeviceError::KeyRefused`]) — charges nothing.
//!
//! The device runs its own layers (the bundle's device part, signature-verified), derives the
//! cloud layer's HE plan from public information only ([`cloud_plan`]) under the parameter
//! set the handshake negotiated, drives the sans-IO [`tandem_protocol::DeviceSession`] over
//! mutual TLS, decrypts and finishes locally.
//!
//! Inputs: every float stage refuses non-finite values and an input of the wrong length,
//! before anything is charged or sent ([`tandem_model::ModelError::NonFinite`]).
//!
//! Retries ([`RetryPolicy`]): connection failures, including a cloud that is not up yet when
//! [`Device::connect`] runs, are retried with exponential backoff and jitter, bounded in
//! attempts and time. A payload is built (and, for DP modes, charged and noised) exactly once
//! per inference; retries resend the same payload, so the ledger is never charged twice and a
//! release is never re-noised. The evaluation key is uploaded only when the cloud answers
//! `UnknownKey` (a restarted cloud reloads stored keys, so nothing is re-sent).
//!
//! On disk ([`DeviceOptions::state_dir`], module [`state`]): the directory is mode 0700, the
//! HE secret seed is created mode 0600 and synced; a damaged seed is a
//! [`DeviceError::StateFile`] naming the file.
//!
//! Modules: [`state`] (files on disk), `keys` (HE key material per parameter set), `conn`
//! (the connection driver), `pipeline` (the inference pipeline and [`Device`]).
#![forbid(unsafe_code)]

mod conn;
mod early_exit;
pub mod energy;
mod error;
mod keys;
mod options;
mod pipeline;
pub mod planner;
mod remote;
mod sentence;
pub mod state;

pub use early_exit::{Answer, EarlyExit};
pub use error::DeviceError;
pub use keys::{cloud_plan, parameter_set, HeState, LayerShape};
pub use options::{default_param_sets, DeviceOptions, DpOptions, RetryPolicy};
pub use pipeline::{worst_case_wait, Device};
pub use remote::{RemoteLayers, RemoteStats, DEFAULT_MAX_IN_FLIGHT};
pub use sentence::{Encoded, SentenceDevice, SentenceStats, DEFAULT_PIPELINE};
pub use tandem_he::OutputMode;

/// Largest absolute value the encrypted cloud layer accepts (the cloud plans with the same).
pub const MAX_ABS_INPUT: u64 = tandem_he::INT8_LAYER_MAX_INPUT;

/// How the split activation is protected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Protection {
    /// Encrypted under the device's HE key.
    Encrypted,
    /// DP-noised ((ε, δ) per release), sent in the clear.
    Noised {
        /// ε of this release.
        epsilon: f64,
    },
    /// DP-noised, then encrypted.
    NoisedEncrypted {
        /// ε of this release.
        epsilon: f64,
    },
    /// The per-request planner chooses among the protections the app's
    /// [`planner::AutoPolicy`] allows ([`Device::set_auto_policy`]), never a release the ledger
    /// would refuse (TDM-PLAN-6); [`Device::plan`] shows what it would choose and why.
    Auto,
}

/// Wall-clock time per stage of one inference, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Device layers and quantisation.
    pub device_ms: f64,
    /// Ledger charge and noise.
    pub dp_ms: f64,
    /// Encryption.
    pub encrypt_ms: f64,
    /// Network round trip including the cloud's evaluation (and reconnects).
    pub network_ms: f64,
    /// Decryption and the device's remaining layers.
    pub decrypt_ms: f64,
}

impl Timings {
    /// Sum of all stages.
    pub fn total_ms(&self) -> f64 {
        self.device_ms + self.dp_ms + self.encrypt_ms + self.network_ms + self.decrypt_ms
    }
}

/// The outcome of one inference.
#[derive(Debug, Clone, PartialEq)]
pub struct Inference {
    /// Predicted class.
    pub class: usize,
    /// The final layer's outputs.
    pub logits: Vec<f32>,
    /// Per-stage times.
    pub timings: Timings,
    /// Request bytes sent (protocol frames, excluding key uploads), summed over the requests
    /// of every cloud layer.
    pub bytes_up: usize,
    /// Response bytes received (protocol frames), summed over every cloud layer.
    pub bytes_down: usize,
    /// Evaluation-key bytes uploaded during this inference (0 if the cloud had the key).
    pub key_upload_bytes: usize,
    /// ε charged for this inference: one release per cloud layer (0 for `Encrypted`).
    pub epsilon_spent: f64,
    /// Attempts needed, summed over the cloud layers (one per cloud layer without
    /// reconnects; 1 for a single-cloud-layer model).
    pub attempts: usize,
}
