//! End-to-end tests of the `tandem-conformance` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem-conformance"))
}

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn committed_vectors_pass() {
    // TDM-FRAME-7, TDM-MSG-1: every committed vector passes (valid, invalid, transcripts).
    let out = bin()
        .arg("vectors")
        .arg(root().join("specs/vectors"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let last = text.lines().last().unwrap();
    assert!(out.status.success(), "{text}");
    let passed: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 60, "{last}");
    assert!(last.contains(" 0 failed"), "{last}");
}

#[test]
fn generator_is_deterministic() {
    // Regenerating with the fixed seed reproduces the committed files byte for byte.
    let dir = std::env::temp_dir().join(format!("tandem-vectors-{}", std::process::id()));
    let st = bin().arg("gen-vectors").arg(&dir).status().unwrap();
    assert!(st.success());
    for f in [
        "messages.json",
        "invalid.json",
        "transcripts.json",
        "SHA256SUMS",
    ] {
        let a = std::fs::read(dir.join(f)).unwrap();
        let b = std::fs::read(root().join("specs/vectors").join(f)).unwrap();
        assert!(
            a == b,
            "{f} differs from the committed copy; run gen-vectors"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn checksum_mismatch_is_refused() {
    let dir = std::env::temp_dir().join(format!("tandem-vectors-bad-{}", std::process::id()));
    assert!(bin()
        .arg("gen-vectors")
        .arg(&dir)
        .status()
        .unwrap()
        .success());
    let p = dir.join("invalid.json");
    let mut t = std::fs::read_to_string(&p).unwrap();
    t.push(' ');
    std::fs::write(&p, t).unwrap();
    let out = bin().arg("vectors").arg(&dir).output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("checksum mismatch"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn coverage_line_format() {
    let out = bin().arg("coverage").arg(root()).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let last = text.lines().last().unwrap();
    assert!(last.starts_with("requirements: "), "{last}");
    assert!(last.contains(", cited in code: ") && last.contains(", cited in tests: "));
}

#[test]
fn he_vectors_checked_from_the_spec() {
    // he-formats.md TDM-HE-4: a wrong mask-stream value is caught by the independent checker.
    let dir = std::env::temp_dir().join(format!("tandem-vectors-he-{}", std::process::id()));
    assert!(bin()
        .arg("gen-vectors")
        .arg(&dir)
        .status()
        .unwrap()
        .success());
    std::fs::create_dir_all(dir.join("he")).unwrap();
    let text = std::fs::read_to_string(root().join("specs/vectors/he/kat.json")).unwrap();
    let at = text.find("\"first_values\": [\"").unwrap() + 18;
    let mut bad = text.clone();
    let c = if &text[at..at + 1] == "0" { "1" } else { "0" };
    bad.replace_range(at..at + 1, c);
    std::fs::write(dir.join("he/kat.json"), &bad).unwrap();
    let out = bin().arg("vectors").arg(&dir).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("FAILED he/mask_stream"), "{text}");
    assert!(text.contains("PASSED he/nokey_6x3_batch2"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}
