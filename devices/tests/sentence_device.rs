//! The app-facing sentence API over real mutual TLS (issue 8): [`SentenceDevice`] embeds
//! sentences equal bit for bit to the bundle's integer pipeline, in packed and no-key output
//! modes; a pipelined batch (several sentences in flight on one session, TDM-REQ-8) equals
//! the sequential results in input order; a cloud that drops the connection mid-batch or shuts
//! down gives a typed error, not a hang, and the next call reconnects; a cloud that does not
//! serve the model in no-key mode refuses its registration with a typed error.
//!
//! A tiny synthetic BERT (vocab 10, H 4, 1 layer, 2 heads, FFN 8, WordPiece tokenizer),
//! imported with `import_bert`, always runs; all-MiniLM-L6-v2 runs when the model is there
//! (`scripts/fetch-minilm.sh`, `TANDEM_MINILM_DIR`) and otherwise prints `SKIPPED: …`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tandem_cloud::ModelPolicy;
use tandem_device::{DeviceError, DeviceOptions, OutputMode, RetryPolicy, SentenceDevice};
use tandem_model::Part;
use tandem_ops::{BundleEncoder, BundleLinears};
use tandem_protocol::ErrorCode;

mod common;
use common::EncoderCloud as Setup;

/// Eight sentences of 3..=8 tokens (special tokens included) over the tiny vocabulary.
const TINY: [&str; 8] = [
    "hello world",
    "private cloud.",
    "hello private clouds",
    "world",
    "clouds of the world.",
    "hello hello world private",
    "private private.",
    "cloud hello world.",
];

/// The tiny checkpoint in the safetensors format (8-byte little-endian header length, JSON
/// header of dtype / shape / data offsets, then the little-endian f32 data).
fn checkpoint() -> Vec<u8> {
    let mut header = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    for (k, (name, shape)) in common::tiny::layout(false).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let start = data.len();
        for i in 0..n {
            data.extend((0.3 * ((k * 31 + i) as f32).sin()).to_le_bytes());
        }
        header.push(format!(
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":{shape:?},\"data_offsets\":[{start},{}]}}",
            data.len()
        ));
    }
    let mut h = format!("{{{}}}", header.join(",")).into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// A signed bundle of `src` (the tiny model when `None`; batch `batch` tokens per request) and
/// a loopback cloud serving it under `policy`.
fn setup(src: Option<&Path>, batch: usize, policy: ModelPolicy) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let model = match src {
        Some(dir) => dir.to_path_buf(),
        None => {
            let d = tmp.path().join("tiny-st");
            common::tiny::write_model_dir(&d, &checkpoint());
            d
        }
    };
    Setup::start(tmp, &model, "sentence-test", batch, 7, Some(policy))
}

impl Setup {
    fn options(&self, mode: OutputMode) -> DeviceOptions {
        let mut o = DeviceOptions::new(
            self.cloud().local_addr(),
            self.tls(),
            self.bundle.clone(),
            self.vk,
            self.tmp.path().join("unused-ledger.bin"),
        );
        o.output_mode = mode;
        o.param_sets = vec![tandem_he::DEFAULT_PARAMETERS.id];
        o.io_timeout = Duration::from_secs(60);
        o.retry = RetryPolicy::none();
        o
    }

    /// The bundle's integer pipeline (the reference).
    fn integer(&self) -> BundleEncoder {
        BundleEncoder::from_bundle(&self.load(Part::Full), BundleLinears::Integer).unwrap()
    }
}

#[test]
fn tiny_encoder_embeds_equal_the_integer_pipeline_in_both_output_modes() {
    let s = setup(None, 4, ModelPolicy::default());
    let integer = s.integer();
    for mode in [OutputMode::Packed, OutputMode::NoKey] {
        let device = SentenceDevice::connect(&s.options(mode)).unwrap();
        assert_eq!(device.hidden(), 4);
        for text in TINY {
            let e = device.embed(text).unwrap();
            assert_eq!(
                e,
                integer.embed(text).unwrap().to_vec(),
                "{mode:?}: {text:?} over mTLS vs the integer pipeline"
            );
        }
        let st = device.stats();
        assert_eq!(st.sentences, TINY.len() as u64);
        // Tokens per sentence 3..=8 at 4 rows per request: 1 or 2 requests per layer.
        let requests: usize = TINY
            .iter()
            .map(|t| device.encode(t).unwrap().ids.len().div_ceil(4) * device.requests_per_chunk())
            .sum();
        assert_eq!(st.round_trips, requests as u64, "{mode:?}");
        assert!(st.bytes_up > 0 && st.bytes_down > 0 && st.encrypted_macs > 0);
        // The cloud reports its evaluation time in every answer (TDM-EVAL-1). Not compared
        // with the device's wait: the two clocks start at different events, and on a loaded
        // machine the device may stamp a request after the cloud has begun on it.
        assert!(st.cloud_eval_s > 0.0, "{st:?}");
        assert_eq!(device.remote().stats().cloud_eval_reports, st.round_trips);
        match mode {
            // The packed key is the big upload; no-key registers the HE key id, an empty blob.
            OutputMode::Packed => assert!(st.key_upload_bytes > 10_000, "{st:?}"),
            OutputMode::NoKey => assert!(
                st.key_upload_bytes > 0 && st.key_upload_bytes < 1_000,
                "{st:?}"
            ),
        }
        device.close();
    }
}

#[test]
fn a_pipelined_batch_equals_the_sequential_results_in_order() {
    let s = setup(None, 4, ModelPolicy::default());
    let integer = s.integer();
    let mut device = SentenceDevice::connect(&s.options(OutputMode::Packed)).unwrap();
    device.set_pipeline(1);
    let sequential = device.embed_batch(&TINY).unwrap();
    let one = device.stats();
    assert_eq!(
        one.max_in_flight, 1,
        "pipeline 1 keeps one request in flight"
    );
    device.set_pipeline(4);
    // Reversed input: a batch that returned results in completion order or in the order of
    // the first batch would fail.
    let reversed: Vec<&str> = TINY.iter().rev().copied().collect();
    let pipelined = device.embed_batch(&reversed).unwrap();
    assert_eq!(pipelined.len(), TINY.len());
    for (i, text) in reversed.iter().enumerate() {
        let j = TINY.len() - 1 - i;
        assert_eq!(
            pipelined[i], sequential[j],
            "{text:?}: pipelined vs sequential"
        );
        assert_eq!(
            pipelined[i],
            integer.embed(text).unwrap().to_vec(),
            "{text:?}"
        );
    }
    let st = device.stats();
    assert_eq!(st.sentences, 2 * TINY.len() as u64);
    assert_eq!(
        st.round_trips,
        2 * one.round_trips,
        "same requests either way"
    );
    assert!(st.max_in_flight <= 4, "{st:?}");
    eprintln!(
        "pipeline 4: at most {} requests in flight at once",
        st.max_in_flight
    );
    device.close();
}

#[test]
fn a_cloud_that_drops_the_connection_mid_batch_gives_a_typed_error_then_reconnects() {
    let mut s = setup(None, 4, ModelPolicy::default());
    let integer = s.integer();
    let mut opts = s.options(OutputMode::Packed);
    opts.io_timeout = Duration::from_secs(20);
    let mut device = SentenceDevice::connect(&opts).unwrap();
    device.set_pipeline(4);
    assert_eq!(
        device.embed(TINY[0]).unwrap(),
        integer.embed(TINY[0]).unwrap().to_vec()
    );
    // The cloud closes the connection instead of answering the next request.
    s.cloud().inject_request_drops(1);
    match device.embed_batch(&TINY) {
        Err(DeviceError::Io(_) | DeviceError::Closed(_)) => {}
        other => panic!("a dropped connection mid-batch: expected a typed error, got {other:?}"),
    }
    // The next call opens a new session, registers the key again and is exact.
    let text = TINY[5];
    assert_eq!(
        device.embed(text).unwrap(),
        integer.embed(text).unwrap().to_vec()
    );
    assert!(device.stats().reconnects >= 1, "{:?}", device.stats());

    // A cloud that is gone: typed error (the reconnect is refused), no hang.
    s.shutdown();
    match device.embed_batch(&TINY) {
        Err(DeviceError::Io(_) | DeviceError::Closed(_)) => {}
        other => panic!("cloud shut down: expected a typed error, got {other:?}"),
    }
    device.close();
}

/// A loopback proxy to `upstream` that forwards everything until `mute` is set, then keeps
/// the connection open but delivers nothing more from the cloud (a cloud that stops
/// answering).
async fn muting_proxy(upstream: SocketAddr, mute: Arc<AtomicBool>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((down, _)) = l.accept().await {
            let mute = mute.clone();
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut dr, mut dw) = down.into_split();
                let (mut ur, mut uw) = up.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut dr, &mut uw).await;
                });
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match ur.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if !mute.load(Ordering::SeqCst) && dw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                // Never close the device's side: it must notice by itself.
                std::future::pending::<()>().await;
                drop(dw);
            });
        }
    });
    addr
}

#[test]
fn a_cloud_that_stops_answering_mid_batch_times_out_with_a_typed_error() {
    let s = setup(None, 4, ModelPolicy::default());
    let integer = s.integer();
    let mute = Arc::new(AtomicBool::new(false));
    let proxy =
        s.rt.block_on(muting_proxy(s.cloud().local_addr(), mute.clone()));
    let mut opts = s.options(OutputMode::Packed);
    opts.addr = proxy;
    // The device's request timeout (TDM-TIME-3) is its I/O timeout.
    opts.io_timeout = Duration::from_secs(10);
    let mut device = SentenceDevice::connect(&opts).unwrap();
    device.set_pipeline(4);
    assert_eq!(
        device.embed(TINY[2]).unwrap(),
        integer.embed(TINY[2]).unwrap().to_vec()
    );
    mute.store(true, Ordering::SeqCst);
    match device.embed_batch(&TINY) {
        Err(DeviceError::Timeout) => {}
        other => panic!("a cloud that stopped answering: expected Timeout, got {other:?}"),
    }
    device.close();
}

#[test]
fn a_cloud_that_serves_packed_only_refuses_no_key_with_a_typed_error() {
    let s = setup(
        None,
        4,
        ModelPolicy {
            packed: true,
            nokey: false,
        },
    );
    let device = SentenceDevice::connect(&s.options(OutputMode::NoKey)).unwrap();
    match device.embed(TINY[0]) {
        Err(DeviceError::Closed(ErrorCode::InvalidRequest)) => {}
        other => panic!("no-key on a packed-only model: {other:?}"),
    }
    device.close();
    // Packed is what this cloud expects: it works.
    let device = SentenceDevice::connect(&s.options(OutputMode::Packed)).unwrap();
    assert_eq!(
        device.embed(TINY[1]).unwrap(),
        s.integer().embed(TINY[1]).unwrap().to_vec()
    );
    device.close();
}

#[test]
fn minilm_sentence_device_pipelined_equals_the_integer_pipeline() {
    let Some(dir) = common::model_dir("the MiniLM SentenceDevice") else {
        return;
    };
    let s = setup(Some(&dir), 16, ModelPolicy::default());
    let integer = s.integer();
    let mut device = SentenceDevice::connect(&s.options(OutputMode::Packed)).unwrap();
    assert_eq!(device.hidden(), 384);
    device.set_pipeline(2);
    let texts = [
        "A man is playing a guitar.",
        "Private inference sends only ciphertexts to the cloud.",
    ];
    let got = device.embed_batch(&texts).unwrap();
    for (v, text) in got.iter().zip(texts) {
        assert_eq!(v, &integer.embed(text).unwrap().to_vec(), "{text:?}");
    }
    assert_eq!(device.stats().round_trips, 2 * 24);
    device.close();
}
