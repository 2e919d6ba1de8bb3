//! Real mutual-TLS handshakes over loopback TCP: the happy path and the rejection matrix.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{expect_server_rejects, run, ClientOutcome, ServerOutcome, PING};
use tandem_tls::pki::{DevPki, DeviceCertProfile, IssuedCert};
use tandem_tls::rustls::{self, CertificateError, ClientConfig, ServerConfig};
use tandem_tls::{
    client_config, provider, server_config, ClientCredentials, ServerCredentials, ALPN_TANDEM_V1,
};

fn server_for(pki: &DevPki) -> Arc<ServerConfig> {
    server_config(pki.server_credentials()).unwrap()
}

fn client_for(pki: &DevPki, cert: &IssuedCert) -> Arc<ClientConfig> {
    client_config(pki.client_credentials_for(cert)).unwrap()
}

fn assert_cert_error(err: &rustls::Error, pred: impl Fn(&CertificateError) -> bool) {
    match err {
        rustls::Error::InvalidCertificate(ce) if pred(ce) => {}
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn happy_path_same_binding_and_expected_identity() {
    let pki = DevPki::generate(2).unwrap();
    let device = &pki.devices()[0];
    for name in ["localhost", "127.0.0.1"] {
        let (s, c) = run(server_for(&pki), client_for(&pki, device), name);
        let ServerOutcome::Completed { established, app } = s else {
            panic!("server failed: {s:?}")
        };
        let server_side = established.unwrap();
        assert_eq!(app, PING);
        let ClientOutcome::Completed { established, pong } = c else {
            panic!("client failed: {c:?}")
        };
        let client_side = established.unwrap();
        assert!(pong);
        // TDM-BIND-1: both ends derive the same 32-byte binding.
        assert_eq!(server_side.channel_binding, client_side.channel_binding);
        assert_ne!(server_side.channel_binding, [0u8; 32]);
        // The cloud sees exactly the device's identity; the device sees the cloud's.
        assert_eq!(server_side.peer, device.identity().unwrap());
        assert_eq!(server_side.peer.common_name(), Some("device-1"));
        assert_eq!(client_side.peer, pki.cloud().identity().unwrap());
    }
}

#[test]
fn each_connection_has_its_own_binding_and_devices_their_own_identity() {
    let pki = DevPki::generate(2).unwrap();
    let mut bindings = Vec::new();
    let mut ids = Vec::new();
    for device in pki.devices().iter().chain(pki.devices().iter()) {
        let (s, _) = run(server_for(&pki), client_for(&pki, device), "localhost");
        let ServerOutcome::Completed { established, .. } = s else {
            panic!("{s:?}")
        };
        let e = established.unwrap();
        bindings.push(e.channel_binding);
        ids.push(e.peer.id());
    }
    bindings.sort();
    bindings.dedup();
    assert_eq!(
        bindings.len(),
        4,
        "channel bindings must differ per connection"
    );
    assert_eq!(ids[0], ids[2]);
    assert_eq!(ids[1], ids[3]);
    assert_ne!(ids[0], ids[1]);
}

#[test]
fn rejects_missing_client_certificate() {
    let pki = DevPki::generate(1).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.cloud_ca_cert().clone()).unwrap();
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN_TANDEM_V1.to_vec()];
    let err = expect_server_rejects(server_for(&pki), Arc::new(client), "localhost");
    assert_eq!(err, rustls::Error::NoCertificatesPresented);
}

#[test]
fn rejects_certificate_from_untrusted_ca() {
    let pki = DevPki::generate(1).unwrap();
    let other = DevPki::generate(1).unwrap();
    let err = expect_server_rejects(
        server_for(&pki),
        client_for(&pki, &other.devices()[0]),
        "localhost",
    );
    assert_cert_error(&err, |e| matches!(e, CertificateError::UnknownIssuer));
}

#[test]
fn rejects_a_cloud_certificate_used_as_a_device_certificate() {
    // Signed by the cloud CA, which the cloud does not trust for clients.
    let pki = DevPki::generate(1).unwrap();
    let err = expect_server_rejects(server_for(&pki), client_for(&pki, pki.cloud()), "localhost");
    // webpki checks the usage first; either reason is a refusal.
    assert_cert_error(&err, |e| {
        matches!(
            e,
            CertificateError::UnknownIssuer
                | CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. }
        )
    });
}

#[test]
fn rejects_expired_certificate() {
    let pki = DevPki::generate(0).unwrap();
    let old = pki.issue_device("old", DeviceCertProfile::Expired).unwrap();
    let err = expect_server_rejects(server_for(&pki), client_for(&pki, &old), "localhost");
    assert_cert_error(&err, |e| {
        matches!(
            e,
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        )
    });
}

#[test]
fn rejects_not_yet_valid_certificate() {
    let pki = DevPki::generate(0).unwrap();
    let early = pki
        .issue_device("early", DeviceCertProfile::NotYetValid)
        .unwrap();
    let err = expect_server_rejects(server_for(&pki), client_for(&pki, &early), "localhost");
    assert_cert_error(&err, |e| {
        matches!(
            e,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
        )
    });
}

#[test]
fn rejects_revoked_certificate_and_keeps_others() {
    let mut pki = DevPki::generate(2).unwrap();
    pki.revoke_device("device-1").unwrap();
    let err = expect_server_rejects(
        server_for(&pki),
        client_for(&pki, &pki.devices()[0]),
        "localhost",
    );
    assert_cert_error(&err, |e| matches!(e, CertificateError::Revoked));
    // device-2 is unaffected by the new CRL.
    let (s, _) = run(
        server_for(&pki),
        client_for(&pki, &pki.devices()[1]),
        "localhost",
    );
    assert!(matches!(s, ServerOutcome::Completed { .. }), "{s:?}");
}

#[test]
fn rejects_wrong_key_usage() {
    let pki = DevPki::generate(0).unwrap();
    let server_only = pki
        .issue_device("srv", DeviceCertProfile::ServerAuthOnly)
        .unwrap();
    let err = expect_server_rejects(
        server_for(&pki),
        client_for(&pki, &server_only),
        "localhost",
    );
    assert_cert_error(&err, |e| {
        matches!(
            e,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
        )
    });
}

#[test]
fn refuses_to_start_with_a_crl_of_another_issuer() {
    // A CRL of another PKI is an operator mistake: refused when the configuration is built.
    let pki = DevPki::generate(1).unwrap();
    let other = DevPki::generate(0).unwrap();
    let mut creds = pki.server_credentials();
    creds.crls = vec![other.crl().clone()];
    let r = server_config(creds);
    assert!(
        matches!(r, Err(tandem_tls::Error::CrlUntrustedIssuer { .. })),
        "{r:?}"
    );
}

#[test]
fn rejects_device_of_a_ca_without_crl_as_unknown_status() {
    // Two device CAs trusted, a CRL for only one of them: a device of the other has an unknown
    // revocation status and is refused; a device of the first is served.
    let pki = DevPki::generate(1).unwrap();
    let other = DevPki::generate(1).unwrap();
    let mut creds = pki.server_credentials();
    creds.device_ca.push(other.device_ca_cert().clone());
    let server = server_config(creds).unwrap();
    let foreign = ClientCredentials {
        cloud_ca: vec![pki.cloud_ca_cert().clone()],
        ..other.client_credentials("device-1").unwrap()
    };
    let err = expect_server_rejects(
        Arc::clone(&server),
        client_config(foreign).unwrap(),
        "localhost",
    );
    assert_cert_error(&err, |e| {
        matches!(e, CertificateError::UnknownRevocationStatus)
    });
    let (s, _) = run(server, client_for(&pki, &pki.devices()[0]), "localhost");
    assert!(matches!(s, ServerOutcome::Completed { .. }), "{s:?}");
}

fn server_with_cloud_cert(pki: &DevPki, cloud: &IssuedCert) -> Arc<ServerConfig> {
    server_config(ServerCredentials {
        cert_chain: vec![cloud.cert().clone()],
        key: cloud.key(),
        device_ca: vec![pki.device_ca_cert().clone()],
        crls: vec![pki.crl().clone()],
    })
    .unwrap()
}

fn expect_device_refuses(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> rustls::Error {
    let (s, c) = run(server, client, name);
    let ClientOutcome::HandshakeFailed(err) = c else {
        panic!("device accepted the cloud: {c:?}")
    };
    // The cloud never completes the handshake either, so it reads no application byte.
    assert!(matches!(s, ServerOutcome::HandshakeFailed(_)), "{s:?}");
    err
}

#[test]
fn device_refuses_cloud_certificate_for_wrong_name() {
    let pki = DevPki::generate(1).unwrap();
    let wrong = pki.issue_cloud(&["cloud.example"]).unwrap();
    let err = expect_device_refuses(
        server_with_cloud_cert(&pki, &wrong),
        client_for(&pki, &pki.devices()[0]),
        "localhost",
    );
    assert_cert_error(&err, |e| {
        matches!(
            e,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    });
    // And the genuine cloud certificate does not cover names it was not issued for.
    let err = expect_device_refuses(
        server_for(&pki),
        client_for(&pki, &pki.devices()[0]),
        "cloud.example",
    );
    assert_cert_error(&err, |e| {
        matches!(
            e,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    });
}

#[test]
fn device_refuses_cloud_from_untrusted_ca() {
    let pki = DevPki::generate(1).unwrap();
    let rogue = DevPki::generate(0).unwrap();
    let err = expect_device_refuses(
        server_with_cloud_cert(&pki, rogue.cloud()),
        client_for(&pki, &pki.devices()[0]),
        "localhost",
    );
    assert_cert_error(&err, |e| matches!(e, CertificateError::UnknownIssuer));
}

#[test]
fn device_refuses_a_device_certificate_posing_as_the_cloud() {
    // A device certificate (device CA, clientAuth) served as the cloud: not trusted by devices.
    let pki = DevPki::generate(2).unwrap();
    let err = expect_device_refuses(
        server_with_cloud_cert(&pki, &pki.devices()[1]),
        client_for(&pki, &pki.devices()[0]),
        "localhost",
    );
    assert_cert_error(&err, |e| {
        matches!(
            e,
            CertificateError::UnknownIssuer
                | CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. }
        )
    });
}

#[test]
fn rejects_client_without_tandem_alpn() {
    // TDM-ALPN-1: no ALPN at all, and a different ALPN, are both refused in the handshake.
    let pki = DevPki::generate(1).unwrap();
    for alpn in [vec![], vec![b"h2".to_vec()]] {
        let creds = pki.client_credentials("device-1").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(creds.cloud_ca[0].clone()).unwrap();
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(creds.cert_chain, creds.key)
            .unwrap();
        client.alpn_protocols = alpn;
        let (s, c) = run(server_for(&pki), Arc::new(client), "localhost");
        assert!(matches!(s, ServerOutcome::HandshakeFailed(_)), "{s:?}");
        assert!(matches!(c, ClientOutcome::HandshakeFailed(_)), "{c:?}");
    }
}

#[test]
fn device_detects_server_without_alpn() {
    // A server that does not negotiate ALPN completes the handshake, but `established` on the
    // device refuses to go on (TDM-ALPN-1).
    let pki = DevPki::generate(1).unwrap();
    let creds = pki.server_credentials();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(creds.device_ca[0].clone()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
    let server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.cert_chain, creds.key)
        .unwrap();
    let (_, c) = run(
        Arc::new(server),
        client_for(&pki, &pki.devices()[0]),
        "localhost",
    );
    let ClientOutcome::Completed { established, .. } = c else {
        panic!("{c:?}")
    };
    assert!(matches!(established, Err(tandem_tls::Error::AlpnMismatch)));
}
