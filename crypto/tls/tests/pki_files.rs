//! The on-disk dev PKI (`tandem pki init|revoke`) and PEM loading of untrusted files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::Path;

use common::{expect_server_rejects, run, ServerOutcome};
use tandem_tls::pki::layout;
use tandem_tls::rustls::{self, CertificateError};
use tandem_tls::{
    client_config_from_files, load_certificates, load_crls, load_private_key, pki_init, pki_revoke,
    server_config, server_config_from_files, ClientFiles, Error, ServerCredentials, ServerFiles,
};

fn client(dir: &Path, device: &str) -> std::sync::Arc<rustls::ClientConfig> {
    client_config_from_files(&ClientFiles::from_pki_dir(dir, device).unwrap()).unwrap()
}

fn server(dir: &Path) -> std::sync::Arc<rustls::ServerConfig> {
    server_config_from_files(&ServerFiles::from_pki_dir(dir)).unwrap()
}

#[test]
fn init_writes_the_documented_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let summary = pki_init(&dir, 3).unwrap();
    for f in [
        layout::CLOUD_CA_CERT,
        layout::CLOUD_CA_KEY,
        layout::DEVICE_CA_CERT,
        layout::DEVICE_CA_KEY,
        layout::DEVICE_CA_CRL,
        layout::CLOUD_CERT,
        layout::CLOUD_KEY,
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert_eq!(summary.devices.len(), 3);
    assert_eq!(summary.cloud_names, ["localhost", "127.0.0.1"]);
    for (i, d) in summary.devices.iter().enumerate() {
        assert_eq!(d.name, format!("device-{}", i + 1));
        assert!(d.cert.is_file() && d.key.is_file());
        assert_eq!(d.identity.common_name(), Some(d.name.as_str()));
    }
    // The CRL starts empty but parses.
    assert_eq!(load_crls(&summary.crl).unwrap().len(), 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [
            dir.join(layout::CLOUD_CA_KEY),
            dir.join(layout::DEVICE_CA_KEY),
            dir.join(layout::CLOUD_KEY),
            summary.devices[0].key.clone(),
        ] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }
    // Refuses to overwrite.
    assert!(matches!(pki_init(&dir, 1), Err(Error::PkiExists { .. })));
}

#[test]
fn files_handshake_then_revoke_one_device_then_another() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let summary = pki_init(dir, 3).unwrap();

    let (s, _) = run(server(dir), client(dir, "device-1"), "127.0.0.1");
    let ServerOutcome::Completed { established, .. } = s else {
        panic!("{s:?}")
    };
    assert_eq!(established.unwrap().peer, summary.devices[0].identity);

    pki_revoke(dir, "device-1").unwrap();
    let err = expect_server_rejects(server(dir), client(dir, "device-1"), "localhost");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        ),
        "{err:?}"
    );
    let (s, _) = run(server(dir), client(dir, "device-2"), "localhost");
    assert!(matches!(s, ServerOutcome::Completed { .. }), "{s:?}");

    // A second revocation keeps the first; revoking again is harmless.
    pki_revoke(dir, "device-2").unwrap();
    pki_revoke(dir, "device-2").unwrap();
    for device in ["device-1", "device-2"] {
        let err = expect_server_rejects(server(dir), client(dir, device), "localhost");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::Revoked)
            ),
            "{device}: {err:?}"
        );
    }
    let (s, _) = run(server(dir), client(dir, "device-3"), "localhost");
    assert!(matches!(s, ServerOutcome::Completed { .. }), "{s:?}");
    assert!(!dir.join("device-ca.crl.tmp").exists());
}

#[test]
fn revoke_errors_are_typed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki_init(dir, 1).unwrap();
    assert!(matches!(
        pki_revoke(dir, "device-7"),
        Err(Error::UnknownDevice { .. })
    ));
    for bad in ["../cloud", "", "a/b", "device-1.crt"] {
        assert!(
            matches!(pki_revoke(dir, bad), Err(Error::InvalidDeviceName { .. })),
            "{bad}"
        );
    }
    // A certificate from another PKI dropped into devices/ is refused, not revoked.
    let other = tempfile::tempdir().unwrap();
    pki_init(other.path(), 1).unwrap();
    fs::copy(
        layout::device_cert(other.path(), "device-1"),
        layout::device_cert(dir, "stranger"),
    )
    .unwrap();
    assert!(matches!(
        pki_revoke(dir, "stranger"),
        Err(Error::InvalidCertificate(_))
    ));
    // A missing CRL is an error (starting an empty one would un-revoke earlier devices).
    let crl = dir.join(layout::DEVICE_CA_CRL);
    let saved = fs::read(&crl).unwrap();
    fs::remove_file(&crl).unwrap();
    assert!(matches!(
        pki_revoke(dir, "device-1"),
        Err(Error::FileNotFound { .. })
    ));
    fs::write(&crl, saved).unwrap();
    // A corrupted CRL is reported, not overwritten.
    fs::write(dir.join(layout::DEVICE_CA_CRL), b"garbage").unwrap();
    assert!(matches!(
        pki_revoke(dir, "device-1"),
        Err(Error::MissingPemItem { .. })
    ));
    // Missing CA key.
    fs::remove_file(dir.join(layout::DEVICE_CA_KEY)).unwrap();
    assert!(matches!(
        pki_revoke(dir, "device-1"),
        Err(Error::FileNotFound { .. })
    ));
}

#[test]
fn loaders_return_typed_errors_on_untrusted_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki_init(dir, 1).unwrap();
    let missing = dir.join("nope.pem");
    assert!(matches!(
        load_certificates(&missing),
        Err(Error::FileNotFound { .. })
    ));
    assert!(matches!(
        load_private_key(&missing),
        Err(Error::FileNotFound { .. })
    ));

    let garbage = dir.join("garbage.pem");
    fs::write(&garbage, b"\x00\xffnot pem at all").unwrap();
    assert!(matches!(
        load_certificates(&garbage),
        Err(Error::MissingPemItem { .. })
    ));
    let broken = dir.join("broken.pem");
    fs::write(
        &broken,
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    assert!(
        matches!(load_certificates(&broken), Err(Error::Pem { .. })),
        "{:?}",
        load_certificates(&broken)
    );
    let bad_b64 = dir.join("b64.pem");
    fs::write(
        &bad_b64,
        b"-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(matches!(
        load_certificates(&bad_b64),
        Err(Error::Pem { .. })
    ));

    // A key file is not a certificate file and vice versa.
    let cert = dir.join(layout::CLOUD_CERT);
    let key = dir.join(layout::CLOUD_KEY);
    assert!(matches!(
        load_certificates(&key),
        Err(Error::MissingPemItem { .. })
    ));
    assert!(matches!(
        load_private_key(&cert),
        Err(Error::MissingPemItem { .. })
    ));
    // Two keys in one key file are refused.
    let two_keys = dir.join("two.key");
    let k = fs::read_to_string(&key).unwrap();
    fs::write(&two_keys, format!("{k}{k}")).unwrap();
    assert!(matches!(
        load_private_key(&two_keys),
        Err(Error::TooManyPemItems { .. })
    ));

    // Oversized file.
    let big = dir.join("big.pem");
    let f = fs::File::create(&big).unwrap();
    f.set_len(tandem_tls::limits::MAX_PEM_FILE_BYTES + 1)
        .unwrap();
    assert!(matches!(
        load_certificates(&big),
        Err(Error::FileTooLarge { .. })
    ));

    // Certificate bytes that are PEM-valid but not a certificate: the configs refuse them.
    let junk_cert = dir.join("junk.crt");
    fs::write(
        &junk_cert,
        b"-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let mut files = ServerFiles::from_pki_dir(dir);
    files.device_ca = junk_cert.clone();
    assert!(server_config_from_files(&files).is_err());
    let mut files = ClientFiles::from_pki_dir(dir, "device-1").unwrap();
    files.cloud_ca = junk_cert;
    assert!(client_config_from_files(&files).is_err());

    // A device key that does not match the certificate.
    let mut files = ClientFiles::from_pki_dir(dir, "device-1").unwrap();
    files.key = key.clone();
    assert!(matches!(
        client_config_from_files(&files),
        Err(Error::Tls(_))
    ));
    let mut files = ServerFiles::from_pki_dir(dir);
    files.key = layout::device_key(dir, "device-1");
    assert!(matches!(
        server_config_from_files(&files),
        Err(Error::Tls(_))
    ));

    // No trust anchor at all.
    let creds = ServerFiles::from_pki_dir(dir).load().unwrap();
    let r = server_config(ServerCredentials {
        device_ca: vec![],
        crls: vec![],
        ..ServerFiles::from_pki_dir(dir).load().unwrap()
    });
    assert!(matches!(r, Err(Error::Verifier(_))), "{r:?}");
    // ... and a CRL whose issuer is then not a trusted device CA.
    let r = server_config(ServerCredentials {
        device_ca: vec![],
        ..creds
    });
    assert!(matches!(r, Err(Error::CrlUntrustedIssuer { .. })), "{r:?}");

    // A CRL file holding junk DER.
    let junk_crl = dir.join("junk.crl");
    fs::write(
        &junk_crl,
        b"-----BEGIN X509 CRL-----\nAAECAwQF\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let mut files = ServerFiles::from_pki_dir(dir);
    files.crls = vec![junk_crl.clone()];
    let r = server_config_from_files(&files);
    match r {
        Err(Error::InvalidCrl { path, index, .. }) => assert_eq!((path, index), (junk_crl, 1)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ClientFiles::from_pki_dir(dir, "../x"),
        Err(Error::InvalidDeviceName { .. })
    ));
}
