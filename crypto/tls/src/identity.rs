//! Peer identity from the peer's certificate.

use std::fmt;

use rustls::ConnectionCommon;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::limits::MAX_LOGGED_COMMON_NAME;
use crate::{Error, Result, IDENTITY_LEN};

/// The identity of a TLS peer, as used by the cloud to store and look up a device's keys
/// (TDM-KEY-4, TDM-KEY-7).
///
/// # Which field, and why
///
/// `id` is **SHA-256 over the DER encoding of the end-entity certificate's
/// SubjectPublicKeyInfo** (algorithm identifier + public key), not over the whole certificate,
/// the serial number or the subject name:
///
/// - It names the key that *proved possession* in the handshake (the TLS 1.3 CertificateVerify
///   signature is made with that key), so it is exactly what mutual TLS authenticates.
/// - It **survives re-issuing** a certificate for the same key (renewal before expiry, a new
///   validity period, a changed subject or CA-side metadata), so evaluation keys a device
///   uploaded stay usable after renewal. A hash of the whole certificate would change at every
///   renewal and orphan stored keys.
/// - Subject names are chosen by whoever operates the CA and are not guaranteed unique; a
///   public key is unique to its holder.
///
/// Consequences (recorded in `specs/threat-model.md`): revoking a *certificate* (CRL, by
/// serial) stops connections with it, but a new certificate for the *same key* would get the
/// same identity and its stored keys back. After a key compromise the device must be re-keyed,
/// and the cloud operator should delete that identity's stored keys. Identity is only
/// meaningful for certificates accepted by the verifier (device CA + CRL + validity + EKU);
/// this type does not verify anything by itself.
///
/// `common_name` is the subject CN, sanitised for logs (printable ASCII only, truncated to
/// [`MAX_LOGGED_COMMON_NAME`] characters). It is informational and must never be used for
/// authorisation or as a storage key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    id: [u8; IDENTITY_LEN],
    common_name: Option<String>,
}

impl PeerIdentity {
    /// The 32-byte identity (SHA-256 of the SubjectPublicKeyInfo DER).
    pub fn id(&self) -> [u8; IDENTITY_LEN] {
        self.id
    }

    /// The subject common name, sanitised for logs; `None` if the certificate has none.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// The identity as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.id)
    }
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("id", &self.to_hex())
            .field("common_name", &self.common_name)
            .finish()
    }
}

impl fmt::Display for PeerIdentity {
    /// `<first 16 hex digits of the id> (<CN>)`, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = self.to_hex();
        let short = h.get(..16).unwrap_or(&h);
        match &self.common_name {
            Some(cn) => write!(f, "{short} ({cn})"),
            None => write!(f, "{short}"),
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn sanitise_for_log(s: &str) -> String {
    s.chars()
        .take(MAX_LOGGED_COMMON_NAME)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// Computes the [`PeerIdentity`] of a DER certificate.
///
/// The certificate is parsed strictly (no trailing bytes). This does not verify the
/// certificate: call it on certificates the TLS verifier accepted, or on your own.
pub fn identity_from_certificate(cert: &CertificateDer<'_>) -> Result<PeerIdentity> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::InvalidCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::InvalidCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    let spki = parsed.public_key().raw;
    let id: [u8; IDENTITY_LEN] = Sha256::digest(spki).into();
    let common_name = parsed
        .subject()
        .iter_common_name()
        .next()
        .map(|cn| match cn.as_str() {
            Ok(s) => sanitise_for_log(s),
            Err(_) => "<non-string CN>".to_string(),
        });
    Ok(PeerIdentity { id, common_name })
}

/// The [`PeerIdentity`] of the peer of an established connection (client or server side).
///
/// On a cloud built with [`crate::server_config`] the peer certificate has been verified
/// against the device CA, its CRLs, validity period and clientAuth usage before the handshake
/// completed. Fails with [`Error::HandshakeIncomplete`] while handshaking and
/// [`Error::NoPeerCertificate`] if the peer sent none.
pub fn peer_identity<D>(conn: &ConnectionCommon<D>) -> Result<PeerIdentity> {
    if conn.is_handshaking() {
        return Err(Error::HandshakeIncomplete);
    }
    let end_entity = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(Error::NoPeerCertificate)?;
    identity_from_certificate(end_entity)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn sanitise_strips_control_and_truncates() {
        assert_eq!(sanitise_for_log("dev\n1\x1b[0m"), "dev?1?[0m");
        let long = "a".repeat(1000);
        assert_eq!(sanitise_for_log(&long).len(), MAX_LOGGED_COMMON_NAME);
        assert_eq!(sanitise_for_log("é"), "?");
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }

    #[test]
    fn garbage_certificate_is_rejected() {
        for bad in [
            &b""[..],
            b"\x30\x03\x02\x01\x01",
            b"not a certificate at all",
        ] {
            let r = identity_from_certificate(&CertificateDer::from(bad));
            assert!(matches!(r, Err(Error::InvalidCertificate(_))), "{r:?}");
        }
    }
}
