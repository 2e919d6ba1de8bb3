//! Mutual TLS 1.3 for Tandem.
//!
//! This crate holds everything the device and cloud runtimes need to speak to each other over
//! mutually authenticated TLS 1.3, as required by `specs/protocol.md` §1:
//!
//! - [`server_config`] / [`client_config`]: rustls configurations on the **ring** provider, TLS
//!   1.3 only, ALPN `tandem/1` (TDM-ALPN-1), client certificates required and checked against the
//!   device CA with CRLs; the device checks the cloud against the cloud CA and its name.
//! - [`peer_identity`] / [`identity_from_certificate`]: the 32-byte peer identity that keys are
//!   stored under (TDM-KEY-4): SHA-256 of the certificate's SubjectPublicKeyInfo.
//! - [`channel_binding`]: the 32-byte TLS-exporter channel binding (TDM-BIND-1).
//! - [`established`]: the one check a runtime calls after the handshake, before creating a
//!   protocol session: TLS 1.3, ALPN, peer identity and channel binding in one value.
//! - [`effective_crls`]: the CRL policy (newest CRL per device CA by CRL number, signature
//!   checked, stale and future CRLs refused).
//! - [`pki`]: the dev PKI file layout; with the cargo feature **`dev-pki`** (off by default)
//!   also a development PKI generated with rcgen (files for `tandem pki init|revoke`, or in
//!   memory for tests and the demo). An app that only loads credentials leaves it off.
//!
//! Certificates, keys and CRLs are treated as untrusted input: every loader returns a typed
//! [`Error`] and never panics.
//!
//! # Example
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use tandem_tls::{client_config_from_files, established, server_config_from_files, server_name};
//! use tandem_tls::{ClientFiles, ServerFiles};
//!
//! // Files written by `tandem pki init pki/` (or by your own CA, in the same layout).
//! let dir = Path::new("pki");
//!
//! // Cloud: hand this to `tokio_rustls::TlsAcceptor::from(server)`. A refused device shows up
//! // as an error of `acceptor.accept(tcp).await`; on success call
//! // `established(tls_stream.get_ref().1)?` and create the session with
//! // `CloudSession::new(config, est.peer.id(), est.channel_binding, now_ms)`.
//! let server = server_config_from_files(&ServerFiles::from_pki_dir(dir))?;
//!
//! // Device (here with blocking std I/O).
//! let client = client_config_from_files(&ClientFiles::from_pki_dir(dir, "device-1")?)?;
//! let mut tcp = std::net::TcpStream::connect("127.0.0.1:4433")?;
//! let mut conn = tandem_tls::rustls::ClientConnection::new(client, server_name("localhost")?)?;
//! while conn.is_handshaking() {
//!     conn.complete_io(&mut tcp)?;
//! }
//! let est = established(&conn)?; // TLS 1.3 + ALPN tandem/1 checked
//! // DeviceSession::new(config, est.channel_binding, now_ms) ...
//! # let _ = (server, est);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod binding;
mod config;
mod crl;
mod error;
mod identity;
pub mod limits;
mod load;
pub mod pki;

pub use binding::{channel_binding, established, Established};
pub use config::{
    client_config, client_config_from_files, provider, server_config, server_config_from_files,
    server_name, ClientCredentials, ClientFiles, ServerCredentials, ServerFiles,
};
pub use crl::effective_crls;
pub use error::{Error, Result};
pub use identity::{identity_from_certificate, peer_identity, PeerIdentity};
pub use load::{
    load_certificates, load_crls, load_private_key, parse_certificates, parse_crls,
    parse_private_key,
};
#[cfg(feature = "dev-pki")]
pub use pki::{DevPki, DeviceCertProfile, PkiSummary};

/// Re-exported so that callers name the same rustls and pki-types versions as this crate.
pub use rustls;
/// Re-exported DER wrapper types (certificates, keys, CRLs).
pub use rustls_pki_types as pki_types;

/// The ALPN protocol id of Tandem v1 (TDM-ALPN-1).
pub const ALPN_TANDEM_V1: &[u8] = b"tandem/1";

/// The TLS exporter label used for the channel binding (TDM-BIND-1).
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-tandem-channel-binding";

/// Length in bytes of the channel binding (TDM-BIND-1).
pub const CHANNEL_BINDING_LEN: usize = 32;

/// Length in bytes of a peer identity (SHA-256 output).
pub const IDENTITY_LEN: usize = 32;

#[cfg(feature = "dev-pki")]
/// `tandem pki init <dir>`: writes a fresh development PKI with `devices` device certificates
/// to `dir` (same as [`pki::init`]; the file layout is in the [`pki`] module documentation).
pub fn pki_init(dir: &std::path::Path, devices: usize) -> Result<PkiSummary> {
    pki::init(dir, devices)
}

#[cfg(feature = "dev-pki")]
/// `tandem pki revoke <dir> <device>`: adds the device's certificate to the device CA's CRL
/// (same as [`pki::revoke`]).
pub fn pki_revoke(dir: &std::path::Path, device: &str) -> Result<()> {
    pki::revoke(dir, device)
}
