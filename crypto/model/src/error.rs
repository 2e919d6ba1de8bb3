//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong loading, verifying, signing or running a model bundle.
///
/// Model files are untrusted input: every malformed, oversized, tampered or inconsistent
/// bundle maps to one of these variants, never to a panic.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file is larger than the configured limit; it was refused before being read.
    #[error("{path}: {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The file concerned.
        path: PathBuf,
        /// Its size (or a lower bound on it).
        size: u64,
        /// The limit in force.
        limit: u64,
    },
    /// A key file is malformed.
    #[error("key file {path}: {reason}")]
    KeyFormat {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The signature file is malformed (not 64 hex-encoded bytes).
    #[error("signature file {path}: {reason}")]
    SignatureFormat {
        /// The signature file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The manifest signature does not verify under the given key (the manifest was altered,
    /// damaged, or signed with another key).
    #[error(
        "{}: signature does not verify under the given key: restore the bundle from its \
         source, or check that the verifying key is the signer's",
        path.display()
    )]
    BadSignature {
        /// The manifest whose signature failed.
        path: PathBuf,
    },
    /// The weights file does not have the SHA-256 digest the signed manifest names.
    #[error(
        "{}: weights digest mismatch (manifest says {expected}, file has {actual}): the file \
         is damaged or foreign; restore the bundle from its source",
        path.display()
    )]
    DigestMismatch {
        /// The weights file.
        path: PathBuf,
        /// Hex digest from the manifest.
        expected: String,
        /// Hex digest of the file.
        actual: String,
    },
    /// The weights file does not have the size the signed manifest names.
    #[error(
        "{}: weights size mismatch (manifest says {expected} bytes, file has {actual}): the \
         file is truncated or foreign; restore the bundle from its source",
        path.display()
    )]
    SizeMismatch {
        /// The weights file.
        path: PathBuf,
        /// Size from the manifest.
        expected: u64,
        /// Size of the file.
        actual: u64,
    },
    /// The manifest is not valid TOML for the manifest schema.
    #[error("manifest does not parse: {0}")]
    ManifestParse(String),
    /// The manifest parses but is inconsistent (shapes, placements, scales, names...).
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// The encoder graph of the manifest is inconsistent (cycle, unknown op, non-linear cloud
    /// op, shape mismatch...): the bundle was built wrong; rebuild it (`tandem model
    /// import-bert`).
    #[error("invalid encoder graph: {0}")]
    Graph(#[from] crate::encoder::GraphError),
    /// The weights file is not valid safetensors.
    #[error("weights file is not valid safetensors: {0}")]
    Safetensors(String),
    /// A tensor named by the manifest is missing or has the wrong dtype, shape or values.
    #[error("tensor {name:?}: {reason}")]
    Tensor {
        /// The tensor name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An inference input has the wrong length or non-finite values.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A float stage of the pipeline produced (or was given) a value that is not finite
    /// (NaN or ±∞), typically because the input is out of the model's range. Nothing derived
    /// from it is charged or sent.
    #[error(
        "non-finite value at {stage} (element {index}): the input is outside the range the \
         model can evaluate"
    )]
    NonFinite {
        /// The stage: `input`, `standardisation`, `layer <name>`, `activation of <name>`,
        /// `dequantisation of <name>`.
        stage: String,
        /// Index of the first non-finite element.
        index: usize,
    },
    /// Integer evaluation overflowed `i64` (only possible with out-of-range inputs).
    #[error("integer overflow in layer {0:?}")]
    Overflow(String),
    /// The operation needs a part of the bundle that was not loaded (see [`crate::Part`]).
    #[error("not loaded: {0}")]
    NotLoaded(String),
    /// A test-set file is malformed.
    #[error("test set {path}: {reason}")]
    TestSet {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}
