//! Model files are untrusted: damaged, truncated, foreign or oversized files give typed errors
//! naming the file, never a panic; and every linear layer goes through the caller's factory.
//! Uses a tiny synthetic BERT (vocab 10, H 4, 1 layer, 2 heads, FFN 8) and WordPiece tokenizer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use tandem_ops::{
    BertConfig, BertModel, Checkpoint, FloatLinears, Linear, LinearFactory, LinearSpec, OpsError,
    SentenceEncoder,
};

mod common;
use common::tiny::{layout, write_model_dir, CONFIG, TOKENIZER};

fn config() -> BertConfig {
    serde_json::from_str(CONFIG).unwrap()
}

/// Serialises the tiny checkpoint; `edit` may change a tensor's dtype, shape or values.
fn checkpoint_with(edit: impl Fn(&str, &mut Dtype, &mut Vec<usize>, &mut Vec<u8>)) -> Vec<u8> {
    let mut owned = Vec::new();
    for (k, (name, shape)) in layout(true).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut bytes: Vec<u8> = (0..n)
            .flat_map(|i| (0.3 * ((k * 31 + i) as f32).sin()).to_le_bytes())
            .collect();
        let (mut dtype, mut shape) = (Dtype::F32, shape);
        edit(&name, &mut dtype, &mut shape, &mut bytes);
        owned.push((name, dtype, shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn checkpoint() -> Vec<u8> {
    checkpoint_with(|_, _, _, _| {})
}

fn load(bytes: Vec<u8>) -> Result<BertModel, OpsError> {
    let c = Checkpoint::from_bytes(PathBuf::from("tiny.safetensors"), bytes);
    let t = c.tensors()?;
    BertModel::load(&t, config(), &mut FloatLinears)
}

fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), &checkpoint());
    dir
}

#[test]
fn tiny_model_runs_and_every_truncation_is_refused() {
    let bytes = checkpoint();
    let model = load(bytes.clone()).unwrap();
    let y = model.forward(&[2, 4, 5, 3], &[0; 4], &[true; 4]).unwrap();
    assert_eq!(y.dim(), (4, 4));
    assert!(y.iter().all(|v| v.is_finite()));
    for len in 0..bytes.len() {
        let r = load(bytes[..len].to_vec());
        assert!(
            matches!(r, Err(OpsError::SafeTensors { .. })),
            "prefix of {len} bytes"
        );
    }
}

#[test]
fn rewritten_header_bytes_never_panic() {
    let bytes = checkpoint();
    let header_len = usize::try_from(u64::from_le_bytes(bytes[..8].try_into().unwrap())).unwrap();
    let mut refused = 0;
    for i in 0..8 + header_len {
        for v in [0u8, b'9', b'"', 0xff] {
            let mut b = bytes.clone();
            b[i] = v;
            if load(b).is_err() {
                refused += 1;
            }
        }
    }
    // Most single-byte rewrites break the header; none may panic (reaching here proves it).
    assert!(
        refused > header_len,
        "{refused} refused of {}",
        4 * (8 + header_len)
    );
}

#[test]
fn foreign_bytes_are_refused() {
    for bytes in [
        Vec::new(),
        vec![0u8; 64],
        b"{\"hidden_size\": 4}".to_vec(),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect(),
        u64::MAX.to_le_bytes().to_vec(),
    ] {
        assert!(matches!(load(bytes), Err(OpsError::SafeTensors { .. })));
    }
}

#[test]
fn wrong_tensors_give_typed_errors() {
    // The checkpoint holds layer 0 only; a config asking for two layers misses layer 1.
    let c = Checkpoint::from_bytes(PathBuf::from("tiny.safetensors"), checkpoint());
    let t = c.tensors().unwrap();
    let mut short_cfg = config();
    short_cfg.num_hidden_layers = 2; // layer 1 is absent
    match BertModel::load(&t, short_cfg, &mut FloatLinears) {
        Err(OpsError::MissingTensor { path, tensor }) => {
            assert_eq!(path, Path::new("tiny.safetensors"));
            assert_eq!(tensor, "encoder.layer.1.attention.self.query.weight");
        }
        other => panic!("{:?}", other.err()),
    }

    let f64s = checkpoint_with(|name, dtype, shape, bytes| {
        if name == "embeddings.LayerNorm.weight" {
            *dtype = Dtype::F64;
            shape[0] = 2;
            let _ = bytes;
        }
    });
    assert!(
        matches!(load(f64s), Err(OpsError::TensorDtype { tensor, .. }) if tensor == "embeddings.LayerNorm.weight")
    );

    let reshaped = checkpoint_with(|name, _, shape, _| {
        if name == "encoder.layer.0.intermediate.dense.weight" {
            *shape = vec![4, 8];
        }
    });
    match load(reshaped) {
        Err(OpsError::TensorShape {
            tensor,
            expected,
            found,
            ..
        }) => {
            assert_eq!(tensor, "encoder.layer.0.intermediate.dense.weight");
            assert_eq!((expected, found), (vec![8, 4], vec![4, 8]));
        }
        other => panic!("{:?}", other.err()),
    }

    let nan = checkpoint_with(|name, _, _, bytes| {
        if name == "encoder.layer.0.output.dense.weight" {
            bytes[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        }
    });
    assert!(
        matches!(load(nan), Err(OpsError::NonFinite { tensor, .. }) if tensor == "encoder.layer.0.output.dense.weight")
    );
}

#[test]
fn oversized_files_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, checkpoint()).unwrap();
    assert!(matches!(
        Checkpoint::open_with_limit(&path, 100),
        Err(OpsError::FileTooLarge { limit: 100, .. })
    ));
    // A sparse 2 GiB file: refused from its metadata, nothing allocated.
    let huge = dir.path().join("huge.safetensors");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    assert!(matches!(
        Checkpoint::open(&huge),
        Err(OpsError::FileTooLarge { size, .. }) if size == 2 << 30
    ));
    assert!(matches!(
        Checkpoint::open(&dir.path().join("absent")),
        Err(OpsError::Io { .. })
    ));
}

#[test]
fn bad_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    for (edit, what) in [
        (CONFIG.replace("\"gelu\"", "\"relu\""), "hidden_act"),
        (
            CONFIG.replace("\"num_attention_heads\":2", "\"num_attention_heads\":3"),
            "does not divide",
        ),
        (
            CONFIG.replace("\"vocab_size\":10", "\"vocab_size\":0"),
            "vocab_size",
        ),
        (
            CONFIG.replace("\"absolute\"", "\"relative_key\""),
            "position_embedding_type",
        ),
        (CONFIG.replace("1e-12", "-1"), "layer_norm_eps"),
    ] {
        std::fs::write(&path, edit).unwrap();
        match BertConfig::from_file(&path) {
            Err(OpsError::InvalidConfig { path: p, reason }) => {
                assert_eq!(p, path);
                assert!(reason.contains(what), "{reason}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    std::fs::write(&path, &CONFIG[..40]).unwrap();
    assert!(matches!(
        BertConfig::from_file(&path),
        Err(OpsError::Config { .. })
    ));
    std::fs::write(&path, CONFIG).unwrap();
    assert_eq!(BertConfig::from_file(&path).unwrap(), config());
}

/// Records the name of every layer it builds, and can make them fail or misreport their shape.
struct Recording {
    names: Vec<String>,
    fail_forward: bool,
    wrong_shape: bool,
}

struct Failing(String, usize, usize);

impl Linear for Failing {
    fn name(&self) -> &str {
        &self.0
    }
    fn in_features(&self) -> usize {
        self.1
    }
    fn out_features(&self) -> usize {
        self.2
    }
    fn forward(&self, _: ArrayView2<'_, f32>) -> Result<Array2<f32>, OpsError> {
        Err(OpsError::Linear {
            layer: self.0.clone(),
            source: "cloud unreachable".into(),
        })
    }
}

impl LinearFactory for Recording {
    fn build(&mut self, spec: LinearSpec) -> Result<Box<dyn Linear>, OpsError> {
        self.names.push(spec.name.clone());
        let (out, inp) = spec.weight.dim();
        if self.wrong_shape {
            return Ok(Box::new(Failing(spec.name, inp + 1, out)));
        }
        if self.fail_forward {
            return Ok(Box::new(Failing(spec.name, inp, out)));
        }
        FloatLinears.build(spec)
    }
}

#[test]
fn every_linear_layer_goes_through_the_factory() {
    let bytes = checkpoint();
    let c = Checkpoint::from_bytes(PathBuf::from("tiny.safetensors"), bytes);
    let t = c.tensors().unwrap();
    let mut f = Recording {
        names: Vec::new(),
        fail_forward: false,
        wrong_shape: false,
    };
    let model = BertModel::load(&t, config(), &mut f).unwrap();
    let p = "encoder.layer.0";
    let expected: Vec<String> = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    .iter()
    .map(|n| format!("{p}.{n}"))
    .collect();
    assert_eq!(f.names, expected);
    let listed: Vec<&str> = model.linears().iter().map(|l| l.name()).collect();
    assert_eq!(listed, expected);

    // A backend failure surfaces as the layer's typed error.
    f.fail_forward = true;
    let model = BertModel::load(&t, config(), &mut f).unwrap();
    match model.forward(&[2, 4, 3], &[0; 3], &[true; 3]) {
        Err(OpsError::Linear { layer, .. }) => {
            assert_eq!(layer, format!("{p}.attention.self.query"))
        }
        other => panic!("{:?}", other.err()),
    }
    // A factory that builds a layer of the wrong shape is caught at load.
    f.wrong_shape = true;
    assert!(matches!(
        BertModel::load(&t, config(), &mut f),
        Err(OpsError::Shape { .. })
    ));
}

#[test]
fn sentence_encoder_on_a_tiny_directory() {
    let dir = model_dir();
    let enc = SentenceEncoder::load(dir.path()).unwrap();
    // "Hello worlds." → [CLS] hello world ##s . [SEP] (lower-cased WordPiece).
    let e = enc.encode("Hello worlds.").unwrap();
    assert_eq!(e.ids, vec![2, 4, 5, 8, 9, 3]);
    assert_eq!(e.type_ids, vec![0; 6]);
    assert_eq!(e.mask, vec![true; 6]);
    let v = enc.embed("Hello worlds.").unwrap();
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-6, "{v}");
    // Longer than max_seq_length = 8: truncated to 8 tokens, [SEP] kept last.
    let e = enc
        .encode("hello world private cloud hello world private cloud")
        .unwrap();
    assert_eq!(e.ids.len(), 8);
    assert_eq!(e.ids.last(), Some(&3));
}

#[test]
fn damaged_model_directories_give_typed_errors_naming_the_file() {
    let dir = model_dir();
    let p = dir.path();
    let tok = p.join("tokenizer.json");
    std::fs::write(&tok, &TOKENIZER[..TOKENIZER.len() / 2]).unwrap();
    assert!(
        matches!(SentenceEncoder::load(p), Err(OpsError::Tokenizer { path, .. }) if path == tok)
    );
    std::fs::write(&tok, TOKENIZER).unwrap();

    let seq = p.join("sentence_bert_config.json");
    for bad in [r#"{"max_seq_length": 1}"#, r#"{"max_seq_length": 9}"#] {
        std::fs::write(&seq, bad).unwrap();
        assert!(
            matches!(SentenceEncoder::load(p), Err(OpsError::InvalidConfig { path, .. }) if path == seq)
        );
    }
    std::fs::write(&seq, r#"{"max_seq_length": 8}"#).unwrap();

    let pooling = p.join("1_Pooling/config.json");
    std::fs::write(
        &pooling,
        r#"{"word_embedding_dimension": 4, "pooling_mode_cls_token": true}"#,
    )
    .unwrap();
    assert!(
        matches!(SentenceEncoder::load(p), Err(OpsError::InvalidConfig { path, .. }) if path == pooling)
    );
    std::fs::write(
        &pooling,
        r#"{"word_embedding_dimension": 4, "pooling_mode_mean_tokens": true}"#,
    )
    .unwrap();

    let model = p.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() - 1]).unwrap();
    assert!(
        matches!(SentenceEncoder::load(p), Err(OpsError::SafeTensors { path, .. }) if path == model)
    );
    std::fs::remove_file(&model).unwrap();
    let err = SentenceEncoder::load(p).err().unwrap();
    assert!(matches!(&err, OpsError::Io { path, .. } if *path == model));
    assert!(err.to_string().contains("scripts/fetch-minilm.sh"), "{err}");
}
