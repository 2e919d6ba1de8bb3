//! `DeviceSession` and `CloudSession`: sans-IO state machines (TDM-SES-*).
//!
//! Driving order (same for both sides), documented in `specs/protocol.md`:
//! 1. feed received bytes with `handle_input(bytes, now_ms)`;
//! 2. call `handle_timeout(now_ms)` when `poll_timeout()` has passed;
//! 3. drain `poll_transmit()` into the TLS stream and `poll_event()` into the
//!    application, until both return `None`.
//!
//! A fatal error is sticky: the session queues one `Close` carrying the
//! error's coarse code, enters [`SessionState::Closed`], and every later
//! `handle_input` returns the same error (TDM-ERR-3).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use sha2::{Digest, Sha256};

use crate::codec::Deframer;
use crate::limits::{HANDSHAKE_MAX_FRAME_LEN, MAX_KEYS_PER_SESSION};
use crate::message::{
    ClientHello, Close, InferRequest, InferResponse, KeyAck, KeyId, KeyRegister, Message,
    OutputMode, RequestError, RequestPayload, ResponsePayload, ServerHello,
};
use crate::{Error, ErrorCode, Limits, SUPPORTED_VERSIONS};

/// Most key ids from the cloud's key store one session accepts through
/// [`CloudSession::allow_key`] (TDM-KEY-7); bounds the session's memory, not
/// the registrations of TDM-KEY-6.
pub const MAX_STORED_KEYS_PER_SESSION: usize = 1024;

/// Identity of the TLS peer as established by the TLS layer, e.g. SHA-256 of
/// the peer's leaf certificate (TDM-KEY-4).
pub type PeerIdentity = [u8; 32];

/// Computes the key id of a key blob: `SHA-256(key_blob)` (TDM-KEY-2).
pub fn key_id_of(key_blob: &[u8]) -> KeyId {
    Sha256::digest(key_blob).into()
}

/// Coarse state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Hello not yet exchanged.
    Handshaking,
    /// Handshake complete; requests may flow.
    Ready,
    /// Closed; terminal (TDM-SES-3).
    Closed,
}

impl SessionState {
    fn name(self) -> &'static str {
        match self {
            SessionState::Handshaking => "Handshaking",
            SessionState::Ready => "Ready",
            SessionState::Closed => "Closed",
        }
    }
}

/// Outcome of the handshake, identical on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Protocol version in use.
    pub version: u16,
    /// Parameter-set id in use.
    pub param_set: u16,
    /// Model id.
    pub model_id: String,
    /// Model digest.
    pub model_digest: [u8; 32],
    /// Limits in force.
    pub limits: Limits,
}

/// Shared machinery: deframing, output queue, sticky error, activity time.
#[derive(Debug)]
struct Core {
    state: SessionState,
    deframer: Deframer,
    out: VecDeque<Vec<u8>>,
    error: Option<Error>,
    started_ms: u64,
    last_activity_ms: u64,
    close_sent: bool,
}

impl Core {
    fn new(now_ms: u64) -> Self {
        Core {
            state: SessionState::Handshaking,
            deframer: Deframer::default(),
            out: VecDeque::new(),
            error: None,
            started_ms: now_ms,
            last_activity_ms: now_ms,
            close_sent: false,
        }
    }

    fn closed_error(&self) -> Error {
        self.error.clone().unwrap_or(Error::Closed)
    }

    fn send_close(&mut self, code: ErrorCode) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        if let Ok(bytes) = Message::Close(Close { code }).encode() {
            self.out.push_back(bytes);
        }
    }

    /// TDM-ERR-3: a fatal error sends one Close with the coarse code, closes
    /// the session and is remembered.
    fn fail(&mut self, e: Error) -> Error {
        if self.state != SessionState::Closed {
            self.send_close(e.code());
            self.state = SessionState::Closed;
            self.error = Some(e.clone());
        }
        e
    }

    /// A `Close` from the peer: TDM-CLOSE-2, nothing is sent in reply.
    fn peer_closed(&mut self, code: ErrorCode) {
        self.close_sent = true;
        self.state = SessionState::Closed;
        if code != ErrorCode::NoError {
            self.error = Some(Error::PeerClosed(code));
        }
    }

    fn local_close(&mut self, code: ErrorCode) -> bool {
        if self.state == SessionState::Closed {
            return false;
        }
        self.send_close(code);
        self.state = SessionState::Closed;
        if code != ErrorCode::NoError {
            self.error = Some(Error::LocallyClosed(code));
        }
        true
    }

    fn unexpected(&self, m: &Message) -> Error {
        Error::UnexpectedMessage {
            message: m.msg_type().name(),
            state: self.state.name(),
        }
    }
}

fn check_config_lists(versions: &[u16], param_sets: &[u16], limits: &Limits) -> Result<(), Error> {
    if versions.is_empty() || versions.len() > crate::limits::MAX_LIST_LEN {
        return Err(Error::InvalidField {
            field: "config.versions",
        });
    }
    if param_sets.is_empty() || param_sets.len() > crate::limits::MAX_LIST_LEN {
        return Err(Error::InvalidField {
            field: "config.param_sets",
        });
    }
    limits.validate()
}

// ---------------------------------------------------------------- device --

/// Configuration of a [`DeviceSession`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Protocol versions offered.
    pub versions: Vec<u16>,
    /// Parameter-set ids offered, in preference order.
    pub param_sets: Vec<u16>,
    /// Model id requested.
    pub model_id: String,
    /// Expected model digest.
    pub model_digest: [u8; 32],
    /// Limits offered (the cloud may only lower them).
    pub limits: Limits,
    /// How long to wait for answers while requests are in flight (TDM-TIME-3).
    pub request_timeout_ms: u64,
}

impl DeviceConfig {
    /// Defaults: versions 2 and 1 ([`SUPPORTED_VERSIONS`]), parameter set 1, default limits,
    /// 10 min request timeout.
    pub fn new(model_id: impl Into<String>, model_digest: [u8; 32]) -> Self {
        DeviceConfig {
            versions: SUPPORTED_VERSIONS.to_vec(),
            param_sets: vec![1],
            model_id: model_id.into(),
            model_digest,
            limits: Limits::default(),
            request_timeout_ms: 600_000,
        }
    }
}

/// Events a [`DeviceSession`] reports to the application.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceEvent {
    /// The handshake completed.
    Connected(Negotiated),
    /// The cloud acknowledged a key registration.
    KeyAccepted {
        /// The key id.
        key_id: KeyId,
    },
    /// A response arrived.
    Response {
        /// Request answered.
        request_id: u64,
        /// Layer id.
        layer_id: u32,
        /// The cloud's measured evaluation time of the layer in microseconds, as reported
        /// (TDM-MSG-14): `None` in a version-1 session, `Some(0)` if the cloud did not measure.
        /// Advisory: use it for cost estimates only (TDM-EVAL-2).
        cloud_eval_us: Option<u32>,
        /// Results.
        payload: ResponsePayload,
    },
    /// The cloud failed one request; the session continues.
    RequestFailed {
        /// Request that failed.
        request_id: u64,
        /// Why.
        code: ErrorCode,
    },
    /// The session closed.
    Closed {
        /// Close code.
        code: ErrorCode,
        /// True if the peer sent the `Close`.
        by_peer: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    layer_id: u32,
    /// `Some(key)` if an encrypted response under `key` is expected.
    key_id: Option<KeyId>,
}

/// The device side of a session.
#[derive(Debug)]
pub struct DeviceSession {
    config: DeviceConfig,
    channel_binding: [u8; 32],
    core: Core,
    events: VecDeque<DeviceEvent>,
    negotiated: Option<Negotiated>,
    next_request_id: u64,
    in_flight: BTreeMap<u64, Pending>,
    pending_keys: BTreeSet<KeyId>,
}

impl DeviceSession {
    /// Creates a session and queues the `ClientHello` (TDM-SES-1).
    /// `channel_binding` is the 32-byte TLS exporter value of this
    /// connection (TDM-BIND-1).
    pub fn new(
        config: DeviceConfig,
        channel_binding: [u8; 32],
        now_ms: u64,
    ) -> Result<Self, Error> {
        check_config_lists(&config.versions, &config.param_sets, &config.limits)?;
        let hello = Message::ClientHello(ClientHello {
            versions: config.versions.clone(),
            param_sets: config.param_sets.clone(),
            model_id: config.model_id.clone(),
            model_digest: config.model_digest,
            channel_binding,
            limits: config.limits,
        });
        let bytes = hello.encode_checked(&handshake_limits(&config.limits))?;
        let mut core = Core::new(now_ms);
        core.out.push_back(bytes);
        Ok(DeviceSession {
            config,
            channel_binding,
            core,
            events: VecDeque::new(),
            negotiated: None,
            next_request_id: 1,
            in_flight: BTreeMap::new(),
            pending_keys: BTreeSet::new(),
        })
    }

    /// Current state.
    pub fn state(&self) -> SessionState {
        self.core.state
    }
    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.core.state == SessionState::Closed
    }
    /// The sticky error, if the session closed on an error.
    pub fn error(&self) -> Option<&Error> {
        self.core.error.as_ref()
    }
    /// Handshake outcome, once `Ready`.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }
    /// Number of requests awaiting an answer.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
    /// Bytes of an incomplete frame currently buffered.
    pub fn buffered(&self) -> usize {
        self.core.deframer.buffered()
    }

    /// Next frame to write to the TLS stream.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.core.out.pop_front()
    }
    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.events.pop_front()
    }
    /// Deadline (ms) at which `handle_timeout` must be called (TDM-TIME-*).
    pub fn poll_timeout(&self) -> Option<u64> {
        let base = self.core.last_activity_ms;
        match self.core.state {
            SessionState::Closed => None,
            // TDM-TIME-1: the handshake must finish within the idle timeout.
            SessionState::Handshaking => Some(
                self.core
                    .started_ms
                    .saturating_add(u64::from(self.config.limits.idle_timeout_ms)),
            ),
            SessionState::Ready => {
                let limits = self.limits();
                if self.in_flight.is_empty() {
                    Some(base.saturating_add(u64::from(limits.idle_timeout_ms)))
                } else {
                    // TDM-TIME-3: with requests in flight the device waits request_timeout_ms.
                    Some(base.saturating_add(self.config.request_timeout_ms))
                }
            }
        }
    }

    /// Reports the passage of time; closes with `IdleTimeout` once the
    /// deadline has passed (TDM-TIME-1, TDM-TIME-3).
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if let Some(deadline) = self.poll_timeout() {
            if now_ms >= deadline {
                let e = self.core.fail(Error::Timeout);
                self.push_closed(e.code(), false);
            }
        }
    }

    /// Feeds bytes received from the TLS stream.
    pub fn handle_input(&mut self, bytes: &[u8], now_ms: u64) -> Result<(), Error> {
        drive_input(self, bytes, now_ms)
    }

    /// Queues a `KeyRegister` for `key_blob` (TDM-KEY-*). For `Packed` the
    /// blob must be non-empty and `key_id` must equal [`key_id_of`]`(blob)`.
    /// Local errors are not fatal.
    pub fn register_key(
        &mut self,
        key_id: KeyId,
        output_mode: OutputMode,
        key_blob: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), Error> {
        let neg = self.ready()?;
        if !key_blob.is_empty() && key_id_of(&key_blob) != key_id {
            return Err(Error::KeyIdMismatch);
        }
        if self.pending_keys.len() >= MAX_KEYS_PER_SESSION {
            return Err(Error::LengthLimit {
                field: "keys",
                len: (self.pending_keys.len() as u64).saturating_add(1),
                max: MAX_KEYS_PER_SESSION as u64,
            });
        }
        let msg = Message::KeyRegister(KeyRegister {
            key_id,
            param_set: neg.param_set,
            output_mode,
            channel_binding: self.channel_binding,
            key_blob,
        });
        let bytes = msg.encode_checked(&neg.limits)?;
        self.pending_keys.insert(key_id);
        self.core.out.push_back(bytes);
        self.core.last_activity_ms = self.core.last_activity_ms.max(now_ms);
        Ok(())
    }

    /// Queues an `InferRequest` and returns its id (TDM-REQ-1). Fails
    /// without closing if not ready, if the in-flight limit is reached
    /// (TDM-REQ-4), or if the message would break a negotiated limit.
    pub fn send_request(
        &mut self,
        layer_id: u32,
        batch: u16,
        payload: RequestPayload,
        now_ms: u64,
    ) -> Result<u64, Error> {
        let neg = self.ready()?;
        if self.in_flight.len() >= usize::from(neg.limits.max_in_flight) {
            return Err(Error::InFlightLimit);
        }
        if let Some(enc) = payload.encrypted() {
            if enc.param_set != neg.param_set {
                return Err(Error::ParameterSetMismatch);
            }
        }
        let request_id = self.next_request_id;
        let key_id = payload.encrypted().map(|e| e.key_id);
        let msg = Message::InferRequest(InferRequest {
            request_id,
            layer_id,
            batch,
            payload,
        });
        let bytes = msg.encode_checked(&neg.limits)?;
        self.next_request_id = request_id.checked_add(1).ok_or(Error::InFlightLimit)?;
        self.in_flight
            .insert(request_id, Pending { layer_id, key_id });
        self.core.out.push_back(bytes);
        self.core.last_activity_ms = self.core.last_activity_ms.max(now_ms);
        Ok(request_id)
    }

    /// Closes the session, sending `Close(code)` (TDM-CLOSE-1).
    pub fn close(&mut self, code: ErrorCode) {
        if self.core.local_close(code) {
            self.push_closed(code, false);
        }
    }

    fn ready(&self) -> Result<Negotiated, Error> {
        match (self.core.state, &self.negotiated) {
            (SessionState::Ready, Some(n)) => Ok(n.clone()),
            (SessionState::Closed, _) => Err(self.core.closed_error()),
            _ => Err(Error::NotReady),
        }
    }

    fn limits(&self) -> Limits {
        match &self.negotiated {
            Some(n) => n.limits,
            None => self.config.limits,
        }
    }

    fn max_frame_len(&self) -> u32 {
        match &self.negotiated {
            Some(n) => n.limits.max_frame_len,
            // TDM-LIM-3: before the handshake, frames are at most 1024 bytes.
            None => HANDSHAKE_MAX_FRAME_LEN,
        }
    }

    fn fatal(&mut self, e: Error) -> Error {
        let e = self.core.fail(e);
        self.push_closed(e.code(), false);
        e
    }

    fn push_closed(&mut self, code: ErrorCode, by_peer: bool) {
        self.in_flight.clear();
        self.events.push_back(DeviceEvent::Closed { code, by_peer });
    }

    fn handle_message(&mut self, msg: Message) -> Result<(), Error> {
        match (self.core.state, msg) {
            (_, Message::Close(c)) => {
                self.core.peer_closed(c.code);
                self.push_closed(c.code, true);
                Ok(())
            }
            (SessionState::Handshaking, Message::ServerHello(h)) => self.on_server_hello(h),
            (SessionState::Ready, Message::KeyAck(a)) => {
                // TDM-KEY-5: a KeyAck must answer a pending registration.
                if !self.pending_keys.remove(&a.key_id) {
                    return Err(Error::UnexpectedMessage {
                        message: "KeyAck",
                        state: "Ready",
                    });
                }
                self.events
                    .push_back(DeviceEvent::KeyAccepted { key_id: a.key_id });
                Ok(())
            }
            (SessionState::Ready, Message::InferResponse(r)) => self.on_response(r),
            (SessionState::Ready, Message::RequestError(r)) => {
                // TDM-REQ-6: a RequestError must name a request in flight.
                if self.in_flight.remove(&r.request_id).is_none() {
                    return Err(Error::UnknownRequestId(r.request_id));
                }
                self.events.push_back(DeviceEvent::RequestFailed {
                    request_id: r.request_id,
                    code: r.code,
                });
                Ok(())
            }
            // TDM-SES-2: any other message in any state is a protocol violation.
            (_, m) => Err(self.core.unexpected(&m)),
        }
    }

    fn on_server_hello(&mut self, h: ServerHello) -> Result<(), Error> {
        // TDM-VER-2: the chosen version must be one the device offered.
        if !self.config.versions.contains(&h.version) {
            return Err(Error::NoCommonVersion);
        }
        // TDM-PAR-2: the chosen parameter set must be one the device offered.
        if !self.config.param_sets.contains(&h.param_set) {
            return Err(Error::ParameterSetMismatch);
        }
        // TDM-MOD-2: the cloud echoes exactly the model id and digest asked for.
        if h.model_id != self.config.model_id || h.model_digest != self.config.model_digest {
            return Err(Error::UnknownModel);
        }
        // TDM-LIM-1: the cloud may only lower the offered limits.
        if !h.limits.within(&self.config.limits) {
            return Err(Error::NegotiationViolation { field: "limits" });
        }
        let neg = Negotiated {
            version: h.version,
            param_set: h.param_set,
            model_id: h.model_id,
            model_digest: h.model_digest,
            limits: h.limits,
        };
        self.core.state = SessionState::Ready;
        self.negotiated = Some(neg.clone());
        self.events.push_back(DeviceEvent::Connected(neg));
        Ok(())
    }

    fn on_response(&mut self, r: InferResponse) -> Result<(), Error> {
        // TDM-REQ-5: a response must name a request in flight, once.
        let pending = *self
            .in_flight
            .get(&r.request_id)
            .ok_or(Error::UnknownRequestId(r.request_id))?;
        let param_set = self.negotiated.as_ref().map(|n| n.param_set);
        // TDM-REQ-7: the response matches its request: layer, kind, key id, parameter set.
        let ok = r.layer_id == pending.layer_id
            && match (&r.payload, pending.key_id) {
                (ResponsePayload::Encrypted(e), Some(k)) => {
                    e.key_id == k && Some(e.param_set) == param_set
                }
                (ResponsePayload::Plain(_), None) => true,
                _ => false,
            };
        if !ok {
            return Err(Error::ResponseMismatch(r.request_id));
        }
        self.in_flight.remove(&r.request_id);
        self.events.push_back(DeviceEvent::Response {
            request_id: r.request_id,
            layer_id: r.layer_id,
            cloud_eval_us: r.cloud_eval_us,
            payload: r.payload,
        });
        Ok(())
    }
}

fn handshake_limits(l: &Limits) -> Limits {
    Limits {
        max_frame_len: HANDSHAKE_MAX_FRAME_LEN,
        ..*l
    }
}

// ----------------------------------------------------------------- cloud --

/// A model the cloud serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// Model id.
    pub model_id: String,
    /// SHA-256 digest of its manifest.
    pub model_digest: [u8; 32],
}

/// Configuration of a [`CloudSession`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudConfig {
    /// Protocol versions supported.
    pub versions: Vec<u16>,
    /// Parameter-set ids supported, in the cloud's preference order.
    pub param_sets: Vec<u16>,
    /// Models served.
    pub models: Vec<ModelEntry>,
    /// The cloud's own limits (upper bounds for negotiation).
    pub limits: Limits,
}

impl CloudConfig {
    /// Defaults: versions 2 and 1 ([`SUPPORTED_VERSIONS`]), parameter set 1, default limits,
    /// the given models.
    pub fn new(models: Vec<ModelEntry>) -> Self {
        CloudConfig {
            versions: SUPPORTED_VERSIONS.to_vec(),
            param_sets: vec![1],
            models,
            limits: Limits::default(),
        }
    }
}

/// Events a [`CloudSession`] reports to the application.
#[derive(Debug, Clone, PartialEq)]
pub enum CloudEvent {
    /// The handshake completed.
    Connected(Negotiated),
    /// A key was registered; validate it and store it under `(peer, key_id)`
    /// (TDM-KEY-4), then answer with [`CloudSession::accept_key`] or
    /// [`CloudSession::refuse_key`] (TDM-KEY-8). No `KeyAck` is sent before that.
    KeyRegistered {
        /// TLS identity of the device.
        peer: PeerIdentity,
        /// Key id (verified against the blob when non-empty).
        key_id: KeyId,
        /// Parameter set.
        param_set: u16,
        /// Output mode served by this key.
        output_mode: OutputMode,
        /// Opaque key blob.
        key_blob: Vec<u8>,
    },
    /// A request to evaluate; answer with `send_response` or `send_request_error`.
    Request {
        /// TLS identity of the device.
        peer: PeerIdentity,
        /// The request.
        request: InferRequest,
    },
    /// The session closed.
    Closed {
        /// Close code.
        code: ErrorCode,
        /// True if the peer sent the `Close`.
        by_peer: bool,
    },
}

/// The cloud side of a session.
#[derive(Debug)]
pub struct CloudSession {
    config: CloudConfig,
    peer: PeerIdentity,
    channel_binding: [u8; 32],
    core: Core,
    events: VecDeque<CloudEvent>,
    negotiated: Option<Negotiated>,
    highest_request_id: u64,
    in_flight: BTreeMap<u64, Pending>,
    /// Keys registered in this session and accepted by the runtime (TDM-KEY-6 counts these
    /// together with `pending_keys`).
    known_keys: BTreeSet<KeyId>,
    /// Keys registered in this session, awaiting `accept_key` / `refuse_key` (TDM-KEY-8).
    pending_keys: BTreeSet<KeyId>,
    /// Keys loaded from the key store (TDM-KEY-7); they do not count against TDM-KEY-6.
    stored_keys: BTreeSet<KeyId>,
}

impl CloudSession {
    /// Creates a session for a TLS peer with identity `peer` and the
    /// connection's 32-byte exporter `channel_binding` (TDM-BIND-1).
    pub fn new(
        config: CloudConfig,
        peer: PeerIdentity,
        channel_binding: [u8; 32],
        now_ms: u64,
    ) -> Result<Self, Error> {
        check_config_lists(&config.versions, &config.param_sets, &config.limits)?;
        Ok(CloudSession {
            config,
            peer,
            channel_binding,
            core: Core::new(now_ms),
            events: VecDeque::new(),
            negotiated: None,
            highest_request_id: 0,
            in_flight: BTreeMap::new(),
            known_keys: BTreeSet::new(),
            pending_keys: BTreeSet::new(),
            stored_keys: BTreeSet::new(),
        })
    }

    /// Current state.
    pub fn state(&self) -> SessionState {
        self.core.state
    }
    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.core.state == SessionState::Closed
    }
    /// The sticky error, if the session closed on an error.
    pub fn error(&self) -> Option<&Error> {
        self.core.error.as_ref()
    }
    /// Handshake outcome, once `Ready`.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }
    /// The TLS identity of the peer.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }
    /// Number of accepted requests not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
    /// Bytes of an incomplete frame currently buffered.
    pub fn buffered(&self) -> usize {
        self.core.deframer.buffered()
    }

    /// Marks a key id, loaded from the key store under this session's peer
    /// identity, as usable without re-registration (TDM-KEY-7). The caller
    /// MUST only pass keys stored under [`CloudSession::peer`]. Stored keys do
    /// not count against the per-session registration limit (TDM-KEY-6); the
    /// runtime bounds them with its per-device quota.
    ///
    /// # Errors
    /// [`Error::LengthLimit`] (field `stored_keys`) past
    /// [`MAX_STORED_KEYS_PER_SESSION`] ids, which bounds the session's memory.
    pub fn allow_key(&mut self, key_id: KeyId) -> Result<(), Error> {
        if !self.stored_keys.contains(&key_id)
            && self.stored_keys.len() >= MAX_STORED_KEYS_PER_SESSION
        {
            return Err(Error::LengthLimit {
                field: "stored_keys",
                len: (self.stored_keys.len() as u64).saturating_add(1),
                max: MAX_STORED_KEYS_PER_SESSION as u64,
            });
        }
        self.stored_keys.insert(key_id);
        Ok(())
    }

    /// Key registrations received ([`CloudEvent::KeyRegistered`]) and not yet
    /// accepted or refused.
    pub fn pending_keys(&self) -> usize {
        self.pending_keys.len()
    }

    /// Acknowledges a pending registration: queues `KeyAck(key_id)` and makes
    /// the key usable in this session (TDM-KEY-8). Call it only once the key
    /// blob is decoded, validated and durably stored.
    ///
    /// # Errors
    /// [`Error::InvalidField`] (field `accept_key.key_id`) if `key_id` is not
    /// pending (not fatal); the sticky error if the session is closed.
    pub fn accept_key(&mut self, key_id: KeyId, now_ms: u64) -> Result<(), Error> {
        let neg = self.ready()?;
        if !self.pending_keys.contains(&key_id) {
            return Err(Error::InvalidField {
                field: "accept_key.key_id",
            });
        }
        let ack = Message::KeyAck(KeyAck { key_id }).encode_checked(&neg.limits)?;
        self.pending_keys.remove(&key_id);
        self.known_keys.insert(key_id);
        self.core.out.push_back(ack);
        self.core.last_activity_ms = self.core.last_activity_ms.max(now_ms);
        Ok(())
    }

    /// Refuses a pending registration (TDM-KEY-8): versions 1 and 2 have no per-key refusal
    /// message, so the session closes with `code` (e.g. `InvalidRequest` for
    /// a blob that does not decode or does not fit the plan, `LimitExceeded`
    /// for a key larger than the device's quota, `InternalError` if it could
    /// not be stored). `NoError` is replaced by `InternalError`.
    ///
    /// # Errors
    /// [`Error::InvalidField`] (field `refuse_key.key_id`) if `key_id` is not
    /// pending (nothing is closed then); the sticky error if already closed.
    pub fn refuse_key(&mut self, key_id: KeyId, code: ErrorCode) -> Result<(), Error> {
        if self.core.state == SessionState::Closed {
            return Err(self.core.closed_error());
        }
        if !self.pending_keys.remove(&key_id) {
            return Err(Error::InvalidField {
                field: "refuse_key.key_id",
            });
        }
        let code = if code == ErrorCode::NoError {
            ErrorCode::InternalError
        } else {
            code
        };
        self.close(code);
        Ok(())
    }

    /// Next frame to write to the TLS stream.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.core.out.pop_front()
    }
    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<CloudEvent> {
        self.events.pop_front()
    }
    /// Deadline (ms) at which `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.core.state {
            SessionState::Closed => None,
            // TDM-TIME-1: the ClientHello must arrive within the idle timeout.
            SessionState::Handshaking => Some(
                self.core
                    .started_ms
                    .saturating_add(u64::from(self.config.limits.idle_timeout_ms)),
            ),
            SessionState::Ready => {
                if self.in_flight.is_empty() {
                    // TDM-TIME-2: idle timeout counts only while nothing is owed.
                    let idle = self
                        .negotiated
                        .as_ref()
                        .map_or(self.config.limits.idle_timeout_ms, |n| {
                            n.limits.idle_timeout_ms
                        });
                    Some(self.core.last_activity_ms.saturating_add(u64::from(idle)))
                } else {
                    None
                }
            }
        }
    }

    /// Reports the passage of time; closes with `IdleTimeout` past the deadline.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if let Some(deadline) = self.poll_timeout() {
            if now_ms >= deadline {
                let e = self.core.fail(Error::Timeout);
                self.push_closed(e.code(), false);
            }
        }
    }

    /// Feeds bytes received from the TLS stream.
    pub fn handle_input(&mut self, bytes: &[u8], now_ms: u64) -> Result<(), Error> {
        drive_input(self, bytes, now_ms)
    }

    /// Answers an accepted request (TDM-REQ-3) without a measured evaluation time: in a
    /// version-2 session `cloud_eval_us` is sent as 0, "not measured" (TDM-MSG-14). A runtime
    /// that evaluates the layer uses [`CloudSession::send_response_timed`].
    ///
    /// # Errors
    /// As [`CloudSession::send_response_timed`].
    pub fn send_response(
        &mut self,
        request_id: u64,
        payload: ResponsePayload,
        now_ms: u64,
    ) -> Result<(), Error> {
        self.send_response_timed(request_id, payload, 0, now_ms)
    }

    /// Answers an accepted request (TDM-REQ-3) and reports `cloud_eval_us`, the wall time of
    /// the layer evaluation in microseconds measured by the caller, excluding queueing and I/O
    /// (TDM-EVAL-1; saturate longer times at `u32::MAX`). The field is on the wire only in a
    /// version-2 session; in a version-1 session it is dropped (TDM-VER-3).
    ///
    /// # Errors
    /// Fails without closing if not ready, if the id is not in flight
    /// ([`Error::UnknownRequestId`]), the payload does not match the request
    /// ([`Error::ResponseMismatch`], TDM-REQ-7), or it would break a negotiated limit.
    pub fn send_response_timed(
        &mut self,
        request_id: u64,
        payload: ResponsePayload,
        cloud_eval_us: u32,
        now_ms: u64,
    ) -> Result<(), Error> {
        let neg = self.ready()?;
        let pending = *self
            .in_flight
            .get(&request_id)
            .ok_or(Error::UnknownRequestId(request_id))?;
        let ok = match (&payload, pending.key_id) {
            (ResponsePayload::Encrypted(e), Some(k)) => {
                e.key_id == k && e.param_set == neg.param_set
            }
            (ResponsePayload::Plain(_), None) => true,
            _ => false,
        };
        if !ok {
            return Err(Error::ResponseMismatch(request_id));
        }
        // TDM-VER-3, TDM-MSG-14: the evaluation time travels only in the version-2 layout.
        let cloud_eval_us = (neg.version >= 2).then_some(cloud_eval_us);
        let msg = Message::InferResponse(InferResponse {
            request_id,
            layer_id: pending.layer_id,
            cloud_eval_us,
            payload,
        });
        let bytes = msg.encode_checked(&neg.limits)?;
        self.in_flight.remove(&request_id);
        self.core.out.push_back(bytes);
        self.core.last_activity_ms = self.core.last_activity_ms.max(now_ms);
        Ok(())
    }

    /// Fails one accepted request with `code` (not `NoError`); the session
    /// continues (TDM-REQ-6).
    pub fn send_request_error(
        &mut self,
        request_id: u64,
        code: ErrorCode,
        now_ms: u64,
    ) -> Result<(), Error> {
        let neg = self.ready()?;
        if !self.in_flight.contains_key(&request_id) {
            return Err(Error::UnknownRequestId(request_id));
        }
        let bytes =
            Message::RequestError(RequestError { request_id, code }).encode_checked(&neg.limits)?;
        self.in_flight.remove(&request_id);
        self.core.out.push_back(bytes);
        self.core.last_activity_ms = self.core.last_activity_ms.max(now_ms);
        Ok(())
    }

    /// Closes the session, sending `Close(code)` (TDM-CLOSE-1).
    pub fn close(&mut self, code: ErrorCode) {
        if self.core.local_close(code) {
            self.push_closed(code, false);
        }
    }

    fn ready(&self) -> Result<Negotiated, Error> {
        match (self.core.state, &self.negotiated) {
            (SessionState::Ready, Some(n)) => Ok(n.clone()),
            (SessionState::Closed, _) => Err(self.core.closed_error()),
            _ => Err(Error::NotReady),
        }
    }

    fn fatal(&mut self, e: Error) -> Error {
        let e = self.core.fail(e);
        self.push_closed(e.code(), false);
        e
    }

    fn push_closed(&mut self, code: ErrorCode, by_peer: bool) {
        self.in_flight.clear();
        self.events.push_back(CloudEvent::Closed { code, by_peer });
    }

    fn handle_message(&mut self, msg: Message) -> Result<(), Error> {
        match (self.core.state, msg) {
            (_, Message::Close(c)) => {
                self.core.peer_closed(c.code);
                self.push_closed(c.code, true);
                Ok(())
            }
            (SessionState::Handshaking, Message::ClientHello(h)) => self.on_client_hello(h),
            (SessionState::Ready, Message::KeyRegister(k)) => self.on_key_register(k),
            (SessionState::Ready, Message::InferRequest(r)) => self.on_request(r),
            // TDM-SES-2: any other message in any state is a protocol violation.
            (_, m) => Err(self.core.unexpected(&m)),
        }
    }

    fn on_client_hello(&mut self, h: ClientHello) -> Result<(), Error> {
        // TDM-BIND-2: the hello's channel binding must equal this connection's.
        if h.channel_binding != self.channel_binding {
            return Err(Error::ChannelBindingMismatch);
        }
        // TDM-VER-1: choose the highest version both sides support.
        let version = self
            .config
            .versions
            .iter()
            .filter(|v| h.versions.contains(v))
            .max()
            .copied()
            .ok_or(Error::NoCommonVersion)?;
        // TDM-MOD-1: model id and digest must both match a served model.
        let model_ok = self
            .config
            .models
            .iter()
            .any(|m| m.model_id == h.model_id && m.model_digest == h.model_digest);
        if !model_ok {
            return Err(Error::UnknownModel);
        }
        // TDM-PAR-1: first parameter set in the cloud's order that the device offered.
        let param_set = self
            .config
            .param_sets
            .iter()
            .find(|p| h.param_sets.contains(p))
            .copied()
            .ok_or(Error::ParameterSetMismatch)?;
        // TDM-LIM-1: limits in force are the element-wise minimum.
        let limits = self.config.limits.min(&h.limits);
        let reply = Message::ServerHello(ServerHello {
            version,
            param_set,
            model_id: h.model_id.clone(),
            model_digest: h.model_digest,
            limits,
        });
        let bytes = reply.encode_checked(&handshake_limits(&limits))?;
        self.core.out.push_back(bytes);
        let neg = Negotiated {
            version,
            param_set,
            model_id: h.model_id,
            model_digest: h.model_digest,
            limits,
        };
        self.core.state = SessionState::Ready;
        self.negotiated = Some(neg.clone());
        self.events.push_back(CloudEvent::Connected(neg));
        Ok(())
    }

    fn on_key_register(&mut self, k: KeyRegister) -> Result<(), Error> {
        let neg = self.ready()?;
        // TDM-BIND-3: a key registration carries this connection's channel binding.
        if k.channel_binding != self.channel_binding {
            return Err(Error::ChannelBindingMismatch);
        }
        // TDM-PAR-3: keys and ciphertexts use the negotiated parameter set.
        if k.param_set != neg.param_set {
            return Err(Error::ParameterSetMismatch);
        }
        // TDM-KEY-3: a non-empty blob's SHA-256 must equal the key id.
        if !k.key_blob.is_empty() && key_id_of(&k.key_blob) != k.key_id {
            return Err(Error::KeyIdMismatch);
        }
        // TDM-KEY-6: at most MAX_KEYS_PER_SESSION distinct keys registered per session;
        // keys loaded from the store (TDM-KEY-7) do not count.
        let registered = self
            .known_keys
            .len()
            .saturating_add(self.pending_keys.len());
        let already = self.known_keys.contains(&k.key_id) || self.pending_keys.contains(&k.key_id);
        if !already && registered >= MAX_KEYS_PER_SESSION {
            return Err(Error::LengthLimit {
                field: "keys",
                len: (registered as u64).saturating_add(1),
                max: MAX_KEYS_PER_SESSION as u64,
            });
        }
        if self.pending_keys.contains(&k.key_id) {
            // The same key is already awaiting the runtime's decision: one answer serves both.
            return Ok(());
        }
        // TDM-KEY-8: no KeyAck yet; the runtime answers with accept_key / refuse_key once
        // the blob is validated and stored.
        self.known_keys.remove(&k.key_id);
        self.pending_keys.insert(k.key_id);
        // TDM-KEY-4: the key is reported bound to the peer's TLS identity.
        self.events.push_back(CloudEvent::KeyRegistered {
            peer: self.peer,
            key_id: k.key_id,
            param_set: k.param_set,
            output_mode: k.output_mode,
            key_blob: k.key_blob,
        });
        Ok(())
    }

    fn on_request(&mut self, r: InferRequest) -> Result<(), Error> {
        let neg = self.ready()?;
        // TDM-REQ-2: request ids strictly increase; a replay or duplicate is fatal.
        if r.request_id <= self.highest_request_id {
            return Err(Error::DuplicateRequestId(r.request_id));
        }
        self.highest_request_id = r.request_id;
        // TDM-REQ-4: more than max_in_flight unanswered requests is fatal.
        if self.in_flight.len() >= usize::from(neg.limits.max_in_flight) {
            return Err(Error::InFlightLimit);
        }
        let key_id = match r.payload.encrypted() {
            Some(enc) => {
                // TDM-PAR-3: ciphertexts use the negotiated parameter set.
                if enc.param_set != neg.param_set {
                    return Err(Error::ParameterSetMismatch);
                }
                // TDM-KEY-5: an unknown key id fails the request, not the session. A key
                // still pending is passed on: its KeyRegistered event comes first, so the
                // runtime decides on the key before it sees the request.
                if !self.known_keys.contains(&enc.key_id)
                    && !self.pending_keys.contains(&enc.key_id)
                    && !self.stored_keys.contains(&enc.key_id)
                {
                    let bytes = Message::RequestError(RequestError {
                        request_id: r.request_id,
                        code: ErrorCode::UnknownKey,
                    })
                    .encode_checked(&neg.limits)?;
                    self.core.out.push_back(bytes);
                    return Ok(());
                }
                Some(enc.key_id)
            }
            None => None,
        };
        self.in_flight.insert(
            r.request_id,
            Pending {
                layer_id: r.layer_id,
                key_id,
            },
        );
        self.events.push_back(CloudEvent::Request {
            peer: self.peer,
            request: r,
        });
        Ok(())
    }
}

/// What [`drive_input`] needs from either side of the protocol.
trait Endpoint {
    fn core(&mut self) -> &mut Core;
    /// Largest frame accepted now (TDM-LIM-3: 1024 bytes before the handshake).
    fn frame_limit(&self) -> u32;
    /// Limits that bound message bodies now.
    fn body_limits(&self) -> Limits;
    /// Body layout to decode with (TDM-VER-3): the negotiated version, or before the
    /// handshake the highest version this side supports.
    fn wire_version(&self) -> u16;
    fn on_message(&mut self, msg: Message) -> Result<(), Error>;
    /// Records a fatal error (sticky) and queues the `Closed` event.
    fn on_fatal(&mut self, e: Error) -> Error;
}

/// Deframes, decodes and dispatches input bytes; shared by both session types.
fn drive_input<E: Endpoint>(ep: &mut E, bytes: &[u8], now_ms: u64) -> Result<(), Error> {
    // TDM-SES-3: nothing is processed after close.
    if ep.core().state == SessionState::Closed {
        return Err(ep.core().closed_error());
    }
    if !bytes.is_empty() {
        let core = ep.core();
        core.last_activity_ms = core.last_activity_ms.max(now_ms);
    }
    let mut input = bytes;
    loop {
        let max = ep.frame_limit();
        let frame = match ep.core().deframer.push(&mut input, max) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => return Err(ep.on_fatal(e)),
        };
        let limits = ep.body_limits();
        let msg = match Message::decode_body_version(frame.0, &frame.1, &limits, ep.wire_version())
        {
            Ok(m) => m,
            Err(e) => return Err(ep.on_fatal(e)),
        };
        if let Err(e) = ep.on_message(msg) {
            return Err(ep.on_fatal(e));
        }
        if ep.core().state == SessionState::Closed {
            // TDM-CLOSE-2: bytes after a Close are ignored.
            return match &ep.core().error {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            };
        }
    }
}

impl Endpoint for DeviceSession {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }
    fn frame_limit(&self) -> u32 {
        self.max_frame_len()
    }
    fn body_limits(&self) -> Limits {
        self.limits()
    }
    fn wire_version(&self) -> u16 {
        self.negotiated.as_ref().map_or_else(
            || self.config.versions.iter().copied().max().unwrap_or(1),
            |n| n.version,
        )
    }
    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        self.handle_message(msg)
    }
    fn on_fatal(&mut self, e: Error) -> Error {
        self.fatal(e)
    }
}

impl Endpoint for CloudSession {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }
    fn frame_limit(&self) -> u32 {
        match &self.negotiated {
            Some(n) => n.limits.max_frame_len,
            // TDM-LIM-3: before the handshake, frames are at most 1024 bytes.
            None => HANDSHAKE_MAX_FRAME_LEN,
        }
    }
    fn body_limits(&self) -> Limits {
        self.negotiated
            .as_ref()
            .map_or(self.config.limits, |n| n.limits)
    }
    fn wire_version(&self) -> u16 {
        self.negotiated.as_ref().map_or_else(
            || self.config.versions.iter().copied().max().unwrap_or(1),
            |n| n.version,
        )
    }
    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        self.handle_message(msg)
    }
    fn on_fatal(&mut self, e: Error) -> Error {
        self.fatal(e)
    }
}
