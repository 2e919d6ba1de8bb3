//! Set-up shared by the integration tests of the `tandem` binary: where the MiniLM model is
//! (and the skip rule without it) and running the built binary from the repository root.
//! Each test keeps its own assertions; only set-up lives here.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;
use tandem::model::{read_verifying_key, Bundle, Limits, TestSet};

/// The repository root (the `tandem` package's directory).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The all-MiniLM-L6-v2 directory (`scripts/fetch-minilm.sh`: `TANDEM_MINILM_DIR`, else
/// `${TANDEM_CACHE:-$HOME/.cache/tandem}/minilm`), or `None` after printing
/// `SKIPPED: … {what} was NOT checked`. With `TANDEM_MINILM_DIR` set a missing model fails.
pub fn model_dir(what: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("TANDEM_MINILM_DIR").map_or_else(
        || {
            let cache = std::env::var_os("TANDEM_CACHE").map_or_else(
                || {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/tandem")
                },
                PathBuf::from,
            );
            cache.join("minilm")
        },
        PathBuf::from,
    );
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("TANDEM_MINILM_DIR").is_none(),
        "TANDEM_MINILM_DIR={} has no model.safetensors; run scripts/fetch-minilm.sh",
        dir.display()
    );
    eprintln!(
        "SKIPPED: no MiniLM model in {} (run scripts/fetch-minilm.sh and set \
         TANDEM_MINILM_DIR); {what} was NOT checked",
        dir.display()
    );
    None
}

/// Runs the built `tandem` binary with `args` in the repository root; any exit status.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

/// [`run`], failing the test (with its stderr) unless the binary succeeded.
pub fn run_ok<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "tandem {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every stdout line, parsed as JSON.
pub fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The committed `models/digits` bundle (verified with the development key), its test set,
/// and the index of the first test row its signed exit head is confident about and of the
/// first it is not.
pub fn digits_exit_rows() -> (Bundle, TestSet, usize, usize) {
    let dir = repo().join("models/digits");
    let vk = read_verifying_key(&repo().join("models/dev-verifying-key.txt")).unwrap();
    let bundle = Bundle::load(&dir, &vk, &Limits::default()).unwrap();
    let test = TestSet::load(&dir.join("test.json")).unwrap();
    let exits: Vec<bool> = test
        .x
        .iter()
        .map(|x| bundle.exit_confidence(x).unwrap().unwrap().exit)
        .collect();
    let confident = exits.iter().position(|e| *e).unwrap();
    let unsure = exits.iter().position(|e| !*e).unwrap();
    (bundle, test, confident, unsure)
}
