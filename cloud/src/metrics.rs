//! Health and Prometheus metrics of one replica (issue 13), served on a plain-HTTP port that
//! should stay on loopback or an operator network (`metrics_listen` in `cloud.toml`):
//!
//! * `GET /healthz` — readiness: `200 ready` while the key store answers and the replica is
//!   not shutting down, `503` otherwise (the balancer's health check; see
//!   `cloud/deploy/haproxy.cfg`).
//! * `GET /metrics` — Prometheus text format, from the `prometheus` crate:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tandem_sessions_total`, `tandem_sessions_active` | counter, gauge | |
//! | `tandem_requests_total` | counter | `protection` (encrypted, noised, noised_encrypted), `outcome` (ok or the error code) |
//! | `tandem_eval_seconds` | histogram | `protection` |
//! | `tandem_refusals_total` | counter | `reason` |
//! | `tandem_key_registrations_total` | counter | `outcome` |
//! | `tandem_keystore_seconds` | histogram | `op` (get, put, touch, list, expire, len, ping) |
//! | `tandem_keystore_errors_total` | counter | `op` |
//! | `tandem_key_cache_total` | counter | `result` (hit, miss) |
//! | `tandem_key_cache_bytes` | gauge | |
//! | `tandem_ready` | gauge | |

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::CloudError;

/// The Prometheus registry of one replica and its metrics.
#[derive(Debug)]
pub struct Prom {
    registry: Registry,
    sessions_total: IntCounter,
    sessions_active: IntGauge,
    requests: IntCounterVec,
    eval_seconds: HistogramVec,
    refusals: IntCounterVec,
    registrations: IntCounterVec,
    store_seconds: HistogramVec,
    store_errors: IntCounterVec,
    cache: IntCounterVec,
    cache_bytes: IntGauge,
    ready: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: Result<T, prometheus::Error>,
) -> Result<T, CloudError> {
    let m = m.map_err(|e| CloudError::Config(format!("metrics: {e}")))?;
    r.register(Box::new(m.clone()))
        .map_err(|e| CloudError::Config(format!("metrics: {e}")))?;
    Ok(m)
}

impl Prom {
    /// A fresh registry with every metric at zero.
    ///
    /// # Errors
    /// [`CloudError::Config`] if a metric cannot be registered (a bug: names are fixed).
    pub fn new() -> Result<Self, CloudError> {
        let r = Registry::new();
        // Evaluations take ~1 ms (no-key, small) to seconds (MiniLM-sized layers).
        let eval_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let store_buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 3.0,
        ];
        Ok(Prom {
            sessions_total: reg(
                &r,
                IntCounter::new("tandem_sessions_total", "Protocol sessions started"),
            )?,
            sessions_active: reg(
                &r,
                IntGauge::new("tandem_sessions_active", "Protocol sessions open"),
            )?,
            requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("tandem_requests_total", "Inference requests answered"),
                    &["protection", "outcome"],
                ),
            )?,
            eval_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("tandem_eval_seconds", "Cloud-layer evaluation time")
                        .buckets(eval_buckets),
                    &["protection"],
                ),
            )?,
            refusals: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tandem_refusals_total",
                        "Connections, requests or keys refused by a limit",
                    ),
                    &["reason"],
                ),
            )?,
            registrations: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("tandem_key_registrations_total", "Key registrations"),
                    &["outcome"],
                ),
            )?,
            store_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("tandem_keystore_seconds", "Key-store operation latency")
                        .buckets(store_buckets),
                    &["op"],
                ),
            )?,
            store_errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tandem_keystore_errors_total",
                        "Key-store operations failed",
                    ),
                    &["op"],
                ),
            )?,
            cache: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("tandem_key_cache_total", "Prepared-key cache look-ups"),
                    &["result"],
                ),
            )?,
            cache_bytes: reg(
                &r,
                IntGauge::new("tandem_key_cache_bytes", "Bytes of prepared keys cached"),
            )?,
            ready: reg(
                &r,
                IntGauge::new("tandem_ready", "1 while the replica is ready"),
            )?,
            registry: r,
        })
    }

    /// A session started (`+1`) or ended (`-1`).
    pub fn session(&self, started: bool) {
        if started {
            self.sessions_total.inc();
            self.sessions_active.inc();
        } else {
            self.sessions_active.dec();
        }
    }

    /// One answered request: `protection` and `outcome` (`ok` or the error code's name) and,
    /// for evaluated ones, the evaluation time.
    pub fn request(&self, protection: &str, outcome: &str, eval: Option<Duration>) {
        self.requests
            .with_label_values(&[protection, outcome])
            .inc();
        if let Some(d) = eval {
            self.eval_seconds
                .with_label_values(&[protection])
                .observe(d.as_secs_f64());
        }
    }

    /// A refusal by `reason`.
    pub fn refusal(&self, reason: &str) {
        self.refusals.with_label_values(&[reason]).inc();
    }

    /// A key registration with `outcome` (`stored`, `invalid`, `quota`, `store_error`, ...).
    pub fn registration(&self, outcome: &str) {
        self.registrations.with_label_values(&[outcome]).inc();
    }

    /// One key-store operation.
    pub fn store_op(&self, op: &str, took: Duration, ok: bool) {
        self.store_seconds
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
        if !ok {
            self.store_errors.with_label_values(&[op]).inc();
        }
    }

    /// One prepared-key cache look-up and the bytes now cached.
    pub fn cache_event(&self, hit: bool, bytes: usize) {
        self.cache
            .with_label_values(&[if hit { "hit" } else { "miss" }])
            .inc();
        self.cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Sets the readiness gauge.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Counter value of `tandem_requests_total{protection, outcome}` (tests).
    pub fn requests_with(&self, protection: &str, outcome: &str) -> u64 {
        self.requests
            .with_label_values(&[protection, outcome])
            .get()
    }

    /// Everything in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

#[derive(Clone)]
struct HttpState {
    prom: Arc<Prom>,
    ready: Arc<AtomicBool>,
}

async fn healthz(State(s): State<HttpState>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: key store unavailable or shutting down\n",
        )
    }
}

async fn metrics(State(s): State<HttpState>) -> impl axum::response::IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.prom.render(),
    )
}

/// Binds `addr` and serves `/healthz` and `/metrics` until `shutdown` turns true.
///
/// # Errors
/// [`CloudError::Io`] if the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    prom: Arc<Prom>,
    ready: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), CloudError> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(HttpState { prom, ready });
    let task = tokio::spawn(async move {
        let stop = async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::warn!(error = %e, "metrics listener failed");
        }
    });
    Ok((bound, task))
}
