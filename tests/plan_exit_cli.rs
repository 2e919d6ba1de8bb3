//! `tandem plan --row N` on the digits bundle (issue 10), run as the built binary: the
//! bundle's signed exit head is evaluated on test row N, answering locally is the choice when
//! its confidence is at least τ and is refused ("exit head below tau") otherwise, and the
//! explanation says which happened.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::Command;

mod common;

fn explain(row: usize) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "plan",
            "--model",
            "models/digits",
            "--bandwidth",
            "2mbit",
            "--rtt",
            "80ms",
            "--explain",
            "--row",
            &row.to_string(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "tandem plan failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn plan_row_answers_locally_only_when_the_exit_head_is_confident() {
    let (_, _, confident, unsure) = common::digits_exit_rows();

    let out = explain(confident);
    let chosen = out.lines().find(|l| l.starts_with("* ")).unwrap();
    assert!(chosen.starts_with("* local "), "{out}");
    assert!(out.contains("answering locally is a candidate"), "{out}");
    assert!(
        out.contains("(answered on the device, nothing sent)"),
        "{out}"
    );

    let out = explain(unsure);
    let local = out.lines().find(|l| l.contains(" local ")).unwrap();
    assert!(local.ends_with("refused: exit head below tau"), "{out}");
    assert!(
        out.contains("not confident, the request is offloaded"),
        "{out}"
    );
    assert!(out.contains("(offloaded)"), "{out}");
    // Every candidate has its formula's units in the header.
    assert!(
        out.contains("latency_ms") && out.contains("energy_mJ"),
        "{out}"
    );
}
