//! Issue 13 (scale-out) against real services on loopback: PostgreSQL and HAProxy as
//! `scripts/scaleout-env.sh` starts them (`.ci/run` does), replicas as `tandem-replica`
//! processes over real mutual TLS.
//!
//! * one generic key-store suite, run against the `redb` and the PostgreSQL backend;
//! * fail-over: the same device reaches replica A, then (A stopped) replica B through the
//!   balancer and infers without uploading its key again;
//! * a replica SIGKILLed under load: every inference completes once or is reported failed,
//!   none hangs, none is charged twice to the privacy ledger;
//! * the database down at start-up and mid-run: typed errors, readiness false, recovery;
//! * TLS to the database: `verify-full` with the right CA passes the suite over TLS, a wrong CA
//!   or host name is refused with a typed error, `require` never falls back to plain text,
//!   and `off` still works against the same TLS-enabled cluster.
//!
//! Needs `TANDEM_TEST_PG` (admin connection string), `TANDEM_TEST_HAPROXY` (binary) and
//! `TANDEM_SCALEOUT_ENV` (the script): `eval "$(bash scripts/scaleout-env.sh env)"`. Without
//! them each service test prints `SKIPPED: …` and returns — unless
//! `TANDEM_SCALEOUT_REQUIRED=1` (CI), where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cloud::{
    Cloud, CloudError, KeyBackend, KeyQuota, PgConfig, PgStore, PgTls, RedbStore, ServerOptions,
};
use tandem_device::{Device, DeviceError, DeviceOptions, Protection, RetryPolicy};
use tandem_model::{read_verifying_key, TestSet, VerifyingKey};
use tandem_protocol::ErrorCode;
use tandem_tls::{client_config, server_config, DevPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------
// Environment

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn vk_path() -> PathBuf {
    repo().join("models/dev-verifying-key.txt")
}

fn vk() -> VerifyingKey {
    read_verifying_key(&vk_path()).unwrap()
}

fn digits() -> PathBuf {
    repo().join("models/digits")
}

fn test_x() -> Vec<Vec<f32>> {
    TestSet::load(&digits().join("test.json")).unwrap().x
}

struct Services {
    pg_admin: String,
    haproxy: PathBuf,
    script: PathBuf,
}

/// The services, or `None` after printing why the test is skipped (a failure when
/// `TANDEM_SCALEOUT_REQUIRED` is set).
fn services(test: &str) -> Option<Services> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("TANDEM_TEST_PG"),
        get("TANDEM_TEST_HAPROXY"),
        get("TANDEM_SCALEOUT_ENV"),
    ) {
        (Some(pg_admin), Some(h), Some(s)) => Some(Services {
            pg_admin,
            haproxy: h.into(),
            script: s.into(),
        }),
        _ => {
            let why = "TANDEM_TEST_PG / TANDEM_TEST_HAPROXY / TANDEM_SCALEOUT_ENV not set (run `bash scripts/scaleout-env.sh start` and `eval \"$(bash scripts/scaleout-env.sh env)\"`)";
            if get("TANDEM_SCALEOUT_REQUIRED").is_some() {
                panic!("{test}: {why}");
            }
            println!("SKIPPED: {test}: {why}");
            None
        }
    }
}

/// A loopback port for a service these tests start themselves (a replica, HAProxy, a private
/// PostgreSQL cluster), which binds it only later: after process start-up, or after initdb
/// (seconds). A port from `bind(0)` is free when probed, but every other `bind(0)` on the
/// machine in that window (the in-process clouds and metrics listeners, the replicas of other
/// tests) draws at random from the same ephemeral range and takes it with probability
/// ~1/14 000 each (Linux: the odd half of 32768–60999); two probes of this process could also
/// return the same port. So the port comes from below the ephemeral range (which `bind(0)`
/// and outgoing connections never use), is never handed out twice by this process, and is
/// free when handed out.
fn free_port() -> u16 {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (low, high) = (
        ephemeral_low.saturating_sub(12_000).max(1024),
        ephemeral_low,
    );
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    if high > low {
        let span = u32::from(high - low);
        // Different processes start at different places (a concurrent run of this binary).
        let start = std::process::id().wrapping_mul(7919) % span;
        for i in 0..span {
            let port = low + ((start + i) % span) as u16;
            if !given.contains(&port) && std::net::TcpListener::bind(loopback(port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    // No room below the ephemeral range: an OS-chosen port, still never handed out twice.
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if given.insert(port) {
            return port;
        }
    }
}

/// Taken by every child-process spawn until the child has exec'd, and by a test around
/// reopening a file-locked store it has just closed. Between `fork` and `exec` a child holds a
/// copy of every descriptor of this (multi-threaded) test process, and with it the `flock` of
/// any redb store a parallel test has open: a reopen in that instant is refused as "in use by
/// another process" (the same mechanism made `crypto/dp/tests/ledger_lock.rs` fail once in
/// CI). `Command::spawn` returns after the exec, so holding this across it closes the window.
static FORK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fork_guard() -> std::sync::MutexGuard<'static, ()> {
    FORK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `cmd.spawn()` under [`FORK`].
fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let _g = fork_guard();
    cmd.spawn()
}

/// `cmd.status()` with the spawn under [`FORK`] (not the wait).
fn status(cmd: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    spawn(cmd)?.wait()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A fresh database in the shared cluster; its connection string.
async fn fresh_db(admin: &str, tag: &str) -> String {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
        .await
        .expect("connecting to TANDEM_TEST_PG");
    tokio::spawn(conn);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("tandem_{tag}_{}_{nanos}", std::process::id());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    format!("{admin} dbname={name}")
}

fn blocking_fresh_db(admin: &str, tag: &str) -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fresh_db(admin, tag))
}

/// `scripts/scaleout-env.sh pg-up|pg-down …`.
async fn env_script(svc: &Services, args: &[&str]) {
    let (script, args): (PathBuf, Vec<String>) = (
        svc.script.clone(),
        args.iter().map(|s| s.to_string()).collect(),
    );
    let st =
        tokio::task::spawn_blocking(move || status(Command::new("bash").arg(&script).args(&args)))
            .await
            .unwrap()
            .unwrap();
    assert!(st.success(), "scaleout-env.sh failed");
}

/// `GET path` over plain HTTP: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("HTTP answer in time")
        .unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Sum of the samples whose line starts with `prefix` (name, or name with labels).
fn metric(body: &str, prefix: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

async fn metrics_of(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    body
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_healthz(addr: SocketAddr, want: u16, limit: Duration) {
    let t = Instant::now();
    loop {
        let got = match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => http_get(addr, "/healthz").await.0,
            Err(_) => 0,
        };
        if got == want {
            return;
        }
        assert!(
            t.elapsed() < limit,
            "/healthz on {addr} still {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Replica processes and the balancer (started by this test; ended by their own ids)

struct Replica {
    child: Child,
    metrics: SocketAddr,
}

impl Replica {
    fn spawn(dir: &Path, pki_dir: &Path, pg: &str, port: u16, metrics_port: u16) -> Replica {
        let toml = format!(
            "listen = \"127.0.0.1:{port}\"\npki_dir = {:?}\nmodels = [{:?}]\nverifying_key = {:?}\nkey_store = {{ postgres = {pg:?}, pool_size = 4, timeout_ms = 2000 }}\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n",
            pki_dir.display().to_string(),
            digits().display().to_string(),
            vk_path().display().to_string(),
        );
        let cfg = dir.join(format!("replica-{port}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let mut child = spawn(
            Command::new(env!("CARGO_BIN_EXE_tandem-replica"))
                .arg(&cfg)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        )
        .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(out).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("replica did not start listening within 60 s");
        assert!(line.starts_with("listening 127.0.0.1:"), "{line}");
        Replica {
            child,
            metrics: loopback(metrics_port),
        }
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn sigterm(&mut self) {
        let st =
            status(Command::new("kill").args(["-TERM", &self.child.id().to_string()])).unwrap();
        assert!(st.success());
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "replica did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn metrics(&self) -> String {
        metrics_of(self.metrics).await
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.sigkill();
    }
}

struct Haproxy {
    child: Child,
    addr: SocketAddr,
}

impl Haproxy {
    /// `cloud/deploy/haproxy.cfg` with its ports replaced: the sample itself is what runs.
    async fn spawn(svc: &Services, dir: &Path, a: (u16, u16), b: (u16, u16)) -> Haproxy {
        let fe = free_port();
        let sample = std::fs::read_to_string(repo().join("cloud/deploy/haproxy.cfg")).unwrap();
        let cfg = sample
            .replace("bind 127.0.0.1:7443", &format!("bind 127.0.0.1:{fe}"))
            .replace(
                "127.0.0.1:7444 port 9444",
                &format!("127.0.0.1:{} port {}", a.0, a.1),
            )
            .replace(
                "127.0.0.1:7445 port 9445",
                &format!("127.0.0.1:{} port {}", b.0, b.1),
            );
        assert_ne!(
            cfg, sample,
            "sample config no longer has the expected ports"
        );
        let path = dir.join(format!("haproxy-{fe}.cfg"));
        std::fs::write(&path, cfg).unwrap();
        let child = spawn(
            Command::new(&svc.haproxy)
                .args(["-db", "-f"])
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("starting haproxy");
        let addr = loopback(fe);
        let t = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "haproxy did not listen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Health checks: rise 2 × 250 ms.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        Haproxy { child, addr }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn device_opts(pki: &DevPki, name: &str, addr: SocketAddr, dir: &Path) -> DeviceOptions {
    let mut o = DeviceOptions::new(
        addr,
        client_config(pki.client_credentials(name).unwrap()).unwrap(),
        digits(),
        vk(),
        dir.join(format!("{name}-ledger.bin")),
    );
    o.io_timeout = Duration::from_secs(20);
    // Thousands of DP releases under load: far above the default budget (ε = 8 per day).
    o.dp.budget_rho = Some(1e9);
    o
}

/// Two replicas on a fresh database behind HAProxy.
struct Cluster {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    pki: DevPki,
    replicas: Vec<Replica>,
    _haproxy: Haproxy,
    addr: SocketAddr,
}

async fn cluster(svc: &Services, tag: &str, devices: usize) -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let pki = DevPki::generate(devices).unwrap();
    let pki_dir = dir.join("pki");
    pki.write(&pki_dir).unwrap();
    let db = fresh_db(&svc.pg_admin, tag).await;
    let ports = [(free_port(), free_port()), (free_port(), free_port())];
    let replicas: Vec<Replica> = ports
        .iter()
        .map(|&(p, m)| Replica::spawn(&dir, &pki_dir, &db, p, m))
        .collect();
    for r in &replicas {
        wait_healthz(r.metrics, 200, Duration::from_secs(20)).await;
    }
    let haproxy = Haproxy::spawn(svc, &dir, ports[0], ports[1]).await;
    let addr = haproxy.addr;
    Cluster {
        _dir: tmp,
        dir,
        pki,
        replicas,
        _haproxy: haproxy,
        addr,
    }
}

// ---------------------------------------------------------------------------------------
// The generic key-store suite

fn id(n: u8) -> [u8; 32] {
    [n; 32]
}

/// One suite for every backend. `open` opens the same store again (after the previous
/// handle is dropped), to check durability.
fn keystore_suite(open: &dyn Fn() -> Arc<dyn KeyBackend>) {
    let (a, b) = (id(0xa1), id(0xb2));
    let q = KeyQuota {
        max_keys: 2,
        max_bytes: 1000,
    };
    let s = open();
    s.ping().unwrap();
    assert_eq!(s.len().unwrap(), 0);

    // Round trip: mode, HE key id, blob, size and times.
    assert!(s
        .put(&a, &id(1), 1, &id(0x11), &[7; 300], q, 0, 100)
        .unwrap()
        .is_empty());
    let r = s.get(&a, &id(1), 0).unwrap().expect("stored");
    assert_eq!((r.mode, r.he_key_id, r.blob.len()), (1, id(0x11), 300));
    assert_eq!((r.created_us, r.last_use_us), (100, 100));
    assert!(r.blob.iter().all(|&x| x == 7));

    // Isolation (TDM-KEY-4): B cannot read, use, list or overwrite A's key.
    assert!(s.get(&b, &id(1), 0).unwrap().is_none());
    assert_eq!(s.touch(&b, &id(1), 0, 150).unwrap(), None);
    assert!(s.list(&b, 10, 0).unwrap().is_empty());
    s.put(&b, &id(1), 0, &id(1), &[], q, 0, 160).unwrap();
    let r = s.get(&a, &id(1), 0).unwrap().unwrap();
    assert_eq!(
        (r.mode, r.blob.len(), r.last_use_us),
        (1, 300, 100),
        "B's put left A's key"
    );
    assert_eq!(s.get(&b, &id(1), 0).unwrap().unwrap().blob.len(), 0);
    assert_eq!(s.len().unwrap(), 2);

    // Use and LRU eviction by count: A has 1 (t=100), 2 (t=200); 1 used at 300; 3 evicts 2.
    s.put(&a, &id(2), 1, &id(0x12), &[2; 100], q, 0, 200)
        .unwrap();
    assert_eq!(s.touch(&a, &id(1), 0, 300).unwrap(), Some(100));
    assert_eq!(s.get(&a, &id(1), 0).unwrap().unwrap().last_use_us, 300);
    // Last use never moves backwards.
    assert_eq!(s.touch(&a, &id(1), 0, 250).unwrap(), Some(100));
    assert_eq!(s.get(&a, &id(1), 0).unwrap().unwrap().last_use_us, 300);
    let ev = s
        .put(&a, &id(3), 1, &id(0x13), &[3; 100], q, 0, 400)
        .unwrap();
    assert_eq!(ev, vec![id(2)]);
    assert_eq!(s.list(&a, 10, 0).unwrap(), vec![id(1), id(3)]);
    assert_eq!(s.list(&a, 1, 0).unwrap(), vec![id(1)], "list honours max");
    // B's key is not A's quota.
    assert!(s.get(&b, &id(1), 0).unwrap().is_some());

    // Re-registering an id replaces it in place (no eviction) with a new creation time.
    assert!(s
        .put(&a, &id(3), 1, &id(0x23), &[4; 50], q, 0, 500)
        .unwrap()
        .is_empty());
    let r = s.get(&a, &id(3), 0).unwrap().unwrap();
    assert_eq!(
        (r.he_key_id, r.blob.len(), r.created_us),
        (id(0x23), 50, 500)
    );

    // Byte quota: 300 + 50 stored; 800 more needs both gone, least recent (1 at 300) first.
    let qb = KeyQuota {
        max_keys: 8,
        max_bytes: 1000,
    };
    let ev = s
        .put(&a, &id(4), 1, &id(0x14), &[5; 800], qb, 0, 600)
        .unwrap();
    assert_eq!(
        ev,
        vec![id(1)],
        "300 + 50 + 800 > 1000: evict the LRU key only"
    );
    assert_eq!(s.list(&a, 10, 0).unwrap(), vec![id(3), id(4)]);
    drop(s);

    // Durable across a reopen.
    let s = open();
    assert_eq!(s.list(&a, 10, 0).unwrap(), vec![id(3), id(4)]);
    assert_eq!(s.get(&a, &id(4), 0).unwrap().unwrap().blob.len(), 800);
    assert_eq!(s.len().unwrap(), 3);

    // Expiry: cutoff 550 — A's 3 (500) and B's 1 (160) are expired; A's 4 (600) is not.
    assert!(s.get(&a, &id(3), 550).unwrap().is_none());
    assert_eq!(s.touch(&a, &id(3), 550, 700).unwrap(), None, "no revival");
    assert!(s.get(&a, &id(3), 0).unwrap().is_some(), "not yet swept");
    assert_eq!(s.list(&a, 10, 550).unwrap(), vec![id(4)]);
    // A write for A deletes A's expired keys (not B's).
    s.put(&a, &id(5), 1, &id(0x15), &[6; 10], qb, 550, 800)
        .unwrap();
    assert!(s.get(&a, &id(3), 0).unwrap().is_none());
    assert!(s.get(&b, &id(1), 0).unwrap().is_some());
    // The sweep deletes the rest.
    assert_eq!(s.expire(550).unwrap(), 1);
    assert!(s.get(&b, &id(1), 0).unwrap().is_none());
    assert_eq!(s.len().unwrap(), 2);
    assert_eq!(s.expire(550).unwrap(), 0);
}

#[test]
fn keystore_suite_redb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    // The suite drops its handle and reopens: under FORK, so no child process forked in
    // between still holds the store's lock.
    keystore_suite(&|| {
        let _g = fork_guard();
        Arc::new(RedbStore::open(&path).unwrap())
    });
}

#[test]
fn keystore_suite_postgres() {
    let Some(svc) = services("keystore_suite_postgres") else {
        return;
    };
    let url = blocking_fresh_db(&svc.pg_admin, "suite");
    keystore_suite(&|| Arc::new(PgStore::new(&PgConfig::new(url.clone())).unwrap()));
}

/// Concurrent registrations of one device on two stores (two replicas) keep the quota.
#[test]
fn postgres_quota_holds_across_replicas() {
    let Some(svc) = services("postgres_quota_holds_across_replicas") else {
        return;
    };
    let url = blocking_fresh_db(&svc.pg_admin, "quota");
    let stores: Vec<Arc<PgStore>> = (0..2)
        .map(|_| Arc::new(PgStore::new(&PgConfig::new(url.clone())).unwrap()))
        .collect();
    let q = KeyQuota {
        max_keys: 3,
        max_bytes: 1 << 20,
    };
    let peer = id(0xcc);
    std::thread::scope(|sc| {
        for (n, s) in stores.iter().enumerate() {
            sc.spawn(move || {
                for k in 0..20u8 {
                    let t = tandem_cloud::keystore::now_us();
                    s.put(&peer, &id(k * 2 + n as u8), 1, &id(1), &[0; 64], q, 0, t)
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(stores[0].list(&peer, 100, 0).unwrap().len(), 3);
    assert_eq!(stores[1].len().unwrap(), 3);
}

/// `scripts/scaleout-env.sh …` from a synchronous test.
fn env_script_blocking(svc: &Services, args: &[&str]) {
    let st = status(Command::new("bash").arg(&svc.script).args(args)).unwrap();
    assert!(st.success(), "scaleout-env.sh {args:?} failed");
}

/// Connections of the store (application `tandem-cloud`) to database `db`: (over TLS, plain).
fn store_connections(admin: &str, db: &str) -> (i64, i64) {
    let (admin, db) = (admin.to_string(), db.to_string());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let row = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
                     FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                     WHERE a.application_name = 'tandem-cloud' AND a.datname = $1",
                    &[&db],
                )
                .await
                .unwrap();
            (row.get(0), row.get(1))
        })
}

/// Stops a private cluster when the test ends, passed or failed.
struct ClusterDown<'a>(&'a Services, String);

impl Drop for ClusterDown<'_> {
    fn drop(&mut self) {
        let _ = status(
            Command::new("bash")
                .arg(&self.0.script)
                .args(["pg-down", &self.1]),
        );
    }
}

fn tls_store(url: &str, tls: PgTls) -> Arc<dyn KeyBackend> {
    let mut c = PgConfig::new(url);
    c.tls = tls;
    Arc::new(PgStore::new(&c).unwrap())
}

fn tls_refused(s: &Arc<dyn KeyBackend>, says: &str) {
    match s.ping() {
        Err(CloudError::StoreUnavailable(m)) => {
            assert!(m.contains("TLS to the database failed"), "{m}");
            assert!(m.contains(says), "want {says:?} in: {m}");
        }
        other => panic!("want StoreUnavailable (TLS), got {other:?}"),
    }
    match s.get(&id(1), &id(1), 0) {
        Err(CloudError::StoreUnavailable(_)) => {}
        other => panic!("want StoreUnavailable (TLS), got {other:?}"),
    }
}

/// A private cluster with `ssl = on` and a server certificate (for `localhost` only) from a
/// CA made here: `verify-full` with that CA passes the key-store suite over TLS; a wrong CA,
/// a host name not in the certificate and `require` against a cluster without TLS are refused
/// with typed errors (never a plain-text fallback); `off` still works against the same cluster.
#[test]
fn postgres_tls_verify_full_wrong_ca_require_and_off() {
    let Some(svc) = services("postgres_tls_verify_full_wrong_ca_require_and_off") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let files = pki.write(&dir.path().join("pki")).unwrap();
    let server = pki.issue_cloud(&["localhost"]).unwrap();
    let tls_dir = dir.path().join("pg-tls");
    std::fs::create_dir(&tls_dir).unwrap();
    std::fs::write(tls_dir.join("server.crt"), server.cert_pem()).unwrap();
    std::fs::write(tls_dir.join("server.key"), server.key_pem()).unwrap();
    let port = free_port();
    let cluster = format!("tls-{}-{port}", std::process::id());
    env_script_blocking(
        &svc,
        &[
            "pg-up",
            &cluster,
            &port.to_string(),
            tls_dir.to_str().unwrap(),
        ],
    );
    let _down = ClusterDown(&svc, cluster.clone());
    let admin = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    // Connect to 127.0.0.1 but check the certificate for the name `localhost`.
    let by_name = |db: &str| {
        format!("host=localhost hostaddr=127.0.0.1 port={port} user=postgres dbname={db}")
    };
    let right = PgTls::VerifyFull {
        ca: files.cloud_ca_cert.clone(),
    };

    // verify-full, right CA and name: the whole suite, over TLS.
    let url = blocking_fresh_db(&admin, "tls");
    let db = url.rsplit("dbname=").next().unwrap().to_string();
    keystore_suite(&|| tls_store(&by_name(&db), right.clone()));
    let keep = tls_store(&by_name(&db), right.clone());
    keep.ping().unwrap();
    let (tls, plain) = store_connections(&admin, &db);
    assert!(
        tls >= 1 && plain == 0,
        "verify-full: {tls} TLS, {plain} plain"
    );
    drop(keep);

    // A CA that did not sign the server's certificate: refused, typed, with the reason.
    let wrong = PgTls::VerifyFull {
        ca: files.device_ca_cert.clone(),
    };
    tls_refused(&tls_store(&by_name(&db), wrong), "UnknownIssuer");
    // The right CA but a host name the certificate is not for.
    tls_refused(
        &tls_store(
            &format!("host=127.0.0.1 port={port} user=postgres dbname={db}"),
            right.clone(),
        ),
        "not valid for name",
    );

    // require: encrypted against the TLS cluster, refused (no fallback) against one without.
    let url_req = blocking_fresh_db(&admin, "tlsreq");
    let db_req = url_req.rsplit("dbname=").next().unwrap().to_string();
    let s = tls_store(&url_req, PgTls::Require);
    s.put(
        &id(2),
        &id(3),
        1,
        &id(4),
        &[9; 100],
        KeyQuota::default(),
        0,
        10,
    )
    .unwrap();
    assert_eq!(
        s.get(&id(2), &id(3), 0).unwrap().unwrap().blob,
        vec![9; 100]
    );
    assert_eq!(store_connections(&admin, &db_req).1, 0, "require: plain");
    tls_refused(&tls_store(&svc.pg_admin, PgTls::Require), "TLS");

    // off: plain text, still works against the TLS-enabled cluster.
    let url_off = blocking_fresh_db(&admin, "tlsoff");
    let db_off = url_off.rsplit("dbname=").next().unwrap().to_string();
    let s = tls_store(&url_off, PgTls::Off);
    s.put(
        &id(2),
        &id(3),
        1,
        &id(4),
        &[8; 100],
        KeyQuota::default(),
        0,
        10,
    )
    .unwrap();
    assert_eq!(
        s.get(&id(2), &id(3), 0).unwrap().unwrap().blob,
        vec![8; 100]
    );
    let (tls, plain) = store_connections(&admin, &db_off);
    assert!(tls == 0 && plain >= 1, "off: {tls} TLS, {plain} plain");
    drop(s);
}

/// End to end from `cloud.toml`: a replica whose `key_store` says `tls = "verify-full"` with
/// the right CA becomes ready, a device infers (its key is stored over TLS); a replica with a
/// wrong CA starts but stays not ready (`/healthz` 503) and refuses the key with `Busy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_toml_verify_full_replica_serves_and_wrong_ca_is_not_ready() {
    let Some(svc) = services("cloud_toml_verify_full_replica_serves_and_wrong_ca_is_not_ready")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(2).unwrap();
    let files = pki.write(&dir.path().join("pki")).unwrap();
    let server = pki.issue_cloud(&["localhost"]).unwrap();
    let tls_dir = dir.path().join("pg-tls");
    std::fs::create_dir(&tls_dir).unwrap();
    std::fs::write(tls_dir.join("server.crt"), server.cert_pem()).unwrap();
    std::fs::write(tls_dir.join("server.key"), server.key_pem()).unwrap();
    let port = free_port();
    let cluster = format!("tlsrep-{}-{port}", std::process::id());
    env_script(
        &svc,
        &[
            "pg-up",
            &cluster,
            &port.to_string(),
            tls_dir.to_str().unwrap(),
        ],
    )
    .await;
    let _down = ClusterDown(&svc, cluster.clone());
    let admin = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let url = fresh_db(&admin, "tlsrep").await;
    let db = url.rsplit("dbname=").next().unwrap().to_string();

    let replica = |name: &str, ca: &Path| {
        let toml = format!(
            r#"listen = "127.0.0.1:0"
pki_dir = "{pki}"
verifying_key = "{vk}"
models = ["{model}"]
metrics_listen = "127.0.0.1:0"
key_store = {{ postgres = "host=localhost hostaddr=127.0.0.1 port={port} user=postgres dbname={db}", tls = "verify-full", ca = "{ca}", timeout_ms = 1000 }}
"#,
            pki = dir.path().join("pki").display(),
            vk = vk_path().display(),
            model = digits().display(),
            ca = ca.display(),
        );
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        let mut opts = tandem_cloud::CloudToml::load(&path)
            .unwrap()
            .into_options()
            .unwrap();
        opts.health_interval = Duration::from_millis(200);
        opts
    };
    let x = test_x();

    let good = Cloud::start(replica("good", &files.cloud_ca_cert))
        .await
        .unwrap();
    wait_for("readiness", Duration::from_secs(20), || good.ready()).await;
    let mut o = device_opts(&pki, "device-1", good.local_addr(), dir.path());
    o.retry = RetryPolicy::none();
    let mut d = Device::connect(o).await.unwrap();
    d.infer(&x[0], Protection::Encrypted).await.unwrap();
    d.close().await;
    assert_eq!(good.key_store().len().unwrap(), 1);
    let (a, d2) = (admin.clone(), db.clone());
    let (tls, plain) = tokio::task::spawn_blocking(move || store_connections(&a, &d2))
        .await
        .unwrap();
    assert!(tls >= 1 && plain == 0, "replica: {tls} TLS, {plain} plain");
    good.shutdown().await;

    let bad = Cloud::start(replica("bad", &files.device_ca_cert))
        .await
        .expect("starts; the handshake fails at the first use");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!bad.ready());
    let m = bad.metrics_addr().unwrap();
    assert_eq!(http_get(m, "/healthz").await.0, 503);
    match bad.key_store().len() {
        Err(CloudError::StoreUnavailable(msg)) => {
            assert!(msg.contains("UnknownIssuer"), "{msg}")
        }
        other => panic!("want StoreUnavailable, got {other:?}"),
    }
    let mut o = device_opts(&pki, "device-2", bad.local_addr(), dir.path());
    o.retry = RetryPolicy::none();
    let mut d = Device::connect(o).await.unwrap();
    let e = d.infer(&x[1], Protection::Encrypted).await.unwrap_err();
    assert!(busy(&e), "{e:?}");
    d.close().await;
    bad.shutdown().await;
}

/// A missing or damaged CA file is refused when the store is built, naming the file; the
/// connection string may not ask for TLS while `tls` is off.
#[test]
fn postgres_tls_bad_ca_file_and_inconsistent_sslmode_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let url = "host=127.0.0.1 port=1 user=postgres dbname=postgres";
    let missing = dir.path().join("missing-ca.pem");
    let damaged = dir.path().join("damaged-ca.pem");
    std::fs::write(&damaged, "-----BEGIN CERTIFICATE-----\nnot base64 !!\n").unwrap();
    let empty = dir.path().join("empty-ca.pem");
    std::fs::write(&empty, "").unwrap();
    for ca in [&missing, &damaged, &empty] {
        let mut c = PgConfig::new(url);
        c.tls = PgTls::VerifyFull { ca: ca.clone() };
        match PgStore::new(&c) {
            Err(e @ (CloudError::Tls(_) | CloudError::Config(_))) => {
                let m = e.to_string();
                assert!(m.contains(&*ca.to_string_lossy()), "{m}");
            }
            other => panic!(
                "{}: want a typed error naming it, got {other:?}",
                ca.display()
            ),
        }
    }
    let c = PgConfig::new(format!("{url} sslmode=require"));
    match PgStore::new(&c) {
        Err(CloudError::Config(m)) => assert!(m.contains("sslmode=require"), "{m}"),
        other => panic!("want Config, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Replicas behind the balancer

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_same_device_replica_a_then_b_without_key_upload() {
    let Some(svc) = services("failover_same_device_replica_a_then_b_without_key_upload") else {
        return;
    };
    let mut c = cluster(&svc, "failover", 1).await;
    let x = test_x();
    let mut dev = Device::connect(device_opts(&c.pki, "device-1", c.addr, &c.dir))
        .await
        .unwrap();
    let first = dev.infer(&x[0], Protection::Encrypted).await.unwrap();
    assert!(
        first.key_upload_bytes > 0,
        "first inference uploads the key"
    );
    assert_eq!(dev.key_uploads(), 1);
    // Replica A is the one the balancer chose.
    let mut sessions = Vec::new();
    for r in &c.replicas {
        sessions.push(metric(&r.metrics().await, "tandem_sessions_total"));
    }
    let a = sessions
        .iter()
        .position(|&s| s >= 1.0)
        .expect("one replica has the session");
    let b = 1 - a;
    assert_eq!(sessions[b], 0.0);
    c.replicas[a].sigterm();
    let connects = dev.connects();
    for xi in &x[1..4] {
        let r = dev.infer(xi, Protection::Encrypted).await.unwrap();
        assert_eq!(r.key_upload_bytes, 0, "no key upload on replica B");
        assert!(r.class < 10);
    }
    assert_eq!(dev.key_uploads(), 1);
    assert!(dev.connects() > connects, "the device reconnected");
    let mb = c.replicas[b].metrics().await;
    assert!(
        metric(&mb, "tandem_sessions_total") >= 1.0,
        "B has the session"
    );
    assert_eq!(
        metric(
            &mb,
            "tandem_requests_total{outcome=\"ok\",protection=\"encrypted\"}"
        ),
        3.0,
        "B answered the 3 inferences:\n{mb}"
    );
    assert_eq!(metric(&mb, "tandem_key_registrations_total"), 0.0);
    assert!(metric(&mb, "tandem_key_cache_total{result=\"miss\"}") >= 1.0);
    assert!(metric(&mb, "tandem_keystore_seconds_count{op=\"get\"}") >= 1.0);
    dev.close().await;
}

#[derive(Debug, Default)]
struct Tally {
    calls: u64,
    ok: u64,
    ok_after_kill: u64,
    failed: Vec<String>,
    retried: u64,
    ledger: u64,
    key_uploads: u64,
    connects: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_sigkilled_under_load_inferences_complete_once_or_fail() {
    let Some(svc) = services("replica_sigkilled_under_load_inferences_complete_once_or_fail")
    else {
        return;
    };
    const DEVICES: usize = 4;
    let mut c = cluster(&svc, "sigkill", DEVICES).await;
    let x = Arc::new(test_x());
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let warm = Arc::new(tokio::sync::Barrier::new(DEVICES + 1));
    let mut tasks = Vec::new();
    for d in 1..=DEVICES {
        let opts = device_opts(&c.pki, &format!("device-{d}"), c.addr, &c.dir);
        let (x, killed, warm) = (x.clone(), killed.clone(), warm.clone());
        tasks.push(tokio::spawn(async move {
            let mut dev = Device::connect(opts).await.unwrap();
            let p = Protection::NoisedEncrypted { epsilon: 0.5 };
            let mut t = Tally::default();
            // Warm-up: registers the key (stored in PostgreSQL).
            dev.infer(&x[d], p).await.unwrap();
            t.calls = 1;
            t.ok = 1;
            warm.wait().await;
            let start = Instant::now();
            let mut i = 0;
            // Bounded in time and count; the kill comes 1.5 s in.
            while start.elapsed() < Duration::from_secs(5) && t.calls < 5000 {
                i += 1;
                let before = dev.ledger_records();
                let was_killed = killed.load(std::sync::atomic::Ordering::SeqCst);
                t.calls += 1;
                // A lost inference would never return: bound each one.
                let r = tokio::time::timeout(
                    Duration::from_secs(90),
                    dev.infer(&x[(d * 7 + i) % x.len()], p),
                )
                .await
                .expect("inference neither completed nor failed within 90 s");
                match r {
                    Ok(inf) => {
                        assert!(inf.class < 10);
                        t.ok += 1;
                        if was_killed {
                            t.ok_after_kill += 1;
                        }
                        if inf.attempts > 1 {
                            t.retried += 1;
                        }
                    }
                    Err(e) => t.failed.push(e.to_string()),
                }
                assert_eq!(
                    dev.ledger_records(),
                    before + 1,
                    "one ledger charge per inference, retries included"
                );
            }
            t.ledger = dev.ledger_records();
            t.key_uploads = dev.key_uploads();
            t.connects = dev.connects();
            dev.close().await;
            t
        }));
    }
    warm.wait().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SIGKILL the replica with more open sessions, mid-load.
    let mut active = Vec::new();
    for r in &c.replicas {
        active.push(metric(&r.metrics().await, "tandem_sessions_active"));
    }
    let victim = if active[0] >= active[1] { 0 } else { 1 };
    assert!(active[victim] >= 1.0, "sessions: {active:?}");
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    c.replicas[victim].sigkill();
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    let survivor = c.replicas[1 - victim].metrics().await;
    println!("killed replica {victim} with {active:?} sessions; tallies: {all:#?}");
    for t in &all {
        assert_eq!(
            t.ledger, t.calls,
            "ledger records = inferences started: {t:?}"
        );
        assert_eq!(t.ok + t.failed.len() as u64, t.calls);
        assert_eq!(
            t.key_uploads, 1,
            "keys come from PostgreSQL after the kill: {t:?}"
        );
        assert!(
            t.ok_after_kill >= 1,
            "device continued after the kill: {t:?}"
        );
    }
    let moved: Vec<&Tally> = all.iter().filter(|t| t.connects > 1).collect();
    assert!(
        moved.len() as f64 >= active[victim],
        "every device of the killed replica reconnected: {all:#?}"
    );
    let ok_after: u64 = all.iter().map(|t| t.ok_after_kill).sum();
    assert!(
        metric(
            &survivor,
            "tandem_requests_total{outcome=\"ok\",protection=\"noised_encrypted\"}"
        ) >= ok_after as f64 * 0.5,
        "the survivor answered the inferences after the kill"
    );
}

// ---------------------------------------------------------------------------------------
// Database down

/// A refused key registration closes the session with `Busy`; a refused request is `Busy`:
/// both transient for the device.
fn busy(e: &DeviceError) -> bool {
    matches!(
        e,
        DeviceError::Refused(ErrorCode::Busy) | DeviceError::Closed(ErrorCode::Busy)
    ) && e.is_transient()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_at_start_and_mid_run_typed_errors_then_recovery() {
    let Some(svc) = services("database_down_at_start_and_mid_run_typed_errors_then_recovery")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(3).unwrap();
    let port = free_port();
    let cluster_name = format!("down-{}-{port}", std::process::id());
    let mut opts = ServerOptions::new(
        loopback(0),
        server_config(pki.server_credentials()).unwrap(),
        vk(),
        dir.path().join("unused.redb"),
    )
    .with_model(digits());
    let mut pg = PgConfig::new(format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres"
    ));
    pg.op_timeout = Duration::from_secs(1);
    opts.postgres = Some(pg);
    opts.metrics_addr = Some(loopback(0));
    opts.health_interval = Duration::from_millis(200);
    let cloud = Cloud::start(opts)
        .await
        .expect("starts with the database down");
    let m = cloud.metrics_addr().unwrap();
    assert!(!cloud.ready());
    assert_eq!(http_get(m, "/healthz").await.0, 503);
    match cloud.key_store().len() {
        Err(CloudError::StoreUnavailable(msg)) => assert!(msg.contains("PostgreSQL"), "{msg}"),
        other => panic!("want StoreUnavailable, got {other:?}"),
    }
    let x = test_x();
    let dev_opts = |name: &str| {
        let mut o = device_opts(&pki, name, cloud.local_addr(), dir.path());
        o.retry = RetryPolicy::none();
        o
    };
    let mut d1 = Device::connect(dev_opts("device-1")).await.unwrap();
    let e = d1.infer(&x[0], Protection::Encrypted).await.unwrap_err();
    assert!(busy(&e), "key not stored: typed Busy, got {e:?}");
    let body = metrics_of(m).await;
    assert_eq!(metric(&body, "tandem_ready"), 0.0);
    assert!(
        metric(
            &body,
            "tandem_key_registrations_total{outcome=\"store_unavailable\"}"
        ) >= 1.0
    );

    // The database comes up: ready, and the same device infers.
    env_script(&svc, &["pg-up", &cluster_name, &port.to_string()]).await;
    wait_for("readiness", Duration::from_secs(20), || cloud.ready()).await;
    assert_eq!(http_get(m, "/healthz").await.0, 200);
    d1.infer(&x[1], Protection::Encrypted).await.unwrap();

    // Down mid-run: readiness false, a new device's key is refused (typed), no panic.
    env_script(&svc, &["pg-down", &cluster_name]).await;
    wait_for("readiness false", Duration::from_secs(20), || {
        !cloud.ready()
    })
    .await;
    assert_eq!(http_get(m, "/healthz").await.0, 503);
    let mut d2 = Device::connect(dev_opts("device-2")).await.unwrap();
    let e = d2.infer(&x[2], Protection::Encrypted).await.unwrap_err();
    assert!(busy(&e), "{e:?}");
    // The device with a cached key gets an answer or a typed refusal, never a hang.
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        d1.infer(&x[3], Protection::Encrypted),
    )
    .await
    .expect("answered");
    if let Err(e) = &r {
        assert!(busy(e), "{e:?}");
    }

    // Back again: recovery without restarting the replica.
    env_script(&svc, &["pg-up", &cluster_name, &port.to_string()]).await;
    wait_for("readiness again", Duration::from_secs(20), || cloud.ready()).await;
    d2.infer(&x[4], Protection::Encrypted).await.unwrap();
    d1.infer(&x[5], Protection::Encrypted).await.unwrap();
    assert_eq!(cloud.key_store().len().unwrap(), 2);
    d1.close().await;
    d2.close().await;
    cloud.shutdown().await;
    env_script(&svc, &["pg-down", &cluster_name]).await;
}
