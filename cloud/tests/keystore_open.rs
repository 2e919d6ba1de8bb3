//! Breaker's faults C, D (key store) and E (start-up configuration): every open of the key
//! store gives a typed error naming the file and what to do, never a panic; misconfiguration
//! is refused at start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::Path;

use tandem_cloud::{Cloud, CloudError, KeyBackend, KeyQuota, RedbStore, ServerOptions};
use tandem_tls::{server_config, DevPki};

use common::{repo, vk};

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn opts(pki: &DevPki, store: &Path) -> ServerOptions {
    let tls = server_config(pki.server_credentials()).unwrap();
    ServerOptions::new(any_addr(), tls, vk(), store.to_path_buf())
        .with_model(repo().join("models/digits"))
}

/// A key store with `n` records of 20 KiB each.
fn filled_store(path: &Path, n: u8) {
    let s = RedbStore::open(path).unwrap();
    let quota = KeyQuota {
        max_keys: 1000,
        max_bytes: u64::MAX,
    };
    for i in 0..n {
        s.put(&[1; 32], &[i; 32], 1, &[2; 32], &[i; 20 << 10], quota, 0, 1)
            .unwrap();
    }
}

fn store_error(r: Result<RedbStore, CloudError>) -> String {
    match r {
        Err(CloudError::Store(m)) => m,
        Err(other) => panic!("want CloudError::Store, got {other}"),
        Ok(_) => panic!("want an error, the store opened"),
    }
}

#[test]
fn truncated_key_store_is_a_typed_error_not_a_panic() {
    // `cp keys.redb kc.redb; truncate -s 4096 kc.redb` used to panic inside redb
    // (page_manager.rs assertion), reported without the file name.
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("keys.redb");
    filled_store(&good, 40);
    for len in [4096u64, 1, 9, 512, 8192, 65536] {
        let p = tmp.path().join(format!("kc-{len}.redb"));
        std::fs::copy(&good, &p).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len).unwrap();
        drop(f);
        let r = std::panic::catch_unwind(|| RedbStore::open(&p));
        let r = r.unwrap_or_else(|_| panic!("truncated to {len}: RedbStore::open panicked"));
        match r {
            Ok(_) => {} // redb recovered what it could: acceptable, no panic.
            Err(CloudError::Store(m)) => {
                assert!(m.contains(&p.display().to_string()), "{len}: {m}");
                assert!(m.contains("backup"), "{len}: says what to do: {m}");
            }
            Err(e) => panic!("truncated to {len}: untyped {e}"),
        }
    }
}

#[test]
fn zero_filled_and_foreign_files_are_refused_with_the_file_name() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("zero.redb", vec![0u8; 8192]),
        ("foreign.redb", b"SQLite format 3\0 and more bytes".to_vec()),
        ("short.redb", b"red".to_vec()),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, &bytes).unwrap();
        let m = store_error(RedbStore::open(&p));
        assert!(m.contains(&p.display().to_string()), "{m}");
        assert!(m.contains("not a redb key store"), "{m}");
        assert!(m.contains("backup"), "{m}");
        // Nothing was written over the file.
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
    }
}

#[test]
fn store_in_use_by_another_process_gets_its_own_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("keys.redb");
    let first = RedbStore::open(&p).unwrap();
    let m = store_error(RedbStore::open(&p));
    assert!(m.contains(&p.display().to_string()), "{m}");
    assert!(m.contains("in use by another process"), "{m}");
    assert!(m.contains("another key_store"), "{m}");
    assert!(
        !m.contains("backup") && !m.contains("move it away"),
        "no damaging advice for a lock: {m}"
    );
    drop(first);
    RedbStore::open(&p).expect("opens once the other holder is gone");
}

#[test]
fn missing_directory_and_directory_path_get_their_own_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("no-such-dir").join("keys.redb");
    let m = store_error(RedbStore::open(&p));
    assert!(m.contains(&p.display().to_string()), "{m}");
    assert!(m.contains("does not exist"), "{m}");
    assert!(!m.contains("backup"), "{m}");
    let m = store_error(RedbStore::open(tmp.path()));
    assert!(m.contains("is a directory"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_start_on_a_truncated_store_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("keys.redb");
    filled_store(&good, 40);
    let p = tmp.path().join("kc.redb");
    std::fs::copy(&good, &p).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let pki = DevPki::generate(1).unwrap();
    match Cloud::start(opts(&pki, &p)).await {
        Err(CloudError::Store(m)) => assert!(m.contains(&p.display().to_string()), "{m}"),
        Err(e) => panic!("want a key-store error naming the file, got {e}"),
        Ok(c) => {
            c.shutdown().await;
            panic!("started on a truncated key store")
        }
    }
    // A second cloud on a store in use by the first: the lock advice, not "restore".
    let c1 = Cloud::start(opts(&pki, &good)).await.unwrap();
    match Cloud::start(opts(&pki, &good)).await {
        Err(CloudError::Store(m)) => assert!(m.contains("in use by another process"), "{m}"),
        Err(e) => panic!("want the in-use error, got {e}"),
        Ok(c) => {
            c.shutdown().await;
            panic!("two clouds on one key store")
        }
    }
    c1.shutdown().await;
}

fn config_error(r: Result<Cloud, CloudError>) -> String {
    match r {
        Err(CloudError::Config(m)) => m,
        Err(e) => panic!("want CloudError::Config, got {e}"),
        Ok(_) => panic!("want a refusal, the cloud started"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfiguration_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let store = tmp.path().join("keys.redb");
    // models = []
    let mut o = opts(&pki, &store);
    o.models.clear();
    assert!(config_error(Cloud::start(o).await).contains("no models"));
    // max_frame_len outside 4096..=268435456: refused, not clamped.
    for f in [0u32, 4095, (256 << 20) + 1, u32::MAX] {
        let mut o = opts(&pki, &store);
        o.resources.max_frame_len = Some(f);
        let m = config_error(Cloud::start(o).await);
        assert!(
            m.contains("max_frame_len") && m.contains("4096..=268435456"),
            "{f}: {m}"
        );
    }
    // Both ends of the range are accepted.
    for f in [4096u32, 256 << 20] {
        let mut o = opts(&pki, &store);
        o.resources.max_frame_len = Some(f);
        let c = Cloud::start(o).await.expect("in-range max_frame_len");
        assert_eq!(c.limits().max_frame_len, f);
        c.shutdown().await;
    }
    // max_key_len below the digits model's packed key blob: refused with the size needed.
    let need = {
        let c = Cloud::start(opts(&pki, &store)).await.unwrap();
        let l = c.limits().max_key_len;
        c.shutdown().await;
        l
    };
    let mut o = opts(&pki, &store);
    o.resources.max_key_len = Some(need - 1);
    let m = config_error(Cloud::start(o).await);
    assert!(m.contains(&format!("at least {need}")), "{m}");
    let mut o = opts(&pki, &store);
    o.resources.max_key_len = Some(need);
    Cloud::start(o).await.expect("exact size").shutdown().await;
}
