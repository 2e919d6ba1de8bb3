//! The invariants of the `ledger_open` fuzz target (`fuzz/fuzz_targets/ledger_open.rs`) as a
//! property test on the pure reader `tandem_dp::ledger::scan`, over arbitrary bytes and over
//! valid ledgers with arbitrary edits, and over the committed seed corpus.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use std::path::Path;
use tandem_dp::ledger::{scan, Tail};
use tandem_dp::{Accountant, DpError, Policy};

fn check(data: &[u8]) {
    let path = Path::new("fuzz.ledger");
    let mut seqs = Vec::new();
    match scan(path, data, |r| seqs.push(r.seq)) {
        Ok(s) => {
            let end = usize::try_from(s.verified_len).unwrap();
            assert!(end <= data.len());
            assert_eq!(s.records, seqs.len() as u64);
            assert!(seqs.iter().copied().eq(0..s.records));
            let tail = &data[end..];
            assert_eq!(s.tail == Tail::None, tail.is_empty());
            assert_eq!(
                s.tail == Tail::ZeroFilled,
                !tail.is_empty() && tail.iter().all(|&b| b == 0)
            );
            if end > 0 {
                let again = scan(path, &data[..end], |_| {}).unwrap();
                assert_eq!(
                    (
                        again.records,
                        again.verified_len,
                        again.last_check,
                        again.tail
                    ),
                    (s.records, s.verified_len, s.last_check, Tail::None)
                );
                let mut padded = data[..end].to_vec();
                padded.extend_from_slice(&[0u8; 37]);
                let z = scan(path, &padded, |_| {}).unwrap();
                assert_eq!((z.records, z.verified_len), (s.records, s.verified_len));
                assert_eq!(z.tail, Tail::ZeroFilled);
            } else {
                assert_eq!(s.records, 0);
            }
        }
        Err(DpError::LedgerCorrupted {
            offset, path: p, ..
        }) => {
            assert_eq!(p, path);
            let off = usize::try_from(offset).unwrap();
            assert!(off < data.len());
            if off > 0 {
                let before = scan(path, &data[..off], |_| {}).unwrap();
                assert_eq!(before.verified_len, offset);
                assert_eq!(before.tail, Tail::None);
            }
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

fn valid_ledger(n: usize) -> Vec<u8> {
    static CACHE: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| (0..5).map(write_ledger).collect())[n].clone()
}

fn write_ledger(n: usize) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("tandem-dp-scan-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("ledger.bin");
    let (mut a, _) = Accountant::open(&p, Policy::new(1e9, 3600).unwrap()).unwrap();
    for i in 0..n {
        let _ = a.charge(&vec![b'x'; i * 7], i as u64, 0.5).unwrap();
    }
    drop(a);
    let b = std::fs::read(&p).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    b
}

#[test]
fn seed_corpus_satisfies_the_fuzz_invariants() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/ledger_open");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        check(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(
        n >= 7,
        "seed corpus missing ({n} files in {})",
        dir.display()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        check(&data);
    }

    #[test]
    fn valid_ledger_with_edits(
        n in 0usize..5,
        edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..4),
        cut in any::<u16>(),
        extra in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut data = valid_ledger(n);
        for (at, v) in edits {
            let i = at as usize % data.len();
            data[i] = v;
        }
        data.truncate(cut as usize % (data.len() + 1) + 8);
        data.extend_from_slice(&extra);
        check(&data);
    }
}
