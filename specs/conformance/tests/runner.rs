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
    let text = std::fs::read_to_string(root().join("specs/vectors/he/kat.json")).unwrap();
    let at = text.find("\"first_values\": [\"").unwrap() + 18;
    let mut bad = text.clone();
    let c = if &text[at..at + 1] == "0" { "1" } else { "0" };
    bad.replace_range(at..at + 1, c);
    let (ok, text) = run_he_kat("he", &bad);
    assert!(!ok, "{text}");
    assert!(text.contains("FAILED he/mask_stream"), "{text}");
    assert!(text.contains("PASSED he/nokey_6x3_batch2"), "{text}");
}

/// Writes the protocol vectors and `kat` (a possibly edited he/kat.json) into a fresh
/// directory, runs `vectors` over it and returns (success, stdout).
fn run_he_kat(tag: &str, kat: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("tandem-vectors-{tag}-{}", std::process::id()));
    assert!(bin()
        .arg("gen-vectors")
        .arg(&dir)
        .status()
        .unwrap()
        .success());
    std::fs::create_dir_all(dir.join("he")).unwrap();
    std::fs::write(dir.join("he/kat.json"), kat).unwrap();
    let out = bin().arg("vectors").arg(&dir).output().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

/// Replaces `count` hex digits of the string value `field` found after `anchor`, starting
/// `skip` digits into the value, by their complement (15 − d).
fn flip_hex(text: &mut String, anchor: &str, field: &str, skip: usize, count: usize) {
    let a = text.find(anchor).unwrap();
    let key = format!("\"{field}\": ");
    let v = a + text[a..].find(&key).unwrap() + key.len();
    let v = v + text[v..].find('"').unwrap() + 1 + skip;
    let flipped: String = text[v..v + count]
        .chars()
        .map(|c| char::from_digit(15 - c.to_digit(16).unwrap(), 16).unwrap())
        .collect();
    text.replace_range(v..v + count, &flipped);
}

#[test]
fn he_multibody_vectors_checked_from_the_spec() {
    // he-formats.md § Shared masks (kinds 4, 5, 6): the independent checker catches a damaged
    // kind-5 payload, a kind-4 body count that differs from the plan, a damaged kind-6 key
    // body, and listed secrets that are not the seed's derivation; the others still pass.
    let text = std::fs::read_to_string(root().join("specs/vectors/he/kat.json")).unwrap();
    let (ok, out) = run_he_kat("he-mb", &text);
    assert!(ok, "{out}");
    for id in [
        "he/secret_derivation",
        "he/multibody_eval_key_a1_r2",
        "he/multibody_nokey_6x2_r2_b2_batch5",
        "he/multibody_packed_2x3_r2_b2_batch5",
        "he/multibody_nokey_3x1_r4_b2_batch5",
        "he/batch_nokey_6x2_r1_b2_batch3",
    ] {
        assert!(out.contains(&format!("PASSED {id}\n")), "{id}: {out}");
    }
    let mut bad = text.clone();
    // 64 bits of the first block's masks (whole mask coefficients, high bits included).
    flip_hex(
        &mut bad,
        "\"id\": \"he/multibody_packed_2x3_r2_b2_batch5\"",
        "output_blob",
        2 * 52 + 4000,
        16,
    );
    // r = 4 → 2 in the kind-4 header (offset 40).
    let at = bad
        .find("\"id\": \"he/multibody_nokey_3x1_r4_b2_batch5\"")
        .unwrap();
    let at = at + bad[at..].find("\"input_blob\": \"").unwrap() + 15 + 80;
    assert_eq!(&bad[at..at + 2], "04");
    bad.replace_range(at..at + 2, "02");
    // One body coefficient of the kind-6 key (level 1, secret 1).
    flip_hex(
        &mut bad,
        "\"id\": \"he/multibody_eval_key_a1_r2\"",
        "blob",
        2 * (63 + 8 * 4096 * 3),
        16,
    );
    let (ok, out) = run_he_kat("he-mb-bad", &bad);
    assert!(!ok, "{out}");
    for id in [
        "he/multibody_packed_2x3_r2_b2_batch5",
        "he/multibody_nokey_3x1_r4_b2_batch5",
        "he/multibody_eval_key_a1_r2",
    ] {
        assert!(out.contains(&format!("FAILED {id}")), "{id}: {out}");
    }
    assert!(
        out.contains("PASSED he/multibody_nokey_6x2_r2_b2_batch5\n"),
        "{out}"
    );
    assert!(out.contains("PASSED he/secret_derivation\n"), "{out}");
    assert!(out.contains("PASSED he/packed_4x3_chunk2\n"), "{out}");
    // Secret 1 as listed is no longer what the seed derives.
    let mut bad = text;
    flip_hex(&mut bad, "\"multibody\": {", "secret_key_bits", 1, 1);
    let (ok, out) = run_he_kat("he-mb-sk", &bad);
    assert!(!ok, "{out}");
    assert!(out.contains("FAILED he/secret_derivation"), "{out}");
}
