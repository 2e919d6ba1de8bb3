//! The crate's single error type.

use std::path::PathBuf;

/// Result alias with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What to do about a damaged or foreign PKI file (appended to the file errors' messages).
const REPLACE_HINT: &str = "replace it with the file issued by your CA (`tandem pki init <dir>` \
                            writes a development PKI)";

/// Everything that can go wrong while loading credentials, building TLS configurations,
/// inspecting an established connection, or generating the development PKI.
///
/// Every error about a file names the file and says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file that was named does not exist.
    #[error("{}: file not found; check the path in the configuration (`tandem pki init <dir>` writes a development PKI)", path.display())]
    FileNotFound {
        /// The missing file.
        path: PathBuf,
    },
    /// Reading or writing a file failed for another reason.
    #[error("I/O error on {}: {source}; check that the file is readable by this user", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A path names a directory, socket, device or other non-regular file.
    #[error("{}: not a regular file; point the configuration at the PEM file itself", path.display())]
    NotAFile {
        /// The path concerned.
        path: PathBuf,
    },
    /// A file is larger than [`crate::limits::MAX_PEM_FILE_BYTES`] (checked before reading it).
    #[error("{} is larger than the limit of {limit} bytes: not a PEM certificate, key or CRL file; {REPLACE_HINT}", path.display())]
    FileTooLarge {
        /// The file concerned.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
    /// A file is not well-formed PEM (truncated, damaged base64, unterminated section, ...).
    #[error("{}: malformed PEM ({reason}): the file is truncated or damaged; {REPLACE_HINT}", path.display())]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// What the PEM parser reported.
        reason: String,
    },
    /// A file holds none of the items expected (empty, zero-filled, a key file where a
    /// certificate was expected, binary DER, ...).
    #[error("{}: no PEM {expected} found{hint}; {REPLACE_HINT}", path.display())]
    MissingPemItem {
        /// The file concerned.
        path: PathBuf,
        /// What was looked for ("certificate", "private key", "CRL").
        expected: &'static str,
        /// A diagnosis of what the file holds instead (may be empty).
        hint: String,
    },
    /// A PEM file holds more items than the limit allows.
    #[error("{}: more than {limit} {what} items; split the file or remove the extra items", path.display())]
    TooManyPemItems {
        /// The file concerned.
        path: PathBuf,
        /// What was counted.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// A certificate in a file is not a valid X.509 certificate (truncated or damaged DER).
    #[error("{}: certificate #{index} is not a valid X.509 certificate ({reason}); {REPLACE_HINT}", path.display())]
    BadCertificateFile {
        /// The file concerned.
        path: PathBuf,
        /// Position of the certificate in the file, from 1.
        index: usize,
        /// What the parser reported.
        reason: String,
    },
    /// A private key file holds a PEM key that cannot be used (damaged DER, unsupported
    /// algorithm).
    #[error("{}: unusable private key ({reason}); {REPLACE_HINT}", path.display())]
    BadPrivateKeyFile {
        /// The file concerned.
        path: PathBuf,
        /// What the key loader reported.
        reason: String,
    },
    /// A certificate could not be parsed or used (bad DER, not a usable CA, ...).
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A CRL could not be parsed (truncated or damaged DER, delta CRL, trailing bytes).
    #[error("{}: CRL #{index} is not a valid X.509 CRL ({reason}); fetch the CRL again from the device CA (`tandem pki revoke` re-signs a development one)", path.display())]
    InvalidCrl {
        /// The file the CRL came from.
        path: PathBuf,
        /// Position of the CRL in the file, from 1.
        index: usize,
        /// What the parser reported.
        reason: String,
    },
    /// A CRL is signed by an issuer that is not one of the device CAs: the CRL of another PKI.
    #[error("{}: CRL issued by {issuer:?}, which is not a device CA in the trusted CA file; use the device CA's own CRL", path.display())]
    CrlUntrustedIssuer {
        /// The file the CRL came from.
        path: PathBuf,
        /// The CRL issuer's name (for the operator).
        issuer: String,
    },
    /// A CRL names a device CA as issuer but its signature does not verify with that CA's key.
    #[error("{}: CRL claiming issuer {issuer:?} has a bad signature (forged, or the CA was re-keyed); fetch the CRL again from the device CA", path.display())]
    CrlBadSignature {
        /// The file the CRL came from.
        path: PathBuf,
        /// The CRL issuer's name.
        issuer: String,
    },
    /// Several CRLs of one issuer cannot be ordered: equal CRL numbers with different
    /// contents, a CRL without a CRL number, or scoped (issuing distribution point) CRLs.
    #[error("{} and {}: several CRLs of {issuer:?} that cannot be ordered ({reason}); keep only the newest CRL of each CA", path.display(), other.display())]
    CrlAmbiguous {
        /// The file of one of the CRLs.
        path: PathBuf,
        /// The file of the other one (may be the same file).
        other: PathBuf,
        /// The issuer's name.
        issuer: String,
        /// Why they cannot be ordered.
        reason: &'static str,
    },
    /// The newest CRL of a device CA is past its `nextUpdate`: revocations made since are unknown.
    #[error("{}: the newest CRL of {issuer:?} expired at {next_update} (nextUpdate); fetch a fresh CRL from the device CA (`tandem pki revoke` re-signs a development one)", path.display())]
    CrlExpired {
        /// The file the CRL came from.
        path: PathBuf,
        /// The issuer's name.
        issuer: String,
        /// `nextUpdate`, RFC 3339 UTC.
        next_update: String,
    },
    /// The newest CRL of a device CA has a `thisUpdate` in the future (beyond
    /// [`crate::limits::CRL_CLOCK_SKEW_SECS`]): this clock or the CA's is wrong.
    #[error("{}: the newest CRL of {issuer:?} is dated {this_update} (thisUpdate), in the future; fix this machine's clock or the CA's", path.display())]
    CrlNotYetValid {
        /// The file the CRL came from.
        path: PathBuf,
        /// The issuer's name.
        issuer: String,
        /// `thisUpdate`, RFC 3339 UTC.
        this_update: String,
    },
    /// A parser in a dependency panicked on the contents of a file; the panic was contained.
    #[error("{}: the {what} parser failed on this file (contained panic); the file is damaged; {REPLACE_HINT}", path.display())]
    ParserPanic {
        /// The file concerned.
        path: PathBuf,
        /// Which parser ("PEM", "certificate", "CRL", "private key").
        what: &'static str,
    },
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

    #[cfg(feature = "dev-pki")]
    pub(crate) fn generation(e: rcgen::Error) -> Self {
        Error::Generation(e.to_string())
    }
}
