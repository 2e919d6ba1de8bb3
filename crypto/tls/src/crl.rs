//! Which CRLs the cloud's verifier uses: one per device CA, the newest, checked at load time.
//!
//! # Policy (`specs/threat-model.md`, revocation)
//!
//! A CRL file may hold several CRLs — an operator who appends the new CRL to the old one gets
//! the oldest first. webpki's verifier uses the *first* CRL it finds for an issuer, so handing
//! it such a file could serve a revoked device. Before any CRL reaches the verifier,
//! [`effective_crls`]:
//!
//! 1. checks that each CRL is issued by a device CA (issuer name equal to a trusted device CA
//!    subject) and that its signature verifies with that CA's key; a CRL of another PKI, or a
//!    forged one, is refused ([`Error::CrlUntrustedIssuer`], [`Error::CrlBadSignature`]) — so a
//!    forged CRL with a large CRL number can never displace the real one;
//! 2. keeps, per issuer, the CRL with the **highest CRL number** (RFC 5280 §5.2.3: numbers are
//!    monotonically increasing), whatever the order and number of CRLs in the files. Identical
//!    copies are merged. If the CRLs of one issuer cannot be ordered — two different CRLs with
//!    the same number, a CRL without a CRL number, or scoped CRLs (issuing distribution point)
//!    — the cloud refuses to start ([`Error::CrlAmbiguous`]) rather than guess;
//! 3. applies the time policy to the CRL kept: a CRL whose `thisUpdate` is more than
//!    [`CRL_CLOCK_SKEW_SECS`] in the future is refused ([`Error::CrlNotYetValid`]: one of the
//!    clocks is wrong), and a CRL whose `nextUpdate` has passed is refused
//!    ([`Error::CrlExpired`]: revocations made since are unknown). While the cloud runs, the
//!    verifier enforces `nextUpdate` too: once it passes, every device is refused
//!    (`ExpiredRevocationList`) until the cloud is restarted with a fresh CRL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::oid_registry::{
    OID_X509_EXT_DELTA_CRL_INDICATOR, OID_X509_EXT_ISSUER_DISTRIBUTION_POINT,
};

use crate::limits::CRL_CLOCK_SKEW_SECS;
use crate::load::contain;
use crate::{Error, Result};

/// Longest CRL number accepted, in octets (RFC 5280 §5.2.3).
const MAX_CRL_NUMBER_OCTETS: usize = 20;

/// What the selection needs to know about one CRL.
#[derive(Debug, Clone)]
pub(crate) struct CrlInfo {
    pub(crate) issuer_raw: Vec<u8>,
    pub(crate) issuer: String,
    /// Big-endian, without leading zero octets; `None` if the CRL has no CRL number.
    pub(crate) number: Option<Vec<u8>>,
    pub(crate) this_update: i64,
    pub(crate) next_update: Option<i64>,
    pub(crate) scoped: bool,
    pub(crate) signature_ok: Vec<Vec<u8>>,
}

/// Parses one CRL strictly (no trailing bytes, no delta CRL) and reads what the selection
/// needs. `index` is the CRL's position in its file, from 1, for errors.
pub(crate) fn inspect(
    path: &Path,
    index: usize,
    crl: &CertificateRevocationListDer<'_>,
) -> Result<CrlInfo> {
    inspect_with(path, index, crl, &[])
}

/// As [`inspect`], and records the subjects of the candidate issuer certificates `cas` whose
/// key verifies the CRL's signature.
fn inspect_with(
    path: &Path,
    index: usize,
    crl: &CertificateRevocationListDer<'_>,
    cas: &[CertificateDer<'_>],
) -> Result<CrlInfo> {
    let invalid = |reason: String| Error::InvalidCrl {
        path: path.to_path_buf(),
        index,
        reason,
    };
    contain(path, "CRL", || -> Result<CrlInfo> {
        let (rest, parsed) =
            x509_parser::parse_x509_crl(crl.as_ref()).map_err(|e| invalid(e.to_string()))?;
        if !rest.is_empty() {
            return Err(invalid("trailing bytes after the CRL".into()));
        }
        let mut scoped = false;
        for ext in parsed.extensions() {
            if ext.oid == OID_X509_EXT_DELTA_CRL_INDICATOR {
                return Err(invalid("delta CRLs are not supported".into()));
            }
            if ext.oid == OID_X509_EXT_ISSUER_DISTRIBUTION_POINT {
                scoped = true;
            }
        }
        let number = match parsed.crl_number() {
            Some(n) => {
                let bytes = n.to_bytes_be();
                let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
                let bytes = bytes.get(first..).unwrap_or_default().to_vec();
                if bytes.len() > MAX_CRL_NUMBER_OCTETS {
                    return Err(invalid(format!(
                        "CRL number longer than {MAX_CRL_NUMBER_OCTETS} octets"
                    )));
                }
                Some(bytes)
            }
            None => None,
        };
        let mut signature_ok = Vec::new();
        for ca in cas {
            let Ok((_, ca)) = x509_parser::parse_x509_certificate(ca.as_ref()) else {
                continue;
            };
            if ca.subject().as_raw() == parsed.issuer().as_raw()
                && parsed.verify_signature(ca.public_key()).is_ok()
            {
                signature_ok.push(ca.subject().as_raw().to_vec());
            }
        }
        Ok(CrlInfo {
            issuer_raw: parsed.issuer().as_raw().to_vec(),
            issuer: parsed.issuer().to_string(),
            number,
            this_update: parsed.last_update().timestamp(),
            next_update: parsed.next_update().map(|t| t.timestamp()),
            scoped,
            signature_ok,
        })
    })?
}

fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("unix time {unix}"))
}

/// Orders CRL numbers (big-endian, no leading zeros): longer is larger, then bytewise.
fn number_key(n: &[u8]) -> (usize, &[u8]) {
    (n.len(), n)
}

/// The CRLs the verifier should use: for each device CA, the newest of its CRLs among
/// `crls`, after checking issuer, signature and dates (policy in the module documentation and
/// `specs/threat-model.md`).
///
/// `crls` pairs each CRL with the file it came from (only used in errors); `device_ca` are the
/// trusted device CA certificates; `now` is the time the dates are checked against. The
/// result holds at most one CRL per issuer, in a deterministic order (by issuer name), so
/// that the verifier's "first CRL of the issuer" is always the newest one.
///
/// # Errors
///
/// [`Error::InvalidCrl`], [`Error::CrlUntrustedIssuer`], [`Error::CrlBadSignature`],
/// [`Error::CrlAmbiguous`], [`Error::CrlNotYetValid`], [`Error::CrlExpired`],
/// [`Error::ParserPanic`].
pub fn effective_crls(
    crls: &[(PathBuf, CertificateRevocationListDer<'static>)],
    device_ca: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let now = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    type Entry<'a> = (&'a Path, CrlInfo, &'a CertificateRevocationListDer<'static>);
    let mut by_issuer: BTreeMap<Vec<u8>, Vec<Entry<'_>>> = BTreeMap::new();
    let mut index_in_file: BTreeMap<&Path, usize> = BTreeMap::new();
    for (path, der) in crls {
        let index = index_in_file.entry(path.as_path()).or_insert(0);
        *index += 1;
        let info = inspect_with(path, *index, der, device_ca)?;
        if info.signature_ok.is_empty() {
            let issuer_is_a_ca = device_ca.iter().any(|ca| {
                x509_parser::parse_x509_certificate(ca.as_ref())
                    .is_ok_and(|(_, ca)| ca.subject().as_raw() == info.issuer_raw.as_slice())
            });
            return Err(if issuer_is_a_ca {
                Error::CrlBadSignature {
                    path: path.clone(),
                    issuer: info.issuer,
                }
            } else {
                Error::CrlUntrustedIssuer {
                    path: path.clone(),
                    issuer: info.issuer,
                }
            });
        }
        by_issuer
            .entry(info.issuer_raw.clone())
            .or_default()
            .push((path.as_path(), info, der));
    }

    let mut out = Vec::with_capacity(by_issuer.len());
    for (_, mut group) in by_issuer {
        // Identical copies (the same CRL appended twice) are one CRL.
        let mut unique: Vec<Entry<'_>> = Vec::with_capacity(group.len());
        for entry in group.drain(..) {
            if !unique.iter().any(|u| u.2.as_ref() == entry.2.as_ref()) {
                unique.push(entry);
            }
        }
        let ambiguous = |a: &Entry<'_>, b: &Entry<'_>, reason: &'static str| Error::CrlAmbiguous {
            path: a.0.to_path_buf(),
            other: b.0.to_path_buf(),
            issuer: a.1.issuer.clone(),
            reason,
        };
        if let [first, second, ..] = unique.as_slice() {
            if let Some(e) = unique.iter().find(|e| e.1.number.is_none()) {
                let other = if std::ptr::eq(e, first) {
                    second
                } else {
                    first
                };
                return Err(ambiguous(e, other, "a CRL has no CRL number"));
            }
            if let Some(e) = unique.iter().find(|e| e.1.scoped) {
                let other = if std::ptr::eq(e, first) {
                    second
                } else {
                    first
                };
                return Err(ambiguous(
                    e,
                    other,
                    "scoped CRLs (issuing distribution point) cannot be combined",
                ));
            }
        }
        unique.sort_by(|a, b| {
            let ka = a.1.number.as_deref().map(number_key);
            let kb = b.1.number.as_deref().map(number_key);
            kb.cmp(&ka)
        });
        let Some(newest) = unique.first() else {
            continue;
        };
        if let Some(second) = unique.get(1) {
            if second.1.number == newest.1.number {
                return Err(ambiguous(
                    newest,
                    second,
                    "two different CRLs with the same CRL number",
                ));
            }
            tracing::info!(
                issuer = %newest.1.issuer,
                file = %newest.0.display(),
                ignored = unique.len() - 1,
                "several CRLs of one device CA: using the one with the highest CRL number"
            );
        }
        let (path, info, der) = newest;
        if info.this_update > now.saturating_add(CRL_CLOCK_SKEW_SECS) {
            return Err(Error::CrlNotYetValid {
                path: path.to_path_buf(),
                issuer: info.issuer.clone(),
                this_update: rfc3339(info.this_update),
            });
        }
        match info.next_update {
            Some(next) if next <= now => {
                return Err(Error::CrlExpired {
                    path: path.to_path_buf(),
                    issuer: info.issuer.clone(),
                    next_update: rfc3339(next),
                })
            }
            Some(_) => {}
            None => tracing::warn!(
                issuer = %info.issuer,
                file = %path.display(),
                "CRL has no nextUpdate: it never expires; ask the CA for CRLs with nextUpdate"
            ),
        }
        out.push((*der).clone());
    }
    Ok(out)
}
