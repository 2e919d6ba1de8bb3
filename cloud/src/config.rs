//! `cloud.toml`: what `tandem cloud serve` reads.
//!
//! ```toml
//! listen = "127.0.0.1:7443"
//! pki_dir = "/etc/tandem/pki"
//! verifying_key = "/etc/tandem/model-signing.pub"
//! key_store = "/var/lib/tandem/keys.redb"   # embedded redb file (one replica), or:
//! # key_store = { postgres = "host=127.0.0.1 port=5432 user=tandem dbname=tandem", pool_size = 8, timeout_ms = 3000 }
//! # TLS to the database [off]: "require" (encrypted, certificate not checked) or "verify-full"
//! # (chain checked against `ca`, name against host=):
//! # key_store = { postgres = "host=db.internal user=tandem dbname=tandem", tls = "verify-full", ca = "/etc/tandem/db-ca.pem" }
//! # A bundle directory (both output modes), or a table with the modes served.
//! models = ["/srv/models/breast_cancer", { path = "/srv/models/digits", output_modes = ["packed"] }]
//!
//! # Optional; defaults in brackets (see specs/operations.md for the memory they imply).
//! max_connections = 256                  # sessions [256]
//! max_connections_per_identity = 8       # sessions per device certificate [8]
//! max_handshakes = 64                    # TLS handshakes in progress [64]
//! max_pending = 1024                     # connections waiting for their ClientHello, oldest evicted [1024]
//! client_hello_timeout_ms = 1000         # accept → complete ClientHello, no handshake slot held [1000]
//! max_in_flight_per_device = 8           # requests evaluated per device [8]
//! first_message_timeout_ms = 5000        # TLS handshake → complete ClientHello [5000]
//! handshake_timeout_ms = 10000           # TLS handshake [10000]
//! max_batch = 16                         # rows per request [16]
//! # max_frame_len, max_key_len, max_request_bytes: derived from the served models if absent.
//! # max_request_bytes = 0 also means "derived from the models" (the largest request payload
//! # they need for max_batch rows). An explicit max_frame_len must be within 4096..=268435456
//! # (specs/wire-format.md); an explicit max_key_len must hold the served models' key blobs
//! # (start-up is refused with the size needed). `models` must not be empty.
//! max_keys_per_device = 8                # stored keys per device, LRU-evicted [8]
//! max_key_bytes_per_device = 16777216    # stored key bytes per device [16 MiB]
//! key_cache_bytes = 268435456            # prepared keys in memory, at least one key [256 MiB]
//! parallel_eval = true                   # spread each evaluation over all cores [true]
//! param_sets = [2, 1]                    # parameter sets served, preferred first [all, 2 first]
//! key_expiry_secs = 7776000              # keys unused this long expire [never]
//! metrics_listen = "127.0.0.1:9443"      # plain-HTTP /healthz and /metrics [not served]
//! ```
//!
//! Several replicas share one PostgreSQL `key_store` behind a TCP balancer
//! (`cloud/deploy/haproxy.cfg`); each replica needs its own `listen` and `metrics_listen`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::registry::ModelPolicy;
use crate::server::{AdmissionLimits, ResourceLimits, ServerOptions};
use crate::CloudError;

/// One entry of `models`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ModelToml {
    /// A bundle directory served in both output modes.
    Path(PathBuf),
    /// A bundle directory and the output modes it is served in.
    Table {
        /// Bundle directory.
        path: PathBuf,
        /// `packed`, `nokey` (at least one).
        output_modes: Vec<String>,
    },
}

/// `key_store`: a `redb` file, or a table selecting PostgreSQL.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum KeyStoreToml {
    /// The embedded store's database file.
    Redb(PathBuf),
    /// The shared PostgreSQL store.
    Postgres(PostgresToml),
}

/// `key_store = { postgres = "...", ... }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostgresToml {
    /// Connection string, see [`crate::PgConfig::url`].
    pub postgres: String,
    /// See [`crate::PgConfig::pool_size`] [8].
    pub pool_size: Option<usize>,
    /// See [`crate::PgConfig::op_timeout`] (ms) [3000].
    pub timeout_ms: Option<u64>,
    /// TLS to the database, see [`crate::PgTls`]: `off`, `require` or `verify-full` [off].
    pub tls: Option<String>,
    /// PEM file of the CA that signed the database's certificate (`verify-full` only).
    pub ca: Option<PathBuf>,
}

impl PostgresToml {
    /// The store settings of this table.
    ///
    /// # Errors
    /// [`CloudError::Config`] on a zero pool size or deadline, an unknown `tls`, `verify-full`
    /// without `ca`, or `ca` without `verify-full`.
    pub fn pg_config(&self) -> Result<crate::PgConfig, CloudError> {
        let mut c = crate::PgConfig::new(self.postgres.clone());
        if let Some(n) = self.pool_size {
            c.pool_size = n;
        }
        if let Some(ms) = self.timeout_ms {
            c.op_timeout = Duration::from_millis(ms);
        }
        if c.pool_size == 0 || c.op_timeout.is_zero() {
            return Err(CloudError::Config(
                "key_store: pool_size and timeout_ms must be at least 1".into(),
            ));
        }
        c.tls = match (self.tls.as_deref().unwrap_or("off"), &self.ca) {
            ("off", None) => crate::PgTls::Off,
            ("require", None) => crate::PgTls::Require,
            ("verify-full", Some(ca)) => crate::PgTls::VerifyFull { ca: ca.clone() },
            ("verify-full", None) => {
                return Err(CloudError::Config(
                    "key_store: tls = \"verify-full\" needs ca = \"<PEM file of the CA that signed the database's certificate>\"".into(),
                ))
            }
            ("off" | "require", Some(ca)) => {
                return Err(CloudError::Config(format!(
                    "key_store: ca = \"{}\" is only used with tls = \"verify-full\" (set it, or remove ca)",
                    ca.display()
                )))
            }
            (other, _) => {
                return Err(CloudError::Config(format!(
                    "key_store: tls = \"{other}\" is not one of \"off\", \"require\", \"verify-full\""
                )))
            }
        };
        Ok(c)
    }
}

/// The parsed `cloud.toml` (unknown keys are refused).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudToml {
    /// Listen address.
    pub listen: SocketAddr,
    /// PKI directory (`tandem pki init` layout).
    pub pki_dir: PathBuf,
    /// Bundles served.
    pub models: Vec<ModelToml>,
    /// Model-signing public key.
    pub verifying_key: PathBuf,
    /// Key store: a `redb` file or PostgreSQL.
    pub key_store: KeyStoreToml,
    /// Keys unused for this many seconds expire (absent: never).
    pub key_expiry_secs: Option<u64>,
    /// Plain-HTTP address of `/healthz` and `/metrics` (absent: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// See [`AdmissionLimits::max_connections`].
    pub max_connections: Option<usize>,
    /// See [`AdmissionLimits::max_connections_per_identity`].
    pub max_connections_per_identity: Option<usize>,
    /// See [`AdmissionLimits::max_handshakes`].
    pub max_handshakes: Option<usize>,
    /// See [`AdmissionLimits::max_pending`].
    pub max_pending: Option<usize>,
    /// See [`AdmissionLimits::client_hello_timeout`] (ms).
    pub client_hello_timeout_ms: Option<u64>,
    /// See [`AdmissionLimits::max_in_flight_per_device`].
    pub max_in_flight_per_device: Option<usize>,
    /// See [`AdmissionLimits::max_request_bytes`].
    pub max_request_bytes: Option<usize>,
    /// See [`AdmissionLimits::first_message_timeout`] (ms).
    pub first_message_timeout_ms: Option<u64>,
    /// See [`AdmissionLimits::handshake_timeout`] (ms).
    pub handshake_timeout_ms: Option<u64>,
    /// See [`ResourceLimits::max_batch`].
    pub max_batch: Option<u16>,
    /// See [`ResourceLimits::max_frame_len`].
    pub max_frame_len: Option<u32>,
    /// See [`ResourceLimits::max_key_len`].
    pub max_key_len: Option<u32>,
    /// See [`crate::KeyQuota::max_keys`].
    pub max_keys_per_device: Option<usize>,
    /// See [`crate::KeyQuota::max_bytes`].
    pub max_key_bytes_per_device: Option<u64>,
    /// See [`ResourceLimits::key_cache_bytes`].
    pub key_cache_bytes: Option<usize>,
    /// See [`ServerOptions::param_sets`].
    pub param_sets: Option<Vec<u16>>,
    /// See [`ServerOptions::parallel_eval`]; absent = `true` ([`CloudToml::parallel_eval`]).
    pub parallel_eval: Option<bool>,
}

impl CloudToml {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// [`CloudError::Config`] naming the file if it cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Self, CloudError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CloudError::Config(format!("reading {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            CloudError::Config(format!(
                "{}: {e} (see `tandem_cloud::config` for the keys)",
                path.display()
            ))
        })
    }

    /// Whether each encrypted evaluation is spread over rayon's pool (all cores): the file's
    /// `parallel_eval`, else `true` — one device's sentence then takes about half the time
    /// on 2 cores (all-MiniLM-L6-v2, 16 tokens: 4.1 s on one thread against 2.1 s); many
    /// concurrent requests share the same pool.
    pub fn parallel_eval(&self) -> bool {
        self.parallel_eval.unwrap_or(true)
    }

    /// The limits this file sets, over the defaults.
    ///
    /// # Errors
    /// [`CloudError::Config`] on a zero where a positive value is needed.
    pub fn limits(&self) -> Result<(AdmissionLimits, ResourceLimits), CloudError> {
        let a = AdmissionLimits::default();
        let r = ResourceLimits::default();
        let admission = AdmissionLimits {
            max_connections: self.max_connections.unwrap_or(a.max_connections),
            max_connections_per_identity: self
                .max_connections_per_identity
                .unwrap_or(a.max_connections_per_identity),
            max_handshakes: self.max_handshakes.unwrap_or(a.max_handshakes),
            max_pending: self.max_pending.unwrap_or(a.max_pending),
            client_hello_timeout: self
                .client_hello_timeout_ms
                .map_or(a.client_hello_timeout, Duration::from_millis),
            max_in_flight_per_device: self
                .max_in_flight_per_device
                .unwrap_or(a.max_in_flight_per_device),
            max_request_bytes: self.max_request_bytes.unwrap_or(a.max_request_bytes),
            handshake_timeout: self
                .handshake_timeout_ms
                .map_or(a.handshake_timeout, Duration::from_millis),
            first_message_timeout: self
                .first_message_timeout_ms
                .map_or(a.first_message_timeout, Duration::from_millis),
        };
        let resources = ResourceLimits {
            max_batch: self.max_batch.unwrap_or(r.max_batch),
            max_frame_len: self.max_frame_len,
            max_key_len: self.max_key_len,
            key_quota: crate::KeyQuota {
                max_keys: self.max_keys_per_device.unwrap_or(r.key_quota.max_keys),
                max_bytes: self
                    .max_key_bytes_per_device
                    .unwrap_or(r.key_quota.max_bytes),
            },
            key_cache_bytes: self.key_cache_bytes.unwrap_or(r.key_cache_bytes),
        };
        let positive = [
            ("max_connections", admission.max_connections),
            (
                "max_connections_per_identity",
                admission.max_connections_per_identity,
            ),
            ("max_handshakes", admission.max_handshakes),
            ("max_pending", admission.max_pending),
            (
                "client_hello_timeout_ms",
                usize::from(!admission.client_hello_timeout.is_zero()),
            ),
            (
                "max_in_flight_per_device",
                admission.max_in_flight_per_device,
            ),
            ("max_batch", usize::from(resources.max_batch)),
            ("max_keys_per_device", resources.key_quota.max_keys),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(CloudError::Config(format!("{name} must be at least 1")));
            }
        }
        Ok((admission, resources))
    }

    /// Server options from this file: TLS from `pki_dir`, the verifying key, models with their
    /// output-mode policies, and the limits.
    ///
    /// # Errors
    /// [`CloudError`] if the PKI files, the key or a setting is invalid.
    pub fn into_options(self) -> Result<ServerOptions, CloudError> {
        let tls = tandem_tls::server_config_from_files(&tandem_tls::ServerFiles::from_pki_dir(
            &self.pki_dir,
        ))?;
        let vk = tandem_model::read_verifying_key(&self.verifying_key)?;
        let (admission, resources) = self.limits()?;
        let (path, postgres) = match &self.key_store {
            KeyStoreToml::Redb(p) => (p.clone(), None),
            KeyStoreToml::Postgres(t) => (PathBuf::new(), Some(t.pg_config()?)),
        };
        let mut opts = ServerOptions::new(self.listen, tls, vk, path);
        opts.postgres = postgres;
        opts.metrics_addr = self.metrics_listen;
        opts.key_expiry = match self.key_expiry_secs {
            Some(0) => {
                return Err(CloudError::Config(
                    "key_expiry_secs must be at least 1 (leave it out for no expiry)".into(),
                ))
            }
            s => s.map(Duration::from_secs),
        };
        for m in &self.models {
            match m {
                ModelToml::Path(p) => opts.models.push(p.clone()),
                ModelToml::Table { path, output_modes } => {
                    opts.models.push(path.clone());
                    opts.policies
                        .push((path.clone(), ModelPolicy::from_names(output_modes)?));
                }
            }
        }
        opts.admission = admission;
        opts.resources = resources;
        opts.parallel_eval = self.parallel_eval();
        opts.param_sets = self.param_sets.unwrap_or_default();
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn parses_paths_tables_and_limits() {
        let t: CloudToml = toml::from_str(
            r#"
listen = "127.0.0.1:0"
pki_dir = "pki"
verifying_key = "vk"
key_store = "k.redb"
models = ["a", { path = "b", output_modes = ["packed"] }]
max_connections_per_identity = 2
first_message_timeout_ms = 250
max_keys_per_device = 3
"#,
        )
        .unwrap();
        assert_eq!(t.models[0], ModelToml::Path("a".into()));
        let (a, r) = t.limits().unwrap();
        assert_eq!(a.max_connections_per_identity, 2);
        assert_eq!(a.first_message_timeout, Duration::from_millis(250));
        assert_eq!(r.key_quota.max_keys, 3);
        assert_eq!(t.key_store, KeyStoreToml::Redb("k.redb".into()));
        assert!(t.parallel_eval(), "parallel evaluation by default");
        let pg: CloudToml = toml::from_str(
            r#"
listen = "127.0.0.1:0"
pki_dir = "pki"
verifying_key = "vk"
key_store = { postgres = "host=127.0.0.1 user=tandem", pool_size = 4 }
models = ["a"]
metrics_listen = "127.0.0.1:0"
key_expiry_secs = 60
parallel_eval = false
"#,
        )
        .unwrap();
        assert!(matches!(&pg.key_store, KeyStoreToml::Postgres(p) if p.pool_size == Some(4)));
        assert_eq!(pg.key_expiry_secs, Some(60));
        assert!(!pg.parallel_eval());
        let KeyStoreToml::Postgres(t) = &pg.key_store else {
            unreachable!()
        };
        assert_eq!(t.pg_config().unwrap().tls, crate::PgTls::Off);
        assert!(ModelPolicy::from_names(&["packed"]).unwrap().packed);
        assert!(!ModelPolicy::from_names(&["packed"]).unwrap().nokey);
        assert!(ModelPolicy::from_names::<&str>(&[]).is_err());
        assert!(ModelPolicy::from_names(&["plain"]).is_err());
        let bad: Result<CloudToml, _> = toml::from_str("listen = \"127.0.0.1:0\"\nbogus = 1\n");
        assert!(bad.is_err());
    }

    fn pg_table(extra: &str) -> Result<crate::PgConfig, CloudError> {
        let t: PostgresToml = toml::from_str(&format!(
            "postgres = \"host=db.internal user=tandem\"\n{extra}"
        ))
        .unwrap();
        t.pg_config()
    }

    #[test]
    fn postgres_tls_settings_parse_and_inconsistent_ones_are_refused() {
        assert_eq!(pg_table("").unwrap().tls, crate::PgTls::Off);
        assert_eq!(pg_table("tls = \"off\"").unwrap().tls, crate::PgTls::Off);
        assert_eq!(
            pg_table("tls = \"require\"").unwrap().tls,
            crate::PgTls::Require
        );
        assert_eq!(
            pg_table("tls = \"verify-full\"\nca = \"/etc/tandem/db-ca.pem\"")
                .unwrap()
                .tls,
            crate::PgTls::VerifyFull {
                ca: "/etc/tandem/db-ca.pem".into()
            }
        );
        for (extra, says) in [
            ("tls = \"verify-full\"", "needs ca"),
            ("tls = \"require\"\nca = \"ca.pem\"", "only used with"),
            ("ca = \"ca.pem\"", "only used with"),
            ("tls = \"verify-ca\"", "not one of"),
        ] {
            match pg_table(extra) {
                Err(CloudError::Config(m)) => assert!(m.contains(says), "{extra}: {m}"),
                other => panic!("{extra}: want a Config error, got {other:?}"),
            }
        }
    }
}
