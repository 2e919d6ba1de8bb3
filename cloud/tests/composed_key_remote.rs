//! A key holding only the largest stride level a model's set-2 plans accept (l₀ = the plans'
//! `key_first_level`, one automorphism: every stride of the digits layer composed from it),
//! registered by a peer over real mutual TLS on loopback: acknowledged, and it then serves
//! requests exactly (the same decrypted result as a full key from the same secret), rather than
//! being acknowledged and failing every request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use tandem_cloud::{Cloud, ServerOptions};
use tandem_he::{
    Client, Context, EncryptedOutput, EvaluationKey, LayerPlan, OutputMode,
    PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64 as SET2,
};
use tandem_model::{Bundle, Part};
use tandem_protocol::{
    DeviceConfig, DeviceEvent, DeviceSession, EncryptedBlock, RequestPayload, ResponsePayload,
};
use tandem_tls::{client_config, server_config, DevPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use common::{digits, vk};

/// Registers `key` on a fresh set-2 session, then sends one encrypted request for the
/// digits cloud layer with `ct` under it; returns the decrypted row (panics on any refusal).
async fn register_and_eval(
    pki: &DevPki,
    cloud: &Cloud,
    client: &Client,
    plan: &LayerPlan,
    layer: u32,
    key: &EvaluationKey,
    ct: Vec<u8>,
) -> Vec<i64> {
    let tcp = TcpStream::connect(cloud.local_addr()).await.unwrap();
    let cfg = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    let mut tls = TlsConnector::from(cfg)
        .connect(tandem_tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let est = tandem_tls::established(tls.get_ref().1).unwrap();
    let b = Bundle::load_part(&digits(), &vk(), &Default::default(), Part::Device).unwrap();
    let mut cfg = DeviceConfig::new(b.id(), b.digest());
    cfg.param_sets = vec![SET2.id];
    let mut s = DeviceSession::new(cfg, est.channel_binding, 0).unwrap();
    let blob = key.to_bytes();
    let id = tandem_protocol::key_id_of(&blob);
    let mut blob = Some(blob);
    let mut ct = Some(ct);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(e) = s.poll_event() {
            match e {
                DeviceEvent::Connected(n) => {
                    assert_eq!(n.param_set, SET2.id);
                    s.register_key(
                        id,
                        tandem_protocol::OutputMode::Packed,
                        blob.take().unwrap(),
                        1,
                    )
                    .unwrap();
                }
                DeviceEvent::KeyAccepted { .. } => {
                    let payload = RequestPayload::Encrypted(EncryptedBlock {
                        param_set: SET2.id,
                        key_id: id,
                        output_mode: tandem_protocol::OutputMode::Packed,
                        ciphertexts: vec![ct.take().unwrap()],
                    });
                    s.send_request(layer, 1, payload, 1).unwrap();
                }
                DeviceEvent::Response {
                    payload: ResponsePayload::Encrypted(e),
                    ..
                } => {
                    let out = EncryptedOutput::from_bytes(
                        &e.ciphertexts[0],
                        1 << 24,
                        plan,
                        &client.key_id(),
                    )
                    .unwrap();
                    return client.decrypt(plan, &out).unwrap().pop().unwrap();
                }
                e => panic!("{key:?}: unexpected {e:?}"),
            }
        }
        while let Some(f) = s.poll_transmit() {
            tls.write_all(&f).await.unwrap();
        }
        tls.flush().await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf))
            .await
            .expect("no answer from the cloud")
            .unwrap_or(0);
        assert!(n > 0, "{key:?}: the cloud closed the session");
        let _ = s.handle_input(&buf[..n], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holding_only_the_top_accepted_stride_serves_exactly_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let tls = server_config(pki.server_credentials()).unwrap();
    let mut o = ServerOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        vk(),
        tmp.path().join("keys.redb"),
    );
    o.models = vec![digits()];
    let cloud = Cloud::start(o).await.unwrap();
    let b = Bundle::load_part(&digits(), &vk(), &Default::default(), Part::Device).unwrap();
    let index = b.cloud_indices()[0];
    let spec = b.layers()[index].spec();
    let quant = spec.quant.as_ref().unwrap();
    let plan = tandem_device::cloud_plan(
        SET2,
        OutputMode::Packed,
        spec.n_in,
        spec.n_out,
        quant.bias_bound(),
    )
    .unwrap();
    let top = plan.key_first_level;
    assert!(top > 1, "{plan:?}");
    let ctx = Arc::new(Context::new(SET2));
    let mut client = Client::from_seed(ctx, 0x5eed_2001);
    // One automorphism, stride 2^top (above the plan's chunk when top > log2 chunk).
    let small = client
        .evaluation_key_from(top, plan.chunk.max(1 << top), 1)
        .unwrap();
    assert_eq!(
        small.automorphisms().len(),
        1 + plan.chunk.trailing_zeros().saturating_sub(top) as usize
    );
    let full = client.evaluation_key_for(plan.chunk, 1).unwrap();
    let x: Vec<i64> = (0..spec.n_in as i64)
        .map(|i| (i * 37 % 200) - 100)
        .collect();
    let layer = u32::try_from(index).unwrap();
    let mut rows = Vec::new();
    for key in [&full, &small] {
        let ct = client
            .encrypt(&plan, std::slice::from_ref(&x))
            .unwrap()
            .to_bytes();
        rows.push(register_and_eval(&pki, &cloud, &client, &plan, layer, key, ct).await);
    }
    assert_eq!(rows[0].len(), spec.n_out);
    assert_eq!(rows[0], rows[1]);
    cloud.shutdown().await;
}
