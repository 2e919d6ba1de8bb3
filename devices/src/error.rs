//! The crate's single error type.

use std::path::PathBuf;

use tandem_protocol::ErrorCode;

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
    /// The model bundle failed to load or verify, or the input (or a value derived from it)
    /// is out of range: wrong length, empty, or non-finite at some float stage
    /// ([`tandem_model::ModelError::NonFinite`]). Nothing was charged or sent.
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
    #[error("session closed by the cloud ({0:?}){hint}", hint = closed_hint(*.0))]
    Closed(ErrorCode),
    /// The cloud refused the request.
    #[error("request refused by the cloud ({0:?})")]
    Refused(ErrorCode),
    /// The cloud refused to register the evaluation key for the configured output mode
    /// (it closed the session with `code` instead of acknowledging it): typically the model
    /// is not served in this output mode (`InvalidRequest`, cloud.toml `output_modes`), or the
    /// device's key quota is exhausted (`LimitExceeded`). In the DP modes the key is
    /// registered before the ledger is charged, so such a refusal charges nothing.
    #[error(
        "the cloud refused the evaluation key for output mode \"{mode}\" ({code:?}): {hint}; \
         the request was not sent"
    )]
    KeyRefused {
        /// Output mode of the key (`nokey` or `packed`).
        mode: &'static str,
        /// Close code the cloud sent.
        code: ErrorCode,
        /// What the code means and what to do.
        hint: &'static str,
    },
    /// The privacy budget of this window would be exceeded; nothing was charged or sent.
    #[error(
        "privacy budget exceeded: this window has spent epsilon {spent_epsilon:.4} of {}; this \
         release needs epsilon {requested_epsilon}; nothing charged or sent. The window resets \
         in {resets_in_secs} s; a larger budget is the app's choice (DpOptions::budget_epsilon, \
         device.toml budget_epsilon)",
        budget_epsilon.map_or_else(|| "the rho budget".to_string(), |e| e.to_string())
    )]
    BudgetExceeded {
        /// ε already spent in this window (the ledger's tightest bound, at the policy's δ).
        spent_epsilon: f64,
        /// ε of the refused release.
        requested_epsilon: f64,
        /// The window's ε budget (`None` when the budget was given as zCDP ρ).
        budget_epsilon: Option<f64>,
        /// Seconds until the next window starts.
        resets_in_secs: u64,
    },
    /// The cloud did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The handshake settled on a parameter-set id this build does not know
    /// (not in [`tandem_he::ALL_PARAMETER_SETS`]); nothing was encrypted under it.
    #[error(
        "the cloud negotiated HE parameter set {0}, which this build does not implement: \
         offer only known sets (DeviceOptions::param_sets) or upgrade the device"
    )]
    UnknownParameterSet(u16),
    /// A durable state file (HE secret seed, …) is damaged, truncated, foreign or unreadable.
    #[error("state file {}: {reason}; {action}", path.display())]
    StateFile {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// What the operator can do about it.
        action: &'static str,
    },
    /// The configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// The sentence encoder of an encoder bundle failed ([`crate::SentenceDevice`]): the text
    /// cannot be tokenised, a sequence is empty or too long, the bundle's graph or an encrypted
    /// layer failed (the message names the layer or file and what to do).
    #[error("sentence encoder: {0}")]
    Encoder(#[from] tandem_ops::OpsError),
    /// [`crate::Protection::Auto`] found no candidate the policy, the remaining privacy budget
    /// and the link allow (TDM-PLAN-3); nothing was charged or sent. The field is the plan's
    /// explanation (every candidate and why it was refused): allow another protection in
    /// `Device::set_auto_policy`, wait for the next budget window, or restore the link.
    #[error("Protection::Auto: no feasible candidate; nothing charged or sent:\n{0}")]
    NoFeasiblePlan(String),
}

impl DeviceError {
    /// Whether a fresh attempt (new connection, same payload) may succeed: connection
    /// failures, time-outs, an overloaded or restarting cloud. Refusals of the request
    /// itself, TLS/certificate failures, protocol violations and local errors are final.
    pub fn is_transient(&self) -> bool {
        match self {
            DeviceError::Io(e) => e.kind() != std::io::ErrorKind::InvalidData,
            DeviceError::Timeout => true,
            DeviceError::Closed(c) => matches!(
                c,
                ErrorCode::NoError
                    | ErrorCode::Busy
                    | ErrorCode::IdleTimeout
                    | ErrorCode::InternalError
            ),
            DeviceError::Refused(c) => *c == ErrorCode::Busy,
            _ => false,
        }
    }
}

/// What a device user can do about a session the cloud closed with `code`, for the codes whose
/// cause is on the device's side of the configuration.
fn closed_hint(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::UnknownModel => {
            ": the cloud serves no model with this bundle's id and digest; device and cloud must \
             hold the same signed bundle (a re-import with other --batch, --link-kbit or \
             --max-bodies changes the digest)"
        }
        _ => "",
    }
}
