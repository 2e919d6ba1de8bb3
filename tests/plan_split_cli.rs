//! `tandem plan` on the MiniLM encoder bundle (issue 10, TDM-SPLIT-2), run as the built binary:
//! it lists every split depth 0..=6, measures the device profile once and caches it in the
//! `--profile` file, reuses the cached file on the next run (no second measurement), and picks
//! the obvious depth at the extremes — Local with no link; everything offloaded when the
//! profile says the device is slow and the link is fast.
//!
//! Needs all-MiniLM-L6-v2 from `scripts/fetch-minilm.sh`: without it the test prints
//! `SKIPPED: …` and checks nothing; with `TANDEM_MINILM_DIR` set a missing model is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;

mod common;
use common::run as tandem;

fn plan(
    bundle: &Path,
    profile: &Path,
    bandwidth: &str,
    rtt: &str,
) -> (Vec<serde_json::Value>, String) {
    let args: Vec<String> = [
        "plan",
        "--model",
        &bundle.display().to_string(),
        "--bandwidth",
        bandwidth,
        "--rtt",
        rtt,
        "--tokens",
        "8",
        "--profile",
        &profile.display().to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = tandem(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "tandem plan failed: {stderr}");
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, stderr)
}

fn chosen(lines: &[serde_json::Value]) -> u64 {
    let c: Vec<u64> = lines
        .iter()
        .filter(|l| l["chosen"] == true)
        .map(|l| l["split"].as_u64().unwrap())
        .collect();
    assert_eq!(c.len(), 1, "exactly one choice: {lines:?}");
    c[0]
}

#[test]
fn plan_lists_every_split_depth_caches_the_profile_and_picks_the_obvious_one() {
    let Some(src) = common::model_dir("tandem plan on an encoder bundle") else {
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
    let profile = dir.path().join("profile.json");

    // No link: only Local (split 6) is feasible; the profile is measured and cached.
    let (lines, stderr) = plan(&bundle, &profile, "0", "80ms");
    assert!(stderr.contains("profiling"), "{stderr}");
    assert!(profile.exists());
    let splits: Vec<u64> = lines.iter().map(|l| l["split"].as_u64().unwrap()).collect();
    assert_eq!(splits, (0..=6).collect::<Vec<_>>());
    assert_eq!(chosen(&lines), 6);
    for l in &lines[..6] {
        assert_eq!(l["refused"], "NoLink", "{l}");
    }
    let local = &lines[6];
    assert_eq!(
        (local["bytes_up"].as_u64(), local["round_trips"].as_u64()),
        (Some(0), Some(0))
    );
    // Offloading fewer blocks sends fewer bytes: 4 requests per block.
    for w in lines.windows(2) {
        assert!(w[0]["bytes_up"].as_u64() > w[1]["bytes_up"].as_u64());
        assert_eq!(
            w[0]["round_trips"].as_u64().unwrap(),
            w[1]["round_trips"].as_u64().unwrap() + 4
        );
    }

    // A device 1000× slower in the clear (edited profile) on a fast link: offload everything.
    // The cached profile is used as is (no second measurement).
    let mut p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap();
    for l in p["linears"].as_array_mut().unwrap() {
        l["local_ms"] = serde_json::json!(1.0e6);
    }
    std::fs::write(&profile, serde_json::to_vec(&p).unwrap()).unwrap();
    let (lines, stderr) = plan(&bundle, &profile, "10gbit", "1ms");
    assert!(!stderr.contains("profiling"), "re-measured: {stderr}");
    assert_eq!(chosen(&lines), 0);
}
