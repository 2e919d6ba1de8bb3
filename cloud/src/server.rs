//! The accept loop and one task per connection.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_he::{
    Context, EncryptedInput, OutputMode, ParameterSet, ALL_PARAMETER_SETS, DEFAULT_PARAMETERS,
};
use tandem_model::VerifyingKey;
use tandem_protocol::{
    CloudConfig, CloudEvent, CloudSession, EncryptedBlock, ErrorCode, InferRequest, Limits,
    Negotiated, RequestPayload, ResponsePayload, SessionState, FRAME_HEADER_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::server::{StartHandshake, TlsStream};
use tokio_rustls::LazyConfigAcceptor;

use crate::keystore::{KeyBackend, KeyQuota, KeyStore};
use crate::metrics::Prom;
use crate::pg_store::{PgConfig, PgStore};
use crate::redb_store::RedbStore;
use crate::registry::{ModelPolicy, ModelRegistry, ModelSpec, WireSizes};
use crate::CloudError;

/// Admission limits; exceeding one is refused with a typed protocol code where a session
/// exists (`Busy`, `LimitExceeded`, `IdleTimeout`), by closing the TCP connection before any
/// TLS work otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Concurrent sessions; more are closed with `Busy` after the handshake.
    pub max_connections: usize,
    /// Concurrent sessions per device identity (TLS certificate); more are closed with `Busy`
    /// after the handshake, so one certificate cannot hold every slot.
    pub max_connections_per_identity: usize,
    /// TLS handshakes in progress; a connection whose complete ClientHello arrives beyond this
    /// is closed before any cryptographic work.
    pub max_handshakes: usize,
    /// TCP connections accepted and waiting for their complete TLS ClientHello (the
    /// pre-handshake stage); they hold no handshake slot. When full, the OLDEST waiting
    /// connection is closed to make room, so silent or slow sockets can never keep a new
    /// connection out.
    pub max_pending: usize,
    /// Time allowed, after `accept`, for the complete TLS ClientHello; a connection that has
    /// not sent it by then (silent, or one byte and a stall) is closed without having taken a
    /// handshake slot.
    pub client_hello_timeout: Duration,
    /// Requests being evaluated per device identity (over all its connections); more fail
    /// with `Busy`.
    pub max_in_flight_per_device: usize,
    /// Payload bytes of one request; more fail with `LimitExceeded`. 0: the largest payload
    /// the served models need for `max_batch` rows (derived at start-up).
    pub max_request_bytes: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed, after the TLS handshake, for the complete `ClientHello`; the session is
    /// then closed with `IdleTimeout`.
    pub first_message_timeout: Duration,
}

impl Default for AdmissionLimits {
    /// 256 sessions, 8 per identity, 64 handshakes, 1024 connections waiting for their
    /// ClientHello (1 s each), 8 requests in flight per device, request size derived from the models,
    /// 10 s handshake, 5 s for the first message.
    fn default() -> Self {
        AdmissionLimits {
            max_connections: 256,
            max_connections_per_identity: 8,
            max_handshakes: 64,
            max_pending: 1024,
            client_hello_timeout: Duration::from_secs(1),
            max_in_flight_per_device: 8,
            max_request_bytes: 0,
            handshake_timeout: Duration::from_secs(10),
            first_message_timeout: Duration::from_secs(5),
        }
    }
}

/// Memory bounds that follow from the served models (issue 12 item 6; `specs/operations.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// Largest batch a request may carry; the frame and ciphertext limits are derived from it.
    pub max_batch: u16,
    /// Frame limit offered to devices; `None`: derived from the served models (the largest
    /// KeyRegister, request or response they need).
    pub max_frame_len: Option<u32>,
    /// Key-blob limit offered to devices; `None`: the largest evaluation key the served
    /// models' packed plans need.
    pub max_key_len: Option<u32>,
    /// Per-device quota of stored keys (TDM-KEY-9).
    pub key_quota: KeyQuota,
    /// Bytes of prepared evaluation keys kept in memory (least recently used evicted).
    pub key_cache_bytes: usize,
}

impl Default for ResourceLimits {
    /// Batches of 16, derived frame and key limits, default quota, 256 MiB of prepared keys.
    fn default() -> Self {
        ResourceLimits {
            max_batch: 16,
            max_frame_len: None,
            max_key_len: None,
            key_quota: KeyQuota::default(),
            key_cache_bytes: 256 << 20,
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
    /// Output-mode policy per bundle directory (absent: both modes).
    pub policies: Vec<(PathBuf, ModelPolicy)>,
    /// Parameter-set ids served, in preference order (each must be in
    /// [`tandem_he::ALL_PARAMETER_SETS`]); empty: all of them, [`tandem_he::DEFAULT_PARAMETERS`]
    /// first.
    pub param_sets: Vec<u16>,
    /// Path of the key-store database file (the embedded `redb` store; unused when
    /// `postgres` is set).
    pub key_store: PathBuf,
    /// The shared PostgreSQL key store instead of the `redb` file (issue 13).
    pub postgres: Option<PgConfig>,
    /// Keys unused for this long expire (`None`: never).
    pub key_expiry: Option<Duration>,
    /// Plain-HTTP address for `/healthz` and `/metrics` (`None`: not served).
    pub metrics_addr: Option<SocketAddr>,
    /// How often readiness (a key-store ping) is checked and expired keys are swept.
    pub health_interval: Duration,
    /// Admission limits.
    pub admission: AdmissionLimits,
    /// Memory bounds.
    pub resources: ResourceLimits,
    /// Upper bounds for the protocol limits offered to devices (the derived limits are
    /// lowered to these).
    pub limits: Limits,
    /// Test hook: the first `n` requests are dropped by closing their connection unanswered.
    pub fault_drop_requests: u64,
    /// Test hook: every layer evaluation takes at least this long (the evaluation sleeps inside
    /// its timed window, as a slower or overloaded replica would), so the `cloud_eval_us` it
    /// reports (TDM-EVAL-1) includes it. Zero (the default): no delay.
    pub fault_eval_delay: Duration,
    /// Spread each encrypted evaluation over rayon's global thread pool (its size is the
    /// process's choice, e.g. `tandem bench sentence --threads`); default: one thread per
    /// request, requests in parallel.
    pub parallel_eval: bool,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("addr", &self.addr)
            .field("models", &self.models)
            .field("policies", &self.policies)
            .field("param_sets", &self.param_sets)
            .field("key_store", &self.key_store)
            .field("postgres", &self.postgres)
            .field("key_expiry", &self.key_expiry)
            .field("metrics_addr", &self.metrics_addr)
            .field("admission", &self.admission)
            .field("resources", &self.resources)
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
            policies: Vec::new(),
            param_sets: Vec::new(),
            key_store,
            postgres: None,
            key_expiry: None,
            metrics_addr: None,
            health_interval: Duration::from_millis(500),
            admission: AdmissionLimits::default(),
            resources: ResourceLimits::default(),
            limits: Limits::default(),
            fault_drop_requests: 0,
            fault_eval_delay: Duration::ZERO,
            parallel_eval: false,
        }
    }

    /// Adds a bundle directory.
    pub fn with_model(mut self, dir: PathBuf) -> Self {
        self.models.push(dir);
        self
    }

    /// Sets the output modes served for a bundle directory.
    pub fn with_policy(mut self, dir: PathBuf, policy: ModelPolicy) -> Self {
        self.policies.retain(|(d, _)| *d != dir);
        self.policies.push((dir, policy));
        self
    }
}

/// The protocol limits the cloud offers for `sizes` (from [`ModelRegistry::wire_sizes`]):
/// frames just large enough for the largest KeyRegister, request and response the served
/// models need (exact HE blob sizes plus the message layout), one ciphertext per message,
/// `max_batch` rows; the derived values are lowered to `cap` field by field; explicit
/// `resources.max_frame_len` / `max_key_len` replace the derived ones and are kept as given.
///
/// # Errors
/// [`CloudError::Config`] if a limit leaves the protocol's domain (TDM-LIM-2): an explicit
/// `max_frame_len` outside `4096..=268435456` is refused (not clamped), and a key limit
/// smaller than the served models' largest evaluation key is refused with the size needed;
/// likewise a `max_batch` below a served encoder bundle's signed batch (its devices send
/// that many rows per request, TDM-REQ-9) and a `cap` whose `max_ciphertext_len` or
/// `max_elements` cannot carry the served models' largest request or answer (the cloud
/// would evaluate requests whose answers it cannot send).
pub fn derive_limits(
    sizes: &WireSizes,
    resources: &ResourceLimits,
    cap: &Limits,
) -> Result<Limits, CloudError> {
    use tandem_protocol::limits::{HARD_MAX_FRAME_LEN, MIN_FRAME_LEN};
    let sat = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    if let Some(f) = resources.max_frame_len {
        if !(MIN_FRAME_LEN..=HARD_MAX_FRAME_LEN).contains(&f) {
            return Err(CloudError::Config(format!(
                "max_frame_len = {f} is outside {MIN_FRAME_LEN}..={HARD_MAX_FRAME_LEN} \
                 (specs/wire-format.md, TDM-LIM-2): set a value in that range, or leave it out \
                 to derive it from the served models"
            )));
        }
    }
    if usize::from(resources.max_batch) < sizes.encoder_batch {
        return Err(CloudError::Config(format!(
            "max_batch = {} is smaller than the {} rows per request a served encoder bundle is \
             planned for ([encoder] batch, signed by `tandem model import-bert --batch`): set \
             max_batch to at least {}, or import the model with --batch {}",
            resources.max_batch, sizes.encoder_batch, sizes.encoder_batch, resources.max_batch
        )));
    }
    if resources.key_cache_bytes < sizes.prepared_key_bytes {
        return Err(CloudError::Config(format!(
            "key_cache_bytes = {} cannot hold one prepared evaluation key of the served models \
             ({} bytes): every request would prepare its key again; set key_cache_bytes to at \
             least {} (a multiple of it for several devices), or leave it out for 256 MiB",
            resources.key_cache_bytes, sizes.prepared_key_bytes, sizes.prepared_key_bytes
        )));
    }
    if let Some(k) = resources.max_key_len {
        if (k as usize) < sizes.key_len {
            return Err(CloudError::Config(format!(
                "max_key_len = {k} is smaller than the {} bytes the served models' evaluation \
                 keys need: set max_key_len to at least {}, or leave it out to derive it",
                sizes.key_len, sizes.key_len
            )));
        }
    }
    let key_len = resources
        .max_key_len
        .unwrap_or_else(|| sat(sizes.key_len.max(1)));
    let ct_len = sizes.ciphertext_len.max(1);
    let elements = sizes.elements.max(1);
    let frame = match resources.max_frame_len {
        Some(f) => f,
        None => {
            let o = overheads();
            let need = [
                o.key_register.saturating_add(key_len as usize),
                o.encrypted_request.saturating_add(ct_len),
                o.noised_request.saturating_add(elements.saturating_mul(4)),
                o.encrypted_response.saturating_add(ct_len),
                o.plain_response.saturating_add(elements.saturating_mul(8)),
            ]
            .into_iter()
            .max()
            .unwrap_or(0);
            sat(need).clamp(
                tandem_protocol::limits::MIN_FRAME_LEN,
                tandem_protocol::limits::HARD_MAX_FRAME_LEN,
            )
        }
    };
    let derived = Limits {
        max_frame_len: frame,
        max_key_len: key_len,
        max_ciphertext_len: sat(ct_len),
        max_ciphertexts: 1,
        max_elements: sat(elements),
        max_batch: resources.max_batch,
        ..*cap
    };
    let mut l = derived.min(cap);
    // Explicit values are the operator's choice within the protocol's domain: not lowered.
    if let Some(f) = resources.max_frame_len {
        l.max_frame_len = f;
    }
    if let Some(k) = resources.max_key_len {
        l.max_key_len = k;
    }
    l.validate()
        .map_err(|e| CloudError::Config(format!("derived protocol limits: {e} ({l:?})")))?;
    if (l.max_key_len as usize) < sizes.key_len {
        return Err(CloudError::Config(format!(
            "the protocol cap max_key_len = {} is smaller than the {} bytes the served models' \
             evaluation keys need: raise it to at least {}",
            l.max_key_len, sizes.key_len, sizes.key_len
        )));
    }
    if (l.max_ciphertext_len as usize) < ct_len || (l.max_elements as usize) < elements {
        return Err(CloudError::Config(format!(
            "the served models need ciphertexts of up to {ct_len} bytes and {elements} values \
             per message (their largest request or answer over the output modes served, for up \
             to max_batch = {} rows or an encoder bundle's signed batch), above the protocol \
             cap max_ciphertext_len = {} / max_elements = {}: serve the large models in packed \
             mode only (output_modes = [\"packed\"]: smaller answers), or lower max_batch \
             (encoder bundles: import them with a smaller --batch)",
            resources.max_batch, l.max_ciphertext_len, l.max_elements
        )));
    }
    Ok(l)
}

/// Body bytes of each message kind besides its variable part (exact: encoded with an empty
/// variable part).
struct Overheads {
    key_register: usize,
    encrypted_request: usize,
    noised_request: usize,
    encrypted_response: usize,
    plain_response: usize,
}

fn overheads() -> Overheads {
    use tandem_protocol::{
        BudgetCharge, DpMetadata, KeyRegister, Mechanism, Message, NoisedBlock, Scale,
    };
    let body = |m: Message| -> usize {
        m.encode()
            .map_or(usize::MAX / 4, |b| b.len().saturating_sub(FRAME_HEADER_LEN))
    };
    let block = EncryptedBlock {
        param_set: 1,
        key_id: [0; 32],
        output_mode: tandem_protocol::OutputMode::Packed,
        ciphertexts: vec![Vec::new()],
    };
    let dps = [Scale::Rational { num: 1, den: 1 }, Scale::Float(1.0)].map(|scale| DpMetadata {
        mechanism: Mechanism::DiscreteGaussian,
        scale,
        charge: BudgetCharge::Rho(0.0),
        clip_bound: 1.0,
        quant_scale: 1.0,
    });
    let req = |payload| {
        body(Message::InferRequest(InferRequest {
            request_id: 1,
            layer_id: 0,
            batch: 1,
            payload,
        }))
    };
    let dp_max = |f: &dyn Fn(DpMetadata) -> usize| dps.iter().map(|d| f(*d)).max().unwrap_or(0);
    Overheads {
        key_register: body(Message::KeyRegister(KeyRegister {
            key_id: [0; 32],
            param_set: 1,
            output_mode: tandem_protocol::OutputMode::NoKey,
            channel_binding: [0; 32],
            key_blob: Vec::new(),
        })),
        encrypted_request: dp_max(&|dp| {
            req(RequestPayload::NoisedEncrypted {
                dp,
                enc: block.clone(),
            })
        })
        .max(req(RequestPayload::Encrypted(block.clone()))),
        // One value, minus its 4 bytes.
        noised_request: dp_max(&|dp| {
            req(RequestPayload::Noised(NoisedBlock {
                dp,
                values: vec![0],
            }))
            .saturating_sub(4)
        }),
        // Version-2 layout (with cloud_eval_us, TDM-MSG-14): the larger of the two.
        encrypted_response: body(Message::InferResponse(tandem_protocol::InferResponse {
            request_id: 1,
            layer_id: 0,
            cloud_eval_us: Some(0),
            payload: ResponsePayload::Encrypted(block.clone()),
        })),
        plain_response: body(Message::InferResponse(tandem_protocol::InferResponse {
            request_id: 1,
            layer_id: 0,
            cloud_eval_us: Some(0),
            payload: ResponsePayload::Plain(vec![0]),
        }))
        .saturating_sub(8),
    }
}

/// Counters of a running cloud.
#[derive(Debug, Default)]
pub struct Metrics {
    sessions_started: AtomicU64,
    tls_rejected: AtomicU64,
    key_registrations: AtomicU64,
    keys_evicted: AtomicU64,
    keys_refused: AtomicU64,
    requests: AtomicU64,
    responses: AtomicU64,
    refusals: AtomicU64,
    handshakes_refused: AtomicU64,
    first_message_timeouts: AtomicU64,
    pending_evicted: AtomicU64,
    client_hello_timeouts: AtomicU64,
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
    /// Key registrations stored and acknowledged.
    pub fn key_registrations(&self) -> u64 {
        self.key_registrations.load(Ordering::Relaxed)
    }
    /// Stored keys deleted by the per-device quota (least recently used).
    pub fn keys_evicted(&self) -> u64 {
        self.keys_evicted.load(Ordering::Relaxed)
    }
    /// Key registrations refused (invalid blob, mode not served, quota, store failure).
    pub fn keys_refused(&self) -> u64 {
        self.keys_refused.load(Ordering::Relaxed)
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
    /// TCP connections closed before their TLS handshake because `max_handshakes` were in
    /// progress.
    pub fn handshakes_refused(&self) -> u64 {
        self.handshakes_refused.load(Ordering::Relaxed)
    }
    /// Sessions closed because no `ClientHello` arrived within `first_message_timeout`.
    pub fn first_message_timeouts(&self) -> u64 {
        self.first_message_timeouts.load(Ordering::Relaxed)
    }
    /// Connections still waiting for their ClientHello that were closed (oldest first) to
    /// make room for a newer one because `max_pending` were waiting.
    pub fn pending_evicted(&self) -> u64 {
        self.pending_evicted.load(Ordering::Relaxed)
    }
    /// Connections closed because their complete ClientHello did not arrive within
    /// `client_hello_timeout` of `accept`.
    pub fn client_hello_timeouts(&self) -> u64 {
        self.client_hello_timeouts.load(Ordering::Relaxed)
    }
}

struct Shared {
    registry: ModelRegistry,
    keys: KeyStore,
    session_config: CloudConfig,
    admission: AdmissionLimits,
    max_request_bytes: usize,
    metrics: Arc<Metrics>,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    /// Connections in the pre-handshake stage, oldest first: (id, eviction signal; dropping
    /// the sender closes that connection).
    pending: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    per_identity: Mutex<HashMap<[u8; 32], usize>>,
    in_flight: Mutex<HashMap<[u8; 32], usize>>,
    epoch: Instant,
    fault_drop: AtomicU64,
    fault_eval_delay: Duration,
    parallel_eval: bool,
    max_blob: usize,
    prom: Arc<Prom>,
    /// Readiness: the key store answered the last check and the replica is not stopping.
    ready: Arc<AtomicBool>,
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
    metrics_addr: Option<SocketAddr>,
    aux: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloud").field("addr", &self.addr).finish()
    }
}

fn contexts_for(ids: &[u16]) -> Result<Vec<Arc<Context>>, CloudError> {
    let sets: Vec<ParameterSet> = if ids.is_empty() {
        // The default set first (TDM-PAR-1: the cloud picks the first of its own order the
        // device offers), then the older ones still understood.
        std::iter::once(DEFAULT_PARAMETERS)
            .chain(
                ALL_PARAMETER_SETS
                    .iter()
                    .copied()
                    .filter(|p| p.id != DEFAULT_PARAMETERS.id),
            )
            .collect()
    } else {
        ids.iter()
            .map(|&id| {
                ParameterSet::from_id(id).map_err(|_| {
                    CloudError::Config(format!(
                        "parameter set {id} is not known to this build (known: {:?})",
                        ALL_PARAMETER_SETS.iter().map(|p| p.id).collect::<Vec<_>>()
                    ))
                })
            })
            .collect::<Result<_, _>>()?
    };
    Ok(sets
        .into_iter()
        .map(|p| Arc::new(Context::new(p)))
        .collect())
}

impl Cloud {
    /// Loads and prepares the models, derives the protocol limits from them, opens the key
    /// store, binds and starts accepting.
    ///
    /// # Errors
    /// [`CloudError`] if a bundle, the key store, the limits or the socket fail;
    /// [`CloudError::Config`] if no model is given or an explicit limit is out of range.
    pub async fn start(opts: ServerOptions) -> Result<Cloud, CloudError> {
        if opts.models.is_empty() {
            return Err(CloudError::Config(
                "no models to serve (`models` is empty): list at least one bundle directory".into(),
            ));
        }
        let contexts = contexts_for(&opts.param_sets)?;
        let specs: Vec<ModelSpec> = opts
            .models
            .iter()
            .map(|dir| ModelSpec {
                dir: dir.clone(),
                policy: opts
                    .policies
                    .iter()
                    .find(|(d, _)| d == dir)
                    .map_or_else(ModelPolicy::default, |(_, p)| *p),
            })
            .collect();
        let (vk, ks, res, cap) = (
            opts.verifying_key,
            opts.key_store.clone(),
            opts.resources,
            opts.limits,
        );
        let (pg, expiry) = (opts.postgres.clone(), opts.key_expiry);
        let prom = Arc::new(Prom::new()?);
        let p2 = prom.clone();
        let (registry, keys, limits, sizes) = tokio::task::spawn_blocking(move || {
            let registry = ModelRegistry::load(contexts.clone(), &specs, &vk)?;
            let sizes = registry.wire_sizes(usize::from(res.max_batch));
            let limits = derive_limits(&sizes, &res, &cap)?;
            // A PostgreSQL store does not connect here: the replica starts (not ready) while
            // the database is down.
            let backend: Arc<dyn KeyBackend> = match &pg {
                Some(cfg) => Arc::new(PgStore::new(cfg)?),
                None => Arc::new(RedbStore::open(&ks)?),
            };
            let keys = KeyStore::new(
                backend,
                contexts,
                limits.max_key_len as usize,
                res.key_quota,
                expiry,
                res.key_cache_bytes,
            )
            .with_metrics(p2);
            Ok::<_, CloudError>((registry, keys, limits, sizes))
        })
        .await
        .map_err(|e| {
            CloudError::Config(format!(
                "start-up failed while loading the models {models:?} or opening the key store \
                 {store}: {e} (check those files; a damaged key store can be restored from a \
                 backup or moved away)",
                models = opts.models,
                store = opts.key_store.display()
            ))
        })??;
        let mut session_config = CloudConfig::new(registry.entries());
        session_config.limits = limits;
        session_config.param_sets = registry.contexts().iter().map(|c| c.params().id).collect();
        let max_request_bytes = match opts.admission.max_request_bytes {
            0 => sizes
                .ciphertext_len
                .max(sizes.elements.saturating_mul(4))
                .max(1),
            n => n,
        };
        let listener = TcpListener::bind(opts.addr).await?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared {
            registry,
            keys,
            session_config,
            admission: opts.admission,
            max_request_bytes,
            metrics: metrics.clone(),
            connections: Arc::new(Semaphore::new(opts.admission.max_connections)),
            handshakes: Arc::new(Semaphore::new(opts.admission.max_handshakes.max(1))),
            pending: Mutex::new(VecDeque::new()),
            per_identity: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            fault_drop: AtomicU64::new(opts.fault_drop_requests),
            fault_eval_delay: opts.fault_eval_delay,
            parallel_eval: opts.parallel_eval,
            max_blob: limits.max_ciphertext_len as usize,
            prom: prom.clone(),
            ready: Arc::new(AtomicBool::new(false)),
        });
        let (tx, rx) = watch::channel(false);
        // Readiness before anyone can ask: one check now, then every `health_interval`.
        check_health(&shared, false).await;
        let mut aux = vec![tokio::spawn(health_loop(
            shared.clone(),
            opts.health_interval,
            rx.clone(),
        ))];
        let metrics_addr = match opts.metrics_addr {
            Some(a) => {
                let (bound, t) =
                    crate::metrics::serve(a, prom.clone(), shared.ready.clone(), rx.clone())
                        .await?;
                aux.push(t);
                Some(bound)
            }
            None => None,
        };
        let task = tokio::spawn(accept_loop(listener, opts.tls.clone(), shared.clone(), rx));
        tracing::info!(
            %addr,
            max_frame_len = limits.max_frame_len,
            max_key_len = limits.max_key_len,
            max_ciphertext_len = limits.max_ciphertext_len,
            max_request_bytes,
            key_store = shared.keys.backend().kind(),
            metrics = ?metrics_addr,
            "cloud listening"
        );
        Ok(Cloud {
            addr,
            metrics,
            shutdown: tx,
            task,
            shared,
            metrics_addr,
            aux,
        })
    }

    /// The bound `/healthz` + `/metrics` address, if served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Readiness as `/healthz` reports it.
    pub fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus metrics of this replica.
    pub fn prometheus(&self) -> &Arc<Prom> {
        &self.shared.prom
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The protocol limits offered to devices (derived from the served models).
    pub fn limits(&self) -> Limits {
        self.shared.session_config.limits
    }

    /// The key store (quota, cached bytes, records).
    pub fn key_store(&self) -> &KeyStore {
        &self.shared.keys
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
        self.shared.ready.store(false, Ordering::Relaxed);
        self.shared.prom.set_ready(false);
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        for t in self.aux {
            let _ = t.await;
        }
        // Blocking evaluations may still hold the shared state briefly; wait so that the key
        // store file is closed when this returns.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&self.shared) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::info!(addr = %self.addr, "cloud stopped");
    }
}

/// Pings the key store (and, when `sweep`, deletes expired keys) and sets readiness.
async fn check_health(shared: &Arc<Shared>, sweep: bool) {
    let sh = shared.clone();
    let r = tokio::task::spawn_blocking(move || {
        sh.keys.ping()?;
        if sweep {
            let n = sh.keys.sweep()?;
            if n > 0 {
                tracing::info!(expired = n, "expired keys deleted");
            }
        }
        Ok::<_, CloudError>(())
    })
    .await;
    let ok = matches!(r, Ok(Ok(())));
    let was = shared.ready.swap(ok, Ordering::Relaxed);
    shared.prom.set_ready(ok);
    match r {
        Ok(Ok(())) if !was => tracing::info!("key store reachable: ready"),
        Ok(Err(e)) if was => tracing::error!(error = %e, "key store failing: not ready"),
        Err(e) => tracing::error!(error = %e, "health check task failed"),
        _ => {}
    }
}

/// Readiness every `every`; the expiry sweep about once a minute (or every check when the
/// expiry is shorter than that).
async fn health_loop(shared: Arc<Shared>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let sweep_every = shared
        .keys
        .expiry()
        .map_or(Duration::from_secs(60), |e| e.min(Duration::from_secs(60)));
    let mut last_sweep = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let sweep = shared.keys.expiry().is_some() && last_sweep.elapsed() >= sweep_every;
        if sweep {
            last_sweep = Instant::now();
        }
        check_health(&shared, sweep).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<tandem_tls::rustls::ServerConfig>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer_addr)) => {
                    let _ = tcp.set_nodelay(true);
                    next_id = next_id.wrapping_add(1);
                    let evicted = enqueue_pending(&shared, next_id);
                    conns.spawn(pre_handshake(tcp, peer_addr, next_id, evicted, tls.clone(), shared.clone(), shutdown.clone()));
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

/// Registers connection `id` in the pre-handshake stage; if `max_pending` connections are
/// already waiting, the oldest is evicted (its signal sender dropped). Returns the receiver
/// that resolves when `id` itself is evicted.
fn enqueue_pending(shared: &Shared, id: u64) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    if let Ok(mut q) = shared.pending.lock() {
        while q.len() >= shared.admission.max_pending.max(1) {
            if q.pop_front().is_some() {
                shared
                    .metrics
                    .pending_evicted
                    .fetch_add(1, Ordering::Relaxed);
                shared.prom.refusal("pending_evicted");
            }
        }
        q.push_back((id, tx));
    }
    rx
}

/// Removes connection `id` from the pre-handshake stage when dropped (however it leaves it).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.pending.lock() {
            if let Some(i) = q.iter().position(|(id, _)| *id == self.id) {
                q.remove(i);
            }
        }
    }
}

/// The pre-handshake stage (issue 12, admission): read the complete TLS ClientHello (no
/// cryptography yet) within `client_hello_timeout` without holding a handshake slot; only then
/// take one of `max_handshakes` and run the handshake. Waiting connections (silent, or slow
/// bytes) are bounded by `max_pending` with drop-oldest eviction.
async fn pre_handshake(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    id: u64,
    mut evicted: oneshot::Receiver<()>,
    tls: Arc<tandem_tls::rustls::ServerConfig>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let guard = PendingGuard {
        shared: &shared,
        id,
    };
    let hello = LazyConfigAcceptor::new(tandem_tls::rustls::server::Acceptor::default(), tcp);
    let start = tokio::select! {
        r = tokio::time::timeout(shared.admission.client_hello_timeout, hello) => match r {
            Ok(Ok(start)) => Some(start),
            Ok(Err(e)) => {
                shared.metrics.tls_rejected.fetch_add(1, Ordering::Relaxed);
                shared.prom.refusal("tls");
                tracing::debug!(%peer_addr, error = %e, "no valid ClientHello: closing");
                None
            }
            Err(_) => {
                shared.metrics.client_hello_timeouts.fetch_add(1, Ordering::Relaxed);
                shared.prom.refusal("client_hello_timeout");
                tracing::debug!(%peer_addr, "no complete ClientHello in time: closing");
                None
            }
        },
        _ = &mut evicted => {
            tracing::debug!(%peer_addr, "evicted from the pre-handshake stage (oldest waiting connection)");
            None
        }
        _ = shutdown.changed() => None,
    };
    drop(guard);
    let Some(start) = start else {
        return;
    };
    // Handshakes in progress are bounded before any TLS work is done.
    let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
        shared
            .metrics
            .handshakes_refused
            .fetch_add(1, Ordering::Relaxed);
        shared.prom.refusal("handshakes");
        tracing::warn!(%peer_addr, "too many TLS handshakes in progress: closing");
        return;
    };
    connection(start, peer_addr, permit, tls, shared, shutdown).await;
}

/// Selects one per-identity counter map of [`Shared`].
type CounterOf = fn(&Shared) -> &Mutex<HashMap<[u8; 32], usize>>;

/// Decrements a per-identity counter when dropped, however the task ends.
struct CountGuard {
    shared: Arc<Shared>,
    peer: [u8; 32],
    which: CounterOf,
}

impl CountGuard {
    /// Takes one unit of `peer`'s count if it stays within `max`.
    fn acquire(
        shared: &Arc<Shared>,
        peer: [u8; 32],
        max: usize,
        which: CounterOf,
    ) -> Option<CountGuard> {
        let mut m = which(shared).lock().ok()?;
        let n = m.entry(peer).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(CountGuard {
            shared: shared.clone(),
            peer,
            which,
        })
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = (self.which)(&self.shared).lock() {
            if let Some(n) = m.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.peer);
                }
            }
        }
    }
}

fn per_identity(s: &Shared) -> &Mutex<HashMap<[u8; 32], usize>> {
    &s.per_identity
}

fn in_flight(s: &Shared) -> &Mutex<HashMap<[u8; 32], usize>> {
    &s.in_flight
}

/// A request's answer: the payload and the measured evaluation time in microseconds
/// (TDM-EVAL-1), or the code it failed with.
type Answer = (u64, Result<(ResponsePayload, u32), ErrorCode>);

/// `d` in whole microseconds for `cloud_eval_us` (TDM-EVAL-1): saturating at `u32::MAX`, and at
/// least 1, because 0 on the wire means "not measured" (TDM-MSG-14).
fn eval_micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX).max(1)
}

async fn connection(
    start: StartHandshake<TcpStream>,
    peer_addr: SocketAddr,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
    config: Arc<tandem_tls::rustls::ServerConfig>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(
        shared.admission.handshake_timeout,
        start.into_stream(config),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.metrics.tls_rejected.fetch_add(1, Ordering::Relaxed);
            shared.prom.refusal("tls");
            tracing::warn!(%peer_addr, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            shared.metrics.tls_rejected.fetch_add(1, Ordering::Relaxed);
            shared.prom.refusal("tls");
            tracing::warn!(%peer_addr, "TLS handshake timed out");
            return;
        }
    };
    drop(handshake_permit);
    let est = match tandem_tls::established(tls.get_ref().1) {
        Ok(e) => e,
        Err(e) => {
            shared.metrics.tls_rejected.fetch_add(1, Ordering::Relaxed);
            shared.prom.refusal("tls");
            tracing::warn!(%peer_addr, error = %e, "TLS connection refused");
            return;
        }
    };
    let peer = est.peer.id();
    let device = est.peer.common_name().unwrap_or("?").to_string();
    let started = shared.now_ms();
    let mut session = match CloudSession::new(
        shared.session_config.clone(),
        peer,
        est.channel_binding,
        started,
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
    let _active = ActiveSession::new(&shared.prom);
    let (mut rd, mut wr) = tokio::io::split(tls);
    // Per-identity cap first, so that one certificate cannot take the global slots.
    let slot = CountGuard::acquire(
        &shared,
        peer,
        shared.admission.max_connections_per_identity,
        per_identity,
    )
    .and_then(|g| {
        shared
            .connections
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| (g, p))
    });
    let Some(_slot) = slot else {
        shared.metrics.refusals.fetch_add(1, Ordering::Relaxed);
        shared.prom.refusal("connections");
        tracing::warn!(%device, "connection limit (global or per identity) reached: refusing with Busy");
        session.close(ErrorCode::Busy);
        let _ = flush(&mut session, &mut wr).await;
        let _ = wr.shutdown().await;
        return;
    };
    tracing::info!(%device, %peer_addr, "session started");
    // TDM-KEY-7: keys stored under this peer identity are usable without re-registration;
    // they do not count against the session's registration limit (TDM-KEY-6).
    // Blocking (the store may be a remote database); a store that is down leaves the session
    // without stored keys: its requests then fail with `Busy` or `UnknownKey`.
    let sh = shared.clone();
    let listed =
        tokio::task::spawn_blocking(move || sh.keys.list(&peer, sh.keys.quota().max_keys)).await;
    match listed {
        Ok(Ok(ids)) => {
            for id in ids {
                let _ = session.allow_key(id);
            }
        }
        Ok(Err(e)) => tracing::error!(error = %e, "key store listing failed"),
        Err(e) => tracing::error!(error = %e, "key store listing task failed"),
    }
    let first_deadline = started.saturating_add(
        u64::try_from(shared.admission.first_message_timeout.as_millis()).unwrap_or(u64::MAX),
    );
    let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
    let mut buf = vec![0u8; 16 * 1024];
    let mut closing = false;
    loop {
        if flush(&mut session, &mut wr).await.is_err() {
            break;
        }
        if session.is_closed() {
            break;
        }
        let handshaking = session.state() == SessionState::Handshaking;
        let deadline = match (session.poll_timeout(), handshaking) {
            (Some(d), true) => Some(d.min(first_deadline)),
            (None, true) => Some(first_deadline),
            (d, false) => d,
        };
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
                    Ok((p, eval_us)) => {
                        shared.metrics.responses.fetch_add(1, Ordering::Relaxed);
                        // TDM-EVAL-1: the layer's measured evaluation time goes with the answer.
                        session.send_response_timed(id, p, eval_us, now)
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
                let now = shared.now_ms();
                if session.state() == SessionState::Handshaking && now >= first_deadline {
                    // The first protocol message must follow the TLS handshake promptly.
                    shared.metrics.first_message_timeouts.fetch_add(1, Ordering::Relaxed);
                    shared.prom.refusal("first_message_timeout");
                    tracing::warn!(%device, "no ClientHello in time: closing with IdleTimeout");
                    session.close(ErrorCode::IdleTimeout);
                } else {
                    session.handle_timeout(now);
                }
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

fn he_mode(m: tandem_protocol::OutputMode) -> OutputMode {
    match m {
        tandem_protocol::OutputMode::NoKey => OutputMode::NoKey,
        tandem_protocol::OutputMode::Packed => OutputMode::Packed,
    }
}

/// Validates and stores one registration, then accepts or refuses it (TDM-KEY-8).
async fn register_key(
    session: &mut CloudSession,
    shared: &Arc<Shared>,
    device: &str,
    peer: [u8; 32],
    key_id: [u8; 32],
    output_mode: tandem_protocol::OutputMode,
    key_blob: Vec<u8>,
) {
    let mode = he_mode(output_mode);
    let Some(neg) = session.negotiated().cloned() else {
        let _ = session.refuse_key(key_id, ErrorCode::InternalError);
        return;
    };
    let model = shared.registry.get(&neg.model_id, &neg.model_digest);
    let Some(model) = model.filter(|m| m.serves(neg.param_set, mode)) else {
        // The model is not served in this output mode (policy) for the negotiated set.
        shared.metrics.keys_refused.fetch_add(1, Ordering::Relaxed);
        shared.prom.registration("mode_not_served");
        tracing::warn!(%device, mode = mode.name(), "key for an output mode this model is not served in: refusing");
        let _ = session.refuse_key(key_id, ErrorCode::InvalidRequest);
        return;
    };
    // One key serves every cloud layer of the model: it must cover the largest chunk and the
    // most bodies per mask among them (shared-mask plans, TDM-PAR-HE-3).
    let (min_chunk, min_bodies, first_level) = match mode {
        OutputMode::Packed => (
            model.max_chunk(neg.param_set, mode),
            model.max_bodies(neg.param_set, mode),
            model.key_first_level(neg.param_set, mode),
        ),
        OutputMode::NoKey => (0, 0, 1),
    };
    let sh = shared.clone();
    let r = tokio::task::spawn_blocking(move || {
        sh.keys.register(
            &peer,
            &key_id,
            mode,
            &key_blob,
            neg.param_set,
            min_chunk,
            min_bodies,
            first_level,
        )
    })
    .await;
    let (code, outcome) = match r {
        Ok(Ok((_, reg))) => {
            shared
                .metrics
                .key_registrations
                .fetch_add(1, Ordering::Relaxed);
            shared
                .metrics
                .keys_evicted
                .fetch_add(reg.evicted.len() as u64, Ordering::Relaxed);
            shared.prom.registration("stored");
            tracing::info!(%device, evicted = reg.evicted.len(), "evaluation key stored");
            if let Err(e) = session.accept_key(key_id, shared.now_ms()) {
                tracing::warn!(%device, error = %e, "cannot acknowledge key");
            }
            return;
        }
        Ok(Err(CloudError::Quota(e))) => {
            tracing::warn!(%device, error = %e, "key registration refused");
            (ErrorCode::LimitExceeded, "quota")
        }
        Ok(Err(e @ (CloudError::KeyInvalid(_) | CloudError::He(_)))) => {
            tracing::warn!(%device, error = %e, "key registration refused");
            (ErrorCode::InvalidRequest, "invalid")
        }
        Ok(Err(e @ CloudError::StoreUnavailable(_))) => {
            // Not stored, so no KeyAck (TDM-KEY-8); Busy: the device may try again later.
            tracing::error!(%device, error = %e, "key registration failed: store unavailable");
            (ErrorCode::Busy, "store_unavailable")
        }
        Ok(Err(e)) => {
            tracing::error!(%device, error = %e, "key registration failed");
            (ErrorCode::InternalError, "store_error")
        }
        Err(e) => {
            tracing::error!(%device, error = %e, "key registration task failed");
            (ErrorCode::InternalError, "task_failed")
        }
    };
    shared.prom.registration(outcome);
    shared.metrics.keys_refused.fetch_add(1, Ordering::Relaxed);
    let _ = session.refuse_key(key_id, code);
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
                tracing::debug!(%device, model = %n.model_id, param_set = n.param_set, "handshake complete");
            }
            CloudEvent::KeyRegistered {
                peer,
                key_id,
                output_mode,
                key_blob,
                ..
            } => {
                register_key(session, shared, device, peer, key_id, output_mode, key_blob).await;
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

/// `protection` label of a request.
fn protection_of(p: &RequestPayload) -> &'static str {
    match p {
        RequestPayload::Encrypted(_) => "encrypted",
        RequestPayload::Noised(_) => "noised",
        RequestPayload::NoisedEncrypted { .. } => "noised_encrypted",
    }
}

/// `outcome` label of a refused request.
fn code_name(c: ErrorCode) -> &'static str {
    match c {
        ErrorCode::Busy => "busy",
        ErrorCode::LimitExceeded => "limit_exceeded",
        ErrorCode::UnknownKey => "unknown_key",
        ErrorCode::UnknownModel => "unknown_model",
        ErrorCode::InvalidRequest => "invalid_request",
        ErrorCode::MalformedMessage => "malformed_message",
        ErrorCode::InternalError => "internal_error",
        _ => "other_error",
    }
}

/// Keeps `tandem_sessions_active` right however the connection task ends.
struct ActiveSession(Arc<Prom>);

impl ActiveSession {
    fn new(p: &Arc<Prom>) -> Self {
        p.session(true);
        ActiveSession(p.clone())
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.session(false);
    }
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
    let protection = protection_of(&request.payload);
    let refuse = |session: &mut CloudSession, code: ErrorCode, reason: &str| {
        shared.metrics.refusals.fetch_add(1, Ordering::Relaxed);
        shared.prom.refusal(reason);
        shared.prom.request(protection, code_name(code), None);
        let _ = session.send_request_error(id, code, now);
    };
    if payload_bytes(&request.payload) > shared.max_request_bytes {
        tracing::warn!(%device, request_id = id, "request too large");
        return refuse(session, ErrorCode::LimitExceeded, "request_too_large");
    }
    let Some(guard) = CountGuard::acquire(
        shared,
        peer,
        shared.admission.max_in_flight_per_device,
        in_flight,
    ) else {
        tracing::warn!(%device, request_id = id, "too many requests in flight");
        return refuse(session, ErrorCode::Busy, "in_flight");
    };
    let Some(neg) = session.negotiated().cloned() else {
        return refuse(session, ErrorCode::InternalError, "no_session");
    };
    let sh = shared.clone();
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let t = Instant::now();
        let res = evaluate(&sh, &peer, &neg, &request).map(|(p, d)| (p, eval_micros(d)));
        let outcome = res.as_ref().map_or_else(|c| code_name(*c), |_| "ok");
        sh.prom.request(protection, outcome, Some(t.elapsed()));
        let _ = tx.send((id, res));
    });
}

/// The [`ServerOptions::fault_eval_delay`] test hook (runs on a blocking worker thread).
fn slow_down(shared: &Shared) {
    if !shared.fault_eval_delay.is_zero() {
        std::thread::sleep(shared.fault_eval_delay);
    }
}

/// Evaluates one request; returns the answer and the wall time of the layer evaluation itself
/// (TDM-EVAL-1: from the payload's decoding to the encoded result, without the queueing before
/// it, the key-store lookup or any network I/O).
fn evaluate(
    shared: &Shared,
    peer: &[u8; 32],
    neg: &Negotiated,
    request: &InferRequest,
) -> Result<(ResponsePayload, Duration), ErrorCode> {
    let model = shared
        .registry
        .get(&neg.model_id, &neg.model_digest)
        .ok_or(ErrorCode::UnknownModel)?;
    // Valid layer ids are the manifest indices of the model's cloud layers (specs/protocol.md).
    let index = usize::try_from(request.layer_id).map_err(|_| ErrorCode::InvalidRequest)?;
    let cl = model
        .bundle
        .cloud_layer_at(index)
        .map_err(|_| ErrorCode::InvalidRequest)?;
    let batch = usize::from(request.batch);
    // TDM-REQ-9: an encoder layer is planned for `encoder.batch` rows per request.
    if model.bundle.encoder().is_some_and(|e| batch > e.batch) {
        return Err(ErrorCode::InvalidRequest);
    }
    let enc = match &request.payload {
        RequestPayload::Noised(n) => {
            if n.values.len() != batch.saturating_mul(cl.n_in) {
                return Err(ErrorCode::InvalidRequest);
            }
            let t = Instant::now();
            slow_down(shared);
            let mut out = Vec::with_capacity(batch * cl.n_out);
            for row in n.values.chunks(cl.n_in) {
                let q: Vec<i64> = row.iter().map(|&v| i64::from(v)).collect();
                out.extend(
                    model
                        .bundle
                        .cloud_eval_plain_at(index, &q)
                        .map_err(|_| ErrorCode::InvalidRequest)?,
                );
            }
            return Ok((ResponsePayload::Plain(out), t.elapsed()));
        }
        RequestPayload::Encrypted(e) | RequestPayload::NoisedEncrypted { enc: e, .. } => e,
    };
    let mode = he_mode(enc.output_mode);
    // Output-mode policy and the negotiated parameter set pick the prepared layer.
    let layer = model
        .layer(request.layer_id, neg.param_set, mode)
        .ok_or(ErrorCode::InvalidRequest)?;
    let key = shared
        .keys
        .get(peer, &enc.key_id)
        .map_err(|e| {
            tracing::error!(error = %e, "key lookup failed");
            match e {
                // Transient: the device retries the same payload (issue 13).
                CloudError::StoreUnavailable(_) => ErrorCode::Busy,
                _ => ErrorCode::InternalError,
            }
        })?
        .ok_or(ErrorCode::UnknownKey)?;
    if mode != key.mode || key.param_set != neg.param_set {
        return Err(ErrorCode::InvalidRequest);
    }
    let [ct] = enc.ciphertexts.as_slice() else {
        return Err(ErrorCode::InvalidRequest);
    };
    // TDM-EVAL-1: the evaluation time starts here, after the key-store lookup.
    let t = Instant::now();
    slow_down(shared);
    // Per-layer limit: the exact size of this layer's input for the request's batch (issue 8).
    let limit = shared.max_blob.min(layer.plan().upload_bytes(batch.max(1)));
    let input = EncryptedInput::from_bytes(ct, limit, layer.plan())
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
            tandem_he::EvalOptions {
                parallel: shared.parallel_eval,
            },
        )
        .map_err(|e| {
            tracing::warn!(error = %e, "evaluation failed");
            ErrorCode::InvalidRequest
        })?;
    let ciphertexts = vec![out.to_bytes()];
    let took = t.elapsed();
    Ok((
        ResponsePayload::Encrypted(EncryptedBlock {
            param_set: enc.param_set,
            key_id: enc.key_id,
            output_mode: enc.output_mode,
            ciphertexts,
        }),
        took,
    ))
}
