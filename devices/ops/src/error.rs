//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `tandem-ops`: a damaged or foreign model file, a shape that
/// does not fit, a token id outside the vocabulary, or a linear layer backend that failed.
///
/// File errors name the file and say what to do; none of them is a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    /// Operands of an operation do not have compatible shapes.
    #[error("{op}: shape mismatch: {detail}")]
    Shape {
        /// The operation (`layer_norm`, `attention`, a linear layer's name, ...).
        op: String,
        /// Which shapes met.
        detail: String,
    },
    /// A token id is not a row of the embedding table.
    #[error("{table}: token id {id} outside 0..{rows}")]
    TokenOutOfRange {
        /// Which table (`word`, `token_type`).
        table: &'static str,
        /// The id given.
        id: u32,
        /// Rows in the table.
        rows: usize,
    },
    /// A sequence has no token, more tokens than the position table, or no unmasked token.
    #[error("sequence of {tokens} tokens refused: {reason}")]
    Sequence {
        /// Tokens in the sequence.
        tokens: usize,
        /// Why.
        reason: &'static str,
    },
    /// A file could not be read.
    #[error("{}: cannot read: {source}; run scripts/fetch-minilm.sh (or pass the right directory)", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than the limit set for its kind.
    #[error("{}: {size} bytes, more than the limit of {limit}; not a file of this kind, or raise the limit", path.display())]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The safetensors container is damaged or not a safetensors file.
    #[error("{}: not a valid safetensors file ({source}); fetch it again with scripts/fetch-minilm.sh", path.display())]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("{}: tensor `{tensor}` missing; this is not a checkpoint of the configured architecture", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The checkpoint path of the tensor.
        tensor: String,
    },
    /// A tensor has the wrong element type.
    #[error("{}: tensor `{tensor}` is {dtype}, expected F32", path.display())]
    TensorDtype {
        /// The file.
        path: PathBuf,
        /// The checkpoint path of the tensor.
        tensor: String,
        /// The element type found.
        dtype: String,
    },
    /// A tensor's shape does not match the configuration.
    #[error("{}: tensor `{tensor}` has shape {found:?}, config.json implies {expected:?}", path.display())]
    TensorShape {
        /// The file.
        path: PathBuf,
        /// The checkpoint path of the tensor.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor holds NaN or an infinity.
    #[error("{}: tensor `{tensor}` holds a non-finite value; the file is damaged", path.display())]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// The checkpoint path of the tensor.
        tensor: String,
    },
    /// A JSON configuration file does not parse into the expected structure.
    #[error("{}: not a valid configuration ({source})", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// A configuration parses but its values are out of range or unsupported.
    #[error("{}: {reason}", path.display())]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong and what is supported.
        reason: String,
    },
    /// `tokenizer.json` could not be loaded or a text could not be tokenised.
    #[error("{}: tokenizer: {source}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What the tokenizers crate said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A linear layer backend (for example an encrypted cloud call) failed.
    #[error("linear layer `{layer}`: {source}")]
    Linear {
        /// The layer's checkpoint path.
        layer: String,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The HE engine refused or failed on a layer: a plan above the failure bound of 2^-64, an
    /// input out of range, or a reply that does not decode or decrypt under this device's key.
    #[error("encrypted layer `{layer}`: {source}")]
    He {
        /// The layer's checkpoint path (or `evaluation key`).
        layer: String,
        /// What tandem-he said.
        #[source]
        source: tandem_he::HeError,
    },
    /// The cloud side of an encrypted layer refused a request: unknown layer index, no
    /// evaluation key uploaded yet in packed mode, or a layer loaded twice.
    #[error("cloud layer {index}: {reason}")]
    Cloud {
        /// The layer's index in execution order.
        index: usize,
        /// Why, and what to do.
        reason: String,
    },
    /// A split depth the encoder cannot run: more blocks than it has, or a block to run on the
    /// device whose int8 weights the device does not hold (load the bundle with its cloud
    /// weights file, `Part::Full`), or a block to offload without an encrypted path.
    #[error("split depth {requested} of {blocks} blocks: {reason}")]
    Split {
        /// Blocks asked to run on the device.
        requested: usize,
        /// Blocks of the encoder.
        blocks: usize,
        /// Why, and what to do.
        reason: String,
    },
    /// A signed model bundle failed to load, verify or run (the message names the file and
    /// what to do).
    #[error("model bundle: {0}")]
    Bundle(#[from] tandem_model::ModelError),
}

impl OpsError {
    pub(crate) fn shape(op: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Shape {
            op: op.into(),
            detail: detail.into(),
        }
    }
}
