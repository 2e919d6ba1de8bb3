//! Writes a few ledgers into a directory, as the seed corpus of the `ledger_open` fuzz target:
//! `cargo run --release -p tandem-dp --example ledger_seeds -- fuzz/corpus/ledger_open`.
//! Valid ledgers of 0, 1, 3 and 6 records (device ids of 0–255 bytes, two windows), and the
//! crash leftovers open recovers: a torn last record, 16 zero bytes appended, a torn record
//! followed by zeros.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use tandem_dp::{Accountant, Policy};

fn ledger(dir: &Path, ids: &[usize]) -> Vec<u8> {
    let path = dir.join("scratch.ledger");
    let _ = std::fs::remove_file(&path);
    let (mut a, _) = Accountant::open(&path, Policy::new(1e9, 3600).unwrap()).unwrap();
    for (i, &n) in ids.iter().enumerate() {
        let id = vec![b'd' + (i % 20) as u8; n];
        let _ = a
            .charge(&id, 3000 * i as u64, 0.0625 * (i + 1) as f64)
            .unwrap();
    }
    drop(a);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    bytes
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: ledger_seeds OUT_DIR");
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).unwrap();
    let three = ledger(dir, &[8, 0, 32]);
    let mut seeds = vec![
        ("empty", ledger(dir, &[])),
        ("one", ledger(dir, &[8])),
        ("three", three.clone()),
        ("six", ledger(dir, &[1, 255, 8, 8, 64, 2])),
    ];
    seeds.push(("torn", three[..three.len() - 11].to_vec()));
    let mut zeros = three.clone();
    zeros.extend_from_slice(&[0; 16]);
    seeds.push(("zero_tail", zeros));
    let mut torn_zeros = three[..three.len() - 30].to_vec();
    torn_zeros.extend_from_slice(&[0; 64]);
    seeds.push(("torn_then_zeros", torn_zeros));
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}
