//! `tandem-conformance`: runs the protocol vectors and reports requirement
//! coverage.
//!
//! Subcommands (interface kept stable):
//! - `vectors DIR` — verify `DIR/SHA256SUMS`, run every vector; last line
//!   `N passed, M failed, K skipped`; exit 1 on any failure.
//! - `coverage [ROOT]` — last line `requirements: T, cited in code: C, cited in tests: E`;
//!   exit 1 unless every requirement is cited in code and in tests.
//! - `gen-vectors DIR` — regenerate the vectors (fixed seed) and checksums.
//!
//! The transcript engine (`transcript::execute`) drives a local session; a
//! later `remote` mode will replay the cloud-role transcripts against a
//! remote cloud over mTLS and compare the frames it returns.
#![forbid(unsafe_code)]

mod coverage;
mod gen;
mod he_kat;
mod hexutil;
mod json;
mod remote;
mod run;
mod transcript;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| PathBuf::from(args.get(i).map_or(d, String::as_str));
    match args.first().map(String::as_str) {
        Some("vectors") => match run::run(&arg(1, "specs/vectors")) {
            Ok(t) => {
                println!(
                    "{} passed, {} failed, {} skipped",
                    t.passed, t.failed, t.skipped
                );
                if t.failed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                println!("FAILED setup: {e}");
                println!("0 passed, 1 failed, 0 skipped");
                ExitCode::FAILURE
            }
        },
        Some("coverage") => match coverage::report(&arg(1, ".")) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("coverage: {e}");
                ExitCode::FAILURE
            }
        },
        Some("remote") => remote_main(&args[1..]),
        Some("gen-vectors") => match gen::generate(&arg(1, "specs/vectors")) {
            Ok(n) => {
                println!("wrote {n} vectors (seed {:#x})", gen::SEED);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gen-vectors: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: tandem-conformance vectors DIR | coverage [ROOT] | gen-vectors DIR");
            ExitCode::from(2)
        }
    }
}

/// `remote --server ADDR --pki DIR --device NAME --model ID --digest HEX [--server-name NAME]
/// [--layer ID --width N]`
fn remote_main(args: &[String]) -> ExitCode {
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(server), Some(pki), Some(model_id), Some(digest)) = (
        get("--server"),
        get("--pki"),
        get("--model"),
        get("--digest"),
    ) else {
        eprintln!("usage: tandem-conformance remote --server ADDR --pki DIR --device NAME --model ID --digest HEX [--server-name NAME] [--layer ID --width N]");
        return ExitCode::FAILURE;
    };
    let (Ok(server), Some(model_digest)) = (server.parse(), remote::parse_digest(&digest)) else {
        eprintln!("remote: bad --server address or --digest (64 hex digits)");
        return ExitCode::FAILURE;
    };
    let target = remote::Target {
        server,
        server_name: get("--server-name").unwrap_or_else(|| "localhost".into()),
        pki: PathBuf::from(pki),
        device: get("--device").unwrap_or_else(|| "device-1".into()),
        model_id,
        model_digest,
        layer: match (get("--layer"), get("--width")) {
            (Some(l), Some(w)) => match (l.parse(), w.parse()) {
                (Ok(l), Ok(w)) => Some((l, w)),
                _ => {
                    eprintln!("remote: --layer and --width take integers");
                    return ExitCode::FAILURE;
                }
            },
            (None, None) => None,
            _ => {
                eprintln!("remote: --layer and --width go together");
                return ExitCode::FAILURE;
            }
        },
    };
    let t = remote::run(&target);
    println!(
        "{} passed, {} failed, {} skipped",
        t.passed, t.failed, t.skipped
    );
    if t.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
