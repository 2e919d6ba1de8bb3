//! # tandem-device: the device runtime
//!
//! What an app calls: [`Device::connect`] once, then [`Device::infer`] per input with a
//! [`Protection`]:
//! * [`Protection::Encrypted`] — the split activation is encrypted ([`tandem_he`]); the cloud
//!   evaluates its layer on ciphertexts and never sees the activation or the result.
//! * [`Protection::Noised`] — the activation is clipped, quantised and noised with exact
//!   discrete Gaussian noise ([`tandem_dp`]), charged to the durable ledger **before** it is
//!   sent; the cloud computes on the noised integers in the clear.
//! * [`Protection::NoisedEncrypted`] — both: noised (and charged), then encrypted.
//!
//! The device runs its own layers (the bundle's device part, signature-verified), derives the
//! cloud layer's HE plan from public information only ([`cloud_plan`]), drives the sans-IO
//! [`tandem_protocol::DeviceSession`] over mutual TLS, decrypts and finishes locally.
//!
//! Retries: a payload is built (and, for DP modes, charged and noised) exactly once per
//! inference; reconnects and retries resend the very same bytes, so the ledger is never
//! charged twice and a release is never re-noised. The evaluation key is uploaded only when the
//! cloud answers `UnknownKey` (a restarted cloud reloads stored keys, so nothing is re-sent).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_dp::{Accountant, Clip, Mechanism, Policy, Quantizer, SecureBits};
use tandem_he::{
    Client, Context, EncryptedOutput, EvaluationKey, LayerPlan, OutputMode, PreparedLayer,
    DEFAULT_PARAMETERS,
};
use tandem_model::{Bundle, Part, VerifyingKey};
use tandem_protocol::{
    BudgetCharge, DeviceConfig, DeviceEvent, DeviceSession, DpMetadata, EncryptedBlock, ErrorCode,
    NoisedBlock, RequestPayload, ResponsePayload, Scale,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Largest absolute value the encrypted cloud layer accepts (the cloud plans with the same).
pub const MAX_ABS_INPUT: u64 = tandem_he::INT8_LAYER_MAX_INPUT;

/// The cloud layer's HE plan from public information only (shape and the signed manifest's
/// bias bound): the same function the cloud uses, so both sides agree without the device
/// holding the weights.
pub fn cloud_plan(
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    bias_bound: i64,
) -> Result<LayerPlan, DeviceError> {
    Ok(PreparedLayer::plan_int8(
        DEFAULT_PARAMETERS,
        mode,
        n_in,
        n_out,
        bias_bound.unsigned_abs(),
    )?)
}

/// Errors of the device runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// Socket or file I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// TLS set-up or the connection's TLS state failed a check.
    #[error("TLS: {0}")]
    Tls(#[from] tandem_tls::Error),
    /// The model bundle failed to load, verify or evaluate.
    #[error("model: {0}")]
    Model(#[from] tandem_model::ModelError),
    /// The HE engine failed.
    #[error("HE: {0}")]
    He(#[from] tandem_he::HeError),
    /// Differential privacy or the ledger failed.
    #[error("DP: {0}")]
    Dp(#[from] tandem_dp::DpError),
    /// The protocol session failed.
    #[error("protocol: {0}")]
    Protocol(#[from] tandem_protocol::Error),
    /// The cloud closed the session.
    #[error("session closed by the cloud ({0:?})")]
    Closed(ErrorCode),
    /// The cloud refused the request.
    #[error("request refused by the cloud ({0:?})")]
    Refused(ErrorCode),
    /// The privacy budget of this window would be exceeded; nothing was charged or sent.
    #[error("privacy budget exceeded")]
    BudgetExceeded,
    /// The cloud did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The configuration is invalid.
    #[error("config: {0}")]
    Config(String),
}

/// DP settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpOptions {
    /// L2 clipping bound of the split activation (real-valued, before quantisation).
    pub clip_l2: f64,
    /// δ of each (ε, δ) release and of the budget.
    pub delta: f64,
    /// ε budget per window at `delta` (converted to zCDP ρ by the accountant).
    pub budget_epsilon: f64,
    /// If set, the budget per window directly in zCDP ρ (overrides `budget_epsilon`).
    pub budget_rho: Option<f64>,
    /// Window length in seconds.
    pub window_secs: u64,
}

impl Default for DpOptions {
    /// clip 20, δ = 1e-5, ε budget 100 per day (a demo budget: set a real one).
    fn default() -> Self {
        DpOptions {
            clip_l2: 20.0,
            delta: 1e-5,
            budget_epsilon: 100.0,
            budget_rho: None,
            window_secs: 86_400,
        }
    }
}

/// Everything [`Device::connect`] needs.
#[derive(Clone)]
pub struct DeviceOptions {
    /// Cloud address.
    pub addr: SocketAddr,
    /// Name the cloud certificate must carry.
    pub server_name: String,
    /// rustls client configuration (from [`tandem_tls::client_config`]).
    pub tls: Arc<tandem_tls::rustls::ClientConfig>,
    /// Bundle directory (only the device part is loaded).
    pub bundle_dir: PathBuf,
    /// Key the bundle must be signed with.
    pub verifying_key: VerifyingKey,
    /// HE output mode for encrypted requests.
    pub output_mode: OutputMode,
    /// Path of the privacy ledger.
    pub ledger_path: PathBuf,
    /// Identity charged in the ledger.
    pub ledger_id: Vec<u8>,
    /// DP settings.
    pub dp: DpOptions,
    /// Directory keeping the HE secret seed and evaluation key across runs (`None`: fresh
    /// keys in memory for this process).
    pub state_dir: Option<PathBuf>,
    /// Attempts per inference (connection losses are retried with the same bytes).
    pub max_attempts: usize,
    /// Time allowed for one answer.
    pub io_timeout: Duration,
}

impl std::fmt::Debug for DeviceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceOptions")
            .field("addr", &self.addr)
            .field("bundle_dir", &self.bundle_dir)
            .field("output_mode", &self.output_mode)
            .finish_non_exhaustive()
    }
}

impl DeviceOptions {
    /// Options with packed outputs, default DP settings, 3 attempts and a 60 s timeout.
    pub fn new(
        addr: SocketAddr,
        tls: Arc<tandem_tls::rustls::ClientConfig>,
        bundle_dir: PathBuf,
        verifying_key: VerifyingKey,
        ledger_path: PathBuf,
    ) -> Self {
        DeviceOptions {
            addr,
            server_name: "localhost".into(),
            tls,
            bundle_dir,
            verifying_key,
            output_mode: OutputMode::Packed,
            ledger_path,
            ledger_id: b"device".to_vec(),
            dp: DpOptions::default(),
            state_dir: None,
            max_attempts: 3,
            io_timeout: Duration::from_secs(60),
        }
    }
}

/// How the split activation is protected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Protection {
    /// Encrypted under the device's HE key.
    Encrypted,
    /// DP-noised ((ε, δ) per release), sent in the clear.
    Noised {
        /// ε of this release.
        epsilon: f64,
    },
    /// DP-noised, then encrypted.
    NoisedEncrypted {
        /// ε of this release.
        epsilon: f64,
    },
}

/// Wall-clock time per stage of one inference, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Device layers and quantisation.
    pub device_ms: f64,
    /// Ledger charge and noise.
    pub dp_ms: f64,
    /// Encryption.
    pub encrypt_ms: f64,
    /// Network round trip including the cloud's evaluation (and reconnects).
    pub network_ms: f64,
    /// Decryption and the device's remaining layers.
    pub decrypt_ms: f64,
}

impl Timings {
    /// Sum of all stages.
    pub fn total_ms(&self) -> f64 {
        self.device_ms + self.dp_ms + self.encrypt_ms + self.network_ms + self.decrypt_ms
    }
}

/// The outcome of one inference.
#[derive(Debug, Clone, PartialEq)]
pub struct Inference {
    /// Predicted class.
    pub class: usize,
    /// The final layer's outputs.
    pub logits: Vec<f32>,
    /// Per-stage times.
    pub timings: Timings,
    /// Request bytes sent (protocol frames, excluding key uploads).
    pub bytes_up: usize,
    /// Response bytes received (protocol frames).
    pub bytes_down: usize,
    /// Evaluation-key bytes uploaded during this inference (0 if the cloud had the key).
    pub key_upload_bytes: usize,
    /// ε charged for this release (0 for `Encrypted`).
    pub epsilon_spent: f64,
    /// Attempts needed (1 without reconnects).
    pub attempts: usize,
}

struct Conn {
    stream: TlsStream<TcpStream>,
    session: DeviceSession,
    key_sent: bool,
}

/// A connected device.
pub struct Device {
    opts: DeviceOptions,
    bundle: Bundle,
    client: Client,
    plan: LayerPlan,
    layer_id: u32,
    n_out: usize,
    quant_scale: f64,
    key_blob: Vec<u8>,
    key_id: [u8; 32],
    accountant: Accountant,
    rng: SecureBits,
    mechanisms: HashMap<u64, Mechanism>,
    conn: Option<Conn>,
    epoch: Instant,
    key_uploads: u64,
    connects: u64,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("model", &self.bundle.id())
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

struct Payload {
    request: RequestPayload,
    encrypted: bool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn to_proto_mode(m: OutputMode) -> tandem_protocol::OutputMode {
    match m {
        OutputMode::NoKey => tandem_protocol::OutputMode::NoKey,
        OutputMode::Packed => tandem_protocol::OutputMode::Packed,
    }
}

fn parse_hex_u128(s: &str) -> Option<u128> {
    u128::from_str_radix(s.trim(), 16).ok()
}

impl Device {
    /// Loads the bundle's device part, the HE keys and the ledger, then connects.
    pub async fn connect(opts: DeviceOptions) -> Result<Device, DeviceError> {
        let o = opts.clone();
        let mut dev = tokio::task::spawn_blocking(move || Device::load(o))
            .await
            .map_err(|e| DeviceError::Config(format!("load task failed: {e}")))??;
        dev.ensure_connected().await?;
        Ok(dev)
    }

    fn load(opts: DeviceOptions) -> Result<Device, DeviceError> {
        let bundle = Bundle::load_part(
            &opts.bundle_dir,
            &opts.verifying_key,
            &tandem_model::Limits::default(),
            Part::Device,
        )?;
        let spec = bundle
            .layers()
            .get(bundle.cloud_index())
            .ok_or_else(|| DeviceError::Config("bundle has no cloud layer".into()))?
            .spec()
            .clone();
        let quant = spec
            .quant
            .ok_or_else(|| DeviceError::Config("cloud layer is not quantised".into()))?;
        let plan = cloud_plan(opts.output_mode, spec.n_in, spec.n_out, quant.bias_bound())?;
        let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
        let (client, key_blob) = Self::he_keys(&opts, ctx, &plan)?;
        let key_id = match opts.output_mode {
            // TDM-KEY-2: no-key registrations use the HE engine's own key id.
            OutputMode::NoKey => client.key_id(),
            OutputMode::Packed => tandem_protocol::key_id_of(&key_blob),
        };
        let policy = match opts.dp.budget_rho {
            Some(rho) => Policy::new(rho, opts.dp.window_secs)?,
            None => Policy::from_epsilon_delta(
                opts.dp.budget_epsilon,
                opts.dp.delta,
                opts.dp.window_secs,
            )?,
        };
        let (accountant, _report) = Accountant::open(&opts.ledger_path, policy)?;
        let layer_id = u32::try_from(bundle.cloud_index())
            .map_err(|_| DeviceError::Config("layer index out of range".into()))?;
        Ok(Device {
            layer_id,
            n_out: spec.n_out,
            quant_scale: 1.0 / f64::from(quant.input_scale),
            bundle,
            client,
            plan,
            key_blob,
            key_id,
            accountant,
            rng: SecureBits::new()?,
            mechanisms: HashMap::new(),
            conn: None,
            epoch: Instant::now(),
            key_uploads: 0,
            connects: 0,
            opts,
        })
    }

    /// The HE client and (packed mode) evaluation-key blob, persisted in `state_dir` if set.
    fn he_keys(
        opts: &DeviceOptions,
        ctx: Arc<Context>,
        plan: &LayerPlan,
    ) -> Result<(Client, Vec<u8>), DeviceError> {
        let make_blob = |client: &Client| -> Result<Vec<u8>, DeviceError> {
            Ok(match opts.output_mode {
                OutputMode::NoKey => Vec::new(),
                OutputMode::Packed => client.evaluation_key(plan.chunk)?.to_bytes(),
            })
        };
        let Some(dir) = &opts.state_dir else {
            let client = Client::new(ctx);
            let blob = make_blob(&client)?;
            return Ok((client, blob));
        };
        std::fs::create_dir_all(dir)?;
        let seed_path = dir.join("he-seed.hex");
        let seed = match std::fs::read_to_string(&seed_path)
            .ok()
            .and_then(|s| parse_hex_u128(&s))
        {
            Some(s) => s,
            None => {
                let s: u128 = rand::random();
                write_private(&seed_path, format!("{s:032x}\n").as_bytes())?;
                s
            }
        };
        let client = Client::from_seed(ctx.clone(), seed);
        if opts.output_mode == OutputMode::NoKey {
            return Ok((client, Vec::new()));
        }
        let key_path = dir.join(format!("eval-key-{}.bin", plan.chunk));
        if let Ok(blob) = std::fs::read(&key_path) {
            if let Ok(k) = EvaluationKey::from_bytes(&blob, 64 << 20, &ctx.params()) {
                if k.key_id() == client.key_id() && k.max_chunk() >= plan.chunk {
                    return Ok((client, blob));
                }
            }
        }
        let blob = make_blob(&client)?;
        write_private(&key_path, &blob)?;
        Ok((client, blob))
    }

    /// The model's id.
    pub fn model_id(&self) -> &str {
        self.bundle.id()
    }

    /// The cloud layer's HE plan.
    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// Size of the evaluation-key blob (0 in no-key mode).
    pub fn key_blob_len(&self) -> usize {
        self.key_blob.len()
    }

    /// Evaluation-key uploads so far.
    pub fn key_uploads(&self) -> u64 {
        self.key_uploads
    }

    /// Connections opened so far.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Records in the privacy ledger.
    pub fn ledger_records(&self) -> u64 {
        self.accountant.records()
    }

    /// ε spent in the current window (zCDP total converted at the configured δ).
    pub fn epsilon_spent_total(&self) -> Result<f64, DeviceError> {
        Ok(self
            .accountant
            .spent_epsilon(&self.opts.ledger_id, now_secs(), self.opts.dp.delta)?)
    }

    /// Points the device at another cloud address (the next connection uses it).
    pub fn set_addr(&mut self, addr: SocketAddr) {
        self.opts.addr = addr;
    }

    /// Drops the current connection (the next inference reconnects).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Closes the session cleanly.
    pub async fn close(mut self) {
        if let Some(mut c) = self.conn.take() {
            c.session.close(ErrorCode::NoError);
            let _ = Self::flush(&mut c).await;
            let _ = c.stream.shutdown().await;
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn ensure_connected(&mut self) -> Result<(), DeviceError> {
        if self.conn.as_ref().is_some_and(|c| !c.session.is_closed()) {
            return Ok(());
        }
        self.conn = None;
        let tcp = tokio::time::timeout(self.opts.io_timeout, TcpStream::connect(self.opts.addr))
            .await
            .map_err(|_| DeviceError::Timeout)??;
        tcp.set_nodelay(true)?;
        let name = tandem_tls::server_name(&self.opts.server_name)?;
        let stream = tokio::time::timeout(
            self.opts.io_timeout,
            TlsConnector::from(self.opts.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| DeviceError::Timeout)??;
        let est = tandem_tls::established(stream.get_ref().1)?;
        let config = DeviceConfig::new(self.bundle.id(), self.bundle.digest());
        let session = DeviceSession::new(config, est.channel_binding, self.now_ms())?;
        let mut conn = Conn {
            stream,
            session,
            key_sent: false,
        };
        Self::flush(&mut conn).await?;
        loop {
            Self::read_some(&mut conn, self.opts.io_timeout, self.epoch).await?;
            while let Some(ev) = conn.session.poll_event() {
                match ev {
                    DeviceEvent::Connected(_) => {
                        self.connects += 1;
                        self.conn = Some(conn);
                        return Ok(());
                    }
                    DeviceEvent::Closed { code, .. } => return Err(DeviceError::Closed(code)),
                    _ => {}
                }
            }
            Self::flush(&mut conn).await?;
        }
    }

    async fn flush(conn: &mut Conn) -> Result<usize, DeviceError> {
        let mut n = 0;
        while let Some(frame) = conn.session.poll_transmit() {
            conn.stream.write_all(&frame).await?;
            n += frame.len();
        }
        if n > 0 {
            conn.stream.flush().await?;
        }
        Ok(n)
    }

    async fn read_some(
        conn: &mut Conn,
        timeout: Duration,
        epoch: Instant,
    ) -> Result<usize, DeviceError> {
        let mut buf = [0u8; 16 * 1024];
        let n = tokio::time::timeout(timeout, conn.stream.read(&mut buf))
            .await
            .map_err(|_| DeviceError::Timeout)??;
        if n == 0 {
            return Err(DeviceError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        // A fatal input error closes the session; the Closed event reports it.
        let _ = conn.session.handle_input(&buf[..n], now);
        Ok(n)
    }

    /// Uploads the evaluation key on this connection and waits for the acknowledgement.
    async fn upload_key(&mut self) -> Result<usize, DeviceError> {
        let now = self.now_ms();
        let (timeout, epoch) = (self.opts.io_timeout, self.epoch);
        let mode = to_proto_mode(self.opts.output_mode);
        let conn = self
            .conn
            .as_mut()
            .ok_or(DeviceError::Closed(ErrorCode::NoError))?;
        conn.session
            .register_key(self.key_id, mode, self.key_blob.clone(), now)?;
        let sent = Self::flush(conn).await?;
        loop {
            Self::read_some(conn, timeout, epoch).await?;
            while let Some(ev) = conn.session.poll_event() {
                match ev {
                    DeviceEvent::KeyAccepted { key_id } if key_id == self.key_id => {
                        conn.key_sent = true;
                        self.key_uploads += 1;
                        tracing::info!(bytes = sent, "evaluation key uploaded");
                        return Ok(sent);
                    }
                    DeviceEvent::Closed { code, .. } => return Err(DeviceError::Closed(code)),
                    _ => {}
                }
            }
            Self::flush(conn).await?;
        }
    }

    /// Sends one request and waits for its answer: (payload, bytes up, bytes down).
    async fn round_trip(
        &mut self,
        payload: &RequestPayload,
    ) -> Result<(ResponsePayload, usize, usize), DeviceError> {
        let now = self.now_ms();
        let (timeout, epoch, layer_id) = (self.opts.io_timeout, self.epoch, self.layer_id);
        let conn = self
            .conn
            .as_mut()
            .ok_or(DeviceError::Closed(ErrorCode::NoError))?;
        let id = conn
            .session
            .send_request(layer_id, 1, payload.clone(), now)?;
        let up = Self::flush(conn).await?;
        let mut down = 0;
        loop {
            down += Self::read_some(conn, timeout, epoch).await?;
            while let Some(ev) = conn.session.poll_event() {
                match ev {
                    DeviceEvent::Response {
                        request_id,
                        payload,
                        ..
                    } if request_id == id => return Ok((payload, up, down)),
                    DeviceEvent::RequestFailed { request_id, code } if request_id == id => {
                        return Err(DeviceError::Refused(code))
                    }
                    DeviceEvent::Closed { code, .. } => return Err(DeviceError::Closed(code)),
                    _ => {}
                }
            }
            Self::flush(conn).await?;
        }
    }

    fn mechanism(&mut self, epsilon: f64) -> Result<Mechanism, DeviceError> {
        if let Some(m) = self.mechanisms.get(&epsilon.to_bits()) {
            return Ok(m.clone());
        }
        let q = Quantizer::new(
            Clip::L2(self.opts.dp.clip_l2),
            self.quant_scale,
            self.plan.n_in,
        )?;
        let m = Mechanism::gaussian_for_epsilon_delta(q, epsilon, self.opts.dp.delta)?;
        self.mechanisms.insert(epsilon.to_bits(), m.clone());
        Ok(m)
    }

    /// Charges the ledger (durably) and noises the activation: called once per release.
    fn release(
        &mut self,
        activation: &[f32],
        epsilon: f64,
    ) -> Result<(Vec<i64>, DpMetadata), DeviceError> {
        let mech = self.mechanism(epsilon)?;
        let rho = mech.cost_rho()?;
        let now = now_secs();
        if self.accountant.would_exceed(&self.opts.ledger_id, now, rho) {
            return Err(DeviceError::BudgetExceeded);
        }
        let receipt = self.accountant.charge(&self.opts.ledger_id, now, rho)?;
        let x: Vec<f64> = activation.iter().map(|&v| f64::from(v)).collect();
        let noised = mech.release(&x, receipt, &mut self.rng)?;
        let meta = DpMetadata {
            mechanism: tandem_protocol::Mechanism::DiscreteGaussian,
            scale: Scale::Float(mech.sigma_or_scale()),
            charge: BudgetCharge::Rho(rho),
            clip_bound: self.opts.dp.clip_l2,
            quant_scale: self.quant_scale,
        };
        Ok((noised, meta))
    }

    fn encrypt(&mut self, q: &[i64]) -> Result<EncryptedBlock, DeviceError> {
        let input = self.client.encrypt(&self.plan, &[q.to_vec()])?;
        Ok(EncryptedBlock {
            param_set: DEFAULT_PARAMETERS.id,
            key_id: self.key_id,
            output_mode: to_proto_mode(self.opts.output_mode),
            ciphertexts: vec![input.to_bytes()],
        })
    }

    /// Runs one inference on a raw input vector.
    pub async fn infer(
        &mut self,
        input: &[f32],
        protection: Protection,
    ) -> Result<Inference, DeviceError> {
        let mut t = Timings::default();
        let start = Instant::now();
        let activation = self.bundle.device_prefix(input)?;
        let q = self.bundle.quantize_input(&activation)?;
        t.device_ms = ms(start);
        let mut epsilon_spent = 0.0;
        // Build the payload exactly once: retries resend these bytes.
        let payload = match protection {
            Protection::Encrypted => {
                let s = Instant::now();
                let enc = self.encrypt(&q)?;
                t.encrypt_ms = ms(s);
                Payload {
                    request: RequestPayload::Encrypted(enc),
                    encrypted: true,
                }
            }
            Protection::Noised { epsilon } => {
                let s = Instant::now();
                let (noised, dp) = self.release(&activation, epsilon)?;
                t.dp_ms = ms(s);
                epsilon_spent = epsilon;
                let values = noised
                    .iter()
                    .map(|&v| v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32)
                    .collect();
                Payload {
                    request: RequestPayload::Noised(NoisedBlock { dp, values }),
                    encrypted: false,
                }
            }
            Protection::NoisedEncrypted { epsilon } => {
                let s = Instant::now();
                let (noised, dp) = self.release(&activation, epsilon)?;
                t.dp_ms = ms(s);
                epsilon_spent = epsilon;
                // Clamping after noising is post-processing: it costs no privacy.
                let m = MAX_ABS_INPUT as i64;
                let clamped: Vec<i64> = noised.iter().map(|&v| v.clamp(-m, m)).collect();
                let s = Instant::now();
                let enc = self.encrypt(&clamped)?;
                t.encrypt_ms = ms(s);
                Payload {
                    request: RequestPayload::NoisedEncrypted { dp, enc },
                    encrypted: true,
                }
            }
        };
        let s = Instant::now();
        let mut key_upload_bytes = 0;
        let mut attempts = 0;
        let mut key_tried = false;
        let (response, up, down) = loop {
            attempts += 1;
            let r = match self.ensure_connected().await {
                Ok(()) => self.round_trip(&payload.request).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => break v,
                Err(DeviceError::Refused(ErrorCode::UnknownKey))
                    if payload.encrypted && !key_tried =>
                {
                    key_tried = true;
                    key_upload_bytes += self.upload_key().await?;
                    attempts -= 1;
                }
                Err(DeviceError::Refused(ErrorCode::Busy)) if attempts < self.opts.max_attempts => {
                    tokio::time::sleep(Duration::from_millis(5 << attempts)).await;
                }
                Err(e @ (DeviceError::Refused(_) | DeviceError::BudgetExceeded)) => return Err(e),
                Err(e) if attempts < self.opts.max_attempts => {
                    tracing::warn!(error = %e, attempt = attempts, "connection lost: retrying with the same payload");
                    self.conn = None;
                    tokio::time::sleep(Duration::from_millis(10 << attempts)).await;
                }
                Err(e) => {
                    self.conn = None;
                    return Err(e);
                }
            }
        };
        t.network_ms = ms(s);
        let s = Instant::now();
        let z = match response {
            ResponsePayload::Plain(z) => z,
            ResponsePayload::Encrypted(block) => {
                let [ct] = block.ciphertexts.as_slice() else {
                    return Err(DeviceError::Refused(ErrorCode::MalformedMessage));
                };
                let out =
                    EncryptedOutput::from_bytes(ct, 64 << 20, &self.plan, &self.client.key_id())?;
                let mut rows = self.client.decrypt(&self.plan, &out)?;
                rows.pop()
                    .ok_or(DeviceError::Refused(ErrorCode::MalformedMessage))?
            }
        };
        if z.len() != self.n_out {
            return Err(DeviceError::Refused(ErrorCode::MalformedMessage));
        }
        let pred = self.bundle.finish_on_device(&z)?;
        t.decrypt_ms = ms(s);
        Ok(Inference {
            class: pred.class,
            logits: pred.logits,
            timings: t,
            bytes_up: up,
            bytes_down: down,
            key_upload_bytes,
            epsilon_spent,
            attempts,
        })
    }
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), DeviceError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
