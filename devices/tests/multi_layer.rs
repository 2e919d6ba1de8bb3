//! Issue 8: a model with two cloud layers (`models/digits2`: 64→32 device, 32→32 cloud, ReLU
//! on the device, 32→16 cloud, 16→10 device) over real mutual TLS on loopback. Both cloud
//! layers run under encryption, one request each, on one session; the result equals the
//! plaintext integer pipeline. Requests naming a wrong layer or with a truncated payload get a
//! typed refusal and the session goes on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::{Device, DeviceOptions, OutputMode, Protection};
use tandem_model::{read_verifying_key, Bundle, Limits, Part, Step, TestSet, VerifyingKey};
use tandem_protocol::{
    BudgetCharge, DeviceConfig, DeviceEvent, DeviceSession, DpMetadata, ErrorCode, Mechanism,
    NoisedBlock, RequestPayload, ResponsePayload, Scale,
};
use tandem_tls::{client_config, server_config, DevPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn vk() -> VerifyingKey {
    read_verifying_key(&repo().join("models/dev-verifying-key.txt")).unwrap()
}

fn digits2() -> PathBuf {
    repo().join("models/digits2")
}

async fn start_cloud(pki: &DevPki, store: &Path) -> Cloud {
    let tls = server_config(pki.server_credentials()).unwrap();
    let mut o = ServerOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        vk(),
        store.to_path_buf(),
    );
    o.models = vec![repo().join("models/digits"), digits2()];
    Cloud::start(o).await.unwrap()
}

fn dev_opts(pki: &DevPki, addr: SocketAddr, dir: &Path, mode: OutputMode) -> DeviceOptions {
    let tls = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    let mut o = DeviceOptions::new(addr, tls, digits2(), vk(), dir.join("ledger.bin"));
    o.output_mode = mode;
    o.io_timeout = Duration::from_secs(30);
    o
}

#[test]
fn the_bundle_has_two_cloud_layers_and_keeps_its_accuracy() {
    let b = Bundle::load(&digits2(), &vk(), &Limits::default()).unwrap();
    assert_eq!(b.cloud_indices(), &[1, 2]);
    let t = TestSet::load(&digits2().join("test.json")).unwrap();
    // Every test sample goes through two cloud steps, then finishes on the device.
    let x = &t.x[0];
    let Step::Cloud {
        layer: 1, input, ..
    } = b.start(x).unwrap()
    else {
        panic!("first step is not cloud layer 1");
    };
    let z1 = b.cloud_eval_plain_at(1, &input).unwrap();
    let Step::Cloud {
        layer: 2, input, ..
    } = b.resume(1, &z1).unwrap()
    else {
        panic!("second step is not cloud layer 2");
    };
    let z2 = b.cloud_eval_plain_at(2, &input).unwrap();
    let Step::Done(p) = b.resume(2, &z2).unwrap() else {
        panic!("the pipeline does not finish after cloud layer 2");
    };
    assert_eq!(p, b.predict_plain(x).unwrap());
    // The single-cloud-layer wrapper refuses to pretend the pipeline ends after layer 1.
    assert!(b.finish_on_device(&z1).is_err());
    let acc = b.accuracy(&t.x, &t.y).unwrap();
    let recorded = b
        .manifest()
        .training
        .as_ref()
        .unwrap()
        .quantised_test_accuracy;
    assert_eq!(acc, recorded);
    assert!(acc > 0.95, "accuracy {acc}");
}

/// Both cloud layers run encrypted (packed and no-key) and every test prediction equals the
/// plaintext integer pipeline, logits included (the HE result is exact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cloud_layers_encrypted_equal_the_plaintext_pipeline_over_mtls() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let cloud = start_cloud(&pki, &tmp.path().join("keys.redb")).await;
    let full = Bundle::load(&digits2(), &vk(), &Limits::default()).unwrap();
    let t = TestSet::load(&digits2().join("test.json")).unwrap();
    let mut sent = 0u64;
    for (mode, n) in [(OutputMode::Packed, t.x.len()), (OutputMode::NoKey, 40)] {
        let dir = tmp.path().join(format!("{mode:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut dev = Device::connect(dev_opts(&pki, cloud.local_addr(), &dir, mode))
            .await
            .unwrap();
        assert_eq!(dev.plans().len(), 2);
        let connects = dev.connects();
        for x in t.x.iter().take(n) {
            let r = dev.infer(x, Protection::Encrypted).await.unwrap();
            let p = full.predict_plain(x).unwrap();
            assert_eq!(r.class, p.class);
            assert_eq!(r.logits, p.logits);
            assert_eq!(r.attempts, 2, "one attempt per cloud layer");
            assert!(r.bytes_up > 0 && r.bytes_down > 0);
            sent += 2;
        }
        assert_eq!(
            dev.connects(),
            connects,
            "one session carries every request"
        );
        assert_eq!(dev.ledger_records(), 0, "encrypted mode charges nothing");
        dev.close().await;
    }
    assert_eq!(cloud.metrics().requests(), sent);
    cloud.shutdown().await;
}

/// A DP release per cloud layer: each one is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noised_mode_charges_one_release_per_cloud_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let cloud = start_cloud(&pki, &tmp.path().join("keys.redb")).await;
    let t = TestSet::load(&digits2().join("test.json")).unwrap();
    let mut o = dev_opts(&pki, cloud.local_addr(), tmp.path(), OutputMode::Packed);
    o.dp.budget_rho = Some(1e6);
    let mut dev = Device::connect(o).await.unwrap();
    let r = dev
        .infer(&t.x[0], Protection::Noised { epsilon: 4.0 })
        .await
        .unwrap();
    assert_eq!(r.epsilon_spent, 8.0);
    assert_eq!(dev.ledger_records(), 2);
    dev.close().await;
    cloud.shutdown().await;
}

fn noised(values: Vec<i32>) -> RequestPayload {
    RequestPayload::Noised(NoisedBlock {
        dp: DpMetadata {
            mechanism: Mechanism::DiscreteGaussian,
            scale: Scale::Float(1.0),
            charge: BudgetCharge::Rho(0.1),
            clip_bound: 1.0,
            quant_scale: 1.0,
        },
        values,
    })
}

/// Valid layer ids are the manifest indices of the cloud layers (1 and 2 here): layer 0 (a
/// device layer), 3 and a huge id are refused, and so is a payload one value short; the
/// session answers the next valid request of either layer correctly.
// TDM-REQ-8: only cloud layers' manifest indices are valid layer ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_layer_or_truncated_request_is_refused_and_the_session_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let cloud = start_cloud(&pki, &tmp.path().join("keys.redb")).await;
    let b = Bundle::load(&digits2(), &vk(), &Limits::default()).unwrap();
    let dev_part = Bundle::load_part(&digits2(), &vk(), &Limits::default(), Part::Device).unwrap();

    let tcp = TcpStream::connect(cloud.local_addr()).await.unwrap();
    let cfg = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    let mut stream = TlsConnector::from(cfg)
        .connect(tandem_tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let est = tandem_tls::established(stream.get_ref().1).unwrap();
    let mut s = DeviceSession::new(
        DeviceConfig::new(dev_part.id(), dev_part.digest()),
        est.channel_binding,
        0,
    )
    .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    // Drives the session until it reports an event other than `Connected`.
    macro_rules! next_event {
        () => {{
            loop {
                while let Some(f) = s.poll_transmit() {
                    stream.write_all(&f).await.unwrap();
                }
                stream.flush().await.unwrap();
                if let Some(e) = s.poll_event() {
                    if matches!(e, DeviceEvent::Connected(_)) {
                        continue;
                    }
                    break e;
                }
                let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
                    .await
                    .expect("no answer from the cloud")
                    .unwrap();
                assert!(n > 0, "the cloud closed the connection");
                s.handle_input(&buf[..n], 1).unwrap();
            }
        }};
    }
    // Wait for the handshake.
    loop {
        while let Some(f) = s.poll_transmit() {
            stream.write_all(&f).await.unwrap();
        }
        stream.flush().await.unwrap();
        if s.negotiated().is_some() {
            break;
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0);
        s.handle_input(&buf[..n], 1).unwrap();
    }
    let q: Vec<i32> = (0..32).map(|i| (i * 7 % 255) - 127).collect();
    let q64: Vec<i64> = q.iter().map(|&v| i64::from(v)).collect();
    for (layer, values) in [
        (0u32, q.clone()),
        (3, q[..16].to_vec()),
        (u32::MAX, q.clone()),
        (1, q[..31].to_vec()),
        (2, q[..31].to_vec()),
    ] {
        let id = s.send_request(layer, 1, noised(values), 1).unwrap();
        match next_event!() {
            DeviceEvent::RequestFailed { request_id, code } => {
                assert_eq!(request_id, id);
                assert_eq!(code, ErrorCode::InvalidRequest, "layer {layer}");
            }
            other => panic!("layer {layer}: expected a typed refusal, got {other:?}"),
        }
        // The session is still consistent: both real layers answer exactly.
        for good in [1u32, 2] {
            let id = s.send_request(good, 1, noised(q.clone()), 1).unwrap();
            match next_event!() {
                DeviceEvent::Response {
                    request_id,
                    layer_id,
                    payload: ResponsePayload::Plain(z),
                    ..
                } => {
                    assert_eq!((request_id, layer_id), (id, good));
                    assert_eq!(z, b.cloud_eval_plain_at(good as usize, &q64).unwrap());
                }
                other => panic!("layer {good}: {other:?}"),
            }
        }
    }
    cloud.shutdown().await;
}
