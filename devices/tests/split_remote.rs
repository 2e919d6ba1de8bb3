//! Split depth over real mutual TLS (issue 10, TDM-SPLIT-1, TDM-SPLIT-2): the cloud serves the
//! MiniLM encoder bundle; the device holds the bundle with its cloud weights file, runs blocks
//! `< k` in the clear and sends the linears of the others through one session
//! ([`RemoteLayers`]). At every depth the embedding equals the integer pipeline bit for bit,
//! the session carries exactly 4 requests per offloaded block, and its request bytes are what
//! the planner prices: the HE blobs of the public plans plus
//! [`ENCODER_FRAMING_BYTES`] per request.
//!
//! Without the model (`scripts/fetch-minilm.sh`, `TANDEM_MINILM_DIR`) the test prints
//! `SKIPPED: …` and checks nothing; with `TANDEM_MINILM_DIR` set a missing model is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::planner::ENCODER_FRAMING_BYTES;
use tandem_device::RemoteLayers;
use tandem_he::{Context, OutputMode};
use tandem_model::{Bundle, Limits, Part, SigningKey};
use tandem_ops::import::import_bert;
use tandem_ops::{default_model_dir, BundleEncoder, BundleLinears};
use tandem_tls::{client_config, server_config, DevPki};

fn model_dir(what: &str) -> Option<PathBuf> {
    let dir = default_model_dir();
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("TANDEM_MINILM_DIR").is_none(),
        "TANDEM_MINILM_DIR={} has no model.safetensors; run scripts/fetch-minilm.sh",
        dir.display()
    );
    eprintln!(
        "SKIPPED: no MiniLM model in {} (run scripts/fetch-minilm.sh); {what} was NOT checked",
        dir.display()
    );
    None
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn minilm_split_depths_over_mtls_equal_the_integer_pipeline_and_the_priced_bytes() {
    let Some(src) = model_dir("MiniLM split depths over mTLS") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bundle_dir = tmp.path().join("minilm");
    let key = SigningKey::from_bytes(&[6u8; 32]);
    import_bert(&src, &bundle_dir, "all-minilm-l6-v2", 16, &key).unwrap();
    let vk = key.verifying_key();

    let pki = DevPki::generate(1).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut o = ServerOptions::new(
        free_addr(),
        server_config(pki.server_credentials()).unwrap(),
        vk,
        tmp.path().join("keys.redb"),
    );
    o.models = vec![bundle_dir.clone()];
    let cloud: Cloud = rt.block_on(Cloud::start(o)).unwrap();

    // The device holds the cloud weights file too: it may run any prefix of blocks.
    let full = Bundle::load_part(&bundle_dir, &vk, &Limits::default(), Part::Full).unwrap();
    let tls = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    let remote = Arc::new(
        RemoteLayers::connect(
            cloud.local_addr(),
            "localhost",
            tls,
            &full,
            OutputMode::Packed,
            &[tandem_he::DEFAULT_PARAMETERS.id],
            Duration::from_secs(60),
        )
        .unwrap(),
    );
    let split = BundleEncoder::from_bundle(
        &full,
        BundleLinears::Encrypted {
            ctx: Arc::new(Context::new(remote.params())),
            mode: OutputMode::Packed,
            cloud: remote.clone(),
        },
    )
    .unwrap();
    split.upload_key().unwrap();
    assert_eq!(split.split_depths(), (0..=6).collect::<Vec<_>>());
    let integer = BundleEncoder::from_bundle(&full, BundleLinears::Integer).unwrap();

    let e = split
        .encode("Split inference keeps the first blocks on the device.")
        .unwrap();
    let reference = integer.embed_encoded(&e).unwrap();
    for k in [6, 5, 2, 0] {
        let before = remote.stats();
        let y = split.embed_encoded_split(&e, k).unwrap();
        let after = remote.stats();
        assert_eq!(y.to_vec(), reference.to_vec(), "split depth {k} over mTLS");
        let (requests, blob_up, blob_down) = split.offload_volume(e.ids.len(), k);
        assert_eq!(requests, 4 * (6 - k as u64), "k = {k}");
        assert_eq!(after.round_trips - before.round_trips, requests, "k = {k}");
        assert_eq!(
            after.bytes_up - before.bytes_up,
            blob_up + ENCODER_FRAMING_BYTES * requests,
            "k = {k}: request bytes on the wire differ from what the planner prices"
        );
        let down = after.bytes_down - before.bytes_down;
        assert!(
            down >= blob_down && down <= blob_down + 2 * ENCODER_FRAMING_BYTES * requests,
            "k = {k}: {down} B down for {blob_down} B of answers"
        );
    }
    remote.close();
    rt.block_on(cloud.shutdown());
}
