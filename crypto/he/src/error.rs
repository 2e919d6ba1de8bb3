//! The engine's one error type.

use thiserror::Error;

/// Everything that can go wrong in `tandem-he`. Untrusted bytes only ever produce these.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum HeError {
    /// The wire names a parameter set this build does not know.
    #[error("unknown parameter set id {0}")]
    UnknownParameterSet(u16),
    /// An object's parameter set differs from the one expected.
    #[error("parameter set mismatch: expected {expected}, got {got}")]
    ParameterMismatch {
        /// The id the receiver expected.
        expected: u16,
        /// The id the object carries.
        got: u16,
    },
    /// The ciphertext or key belongs to another secret key.
    #[error("key id mismatch")]
    KeyIdMismatch,
    /// Input larger than the caller's byte limit (checked before anything is allocated).
    #[error("{what}: {len} bytes exceed the limit of {limit}")]
    TooLarge {
        /// What was being decoded.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The caller's limit.
        limit: usize,
    },
    /// Bytes that do not form a valid encoding.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A shape that the layer or plan cannot take.
    #[error("shape error: {0}")]
    Shape(String),
    /// The layer's failure bound is above what the parameter set allows.
    #[error("failure bound 2^{log2_p_fail:.1} per output exceeds 2^-{limit}")]
    FailureBoundExceeded {
        /// log2 of the computed per-output failure probability.
        log2_p_fail: f64,
        /// The parameter set's limit (as a positive exponent).
        limit: u32,
    },
    /// The operation needs an evaluation key that was not given or lacks an automorphism.
    #[error("missing evaluation key material: {0}")]
    MissingEvaluationKey(&'static str),
    /// An input value outside the declared range.
    #[error("value out of range: {0}")]
    OutOfRange(String),
}
