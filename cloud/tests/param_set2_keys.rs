//! Parameter set 2's evaluation keys (modulo Q, three u32 residues per coefficient) registered
//! by a hostile or careless peer over real mutual TLS on loopback: every damaged blob is a
//! typed refusal (`InvalidRequest`, TDM-HE-3) that stores nothing, and the cloud keeps serving;
//! a good set-2 key persisted in the key store serves the same device after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::{Device, DeviceOptions, Protection};
use tandem_he::{
    PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64 as SET1,
    PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64 as SET2,
};
use tandem_model::TestSet;
use tandem_protocol::{DeviceConfig, DeviceEvent, DeviceSession, ErrorCode};
use tandem_tls::{client_config, server_config, DevPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Parameter set 2's primes (`specs/he-formats.md`, § Parameter set 2).
const PRIMES: [u32; 3] = [0x3F5A_0001, 0x3F5D_0001, 0x3F76_0001];

use common::{digits, vk};

fn server_opts(pki: &DevPki, store: &Path, addr: SocketAddr) -> ServerOptions {
    let tls = server_config(pki.server_credentials()).unwrap();
    let mut o = ServerOptions::new(addr, tls, vk(), store.to_path_buf());
    o.models = vec![digits()];
    o
}

fn dev_opts(pki: &DevPki, addr: SocketAddr, dir: &Path, sets: &[u16]) -> DeviceOptions {
    let tls = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    let mut o = DeviceOptions::new(addr, tls, digits(), vk(), dir.join("ledger.bin"));
    o.dp.budget_rho = Some(1e6);
    o.state_dir = Some(dir.to_path_buf());
    o.param_sets = sets.to_vec();
    o
}

fn x0() -> Vec<f32> {
    TestSet::load(&digits().join("test.json")).unwrap().x[0].clone()
}

/// The evaluation key a real device made for set `set` against `cloud` (read back from its
/// state directory `dir`), and its encrypted logits for the first test sample.
async fn device_key(pki: &DevPki, cloud: &Cloud, dir: &Path, set: u16) -> (Vec<u8>, Vec<f32>) {
    let mut dev = Device::connect(dev_opts(pki, cloud.local_addr(), dir, &[set]))
        .await
        .unwrap();
    let r = dev.infer(&x0(), Protection::Encrypted).await.unwrap();
    assert_eq!(dev.parameter_set().id, set);
    assert!(r.key_upload_bytes > 0);
    dev.close().await;
    let prefix = format!("eval-key-p{set}-");
    let file = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .expect("the device caches its key");
    (std::fs::read(file).unwrap(), r.logits)
}

/// Registers `blob` on a fresh session offering only `set`; returns the first event after
/// the handshake (`KeyAccepted` or `Closed`).
async fn register(pki: &DevPki, addr: SocketAddr, set: u16, blob: Vec<u8>) -> DeviceEvent {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let cfg = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    let mut tls: TlsStream<TcpStream> = TlsConnector::from(cfg)
        .connect(tandem_tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let est = tandem_tls::established(tls.get_ref().1).unwrap();
    let b = tandem_model::Bundle::load_part(
        &digits(),
        &vk(),
        &Default::default(),
        tandem_model::Part::Device,
    )
    .unwrap();
    let mut cfg = DeviceConfig::new(b.id(), b.digest());
    cfg.param_sets = vec![set];
    let mut s = DeviceSession::new(cfg, est.channel_binding, 0).unwrap();
    let mut blob = Some(blob);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(f) = s.poll_transmit() {
            tls.write_all(&f).await.unwrap();
        }
        tls.flush().await.unwrap();
        while let Some(e) = s.poll_event() {
            match e {
                DeviceEvent::Connected(n) => {
                    assert_eq!(n.param_set, set);
                    let blob = blob.take().unwrap();
                    let id = tandem_protocol::key_id_of(&blob);
                    s.register_key(id, tandem_protocol::OutputMode::Packed, blob, 1)
                        .unwrap();
                }
                e => return e,
            }
        }
        while let Some(f) = s.poll_transmit() {
            tls.write_all(&f).await.unwrap();
        }
        tls.flush().await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut buf))
            .await
            .expect("no answer from the cloud")
            .unwrap_or(0);
        if n == 0 {
            return DeviceEvent::Closed {
                code: ErrorCode::NoError,
                by_peer: false,
            };
        }
        let _ = s.handle_input(&buf[..n], 1);
    }
}

/// Offset of the fixed fields' end (H in `specs/he-formats.md`): 59 for kind 3, 60 for kind 6.
fn h(blob: &[u8]) -> usize {
    if blob[5] == 6 {
        60
    } else {
        59
    }
}

/// Offset of the first body byte.
fn bodies_at(blob: &[u8]) -> usize {
    h(blob) + 2 * usize::from(blob[h(blob) - 1])
}

fn put_u32(blob: &mut [u8], at: usize, v: u32) {
    blob[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_set2_keys_are_refused_and_a_stored_one_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let store = tmp.path().join("keys.redb");
    // Real keys of both sets, made by real devices (each registered once: 2 stored keys).
    let mut o = server_opts(&pki, &store, "127.0.0.1:0".parse().unwrap());
    o.param_sets = vec![SET2.id, SET1.id];
    let cloud = Cloud::start(o.clone()).await.unwrap();
    let (k1, _) = device_key(&pki, &cloud, &tmp.path().join("d1"), SET1.id).await;
    let (k2, _) = device_key(&pki, &cloud, &tmp.path().join("d2"), SET2.id).await;
    assert_eq!(k2[6..8], SET2.id.to_le_bytes());
    assert_eq!(k1.len(), k2.len(), "set 2 keeps the key's size");
    cloud.shutdown().await;
    // A fresh store for the hostile registrations.
    o.key_store = tmp.path().join("keys-hostile.redb");
    let cloud = Cloud::start(o.clone()).await.unwrap();
    let addr2 = cloud.local_addr();
    let body = bodies_at(&k2);
    let n = SET2.poly_size;
    let mut cases: Vec<(&str, u16, Vec<u8>)> = Vec::new();
    for (k, &p) in PRIMES.iter().enumerate() {
        // Residue t = 0 of prime k of the first body: equal to its prime, then the largest u32.
        for v in [p, u32::MAX] {
            let mut b = k2.clone();
            put_u32(&mut b, body + 4 * k * n, v);
            cases.push(("residue at or above its prime", SET2.id, b));
        }
        // The last coefficient of the last body.
        let mut b = k2.clone();
        let last = b.len() - 4 * (3 - k) * n + 4 * (n - 1);
        put_u32(&mut b, last, p);
        cases.push(("last residue = prime", SET2.id, b));
    }
    cases.push((
        "truncated by one byte",
        SET2.id,
        k2[..k2.len() - 1].to_vec(),
    ));
    cases.push((
        "truncated to the header",
        SET2.id,
        k2[..bodies_at(&k2)].to_vec(),
    ));
    // (One byte too long exceeds the negotiated frame limit: the session refuses to send it.)
    for delta in [1i16, -1] {
        let mut b = k2.clone();
        let a = h(&b) - 1;
        b[a] = (i16::from(b[a]) + delta) as u8;
        cases.push(("automorphism count lies", SET2.id, b));
    }
    let mut b = k2.clone();
    let at = h(&b) - 2;
    b[at] = 3;
    cases.push(("set 1's level count under set 2", SET2.id, b));
    let mut b = k2.clone();
    let at = h(&b) - 3;
    b[at] = 15;
    cases.push(("set 1's base log under set 2", SET2.id, b));
    cases.push(("a set-1 key in a set-2 session", SET2.id, k1.clone()));
    let mut b = k1.clone();
    b[6..8].copy_from_slice(&SET2.id.to_le_bytes());
    cases.push(("a set-1 key relabelled set 2", SET2.id, b.clone()));
    // ... with set 2's gadget fields too: its u64 bodies read as u32 residues.
    let at = h(&b) - 3;
    b[at] = 30;
    b[at + 1] = 2;
    cases.push(("a set-1 key dressed as set 2", SET2.id, b));
    cases.push(("a set-2 key in a set-1 session", SET1.id, k2.clone()));
    let mut b = k2.clone();
    b[6..8].copy_from_slice(&SET1.id.to_le_bytes());
    cases.push(("a set-2 key relabelled set 1", SET1.id, b));
    // Shared-mask kinds: the r byte (offset 40) out of range or disagreeing with the length,
    // and a kind-3 key claimed as kind 6 (and back).
    if k2[5] == 6 {
        for r in [0u8, 1, k2[40] + 1, 9, 255] {
            let mut b = k2.clone();
            b[40] = r;
            cases.push(("kind 6 with a lying r", SET2.id, b));
        }
        let mut b = k2.clone();
        b[5] = 3;
        cases.push(("kind 6 relabelled kind 3", SET2.id, b));
    } else {
        let mut b = k2.clone();
        b[5] = 6;
        b.insert(40, 2);
        b.pop();
        cases.push(("kind 3 relabelled kind 6, r = 2", SET2.id, b));
    }
    // A set-1 key that starts at stride 4 (composing stride 2 from it, which only set 2's
    // plans accept, parameters.md § "Smaller keys"): refused at registration, not acknowledged
    // and then failing every request.
    let full1 = tandem_he::EvaluationKey::from_bytes(&k1, k1.len(), &SET1).unwrap();
    let ctx1 = std::sync::Arc::new(tandem_he::Context::new(SET1));
    let late1 = tandem_he::Client::from_seed(ctx1, 77)
        .evaluation_key_from(2, full1.max_chunk(), full1.bodies())
        .unwrap()
        .to_bytes();
    cases.push(("a set-1 key from stride 4 up", SET1.id, late1));
    let total = cases.len() as u64;
    for (what, set, blob) in cases {
        match register(&pki, addr2, set, blob).await {
            DeviceEvent::Closed { code, by_peer } => {
                assert!(by_peer, "{what}");
                assert_eq!(code, ErrorCode::InvalidRequest, "{what}");
            }
            e => panic!("{what}: expected Close(InvalidRequest), got {e:?}"),
        }
        assert!(
            cloud.key_store().is_empty().unwrap(),
            "{what}: nothing stored"
        );
    }
    assert_eq!(cloud.metrics().keys_refused(), total);
    assert_eq!(cloud.metrics().key_registrations(), 0);
    // The intact keys are still accepted under their own sets.
    for (set, k) in [(SET2.id, &k2), (SET1.id, &k1)] {
        match register(&pki, addr2, set, k.clone()).await {
            DeviceEvent::KeyAccepted { key_id } => {
                assert_eq!(key_id, tandem_protocol::key_id_of(k))
            }
            e => panic!("set {set}: expected KeyAccepted, got {e:?}"),
        }
    }
    cloud.shutdown().await;

    // A set-2 key persisted by the first cloud serves the same device process across a
    // restart of the cloud: no new upload, the same logits.
    // Each cloud binds a fresh port (o.addr stays 127.0.0.1:0): the first cloud's port has
    // been free since its shutdown, and any port is free while a restarting cloud loads its
    // models, so another test's bind could take it. The device follows with `set_addr`.
    let dir = tmp.path().join("d3");
    o.key_store = store.clone();
    let cloud = Cloud::start(o.clone()).await.unwrap();
    let mut dev = Device::connect(dev_opts(&pki, cloud.local_addr(), &dir, &[SET2.id]))
        .await
        .unwrap();
    let first = dev.infer(&x0(), Protection::Encrypted).await.unwrap();
    assert!(first.key_upload_bytes > 0);
    let stored = cloud.key_store().len().unwrap();
    cloud.shutdown().await;
    let cloud = Cloud::start(o).await.unwrap();
    dev.set_addr(cloud.local_addr());
    assert_eq!(cloud.key_store().len().unwrap(), stored, "reloaded");
    let again = dev.infer(&x0(), Protection::Encrypted).await.unwrap();
    assert_eq!(
        again.key_upload_bytes, 0,
        "the restarted cloud kept the set-2 key"
    );
    assert_eq!(again.logits, first.logits);
    assert_eq!(dev.parameter_set(), SET2);
    assert_eq!(cloud.metrics().key_registrations(), 0);
    dev.close().await;
    cloud.shutdown().await;
}

/// Sends, on a fresh session offering only `set`, one encrypted request for digits' cloud
/// layer naming `key_id` (the ciphertext bytes are junk: the key is looked up first); returns
/// the first event after the handshake.
async fn request_with_key(
    pki: &DevPki,
    addr: SocketAddr,
    set: u16,
    key_id: [u8; 32],
) -> DeviceEvent {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let cfg = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    let mut tls: TlsStream<TcpStream> = TlsConnector::from(cfg)
        .connect(tandem_tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let est = tandem_tls::established(tls.get_ref().1).unwrap();
    let b = tandem_model::Bundle::load_part(
        &digits(),
        &vk(),
        &Default::default(),
        tandem_model::Part::Device,
    )
    .unwrap();
    let layer = u32::try_from(b.cloud_indices()[0]).unwrap();
    let mut cfg = DeviceConfig::new(b.id(), b.digest());
    cfg.param_sets = vec![set];
    let mut s = DeviceSession::new(cfg, est.channel_binding, 0).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(f) = s.poll_transmit() {
            tls.write_all(&f).await.unwrap();
        }
        tls.flush().await.unwrap();
        while let Some(e) = s.poll_event() {
            match e {
                DeviceEvent::Connected(n) => {
                    assert_eq!(n.param_set, set);
                    let payload = tandem_protocol::RequestPayload::Encrypted(
                        tandem_protocol::EncryptedBlock {
                            param_set: set,
                            key_id,
                            output_mode: tandem_protocol::OutputMode::Packed,
                            ciphertexts: vec![vec![0u8; 64]],
                        },
                    );
                    s.send_request(layer, 1, payload, 1).unwrap();
                }
                e => return e,
            }
        }
        while let Some(f) = s.poll_transmit() {
            tls.write_all(&f).await.unwrap();
        }
        tls.flush().await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut buf))
            .await
            .expect("no answer from the cloud")
            .unwrap_or(0);
        if n == 0 {
            return DeviceEvent::Closed {
                code: ErrorCode::NoError,
                by_peer: false,
            };
        }
        let _ = s.handle_input(&buf[..n], 1);
    }
}

/// A set-1 key stored by a cloud serving both sets, named in a request after the cloud was
/// restarted with `param_sets = [2]` (as `specs/operations.md` suggests to halve memory): the
/// request fails `UnknownKey` (the key is not usable under any served set), not
/// `InternalError` with an error log telling the operator the store is damaged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_set1_key_after_set1_is_dropped_is_an_unknown_key() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let store = tmp.path().join("keys.redb");
    let mut o = server_opts(&pki, &store, "127.0.0.1:0".parse().unwrap());
    let cloud = Cloud::start(o.clone()).await.unwrap();
    let (k1, _) = device_key(&pki, &cloud, &tmp.path().join("d1"), SET1.id).await;
    let id1 = tandem_protocol::key_id_of(&k1);
    // While set 1 is served, a set-2 session naming the set-1 key is refused as a mismatch.
    match request_with_key(&pki, cloud.local_addr(), SET2.id, id1).await {
        DeviceEvent::RequestFailed { code, .. } => assert_eq!(code, ErrorCode::InvalidRequest),
        e => panic!("expected RequestFailed, got {e:?}"),
    }
    cloud.shutdown().await;
    o.param_sets = vec![SET2.id];
    let cloud = Cloud::start(o).await.unwrap();
    assert_eq!(cloud.key_store().len().unwrap(), 1);
    match request_with_key(&pki, cloud.local_addr(), SET2.id, id1).await {
        DeviceEvent::RequestFailed { code, .. } => assert_eq!(code, ErrorCode::UnknownKey),
        e => panic!("expected RequestFailed(UnknownKey), got {e:?}"),
    }
    cloud.shutdown().await;
}
