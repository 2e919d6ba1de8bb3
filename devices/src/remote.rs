//! The cloud's linear layers of an encoder bundle over one mutual-TLS session (issue 8):
//! [`RemoteLayers`] implements [`tandem_ops::CloudLayers`], so a
//! [`tandem_ops::BundleEncoder`] built with it sends every linear layer of every sentence —
//! one request per layer per batch of tokens — through the same session.
//!
//! Each request carries the layer's protocol `layer_id` (its index in the manifest's
//! `encoder.linears`), the number of rows (`batch`, read from the ciphertext's header) and one
//! ciphertext blob; the reply is the encrypted product. Byte counts are protocol frame bytes
//! (what the TLS layer carries as plaintext; TLS record overhead is not included).
//!
//! Pipelining (issue 8 §2, TDM-REQ-8): the calls block their own thread only. A driver thread
//! (its own single-threaded tokio runtime) owns the session and keeps up to the negotiated
//! `max_in_flight` requests outstanding, so several sentences encoded on several threads share
//! one session: while the cloud evaluates one sentence's layer, the device computes another's
//! device ops and encrypts its next request. Answers are matched by request id, never by
//! order. Do not call from inside a tokio runtime's worker (use a plain thread or
//! `spawn_blocking`).
//!
//! Failures are typed and never hang: a refusal fails its one request
//! ([`DeviceError::Refused`], the session continues); a cloud that closes, drops the
//! connection or stops answering for the I/O timeout fails every request in flight
//! ([`DeviceError::Closed`], [`DeviceError::Io`], [`DeviceError::Timeout`]); the next request
//! reconnects and registers the key again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tandem_he::{EncryptedInput, LayerPlan, OutputMode, ParameterSet};
use tandem_model::Bundle;
use tandem_ops::{CloudLayers, OpsError, QuantizedWeights};
use tandem_protocol::{EncryptedBlock, ErrorCode, RequestPayload, ResponsePayload};

use crate::DeviceError;

mod driver;

use driver::{Driver, Job, Target};

/// Most requests a [`RemoteLayers`] keeps in flight on its session unless told otherwise
/// ([`RemoteLayers::connect_with`]); the negotiated `max_in_flight` caps it further.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;

/// Counters of a [`RemoteLayers`] session.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct RemoteStats {
    /// Requests answered (one round trip each; several may overlap when requests are
    /// pipelined).
    pub round_trips: u64,
    /// Request frame bytes sent (device → cloud), key upload excluded.
    pub bytes_up: u64,
    /// Frame bytes received (cloud → device) after the handshake.
    pub bytes_down: u64,
    /// Key-registration frame bytes sent (again after a reconnect).
    pub key_upload_bytes: u64,
    /// Seconds from sending each request to its answer, summed over the requests (cloud
    /// evaluation, queueing and transport; overlapping requests each count their own wait, so
    /// this can exceed the wall time of a pipelined batch).
    pub wait_s: f64,
    /// Seconds of evaluation the cloud reported in its answers (`InferResponse.cloud_eval_us`,
    /// advisory, TDM-EVAL-2), summed over the requests; 0 for a cloud that does not report it.
    pub cloud_eval_s: f64,
    /// Answers that carried a cloud-reported evaluation time.
    pub cloud_eval_reports: u64,
    /// Most requests that were in flight at once on the session (1 = no pipelining).
    pub max_in_flight: u64,
    /// Sessions re-established after the previous one ended (idle timeout, cloud restart).
    pub reconnects: u64,
}

/// One mTLS session serving the cloud layers of one encoder bundle, usable from several
/// threads at once: each call blocks its own thread until its answer arrives, while a driver
/// thread keeps up to `max_in_flight` requests outstanding on the one session and matches
/// answers to callers by request id (TDM-REQ-8).
pub struct RemoteLayers {
    jobs: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    open: Arc<AtomicBool>,
    params: ParameterSet,
    mode: OutputMode,
    n_layers: usize,
    plans: Mutex<Vec<Option<LayerPlan>>>,
    key_id: Mutex<Option<[u8; 32]>>,
    /// Serialises the lazy no-key registration (one per HE key).
    registering: Mutex<()>,
    stats: Arc<Mutex<RemoteStats>>,
    /// The first session-level error a [`CloudLayers`] call met (typed; see
    /// [`RemoteLayers::take_error`]).
    last_error: Mutex<Option<DeviceError>>,
}

impl std::fmt::Debug for RemoteLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteLayers")
            .field("params", &self.params.name)
            .field("mode", &self.mode)
            .field("n_layers", &self.n_layers)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn proto_mode(m: OutputMode) -> tandem_protocol::OutputMode {
    match m {
        OutputMode::NoKey => tandem_protocol::OutputMode::NoKey,
        OutputMode::Packed => tandem_protocol::OutputMode::Packed,
    }
}

impl RemoteLayers {
    /// Connects to the cloud at `addr` (TLS server name `server_name`, client credentials in
    /// `tls`) for the encoder bundle `bundle` (its id and digest are what the handshake
    /// names), offering `param_sets` (preference order), in HE output `mode`:
    /// * [`OutputMode::Packed`]: the key id is derived from the evaluation-key blob
    ///   ([`CloudLayers::upload_key`], before the first request);
    /// * [`OutputMode::NoKey`]: nothing is uploaded; the first request registers the HE
    ///   engine's key id with an empty blob (TDM-KEY-2), as the cloud expects.
    ///
    /// Each layer's plan is derived from the signed manifest alone, for the mode given, as the
    /// cloud derives it; a cloud that does not serve the model in that mode refuses the
    /// registration (the session closes: [`DeviceError::Closed`] with `InvalidRequest`).
    /// `io_timeout` bounds the connect, each handshake and the wait for answers.
    /// Keeps up to [`DEFAULT_MAX_IN_FLIGHT`] requests in flight.
    ///
    /// # Errors
    /// [`DeviceError::Config`] for a bundle without encoder, [`DeviceError::Io`] /
    /// [`DeviceError::Tls`] / [`DeviceError::Timeout`] when the cloud cannot be reached,
    /// [`DeviceError::Closed`] when it refuses the handshake (e.g. a model it does not serve),
    /// [`DeviceError::UnknownParameterSet`].
    pub fn connect(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<tandem_tls::rustls::ClientConfig>,
        bundle: &Bundle,
        mode: OutputMode,
        param_sets: &[u16],
        io_timeout: Duration,
    ) -> Result<Self, DeviceError> {
        Self::connect_with(
            addr,
            server_name,
            tls,
            bundle,
            mode,
            param_sets,
            io_timeout,
            DEFAULT_MAX_IN_FLIGHT,
        )
    }

    /// [`RemoteLayers::connect`] keeping at most `max_in_flight` (≥ 1) requests in flight.
    ///
    /// # Errors
    /// As [`RemoteLayers::connect`].
    #[allow(clippy::too_many_arguments)]
    pub fn connect_with(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<tandem_tls::rustls::ClientConfig>,
        bundle: &Bundle,
        mode: OutputMode,
        param_sets: &[u16],
        io_timeout: Duration,
        max_in_flight: usize,
    ) -> Result<Self, DeviceError> {
        let enc = bundle.encoder().ok_or_else(|| {
            DeviceError::Config(format!(
                "model {:?} is not an encoder bundle (no [encoder] section)",
                bundle.id()
            ))
        })?;
        let target = Target {
            addr,
            server_name: server_name.to_string(),
            tls,
            model_id: bundle.id().to_string(),
            model_digest: bundle.digest(),
            param_sets: param_sets.to_vec(),
            io_timeout,
            max_in_flight: max_in_flight.max(1),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let epoch = Instant::now();
        let conn = rt.block_on(driver::open(&target, epoch))?;
        let params = conn.2;
        let stats = Arc::new(Mutex::new(RemoteStats::default()));
        let open = Arc::new(AtomicBool::new(true));
        let driver = Driver::new(target, epoch, conn, stats.clone(), open.clone());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("tandem-remote".into())
            .spawn(move || rt.block_on(driver.run(rx)))?;
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            open,
            params,
            mode,
            n_layers: enc.linears.len(),
            plans: Mutex::new(vec![None; enc.linears.len()]),
            key_id: Mutex::new(None),
            registering: Mutex::new(()),
            stats,
            last_error: Mutex::new(None),
        })
    }

    /// The parameter set the handshake negotiated: build the device's HE context from it.
    #[must_use]
    pub fn params(&self) -> ParameterSet {
        self.params
    }

    /// The HE output mode of the session's requests.
    #[must_use]
    pub fn mode(&self) -> OutputMode {
        self.mode
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> RemoteStats {
        *lock(&self.stats)
    }

    /// Whether a session is established now (after it ended, the next request reconnects).
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed) && lock(&self.jobs).is_some()
    }

    /// The typed error behind the last failed [`CloudLayers`] call (whose [`OpsError`] only
    /// carries its text), taken: `None` afterwards.
    pub fn take_error(&self) -> Option<DeviceError> {
        lock(&self.last_error).take()
    }

    fn submit<T>(
        &self,
        job: impl FnOnce(std_mpsc::Sender<Result<T, DeviceError>>) -> Job,
    ) -> Result<T, DeviceError> {
        let (tx, rx) = std_mpsc::channel();
        {
            let jobs = lock(&self.jobs);
            let sender = jobs
                .as_ref()
                .ok_or(DeviceError::Closed(ErrorCode::NoError))?;
            sender
                .send(job(tx))
                .map_err(|_| DeviceError::Closed(ErrorCode::InternalError))?;
        }
        // The driver answers every job (or drops its sender when it stops): no hang.
        rx.recv()
            .map_err(|_| DeviceError::Closed(ErrorCode::InternalError))?
    }

    /// Sends one raw encrypted request — `layer_id`, `batch` rows, ciphertext `blob` — and
    /// returns the reply's ciphertext. What [`CloudLayers::evaluate`] does, with the cloud's
    /// answer typed (tests use it to send wrong or damaged requests). Several threads may
    /// call it at once: their requests are in flight together on the one session.
    ///
    /// # Errors
    /// [`DeviceError::Refused`] with the cloud's code when it refuses the request (the
    /// session stays usable), [`DeviceError::Closed`] if it closed the session,
    /// [`DeviceError::Timeout`] if it did not answer within the I/O timeout,
    /// [`DeviceError::Io`] if the connection broke, [`DeviceError::Config`] before a key was
    /// registered.
    pub fn request(
        &self,
        layer_id: u32,
        batch: u16,
        blob: Vec<u8>,
    ) -> Result<Vec<u8>, DeviceError> {
        let key_id = lock(&self.key_id).ok_or_else(|| {
            DeviceError::Config("upload the evaluation key before the first request".into())
        })?;
        let payload = RequestPayload::Encrypted(EncryptedBlock {
            param_set: self.params.id,
            key_id,
            output_mode: proto_mode(self.mode),
            ciphertexts: vec![blob],
        });
        let reply = self.submit(|reply| Job::Request {
            layer_id,
            batch,
            payload,
            reply,
        })?;
        match reply {
            ResponsePayload::Encrypted(block) => {
                match <[Vec<u8>; 1]>::try_from(block.ciphertexts) {
                    Ok([ct]) => Ok(ct),
                    Err(_) => Err(DeviceError::Refused(ErrorCode::MalformedMessage)),
                }
            }
            ResponsePayload::Plain(_) => Err(DeviceError::Refused(ErrorCode::MalformedMessage)),
        }
    }

    /// Registers `key_id` (`blob` empty in no-key mode) and waits for the cloud's `KeyAck`;
    /// returns the frame bytes sent.
    fn register(&self, key_id: [u8; 32], blob: Vec<u8>) -> Result<usize, DeviceError> {
        let mode = proto_mode(self.mode);
        let sent = self.submit(|reply| Job::Key {
            key_id,
            mode,
            blob,
            reply,
        })?;
        *lock(&self.key_id) = Some(key_id);
        Ok(sent)
    }

    /// No-key mode: registers the HE key `he_key_id` the requests are encrypted under, once.
    fn ensure_nokey(&self, he_key_id: [u8; 32]) -> Result<(), DeviceError> {
        let _one = lock(&self.registering);
        if *lock(&self.key_id) == Some(he_key_id) {
            return Ok(());
        }
        self.register(he_key_id, Vec::new()).map(|_| ())
    }

    fn fail(&self, index: usize, e: DeviceError) -> OpsError {
        let err = OpsError::Cloud {
            index,
            reason: format!("over the network: {e}"),
        };
        let mut last = lock(&self.last_error);
        if last.is_none() {
            *last = Some(e);
        }
        err
    }

    /// Closes the session cleanly (best effort) and stops the driver thread; later calls
    /// fail with [`DeviceError::Closed`].
    pub fn close(&self) {
        drop(lock(&self.jobs).take());
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for RemoteLayers {
    fn drop(&mut self) {
        self.close();
    }
}

impl CloudLayers for RemoteLayers {
    /// The cloud holds the weights from the signed bundle: only records `index`'s plan (to
    /// read the batch of each request) after checking `index` is one of the bundle's cloud
    /// layers.
    fn load(
        &self,
        index: usize,
        plan: &LayerPlan,
        _weights: &QuantizedWeights,
    ) -> Result<(), OpsError> {
        let mut plans = lock(&self.plans);
        match plans.get_mut(index) {
            Some(slot) => {
                *slot = Some(*plan);
                Ok(())
            }
            None => Err(OpsError::Cloud {
                index,
                reason: format!("the bundle has {} cloud layers", self.n_layers),
            }),
        }
    }

    fn upload_key(&self, key: &[u8]) -> Result<(), OpsError> {
        let key_id = tandem_protocol::key_id_of(key);
        self.register(key_id, key.to_vec())
            .map(|_| ())
            .map_err(|e| self.fail(0, e))
    }

    fn evaluate(&self, index: usize, request: &[u8]) -> Result<Vec<u8>, OpsError> {
        let plan = lock(&self.plans)
            .get(index)
            .copied()
            .flatten()
            .ok_or_else(|| OpsError::Cloud {
                index,
                reason: "layer not loaded".into(),
            })?;
        let he = |source| OpsError::He {
            layer: format!("cloud layer {index}"),
            source,
        };
        let input = EncryptedInput::from_bytes(request, request.len(), &plan).map_err(he)?;
        let batch = u16::try_from(input.batch).map_err(|_| OpsError::Cloud {
            index,
            reason: format!("batch of {} rows", input.batch),
        })?;
        let layer_id = u32::try_from(index).map_err(|_| OpsError::Cloud {
            index,
            reason: "layer index out of range".into(),
        })?;
        if self.mode == OutputMode::NoKey {
            self.ensure_nokey(input.key_id)
                .map_err(|e| self.fail(index, e))?;
        }
        self.request(layer_id, batch, request.to_vec())
            .map_err(|e| self.fail(index, e))
    }
}
