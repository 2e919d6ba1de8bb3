//! Key-store read latency: `KeyBackend::get` of one evaluation-key-sized record (600 KiB, the
//! size class of a packed key), redb vs PostgreSQL, p50/p99 over 300 reads after 20 warm-up
//! reads, plus `touch` (the once-a-second use record on a cache hit).
//!
//! `cargo run --release -p tandem-cloud --example keystore_latency -- [postgres conninfo]`
//! (without the argument only redb is measured). Writes nothing outside a temp dir and the
//! given database (table `tandem_keys`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use tandem_cloud::keystore::now_us;
use tandem_cloud::{KeyBackend, KeyQuota, PgConfig, PgStore, RedbStore};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i]
}

fn measure(name: &str, s: Arc<dyn KeyBackend>) {
    let peer = [0x5a; 32];
    let blob: Vec<u8> = (0..600 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    let q = KeyQuota::default();
    for k in 0..8u8 {
        s.put(&peer, &[k; 32], 1, &[k; 32], &blob, q, 0, now_us())
            .unwrap();
    }
    let mut get = Vec::new();
    let mut touch = Vec::new();
    for i in 0..320usize {
        let k = [(i % 8) as u8; 32];
        let t = Instant::now();
        let r = s.get(&peer, &k, 0).unwrap().unwrap();
        let g = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(r.blob.len(), blob.len());
        let t = Instant::now();
        s.touch(&peer, &k, 0, now_us()).unwrap();
        let u = t.elapsed().as_secs_f64() * 1e3;
        if i >= 20 {
            get.push(g);
            touch.push(u);
        }
    }
    println!(
        "{name}: get 600 KiB p50 {:.2} ms p99 {:.2} ms; touch p50 {:.2} ms p99 {:.2} ms",
        pct(&mut get, 50.0),
        pct(&mut get, 99.0),
        pct(&mut touch, 50.0),
        pct(&mut touch, 99.0)
    );
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    measure(
        "redb",
        Arc::new(RedbStore::open(&dir.path().join("k.redb")).unwrap()),
    );
    if let Some(url) = std::env::args().nth(1) {
        measure(
            "postgres",
            Arc::new(PgStore::new(&PgConfig::new(url)).unwrap()),
        );
    }
}
