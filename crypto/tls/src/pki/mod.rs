//! Development PKI: the file layout (always available) and, behind the cargo feature
//! **`dev-pki`** (off by default), a generator built with rcgen.
//!
//! An app that links tandem-tls without `dev-pki` carries no certificate authority: it can load
//! the files below ([`crate::ServerFiles::from_pki_dir`], [`crate::ClientFiles::from_pki_dir`])
//! but not make them. The `tandem` CLI (`tandem pki init|revoke`, `tandem demo`) and the
//! runtimes' tests enable the feature. Generating dev PKI material logs a `tracing` warning.
//!
//! # Two CAs
//!
//! The dev PKI has **two** certificate authorities:
//!
//! - the **cloud CA** issues the cloud's server certificate; devices trust only it;
//! - the **device CA** issues device (client) certificates and signs the CRL; the cloud trusts
//!   only it.
//!
//! Separate anchors mean a device certificate can never be presented as the cloud (even if a
//! verifier mishandled extended key usages), a leaked device-CA key cannot impersonate the
//! cloud, and the device-enrolment CA can be operated apart from the cloud's. All keys are
//! ECDSA P-256; every certificate gets a random 128-bit serial (so re-issuing for the same key
//! gives a new serial, and a revocation names exactly one certificate). CA names carry a random
//! tag (`Tandem device CA 1a2b3c4d`) so that two dev PKIs are never confused.
//!
//! This PKI is for development, tests and demos: CA private keys are written next to the
//! certificates (mode 0600 on Unix). A production deployment keeps CA keys offline.
//!
//! # Files written by `init` (feature `dev-pki`)
//!
//! ```text
//! <dir>/cloud-ca.crt          cloud CA certificate (PEM)      -> devices trust this
//! <dir>/cloud-ca.key          cloud CA private key (PKCS#8 PEM, 0600)
//! <dir>/device-ca.crt         device CA certificate (PEM)     -> the cloud trusts this
//! <dir>/device-ca.key         device CA private key (PKCS#8 PEM, 0600)
//! <dir>/device-ca.crl         CRL of the device CA (PEM "X509 CRL"), empty at init
//! <dir>/cloud.crt             cloud certificate, SAN localhost + 127.0.0.1, EKU serverAuth
//! <dir>/cloud.key             cloud private key (0600)
//! <dir>/devices/<name>.crt    device certificate, CN <name>, EKU clientAuth
//! <dir>/devices/<name>.key    device private key (0600)
//! ```
//!
//! Devices are named `device-1` … `device-N`. `revoke` rewrites `device-ca.crl`
//! (atomically: temporary file + rename) with every serial revoked so far plus the new one.

use crate::limits::MAX_DEVICE_NAME_LEN;
use crate::{Error, Result};

#[cfg(feature = "dev-pki")]
mod dev;
#[cfg(feature = "dev-pki")]
pub use dev::*;

/// File names of the on-disk layout (see the module documentation).
pub mod layout {
    use std::path::{Path, PathBuf};

    /// Cloud CA certificate.
    pub const CLOUD_CA_CERT: &str = "cloud-ca.crt";
    /// Cloud CA private key.
    pub const CLOUD_CA_KEY: &str = "cloud-ca.key";
    /// Device CA certificate.
    pub const DEVICE_CA_CERT: &str = "device-ca.crt";
    /// Device CA private key.
    pub const DEVICE_CA_KEY: &str = "device-ca.key";
    /// The device CA's CRL.
    pub const DEVICE_CA_CRL: &str = "device-ca.crl";
    /// Cloud certificate.
    pub const CLOUD_CERT: &str = "cloud.crt";
    /// Cloud private key.
    pub const CLOUD_KEY: &str = "cloud.key";
    /// Directory holding device certificates and keys.
    pub const DEVICES_DIR: &str = "devices";

    /// `<dir>/devices/<name>.crt`
    pub fn device_cert(dir: &Path, name: &str) -> PathBuf {
        dir.join(DEVICES_DIR).join(format!("{name}.crt"))
    }

    /// `<dir>/devices/<name>.key`
    pub fn device_key(dir: &Path, name: &str) -> PathBuf {
        dir.join(DEVICES_DIR).join(format!("{name}.key"))
    }
}

/// Checks a device name: 1..=64 characters from `[A-Za-z0-9_-]` (it becomes a file name).
pub(crate) fn check_device_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_DEVICE_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidDeviceName {
            name: name.chars().take(MAX_DEVICE_NAME_LEN + 8).collect(),
        })
    }
}
