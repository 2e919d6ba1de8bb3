//! Signature, digest, limit and shape checks on bundles (model files are untrusted input).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::*;
use sha2::{Digest, Sha256};
use tandem_model::{
    serialize_tensors, sign_bundle, verify_bundle, write_bundle, Bundle, Limits, Manifest,
    ModelError, NamedTensor, Part, Placement, SigningKey, TensorData,
};

fn load(dir: &Path) -> Result<Bundle, ModelError> {
    Bundle::load(dir, &dev_pub(), &Limits::default())
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

#[test]
fn committed_bundles_verify() {
    for name in ["digits", "breast_cancer"] {
        let dir = models().join(name);
        let b = load(&dir).unwrap();
        let bytes = std::fs::read(dir.join("manifest.toml")).unwrap();
        assert_eq!(b.digest(), <[u8; 32]>::from(Sha256::digest(&bytes)));
        // Loading through the manifest path is equivalent.
        let b2 = Bundle::load(&dir.join("manifest.toml"), &dev_pub(), &Limits::default()).unwrap();
        assert_eq!(b2.digest(), b.digest());
        let s = verify_bundle(&dir, &models().join("dev-verifying-key.txt")).unwrap();
        assert_eq!(s.digest, hex(&b.digest()));
        assert_eq!(s.cloud_layer, 1);
        assert_eq!(s.layers[1].placement, Placement::Cloud);
        assert!(s.layers[1].quantised);
        assert!(!s.to_string().is_empty());
        // Bundles are small (the device file holds the noise-trained variants, ≈ 23 KB per ε
        // for digits: issue 11).
        for f in ["device.safetensors", "cloud.safetensors"] {
            let w = std::fs::metadata(dir.join(f)).unwrap().len();
            assert!(w < 256 * 1024, "{name}/{f}: {w} bytes");
        }
    }
}

#[test]
fn flipped_manifest_byte_is_a_bad_signature() {
    let dir = copy_bundle("digits");
    let len = std::fs::read(dir.join("manifest.toml")).unwrap().len();
    for at in [0, len / 3, len / 2, len - 2] {
        let d = copy_bundle("digits");
        flip(&d.join("manifest.toml"), at);
        assert!(
            matches!(load(&d), Err(ModelError::BadSignature { .. })),
            "byte {at}"
        );
    }
}

#[test]
fn flipped_weights_byte_is_a_digest_mismatch() {
    for f in ["device.safetensors", "cloud.safetensors"] {
        let len = std::fs::read(models().join("digits").join(f))
            .unwrap()
            .len();
        for at in [0, 8, 100, len / 2, len - 1] {
            let d = copy_bundle("digits");
            flip(&d.join(f), at);
            assert!(
                matches!(load(&d), Err(ModelError::DigestMismatch { .. })),
                "{f} byte {at}"
            );
        }
    }
}

#[test]
fn wrong_key_is_refused() {
    let other = SigningKey::from_bytes(&[7u8; 32]);
    let r = Bundle::load(
        &models().join("digits"),
        &other.verifying_key(),
        &Limits::default(),
    );
    assert!(matches!(r, Err(ModelError::BadSignature { .. })));
}

#[test]
fn malformed_or_missing_signature_is_refused() {
    let d = copy_bundle("digits");
    std::fs::write(d.join("manifest.sig"), "zz\n").unwrap();
    assert!(matches!(load(&d), Err(ModelError::SignatureFormat { .. })));
    std::fs::remove_file(d.join("manifest.sig")).unwrap();
    assert!(matches!(load(&d), Err(ModelError::Io { .. })));
    let d = copy_bundle("digits");
    std::fs::write(d.join("manifest.sig"), "00".repeat(10_000)).unwrap();
    assert!(matches!(load(&d), Err(ModelError::TooLarge { .. })));
}

#[test]
fn truncated_weights_are_refused() {
    for f in ["device.safetensors", "cloud.safetensors"] {
        // Without re-signing: the size no longer matches the signed manifest.
        let d = copy_bundle("digits");
        let w = std::fs::read(d.join(f)).unwrap();
        std::fs::write(d.join(f), &w[..w.len() - 10]).unwrap();
        assert!(matches!(load(&d), Err(ModelError::SizeMismatch { .. })));
        // Even when a signer vouches for the truncated file, safetensors parsing refuses it.
        for cut in [0, 4, 8, 20, w.len() / 2, w.len() - 1] {
            let d = copy_bundle("digits");
            std::fs::write(d.join(f), &w[..cut]).unwrap();
            rebind_raw(&d, &dev_key(), |_| {});
            assert!(
                matches!(load(&d), Err(ModelError::Safetensors(_))),
                "{f} cut at {cut}: {:?}",
                load(&d).err()
            );
        }
    }
}

#[test]
fn oversized_files_are_refused_before_reading() {
    let d = copy_bundle("digits");
    let small = Limits {
        max_weights_bytes: 1024,
        ..Limits::default()
    };
    let r = Bundle::load(&d, &dev_pub(), &small);
    assert!(
        matches!(r, Err(ModelError::TooLarge { limit: 1024, .. })),
        "{r:?}"
    );
    let tiny = Limits {
        max_manifest_bytes: 100,
        ..Limits::default()
    };
    let r = Bundle::load(&d, &dev_pub(), &tiny);
    assert!(matches!(r, Err(ModelError::TooLarge { limit: 100, .. })));
    // A sparse 64 GiB weights file is refused from its size alone. Reading and hashing it
    // would take well over 5 s on any machine (SHA-256 runs at ≤ 2–3 GB/s a core), while the
    // size check takes microseconds: 5 s leaves a loaded CI machine seconds of slack (was: an
    // 8 GiB file against 2 s, a margin a stalled thread could eat).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("device.safetensors"))
        .unwrap();
    f.set_len(64 << 30).unwrap();
    drop(f);
    let t = std::time::Instant::now();
    let r = load(&d);
    assert!(matches!(r, Err(ModelError::TooLarge { size, .. }) if size == 64 << 30));
    assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    // Same for an oversized manifest.
    let d = copy_bundle("digits");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("manifest.toml"))
        .unwrap();
    f.set_len(8 << 30).unwrap();
    drop(f);
    assert!(matches!(load(&d), Err(ModelError::TooLarge { .. })));
}

/// Replaces one tensor of the digits bundle and signs the result raw (no library checks).
fn with_tensor(name: &str, shape: Vec<usize>, data: TensorData) -> std::path::PathBuf {
    let d = copy_bundle("digits");
    let file = if name.starts_with("fc1.") {
        "cloud.safetensors"
    } else {
        "device.safetensors"
    };
    let w = std::fs::read(d.join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&w).unwrap();
    let mut tensors = Vec::new();
    for (n, v) in st.tensors() {
        if n == name {
            continue;
        }
        let bytes = v.data();
        let data = match v.dtype() {
            safetensors::Dtype::F32 => TensorData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            safetensors::Dtype::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
            safetensors::Dtype::I64 => TensorData::I64(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            other => panic!("{other:?}"),
        };
        tensors.push(NamedTensor {
            name: n,
            shape: v.shape().to_vec(),
            data,
        });
    }
    tensors.push(NamedTensor {
        name: name.into(),
        shape,
        data,
    });
    std::fs::write(d.join(file), serialize_tensors(&tensors).unwrap()).unwrap();
    rebind_raw(&d, &dev_key(), |_| {});
    d
}

#[test]
fn tensor_shape_dtype_and_range_are_checked() {
    let cases: Vec<(&str, Vec<usize>, TensorData)> = vec![
        // Transposed cloud weights.
        ("fc1.weight", vec![32, 16], TensorData::I8(vec![1; 512])),
        // Float where int8 is required.
        ("fc1.weight", vec![16, 32], TensorData::F32(vec![0.5; 512])),
        // -128 is outside the symmetric int8 range.
        ("fc1.weight", vec![16, 32], TensorData::I8(vec![-128; 512])),
        // Bias too large.
        ("fc1.bias", vec![16], TensorData::I64(vec![i64::MAX; 16])),
        // Wrong bias length.
        ("fc1.bias", vec![15], TensorData::I64(vec![0; 15])),
        // Device layer with the wrong shape.
        (
            "fc0.weight",
            vec![32, 63],
            TensorData::F32(vec![0.0; 32 * 63]),
        ),
        // Non-finite float weights.
        (
            "fc2.weight",
            vec![10, 16],
            TensorData::F32(vec![f32::NAN; 160]),
        ),
        // Zero standard deviation.
        ("input.std", vec![64], TensorData::F32(vec![0.0; 64])),
    ];
    for (name, shape, data) in cases {
        let d = with_tensor(name, shape.clone(), data);
        let r = load(&d);
        assert!(
            matches!(&r, Err(ModelError::Tensor { name: n, .. }) if n == name),
            "{name} {shape:?}: {:?}",
            r.err()
        );
    }
}

#[test]
fn missing_tensor_is_refused() {
    let d = copy_bundle("digits");
    // The manifest names a tensor the file lacks (and the file's `fc2.bias` is now stray).
    rebind_raw(&d, &dev_key(), |m| m.layers[2].bias = "nope".into());
    let r = load(&d);
    assert!(
        matches!(&r, Err(ModelError::Tensor { name, .. }) if name == "nope" || name == "fc2.bias"),
        "{r:?}"
    );
    // A tensor the manifest names is missing from the file.
    let d = copy_bundle("digits");
    let w = std::fs::read(d.join("cloud.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&w).unwrap();
    let views: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "fc1.bias")
        .collect();
    std::fs::write(
        d.join("cloud.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    rebind_raw(&d, &dev_key(), |_| {});
    let r = load(&d);
    assert!(
        matches!(&r, Err(ModelError::Tensor { name, .. }) if name == "fc1.bias"),
        "{r:?}"
    );
}

#[test]
fn inconsistent_manifests_are_refused() {
    type Edit = Box<dyn Fn(&mut Manifest)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("shape chain", Box::new(|m| m.layers[1].n_in = 31)),
        (
            "cloud layer 0",
            Box::new(|m| {
                m.layers[0].placement = Placement::Cloud;
                m.layers[1].placement = Placement::Device;
            }),
        ),
        (
            "unquantised second cloud layer",
            Box::new(|m| m.layers[2].placement = Placement::Cloud),
        ),
        (
            "second cloud layer not a split point",
            Box::new(|m| {
                m.layers[2].placement = Placement::Cloud;
                m.layers[2].quant = m.layers[1].quant.clone();
            }),
        ),
        ("unquantised cloud", Box::new(|m| m.layers[1].quant = None)),
        (
            "bad scale",
            Box::new(|m| {
                if let Some(q) = m.layers[1].quant.as_mut() {
                    q.input_scale = f32::NAN;
                }
            }),
        ),
        (
            "bad clip",
            Box::new(|m| {
                if let Some(q) = m.layers[1].quant.as_mut() {
                    q.input_clip = 128;
                }
            }),
        ),
        (
            "path traversal",
            Box::new(|m| m.weights.cloud.file = "../digits/cloud.safetensors".into()),
        ),
        (
            "same file twice",
            Box::new(|m| m.weights.cloud.file = m.weights.device.file.clone()),
        ),
        (
            "tensor name reused",
            Box::new(|m| m.layers[2].bias = m.layers[0].bias.clone()),
        ),
        ("classes", Box::new(|m| m.classes = 9)),
        ("split point", Box::new(|m| m.split_points = vec![2])),
        ("format", Box::new(|m| m.format = "tandem-model/99".into())),
        (
            "format v1",
            Box::new(|m| m.format = "tandem-model/1".into()),
        ),
        (
            "argmax early",
            Box::new(|m| m.layers[0].activation = tandem_model::Activation::Argmax),
        ),
        ("huge dim", Box::new(|m| m.input_dim = 1 << 40)),
    ];
    for (what, edit) in edits {
        let d = copy_bundle("digits");
        rebind_raw(&d, &dev_key(), |m| edit(m));
        let r = load(&d);
        assert!(
            matches!(r, Err(ModelError::InvalidManifest(_))),
            "{what}: {:?}",
            r.err()
        );
    }
    // Unknown fields and non-TOML are parse errors (after the signature check).
    let d = copy_bundle("digits");
    let text = std::fs::read_to_string(d.join("manifest.toml")).unwrap();
    sign_raw(&d, &format!("extra = 1\n{text}"), &dev_key());
    assert!(matches!(load(&d), Err(ModelError::ManifestParse(_))));
    sign_raw(&d, "\u{0}\u{1} not toml [[[", &dev_key());
    assert!(matches!(load(&d), Err(ModelError::ManifestParse(_))));
}

#[test]
fn corrupted_but_signed_weights_never_panic() {
    let d = copy_bundle("breast_cancer");
    let key = dev_key();
    let mut refused = 0;
    for f in ["device.safetensors", "cloud.safetensors"] {
        let w = std::fs::read(models().join("breast_cancer").join(f)).unwrap();
        // Every byte of the header and a stride through the data, each flipped in three ways.
        let header = 8 + u64::from_le_bytes(w[..8].try_into().unwrap()) as usize;
        let positions: Vec<usize> = (0..header).chain((header..w.len()).step_by(97)).collect();
        for &at in &positions {
            for mask in [0x01u8, 0x20, 0xff] {
                let mut c = w.clone();
                c[at] ^= mask;
                std::fs::write(d.join(f), &c).unwrap();
                rebind_raw(&d, &key, |_| {});
                match load(&d) {
                    Ok(b) => {
                        let x = vec![0.5f32; 30];
                        let _ = b.predict_plain(&x);
                    }
                    Err(_) => refused += 1,
                }
            }
        }
        std::fs::write(d.join(f), &w).unwrap();
    }
    assert!(refused > 0);
}

#[test]
fn each_party_needs_only_its_own_file() {
    let d = copy_bundle("digits");
    let full = load(&d).unwrap();
    std::fs::remove_file(d.join("cloud.safetensors")).unwrap();
    assert!(matches!(load(&d), Err(ModelError::Io { .. })));
    let dev = Bundle::load_part(&d, &dev_pub(), &Limits::default(), Part::Device).unwrap();
    assert_eq!(dev.digest(), full.digest());
    assert!(matches!(dev.cloud_layer(), Err(ModelError::NotLoaded(_))));
    assert!(matches!(
        dev.cloud_eval_plain(&[0; 32]),
        Err(ModelError::NotLoaded(_))
    ));
    assert!(!dev.layers()[1].is_loaded() && dev.layers()[0].is_loaded());

    let d = copy_bundle("digits");
    std::fs::remove_file(d.join("device.safetensors")).unwrap();
    let cloud = Bundle::load_part(&d, &dev_pub(), &Limits::default(), Part::Cloud).unwrap();
    assert_eq!(cloud.digest(), full.digest());
    assert_eq!(cloud.cloud_layer().unwrap(), full.cloud_layer().unwrap());
    assert!(matches!(
        cloud.device_encode(&[0.0; 64]),
        Err(ModelError::NotLoaded(_))
    ));
    assert!(matches!(
        cloud.finish_on_device(&[0; 16]),
        Err(ModelError::NotLoaded(_))
    ));

    // The two parts together reproduce the full bundle's plaintext prediction.
    let t = tandem_model::TestSet::load(&models().join("digits/test.json")).unwrap();
    for x in t.x.iter().take(50) {
        let q = dev.device_encode(x).unwrap();
        let z = cloud.cloud_eval_plain(&q).unwrap();
        assert_eq!(
            dev.finish_on_device(&z).unwrap(),
            full.predict_plain(x).unwrap()
        );
    }
}

#[test]
fn tensors_in_the_wrong_file_are_refused() {
    // Put a copy of a device tensor into the cloud file: the cloud file must hold exactly the
    // cloud layer's tensors.
    let d = copy_bundle("digits");
    let dev = std::fs::read(d.join("device.safetensors")).unwrap();
    let cl = std::fs::read(d.join("cloud.safetensors")).unwrap();
    let dst = safetensors::SafeTensors::deserialize(&dev).unwrap();
    let cst = safetensors::SafeTensors::deserialize(&cl).unwrap();
    let mut views = cst.tensors();
    views.push(("fc0.weight".into(), dst.tensor("fc0.weight").unwrap()));
    std::fs::write(
        d.join("cloud.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    rebind_raw(&d, &dev_key(), |_| {});
    assert!(matches!(load(&d), Err(ModelError::Tensor { name, .. }) if name == "fc0.weight"));
    // The library's writer refuses tensors the manifest does not name.
    let text = std::fs::read_to_string(models().join("digits/manifest.toml")).unwrap();
    let m = Manifest::from_toml(&text).unwrap();
    let extra = NamedTensor {
        name: "stray".into(),
        shape: vec![1],
        data: TensorData::F32(vec![0.0]),
    };
    let r = write_bundle(&tmpdir("stray"), &m, &[extra], &dev_key());
    assert!(matches!(r, Err(ModelError::Tensor { name, .. }) if name == "stray"));
}

#[test]
fn sign_and_verify_roundtrip_with_a_new_key() {
    let d = copy_bundle("breast_cancer");
    let keys = tmpdir("keys");
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let kf = keys.join("k.txt");
    let pf = keys.join("p.txt");
    std::fs::write(&kf, tandem_model::format_signing_key(&key, "test key")).unwrap();
    std::fs::write(
        &pf,
        tandem_model::format_verifying_key(&key.verifying_key(), "test"),
    )
    .unwrap();
    sign_bundle(&d, &kf).unwrap();
    let s = verify_bundle(&d, &pf).unwrap();
    assert_eq!(s.id, "breast-cancer-mlp");
    // The canonical manifest is unchanged, so the digest is the committed one.
    let committed = load(&models().join("breast_cancer")).unwrap();
    assert_eq!(s.digest, hex(&committed.digest()));
    // The dev key no longer verifies it.
    assert!(matches!(load(&d), Err(ModelError::BadSignature { .. })));
    // Re-signing after replacing the weights re-binds the digest.
    let w = std::fs::read(d.join("cloud.safetensors")).unwrap();
    let mut w2 = w.clone();
    let last = w2.len() - 1;
    w2[last] ^= 1; // a byte of the cloud layer's tensors
    std::fs::write(d.join("cloud.safetensors"), &w2).unwrap();
    assert!(matches!(
        verify_bundle(&d, &pf),
        Err(ModelError::DigestMismatch { .. })
    ));
    match sign_bundle(&d, &kf) {
        Ok(()) => {
            let s2 = verify_bundle(&d, &pf).unwrap();
            assert_ne!(s2.digest, s.digest);
            assert_ne!(s2.weights.cloud.sha256, s.weights.cloud.sha256);
            assert_eq!(s2.weights.device, s.weights.device);
        }
        // The signer refuses bundles that would not load (e.g. a non-finite float).
        Err(e) => assert!(matches!(e, ModelError::Tensor { .. }), "{e:?}"),
    }
}

#[test]
fn signer_refuses_invalid_bundles() {
    let d = tmpdir("bad-sign");
    let text = std::fs::read_to_string(models().join("digits/manifest.toml")).unwrap();
    let m = Manifest::from_toml(&text).unwrap();
    // No tensors at all.
    let r = write_bundle(&d, &m, &[], &dev_key());
    assert!(matches!(r, Err(ModelError::Tensor { .. })), "{r:?}");
    assert!(!d.join("manifest.sig").exists());
}

#[test]
fn key_files_are_checked() {
    let d = tmpdir("keyfiles");
    let cases = [
        ("empty", ""),
        ("short", "abcd\n"),
        ("two lines", "00\n11\n"),
        ("not hex", &"zz".repeat(32)),
    ];
    for (what, text) in cases {
        let p = d.join(what);
        std::fs::write(&p, text).unwrap();
        assert!(
            matches!(
                tandem_model::read_signing_key(&p),
                Err(ModelError::KeyFormat { .. })
            ),
            "{what}"
        );
    }
    assert!(matches!(
        tandem_model::read_verifying_key(&d.join("missing")),
        Err(ModelError::Io { .. })
    ));
    // The dev verifying key matches the dev signing key.
    assert_eq!(dev_key().verifying_key(), dev_pub());
}

/// Issue 12 item 8: every bundle file, damaged, truncated, zero-filled or foreign, gives a
/// typed error whose message names the file concerned (never a panic).
#[test]
fn damaged_bundle_files_name_the_file() {
    type Damage = fn(Vec<u8>) -> Vec<u8>;
    let damages: [(&str, Damage); 4] = [
        ("zero-filled", |b| vec![0u8; b.len()]),
        ("truncated", |b| b[..b.len() / 2].to_vec()),
        ("empty", |_| Vec::new()),
        ("foreign", |b| {
            let mut f = b"\x89PNG\r\n\x1a\n".to_vec();
            f.resize(b.len(), 0xAB);
            f
        }),
    ];
    for f in [
        "manifest.toml",
        "manifest.sig",
        "device.safetensors",
        "cloud.safetensors",
    ] {
        for (what, damage) in damages {
            let d = copy_bundle("digits");
            let p = d.join(f);
            std::fs::write(&p, damage(std::fs::read(&p).unwrap())).unwrap();
            let e = match load(&d) {
                Err(e) => e,
                Ok(_) => panic!("{f} {what}: loaded"),
            };
            let msg = e.to_string();
            assert!(
                msg.contains(p.to_str().unwrap()),
                "{f} {what}: message does not name the file: {msg}"
            );
        }
    }
}

#[test]
fn the_development_key_is_recognised() {
    assert!(tandem_model::is_dev_key(&dev_pub()));
    assert_eq!(
        tandem_model::dev_signing_key().to_bytes(),
        dev_key().to_bytes()
    );
    assert!(!tandem_model::is_dev_key(
        &SigningKey::from_bytes(&[7u8; 32]).verifying_key()
    ));
}
