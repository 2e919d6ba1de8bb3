//! The signed early-exit head (issue 10, `specs/planner.md` §7): loaded and verified with the
//! device part, absent from the cloud part, gated on the signed τ, and refused when tampered.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};

use tandem_model::{read_verifying_key, Bundle, Limits, ModelError, Part, TestSet, VerifyingKey};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vk() -> VerifyingKey {
    read_verifying_key(&repo().join("models/dev-verifying-key.txt")).unwrap()
}

fn copy_bundle(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(repo().join("models").join(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    tmp
}

#[test]
fn signed_exit_head_loads_with_the_device_part_and_gates_on_tau() {
    for name in ["digits", "breast_cancer"] {
        let dir = repo().join("models").join(name);
        let dev = Bundle::load_part(&dir, &vk(), &Limits::default(), Part::Device).unwrap();
        let head = dev
            .exit_head()
            .expect("the bundle carries a signed exit head");
        let tau = head.threshold();
        assert!(tau > 0.0 && tau <= 1.0, "{name}: tau {tau}");
        let cal = head.spec().calibration.as_ref().unwrap();
        // The signed record says the held-out loss met the target.
        assert!(
            100.0 * (cal.holdout_full_accuracy - cal.holdout_cascade_accuracy)
                <= cal.target_loss_points
        );
        assert_eq!(head.spec().at_layer, dev.cloud_index());
        // The cloud holds no head (its file has no head tensors).
        let cloud = Bundle::load_part(&dir, &vk(), &Limits::default(), Part::Cloud).unwrap();
        assert!(cloud.exit_head().is_none());
        // Exit exactly when confidence >= tau; both sides occur on the test split.
        let test = TestSet::load(&dir.join("test.json")).unwrap();
        let (mut local, mut offload) = (0, 0);
        for x in &test.x {
            let o = dev.exit_confidence(x).unwrap().unwrap();
            assert_eq!(o.exit, o.confidence >= tau);
            assert!(o.confidence > 0.0 && o.confidence <= 1.0);
            if o.exit {
                local += 1;
            } else {
                offload += 1;
            }
        }
        assert!(
            local > 0 && offload > 0,
            "{name}: {local} local, {offload} offloaded"
        );
    }
}

#[test]
fn bundle_without_head_has_no_exit() {
    let dir = repo().join("models/digits2");
    let b = Bundle::load_part(&dir, &vk(), &Limits::default(), Part::Device).unwrap();
    if b.manifest().exit_head.is_none() {
        assert!(b.exit_head().is_none());
        let x = TestSet::load(&dir.join("test.json")).unwrap().x[0].clone();
        assert_eq!(b.exit_confidence(&x).unwrap(), None);
    }
}

#[test]
fn tampered_threshold_fails_the_signature() {
    let tmp = copy_bundle("digits");
    let m = tmp.path().join("manifest.toml");
    let text = std::fs::read_to_string(&m).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("threshold = "))
        .unwrap()
        .to_string();
    std::fs::write(&m, text.replace(&line, "threshold = 0.5")).unwrap();
    match Bundle::load_part(tmp.path(), &vk(), &Limits::default(), Part::Device) {
        Err(ModelError::BadSignature { .. }) => {}
        other => panic!("expected BadSignature, got {other:?}"),
    }
}

#[test]
fn tampered_head_weights_fail_the_digest() {
    let tmp = copy_bundle("breast_cancer");
    let f = tmp.path().join("device.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    // Locate exit.weight's data through the safetensors header and flip one of its bits.
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + hlen]).unwrap();
    let start = header["exit.weight"]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[8 + hlen + start] ^= 0x40;
    std::fs::write(&f, &bytes).unwrap();
    match Bundle::load_part(tmp.path(), &vk(), &Limits::default(), Part::Device) {
        Err(ModelError::DigestMismatch { .. }) => {}
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    // The cloud does not read the device file: it still loads.
    Bundle::load_part(tmp.path(), &vk(), &Limits::default(), Part::Cloud).unwrap();
}

#[test]
fn head_section_inconsistent_with_the_model_is_refused_even_when_signed() {
    let tmp = copy_bundle("digits");
    let m = tmp.path().join("manifest.toml");
    let text = std::fs::read_to_string(&m).unwrap();
    let key = tandem_model::dev_signing_key();
    for (from, to, want) in [
        (
            "in = 32\nweight = \"exit.weight\"",
            "in = 16\nweight = \"exit.weight\"",
            "in = 16",
        ),
        ("at_layer = 1", "at_layer = 2", "at_layer = 2"),
        ("threshold = 0.", "threshold = 1.", "not in (0, 1]"),
    ] {
        assert!(text.contains(from), "{from}");
        std::fs::write(&m, text.replacen(from, to, 1)).unwrap();
        match tandem_model::sign_manifest(&m, &key) {
            Err(ModelError::InvalidManifest(msg)) => assert!(msg.contains(want), "{msg}"),
            other => panic!("{to}: expected InvalidManifest, got {other:?}"),
        }
    }
}
