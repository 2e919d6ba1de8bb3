//! Issue 10's commands as a careless or hostile user drives them (built binary): a NaN,
//! out-of-range or unwritable argument is refused with an error naming the flag, exits
//! non-zero, never panics, and is refused before any measurement runs (nothing on stdout).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::Command;

fn refused(args: &[&str], flag: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} accepted: {stdout}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(
        stderr.starts_with(&format!("Error: {flag}")),
        "{args:?}: error does not name {flag}: {stderr}"
    );
    assert!(
        stdout.is_empty(),
        "{args:?}: refused only after measuring: {stdout}"
    );
}

#[test]
fn plan_refuses_nan_and_out_of_range_constraints() {
    let m = ["plan", "--model", "models/digits"];
    for (extra, flag) in [
        (&["--accuracy-floor", "NaN"][..], "--accuracy-floor"),
        (&["--local-accuracy", "5"], "--local-accuracy"),
        (&["--latency-target-ms", "NaN"], "--latency-target-ms"),
        (&["--budget-rho", "NaN"], "--budget-rho"),
        (&["--rtt", "1e300s"], "--rtt"),
        // Encoder-bundle inputs on an MLP bundle (was: silently ignored).
        (&["--tokens", "8"], "--tokens"),
    ] {
        refused(&[&m[..], extra].concat(), flag);
    }
}

#[test]
fn benches_refuse_bad_output_paths_and_counts_before_measuring() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("missing-dir").join("p.svg");
    let plot = plot.to_str().unwrap();
    let d = ["--model", "models/digits"];
    refused(
        &[
            &["bench", "traces"][..],
            &d,
            &["--requests", "1", "--plot", plot],
        ]
        .concat(),
        "--plot",
    );
    refused(
        &[
            &["bench", "traces"][..],
            &d,
            &["--requests", "18446744073709551615"],
        ]
        .concat(),
        "--requests",
    );
    refused(
        &[
            &["bench", "traces"][..],
            &d,
            &["--requests", "1", "--epsilon", "NaN"],
        ]
        .concat(),
        "--epsilon",
    );
    refused(
        &[&["bench", "early-exit"][..], &d, &["--svg", plot]].concat(),
        "--svg",
    );
}

#[test]
fn exit_head_refuses_a_nan_target_before_training() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing is touched: the check runs before the bundle is read.
    let model = dir.path().join("bundle");
    refused(
        &[
            "exit-head",
            "--model",
            model.to_str().unwrap(),
            "--key",
            "models/dev-signing-key.txt",
            "--target-loss",
            "NaN",
        ],
        "--target-loss",
    );
}
