//! The shared key-store backend: PostgreSQL, for several replicas behind a balancer
//! (issue 13). `tokio-postgres` with a `deadpool-postgres` pool, driven by a small runtime of
//! its own so that the blocking [`KeyBackend`] calls work from any thread (evaluation tasks,
//! the accept loop's blocking helpers, tests) without nesting runtimes.
//!
//! The schema lives in `cloud/migrations/*.sql` (compiled in); it is applied on the first
//! successful connection, under a transaction-scoped advisory lock so that replicas starting
//! together apply each migration once, and recorded in `tandem_schema_migrations`.
//!
//! A registration runs in one transaction under an advisory lock on the device identity, so
//! that concurrent registrations of one device on different replicas see each other and the
//! quota holds. Every operation has a deadline ([`PgConfig::op_timeout`]); a database that is
//! down or slow gives [`CloudError::StoreUnavailable`], and the pool reconnects when it returns.
//!
//! TLS to the database is optional ([`PgTls`], `key_store.tls` in `cloud.toml`): off by default,
//! `require` (encrypted, server certificate not checked) or `verify-full` (the server's chain
//! checked against `key_store.ca` and its name against `host=`). It runs on rustls with the
//! **ring** provider that the device link uses ([`tandem_tls::provider`]), TLS 1.3 only, through
//! `tokio-postgres-rustls`; when TLS is on the connection never falls back to plain text.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tandem_tls::pki_types::{CertificateDer, ServerName, UnixTime};
use tandem_tls::rustls;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::keystore::{plan_evictions, KeyBackend, KeyQuota, KeyRecord};
use crate::CloudError;

/// Migrations in order: (version, SQL).
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../migrations/0001_keys.sql"))];

/// Advisory-lock key serialising migrations (any constant shared by all replicas).
const MIGRATION_LOCK: i64 = 0x7461_6e64_656d_0001;

/// Connection settings of the PostgreSQL key store (`[key_store]` in `cloud.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// libpq-style connection string: `host=127.0.0.1 port=5432 user=tandem dbname=tandem`
    /// or `postgresql://tandem@127.0.0.1:5432/tandem` (a password may come from the string).
    pub url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Deadline of one store operation, including waiting for a connection.
    pub op_timeout: Duration,
    /// TLS to the database [off].
    pub tls: PgTls,
}

/// TLS to the database (`key_store.tls` and `key_store.ca` in `cloud.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PgTls {
    /// Plain TCP (`tls = "off"`, the default): for a database on loopback or a trusted
    /// private network.
    #[default]
    Off,
    /// TLS required, the server certificate **not** checked (`tls = "require"`, as libpq's
    /// `sslmode=require`): protects against eavesdropping, not against an active attacker who
    /// impersonates the database.
    Require,
    /// TLS required, the server's certificate chain checked against the CA certificates in
    /// `ca` and the host name of the connection string (`host=`, a DNS name or IP address)
    /// checked against the certificate (`tls = "verify-full"`, as libpq's
    /// `sslmode=verify-full`).
    VerifyFull {
        /// PEM file with one or more CA certificates.
        ca: PathBuf,
    },
}

impl PgConfig {
    /// `url` with a pool of 8, a 3 s deadline and no TLS.
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            pool_size: 8,
            op_timeout: Duration::from_secs(3),
            tls: PgTls::Off,
        }
    }
}

/// The PostgreSQL backend.
pub struct PgStore {
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    migrated: std::sync::Arc<AtomicBool>,
    op_timeout: Duration,
    target: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime may happen inside another runtime's task: do not block there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// `require`: accepts any server certificate but still checks the handshake signatures (so
/// the session key is bound to the certificate the server presented).
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls client configuration of `tls` (`None` when off).
///
/// # Errors
/// [`CloudError::Tls`] naming the CA file if it is missing, unreadable or holds no PEM
/// certificate; [`CloudError::Config`] naming it if a certificate in it is not usable as a
/// trust anchor.
fn rustls_config(tls: &PgTls) -> Result<Option<rustls::ClientConfig>, CloudError> {
    let provider = tandem_tls::provider();
    let builder = || {
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CloudError::Config(format!("key_store.tls: {e}")))
    };
    Ok(match tls {
        PgTls::Off => None,
        PgTls::Require => Some(
            builder()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider.clone())))
                .with_no_client_auth(),
        ),
        PgTls::VerifyFull { ca } => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in tandem_tls::load_certificates(ca)? {
                roots.add(cert).map_err(|e| {
                    CloudError::Config(format!(
                        "key_store.ca {}: {e} (the file must hold the PEM certificate of the CA that signed the database server's certificate)",
                        ca.display()
                    ))
                })?;
            }
            Some(
                builder()?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
    })
}

/// `e` and its sources, each once (tokio-postgres keeps the reason in the source).
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        next = s.source();
    }
    out
}

/// Whether `e` or one of its sources is a failed TLS handshake (rustls' error inside an I/O
/// error, or tokio-postgres' TLS kind).
fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(s) = next {
        if s.is::<rustls::Error>()
            || s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>())
            || s.to_string().contains("TLS")
        {
            return true;
        }
        next = s.source();
    }
    false
}

/// A failure to get a connection: [`CloudError::StoreUnavailable`] with the reason (the TLS
/// reason and what to check when the handshake failed).
fn connect_failure(target: &str, e: &(dyn std::error::Error + 'static)) -> CloudError {
    if is_tls_failure(e) {
        CloudError::StoreUnavailable(format!(
            "PostgreSQL at {target}: TLS to the database failed: {} (check key_store.tls and key_store.ca against the server's certificate and the name in host=, and that the server has ssl = on)",
            with_sources(e)
        ))
    } else {
        unavailable(target, with_sources(e))
    }
}

fn unavailable(target: &str, e: impl std::fmt::Display) -> CloudError {
    CloudError::StoreUnavailable(format!(
        "PostgreSQL at {target}: {e} (check that the database runs and accepts this replica; requests are refused with Busy until it answers)"
    ))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn id32(v: &[u8]) -> Option<[u8; 32]> {
    <[u8; 32]>::try_from(v).ok()
}

/// Advisory-lock key of one device identity.
fn peer_lock(peer: &[u8; 32]) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&peer[..8]);
    i64::from_be_bytes(b)
}

type Conn = deadpool_postgres::Object;

async fn migrate(client: &mut Conn) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tandem_schema_migrations (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await?;
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM tandem_schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO tandem_schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
        }
    }
    tx.commit().await
}

impl PgStore {
    /// A store for `cfg`. Does not connect: the pool connects (and migrates) on first use, so
    /// a replica starts while the database is down and becomes ready when it answers.
    ///
    /// # Errors
    /// [`CloudError::Config`] if the connection string does not parse, asks for
    /// `sslmode=require` while [`PgConfig::tls`] is off, or the runtime or pool cannot be built;
    /// [`CloudError::Tls`] or [`CloudError::Config`] naming the CA file of
    /// [`PgTls::VerifyFull`] if it is missing or damaged.
    pub fn new(cfg: &PgConfig) -> Result<Self, CloudError> {
        let mut pg: tokio_postgres::Config = cfg.url.parse().map_err(|e| {
            CloudError::Config(format!(
                "key_store.postgres: {e} (expected e.g. \"host=127.0.0.1 port=5432 user=tandem dbname=tandem\")"
            ))
        })?;
        pg.connect_timeout(cfg.op_timeout);
        pg.application_name("tandem-cloud");
        let tls = rustls_config(&cfg.tls)?;
        if tls.is_some() {
            // Never fall back to plain text when the server declines TLS.
            pg.ssl_mode(SslMode::Require);
        } else if pg.get_ssl_mode() == SslMode::Require {
            return Err(CloudError::Config(
                "key_store.postgres asks for sslmode=require but key_store.tls is off: set tls = \"require\" or \"verify-full\" (with ca = \"...\")".into(),
            ));
        }
        let target = {
            let hosts: Vec<String> = pg
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            format!(
                "{}:{:?}/{}",
                hosts.join(","),
                pg.get_ports(),
                pg.get_dbname().unwrap_or("?")
            )
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tandem-pg")
            .enable_all()
            .build()
            .map_err(|e| CloudError::Config(format!("PostgreSQL runtime: {e}")))?;
        let mc = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match tls {
            None => Manager::from_config(pg, NoTls, mc()),
            Some(c) => Manager::from_config(pg, MakeRustlsConnect::new(c), mc()),
        };
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(cfg.op_timeout))
            .create_timeout(Some(cfg.op_timeout))
            .recycle_timeout(Some(cfg.op_timeout))
            .build()
            .map_err(|e| CloudError::Config(format!("PostgreSQL pool: {e}")))?;
        Ok(PgStore {
            rt: Some(rt),
            pool,
            migrated: std::sync::Arc::new(AtomicBool::new(false)),
            op_timeout: cfg.op_timeout,
            target,
        })
    }

    /// Runs `f` with a pooled, migrated connection on the store's runtime and waits for it
    /// (at most the operation deadline).
    fn run<T, F, Fut>(&self, f: F) -> Result<T, CloudError>
    where
        T: Send + 'static,
        F: FnOnce(Conn) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, tokio_postgres::Error>> + Send,
    {
        let Some(rt) = &self.rt else {
            return Err(unavailable(&self.target, "store closed"));
        };
        let pool = self.pool.clone();
        let migrated = self.migrated.clone();
        let target = self.target.clone();
        let deadline = self.op_timeout;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let work = async {
                let mut conn = pool
                    .get()
                    .await
                    .map_err(|e| connect_failure(&target, &e))?;
                if !migrated.load(Ordering::Acquire) {
                    migrate(&mut conn).await.map_err(|e| {
                        CloudError::StoreUnavailable(format!(
                            "PostgreSQL at {target}: applying the schema migrations failed: {e} (check the role's CREATE rights on the database)"
                        ))
                    })?;
                    migrated.store(true, Ordering::Release);
                }
                f(conn).await.map_err(|e| classify(&target, &e))
            };
            let r = match tokio::time::timeout(deadline, work).await {
                Ok(r) => r,
                Err(_) => Err(unavailable(
                    &target,
                    format!("no answer within {deadline:?}"),
                )),
            };
            let _ = tx.send(r);
        });
        rx.recv()
            .map_err(|_| unavailable(&self.target, "store task ended"))?
    }
}

/// Connection-level failures are `StoreUnavailable` (transient); others are `Store`.
fn classify(target: &str, e: &tokio_postgres::Error) -> CloudError {
    if e.is_closed() || e.as_db_error().is_none() {
        unavailable(target, e)
    } else {
        CloudError::Store(format!("PostgreSQL at {target}: {e}"))
    }
}

impl KeyBackend for PgStore {
    fn put(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        mode: u8,
        he_key_id: &[u8; 32],
        blob: &[u8],
        quota: KeyQuota,
        cutoff_us: u64,
        now_us: u64,
    ) -> Result<Vec<[u8; 32]>, CloudError> {
        let (peer, key_id, he_key_id, blob) = (*peer, *key_id, *he_key_id, blob.to_vec());
        self.run(move |mut c| async move {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&peer_lock(&peer)])
                .await?;
            let (p, k) = (&peer[..], &key_id[..]);
            tx.execute(
                "DELETE FROM tandem_keys WHERE peer = $1 AND key_id <> $2 AND last_use_us < $3",
                &[&p, &k, &i64_of(cutoff_us)],
            )
            .await?;
            let rows = tx
                .query(
                    "SELECT key_id, size_bytes, last_use_us FROM tandem_keys WHERE peer = $1 AND key_id <> $2",
                    &[&p, &k],
                )
                .await?;
            let others = rows
                .iter()
                .filter_map(|r| {
                    let id: &[u8] = r.get(0);
                    let size: i64 = r.get(1);
                    let used: i64 = r.get(2);
                    id32(id).map(|id| (id, u64_of(size), u64_of(used)))
                })
                .collect();
            let evicted = plan_evictions(others, blob.len() as u64, quota);
            if !evicted.is_empty() {
                let ids: Vec<Vec<u8>> = evicted.iter().map(|i| i.to_vec()).collect();
                tx.execute(
                    "DELETE FROM tandem_keys WHERE peer = $1 AND key_id = ANY($2)",
                    &[&p, &ids],
                )
                .await?;
            }
            let now = i64_of(now_us);
            tx.execute(
                "INSERT INTO tandem_keys (peer, key_id, mode, he_key_id, blob, size_bytes, created_us, last_use_us)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
                 ON CONFLICT (peer, key_id) DO UPDATE SET mode = EXCLUDED.mode,
                   he_key_id = EXCLUDED.he_key_id, blob = EXCLUDED.blob,
                   size_bytes = EXCLUDED.size_bytes, created_us = EXCLUDED.created_us,
                   last_use_us = EXCLUDED.last_use_us",
                &[
                    &p,
                    &k,
                    &i16::from(mode),
                    &&he_key_id[..],
                    &blob,
                    &i64_of(blob.len() as u64),
                    &now,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(evicted)
        })
    }

    fn get(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        cutoff_us: u64,
    ) -> Result<Option<KeyRecord>, CloudError> {
        let (peer, key_id) = (*peer, *key_id);
        let target = self.target.clone();
        let row = self.run(move |c| async move {
            c.query_opt(
                "SELECT mode, he_key_id, blob, created_us, last_use_us FROM tandem_keys
                 WHERE peer = $1 AND key_id = $2 AND last_use_us >= $3",
                &[&&peer[..], &&key_id[..], &i64_of(cutoff_us)],
            )
            .await
        })?;
        let Some(r) = row else { return Ok(None) };
        let mode: i16 = r.try_get(0).map_err(|e| classify(&target, &e))?;
        let he: &[u8] = r.try_get(1).map_err(|e| classify(&target, &e))?;
        let blob: Vec<u8> = r.try_get(2).map_err(|e| classify(&target, &e))?;
        let created: i64 = r.try_get(3).map_err(|e| classify(&target, &e))?;
        let used: i64 = r.try_get(4).map_err(|e| classify(&target, &e))?;
        let (Ok(mode), Some(he_key_id)) = (u8::try_from(mode), id32(he)) else {
            return Err(CloudError::Store(format!(
                "PostgreSQL at {target}: damaged key record (mode {mode}, HE key id of {} bytes)",
                he.len()
            )));
        };
        Ok(Some(KeyRecord {
            mode,
            he_key_id,
            blob,
            created_us: u64_of(created),
            last_use_us: u64_of(used),
        }))
    }

    fn touch(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        cutoff_us: u64,
        now_us: u64,
    ) -> Result<Option<u64>, CloudError> {
        let (peer, key_id) = (*peer, *key_id);
        let row = self.run(move |c| async move {
            c.query_opt(
                "UPDATE tandem_keys SET last_use_us = GREATEST(last_use_us, $4)
                 WHERE peer = $1 AND key_id = $2 AND last_use_us >= $3 RETURNING created_us",
                &[
                    &&peer[..],
                    &&key_id[..],
                    &i64_of(cutoff_us),
                    &i64_of(now_us),
                ],
            )
            .await
        })?;
        Ok(row.and_then(|r| r.try_get::<_, i64>(0).ok()).map(u64_of))
    }

    fn list(
        &self,
        peer: &[u8; 32],
        max: usize,
        cutoff_us: u64,
    ) -> Result<Vec<[u8; 32]>, CloudError> {
        let peer = *peer;
        let rows = self.run(move |c| async move {
            c.query(
                "SELECT key_id FROM tandem_keys WHERE peer = $1 AND last_use_us >= $2
                 ORDER BY key_id LIMIT $3",
                &[&&peer[..], &i64_of(cutoff_us), &i64_of(max as u64)],
            )
            .await
        })?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<_, &[u8]>(0).ok().and_then(id32))
            .collect())
    }

    fn expire(&self, cutoff_us: u64) -> Result<u64, CloudError> {
        self.run(move |c| async move {
            c.execute(
                "DELETE FROM tandem_keys WHERE last_use_us < $1",
                &[&i64_of(cutoff_us)],
            )
            .await
        })
    }

    fn len(&self) -> Result<u64, CloudError> {
        let n = self.run(|c| async move {
            c.query_one("SELECT count(*) FROM tandem_keys", &[])
                .await
                .and_then(|r| r.try_get::<_, i64>(0))
        })?;
        Ok(u64_of(n))
    }

    fn ping(&self) -> Result<(), CloudError> {
        self.run(|c| async move { c.simple_query("SELECT 1").await.map(|_| ()) })
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}
