//! Sentence embeddings from an encoder bundle for apps (issue 8): [`SentenceDevice`].
//!
//! An encoder bundle (`tandem model import-bert`: a signed manifest with an `[encoder]`
//! section, e.g. all-MiniLM-L6-v2) runs on the device with **every linear layer computed by
//! the cloud under encryption**: the device tokenises the text, runs embeddings, LayerNorms,
//! attention, GELU, pooling and normalisation itself, and sends each linear layer's int8
//! activations encrypted under its own HE key over one mutual-TLS session
//! ([`crate::RemoteLayers`]). The HE products are exact, so the embedding equals the bundle's
//! integer pipeline bit for bit.
//!
//! [`SentenceDevice::embed_batch`] pipelines across inferences (TDM-REQ-8): up to
//! [`SentenceDevice::pipeline`] sentences are encoded at once on as many threads, sharing the
//! session, so the cloud evaluates one sentence's layer while the device computes another's
//! device ops and encrypts its next request. Results come back in input order and equal the
//! sequential ones.
//!
//! The calls block the calling thread (the session has its own driver thread); from async
//! code call them through `tokio::task::spawn_blocking`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tandem_he::Context;
use tandem_model::{Bundle, Limits, Part};
use tandem_ops::{BundleEncoder, BundleLinears, OpsError};

pub use tandem_ops::Encoded;

use crate::remote::{RemoteLayers, DEFAULT_MAX_IN_FLIGHT};
use crate::{DeviceError, DeviceOptions};

/// One sentence's outcome in a pipelined batch.
type Slot = Mutex<Option<Result<Vec<f32>, DeviceError>>>;

/// Sentences in flight in [`SentenceDevice::embed_batch`] unless set otherwise.
pub const DEFAULT_PIPELINE: usize = 2;

/// Counters of a [`SentenceDevice`] since it connected.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct SentenceStats {
    /// Sentences embedded.
    pub sentences: u64,
    /// Requests answered by the cloud (one per linear layer per batch of tokens).
    pub round_trips: u64,
    /// Request frame bytes sent (protocol frames, TLS plaintext), key upload excluded.
    pub bytes_up: u64,
    /// Frame bytes received after the handshake.
    pub bytes_down: u64,
    /// Evaluation-key registration bytes sent (0 in no-key mode but the registration frame).
    pub key_upload_bytes: u64,
    /// Seconds of cloud evaluation the cloud reported (advisory; 0 if it does not report).
    pub cloud_eval_s: f64,
    /// Seconds from each request to its answer, summed over requests (see
    /// [`crate::RemoteStats::wait_s`]).
    pub wait_s: f64,
    /// Seconds the device spent quantising + encrypting requests, summed over threads.
    pub encrypt_s: f64,
    /// Seconds the device spent decrypting + dequantising answers, summed over threads.
    pub decrypt_s: f64,
    /// Multiply-adds the cloud computed under encryption.
    pub encrypted_macs: u64,
    /// Most requests in flight at once on the session (> 1 only when pipelining).
    pub max_in_flight: u64,
    /// Sessions re-established after the previous one ended.
    pub reconnects: u64,
}

/// A connected sentence encoder: the device part of a verified encoder bundle plus one mTLS
/// session to the cloud that serves its linear layers.
///
/// ```no_run
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::path::{Path, PathBuf};
/// use tandem_device::{DeviceOptions, SentenceDevice};
///
/// let tls = tandem_tls::client_config_from_files(
///     &tandem_tls::ClientFiles::from_pki_dir(Path::new("/etc/tandem/pki"), "device-1")?,
/// )?;
/// let key = tandem_model::read_verifying_key(Path::new("/etc/tandem/model-signer.pub"))?;
/// let opts = DeviceOptions::new(
///     "203.0.113.7:7443".parse()?,
///     tls,
///     PathBuf::from("/var/lib/app/models/minilm"),
///     key,
///     PathBuf::from("/var/lib/app/tandem/ledger.bin"), // unused by encoder bundles
/// );
/// let device = SentenceDevice::connect(&opts)?;
/// let v: Vec<f32> = device.embed("Where is the nearest pharmacy?")?; // [hidden], L2 norm 1
/// let vs = device.embed_batch(&["first sentence", "second sentence"])?; // in input order
/// println!("{} dims, {} sentences, {:?}", v.len(), vs.len(), device.stats());
/// device.close();
/// # Ok(()) }
/// ```
pub struct SentenceDevice {
    remote: Arc<RemoteLayers>,
    encoder: BundleEncoder,
    model: String,
    pipeline: usize,
    sentences: AtomicUsize,
}

impl std::fmt::Debug for SentenceDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceDevice")
            .field("model", &self.model)
            .field("mode", &self.remote.mode())
            .field("pipeline", &self.pipeline)
            .finish_non_exhaustive()
    }
}

fn pause(opts: &DeviceOptions, attempt: usize, started: Instant) -> bool {
    if attempt >= opts.retry.max_attempts {
        return false;
    }
    let d = opts.retry.backoff(attempt, rand::random::<f64>());
    if started.elapsed() + d > opts.retry.deadline {
        return false;
    }
    std::thread::sleep(d);
    true
}

impl SentenceDevice {
    /// Loads and verifies the device part of the encoder bundle in `opts.bundle_dir` (signed
    /// by `opts.verifying_key`), connects to the cloud at `opts.addr` with `opts.tls` (retrying
    /// per `opts.retry`), offers `opts.param_sets`, plans every linear layer from the signed
    /// manifest for `opts.output_mode` (as the cloud plans it) and, in packed mode, generates
    /// and uploads the evaluation key (a fresh HE key per connection; in no-key mode the HE
    /// key id is registered with the first request). `opts.io_timeout` bounds connects and
    /// each wait for an answer. The ledger, DP and state-directory options are not used: an
    /// encoder bundle releases nothing in the clear.
    ///
    /// Blocks (key generation takes about a second).
    ///
    /// # Errors
    /// [`DeviceError::Model`] if the bundle does not load or verify, [`DeviceError::Config`]
    /// if it is not an encoder bundle (use [`crate::Device`] for layer bundles),
    /// connection errors ([`DeviceError::Io`], [`DeviceError::Tls`], [`DeviceError::Timeout`],
    /// [`DeviceError::Closed`]) once the retries are spent, [`DeviceError::Encoder`] if a layer
    /// cannot be planned or the key generated; a refused key registration is
    /// [`DeviceError::Closed`] with the cloud's code (`InvalidRequest`: the model is not served
    /// in this output mode).
    pub fn connect(opts: &DeviceOptions) -> Result<Self, DeviceError> {
        let bundle = Bundle::load_part(
            &opts.bundle_dir,
            &opts.verifying_key,
            &Limits::default(),
            Part::Device,
        )?;
        if bundle.encoder().is_none() {
            return Err(DeviceError::Config(format!(
                "{} is not an encoder bundle (no [encoder] section): use Device for layer \
                 bundles, or make one with `tandem model import-bert`",
                opts.bundle_dir.display()
            )));
        }
        let started = Instant::now();
        let mut attempt = 0;
        let remote = loop {
            attempt += 1;
            match RemoteLayers::connect_with(
                opts.addr,
                &opts.server_name,
                opts.tls.clone(),
                &bundle,
                opts.output_mode,
                &opts.param_sets,
                opts.io_timeout,
                DEFAULT_MAX_IN_FLIGHT,
            ) {
                Ok(r) => break Arc::new(r),
                Err(e) if e.is_transient() && pause(opts, attempt, started) => {
                    tracing::warn!(error = %e, attempt, "cloud not reachable: retrying");
                }
                Err(e) => return Err(e),
            }
        };
        Self::with_remote(&bundle, remote)
    }

    /// A device over an established session `remote` for the encoder bundle `bundle` (its
    /// device part, verified): plans the layers for the session's output mode and parameter
    /// set and uploads the key in packed mode. [`SentenceDevice::connect`] without the
    /// bundle loading and the connect.
    ///
    /// # Errors
    /// As [`SentenceDevice::connect`] after the connect.
    pub fn with_remote(bundle: &Bundle, remote: Arc<RemoteLayers>) -> Result<Self, DeviceError> {
        let ctx = Arc::new(Context::new(remote.params()));
        let mode = remote.mode();
        let built = BundleEncoder::from_bundle(
            bundle,
            BundleLinears::Encrypted {
                ctx,
                mode,
                cloud: remote.clone(),
            },
        )
        .and_then(|encoder| encoder.upload_key().map(|_| encoder));
        let encoder = match built {
            Ok(e) => e,
            Err(e) => return Err(typed(&remote, e)),
        };
        Ok(SentenceDevice {
            remote,
            encoder,
            model: bundle.id().to_string(),
            pipeline: DEFAULT_PIPELINE,
            sentences: AtomicUsize::new(0),
        })
    }

    /// Sentences [`SentenceDevice::embed_batch`] keeps in flight (threads encoding at once).
    #[must_use]
    pub fn pipeline(&self) -> usize {
        self.pipeline
    }

    /// Sets [`SentenceDevice::pipeline`] (at least 1; 1 = one sentence after the other).
    /// More than the session's `max_in_flight` (8 by default) brings nothing: each sentence
    /// has one request in flight at a time.
    pub fn set_pipeline(&mut self, sentences: usize) {
        self.pipeline = sentences.max(1);
    }

    /// The bundle's model id.
    #[must_use]
    pub fn model_id(&self) -> &str {
        &self.model
    }

    /// Width of an embedding (the model's hidden size, e.g. 384).
    #[must_use]
    pub fn hidden(&self) -> usize {
        self.encoder.hidden()
    }

    /// Longest token sequence, special tokens included (longer texts are truncated).
    #[must_use]
    pub fn max_tokens(&self) -> usize {
        self.encoder.max_seq_length()
    }

    /// Cloud requests per sentence of up to the bundle's batch of tokens (one per linear layer).
    #[must_use]
    pub fn requests_per_chunk(&self) -> usize {
        self.encoder.linear_count()
    }

    /// The underlying encoder (its plans, tokenizer, HE counters) for tools that measure it.
    #[must_use]
    pub fn encoder(&self) -> &BundleEncoder {
        &self.encoder
    }

    /// The session to the cloud (its counters, its output mode).
    #[must_use]
    pub fn remote(&self) -> &Arc<RemoteLayers> {
        &self.remote
    }

    /// Tokenises `text` with the bundle's tokenizer (truncated to
    /// [`SentenceDevice::max_tokens`], special tokens included).
    ///
    /// # Errors
    /// [`DeviceError::Encoder`] if the tokenizer refuses the text.
    pub fn encode(&self, text: &str) -> Result<Encoded, DeviceError> {
        Ok(self.encoder.encode(text)?)
    }

    /// The embedding of `text`: `[hidden]` floats (L2-normalised when the model normalises,
    /// as all-MiniLM-L6-v2 does), equal bit for bit to the bundle's integer pipeline.
    ///
    /// # Errors
    /// [`DeviceError::Encoder`] for a text the tokenizer refuses or a device-side failure;
    /// the cloud's typed errors: [`DeviceError::Refused`] (the session continues),
    /// [`DeviceError::Closed`], [`DeviceError::Io`], [`DeviceError::Timeout`] (the next call
    /// reconnects).
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, DeviceError> {
        let e = self.encode(text)?;
        self.embed_encoded(&e)
    }

    /// [`SentenceDevice::embed`] of an already tokenised sequence (1..=`max_tokens` tokens).
    ///
    /// # Errors
    /// As [`SentenceDevice::embed`]; [`DeviceError::Encoder`] for an empty or over-long
    /// sequence.
    pub fn embed_encoded(&self, e: &Encoded) -> Result<Vec<f32>, DeviceError> {
        let v = self
            .encoder
            .embed_encoded(e)
            .map_err(|err| typed(&self.remote, err))?;
        self.sentences.fetch_add(1, Ordering::Relaxed);
        Ok(v.to_vec())
    }

    /// The embeddings of `texts`, in input order, with up to [`SentenceDevice::pipeline`]
    /// sentences in flight on the one session. Each equals [`SentenceDevice::embed`] of the
    /// same text.
    ///
    /// # Errors
    /// The first error any sentence met (as [`SentenceDevice::embed`]); sentences not yet
    /// started are then not sent.
    pub fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, DeviceError> {
        let encoded = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>, _>>()?;
        self.embed_batch_encoded(&encoded)
    }

    /// [`SentenceDevice::embed_batch`] of already tokenised sequences.
    ///
    /// # Errors
    /// As [`SentenceDevice::embed_batch`].
    pub fn embed_batch_encoded(&self, seqs: &[Encoded]) -> Result<Vec<Vec<f32>>, DeviceError> {
        let workers = self.pipeline.min(seqs.len());
        if workers <= 1 {
            return seqs.iter().map(|e| self.embed_encoded(e)).collect();
        }
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let results: Vec<Slot> = seqs.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let (Some(seq), Some(slot)) = (seqs.get(i), results.get(i)) else {
                            break;
                        };
                        let r = self.embed_encoded(seq);
                        if r.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
                    }
                });
            }
        });
        let mut out = Vec::with_capacity(seqs.len());
        let mut first_err = None;
        for slot in results {
            match slot.into_inner().unwrap_or_else(PoisonError::into_inner) {
                Some(Ok(v)) => out.push(v),
                Some(Err(e)) => {
                    // Prefer a typed session error over a thread whose cloud error's cause
                    // another thread already took.
                    let untyped =
                        |e: &DeviceError| matches!(e, DeviceError::Encoder(OpsError::Cloud { .. }));
                    if first_err
                        .as_ref()
                        .is_none_or(|f| untyped(f) && !untyped(&e))
                    {
                        first_err = Some(e);
                    }
                }
                None => {}
            }
        }
        match first_err {
            Some(e) => Err(e),
            None if out.len() == seqs.len() => Ok(out),
            None => Err(DeviceError::Config(
                "a sentence of the batch was not embedded".into(),
            )),
        }
    }

    /// The counters since the device connected.
    #[must_use]
    pub fn stats(&self) -> SentenceStats {
        let r = self.remote.stats();
        let he = self
            .encoder
            .session()
            .map(|s| s.stats())
            .unwrap_or_default();
        SentenceStats {
            sentences: self.sentences.load(Ordering::Relaxed) as u64,
            round_trips: r.round_trips,
            bytes_up: r.bytes_up,
            bytes_down: r.bytes_down,
            key_upload_bytes: r.key_upload_bytes,
            cloud_eval_s: r.cloud_eval_s,
            wait_s: r.wait_s,
            encrypt_s: he.encrypt_s,
            decrypt_s: he.decrypt_s,
            encrypted_macs: he.encrypted_macs,
            max_in_flight: r.max_in_flight,
            reconnects: r.reconnects,
        }
    }

    /// Closes the session cleanly (best effort).
    pub fn close(self) {
        self.remote.close();
    }
}

/// The typed cause of an encoder error: the session's own error when a cloud call failed.
fn typed(remote: &RemoteLayers, e: OpsError) -> DeviceError {
    match e {
        OpsError::Cloud { .. } => remote.take_error().unwrap_or(DeviceError::Encoder(e)),
        other => DeviceError::Encoder(other),
    }
}
