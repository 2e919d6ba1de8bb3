//! Set-up shared by the integration tests of `tandem-ops`: the MiniLM skip rule and the tiny
//! synthetic model ([`tiny`]).
//! Each test keeps its own assertions; only set-up lives here.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod tiny;

use std::path::PathBuf;

use tandem_ops::default_model_dir;

/// The all-MiniLM-L6-v2 directory ([`default_model_dir`], filled by
/// `scripts/fetch-minilm.sh`), or `None` after printing `SKIPPED: … {what} was NOT checked`.
/// With `TANDEM_MINILM_DIR` set a missing model fails the test instead.
pub fn model_dir(what: &str) -> Option<PathBuf> {
    let dir = default_model_dir();
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("TANDEM_MINILM_DIR").is_none(),
        "TANDEM_MINILM_DIR={} has no model.safetensors; run scripts/fetch-minilm.sh",
        dir.display()
    );
    eprintln!(
        "SKIPPED: no MiniLM model in {} (run scripts/fetch-minilm.sh); {what} was NOT checked",
        dir.display()
    );
    None
}
