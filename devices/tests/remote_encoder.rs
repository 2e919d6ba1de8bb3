//! all-MiniLM-L6-v2 end to end over real mutual TLS (issue 8): the cloud serves the signed
//! encoder bundle (cloud part: 24 int8 linear layers, each planned for the manifest's batch),
//! the device runs the graph with every linear layer encrypted through one session
//! ([`RemoteLayers`]), and each sentence embedding equals the cleartext integer pipeline bit
//! for bit. Wrong-layer and truncated requests get typed refusals and the session stays usable
//! (TDM-REQ-8: valid layer ids are the cloud layers' manifest indices; TDM-REQ-9: encoder
//! layers are planned for the manifest's batch and a blob must fit that layer's plan).
//!
//! Without the model (`scripts/fetch-minilm.sh`, `TANDEM_MINILM_DIR`) the test prints
//! `SKIPPED: …` and checks nothing; with `TANDEM_MINILM_DIR` set a missing model is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use tandem_device::DeviceError;
use tandem_he::Client;
use tandem_model::Part;
use tandem_ops::{BundleEncoder, BundleLinears};
use tandem_protocol::ErrorCode;

mod common;

const SENTENCES: [&str; 3] = [
    "A man is playing a guitar.",
    "Private inference sends only ciphertexts to the cloud.",
    "The weather is lovely today.",
];

#[test]
fn minilm_over_mtls_equals_the_integer_pipeline_and_refusals_keep_the_session() {
    let Some(src) = common::model_dir("MiniLM over mTLS") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::EncoderCloud::start(tmp, &src, "all-minilm-l6-v2", 16, 5, None);

    let device_part = c.load(Part::Device);
    let full = c.load(Part::Full);
    let (remote, ctx, encrypted) = c.remote_encoder(&device_part);
    let integer = BundleEncoder::from_bundle(&full, BundleLinears::Integer).unwrap();
    assert!(encrypted.upload_key().unwrap() > 0);
    assert!(remote.stats().key_upload_bytes > 0);

    for text in &SENTENCES[..2] {
        let e = encrypted.embed(text).unwrap();
        let i = integer.embed(text).unwrap();
        assert_eq!(
            e.to_vec(),
            i.to_vec(),
            "encrypted over mTLS vs integer: {text:?}"
        );
    }
    assert_eq!(
        remote.stats().round_trips,
        2 * 24,
        "24 layers, one request each per sentence"
    );

    // A layer id that is not a cloud layer of the model: refused, typed.
    match remote.request(24, 1, vec![0u8; 64]) {
        Err(DeviceError::Refused(ErrorCode::InvalidRequest)) => {}
        other => panic!("wrong layer id: {other:?}"),
    }
    // A genuine request for layer 0, truncated by one byte: refused, typed.
    let plan = encrypted.plans()[0];
    let mut client = Client::new(ctx);
    let row = vec![vec![1i64; 384]];
    let mut blob = client.encrypt(&plan, &row).unwrap().to_bytes();
    blob.pop();
    match remote.request(0, 1, blob) {
        Err(DeviceError::Refused(ErrorCode::MalformedMessage)) => {}
        other => panic!("truncated request: {other:?}"),
    }
    assert!(remote.is_open(), "refusals do not close the session");
    // The session is still usable and still exact.
    let e = encrypted.embed(SENTENCES[2]).unwrap();
    assert_eq!(e.to_vec(), integer.embed(SENTENCES[2]).unwrap().to_vec());

    remote.close();
    c.shutdown();
}
