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

use tandem_device::planner::ENCODER_FRAMING_BYTES;
use tandem_model::Part;
use tandem_ops::{BundleEncoder, BundleLinears};

mod common;

#[test]
fn minilm_split_depths_over_mtls_equal_the_integer_pipeline_and_the_priced_bytes() {
    let Some(src) = common::model_dir("MiniLM split depths over mTLS") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut c = common::EncoderCloud::start(tmp, &src, "all-minilm-l6-v2", 16, 6, None);

    // The device holds the cloud weights file too: it may run any prefix of blocks.
    let full = c.load(Part::Full);
    let (remote, _, split) = c.remote_encoder(&full);
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
    c.shutdown();
}
