//! `tandem model import-bert --link-kbit N --max-bodies R` (issues 8 and 9), run as the built
//! binary: the bundle signs the link rate and the shared-mask limit (defaults 1 000 kbit/s and
//! 4) and always the row bounds of its int8 weights; a zero rate or an out-of-range limit is
//! refused with the field named and no bundle signed.
//!
//! Needs all-MiniLM-L6-v2 from `scripts/fetch-minilm.sh`: without it the test prints
//! `SKIPPED: …` and checks nothing; with `TANDEM_MINILM_DIR` set a missing model is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;
use std::process::Output;

mod common;

fn import(src: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "model".to_string(),
        "import-bert".into(),
        src.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--key".into(),
        "models/dev-signing-key.txt".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    common::run(&args)
}

#[test]
fn import_bert_signs_row_bounds_the_link_and_the_body_limit() {
    let Some(src) = common::model_dir("import-bert --link-kbit") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let manifest = |out: &Path| std::fs::read_to_string(out.join("manifest.toml")).unwrap();

    let plain = tmp.path().join("plain");
    let o = import(&src, &plain, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = manifest(&plain);
    assert!(
        m.contains("link_kbit_s = 1000"),
        "the default link rate is signed"
    );
    assert!(
        m.contains("max_bodies = 4"),
        "the default body limit is signed"
    );
    assert_eq!(m.matches("max_row_l1 = ").count(), 24, "every cloud layer");
    assert_eq!(m.matches("max_row_sq = ").count(), 24, "every cloud layer");

    // Accepted knobs are signed as given.
    for (name, flag, value, line) in [
        ("slow", "--link-kbit", "2000", "link_kbit_s = 2000"),
        ("single", "--max-bodies", "1", "max_bodies = 1"),
    ] {
        let out = tmp.path().join(name);
        let o = import(&src, &out, &[flag, value]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(manifest(&out).contains(line), "{flag} {value}");
    }
    // Out-of-range knobs are refused naming the field, and nothing is signed.
    for (name, flag, value, field) in [
        ("nine", "--max-bodies", "9", "max_bodies"),
        ("zero", "--link-kbit", "0", "link_kbit_s"),
    ] {
        let out = tmp.path().join(name);
        let o = import(&src, &out, &[flag, value]);
        assert!(!o.status.success(), "{flag} {value} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(field), "{err}");
        assert!(!out.join("manifest.sig").exists(), "nothing signed");
    }
}
