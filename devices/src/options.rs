//! What [`crate::Device::connect`] needs: addresses, TLS, bundle, DP and retry settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_he::OutputMode;
use tandem_model::VerifyingKey;

/// DP settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpOptions {
    /// L2 clipping bound of the split activation (real-valued, before quantisation).
    pub clip_l2: f64,
    /// δ of each (ε, δ) release and of the budget.
    pub delta: f64,
    /// ε budget per window at `delta`: the accountant allows a window whose releases compose
    /// (zCDP, opendp's conversion) to at most (ε, δ), or, if all of them are pure ε-DP
    /// (discrete Laplace), whose ε sum to at most this (TDM-LEDG-5, `specs/dp.md` §5.1).
    pub budget_epsilon: f64,
    /// If set, the budget per window directly in zCDP ρ (overrides `budget_epsilon`; no pure
    /// track then).
    pub budget_rho: Option<f64>,
    /// Window length in seconds.
    pub window_secs: u64,
    /// With a bundle that has noise-trained variants (`[privacy]`, issue 11): release at an ε
    /// no variant was trained for, with the variant trained for the nearest ε (TDM-DPVAR-2).
    /// Off by default: such a release is refused with
    /// [`tandem_dp::DpError::UntrainedEpsilon`] before anything is charged.
    pub allow_untrained_epsilon: bool,
}

impl Default for DpOptions {
    /// clip 20, δ = 1e-5, a budget of **ε = 8 per device per day** (`specs/dp.md` §5.1: the
    /// upper end of the per-day budgets deployed local DP has published, and the ε at which the
    /// noise-trained digits variant reaches ≈ 0.76): one ε = 8 release a day with a
    /// `[privacy]` bundle (discrete Laplace, pure track), or two at ε = 4; a Gaussian release
    /// at (ε, δ) costs more of it (ρ track). Untrained ε are refused.
    fn default() -> Self {
        DpOptions {
            clip_l2: 20.0,
            delta: 1e-5,
            budget_epsilon: 8.0,
            budget_rho: None,
            window_secs: 86_400,
            allow_untrained_epsilon: false,
        }
    }
}

/// Bounded retry of connection failures: exponential backoff with jitter.
///
/// Attempt `k` (1-based) that fails transiently (see [`crate::DeviceError::is_transient`]) is
/// followed by a pause drawn uniformly from `[b/2, b]` with
/// `b = min(max_backoff, initial_backoff · 2^(k-1))`, unless `max_attempts` attempts were made
/// or the pause would end after `deadline` (measured from the start of the operation).
/// Retries resend the very same payload: a DP release is charged and noised once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per operation (connect, or one inference), at least 1.
    pub max_attempts: usize,
    /// First pause.
    pub initial_backoff: Duration,
    /// Largest pause.
    pub max_backoff: Duration,
    /// No new attempt starts after this much time since the operation began.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts, 50 ms doubling to at most 2 s, 30 s deadline (rides out a cloud restart
    /// of several seconds).
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// No retry: one attempt.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The pause after failed attempt `attempt` (1-based), jittered by `unit` in `[0, 1)`.
    pub fn backoff(&self, attempt: usize, unit: f64) -> Duration {
        let shift = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(20);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << shift)
            .min(self.max_backoff);
        base.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

/// Everything [`crate::Device::connect`] needs.
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
    /// HE parameter-set ids offered in the handshake, in preference order (default:
    /// [`tandem_he::DEFAULT_PARAMETERS`] first, then the other sets of
    /// [`tandem_he::ALL_PARAMETER_SETS`]). The device encrypts under the set the cloud
    /// chooses; a chosen id this build does not implement is
    /// [`crate::DeviceError::UnknownParameterSet`].
    pub param_sets: Vec<u16>,
    /// Path of the privacy ledger.
    pub ledger_path: PathBuf,
    /// Identity charged in the ledger.
    pub ledger_id: Vec<u8>,
    /// DP settings.
    pub dp: DpOptions,
    /// Directory keeping the HE secret seed and evaluation keys across runs, created with mode
    /// 0700 (`None`: fresh keys in memory for this process).
    pub state_dir: Option<PathBuf>,
    /// Retry of connection failures (first connect, reconnects and requests).
    pub retry: RetryPolicy,
    /// Time allowed for one answer (and for one TCP connect or TLS handshake).
    pub io_timeout: Duration,
}

impl std::fmt::Debug for DeviceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceOptions")
            .field("addr", &self.addr)
            .field("bundle_dir", &self.bundle_dir)
            .field("output_mode", &self.output_mode)
            .field("param_sets", &self.param_sets)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl DeviceOptions {
    /// Options with packed outputs, every known parameter set, default DP settings, the
    /// default [`RetryPolicy`] and a 60 s answer timeout.
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
            param_sets: default_param_sets(),
            ledger_path,
            ledger_id: b"device".to_vec(),
            dp: DpOptions::default(),
            state_dir: None,
            retry: RetryPolicy::default(),
            io_timeout: Duration::from_secs(60),
        }
    }
}

/// Every parameter set this build implements, [`tandem_he::DEFAULT_PARAMETERS`] first (the
/// device's default offer, preferred first: TDM-PAR-1 lets the cloud pick the first of its own
/// order that the device offers).
pub fn default_param_sets() -> Vec<u16> {
    let default = tandem_he::DEFAULT_PARAMETERS.id;
    std::iter::once(default)
        .chain(
            tandem_he::ALL_PARAMETER_SETS
                .iter()
                .map(|p| p.id)
                .filter(|&id| id != default),
        )
        .collect()
}
