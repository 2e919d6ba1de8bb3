//! `tandem bench sentence --split` (issue 10, TDM-SPLIT-1/2), run as the built binary over
//! loopback mTLS behind the shaped link: one JSON line per (split, rep) with the keys of
//! `bench sentence` plus `split`; depth 6 sends nothing, depth 5 sends one block's 4 requests
//! with exactly the bytes `tandem plan` predicts for it, and `auto` runs the depth `tandem
//! plan` chooses for the same profile and link.
//!
//! Needs all-MiniLM-L6-v2 from `scripts/fetch-minilm.sh`: without it the test prints
//! `SKIPPED: …` and checks nothing; with `TANDEM_MINILM_DIR` set a missing model is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;
use common::{json_lines, run_ok as tandem};

#[test]
fn bench_sentence_split_runs_each_depth_and_auto_follows_the_plan() {
    let Some(src) = common::model_dir("tandem bench sentence --split") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("minilm");
    let bundle_s = bundle.display().to_string();
    let src_s = src.display().to_string();
    tandem(&[
        "model",
        "import-bert",
        &src_s,
        "--out",
        &bundle_s,
        "--key",
        "models/dev-signing-key.txt",
    ]);
    let profile = dir.path().join("profile.json").display().to_string();
    let link = ["--bandwidth", "50mbit", "--rtt", "4ms", "--tokens", "8"];

    let mut plan_args = vec![
        "plan",
        "--model",
        &bundle_s,
        "--profile",
        &profile,
        "--json",
    ];
    plan_args.extend(link);
    let plan = json_lines(&tandem(&plan_args));
    let chosen = plan.iter().find(|l| l["chosen"] == true).unwrap()["split"]
        .as_u64()
        .unwrap();

    let mut bench_args = vec![
        "bench",
        "sentence",
        "--model",
        &bundle_s,
        "--split",
        "6,5,auto",
        "--split-profile",
        &profile,
        "--json",
    ];
    bench_args.extend(link);
    let lines = json_lines(&tandem(&bench_args));
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        for key in [
            "model",
            "tokens",
            "e2e_s",
            "cloud_s",
            "device_s",
            "round_trips",
            "bytes_up",
            "bytes_down",
            "key_upload_bytes",
            "predicted_e2e_s",
        ] {
            assert!(l.get(key).is_some(), "no {key} in {l}");
        }
        assert_eq!(l["tokens"], 8);
    }
    let (local, one_block, auto) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!(local["split"], 6);
    assert_eq!(
        (local["round_trips"].as_u64(), local["bytes_up"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(one_block["split"], 5);
    assert_eq!(one_block["round_trips"], 4);
    let predicted_up = plan.iter().find(|l| l["split"] == 5).unwrap()["bytes_up"].clone();
    assert_eq!(
        one_block["bytes_up"], predicted_up,
        "bytes up vs tandem plan"
    );
    assert_eq!(auto["split_requested"], "auto");
    assert_eq!(
        auto["split"].as_u64(),
        Some(chosen),
        "auto vs tandem plan's choice"
    );
}
