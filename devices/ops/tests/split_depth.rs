//! Issue 10, TDM-SPLIT-1: split depth on a small synthetic encoder bundle (3 blocks, always
//! runs). At every depth `k` the embedding equals the integer pipeline bit for bit, exactly the
//! linears of blocks `>= k` are sent to the cloud, and a device without the int8 weights (the
//! bundle's device part only) can run depth 0 only and refuses the others with a typed error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use tandem_he::{Context, EvalOptions, LayerPlan, OutputMode, DEFAULT_PARAMETERS};
use tandem_model::{
    write_bundle, Bundle, CloudLinear, EncoderSpec, Limits, Manifest, NamedTensor, OpSpec, Part,
    Placement, SigningKey, TensorData, WeightsRef,
};
use tandem_ops::{
    BundleEncoder, BundleLinears, CloudLayers, Encoded, InProcessCloud, OpsError, QuantizedWeights,
    SplitProfile,
};

const H: usize = 8;
const FF: usize = 16;
const BLOCKS: usize = 3;
const BATCH: usize = 4;
const VOCAB: usize = 12;
const MAX_TOKENS: usize = 8;

const TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"[UNK]":0,"the":1,"device":2,"keeps":3,"its":4,"data":5,
"cloud":6,"sees":7,"nothing":8,"private":9,"split":10,"model":11},"unk_token":"[UNK]"}}"#;

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

/// `(name, in, out)` of every linear, in execution order: per block fused QKV, attention
/// output, FFN in, FFN out.
fn linears() -> Vec<(String, usize, usize)> {
    let mut v = Vec::new();
    for b in 0..BLOCKS {
        v.push((format!("l{b}.qkv"), H, 3 * H));
        v.push((format!("l{b}.o"), H, H));
        v.push((format!("l{b}.f1"), H, FF));
        v.push((format!("l{b}.f2"), FF, H));
    }
    v
}

fn manifest() -> Manifest {
    let mut ops = vec![OpSpec::device("embedding", &[], "e")];
    ops[0].tensors = vec!["word".into(), "pos".into(), "type".into()];
    let ln = |input: &str, output: &str, t: &str| {
        let mut o = OpSpec::device("layer_norm", &[input], output);
        o.tensors = vec![format!("{t}.g"), format!("{t}.b")];
        o.eps = Some(1e-12);
        o
    };
    ops.push(ln("e", "x0", "ln"));
    let mut index = 0;
    let mut lin = |ops: &mut Vec<OpSpec>, input: &str, output: &str| {
        let mut l = OpSpec::device("linear", &[input], output);
        l.placement = Placement::Cloud;
        l.linear = Some(index);
        index += 1;
        ops.push(l);
    };
    for b in 0..BLOCKS {
        let v = |s: &str| format!("b{b}.{s}");
        let x = format!("x{b}");
        lin(&mut ops, &x, &v("qkv"));
        let mut att = OpSpec::device("attention", &[&v("qkv")], &v("ctx"));
        att.heads = Some(2);
        ops.push(att);
        lin(&mut ops, &v("ctx"), &v("o"));
        ops.push(OpSpec::device("add", &[&v("o"), &x], &v("r1")));
        ops.push(ln(&v("r1"), &v("y"), &format!("l{b}.ln1")));
        lin(&mut ops, &v("y"), &v("f1"));
        ops.push(OpSpec::device("gelu", &[&v("f1")], &v("g")));
        lin(&mut ops, &v("g"), &v("f2"));
        ops.push(OpSpec::device("add", &[&v("f2"), &v("y")], &v("r2")));
        ops.push(ln(&v("r2"), &format!("x{}", b + 1), &format!("l{b}.ln2")));
    }
    ops.push(OpSpec::device("mean_pool", &[&format!("x{BLOCKS}")], "p"));
    ops.push(OpSpec::device("l2_normalize", &["p"], "out"));
    let digest = {
        use sha2::Digest;
        hex(&sha2::Sha256::digest(TOKENIZER.as_bytes()))
    };
    Manifest::for_encoder(
        "tiny-split-encoder",
        "1",
        "none",
        EncoderSpec {
            hidden: H,
            max_tokens: MAX_TOKENS,
            batch: BATCH,
            vocab_size: VOCAB,
            max_position_embeddings: MAX_TOKENS,
            type_vocab_size: 2,
            tokenizer: WeightsRef {
                file: "tokenizer.json".into(),
                sha256: digest,
                bytes: TOKENIZER.len() as u64,
            },
            linears: linears()
                .iter()
                .map(|(n, i, o)| linear(n, *i, *o))
                .collect(),
            ops,
            output: "out".into(),
            link_kbit_s: None,
            max_bodies: None,
        },
    )
    .unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Deterministic values in `[-1, 1)`.
fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn f32t(name: &str, shape: &[usize], seed: u64, offset: f32, scale: f32) -> NamedTensor {
    let n = shape.iter().product::<usize>();
    NamedTensor {
        name: name.into(),
        shape: shape.to_vec(),
        data: TensorData::F32(lcg(seed, n).iter().map(|v| offset + scale * v).collect()),
    }
}

fn write(dir: &std::path::Path, key: &SigningKey) {
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER).unwrap();
    let mut t = vec![
        f32t("word", &[VOCAB, H], 1, 0.0, 1.0),
        f32t("pos", &[MAX_TOKENS, H], 2, 0.0, 0.5),
        f32t("type", &[2, H], 3, 0.0, 0.5),
        f32t("ln.g", &[H], 4, 1.0, 0.2),
        f32t("ln.b", &[H], 5, 0.0, 0.1),
    ];
    for b in 0..BLOCKS {
        for ln in ["ln1", "ln2"] {
            t.push(f32t(&format!("l{b}.{ln}.g"), &[H], 6 + b as u64, 1.0, 0.2));
            t.push(f32t(&format!("l{b}.{ln}.b"), &[H], 9 + b as u64, 0.0, 0.1));
        }
    }
    for (seed, (name, n_in, n_out)) in linears().into_iter().enumerate() {
        let seed = 100 + 3 * seed as u64;
        t.push(NamedTensor {
            name: format!("{name}.w"),
            shape: vec![n_out, n_in],
            data: TensorData::I8(
                lcg(seed, n_in * n_out)
                    .iter()
                    .map(|v| (v * 127.0) as i8)
                    .collect(),
            ),
        });
        // Scales near 1/(127 · sqrt(in)) keep activations of order 1.
        let s = 1.0 / (127.0 * (n_in as f32).sqrt());
        t.push(f32t(
            &format!("{name}.s"),
            &[n_out],
            seed + 1,
            1.5 * s,
            0.5 * s,
        ));
        t.push(f32t(&format!("{name}.b"), &[n_out], seed + 2, 0.0, 0.05));
    }
    write_bundle(dir, &manifest(), &t, key).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    full: Bundle,
    device: Bundle,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[7u8; 32]);
    write(dir.path(), &key);
    let vk = key.verifying_key();
    let full = Bundle::load_part(dir.path(), &vk, &Limits::default(), Part::Full).unwrap();
    let device = Bundle::load_part(dir.path(), &vk, &Limits::default(), Part::Device).unwrap();
    Fixture {
        _dir: dir,
        full,
        device,
    }
}

fn encrypted(b: &Bundle) -> (BundleEncoder, Arc<InProcessCloud>) {
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    let cloud = Arc::new(InProcessCloud::new(ctx.clone(), EvalOptions::default()));
    let enc = BundleEncoder::from_bundle(
        b,
        BundleLinears::Encrypted {
            ctx,
            mode: OutputMode::Packed,
            cloud: cloud.clone(),
        },
    )
    .unwrap();
    assert!(enc.upload_key().unwrap() > 0);
    (enc, cloud)
}

fn sentence(tokens: usize) -> Encoded {
    Encoded {
        ids: (0..tokens).map(|i| (1 + i % (VOCAB - 1)) as u32).collect(),
        type_ids: vec![0; tokens],
        mask: vec![true; tokens],
    }
}

#[test]
fn every_split_depth_equals_the_integer_pipeline_and_offloads_only_later_blocks() {
    let f = fixture();
    let integer = BundleEncoder::from_bundle(&f.full, BundleLinears::Integer).unwrap();
    assert_eq!(integer.blocks(), BLOCKS);
    assert_eq!(
        integer.split(),
        BLOCKS,
        "the integer path runs everything on the device"
    );
    assert_eq!(integer.split_depths(), vec![BLOCKS]);
    let blocks: Vec<usize> = (0..integer.linear_count())
        .map(|i| integer.block_of(i).unwrap())
        .collect();
    assert_eq!(blocks, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);

    let (mut enc, _cloud) = encrypted(&f.full);
    assert_eq!(
        enc.split(),
        0,
        "the encrypted path offloads everything by default"
    );
    assert_eq!(enc.split_depths(), (0..=BLOCKS).collect::<Vec<_>>());
    let session = enc.session().unwrap();
    // 6 tokens = two requests of at most 4 rows per offloaded linear.
    for tokens in [3, 6] {
        let e = sentence(tokens);
        let reference = integer.embed_encoded(&e).unwrap();
        assert!(reference.iter().all(|v| v.is_finite()));
        let mut seen = Vec::new();
        for k in 0..=BLOCKS {
            session.reset_stats();
            let y = enc.embed_encoded_split(&e, k).unwrap();
            assert_eq!(
                y.to_vec(),
                reference.to_vec(),
                "split depth {k}, {tokens} tokens: not the integer pipeline's embedding"
            );
            let s = session.stats();
            let (requests, up, down) = enc.offload_volume(tokens, k);
            let per_linear = tokens.div_ceil(BATCH) as u64;
            assert_eq!(requests, 4 * (BLOCKS - k) as u64 * per_linear, "k = {k}");
            assert_eq!(
                (s.requests, s.bytes_up, s.bytes_down),
                (requests, up, down),
                "k = {k}: the cloud saw other requests than the planned volume"
            );
            seen.push(up);
        }
        assert!(seen.windows(2).all(|w| w[0] > w[1]), "{seen:?}");
        assert_eq!(seen.last(), Some(&0), "k = all blocks sends nothing");
    }
    // The default depth follows set_split; the tokenizer path gives the same as ids.
    enc.set_split(2).unwrap();
    assert_eq!(enc.split(), 2);
    let text = "the device keeps its data private";
    assert_eq!(
        enc.embed(text).unwrap().to_vec(),
        integer.embed(text).unwrap().to_vec()
    );
    assert!(matches!(
        enc.set_split(BLOCKS + 1),
        Err(OpsError::Split {
            requested: 4,
            blocks: 3,
            ..
        })
    ));
}

/// A cloud that already holds the weights (as a remote cloud does from its bundle): `load`
/// only acknowledges; evaluation and the key go to the in-process cloud loaded from the full
/// bundle.
struct Preloaded(Arc<InProcessCloud>);

impl CloudLayers for Preloaded {
    fn load(&self, index: usize, plan: &LayerPlan, _: &QuantizedWeights) -> Result<(), OpsError> {
        assert_eq!(self.0.layer_plan(index).unwrap(), *plan);
        Ok(())
    }
    fn upload_key(&self, key: &[u8]) -> Result<(), OpsError> {
        self.0.upload_key(key)
    }
    fn evaluate(&self, index: usize, request: &[u8]) -> Result<Vec<u8>, OpsError> {
        self.0.evaluate(index, request)
    }
}

#[test]
fn a_device_without_the_int8_weights_only_offloads() {
    let f = fixture();
    let (_full, cloud) = encrypted(&f.full);
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    let mut enc = BundleEncoder::from_bundle(
        &f.device,
        BundleLinears::Encrypted {
            ctx,
            mode: OutputMode::Packed,
            cloud: Arc::new(Preloaded(cloud)),
        },
    )
    .unwrap();
    enc.upload_key().unwrap();
    assert_eq!(enc.split_depths(), vec![0]);
    let e = sentence(4);
    for k in 1..=BLOCKS {
        let err = enc.embed_encoded_split(&e, k).unwrap_err();
        assert!(
            matches!(err, OpsError::Split { requested, blocks: BLOCKS, .. } if requested == k),
            "{err}"
        );
        assert!(err.to_string().contains("Part::Full"), "{err}");
        assert!(enc.set_split(k).is_err());
    }
    assert_eq!(enc.split(), 0);
    let integer = BundleEncoder::from_bundle(&f.full, BundleLinears::Integer).unwrap();
    assert_eq!(
        enc.embed_encoded(&e).unwrap().to_vec(),
        integer.embed_encoded(&e).unwrap().to_vec()
    );
    // The integer path cannot offload.
    let err = integer.embed_encoded_split(&e, 0).unwrap_err();
    assert!(
        err.to_string().contains("BundleLinears::Encrypted"),
        "{err}"
    );
}

#[test]
fn the_profile_prices_every_linear_and_round_trips_through_its_file() {
    let f = fixture();
    let (enc, _cloud) = encrypted(&f.full);
    let e = sentence(6);
    let p = enc.profile(&e, 2, "tiny-split-encoder", "00", 123).unwrap();
    assert_eq!((p.tokens, p.blocks, p.batch, p.reps), (6, BLOCKS, BATCH, 2));
    assert_eq!(p.linears.len(), 12);
    let plans = enc.plans();
    for l in &p.linears {
        assert_eq!(l.block, l.index / 4);
        assert_eq!(l.requests, 2);
        let plan = plans[l.index];
        assert_eq!(
            l.upload_bytes,
            (plan.upload_bytes(4) + plan.upload_bytes(2)) as u64
        );
        assert_eq!(
            l.download_bytes,
            (plan.download_bytes(4) + plan.download_bytes(2)) as u64
        );
        assert_eq!(l.macs, (6 * l.n_in * l.n_out) as u64);
        assert!(l.local_ms > 0.0 && l.encrypt_ms > 0.0 && l.decrypt_ms > 0.0 && l.cloud_ms > 0.0);
    }
    let ops: Vec<&str> = p.ops.iter().map(|o| o.op.as_str()).collect();
    assert_eq!(ops.iter().filter(|o| **o == "attention").count(), BLOCKS);
    assert_eq!(p.ops.len() + 12, 2 + BLOCKS * 10 + 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("profile.json");
    p.write(&path).unwrap();
    let back = SplitProfile::read(&path).unwrap();
    assert_eq!((back.tokens, back.blocks, back.key_bytes), (6, BLOCKS, 123));
    for (a, b) in back.linears.iter().zip(&p.linears) {
        assert_eq!(
            (
                a.index,
                a.block,
                a.requests,
                a.upload_bytes,
                a.download_bytes
            ),
            (
                b.index,
                b.block,
                b.requests,
                b.upload_bytes,
                b.download_bytes
            )
        );
        assert!((a.cloud_ms - b.cloud_ms).abs() <= 1e-9 * b.cloud_ms.max(1.0));
    }
    assert!((back.ops_ms() - p.ops_ms()).abs() <= 1e-9);
    std::fs::write(&path, b"{\"format\": 1}").unwrap();
    assert!(matches!(
        SplitProfile::read(&path),
        Err(OpsError::Config { .. })
    ));
}
