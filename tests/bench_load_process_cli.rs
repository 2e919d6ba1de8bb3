//! `tandem bench load --cloud-process` when things go wrong (built binary): a child cloud that
//! cannot start is reported with its own reason, and a bench that fails after the child
//! started leaves no `tandem cloud serve` running.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A copy of `models/digits` in `dir`, with `edit` applied to it.
fn digits_copy(dir: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/digits");
    let dst = dir.join("digits");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    edit(&dst);
    dst
}

/// Runs `bench load --cloud-process` on `model` with temporary files under `tmp`; returns
/// (success, stderr).
fn bench_load(model: &Path, tmp: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "load", "--devices", "1", "--seconds", "1"])
        .arg("--cloud-process")
        .arg("--model")
        .arg(model)
        .env("RUST_BACKTRACE", "0")
        .env("TMPDIR", tmp)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // stdout to a file: an orphaned child holding a pipe would block `output()`.
        .stdout(std::fs::File::create(tmp.join("stdout")).unwrap())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Processes whose command line names a path under `dir` (this test's TMPDIR).
fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmd)
                .contains(&needle)
                .then_some(pid)
        })
        .collect()
}

/// A bundle whose signature does not verify: the child exits at once. The parent reports the
/// child's own reason (was: "did not start listening within 60 s", the reason swallowed).
#[test]
fn a_child_that_cannot_start_is_reported_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = digits_copy(dir.path(), |m| {
        let p = m.join("manifest.sig");
        let mut s = std::fs::read_to_string(&p).unwrap().into_bytes();
        s[10] = if s[10] == b'a' { b'b' } else { b'a' };
        std::fs::write(&p, s).unwrap();
    });
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let (ok, stderr) = bench_load(&model, &tmp);
    assert!(!ok, "accepted a badly signed bundle");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("exited before listening") && stderr.contains("manifest"),
        "the child's reason is not reported: {stderr}"
    );
}

/// The child starts, then the bench fails (test rows of the wrong width): the parent's error
/// is reported and no `tandem cloud serve` outlives it (was: the child kept running).
#[test]
fn a_failed_bench_leaves_no_cloud_running() {
    let dir = tempfile::tempdir().unwrap();
    let model = digits_copy(dir.path(), |m| {
        let p = m.join("test.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        for row in v["x"].as_array_mut().unwrap() {
            row.as_array_mut().unwrap().truncate(3);
        }
        std::fs::write(&p, v.to_string()).unwrap();
    });
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let (ok, stderr) = bench_load(&model, &tmp);
    let left = processes_under(&tmp);
    for pid in &left {
        // Clean up what the old code left (a process this test started, by its id).
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    assert!(!ok, "accepted 3-feature rows");
    assert!(stderr.contains("features"), "{stderr}");
    assert!(left.is_empty(), "cloud processes left running: {left:?}");
}
