//! Test helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ed25519_dalek::Signer;
use sha2::{Digest, Sha256};
use tandem_model::{
    read_signing_key, read_verifying_key, Manifest, SigningKey, VerifyingKey, SIGNING_CONTEXT,
};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn models() -> PathBuf {
    repo().join("models")
}

pub fn dev_key() -> SigningKey {
    read_signing_key(&models().join("dev-signing-key.txt")).unwrap()
}

pub fn dev_pub() -> VerifyingKey {
    read_verifying_key(&models().join("dev-verifying-key.txt")).unwrap()
}

static N: AtomicUsize = AtomicUsize::new(0);

/// A fresh empty directory under the target's temp dir.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "model-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copies a committed bundle (manifest, signature, weights) into a fresh directory.
pub fn copy_bundle(name: &str) -> PathBuf {
    let d = tmpdir(name);
    for f in [
        "manifest.toml",
        "manifest.sig",
        "device.safetensors",
        "cloud.safetensors",
    ] {
        std::fs::copy(models().join(name).join(f), d.join(f)).unwrap();
    }
    d
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Signs raw manifest bytes and writes both files, bypassing every check of the library's
/// signer (to produce signed-but-malformed bundles).
pub fn sign_raw(dir: &Path, manifest_text: &str, key: &SigningKey) {
    std::fs::write(dir.join("manifest.toml"), manifest_text).unwrap();
    let mut msg = SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(manifest_text.as_bytes());
    let sig = key.sign(&msg);
    std::fs::write(dir.join("manifest.sig"), hex(&sig.to_bytes()) + "\n").unwrap();
}

/// Re-binds the manifest to the current weights file (digest, size) and signs it raw.
pub fn rebind_raw(dir: &Path, key: &SigningKey, edit: impl FnOnce(&mut Manifest)) {
    let text = std::fs::read_to_string(dir.join("manifest.toml")).unwrap();
    let mut m = Manifest::from_toml(&text).unwrap();
    for r in [&mut m.weights.device, &mut m.weights.cloud] {
        let w = std::fs::read(dir.join(&r.file)).unwrap();
        r.sha256 = hex(&Sha256::digest(&w));
        r.bytes = w.len() as u64;
    }
    edit(&mut m);
    sign_raw(dir, &m.to_toml().unwrap(), key);
}
