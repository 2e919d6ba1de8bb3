//! Paths and keys the cloud's integration tests share: the repository root, the committed
//! development verifying key and the `digits` bundle signed with it.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use tandem_model::{read_verifying_key, VerifyingKey};

/// The repository root (the parent of `cloud/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `models/dev-verifying-key.txt`, the key the committed bundles are signed with.
pub fn vk() -> VerifyingKey {
    read_verifying_key(&repo().join("models/dev-verifying-key.txt")).unwrap()
}

/// The committed `models/digits` bundle.
pub fn digits() -> PathBuf {
    repo().join("models/digits")
}
