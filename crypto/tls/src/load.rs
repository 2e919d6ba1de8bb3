//! Loading certificates, private keys and CRLs from PEM files.
//!
//! Every file is untrusted input: its size is checked from its metadata before it is read (and
//! the read itself is capped), every item is parsed down to DER structure at load time, every
//! error is typed and names the file and what to do, and a panic inside a parser of a
//! dependency (PEM, X.509, key loading) is contained and reported as [`Error::ParserPanic`].

use std::io::Read;
use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::limits::{MAX_CERTIFICATES_PER_FILE, MAX_CRLS_PER_FILE, MAX_PEM_FILE_BYTES};
use crate::{Error, Result};

/// Runs a parser of a dependency on untrusted bytes, turning a panic into
/// [`Error::ParserPanic`] naming `path`.
pub(crate) fn contain<T>(path: &Path, what: &'static str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| Error::ParserPanic {
        path: path.to_path_buf(),
        what,
    })
}

/// Reads a whole file, refusing non-regular files and files larger than
/// [`MAX_PEM_FILE_BYTES`] (from the metadata, before reading; the read is capped as well in
/// case the file grows meanwhile).
pub(crate) fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let too_large = || Error::FileTooLarge {
        path: path.to_path_buf(),
        limit: MAX_PEM_FILE_BYTES,
    };
    if meta.len() > MAX_PEM_FILE_BYTES {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // One byte more than the limit detects a file that grew since the metadata was read.
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(too_large());
    }
    Ok(buf)
}

fn pem_error(path: &Path, e: pem::Error) -> Error {
    Error::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Says what a file holds when it holds no PEM item of the kind expected.
fn diagnose(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return " (the file is empty)".into();
    }
    if bytes.iter().all(|b| *b == 0) {
        return " (the file holds only zero bytes, as a crash can leave it)".into();
    }
    if bytes.first() == Some(&0x30) {
        return " (it looks like binary DER; convert it to PEM, e.g. with `openssl x509 -inform der`)"
            .into();
    }
    let mut labels: Vec<String> = Vec::new();
    for line in bytes.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"-----BEGIN ") {
            if let Some(label) = rest.strip_suffix(b"-----") {
                let label = String::from_utf8_lossy(label).chars().take(40).collect();
                if !labels.contains(&label) {
                    labels.push(label);
                }
                if labels.len() == 3 {
                    break;
                }
            }
        }
    }
    if labels.is_empty() {
        " (not a PEM file)".into()
    } else {
        format!(
            " (it holds PEM sections of another kind: {})",
            labels.join(", ")
        )
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
    let out = contain(path, "PEM", || -> Result<Vec<T>> {
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
        Ok(out)
    })??;
    if out.is_empty() {
        return Err(Error::MissingPemItem {
            path: path.to_path_buf(),
            expected: what,
            hint: diagnose(bytes),
        });
    }
    Ok(out)
}

/// Parses the certificates (`BEGIN CERTIFICATE` sections) of PEM text read from `path`, in
/// order, and checks that each is a well-formed X.509 certificate with no trailing bytes.
///
/// `path` only names the source in errors. Other PEM sections are skipped.
///
/// # Errors
///
/// [`Error::Pem`] (damaged or truncated PEM), [`Error::MissingPemItem`] (no certificate: empty,
/// zero-filled, foreign file), [`Error::TooManyPemItems`] (more than
/// [`MAX_CERTIFICATES_PER_FILE`]), [`Error::BadCertificateFile`] (damaged DER),
/// [`Error::ParserPanic`].
pub fn parse_certificates(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> =
        parse_pem_items(path, bytes, "certificate", MAX_CERTIFICATES_PER_FILE)?;
    for (i, cert) in certs.iter().enumerate() {
        let parsed = contain(
            path,
            "certificate",
            || match x509_parser::parse_x509_certificate(cert.as_ref()) {
                Ok((&[], _)) => Ok(()),
                Ok(_) => Err("trailing bytes after the certificate".to_string()),
                Err(e) => Err(e.to_string()),
            },
        )?;
        parsed.map_err(|reason| Error::BadCertificateFile {
            path: path.to_path_buf(),
            index: i + 1,
            reason,
        })?;
    }
    Ok(certs)
}

/// Parses exactly one private key (PKCS#8, PKCS#1 or SEC1 PEM) from PEM text read from
/// `path`, and checks that the crypto provider can use it for signing.
///
/// # Errors
///
/// As [`parse_certificates`]; more than one key is [`Error::TooManyPemItems`]; a key the
/// provider cannot load is [`Error::BadPrivateKeyFile`].
pub fn parse_private_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>> {
    let mut keys: Vec<PrivateKeyDer<'static>> = parse_pem_items(path, bytes, "private key", 1)?;
    let key = keys.pop().ok_or_else(|| Error::MissingPemItem {
        path: path.to_path_buf(),
        expected: "private key",
        hint: diagnose(bytes),
    })?;
    let provider = crate::provider();
    contain(path, "private key", || {
        provider.key_provider.load_private_key(key.clone_key())
    })?
    .map_err(|e| Error::BadPrivateKeyFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(key)
}

/// Parses the CRLs (`BEGIN X509 CRL` sections) of PEM text read from `path`, in file order,
/// and checks that each is a well-formed, complete (not delta) X.509 CRL.
///
/// Which of several CRLs is used is decided later, by [`crate::effective_crls`].
///
/// # Errors
///
/// As [`parse_certificates`], with [`Error::InvalidCrl`] for damaged DER and more than
/// [`MAX_CRLS_PER_FILE`] CRLs refused.
pub fn parse_crls(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let crls: Vec<CertificateRevocationListDer<'static>> =
        parse_pem_items(path, bytes, "CRL", MAX_CRLS_PER_FILE)?;
    for (i, crl) in crls.iter().enumerate() {
        crate::crl::inspect(path, i + 1, crl)?;
    }
    Ok(crls)
}

/// Loads all certificates (`BEGIN CERTIFICATE` sections) of a PEM file, in file order.
///
/// For a chain, the end-entity certificate comes first.
///
/// # Errors
///
/// [`Error::FileNotFound`], [`Error::Io`], [`Error::NotAFile`], [`Error::FileTooLarge`]
/// (over [`MAX_PEM_FILE_BYTES`]) and the errors of [`parse_certificates`].
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read_limited(path)?;
    parse_certificates(path, &bytes)
}

/// Loads exactly one private key (PKCS#8, PKCS#1 or SEC1 PEM) from a file.
///
/// # Errors
///
/// The file errors of [`load_certificates`] and those of [`parse_private_key`].
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let bytes = read_limited(path)?;
    parse_private_key(path, &bytes)
}

/// Loads all CRLs (`BEGIN X509 CRL` sections) of a PEM file, in file order.
///
/// # Errors
///
/// The file errors of [`load_certificates`] and those of [`parse_crls`].
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = read_limited(path)?;
    parse_crls(path, &bytes)
}

/// PEM-encodes one DER item with the given section label.
#[cfg(any(test, feature = "dev-pki"))]
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
        assert!(diagnose(b"").contains("empty"));
        assert!(diagnose(&[0u8; 16]).contains("zero bytes"));
        assert!(diagnose(b"\x30\x82\x01").contains("DER"));
        assert!(
            diagnose(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .contains("PRIVATE KEY")
        );
        assert!(diagnose(b"hello").contains("not a PEM"));
        let r: Result<Vec<CertificateDer<'static>>> =
            parse_pem_items(p, b"-----BEGIN CERTIFICATE-----\nAAAA\n", "certificate", 4);
        assert!(matches!(r, Err(Error::Pem { .. })), "{r:?}");
    }
}
