//! `tandem plan --model <MLP bundle> --json` (built binary): one JSON object per candidate on
//! stdout and nothing else, exactly one marked chosen, refusals named. Was: `--json` was
//! silently ignored for MLP bundles (text printed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::Command;

fn plan_json(extra: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["plan", "--model", "models/digits", "--json"])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn plan_json_prints_one_object_per_candidate() {
    let rows = plan_json(&["--bandwidth", "2mbit", "--rtt", "80ms"]);
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["candidate"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["local", "split1/encrypted/packed", "split1/encrypted/nokey"]
    );
    assert_eq!(rows.iter().filter(|r| r["chosen"] == true).count(), 1);
    // Local is not a candidate without --row or --local-accuracy: refused by policy.
    assert_eq!(rows[0]["refused"], "policy");
    for r in &rows[1..] {
        assert_eq!(r["bandwidth_bps"], 2e6);
        assert!(r["predicted_e2e_ms"].as_f64().unwrap() > 80.0);
        assert!(r["bytes_up"].as_u64().unwrap() > 0);
    }
    // No link: the offloads' costs are not numbers (null), refused for want of a link.
    let rows = plan_json(&["--bandwidth", "0", "--local-accuracy", "0.9"]);
    assert_eq!(rows[0]["chosen"], true);
    for r in &rows[1..] {
        assert_eq!(r["refused"], "no link");
        assert!(r["predicted_e2e_ms"].is_null());
    }
}
