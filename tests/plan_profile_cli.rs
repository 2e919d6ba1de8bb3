//! `tandem plan` on the MiniLM encoder bundle with a damaged or hostile `--profile` file
//! (issue 10, TDM-SPLIT-2; built binary): a truncated file, one whose numbers would size an
//! allocation or overflow a sum, and a directory are typed errors that name the file and say
//! to delete it — never a panic, an abort or an attempt to allocate by a size read from it.
//! Was: `blocks = 2^64 - 1` panicked (capacity overflow), `blocks = 10^9` aborted on an 80 GB
//! allocation.
//!
//! Needs all-MiniLM-L6-v2 from `scripts/fetch-minilm.sh`: without it the test prints
//! `SKIPPED: …` and checks nothing; with `TANDEM_MINILM_DIR` set a missing model is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;
use common::run as tandem;

#[test]
fn damaged_and_hostile_profiles_are_typed_errors() {
    let Some(src) = common::model_dir("tandem plan with a hostile profile") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("minilm");
    let out = tandem(&[
        "model".into(),
        "import-bert".into(),
        src.display().to_string(),
        "--out".into(),
        bundle.display().to_string(),
        "--key".into(),
        "models/dev-signing-key.txt".into(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A real profile (measured once, 8 tokens), then damaged copies of it.
    let good = dir.path().join("good.json");
    let plan = |profile: &std::path::Path| {
        tandem(&[
            "plan".into(),
            "--model".into(),
            bundle.display().to_string(),
            "--tokens".into(),
            "8".into(),
            "--profile".into(),
            profile.display().to_string(),
        ])
    };
    let out = plan(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&good).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let edited = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut j = json.clone();
        f(&mut j);
        serde_json::to_string(&j).unwrap()
    };
    let cases = [
        ("truncated", text[..text.len() / 2].to_string()),
        (
            "blocks u64::MAX",
            edited(&|j| j["blocks"] = u64::MAX.into()),
        ),
        (
            "blocks 1e9",
            edited(&|j| j["blocks"] = 1_000_000_000u64.into()),
        ),
        (
            "requests u64::MAX",
            edited(&|j| j["linears"][0]["requests"] = u64::MAX.into()),
        ),
        (
            "no linears",
            edited(&|j| j["linears"] = serde_json::json!([])),
        ),
    ];
    for (what, body) in cases {
        let p = dir.path().join("bad.json");
        std::fs::write(&p, &body).unwrap();
        let out = plan(&p);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(
            stderr.contains("bad.json") && stderr.contains("delete"),
            "{what}: {stderr}"
        );
        // The damaged file is left as it was (not overwritten by a new measurement).
        assert_eq!(std::fs::read_to_string(&p).unwrap(), body, "{what}");
    }
    let out = plan(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "directory: {stderr}");
    assert!(stderr.contains("directory"), "{stderr}");
}
