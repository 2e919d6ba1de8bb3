//! The crate's single error type.

use std::path::PathBuf;

/// Result alias with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while loading credentials, building TLS configurations,
/// inspecting an established connection, or generating the development PKI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file that was named does not exist.
    #[error("file not found: {}", path.display())]
    FileNotFound {
        /// The missing file.
        path: PathBuf,
    },
    /// Reading or writing a file failed for another reason.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than [`crate::limits::MAX_PEM_FILE_BYTES`].
    #[error("{} is larger than the limit of {limit} bytes", path.display())]
    FileTooLarge {
        /// The file concerned.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
    /// A file is not well-formed PEM.
    #[error("{}: malformed PEM: {reason}", path.display())]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// What the PEM parser reported.
        reason: String,
    },
    /// A PEM file holds none of the items expected (e.g. a key file with no private key).
    #[error("{}: no {expected} found", path.display())]
    MissingPemItem {
        /// The file concerned.
        path: PathBuf,
        /// What was looked for ("certificate", "private key", "CRL").
        expected: &'static str,
    },
    /// A PEM file holds more items than the limit allows.
    #[error("{}: more than {limit} {what} items", path.display())]
    TooManyPemItems {
        /// The file concerned.
        path: PathBuf,
        /// What was counted.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// A certificate could not be parsed or used (bad DER, not a usable CA, ...).
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A certificate revocation list could not be parsed.
    #[error("invalid CRL: {0}")]
    InvalidCrl(String),
    /// rustls refused a configuration or an operation (key mismatch, exporter failure, ...).
    #[error("TLS error: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built (no trust anchor, unparsable CRL).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A server name is neither a valid DNS name nor an IP address.
    #[error("invalid server name {name:?}")]
    InvalidServerName {
        /// The rejected name.
        name: String,
    },
    /// The connection is still handshaking; identity and channel binding are not available yet.
    #[error("TLS handshake not complete")]
    HandshakeIncomplete,
    /// The peer presented no certificate (cannot happen on a server built by this crate).
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The negotiated protocol version is not TLS 1.3.
    #[error("connection is not TLS 1.3")]
    NotTls13,
    /// The connection did not negotiate ALPN `tandem/1` (TDM-ALPN-1).
    #[error("ALPN `tandem/1` was not negotiated")]
    AlpnMismatch,
    /// Certificate, key or CRL generation failed.
    #[error("certificate generation failed: {0}")]
    Generation(String),
    /// The system random number generator failed.
    #[error("random number generator failure")]
    Random,
    /// `pki init` found an existing PKI file and refuses to overwrite it.
    #[error("{} already exists; refusing to overwrite an existing PKI", path.display())]
    PkiExists {
        /// The first existing file found.
        path: PathBuf,
    },
    /// A device name contains characters other than ASCII letters, digits, `-`, `_`, or is
    /// empty or too long.
    #[error("invalid device name {name:?} (1..=64 characters from [A-Za-z0-9_-])")]
    InvalidDeviceName {
        /// The rejected name.
        name: String,
    },
    /// No device of that name exists in the PKI.
    #[error("unknown device {name:?}")]
    UnknownDevice {
        /// The name looked for.
        name: String,
    },
    /// A numeric argument is outside its allowed range.
    #[error("{what} must be in {min}..={max}, got {got}")]
    OutOfRange {
        /// What the argument is.
        what: &'static str,
        /// Smallest accepted value.
        min: usize,
        /// Largest accepted value.
        max: usize,
        /// The value given.
        got: usize,
    },
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::FileNotFound {
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }

    pub(crate) fn generation(e: rcgen::Error) -> Self {
        Error::Generation(e.to_string())
    }
}
