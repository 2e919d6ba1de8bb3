//! Crash leftovers after the last verified record (issue 12, item 8): a torn or zero-filled
//! tail is cut back to the last verified record and reported; damage before it, a complete
//! damaged record, a foreign file or a wrong magic is refused with a typed error naming the
//! file. Never more records than were written, never fewer than were acknowledged.
//! Requirements TDM-LEDG-3 and TDM-LEDG-4 (`specs/dp.md` §5).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_dp::{Accountant, DpError, Ledger, Policy, Tail};

fn tmp(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("tandem-dp-tail-{}-{name}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("ledger.bin")
}

fn policy() -> Policy {
    Policy::new(1e9, 3600).unwrap()
}

/// Writes `ids.len()` records (device ids of varied length) and returns the file bytes and
/// the end offset of the header and of each record: `ends[k]` = length of a k-record ledger.
fn ledger_with(path: &Path, ids: &[usize]) -> (Vec<u8>, Vec<usize>) {
    let mut ends = vec![8];
    let (mut a, _) = Accountant::open(path, policy()).unwrap();
    for (i, &id_len) in ids.iter().enumerate() {
        let id = vec![b'a' + (i % 26) as u8; id_len];
        let _ = a.charge(&id, 10 + i as u64, 0.125).unwrap();
        ends.push(std::fs::metadata(path).unwrap().len() as usize);
    }
    drop(a);
    (std::fs::read(path).unwrap(), ends)
}

/// Opens `bytes` as a ledger; checks the outcome against the verified prefix `expect`
/// records long (`Ok`) and returns the report, or the error.
fn open_image(path: &Path, bytes: &[u8]) -> Result<tandem_dp::OpenReport, DpError> {
    std::fs::write(path, bytes).unwrap();
    Ledger::open(path, |_| {}).map(|(_, r)| r)
}

/// After a successful recovery the file is exactly the verified prefix, reopens clean, and
/// the chain continues (a new charge is durable and verified on the next open).
fn assert_recovered(path: &Path, original: &[u8], ends: &[usize], records: u64) {
    let end = ends[records as usize];
    assert_eq!(std::fs::read(path).unwrap(), &original[..end]);
    let (mut a, r) = Accountant::open(path, policy()).unwrap();
    assert_eq!((r.records, r.torn_bytes, r.tail), (records, 0, Tail::None));
    let _ = a.charge(b"after", 99, 0.5).unwrap();
    drop(a);
    let (_, r) = Ledger::open(path, |_| {}).unwrap();
    assert_eq!(r.records, records + 1);
}

#[test]
fn sixteen_zero_bytes_appended_are_cut_and_reported() {
    // The exact case of the issue: refused as "corrupted" before.
    let p = tmp("zeros16");
    let (good, ends) = ledger_with(&p, &[8, 8, 8]);
    let mut bytes = good.clone();
    bytes.extend_from_slice(&[0u8; 16]);
    let r = open_image(&p, &bytes).expect("a zero-filled tail is a crash leftover");
    assert_eq!((r.records, r.torn_bytes, r.tail), (3, 16, Tail::ZeroFilled));
    assert_recovered(&p, &good, &ends, 3);
}

#[test]
fn torn_record_followed_by_zeros_is_cut() {
    let p = tmp("torn-zeros");
    let (good, ends) = ledger_with(&p, &[8, 40]);
    // The second record's first 30 bytes made it; the rest of its block reads as zeros.
    let mut bytes = good[..ends[1] + 30].to_vec();
    bytes.extend_from_slice(&[0u8; 4096]);
    let r = open_image(&p, &bytes).unwrap();
    assert_eq!((r.records, r.tail), (1, Tail::Torn));
    assert_eq!(r.torn_bytes, (bytes.len() - ends[1]) as u64);
    assert_recovered(&p, &good, &ends, 1);
}

#[test]
fn all_zero_file_and_torn_header_no_longer_than_the_header_are_recreated() {
    for image in [
        vec![0u8; 8],
        vec![0u8; 3],
        b"TDPL".to_vec(),
        b"TDPLEDG\0".to_vec(),
    ] {
        let p = tmp("header");
        let r = open_image(&p, &image).unwrap();
        assert_eq!(r.records, 0);
        assert_eq!(r.torn_bytes, image.len() as u64);
        assert_eq!(std::fs::read(&p).unwrap(), b"TDPLEDG1");
    }
}

#[test]
fn zero_filled_ledger_longer_than_the_header_is_refused_not_reset() {
    // The breaker's case: 4 synced records, then `head -c 208 /dev/zero > ledger.bin`.
    // Before: records = 0 and a fresh budget.
    let p = tmp("zeroed");
    let (good, _) = ledger_with(&p, &[8, 8, 8, 8]);
    for len in [208, good.len(), 9, 4096] {
        let image = vec![0u8; len];
        match open_image(&p, &image) {
            Err(e @ DpError::LedgerCorrupted { offset: 0, .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&p.display().to_string()), "{msg}");
                assert!(msg.contains("restore") && msg.contains("budget"), "{msg}");
            }
            other => panic!("an all-zero {len}-byte ledger must be refused, got {other:?}"),
        }
        assert_eq!(std::fs::read(&p).unwrap(), image, "left untouched");
    }
    // A torn header followed by more than the header's length is refused as well.
    for image in [b"TDPLEDG\0\0\0\0".to_vec(), {
        let mut b = b"TDPL".to_vec();
        b.resize(512, 0);
        b
    }] {
        assert!(matches!(
            open_image(&p, &image),
            Err(DpError::LedgerCorrupted { offset: 0, .. })
        ));
    }
}

#[cfg(unix)]
#[test]
fn new_ledger_is_created_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let p = tmp("mode");
    let (a, _) = Accountant::open(&p, policy()).unwrap();
    drop(a);
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "ledger mode {mode:o}");
}

#[test]
fn damage_before_the_last_verified_record_is_refused_naming_the_file() {
    let p = tmp("middle");
    let (good, ends) = ledger_with(&p, &[8, 8, 8]);
    // Zeros over the whole second record, the third intact after it.
    let mut bytes = good.clone();
    bytes[ends[1]..ends[2]].fill(0);
    match open_image(&p, &bytes) {
        Err(e @ DpError::LedgerCorrupted { .. }) => {
            let DpError::LedgerCorrupted {
                ref path, offset, ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(path, &p);
            assert_eq!(offset, ends[1] as u64);
            let msg = e.to_string();
            assert!(msg.contains(&p.display().to_string()) && msg.contains("restore"));
        }
        other => panic!("zeros over a middle record must be refused, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&p).unwrap(),
        bytes,
        "a refused ledger is left untouched"
    );
}

#[test]
fn complete_damaged_last_record_and_foreign_files_are_refused() {
    let p = tmp("last");
    let (good, ends) = ledger_with(&p, &[8, 8]);
    // A complete last record with one payload byte changed: acknowledged, then damaged.
    let mut bytes = good.clone();
    bytes[ends[1] + 20] ^= 0x40;
    assert!(matches!(
        open_image(&p, &bytes),
        Err(DpError::LedgerCorrupted { offset, .. }) if offset == ends[1] as u64
    ));
    // Wrong magic, foreign file.
    for image in [b"TDPLEDG2".to_vec(), b"{\"json\": true}".to_vec(), {
        let mut b = good.clone();
        b[0] = b'X';
        b
    }] {
        assert!(matches!(
            open_image(&p, &image),
            Err(DpError::LedgerCorrupted { offset: 0, .. })
        ));
    }
}

#[derive(Clone, Debug)]
enum Damage {
    /// Cut the file at this fraction of its length.
    Truncate(f64),
    /// Append zero bytes.
    AppendZeros(usize),
    /// Cut at a fraction, then append zeros.
    TruncateThenZeros(f64, usize),
    /// Zero the last `k` bytes (at most the last record), then append `extra` zeros.
    ZeroSuffix(usize, usize),
    /// Append arbitrary bytes.
    Garbage(Vec<u8>),
    /// Flip one bit in a record before the last one.
    FlipEarlier(usize, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0.0..1.0f64).prop_map(Damage::Truncate),
        (1usize..5000).prop_map(Damage::AppendZeros),
        ((0.0..1.0f64), (1usize..5000)).prop_map(|(f, k)| Damage::TruncateThenZeros(f, k)),
        ((1usize..300), (0usize..600)).prop_map(|(k, e)| Damage::ZeroSuffix(k, e)),
        proptest::collection::vec(any::<u8>(), 1..80).prop_map(Damage::Garbage),
        ((0usize..10_000), (0u8..8)).prop_map(|(i, b)| Damage::FlipEarlier(i, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Random truncation / zero-fill / garbage / earlier damage after N records: open
    /// recovers exactly the verified prefix, or refuses; it never reports more records than
    /// were written nor fewer than the intact (acknowledged) ones, and never panics.
    #[test]
    fn open_recovers_exactly_the_verified_prefix(
        ids in proptest::collection::vec(0usize..=255, 0..6),
        d in damage(),
    ) {
        let p = tmp("prop");
        let (good, ends) = ledger_with(&p, &ids);
        let n = ids.len();
        // Records whose bytes are all still present and unchanged after the damage.
        let intact = |img: &[u8]| -> u64 {
            (1..=n).take_while(|&k| img.len() >= ends[k] && img[..ends[k]] == good[..ends[k]])
                .count() as u64
        };
        match d {
            Damage::Truncate(f) | Damage::TruncateThenZeros(f, _) => {
                let cut = (good.len() as f64 * f) as usize;
                let mut img = good[..cut].to_vec();
                if let Damage::TruncateThenZeros(_, k) = d {
                    img.extend(std::iter::repeat_n(0u8, k));
                }
                let expect = intact(&img);
                if cut < 8 && img.len() > 8 {
                    // A torn header with more than the header's length after it: the file was
                    // overwritten, not cut by a crash at creation (TDM-LEDG-3/4).
                    let refused = matches!(
                        open_image(&p, &img),
                        Err(DpError::LedgerCorrupted { offset: 0, .. })
                    );
                    prop_assert!(refused, "torn header + zeros longer than the header accepted");
                    prop_assert_eq!(std::fs::read(&p).unwrap(), img);
                    let _ = std::fs::remove_dir_all(p.parent().unwrap());
                    return Ok(());
                }
                let r = open_image(&p, &img).expect("a cut or zero-filled tail is recovered");
                prop_assert_eq!(r.records, expect);
                if cut >= 8 {
                    prop_assert_eq!(r.torn_bytes, (img.len() - ends[expect as usize]) as u64);
                    assert_recovered(&p, &good, &ends, expect);
                }
            }
            Damage::AppendZeros(k) => {
                let mut img = good.clone();
                img.extend(std::iter::repeat_n(0u8, k));
                let r = open_image(&p, &img).unwrap();
                prop_assert_eq!((r.records, r.torn_bytes, r.tail), (n as u64, k as u64, Tail::ZeroFilled));
                assert_recovered(&p, &good, &ends, n as u64);
            }
            Damage::ZeroSuffix(k, extra) => {
                let last = ends[n.saturating_sub(1)];
                let from = good.len() - k.min(good.len() - last);
                let mut img = good.clone();
                img[from..].fill(0);
                img.extend(std::iter::repeat_n(0u8, extra));
                let expect = intact(&img);
                let r = open_image(&p, &img).expect("a zero-filled last record is recovered");
                prop_assert_eq!(r.records, expect);
                prop_assert!(expect + 1 >= n as u64, "only the record being written may be lost");
                assert_recovered(&p, &good, &ends, expect);
            }
            Damage::Garbage(g) => {
                let mut img = good.clone();
                img.extend_from_slice(&g);
                match open_image(&p, &img) {
                    Ok(r) => {
                        prop_assert_eq!(r.records, n as u64);
                        assert_recovered(&p, &good, &ends, n as u64);
                    }
                    Err(DpError::LedgerCorrupted { path, offset, .. }) => {
                        prop_assert_eq!(path, p.clone());
                        prop_assert_eq!(offset, good.len() as u64);
                        prop_assert_eq!(std::fs::read(&p).unwrap(), img);
                    }
                    Err(e) => prop_assert!(false, "unexpected error {}", e),
                }
            }
            Damage::FlipEarlier(i, bit) => {
                prop_assume!(n >= 2);
                let span = ends[n - 1] - 8; // header .. end of the second-to-last record
                let at = 8 + i % span;
                let mut img = good.clone();
                img[at] ^= 1 << bit;
                let rec = ends.iter().rposition(|&e| e <= at).unwrap();
                match open_image(&p, &img) {
                    Err(DpError::LedgerCorrupted { offset, .. }) => {
                        prop_assert_eq!(offset, ends[rec] as u64);
                    }
                    other => prop_assert!(false, "flip at {} accepted: {:?}", at, other),
                }
            }
        }
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}
