//! Shared-mask ("multi-body") HE plans over real mutual TLS (issue 8, TDM-PAR-HE-3,
//! TDM-KEY-8): a small signed encoder bundle whose `[encoder]` section lets 4 secrets share a
//! mask at 1 000 kbit/s, so the cloud plans its 384→384 layer with 2 bodies per mask. A device
//! that registers an evaluation key with fewer bodies than the model's plans (an old client,
//! or a hostile one) is refused at registration with a typed code (the key is never
//! acknowledged, TDM-KEY-8), and the honest key then gives the exact integer products.
//!
//! Runs without the MiniLM weights (synthetic int8 weights, a placeholder tokenizer the
//! cloud never reads).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tandem_cloud::{Cloud, CloudError, ServerOptions};
use tandem_device::{DeviceError, RemoteLayers};
use tandem_he::{Client, Context, EncryptedOutput, LayerPlan, OutputMode, DEFAULT_PARAMETERS};
use tandem_model::{
    write_bundle, Bundle, CloudLinear, EncoderSpec, Limits, Manifest, NamedTensor, OpSpec, Part,
    Placement, SigningKey, TensorData, WeightsRef,
};
use tandem_ops::encrypted::plan_encoder_layer;
use tandem_ops::CloudLayers;
use tandem_protocol::ErrorCode;
use tandem_tls::{client_config, server_config, DevPki};

mod common;

/// Hidden width: at 16 tokens per request and 1 000 kbit/s the 384→384 layer plans 2 bodies.
const H: usize = 384;
const BATCH: usize = 16;
const LINEARS: [(&str, usize, usize); 2] = [("qkv", H, 3 * H), ("o", H, H)];

/// Small deterministic int8 weights `[n_out, n_in]`.
fn weights(n_in: usize, n_out: usize) -> Vec<i8> {
    (0..n_in * n_out).map(|i| (i % 7) as i8 - 3).collect()
}

fn linear(name: &str, n_in: usize, n_out: usize) -> CloudLinear {
    CloudLinear {
        name: name.into(),
        n_in,
        n_out,
        weight: format!("{name}.w"),
        scales: format!("{name}.s"),
        bias: format!("{name}.b"),
        input_bound: 127,
        weight_bound: 127,
        bias_bound: 0,
        max_row_l1: None,
        max_row_sq: None,
    }
}

fn manifest(max_bodies: u32) -> Manifest {
    let mut ops = vec![OpSpec::device("embedding", &[], "e")];
    ops[0].tensors = vec!["word".into(), "pos".into(), "type".into()];
    for (i, (input, output)) in [("e", "qkv"), ("ctx", "o")].into_iter().enumerate() {
        if i == 1 {
            let mut att = OpSpec::device("attention", &["qkv"], "ctx");
            att.heads = Some(2);
            ops.push(att);
        }
        let mut l = OpSpec::device("linear", &[input], output);
        l.placement = Placement::Cloud;
        l.linear = Some(i);
        ops.push(l);
    }
    ops.push(OpSpec::device("mean_pool", &["o"], "p"));
    ops.push(OpSpec::device("l2_normalize", &["p"], "out"));
    Manifest::for_encoder(
        "multibody-encoder",
        "1",
        "none",
        EncoderSpec {
            hidden: H,
            max_tokens: BATCH,
            batch: BATCH,
            vocab_size: 10,
            max_position_embeddings: BATCH,
            type_vocab_size: 2,
            tokenizer: WeightsRef {
                file: "tokenizer.json".into(),
                sha256: "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a".into(),
                bytes: 2,
            },
            linears: LINEARS.iter().map(|&(n, i, o)| linear(n, i, o)).collect(),
            ops,
            output: "out".into(),
            link_kbit_s: Some(1_000),
            max_bodies: Some(max_bodies),
        },
    )
    .unwrap()
}

fn f32t(name: &str, shape: &[usize]) -> NamedTensor {
    let n = shape.iter().product::<usize>();
    NamedTensor {
        name: name.into(),
        shape: shape.to_vec(),
        data: TensorData::F32((0..n).map(|i| 0.25 + (i % 7) as f32 * 0.1).collect()),
    }
}

fn write(dir: &Path, m: &Manifest, key: &SigningKey) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    let mut t = vec![
        f32t("word", &[10, H]),
        f32t("pos", &[BATCH, H]),
        f32t("type", &[2, H]),
    ];
    for (name, n_in, n_out) in LINEARS {
        t.push(NamedTensor {
            name: format!("{name}.w"),
            shape: vec![n_out, n_in],
            data: TensorData::I8(weights(n_in, n_out)),
        });
        t.push(f32t(&format!("{name}.s"), &[n_out]));
        t.push(f32t(&format!("{name}.b"), &[n_out]));
    }
    write_bundle(dir, m, &t, key).unwrap();
}

/// A loopback cloud over mTLS serving the bundle in `dir` (signed by `key`).
struct Served {
    pki: DevPki,
    rt: tokio::runtime::Runtime,
    cloud: Option<Cloud>,
}

impl Served {
    fn start(tmp: &Path, dir: &Path, key: &SigningKey) -> Served {
        Self::try_start(tmp, dir, key, |_| {}).unwrap()
    }

    /// [`Served::start`] with the server options changed by `edit` first.
    fn try_start(
        tmp: &Path,
        dir: &Path,
        key: &SigningKey,
        edit: impl FnOnce(&mut ServerOptions),
    ) -> Result<Served, CloudError> {
        let pki = DevPki::generate(1).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut o = ServerOptions::new(
            common::any_addr(),
            server_config(pki.server_credentials()).unwrap(),
            key.verifying_key(),
            tmp.join("keys.redb"),
        )
        .with_model(dir.to_path_buf());
        edit(&mut o);
        let cloud = Some(rt.block_on(Cloud::start(o))?);
        Ok(Served { pki, rt, cloud })
    }

    fn connect(&self, bundle: &Bundle) -> RemoteLayers {
        RemoteLayers::connect(
            self.cloud.as_ref().unwrap().local_addr(),
            "localhost",
            client_config(self.pki.client_credentials("device-1").unwrap()).unwrap(),
            bundle,
            OutputMode::Packed,
            &[DEFAULT_PARAMETERS.id],
            Duration::from_secs(60),
        )
        .unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(c) = self.cloud.take() {
            self.rt.block_on(c.shutdown());
        }
    }
}

/// The packed plans of the bundle's cloud layers, as the device derives them.
fn plans(ctx: &Context, bundle: &Bundle) -> Vec<LayerPlan> {
    let enc = bundle.encoder().unwrap();
    enc.linears
        .iter()
        .map(|l| {
            plan_encoder_layer(
                ctx,
                OutputMode::Packed,
                l,
                enc.batch,
                enc.link_kbit_per_s(),
                enc.max_bodies(),
            )
            .unwrap()
        })
        .collect()
}

/// `x · Wᵀ` on the layer's int8 weights, row by row.
fn product(rows: &[Vec<i64>], n_in: usize, n_out: usize) -> Vec<Vec<i64>> {
    let w = weights(n_in, n_out);
    rows.iter()
        .map(|x| {
            (0..n_out)
                .map(|j| (0..n_in).map(|i| x[i] * i64::from(w[j * n_in + i])).sum())
                .collect()
        })
        .collect()
}

/// A cloud serving a fresh multi-body bundle (`manifest(4)`) in `tmp`, a device session on it,
/// and the packed plans the device derives with their widest chunk and most bodies.
struct Session {
    remote: RemoteLayers,
    client: Client,
    plans: Vec<LayerPlan>,
    max_chunk: usize,
    max_bodies: usize,
    bundle: Bundle,
    served: Served,
}

fn session(tmp: &Path, key_byte: u8) -> Session {
    let key = SigningKey::from_bytes(&[key_byte; 32]);
    let dir = tmp.join("bundle");
    write(&dir, &manifest(4), &key);
    let served = Served::start(tmp, &dir, &key);
    let bundle =
        Bundle::load_part(&dir, &key.verifying_key(), &Limits::default(), Part::Device).unwrap();
    let remote = served.connect(&bundle);
    let ctx = Arc::new(Context::new(remote.params()));
    let plans = plans(&ctx, &bundle);
    let max_chunk = plans.iter().map(|p| p.chunk).max().unwrap();
    let max_bodies = plans.iter().map(LayerPlan::bodies).max().unwrap();
    Session {
        remote,
        client: Client::new(ctx),
        plans,
        max_chunk,
        max_bodies,
        bundle,
        served,
    }
}

/// `BATCH` int8 rows of width `H`: entry (t, i) is `(t·a + i·b) mod 255 − 127`.
fn rows(a: usize, b: usize) -> Vec<Vec<i64>> {
    (0..BATCH)
        .map(|t| {
            (0..H)
                .map(|i| ((t * a + i * b) % 255) as i64 - 127)
                .collect()
        })
        .collect()
}

/// Decodes and decrypts a layer's reply under `plan`.
fn decrypt(client: &Client, plan: &LayerPlan, reply: &[u8]) -> Vec<Vec<i64>> {
    let out = EncryptedOutput::from_bytes(reply, reply.len(), plan, &client.key_id()).unwrap();
    client.decrypt(plan, &out).unwrap()
}

/// The key `blob` is never acknowledged and the cloud closes the session with InvalidRequest
/// (TDM-KEY-8).
fn assert_key_closes_session(remote: &RemoteLayers, blob: &[u8], what: &str) {
    assert!(remote.upload_key(blob).is_err(), "{what} acknowledged");
    match remote.take_error() {
        Some(DeviceError::Closed(ErrorCode::InvalidRequest)) => {}
        other => panic!("{what}: expected InvalidRequest, got {other:?}"),
    }
}

#[test]
fn a_key_with_fewer_bodies_than_the_plans_is_refused_and_the_honest_key_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = session(tmp.path(), 7);
    let max_bodies = s.max_bodies;
    assert!(
        max_bodies >= 2,
        "the premise: a shared-mask plan ({:?})",
        s.plans
    );

    // Enough automorphisms, too few bodies (one secret, up to one less than the plans
    // need): refused at registration, never acknowledged; v1 has no per-key refusal, so the
    // cloud closes that session with InvalidRequest (TDM-KEY-8) and a new one works.
    for bodies in 1..max_bodies {
        let short = s
            .client
            .evaluation_key_for(s.max_chunk, bodies)
            .unwrap()
            .to_bytes();
        assert_key_closes_session(
            &s.remote,
            &short,
            &format!("a {bodies}-body key for {max_bodies}-body plans"),
        );
        s.remote.close();
        s.remote = s.served.connect(&s.bundle);
    }

    // The honest key on a new session: every layer exact, the shared-mask one included.
    let honest = s
        .client
        .evaluation_key_for(s.max_chunk, max_bodies)
        .unwrap()
        .to_bytes();
    s.remote.upload_key(&honest).unwrap();
    let rows = rows(31, 7);
    for (index, (plan, &(_, n_in, n_out))) in s.plans.iter().zip(&LINEARS).enumerate() {
        let blob = s.client.encrypt(plan, &rows).unwrap().to_bytes();
        let reply = s
            .remote
            .request(index as u32, BATCH as u16, blob)
            .unwrap_or_else(|e| panic!("layer {index}: {e}"));
        assert_eq!(
            decrypt(&s.client, plan, &reply),
            product(&rows, n_in, n_out),
            "layer {index} ({} bodies)",
            plan.bodies()
        );
    }
    s.remote.close();
}

/// Byte offset of the body count r in a multi-body blob (kinds 4, 5, 6): after magic (4),
/// version (1), kind (1), parameter set (2) and key id (32) (specs/he-formats.md).
const R_AT: usize = 40;

#[test]
fn damaged_shared_mask_requests_and_keys_get_typed_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let Session {
        served,
        bundle,
        plans,
        max_chunk,
        max_bodies,
        mut client,
        remote,
    } = session(tmp.path(), 8);
    let honest = client
        .evaluation_key_for(max_chunk, max_bodies)
        .unwrap()
        .to_bytes();
    remote.upload_key(&honest).unwrap();
    let rows = rows(13, 5);
    // Layer 1 is the shared-mask one.
    let plan = plans[1];
    assert!(plan.bodies() >= 2, "{plan:?}");
    let good = client.encrypt(&plan, &rows).unwrap().to_bytes();
    assert_eq!((good[5], usize::from(good[R_AT])), (4, plan.bodies()));

    // Damaged kind-4 requests: a typed RequestError, the session continues (TDM-REQ-8).
    let mut damaged: Vec<(String, Vec<u8>, u16)> = vec![
        (
            "truncated by one byte".into(),
            good[..good.len() - 1].to_vec(),
            16,
        ),
        ("header only".into(), good[..=R_AT].to_vec(), 16),
        (
            "eight bytes appended".into(),
            [&good[..], &[0; 8]].concat(),
            16,
        ),
        ("batch of 8 declared".into(), good.clone(), 8),
    ];
    // Another layer's request is malformed here only when its input layout differs (same
    // chunk, rows, bodies and upload width make the same blob shape: a valid request for
    // this layer too — the frame, not the blob, names the layer).
    let other = client.encrypt(&plans[0], &rows).unwrap().to_bytes();
    if other.len() != good.len() {
        damaged.push(("layer 0's request".into(), other, 16));
    }
    for r in [0u8, 1, 3, 4, 8, 9, 255] {
        let mut b = good.clone();
        b[R_AT] = r;
        damaged.push((format!("r = {r}"), b, 16));
    }
    let mut single = good.clone();
    single[5] = 1;
    single.remove(R_AT);
    damaged.push(("kind 1 (single body)".into(), single, 16));
    for (what, blob, batch) in damaged {
        match remote.request(1, batch, blob) {
            Err(DeviceError::Refused(ErrorCode::MalformedMessage)) => {}
            other => panic!("{what}: expected MalformedMessage, got {other:?}"),
        }
        assert!(remote.is_open(), "{what} closed the session");
    }
    // Larger than the offered frame: refused before anything is sent.
    match remote.request(1, 16, [&good[..], &vec![0; 2 << 20]].concat()) {
        Err(DeviceError::Protocol(_)) => {}
        other => panic!("oversized request: {other:?}"),
    }
    let reply = remote.request(1, 16, good).unwrap();
    assert_eq!(
        decrypt(&client, &plan, &reply),
        product(&rows, H, H),
        "still exact after the refusals"
    );
    remote.close();

    // Damaged kind-6 keys: never acknowledged; the cloud closes that session with
    // InvalidRequest (TDM-KEY-8). Keys larger than the offered max_key_len (more bodies or a
    // wider chunk than the plans need) are not sent at all; the honest key fits exactly.
    assert_eq!((honest[5], usize::from(honest[R_AT])), (6, max_bodies));
    let mut keys: Vec<(String, Vec<u8>)> =
        vec![("truncated".into(), honest[..honest.len() - 1].to_vec())];
    for r in [0u8, 1, 3, 9, 255] {
        let mut k = honest.clone();
        k[R_AT] = r;
        keys.push((format!("r = {r}"), k));
    }
    for (what, blob) in keys {
        assert_key_closes_session(&served.connect(&bundle), &blob, &format!("key {what}"));
    }
    let remote = served.connect(&bundle);
    for (chunk, bodies) in [(max_chunk, max_bodies + 1), (2 * max_chunk, max_bodies)] {
        let big = client.evaluation_key_for(chunk, bodies).unwrap().to_bytes();
        assert!(big.len() > honest.len());
        assert!(remote.upload_key(&big).is_err(), "{chunk}/{bodies} sent");
        match remote.take_error() {
            Some(DeviceError::Protocol(_)) => {}
            other => panic!("key for chunk {chunk}, {bodies} bodies: {other:?}"),
        }
        assert!(remote.is_open());
    }
    remote.upload_key(&honest).unwrap();
    remote.close();
}

/// A careless operator: limits that cannot carry the served encoder bundle stop start-up with
/// an error naming the field, instead of a cloud that refuses (or cannot answer) every long
/// sentence.
#[test]
fn a_cloud_whose_limits_cannot_carry_the_bundle_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[9u8; 32]);
    let dir = tmp.path().join("bundle");
    write(&dir, &manifest(4), &key);
    let refused = |what: &str, edit: &dyn Fn(&mut ServerOptions)| match Served::try_start(
        tmp.path(),
        &dir,
        &key,
        edit,
    ) {
        Err(CloudError::Config(m)) => assert!(m.contains(what), "{what}: {m}"),
        Err(e) => panic!("{what}: expected a config error, got {e}"),
        Ok(_) => panic!("{what}: the cloud started"),
    };
    // The bundle is signed for 16 rows per request: devices send up to 16.
    refused("max_batch", &|o| o.resources.max_batch = (BATCH / 2) as u16);
    // A protocol cap below the largest answer: evaluated, then never sent.
    refused("max_ciphertext_len", &|o| {
        o.limits.max_ciphertext_len = 4096
    });
    // An explicit max_key_len one byte short of the honest shared-mask key (widest chunk and
    // most bodies): refused naming the field; exactly that size starts.
    let bundle =
        Bundle::load_part(&dir, &key.verifying_key(), &Limits::default(), Part::Device).unwrap();
    let plans = plans(&Context::new(DEFAULT_PARAMETERS), &bundle);
    let mut widest = plans[0];
    widest.chunk = plans.iter().map(|p| p.chunk).max().unwrap();
    widest.bodies = plans.iter().map(LayerPlan::bodies).max().unwrap();
    // The largest key the plans accept: the full one (every stride).
    widest.key_first_level = 1;
    let need = widest.eval_key_bytes() as u32;
    assert!(widest.bodies >= 2);
    refused("max_key_len", &|o| o.resources.max_key_len = Some(need - 1));
    // A prepared-key cache that cannot hold one prepared key: every request would prepare
    // the key again, so start-up is refused naming the field.
    refused("key_cache_bytes", &|o| {
        o.resources.key_cache_bytes = 1 << 20
    });
    drop(
        Served::try_start(tmp.path(), &dir, &key, |o| {
            o.resources.max_key_len = Some(need);
        })
        .unwrap_or_else(|e| panic!("max_key_len = {need}: {e}")),
    );
    // At the signed batch, and with a larger max_batch (the bundle's blobs stay sized for its
    // own batch), it starts.
    for rows in [BATCH, 64] {
        let served = Served::try_start(tmp.path(), &dir, &key, |o| {
            o.resources.max_batch = rows as u16;
        })
        .unwrap_or_else(|e| panic!("max_batch = {rows}: {e}"));
        drop(served);
    }
}

/// Cloud and device holding bundles that differ only in the signed `max_bodies` (so in their
/// plans): the digests differ and the handshake is refused with UnknownModel — no request is
/// ever evaluated under mismatched plans — and the error tells the user what to check.
#[test]
fn bundles_differing_only_in_max_bodies_are_refused_at_the_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[10u8; 32]);
    let served_dir = tmp.path().join("served");
    let other_dir = tmp.path().join("other");
    write(&served_dir, &manifest(4), &key);
    write(&other_dir, &manifest(2), &key);
    let vk = key.verifying_key();
    let other = Bundle::load_part(&other_dir, &vk, &Limits::default(), Part::Device).unwrap();
    let served_bundle =
        Bundle::load_part(&served_dir, &vk, &Limits::default(), Part::Device).unwrap();
    assert_eq!(other.id(), served_bundle.id());
    assert_ne!(other.digest(), served_bundle.digest());
    let served = Served::start(tmp.path(), &served_dir, &key);
    let r = RemoteLayers::connect(
        served.cloud.as_ref().unwrap().local_addr(),
        "localhost",
        client_config(served.pki.client_credentials("device-1").unwrap()).unwrap(),
        &other,
        OutputMode::Packed,
        &[DEFAULT_PARAMETERS.id],
        Duration::from_secs(60),
    );
    match r {
        Err(e @ DeviceError::Closed(ErrorCode::UnknownModel)) => {
            let text = e.to_string();
            assert!(
                text.contains("same signed bundle") && text.contains("--max-bodies"),
                "{text}"
            );
        }
        Err(e) => panic!("expected UnknownModel, got {e}"),
        Ok(_) => panic!("a session for a bundle the cloud does not serve"),
    }
    // The served bundle itself connects.
    served.connect(&served_bundle).close();
}
