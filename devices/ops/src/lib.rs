//! Device-side operations of Tandem's transformer path, and a BERT encoder built from them.
//!
//! - [`ops`]: embedding lookup, LayerNorm, GELU (erf form), softmax, multi-head scaled
//!   dot-product attention with a mask, residual add, mean pooling, L2 normalisation — small
//!   functions on `ndarray` views, batched over the tokens of a sequence (`[T, H]`).
//! - [`Linear`] / [`LinearFactory`]: the one path every linear layer takes, so that a placement
//!   step can route each of them to the encrypted cloud (issue 8); [`FloatLinears`] computes
//!   them on the device.
//! - [`quant`]: the integer pipeline (int8 weights per output channel, int8/int16 activations
//!   with a per-token scale kept on the device, float bias on the device): [`QuantizedLinear`].
//! - [`encrypted`]: the same integer computation with the product done by the cloud under
//!   tandem-he: [`EncryptedLinear`], built by [`EncryptedLinears`] against a [`CloudLayers`].
//! - [`bert`]: `BertEmbeddings`, `BertSelfAttention`, `BertAttention`, `BertLayer`,
//!   `BertEncoder`, `BertModel`, each loading its named checkpoint tensors.
//! - [`BundleEncoder`]: a sentence encoder from a signed Tandem bundle (its `[encoder]` op
//!   graph), linear layers by the integer pipeline or by the cloud under encryption;
//!   `import` (feature `import`) converts a sentence-transformers directory into such a bundle.
//! - [`SentenceEncoder`]: a sentence-transformers model directory (all-MiniLM-L6-v2, fetched by
//!   `scripts/fetch-minilm.sh`) → L2-normalised mean-pooled sentence embeddings.
//!
//! Model files are untrusted input: reads are size-limited and every damaged or foreign file
//! gives an [`OpsError`] naming the file, never a panic.
#![forbid(unsafe_code)]

pub mod bert;
pub mod bundle;
pub mod config;
pub mod encrypted;
mod error;
#[cfg(feature = "import")]
pub mod import;
pub mod linear;
pub mod metrics;
pub mod ops;
pub mod profile;
pub mod quant;
pub mod sentence;
pub mod weights;

pub use bert::BertModel;
pub use bundle::{BundleEncoder, BundleLinears};
pub use config::BertConfig;
pub use encrypted::{
    CloudLayers, DeviceSession, EncryptedLinear, EncryptedLinears, HeStats, InProcessCloud,
    PlannedLayer,
};
pub use error::OpsError;
pub use linear::{DenseLinear, FloatLinears, Linear, LinearFactory, LinearSpec};
pub use profile::{LinearProfile, OpProfile, SplitProfile, MAX_PROFILE_BLOCKS};
pub use quant::{
    ActivationBits, DeviceQuant, PrecisionPolicy, QuantizedLinear, QuantizedLinears, QuantizedRows,
    QuantizedWeights,
};
pub use sentence::{default_model_dir, Encoded, SentenceEncoder};
pub use weights::Checkpoint;
