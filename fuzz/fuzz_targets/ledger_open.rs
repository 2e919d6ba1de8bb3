//! The privacy ledger's file reader (`tandem_dp::ledger::scan`, the pure part of
//! `Ledger::open`) on arbitrary file contents.
//!
//! Invariants beyond "no panic":
//! * accepted: the verified prefix is within the input, holds `records` records with
//!   sequence numbers 0, 1, 2, …, and rescans alone to the same records with no tail; the tail
//!   is reported as `None` exactly when it is empty and `ZeroFilled` exactly when it is all
//!   zeros; appending zeros to the verified prefix never changes the records;
//! * refused: only as `LedgerCorrupted`, at an offset inside the input, and the bytes before
//!   that offset are a ledger that verifies on its own (nothing before it is blamed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tandem_dp::ledger::{scan, Tail};
use tandem_dp::DpError;

fuzz_target!(|data: &[u8]| {
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
});
