//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong in `tandem-dp`.
///
/// Errors that come from untrusted input (ledger files, activation vectors, dataset files)
/// are reported here and never as a panic.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    /// A parameter (clipping bound, scale, ε, δ, ρ, dimension, …) is out of its valid range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// An input vector is unusable (wrong length, NaN or infinite entries).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The secure random source (OpenSSL via opendp) failed.
    #[error("secure randomness unavailable: {0}")]
    Entropy(String),
    /// An opendp constructor or privacy map returned an error.
    #[error("opendp: {0}")]
    OpenDp(String),
    /// A release would exceed the privacy budget of the device for the current window.
    #[error("privacy budget exceeded for the window: spent rho {spent}, requested {requested}, budget {budget}")]
    BudgetExceeded {
        /// ρ already spent in the window.
        spent: f64,
        /// ρ the release would cost.
        requested: f64,
        /// ρ allowed per window.
        budget: f64,
    },
    /// The receipt passed to a release does not cover the mechanism's cost.
    #[error("receipt covers rho {receipt} but the release costs {cost}")]
    ReceiptMismatch {
        /// ρ charged by the receipt.
        receipt: f64,
        /// ρ the mechanism costs.
        cost: f64,
    },
    /// The ledger file is corrupted (or not a ledger); it is never silently reset.
    #[error(
        "privacy ledger {path} is corrupted at byte {offset}: {reason}; the device cannot \
         account for its releases: restore the file from a backup, or move it aside to start \
         a new budget only if resetting this device's privacy budget is acceptable"
    )]
    LedgerCorrupted {
        /// Ledger file.
        path: PathBuf,
        /// Byte offset of the first bad record.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// Another handle — another process, or another `Ledger`/`Accountant` in this one —
    /// holds the ledger open (exclusive lock); nothing was read, written or charged.
    #[error(
        "privacy ledger {path} is in use by another process (e.g. another `tandem device` on \
         the same state directory); wait for it to finish, or stop it, then retry"
    )]
    LedgerInUse {
        /// Ledger file.
        path: PathBuf,
    },
    /// An earlier write to the ledger failed; the ledger refuses further charges.
    #[error("privacy ledger is poisoned by an earlier I/O failure; reopen it")]
    LedgerPoisoned,
    /// I/O error on the ledger or a data file.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A dataset file could not be parsed (feature `tools`).
    #[error("dataset {path}: {reason}")]
    Dataset {
        /// Dataset file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Plotting failed (feature `tools`).
    #[error("plot: {0}")]
    Plot(String),
    /// A DP release at an ε the model bundle has no noise-trained variant for (TDM-DPVAR-2):
    /// nothing was charged or sent. Ask for one of the trained ε, or set
    /// `DpOptions::allow_untrained_epsilon` to release with the nearest trained variant (its
    /// accuracy at the requested ε is then unmeasured).
    #[error(
        "the model was not trained for epsilon {requested} (trained: {trained:?}); nothing charged or sent: use a trained epsilon or let the app override (DpOptions::allow_untrained_epsilon; device.toml: allow_untrained_epsilon = true)"
    )]
    UntrainedEpsilon {
        /// The ε asked for.
        requested: f64,
        /// The ε the bundle's variants were trained for.
        trained: Vec<f64>,
    },
}

impl From<opendp::error::Error> for DpError {
    fn from(e: opendp::error::Error) -> Self {
        DpError::OpenDp(format!(
            "{:?}: {}",
            e.variant,
            e.message.unwrap_or_default()
        ))
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, DpError>;
