//! The accept loop and one task per connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_he::{Context, EncryptedInput, OutputMode, DEFAULT_PARAMETERS};
use tandem_model::VerifyingKey;
use tandem_protocol::{
    CloudConfig, CloudEvent, CloudSession, EncryptedBlock, ErrorCode, InferRequest, Limits,
    RequestPayload, ResponsePayload,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::keystore::KeyStore;
use crate::registry::ModelRegistry;
use crate::CloudError;

/// Admission limits; exceeding one is refused with a typed protocol code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Concurrent connections; more are closed with `Busy` after the handshake.
    pub max_connections: usize,
    /// Requests being evaluated per device identity (over all its connections); more fail
    /// with `Busy`.
    pub max_in_flight_per_device: usize,
    /// Payload bytes of one request; more fail with `LimitExceeded`.
    pub max_request_bytes: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
}

impl Default for AdmissionLimits {
    /// 256 connections, 8 in flight per device, 4 MiB per request, 10 s handshake.
    fn default() -> Self {
        AdmissionLimits {
            max_connections: 256,
            max_in_flight_per_device: 8,
            max_request_bytes: 4 << 20,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything [`Cloud::start`] needs.
#[derive(Clone)]
pub struct ServerOptions {
    /// Address to listen on (port 0 picks one).
    pub addr: SocketAddr,
    /// rustls server configuration (from [`tandem_tls::server_config`]).
    pub tls: Arc<tandem_tls::rustls::ServerConfig>,
    /// Key that model bundles must be signed with.
    pub verifying_key: VerifyingKey,
    /// Bundle directories to serve.
    pub models: Vec<PathBuf>,
    /// Path of the key-store database file.
    pub key_store: PathBuf,
    /// Admission limits.
    pub admission: AdmissionLimits,
    /// Protocol limits offered to devices.
    pub limits: Limits,
    /// Test hook: the first `n` requests are dropped by closing their connection unanswered.
    pub fault_drop_requests: u64,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("addr", &self.addr)
            .field("models", &self.models)
            .field("key_store", &self.key_store)
            .field("admission", &self.admission)
            .finish_non_exhaustive()
    }
}

impl ServerOptions {
    /// Options with default limits and no models yet.
    pub fn new(
        addr: SocketAddr,
        tls: Arc<tandem_tls::rustls::ServerConfig>,
        verifying_key: VerifyingKey,
        key_store: PathBuf,
    ) -> Self {
        ServerOptions {
            addr,
            tls,
            verifying_key,
            models: Vec::new(),
            key_store,
            admission: AdmissionLimits::default(),
            limits: Limits::default(),
            fault_drop_requests: 0,
        }
    }

    /// Adds a bundle directory.
    pub fn with_model(mut self, dir: PathBuf) -> Self {
        self.models.push(dir);
        self
    }
}

/// Counters of a running cloud.
#[derive(Debug, Default)]
pub struct Metrics {
    sessions_started: AtomicU64,
    tls_rejected: AtomicU64,
    key_registrations: AtomicU64,
    requests: AtomicU64,
    responses: AtomicU64,
    refusals: AtomicU64,
}

impl Metrics {
    /// Protocol sessions created (one per completed TLS handshake).
    pub fn sessions_started(&self) -> u64 {
        self.sessions_started.load(Ordering::Relaxed)
    }
    /// TLS handshakes that failed or were refused.
    pub fn tls_rejected(&self) -> u64 {
        self.tls_rejected.load(Ordering::Relaxed)
    }
    /// Key registrations stored.
    pub fn key_registrations(&self) -> u64 {
        self.key_registrations.load(Ordering::Relaxed)
    }
    /// Inference requests received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Successful responses sent.
    pub fn responses(&self) -> u64 {
        self.responses.load(Ordering::Relaxed)
    }
    /// Requests or connections refused by admission limits.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}

struct Shared {
    registry: ModelRegistry,
    keys: KeyStore,
    session_config: CloudConfig,
    admission: AdmissionLimits,
    metrics: Arc<Metrics>,
    connections: Arc<Semaphore>,
    in_flight: Mutex<HashMap<[u8; 32], usize>>,
    epoch: Instant,
    fault_drop: AtomicU64,
    max_blob: usize,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A running cloud server.
pub struct Cloud {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloud").field("addr", &self.addr).finish()
    }
}

impl Cloud {
    /// Loads and prepares the models, opens the key store, binds and starts accepting.
    pub async fn start(opts: ServerOptions) -> Result<Cloud, CloudError> {
        let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
        let (models, vk, ks, lim) = (
            opts.models.clone(),
            opts.verifying_key,
            opts.key_store.clone(),
            opts.limits,
        );
        let (registry, keys) = tokio::task::spawn_blocking(move || {
            let registry = ModelRegistry::load(ctx.clone(), &models, &vk)?;
            let keys = KeyStore::open(&ks, ctx, lim.max_key_len as usize)?;
            Ok::<_, CloudError>((registry, keys))
        })
        .await
        .map_err(|e| CloudError::Config(format!("start-up task failed: {e}")))??;
        let mut session_config = CloudConfig::new(registry.entries());
        session_config.limits = opts.limits;
        let listener = TcpListener::bind(opts.addr).await?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared {
            registry,
            keys,
            session_config,
            admission: opts.admission,
            metrics: metrics.clone(),
            connections: Arc::new(Semaphore::new(opts.admission.max_connections)),
            in_flight: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            fault_drop: AtomicU64::new(opts.fault_drop_requests),
            max_blob: opts.limits.max_ciphertext_len as usize,
        });
        let (tx, rx) = watch::channel(false);
        let acceptor = TlsAcceptor::from(opts.tls.clone());
        let task = tokio::spawn(accept_loop(listener, acceptor, shared.clone(), rx));
        tracing::info!(%addr, "cloud listening");
        Ok(Cloud {
            addr,
            metrics,
            shutdown: tx,
            task,
            shared,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Test hook: the next `n` requests are dropped by closing their connection unanswered.
    pub fn inject_request_drops(&self, n: u64) {
        self.shared.fault_drop.store(n, Ordering::SeqCst);
    }

    /// Protocol sessions created so far (0 while every TLS handshake is refused).
    pub fn sessions_started(&self) -> u64 {
        self.metrics.sessions_started()
    }

    /// Graceful shutdown: stop accepting, close every session with `NoError` after its
    /// in-flight answers, wait for the connection tasks, and release the key store.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        // Blocking evaluations may still hold the shared state briefly; wait so that the key
        // store file is closed when this returns.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&self.shared) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::info!(addr = %self.addr, "cloud stopped");
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer_addr)) => {
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(connection(tcp, peer_addr, acceptor.clone(), shared.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Decrements a device's in-flight count when an evaluation ends, however it ends.
struct InFlightGuard {
    shared: Arc<Shared>,
    peer: [u8; 32],
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.shared.in_flight.lock() {
            if let Some(n) = m.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.peer);
                }
            }
        }
    }
}

type Answer = (u64, Result<ResponsePayload, ErrorCode>);

async fn connection(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(shared.admission.handshake_timeout, acceptor.accept(tcp))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.metrics.tls_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer_addr, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            shared.metrics.tls_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer_addr, "TLS handshake timed out");
            return;
        }
    };
    let est = match tandem_tls::established(tls.get_ref().1) {
        Ok(e) => e,
        Err(e) => {
            shared.metrics.tls_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer_addr, error = %e, "TLS connection refused");
            return;
        }
    };
    let peer = est.peer.id();
    let device = est.peer.common_name().unwrap_or("?").to_string();
    let mut session = match CloudSession::new(
        shared.session_config.clone(),
        peer,
        est.channel_binding,
        shared.now_ms(),
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot create session");
            return;
        }
    };
    shared
        .metrics
        .sessions_started
        .fetch_add(1, Ordering::Relaxed);
    let (mut rd, mut wr) = tokio::io::split(tls);
    let _permit = match shared.connections.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            shared.metrics.refusals.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%device, "connection limit reached: refusing with Busy");
            session.close(ErrorCode::Busy);
            let _ = flush(&mut session, &mut wr).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    tracing::info!(%device, %peer_addr, "session started");
    // TDM-KEY-7: keys stored under this peer identity are usable without re-registration.
    match shared.keys.list(&peer, 16) {
        Ok(ids) => {
            for id in ids {
                let _ = session.allow_key(id);
            }
        }
        Err(e) => tracing::error!(error = %e, "key store listing failed"),
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
    let mut buf = vec![0u8; 64 * 1024];
    let mut closing = false;
    loop {
        if flush(&mut session, &mut wr).await.is_err() {
            break;
        }
        if session.is_closed() {
            break;
        }
        let deadline = session.poll_timeout();
        let sleep_for = deadline
            .map(|d| Duration::from_millis(d.saturating_sub(shared.now_ms())))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let now = shared.now_ms();
                    if let Err(e) = session.handle_input(&buf[..n], now) {
                        tracing::warn!(%device, error = %e, "session failed");
                    }
                    if !process_events(&mut session, &shared, &tx, &device).await {
                        break;
                    }
                }
            },
            Some((id, res)) = rx.recv() => {
                let now = shared.now_ms();
                let r = match res {
                    Ok(p) => {
                        shared.metrics.responses.fetch_add(1, Ordering::Relaxed);
                        session.send_response(id, p, now)
                    }
                    Err(code) => session.send_request_error(id, code, now),
                };
                if let Err(e) = r {
                    tracing::warn!(%device, request_id = id, error = %e, "cannot answer");
                    let _ = session.send_request_error(id, ErrorCode::InternalError, now);
                }
                if closing && session.in_flight() == 0 {
                    session.close(ErrorCode::NoError);
                }
            },
            _ = tokio::time::sleep(sleep_for), if deadline.is_some() => {
                session.handle_timeout(shared.now_ms());
            },
            r = shutdown.changed(), if !closing => {
                let _ = r;
                closing = true;
                if session.in_flight() == 0 {
                    session.close(ErrorCode::NoError);
                }
            },
        }
    }
    let _ = flush(&mut session, &mut wr).await;
    let _ = wr.shutdown().await;
    tracing::info!(%device, "session ended");
}

async fn flush(
    session: &mut CloudSession,
    wr: &mut WriteHalf<TlsStream<TcpStream>>,
) -> std::io::Result<()> {
    let mut any = false;
    while let Some(frame) = session.poll_transmit() {
        wr.write_all(&frame).await?;
        any = true;
    }
    if any {
        wr.flush().await?;
    }
    Ok(())
}

/// Handles queued events; false if the connection must be dropped (fault injection).
async fn process_events(
    session: &mut CloudSession,
    shared: &Arc<Shared>,
    tx: &mpsc::UnboundedSender<Answer>,
    device: &str,
) -> bool {
    while let Some(ev) = session.poll_event() {
        match ev {
            CloudEvent::Connected(n) => {
                tracing::debug!(%device, model = %n.model_id, "handshake complete");
            }
            CloudEvent::KeyRegistered {
                peer,
                key_id,
                output_mode,
                key_blob,
                ..
            } => {
                let sh = shared.clone();
                let mode = match output_mode {
                    tandem_protocol::OutputMode::NoKey => OutputMode::NoKey,
                    tandem_protocol::OutputMode::Packed => OutputMode::Packed,
                };
                let r = tokio::task::spawn_blocking(move || {
                    sh.keys.register(&peer, &key_id, mode, &key_blob)
                })
                .await;
                match r {
                    Ok(Ok(_)) => {
                        shared
                            .metrics
                            .key_registrations
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%device, "evaluation key stored");
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%device, error = %e, "key registration refused");
                        session.close(ErrorCode::InvalidRequest);
                    }
                    Err(e) => {
                        tracing::error!(%device, error = %e, "key registration task failed");
                        session.close(ErrorCode::InternalError);
                    }
                }
            }
            CloudEvent::Request { peer, request } => {
                shared.metrics.requests.fetch_add(1, Ordering::Relaxed);
                if shared
                    .fault_drop
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    tracing::warn!(%device, "fault injection: dropping connection");
                    return false;
                }
                admit(session, shared, tx, peer, request, device);
            }
            CloudEvent::Closed { code, by_peer } => {
                tracing::debug!(%device, ?code, by_peer, "session closed");
            }
        }
    }
    true
}

fn payload_bytes(p: &RequestPayload) -> usize {
    match p {
        RequestPayload::Encrypted(e) | RequestPayload::NoisedEncrypted { enc: e, .. } => {
            e.ciphertexts.iter().map(Vec::len).sum()
        }
        RequestPayload::Noised(n) => n.values.len().saturating_mul(4),
    }
}

fn admit(
    session: &mut CloudSession,
    shared: &Arc<Shared>,
    tx: &mpsc::UnboundedSender<Answer>,
    peer: [u8; 32],
    request: InferRequest,
    device: &str,
) {
    let id = request.request_id;
    let now = shared.now_ms();
    let refuse = |session: &mut CloudSession, code| {
        shared.metrics.refusals.fetch_add(1, Ordering::Relaxed);
        let _ = session.send_request_error(id, code, now);
    };
    if payload_bytes(&request.payload) > shared.admission.max_request_bytes {
        tracing::warn!(%device, request_id = id, "request too large");
        return refuse(session, ErrorCode::LimitExceeded);
    }
    let admitted = match shared.in_flight.lock() {
        Ok(mut m) => {
            let n = m.entry(peer).or_insert(0);
            if *n >= shared.admission.max_in_flight_per_device {
                false
            } else {
                *n += 1;
                true
            }
        }
        Err(_) => false,
    };
    if !admitted {
        tracing::warn!(%device, request_id = id, "too many requests in flight");
        return refuse(session, ErrorCode::Busy);
    }
    let guard = InFlightGuard {
        shared: shared.clone(),
        peer,
    };
    let Some(neg) = session.negotiated().cloned() else {
        return refuse(session, ErrorCode::InternalError);
    };
    let sh = shared.clone();
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let res = evaluate(&sh, &peer, &neg.model_id, &neg.model_digest, &request);
        let _ = tx.send((id, res));
    });
}

fn evaluate(
    shared: &Shared,
    peer: &[u8; 32],
    model_id: &str,
    digest: &[u8; 32],
    request: &InferRequest,
) -> Result<ResponsePayload, ErrorCode> {
    let model = shared
        .registry
        .get(model_id, digest)
        .ok_or(ErrorCode::UnknownModel)?;
    if request.layer_id != model.layer_id {
        return Err(ErrorCode::InvalidRequest);
    }
    let batch = usize::from(request.batch);
    let enc = match &request.payload {
        RequestPayload::Noised(n) => {
            let cl = model
                .bundle
                .cloud_layer()
                .map_err(|_| ErrorCode::InternalError)?;
            if n.values.len() != batch.saturating_mul(cl.n_in) {
                return Err(ErrorCode::InvalidRequest);
            }
            let mut out = Vec::with_capacity(batch * cl.n_out);
            for row in n.values.chunks(cl.n_in) {
                let q: Vec<i64> = row.iter().map(|&v| i64::from(v)).collect();
                out.extend(
                    model
                        .bundle
                        .cloud_eval_plain(&q)
                        .map_err(|_| ErrorCode::InvalidRequest)?,
                );
            }
            return Ok(ResponsePayload::Plain(out));
        }
        RequestPayload::Encrypted(e) | RequestPayload::NoisedEncrypted { enc: e, .. } => e,
    };
    let key = shared
        .keys
        .get(peer, &enc.key_id)
        .map_err(|e| {
            tracing::error!(error = %e, "key lookup failed");
            ErrorCode::InternalError
        })?
        .ok_or(ErrorCode::UnknownKey)?;
    let mode = match enc.output_mode {
        tandem_protocol::OutputMode::NoKey => OutputMode::NoKey,
        tandem_protocol::OutputMode::Packed => OutputMode::Packed,
    };
    if mode != key.mode {
        return Err(ErrorCode::InvalidRequest);
    }
    let layer = model.layer(mode);
    let [ct] = enc.ciphertexts.as_slice() else {
        return Err(ErrorCode::InvalidRequest);
    };
    let input = EncryptedInput::from_bytes(ct, shared.max_blob, layer.plan())
        .map_err(|_| ErrorCode::MalformedMessage)?;
    // The ciphertexts must be under the HE key registered for this peer and key id.
    if input.key_id != key.he_key_id {
        return Err(ErrorCode::UnknownKey);
    }
    if input.batch != batch {
        return Err(ErrorCode::InvalidRequest);
    }
    let out = layer
        .eval(
            &input,
            key.prepared.as_deref(),
            tandem_he::EvalOptions::default(),
        )
        .map_err(|e| {
            tracing::warn!(error = %e, "evaluation failed");
            ErrorCode::InvalidRequest
        })?;
    Ok(ResponsePayload::Encrypted(EncryptedBlock {
        param_set: enc.param_set,
        key_id: enc.key_id,
        output_mode: enc.output_mode,
        ciphertexts: vec![out.to_bytes()],
    }))
}
