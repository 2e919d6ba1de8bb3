//! Revocation must hold whatever the order and number of CRLs (issue 12, item 1): the newest
//! CRL of the device CA by CRL number is used; ambiguous, stale and future CRLs are refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{expect_server_rejects, run, ServerOutcome};
use tandem_tls::pki::{layout, DevPki};
use tandem_tls::pki_types::CertificateRevocationListDer;
use tandem_tls::rustls::{self, CertificateError};
use tandem_tls::{
    client_config, client_config_from_files, effective_crls, load_crls, pki_init, pki_revoke,
    server_config, server_config_from_files, ClientFiles, Error, ServerFiles,
};

fn client(dir: &Path, device: &str) -> Arc<rustls::ClientConfig> {
    client_config_from_files(&ClientFiles::from_pki_dir(dir, device).unwrap()).unwrap()
}

fn assert_revoked(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) {
    let err = expect_server_rejects(server, client, "localhost");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ),
        "{err:?}"
    );
}

fn assert_served(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) {
    let (s, _) = run(server, client, "localhost");
    assert!(matches!(s, ServerOutcome::Completed { .. }), "{s:?}");
}

/// `pki init`, then one `pki revoke` per name; returns the PEM text of the CRL file after
/// init and after each revocation.
fn crl_history(dir: &Path, devices: usize, revoke: &[&str]) -> Vec<String> {
    pki_init(dir, devices).unwrap();
    let crl = dir.join(layout::DEVICE_CA_CRL);
    let mut history = vec![fs::read_to_string(&crl).unwrap()];
    for device in revoke {
        pki_revoke(dir, device).unwrap();
        history.push(fs::read_to_string(&crl).unwrap());
    }
    history
}

/// The one CRL of `pem`, read back through `load_crls` from a file of its own: tests run on
/// parallel threads, and one fixed path shared by two of them let one test read (or delete)
/// the other's CRL.
fn der_of(pem: &str) -> CertificateRevocationListDer<'static> {
    let f = tempfile::NamedTempFile::new().unwrap();
    fs::write(f.path(), pem).unwrap();
    let mut crls = load_crls(f.path()).unwrap();
    assert_eq!(crls.len(), 1);
    crls.pop().unwrap()
}

#[test]
fn appended_crl_file_refuses_the_revoked_device_in_both_orders() {
    // The exact reproduction of issue 12 item 1.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let history = crl_history(dir, 2, &["device-1"]);
    let (empty, revoking) = (&history[0], &history[1]);
    let crl_path = dir.join(layout::DEVICE_CA_CRL);
    for (name, contents) in [
        ("old then new (appended)", format!("{empty}{revoking}")),
        ("new then old", format!("{revoking}{empty}")),
    ] {
        fs::write(&crl_path, &contents).unwrap();
        // Loader level: the two CRLs are read, one (the newest) is handed to the verifier.
        assert_eq!(load_crls(&crl_path).unwrap().len(), 2, "{name}");
        let creds = ServerFiles::from_pki_dir(dir).load().unwrap();
        assert_eq!(creds.crls, vec![der_of(revoking)], "{name}");
        // Real handshakes: device-1 refused as revoked, device-2 served.
        let server = server_config_from_files(&ServerFiles::from_pki_dir(dir)).unwrap();
        assert_revoked(Arc::clone(&server), client(dir, "device-1"));
        assert_served(server, client(dir, "device-2"));
    }
}

/// A small deterministic shuffle (xorshift), so that the orders tried are reproducible.
fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut v = items.to_vec();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

#[test]
fn many_crls_in_any_order_and_across_files_use_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let history = crl_history(dir, 4, &["device-1", "device-2", "device-3"]);
    let newest = der_of(history.last().unwrap());
    let crl_path = dir.join(layout::DEVICE_CA_CRL);

    // Every permutation of the four CRLs at the loader level, plus duplicates.
    let mut orders: Vec<Vec<usize>> = Vec::new();
    for a in 0..4 {
        for b in 0..4 {
            for c in 0..4 {
                for d in 0..4 {
                    let o = vec![a, b, c, d];
                    let mut s = o.clone();
                    s.sort_unstable();
                    if s == [0, 1, 2, 3] {
                        orders.push(o);
                    }
                }
            }
        }
    }
    assert_eq!(orders.len(), 24);
    orders.push(vec![0, 3, 1, 3, 2, 0, 3]);
    for order in &orders {
        let contents: String = order.iter().map(|i| history[*i].as_str()).collect();
        fs::write(&crl_path, contents).unwrap();
        let creds = ServerFiles::from_pki_dir(dir).load().unwrap();
        assert_eq!(creds.crls, vec![newest.clone()], "order {order:?}");
    }

    // Real handshakes for a few orders, with the CRLs split over two files.
    let second = dir.join("more.crl");
    for order in [vec![0, 1, 2, 3], vec![3, 2, 1, 0], vec![1, 3, 0, 2]] {
        let (a, b) = order.split_at(2);
        let text = |idx: &[usize]| -> String { idx.iter().map(|i| history[*i].as_str()).collect() };
        fs::write(&crl_path, text(a)).unwrap();
        fs::write(&second, text(b)).unwrap();
        let mut files = ServerFiles::from_pki_dir(dir);
        files.crls.push(second.clone());
        let server = server_config_from_files(&files).unwrap();
        for revoked in ["device-1", "device-2", "device-3"] {
            assert_revoked(Arc::clone(&server), client(dir, revoked));
        }
        assert_served(server, client(dir, "device-4"));
    }
}

#[test]
fn sixty_four_crls_with_the_revoking_one_anywhere() {
    let mut pki = DevPki::generate(2).unwrap();
    let now = SystemTime::now();
    let next = now + Duration::from_secs(86_400);
    // 63 CRLs from before the revocation, numbered 1..=63.
    let mut crls: Vec<_> = (1..=63)
        .map(|n| pki.sign_crl_with(n, now, next).unwrap())
        .collect();
    pki.revoke_device("device-1").unwrap();
    let revoking = pki.sign_crl_with(64, now, next).unwrap();
    for position in [0, 17, 40, 63] {
        let mut all = shuffled(&crls, position as u64 + 7);
        all.insert(position, revoking.clone());
        assert_eq!(all.len(), tandem_tls::limits::MAX_CRLS_PER_FILE);
        let mut creds = pki.server_credentials();
        creds.crls = all;
        let server = server_config(creds).unwrap();
        assert_revoked(
            Arc::clone(&server),
            client_config(pki.client_credentials("device-1").unwrap()).unwrap(),
        );
        assert_served(
            server,
            client_config(pki.client_credentials("device-2").unwrap()).unwrap(),
        );
    }
    // Loader level: the selection keeps exactly the highest number.
    crls.push(revoking.clone());
    let labelled: Vec<(PathBuf, _)> = shuffled(&crls, 99)
        .into_iter()
        .map(|c| (PathBuf::from("x.crl"), c))
        .collect();
    let kept = effective_crls(&labelled, &[pki.device_ca_cert().clone()], now).unwrap();
    assert_eq!(kept, vec![revoking]);
}

#[test]
fn equal_crl_numbers_with_different_contents_refuse_to_start() {
    let mut pki = DevPki::generate(1).unwrap();
    let now = SystemTime::now();
    let next = now + Duration::from_secs(86_400);
    let before = pki.sign_crl_with(7, now, next).unwrap();
    pki.revoke_device("device-1").unwrap();
    let after = pki.sign_crl_with(7, now, next).unwrap();
    let mut creds = pki.server_credentials();
    creds.crls = vec![before.clone(), after.clone()];
    let r = server_config(creds);
    assert!(matches!(r, Err(Error::CrlAmbiguous { .. })), "{r:?}");
    // The very same CRL twice is not ambiguous.
    let mut creds = pki.server_credentials();
    creds.crls = vec![after.clone(), after.clone()];
    assert!(server_config(creds).is_ok());
}

#[test]
fn stale_and_future_crls_have_a_stated_policy() {
    let pki = DevPki::generate(1).unwrap();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let ca = [pki.device_ca_cert().clone()];
    let one = |crl| vec![(PathBuf::from("device-ca.crl"), crl)];

    // nextUpdate passed: refused, naming the file.
    let stale = pki.sign_crl_with(2, now - 10 * day, now - day).unwrap();
    let r = effective_crls(&one(stale.clone()), &ca, now);
    assert!(matches!(r, Err(Error::CrlExpired { .. })), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("device-ca.crl"));
    // thisUpdate in the future beyond the clock-skew allowance: refused.
    let future = pki
        .sign_crl_with(3, now + 3600 * Duration::from_secs(1), now + day)
        .unwrap();
    let r = effective_crls(&one(future), &ca, now);
    assert!(matches!(r, Err(Error::CrlNotYetValid { .. })), "{r:?}");
    // Within the allowance: accepted.
    let skewed = pki
        .sign_crl_with(4, now + Duration::from_secs(60), now + day)
        .unwrap();
    assert!(effective_crls(&one(skewed), &ca, now).is_ok());
    // A stale CRL that is not the newest does not matter.
    let fresh = pki.sign_crl_with(5, now, now + day).unwrap();
    let both = vec![
        (PathBuf::from("a"), stale.clone()),
        (PathBuf::from("b"), fresh.clone()),
    ];
    assert_eq!(effective_crls(&both, &ca, now).unwrap(), vec![fresh]);

    // The same through the files a cloud loads.
    let tmp = tempfile::tempdir().unwrap();
    pki.write(tmp.path()).unwrap();
    let crl_path = tmp.path().join(layout::DEVICE_CA_CRL);
    fs::write(&crl_path, pem_crl(&stale)).unwrap();
    let r = ServerFiles::from_pki_dir(tmp.path()).load();
    match r {
        Err(Error::CrlExpired { path, .. }) => assert_eq!(path, crl_path),
        other => panic!("{other:?}"),
    }
}

/// The CRL's nextUpdate is written in whole seconds (rcgen drops the fraction) and checked
/// against whole seconds, so a CRL signed at `now` "valid for W s" is valid for between W − 1
/// and W seconds. With W = 2 the first handshake had to finish within about one second of
/// `now`, which a loaded 2-core CI machine (tests on parallel threads) does not promise; with
/// W = 6 it has five. Then the test sleeps until nextUpdate has certainly passed.
#[test]
fn a_crl_expiring_while_the_cloud_runs_refuses_every_device() {
    const VALID: Duration = Duration::from_secs(6);
    let pki = DevPki::generate(1).unwrap();
    let now = SystemTime::now();
    let next_update = now + VALID;
    let mut creds = pki.server_credentials();
    creds.crls = vec![pki
        .sign_crl_with(2, now - Duration::from_secs(60), next_update)
        .unwrap()];
    let server = server_config(creds).unwrap();
    let device = || client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    assert_served(Arc::clone(&server), device());
    // Past nextUpdate by more than the one-second granularity of both clocks.
    let expired = next_update + Duration::from_millis(1100);
    if let Ok(left) = expired.duration_since(SystemTime::now()) {
        std::thread::sleep(left);
    }
    let err = expect_server_rejects(server, device(), "localhost");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredRevocationList)
                | rustls::Error::InvalidCertificate(
                    CertificateError::ExpiredRevocationListContext { .. }
                )
        ),
        "{err:?}"
    );
}

/// PEM-encodes a CRL (standard base64, 64-character lines).
fn pem_crl(der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
        lines.join("\n")
    )
}
