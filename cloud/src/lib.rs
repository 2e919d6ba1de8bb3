//! # tandem-cloud: the cloud runtime
//!
//! A tokio server that accepts devices over mutual TLS 1.3 ([`tandem_tls`]), runs one sans-IO
//! [`tandem_protocol::CloudSession`] per connection, and answers inference requests with the
//! model's cloud layer: under homomorphic encryption ([`tandem_he`]) for `Encrypted` and
//! `NoisedEncrypted` requests, or as the exact integer `W·x + b` for `Noised` ones.
//!
//! * [`registry`]: signed model bundles (cloud part only), verified and prepared once at
//!   start-up: one [`tandem_he::PreparedLayer`] per output mode.
//! * [`keystore`]: evaluation keys stored durably, keyed by (device identity, key id), in an
//!   embedded `redb` file ([`redb_store`], the default) or in PostgreSQL shared by several
//!   replicas behind a balancer ([`pg_store`], `cloud/deploy/haproxy.cfg`); per-device quota
//!   and expiry; prepared keys cached in memory (bounded in bytes) and reloaded lazily.
//! * [`metrics`]: `/healthz` (readiness) and Prometheus `/metrics` on a plain-HTTP port.
//! * [`server`]: the accept loop, admission limits with typed refusals, graceful shutdown and
//!   the counters tests read ([`server::Metrics`]).
//! * [`config`] reads `cloud.toml`.
//!
//! Worst-case memory and how each bound is set: `specs/operations.md`.
//!
//! ```no_run
//! # async fn run() -> Result<(), tandem_cloud::CloudError> {
//! use tandem_cloud::{Cloud, ServerOptions};
//! # let (tls, vk): (std::sync::Arc<tandem_tls::rustls::ServerConfig>, tandem_model::VerifyingKey) = todo!();
//! let opts = ServerOptions::new("127.0.0.1:0".parse().unwrap(), tls, vk, "keys.redb".into())
//!     .with_model("models/digits".into());
//! let cloud = Cloud::start(opts).await?;
//! println!("listening on {}", cloud.local_addr());
//! cloud.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod config;
pub mod keystore;
pub mod metrics;
pub mod pg_store;
pub mod redb_store;
pub mod registry;
pub mod server;

pub use config::{CloudToml, ModelToml};
pub use keystore::{KeyBackend, KeyQuota, KeyRecord, KeyStore};
pub use metrics::Prom;
pub use pg_store::{PgConfig, PgStore, PgTls};
pub use redb_store::RedbStore;
pub use registry::{cloud_plan, ModelPolicy, ModelRegistry, ModelSpec, ServedModel, WireSizes};
pub use server::{derive_limits, AdmissionLimits, Cloud, Metrics, ResourceLimits, ServerOptions};

/// Errors of the cloud runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloudError {
    /// Socket or file I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// TLS set-up or the peer's TLS state failed a check.
    #[error("TLS: {0}")]
    Tls(#[from] tandem_tls::Error),
    /// A model bundle failed to load or verify.
    #[error("model: {0}")]
    Model(#[from] tandem_model::ModelError),
    /// The HE engine refused a layer, key or ciphertext.
    #[error("HE: {0}")]
    He(#[from] tandem_he::HeError),
    /// The protocol state machine refused an operation.
    #[error("protocol: {0}")]
    Protocol(#[from] tandem_protocol::Error),
    /// The key store failed (the message names the file and what to do).
    #[error("key store: {0}")]
    Store(String),
    /// The key store cannot be reached (database down or too slow): transient, requests are
    /// refused with `Busy` and readiness is false until it answers again.
    #[error("key store unavailable: {0}")]
    StoreUnavailable(String),
    /// A key registration does not decode or does not fit the served plan (refused with
    /// `InvalidRequest`).
    #[error("key refused: {0}")]
    KeyInvalid(String),
    /// A key registration exceeds the per-device quota (refused with `LimitExceeded`).
    #[error("key quota: {0}")]
    Quota(String),
    /// The configuration is invalid.
    #[error("config: {0}")]
    Config(String),
}
