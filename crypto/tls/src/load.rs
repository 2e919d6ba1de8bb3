//! Loading certificates, private keys and CRLs from PEM files (untrusted input: size-limited,
//! typed errors, no panics).

use std::io::Read;
use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::limits::{MAX_CERTIFICATES_PER_FILE, MAX_CRLS_PER_FILE, MAX_PEM_FILE_BYTES};
use crate::{Error, Result};

/// Reads a whole file, refusing files larger than [`MAX_PEM_FILE_BYTES`].
pub(crate) fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::new();
    // Read one byte more than the limit to detect oversize files without trusting metadata.
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(Error::FileTooLarge {
            path: path.to_path_buf(),
            limit: MAX_PEM_FILE_BYTES,
        });
    }
    Ok(buf)
}

fn pem_error(path: &Path, e: pem::Error) -> Error {
    Error::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Parses every PEM item of type `T` in `bytes`, at most `limit` of them; other PEM sections
/// are skipped. Errors name `path`.
pub(crate) fn parse_pem_items<T: PemObject>(
    path: &Path,
    bytes: &[u8],
    what: &'static str,
    limit: usize,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for item in T::pem_slice_iter(bytes) {
        let item = item.map_err(|e| pem_error(path, e))?;
        if out.len() == limit {
            return Err(Error::TooManyPemItems {
                path: path.to_path_buf(),
                what,
                limit,
            });
        }
        out.push(item);
    }
    if out.is_empty() {
        return Err(Error::MissingPemItem {
            path: path.to_path_buf(),
            expected: what,
        });
    }
    Ok(out)
}

/// Loads all certificates (`BEGIN CERTIFICATE` sections) of a PEM file, in file order.
///
/// For a chain, the end-entity certificate comes first. Fails with a typed error if the file
/// is missing, too large, not PEM, holds no certificate or more than
/// [`MAX_CERTIFICATES_PER_FILE`].
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read_limited(path)?;
    parse_pem_items(path, &bytes, "certificate", MAX_CERTIFICATES_PER_FILE)
}

/// Loads exactly one private key (PKCS#8, PKCS#1 or SEC1 PEM) from a file.
///
/// Fails if the file holds no key or more than one.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let bytes = read_limited(path)?;
    parse_private_key(path, &bytes)
}

pub(crate) fn parse_private_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>> {
    let mut keys: Vec<PrivateKeyDer<'static>> = parse_pem_items(path, bytes, "private key", 1)?;
    keys.pop().ok_or_else(|| Error::MissingPemItem {
        path: path.to_path_buf(),
        expected: "private key",
    })
}

/// Loads all CRLs (`BEGIN X509 CRL` sections) of a PEM file.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = read_limited(path)?;
    parse_pem_items(path, &bytes, "CRL", MAX_CRLS_PER_FILE)
}

/// PEM-encodes one DER item with the given section label.
pub(crate) fn to_pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let idx = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for (i, v) in idx.iter().enumerate() {
            if i <= chunk.len() {
                b64.push(char::from(B64[*v as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn pem_roundtrip_all_lengths() {
        for len in 0..200usize {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let pem = to_pem("CERTIFICATE", &der);
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(pem.as_bytes())
                    .collect::<std::result::Result<_, _>>()
                    .unwrap();
            if len == 0 {
                // An empty body is still a section; the parser yields an empty item.
                assert!(certs.len() <= 1);
            } else {
                assert_eq!(certs.len(), 1);
                assert_eq!(certs[0].as_ref(), der.as_slice());
            }
        }
    }

    #[test]
    fn garbage_is_a_typed_error() {
        let p = Path::new("x.pem");
        let r: Result<Vec<CertificateDer<'static>>> = parse_pem_items(
            p,
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            "certificate",
            4,
        );
        assert!(matches!(r, Err(Error::Pem { .. })), "{r:?}");
        let r: Result<Vec<CertificateDer<'static>>> =
            parse_pem_items(p, b"hello world", "certificate", 4);
        assert!(matches!(r, Err(Error::MissingPemItem { .. })), "{r:?}");
        let r: Result<Vec<CertificateDer<'static>>> =
            parse_pem_items(p, b"-----BEGIN CERTIFICATE-----\nAAAA\n", "certificate", 4);
        assert!(matches!(r, Err(Error::Pem { .. })), "{r:?}");
    }
}
