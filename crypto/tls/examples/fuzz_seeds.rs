//! Writes the seed corpus of the `load_pem_crl` fuzz target (fuzz/corpus/load_pem_crl/) from a
//! fresh dev PKI: `cargo run -p tandem-tls --features dev-pki --example fuzz_seeds -- <dir>`.
//!
//! Each seed is one PEM text as the target sees it: device CA certificate(s) and CRLs in one
//! input (so that the CRL policy runs), a certificate chain, a private key.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tandem_tls::pki::DevPki;

fn pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                char::from(B64[((n >> (18 - 6 * i)) & 63) as usize])
            } else {
                '='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: fuzz_seeds <dir>")?);
    std::fs::create_dir_all(&dir)?;
    let mut pki = DevPki::generate(2)?;
    let ca = pem("CERTIFICATE", pki.device_ca_cert());
    let empty = pem("X509 CRL", pki.crl());
    pki.revoke_device("device-1")?;
    let revoking = pem("X509 CRL", pki.crl());
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let stale = pem(
        "X509 CRL",
        &pki.sign_crl_with(9, now - 10 * day, now - day)?,
    );
    let same_number = pem("X509 CRL", &pki.sign_crl_with(2, now - day, now + day)?);
    let other = DevPki::generate(0)?;
    let foreign = pem("X509 CRL", other.crl());
    let device = &pki.devices()[0];
    let seeds = [
        ("ca-crl-appended.pem", format!("{ca}{empty}{revoking}")),
        ("ca-crl-reversed.pem", format!("{revoking}{empty}{ca}")),
        ("ca-crl-duplicate.pem", format!("{ca}{revoking}{revoking}")),
        ("ca-crl-stale-newest.pem", format!("{ca}{revoking}{stale}")),
        (
            "ca-crl-ambiguous.pem",
            format!("{ca}{revoking}{same_number}"),
        ),
        ("ca-crl-foreign.pem", format!("{ca}{foreign}")),
        ("chain.pem", format!("{}{ca}", device.cert_pem())),
        ("key.pem", device.key_pem()),
        (
            "cloud-key-and-cert.pem",
            format!("{}{}", pki.cloud().key_pem(), pki.cloud().cert_pem()),
        ),
    ];
    for (name, text) in seeds {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}
