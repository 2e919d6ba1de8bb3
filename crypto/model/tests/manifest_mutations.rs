//! The invariants of the `manifest` fuzz target (fuzz/fuzz_targets/manifest.rs), replayed by
//! `cargo test` over deterministic mutations of the committed manifests: no panic from toml,
//! serde or our checks; an accepted manifest has a stable canonical form that validates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use tandem_model::{Limits, Manifest};

/// The fuzz target's body.
fn check(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(m) = Manifest::from_toml(text) else {
        return false;
    };
    let limits = Limits::default();
    if m.validate(&limits).is_err() {
        return false;
    }
    let canonical = m.to_toml().expect("a valid manifest serialises");
    let again = Manifest::from_toml(&canonical).expect("the canonical form parses");
    again
        .validate(&limits)
        .expect("the canonical form validates");
    assert_eq!(
        again.to_toml().unwrap(),
        canonical,
        "canonical form is stable"
    );
    let i = again.cloud_index().unwrap();
    assert!(i > 0 && i < again.layers.len());
    true
}

#[test]
fn manifest_mutations_never_panic() {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let tokens: [&[u8]; 12] = [
        b"nan",
        b"inf",
        b"-1",
        b"1e39",
        b"18446744073709551616",
        b"\"",
        b"[",
        b"]",
        b"=",
        b"\n[[layers]]\n",
        b"\"cloud\"",
        b"0",
    ];
    let mut accepted = 0;
    let mut cases = 0;
    for name in ["digits", "breast_cancer"] {
        let seed = std::fs::read(models().join(name).join("manifest.toml")).unwrap();
        assert!(check(&seed), "{name}: the committed manifest is accepted");
        for _ in 0..4000 {
            let mut b = seed.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % (b.len() + 1);
                match next() % 5 {
                    0 if at < b.len() => b[at] ^= 1 << (next() % 8),
                    1 if at < b.len() => {
                        b.remove(at);
                    }
                    2 => {
                        let t = tokens[(next() as usize) % tokens.len()];
                        b.splice(at..at, t.iter().copied());
                    }
                    3 if at < b.len() => {
                        // Replace a run of digits with a token.
                        let end = (at + 1 + (next() as usize) % 8).min(b.len());
                        let t = tokens[(next() as usize) % tokens.len()];
                        b.splice(at..end, t.iter().copied());
                    }
                    _ => b.truncate(at),
                }
            }
            cases += 1;
            if check(&b) {
                accepted += 1;
            }
        }
    }
    assert!(
        cases == 8000 && accepted > 0,
        "{accepted} of {cases} accepted"
    );
}
