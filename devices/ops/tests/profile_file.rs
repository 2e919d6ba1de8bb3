//! The cached split profile is input the device reads (`tandem plan`, `bench sentence
//! --split`): a corrupted, truncated or hostile file, or a directory, is a typed error naming
//! the file (delete it to re-profile) — never a panic, an abort or an allocation sized by a
//! number read from it (TDM-SPLIT-2).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use tandem_ops::{LinearProfile, OpProfile, OpsError, SplitProfile};

fn linear(i: usize) -> LinearProfile {
    LinearProfile {
        index: i,
        name: format!("l{i}"),
        block: i,
        n_in: 4,
        n_out: 4,
        macs: 8 * 16,
        local_ms: 1.0,
        encrypt_ms: 2.0,
        decrypt_ms: 1.0,
        offload_other_ms: 0.1,
        cloud_ms: 3.0,
        requests: 1,
        upload_bytes: 1000,
        download_bytes: 500,
    }
}

fn profile() -> SplitProfile {
    SplitProfile {
        format: 1,
        model: "m".into(),
        model_digest: "00".into(),
        tokens: 8,
        batch: 16,
        blocks: 2,
        reps: 3,
        key_bytes: 10,
        ops: vec![OpProfile {
            step: 0,
            op: "embedding".into(),
            ms: 0.5,
        }],
        linears: vec![linear(0), linear(1)],
    }
}

/// Writes `p` as JSON and reads it back.
fn round_trip(p: &SplitProfile) -> Result<SplitProfile, OpsError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.json");
    p.write(&path).unwrap();
    SplitProfile::read(&path)
}

#[test]
fn a_consistent_profile_reads_back() {
    let p = profile();
    assert_eq!(round_trip(&p).unwrap(), p);
}

#[test]
fn hostile_profiles_are_typed_errors_not_panics_or_huge_allocations() {
    type Edit = fn(&mut SplitProfile);
    let cases: [(&str, Edit); 13] = [
        // Was: `(0..=blocks).collect()` in `tandem plan` panicked (capacity overflow) ...
        ("blocks usize::MAX", |p| p.blocks = usize::MAX),
        // ... or aborted allocating 80 GB.
        ("blocks 1e9", |p| p.blocks = 1_000_000_000),
        ("blocks 0", |p| p.blocks = 0),
        // Was: the byte and round-trip sums wrapped around silently.
        ("requests u64::MAX", |p| p.linears[0].requests = u64::MAX),
        ("upload u64::MAX", |p| p.linears[1].upload_bytes = u64::MAX),
        ("key bytes u64::MAX", |p| p.key_bytes = u64::MAX),
        // Was: silently priced as 0 ms.
        ("negative time", |p| p.linears[0].local_ms = -1e300),
        ("negative op time", |p| p.ops[0].ms = -1.0),
        // Was: every depth priced as Local.
        ("no linear", |p| p.linears.clear()),
        // Was: a linear nowhere in the graph, priced at every depth as offloaded.
        ("block out of range", |p| p.linears[0].block = usize::MAX),
        ("index mismatch", |p| p.linears[1].index = 7),
        ("empty block", |p| p.linears[1].block = 0),
        ("tokens 0", |p| p.tokens = 0),
    ];
    for (what, edit) in cases {
        let mut p = profile();
        edit(&mut p);
        match round_trip(&p) {
            Err(OpsError::InvalidConfig { path, reason }) => {
                assert!(path.ends_with("p.json"), "{what}: {path:?}");
                assert!(reason.contains("delete the file"), "{what}: {reason}");
            }
            other => panic!("{what}: expected InvalidConfig, got {other:?}"),
        }
    }
}

#[test]
fn truncated_garbage_and_directories_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = serde_json::to_string(&profile()).unwrap();
    for (i, bytes) in [
        good.as_bytes()[..good.len() / 2].to_vec(),
        b"\x00\xff garbage".to_vec(),
        b"[]".to_vec(),
        br#"{"format": 1, "blocks": 1e400}"#.to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("bad{i}.json"));
        std::fs::write(&path, bytes).unwrap();
        assert!(
            matches!(SplitProfile::read(&path), Err(OpsError::Config { .. })),
            "case {i}"
        );
    }
    // Was: "cannot read: Is a directory; run scripts/fetch-minilm.sh".
    match SplitProfile::read(dir.path()) {
        Err(OpsError::InvalidConfig { reason, .. }) => {
            assert!(reason.contains("directory"), "{reason}")
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

/// Writers racing on one path (threads here; processes sharing the default cache in use) each
/// leave a whole profile: a reader in the middle reads a complete one, and no temporary file
/// stays behind. (Written in place, as before, a reader could see a truncated file.)
#[test]
fn concurrent_writes_leave_a_whole_profile() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.json");
    let p = profile();
    p.write(&path).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..50 {
                    p.write(&path).unwrap();
                }
            });
        }
        s.spawn(|| {
            for _ in 0..200 {
                assert_eq!(SplitProfile::read(&path).unwrap(), p);
            }
        });
    });
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["profile.json"]);
}
