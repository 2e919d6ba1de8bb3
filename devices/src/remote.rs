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
//! The calls block: [`RemoteLayers`] drives its connection on its own single-threaded tokio
//! runtime, so it must not be used from inside another tokio runtime's worker (use a plain
//! thread, as the CLI does).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tandem_he::{EncryptedInput, LayerPlan, OutputMode, ParameterSet};
use tandem_model::Bundle;
use tandem_ops::{CloudLayers, OpsError, QuantizedWeights};
use tandem_protocol::{EncryptedBlock, ErrorCode, RequestPayload, ResponsePayload};

use crate::conn::{Conn, ConnectParams};
use crate::DeviceError;

/// Counters of a [`RemoteLayers`] session.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RemoteStats {
    /// Requests answered (one round trip each).
    pub round_trips: u64,
    /// Request frame bytes sent (device → cloud), key upload excluded.
    pub bytes_up: u64,
    /// Response frame bytes received (cloud → device).
    pub bytes_down: u64,
    /// Key-registration frame bytes sent.
    pub key_upload_bytes: u64,
    /// Seconds spent waiting for answers (cloud evaluation plus transport).
    pub wait_s: f64,
}

/// One mTLS session serving the cloud layers of one encoder bundle.
pub struct RemoteLayers {
    rt: tokio::runtime::Runtime,
    conn: Mutex<Option<Conn>>,
    params: ParameterSet,
    mode: OutputMode,
    n_layers: usize,
    plans: Mutex<Vec<Option<LayerPlan>>>,
    key_id: Mutex<Option<[u8; 32]>>,
    stats: Mutex<RemoteStats>,
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

fn cloud_err(index: usize, e: &DeviceError) -> OpsError {
    OpsError::Cloud {
        index,
        reason: format!("over the network: {e}"),
    }
}

impl RemoteLayers {
    /// Connects to the cloud at `addr` (TLS server name `server_name`, client credentials in
    /// `tls`) for the encoder bundle `bundle` (its id and digest are what the handshake
    /// names), offering `param_sets` (preference order). Only packed mode is supported: its
    /// key id is derived from the evaluation-key blob ([`CloudLayers::upload_key`]).
    ///
    /// # Errors
    /// [`DeviceError::Config`] for a bundle without encoder or a mode other than packed,
    /// [`DeviceError::Io`] / [`DeviceError::Tls`] / [`DeviceError::Timeout`] when the cloud
    /// cannot be reached, [`DeviceError::Closed`] when it refuses the handshake (e.g. a model
    /// it does not serve).
    pub fn connect(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<tandem_tls::rustls::ClientConfig>,
        bundle: &Bundle,
        mode: OutputMode,
        param_sets: &[u16],
        io_timeout: Duration,
    ) -> Result<Self, DeviceError> {
        let enc = bundle.encoder().ok_or_else(|| {
            DeviceError::Config(format!(
                "model {:?} is not an encoder bundle (no [encoder] section)",
                bundle.id()
            ))
        })?;
        if mode != OutputMode::Packed {
            return Err(DeviceError::Config(
                "remote encoder layers use packed mode (an evaluation key names the session's \
                 HE key)"
                    .into(),
            ));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let conn = rt.block_on(Conn::open(ConnectParams {
            addr,
            server_name,
            tls,
            model_id: bundle.id(),
            model_digest: bundle.digest(),
            param_sets,
            io_timeout,
            epoch: Instant::now(),
        }))?;
        let params = conn.params;
        Ok(Self {
            rt,
            conn: Mutex::new(Some(conn)),
            params,
            mode,
            n_layers: enc.linears.len(),
            plans: Mutex::new(vec![None; enc.linears.len()]),
            key_id: Mutex::new(None),
            stats: Mutex::new(RemoteStats::default()),
        })
    }

    /// The parameter set the handshake negotiated: build the device's HE context from it.
    #[must_use]
    pub fn params(&self) -> ParameterSet {
        self.params
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> RemoteStats {
        *lock(&self.stats)
    }

    /// Whether the session is still usable.
    #[must_use]
    pub fn is_open(&self) -> bool {
        lock(&self.conn).as_ref().is_some_and(Conn::is_open)
    }

    /// Sends one raw encrypted request — `layer_id`, `batch` rows, ciphertext `blob` — and
    /// returns the reply's ciphertext. What [`CloudLayers::evaluate`] does, with the cloud's
    /// answer typed (tests use it to send wrong or damaged requests).
    ///
    /// # Errors
    /// [`DeviceError::Refused`] with the cloud's code when it refuses the request (the
    /// session stays usable), [`DeviceError::Closed`] if it closed the session,
    /// [`DeviceError::Config`] before a key was uploaded, transport errors.
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
        let mut guard = lock(&self.conn);
        let conn = guard
            .as_mut()
            .ok_or(DeviceError::Closed(ErrorCode::NoError))?;
        let t = Instant::now();
        let (reply, up, down) = self
            .rt
            .block_on(conn.round_trip_batch(layer_id, batch, payload))?;
        let wait = t.elapsed().as_secs_f64();
        drop(guard);
        {
            let mut s = lock(&self.stats);
            s.round_trips += 1;
            s.bytes_up += up as u64;
            s.bytes_down += down as u64;
            s.wait_s += wait;
        }
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

    /// Closes the session cleanly (best effort).
    pub fn close(&self) {
        if let Some(conn) = lock(&self.conn).take() {
            self.rt.block_on(conn.close());
        }
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
        let mut guard = lock(&self.conn);
        let conn = guard.as_mut().ok_or_else(|| OpsError::Cloud {
            index: 0,
            reason: "session closed".into(),
        })?;
        let sent = self
            .rt
            .block_on(conn.upload_key(key_id, proto_mode(self.mode), key.to_vec()))
            .map_err(|e| OpsError::Cloud {
                index: 0,
                reason: format!("evaluation key refused: {e}"),
            })?;
        drop(guard);
        *lock(&self.key_id) = Some(key_id);
        lock(&self.stats).key_upload_bytes += sent as u64;
        Ok(())
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
        self.request(layer_id, batch, request.to_vec())
            .map_err(|e| cloud_err(index, &e))
    }
}
