//! End-to-end over real mutual TLS on loopback: cloud + device runtimes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::{Device, DeviceError, DeviceOptions, Protection};
use tandem_he::OutputMode;
use tandem_model::{Bundle, TestSet};
use tandem_protocol::ErrorCode;
use tandem_tls::{client_config, server_config, ClientCredentials, DevPki, DeviceCertProfile};

use common::{repo, vk};

fn models() -> Vec<PathBuf> {
    vec![
        repo().join("models/digits"),
        repo().join("models/breast_cancer"),
    ]
}

async fn start(pki: &DevPki, store: &Path, addr: SocketAddr, drop: u64) -> Cloud {
    let tls = server_config(pki.server_credentials()).unwrap();
    let mut o = ServerOptions::new(addr, tls, vk(), store.to_path_buf());
    o.models = models();
    o.fault_drop_requests = drop;
    Cloud::start(o).await.unwrap()
}

fn dev_opts(creds: ClientCredentials, addr: SocketAddr, model: &str, dir: &Path) -> DeviceOptions {
    let tls = client_config(creds).unwrap();
    DeviceOptions::new(
        addr,
        tls,
        repo().join("models").join(model),
        vk(),
        dir.join("ledger.bin"),
    )
}

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn encrypted_equals_plaintext(model: &str, mode: OutputMode) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let cloud = start(&pki, &tmp.path().join("keys.redb"), any_addr(), 0).await;
    let mut o = dev_opts(
        pki.client_credentials("device-1").unwrap(),
        cloud.local_addr(),
        model,
        tmp.path(),
    );
    o.output_mode = mode;
    let mut dev = Device::connect(o).await.unwrap();
    let dir = repo().join("models").join(model);
    let full = Bundle::load(&dir, &vk(), &Default::default()).unwrap();
    let test = TestSet::load(&dir.join("test.json")).unwrap();
    for x in &test.x {
        let plain = full.predict_plain(x).unwrap();
        let got = dev.infer(x, Protection::Encrypted).await.unwrap();
        assert_eq!(got.class, plain.class);
        assert_eq!(
            got.logits, plain.logits,
            "exact decryption gives identical logits"
        );
        assert_eq!(got.epsilon_spent, 0.0);
    }
    assert_eq!(dev.key_uploads(), 1);
    assert_eq!(cloud.metrics().responses(), test.x.len() as u64);
    assert_eq!(dev.ledger_records(), 0);
    dev.close().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_equals_plaintext_digits_packed() {
    encrypted_equals_plaintext("digits", OutputMode::Packed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_equals_plaintext_breast_cancer_packed() {
    encrypted_equals_plaintext("breast_cancer", OutputMode::Packed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_equals_plaintext_breast_cancer_nokey() {
    encrypted_equals_plaintext("breast_cancer", OutputMode::NoKey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_rejection_matrix_starts_no_session() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pki = DevPki::generate(2).unwrap();
    pki.revoke_device("device-2").unwrap();
    let cloud = start(&pki, &tmp.path().join("keys.redb"), any_addr(), 0).await;
    let addr = cloud.local_addr();
    let other = DevPki::generate(1).unwrap();
    let cloud_ca = vec![pki.cloud_ca_cert().clone()];
    let untrusted = {
        let d = &other.devices()[0];
        ClientCredentials {
            cert_chain: vec![d.cert().clone()],
            key: d.key(),
            cloud_ca: cloud_ca.clone(),
        }
    };
    let expired =
        pki.client_credentials_for(&pki.issue_device("old", DeviceCertProfile::Expired).unwrap());
    let wrong_usage = pki.client_credentials_for(
        &pki.issue_device("srv", DeviceCertProfile::ServerAuthOnly)
            .unwrap(),
    );
    let revoked = pki.client_credentials("device-2").unwrap();
    let cases: Vec<(&str, Arc<tandem_tls::rustls::ClientConfig>)> = vec![
        ("untrusted CA", client_config(untrusted).unwrap()),
        ("expired", client_config(expired).unwrap()),
        ("wrong key usage", client_config(wrong_usage).unwrap()),
        ("revoked", client_config(revoked).unwrap()),
        ("no client certificate", {
            let mut roots = tandem_tls::rustls::RootCertStore::empty();
            roots.add(pki.cloud_ca_cert().clone()).unwrap();
            let mut c =
                tandem_tls::rustls::ClientConfig::builder_with_provider(tandem_tls::provider())
                    .with_protocol_versions(&[&tandem_tls::rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            c.alpn_protocols = vec![tandem_tls::ALPN_TANDEM_V1.to_vec()];
            Arc::new(c)
        }),
    ];
    for (name, tls) in cases {
        let mut o = dev_opts(
            pki.client_credentials("device-1").unwrap(),
            addr,
            "digits",
            tmp.path(),
        );
        o.tls = tls;
        o.retry = tandem_device::RetryPolicy::none();
        let r = Device::connect(o).await;
        assert!(r.is_err(), "{name}: must be refused");
        assert_eq!(cloud.sessions_started(), 0, "{name}: no session may start");
    }
    // The device refuses a cloud certificate for another name.
    let mut o = dev_opts(
        pki.client_credentials("device-1").unwrap(),
        addr,
        "digits",
        tmp.path(),
    );
    o.server_name = "not-the-cloud.example".into();
    assert!(
        Device::connect(o).await.is_err(),
        "wrong cloud name must be refused"
    );
    assert_eq!(cloud.sessions_started(), 0);
    // And a valid device gets through.
    let o = dev_opts(
        pki.client_credentials("device-1").unwrap(),
        addr,
        "digits",
        tmp.path(),
    );
    let dev = Device::connect(o).await.unwrap();
    assert_eq!(cloud.sessions_started(), 1);
    dev.close().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_restart_keeps_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(2).unwrap();
    let store = tmp.path().join("keys.redb");
    let cloud = start(&pki, &store, any_addr(), 0).await;
    let addr = cloud.local_addr();
    let test = TestSet::load(&repo().join("models/digits/test.json")).unwrap();
    let mut dev = Device::connect(dev_opts(
        pki.client_credentials("device-1").unwrap(),
        addr,
        "digits",
        tmp.path(),
    ))
    .await
    .unwrap();
    let first = dev.infer(&test.x[0], Protection::Encrypted).await.unwrap();
    assert!(first.key_upload_bytes > 0);
    assert_eq!(dev.key_uploads(), 1);
    assert_eq!(cloud.metrics().key_registrations(), 1);
    cloud.shutdown().await;

    // The restarted cloud binds a fresh port (the old one is free while the models load, and
    // another test's bind could take it); the device follows with `set_addr`.
    let cloud = start(&pki, &store, any_addr(), 0).await;
    let addr = cloud.local_addr();
    dev.set_addr(addr);
    let again = dev.infer(&test.x[1], Protection::Encrypted).await.unwrap();
    assert_eq!(again.key_upload_bytes, 0, "no re-upload after a restart");
    assert_eq!(dev.key_uploads(), 1);
    assert_eq!(cloud.metrics().key_registrations(), 0);
    assert_eq!(dev.connects(), 2);

    // Another device can never use device-1's key: its requests name a key it has not
    // registered, and the cloud asks it for its own.
    let dir2 = tmp.path().join("d2");
    std::fs::create_dir_all(&dir2).unwrap();
    let mut dev2 = Device::connect(dev_opts(
        pki.client_credentials("device-2").unwrap(),
        addr,
        "digits",
        &dir2,
    ))
    .await
    .unwrap();
    dev2.infer(&test.x[2], Protection::Encrypted).await.unwrap();
    assert_eq!(dev2.key_uploads(), 1);
    assert_eq!(cloud.metrics().key_registrations(), 1);
    dev.close().await;
    dev2.close().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_charged_once_across_reconnect() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    // The cloud drops the connection on the first request it sees.
    let cloud = start(&pki, &tmp.path().join("keys.redb"), any_addr(), 1).await;
    let test = TestSet::load(&repo().join("models/digits/test.json")).unwrap();
    let mut dev = Device::connect(dev_opts(
        pki.client_credentials("device-1").unwrap(),
        cloud.local_addr(),
        "digits",
        tmp.path(),
    ))
    .await
    .unwrap();
    let r = dev
        .infer(&test.x[0], Protection::Noised { epsilon: 4.0 })
        .await
        .unwrap();
    assert_eq!(r.attempts, 2);
    assert_eq!(
        dev.ledger_records(),
        1,
        "one charge for one release despite the retry"
    );
    assert_eq!(dev.connects(), 2);
    cloud.inject_request_drops(1);
    let r = dev
        .infer(&test.x[1], Protection::NoisedEncrypted { epsilon: 4.0 })
        .await
        .unwrap();
    assert_eq!(r.attempts, 2);
    assert_eq!(dev.ledger_records(), 2);
    // Unknown-key refusals are answered by the session itself and not counted here.
    assert_eq!(cloud.metrics().requests(), 4, "2 dropped + 2 answered");
    let spent = dev.epsilon_spent_total().unwrap();
    assert!(spent > 4.0, "composed ε {spent}");
    dev.close().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_is_refused_typed() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let tls = server_config(pki.server_credentials()).unwrap();
    let mut o = ServerOptions::new(any_addr(), tls, vk(), tmp.path().join("keys.redb"));
    o.models = models();
    o.admission.max_request_bytes = 64;
    let cloud = Cloud::start(o).await.unwrap();
    let test = TestSet::load(&repo().join("models/digits/test.json")).unwrap();
    let mut dev = Device::connect(dev_opts(
        pki.client_credentials("device-1").unwrap(),
        cloud.local_addr(),
        "digits",
        tmp.path(),
    ))
    .await
    .unwrap();
    match dev.infer(&test.x[0], Protection::Encrypted).await {
        Err(DeviceError::Refused(ErrorCode::LimitExceeded)) => {}
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    assert_eq!(cloud.metrics().refusals(), 1);
    dev.close().await;
    cloud.shutdown().await;
}
