//! Encoder bundles (issue 8): a tiny encoder graph signs, loads and splits its tensors by
//! party; inconsistent graphs and tensor sets give typed errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use tandem_model::{
    write_bundle, Bundle, CloudLinear, EncoderSpec, GraphError, Limits, Manifest, ModelError,
    NamedTensor, OpSpec, Part, Placement, SigningKey, TensorData, WeightsRef,
};

const H: usize = 4;

fn linear(name: &str, n_in: usize, n_out: usize) -> CloudLinear {
    CloudLinear {
        name: name.into(),
        n_in,
        n_out,
        weight: format!("{name}.w"),
        scales: format!("{name}.s"),
        bias: format!("{name}.b"),
        input_bound: 127,
        weight_bound: 127,
        bias_bound: 0,
        max_row_l1: None,
        max_row_sq: None,
    }
}

/// embedding → ln → qkv (cloud) → attention → o (cloud) → add → gelu → mean_pool → l2.
fn manifest(tokenizer_sha: &str) -> Manifest {
    let mut ops = vec![OpSpec::device("embedding", &[], "e")];
    ops[0].tensors = vec!["word".into(), "pos".into(), "type".into()];
    let mut ln = OpSpec::device("layer_norm", &["e"], "x");
    ln.tensors = vec!["ln.g".into(), "ln.b".into()];
    ln.eps = Some(1e-12);
    ops.push(ln);
    let mut qkv = OpSpec::device("linear", &["x"], "qkv");
    qkv.placement = Placement::Cloud;
    qkv.linear = Some(0);
    ops.push(qkv);
    let mut att = OpSpec::device("attention", &["qkv"], "ctx");
    att.heads = Some(2);
    ops.push(att);
    let mut o = OpSpec::device("linear", &["ctx"], "o");
    o.placement = Placement::Cloud;
    o.linear = Some(1);
    ops.push(o);
    ops.push(OpSpec::device("add", &["o", "x"], "r"));
    ops.push(OpSpec::device("gelu", &["r"], "g"));
    ops.push(OpSpec::device("mean_pool", &["g"], "p"));
    ops.push(OpSpec::device("l2_normalize", &["p"], "out"));
    Manifest::for_encoder(
        "tiny-encoder",
        "1",
        "none",
        EncoderSpec {
            hidden: H,
            max_tokens: 8,
            batch: 8,
            vocab_size: 10,
            max_position_embeddings: 8,
            type_vocab_size: 2,
            tokenizer: WeightsRef {
                file: "tokenizer.json".into(),
                sha256: tokenizer_sha.into(),
                bytes: 2,
            },
            linears: vec![linear("qkv", H, 3 * H), linear("o", H, H)],
            ops,
            output: "out".into(),
            link_kbit_s: None,
            max_bodies: None,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn f32t(name: &str, shape: &[usize]) -> NamedTensor {
    let n = shape.iter().product::<usize>();
    NamedTensor {
        name: name.into(),
        shape: shape.to_vec(),
        data: TensorData::F32((0..n).map(|i| 0.25 + (i % 7) as f32 * 0.1).collect()),
    }
}

fn tensors() -> Vec<NamedTensor> {
    let mut t = vec![
        f32t("word", &[10, H]),
        f32t("pos", &[8, H]),
        f32t("type", &[2, H]),
        f32t("ln.g", &[H]),
        f32t("ln.b", &[H]),
    ];
    for (name, n_in, n_out) in [("qkv", H, 3 * H), ("o", H, H)] {
        t.push(NamedTensor {
            name: format!("{name}.w"),
            shape: vec![n_out, n_in],
            data: TensorData::I8((0..n_in * n_out).map(|i| (i % 200) as i8 - 100).collect()),
        });
        t.push(f32t(&format!("{name}.s"), &[n_out]));
        t.push(f32t(&format!("{name}.b"), &[n_out]));
    }
    t
}

fn sha_hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let d = <sha2::Sha256 as sha2::Digest>::digest(b);
    d.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn write(dir: &std::path::Path, m: &Manifest, t: &[NamedTensor]) -> Result<(), ModelError> {
    std::fs::write(dir.join("tokenizer.json"), b"{}").map_err(|e| ModelError::Io {
        path: dir.into(),
        source: e,
    })?;
    write_bundle(dir, m, t, &key())
}

fn enc(m: &mut Manifest) -> &mut EncoderSpec {
    m.encoder.as_mut().unwrap_or_else(|| panic!("encoder"))
}

fn graph_err(m: &Manifest) -> GraphError {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    match write(dir.path(), m, &tensors()) {
        Err(ModelError::Graph(g)) => g,
        other => panic!("expected a graph error, got {other:?}"),
    }
}

#[test]
fn encoder_bundle_loads_each_part_with_its_own_tensors() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let m = manifest(&sha_hex(b"{}"));
    write(dir.path(), &m, &tensors()).unwrap_or_else(|e| panic!("{e}"));
    let vk = key().verifying_key();
    let cloud = Bundle::load_part(dir.path(), &vk, &Limits::default(), Part::Cloud)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cloud.cloud_indices(), &[0, 1]);
    let cl = cloud.cloud_layers().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((cl[0].n_in, cl[0].n_out, cl[0].bias_bound), (H, 3 * H, 0));
    assert!(
        cloud.device_tensor("word").is_err(),
        "the cloud holds no device tensor"
    );
    assert!(cloud.tokenizer_json().is_err());
    let dev = Bundle::load_part(dir.path(), &vk, &Limits::default(), Part::Device)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        dev.device_tensor("word").map(<[f32]>::len).ok(),
        Some(10 * H)
    );
    assert_eq!(dev.tokenizer_json().ok(), Some(&b"{}"[..]));
    assert!(
        dev.cloud_layers().is_err(),
        "the device holds no int8 weights"
    );
    // The dense pipeline refuses an encoder instead of indexing layers it does not have.
    assert!(matches!(
        dev.start(&[0.0; 8]),
        Err(ModelError::InvalidInput(_))
    ));
    // The exact integer product of a cloud layer (what the cloud does for a noised request).
    let z = cloud
        .cloud_eval_plain_at(1, &[1, 0, 0, 0])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(z, cl[1].weights.chunks(H).map(|r| r[0]).collect::<Vec<_>>());
}

#[test]
fn tampered_tokenizer_is_refused_by_digest() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    write(dir.path(), &manifest(&sha_hex(b"{}")), &tensors()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("tokenizer.json"), b"[]").unwrap_or_else(|e| panic!("{e}"));
    let vk = key().verifying_key();
    let r = Bundle::load_part(dir.path(), &vk, &Limits::default(), Part::Device);
    assert!(matches!(r, Err(ModelError::DigestMismatch { .. })), "{r:?}");
}

#[test]
fn graph_faults_are_typed() {
    let base = manifest(&sha_hex(b"{}"));
    // Cycle: the add reads a value defined later.
    let mut m = base.clone();
    enc(&mut m).ops[5].inputs = vec!["g".into(), "x".into()];
    assert!(matches!(graph_err(&m), GraphError::Cycle { op: 5, .. }));
    // Undefined value.
    let mut m = base.clone();
    enc(&mut m).ops[6].inputs = vec!["nope".into()];
    assert!(matches!(graph_err(&m), GraphError::Undefined { op: 6, .. }));
    // Unknown op.
    let mut m = base.clone();
    enc(&mut m).ops[6].op = "softplus".into();
    assert!(matches!(graph_err(&m), GraphError::UnknownOp { op: 6, .. }));
    // A non-linear op in the cloud.
    let mut m = base.clone();
    enc(&mut m).ops[6].placement = Placement::Cloud;
    assert!(matches!(graph_err(&m), GraphError::Placement { op: 6, .. }));
    // Shape mismatch: the output projection declared 3H wide.
    let mut m = base.clone();
    enc(&mut m).linears[1].n_in = 3 * H;
    assert!(matches!(graph_err(&m), GraphError::Shape { op: 4, .. }));
    // Attention heads not dividing the width.
    let mut m = base.clone();
    enc(&mut m).ops[3].heads = Some(3);
    assert!(matches!(graph_err(&m), GraphError::Shape { op: 3, .. }));
}

#[test]
fn missing_or_extra_tensors_are_typed() {
    let m = manifest(&sha_hex(b"{}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut t = tensors();
    t.retain(|t| t.name != "ln.b");
    let r = write(dir.path(), &m, &t);
    assert!(
        matches!(&r, Err(ModelError::Tensor { name, .. }) if name == "ln.b"),
        "{r:?}"
    );
    let mut t = tensors();
    t.push(f32t("stray", &[1]));
    let r = write(dir.path(), &m, &t);
    assert!(
        matches!(&r, Err(ModelError::Tensor { name, .. }) if name == "stray"),
        "{r:?}"
    );
    // A tensor of the wrong shape.
    let mut t = tensors();
    t[3] = f32t("ln.g", &[H + 1]);
    let r = write(dir.path(), &m, &t);
    assert!(
        matches!(&r, Err(ModelError::Tensor { name, .. }) if name == "ln.g"),
        "{r:?}"
    );
}

/// Issue 9 knobs: the link rate and the row bounds are signed with the `[encoder]` section,
/// survive the round trip through manifest.toml, and zero or overflowing values are refused.
#[test]
fn signed_plan_knobs_round_trip_and_bad_values_are_typed() {
    let mut m = manifest(&sha_hex(b"{}"));
    enc(&mut m).link_kbit_s = Some(2_000);
    enc(&mut m).max_bodies = Some(4);
    // Row bounds of the tiny weights (|w| <= 100, 4 per row).
    enc(&mut m).linears[0].max_row_l1 = Some(400);
    enc(&mut m).linears[0].max_row_sq = Some(40_000);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    write(dir.path(), &m, &tensors()).unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(dir.path().join("manifest.toml")).unwrap();
    assert!(text.contains("link_kbit_s = 2000"), "{text}");
    assert!(text.contains("max_row_l1 = 400"), "{text}");
    let vk = key().verifying_key();
    let b = Bundle::load_part(dir.path(), &vk, &Limits::default(), Part::Cloud)
        .unwrap_or_else(|e| panic!("{e}"));
    let e = b.encoder().unwrap_or_else(|| panic!("encoder"));
    assert_eq!(e.link_kbit_per_s(), 2_000);
    assert_eq!(e.max_bodies(), 4);
    assert!(text.contains("max_bodies = 4"), "{text}");
    assert_eq!(
        e.linears[0].plan_bounds(),
        (127, Some(400), Some(40_000), 0)
    );
    assert_eq!(e.linears[1].plan_bounds(), (127, None, None, 0));
    // Absent knobs: the default link and the entry bounds, and nothing new in the file.
    let base = manifest(&sha_hex(b"{}"));
    assert_eq!(base.encoder.as_ref().unwrap().link_kbit_per_s(), 25_000);
    assert_eq!(base.encoder.as_ref().unwrap().max_bodies(), 1);
    let plain = toml::to_string(&base).unwrap();
    assert!(
        !plain.contains("link_kbit_s")
            && !plain.contains("max_row")
            && !plain.contains("max_bodies"),
        "{plain}"
    );
    // The signature covers the knobs: editing the rate in manifest.toml breaks it.
    std::fs::write(
        dir.path().join("manifest.toml"),
        text.replace("link_kbit_s = 2000", "link_kbit_s = 2001"),
    )
    .unwrap();
    assert!(Bundle::load_part(dir.path(), &vk, &Limits::default(), Part::Cloud).is_err());
    // Zero / overflowing values are typed graph errors naming the field.
    type Edit = fn(&mut EncoderSpec);
    let bad: [(&str, Edit); 7] = [
        ("link_kbit_s", |e| e.link_kbit_s = Some(0)),
        ("max_bodies", |e| e.max_bodies = Some(0)),
        ("max_bodies", |e| e.max_bodies = Some(9)),
        ("link_kbit_s", |e| e.link_kbit_s = Some(u32::MAX)),
        ("max_row_l1", |e| e.linears[1].max_row_l1 = Some(0)),
        ("max_row_l1", |e| {
            e.linears[1].max_row_l1 = Some(4 * 127 + 1)
        }),
        ("max_row_sq", |e| e.linears[0].max_row_sq = Some(u64::MAX)),
    ];
    for (field, f) in bad {
        let mut m = manifest(&sha_hex(b"{}"));
        f(enc(&mut m));
        match graph_err(&m) {
            GraphError::Invalid(msg) => assert!(msg.contains(field), "{msg}"),
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
}
