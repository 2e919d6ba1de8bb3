//! `tandem model import-bert`: a sentence-transformers BERT directory (all-MiniLM-L6-v2, from
//! `scripts/fetch-minilm.sh`) → a signed Tandem encoder bundle (feature `import`).
//!
//! The checkpoint is loaded exactly as [`SentenceEncoder`] loads it (same validation of
//! `config.json`, pooling and `modules.json`), with Q/K/V fused into one `H → 3H` layer per
//! block. Each linear layer is quantised per output channel to int8
//! ([`QuantizedWeights::quantize`]): the int8 weights go to the cloud weights file, the
//! scales and float biases with the embeddings and LayerNorms to the device weights file, and
//! `tokenizer.json` is copied into the bundle and bound by its digest. The forward pass is
//! written out as the manifest's `[encoder]` op graph.

use std::path::Path;

use tandem_model::{
    CloudLinear, EncoderSpec, Manifest, NamedTensor, OpSpec, Placement, SigningKey, TensorData,
    WeightsRef,
};

use crate::config::{read_json, BertConfig, ModuleEntry};
use crate::linear::{DenseLinear, Linear, LinearFactory, LinearSpec};
use crate::quant::{ActivationBits, QuantizedWeights};
use crate::weights::{read_limited, Checkpoint, MAX_TOKENIZER_BYTES};
use crate::{OpsError, SentenceEncoder};

/// What [`import_bert`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// Model id in the manifest.
    pub id: String,
    /// Cloud linear layers (protocol layer ids `0..linears`).
    pub linears: usize,
    /// Ops in the graph.
    pub ops: usize,
    /// Planned batch (tokens per request).
    pub batch: usize,
    /// Sizes of `device.safetensors`, `cloud.safetensors`, `tokenizer.json`, in bytes.
    pub device_bytes: u64,
    /// Cloud weights file size.
    pub cloud_bytes: u64,
    /// Tokenizer file size.
    pub tokenizer_bytes: u64,
}

/// Records every linear layer a model load asks for (Q/K/V fused), computing nothing.
struct Recorder(Vec<LinearSpec>);

impl LinearFactory for Recorder {
    fn build(&mut self, spec: LinearSpec) -> Result<Box<dyn Linear>, OpsError> {
        self.0.push(spec.clone());
        Ok(Box::new(DenseLinear::new(spec)?))
    }

    fn fuse_qkv(&self) -> bool {
        true
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn f32t(name: &str, shape: Vec<usize>, v: Vec<f32>) -> NamedTensor {
    NamedTensor {
        name: name.into(),
        shape,
        data: TensorData::F32(v),
    }
}

/// Converts the sentence-transformers directory `src` into a signed bundle in `out`
/// (created), model id `id`, cloud layers planned for requests of `batch` tokens with the
/// byte-favouring knobs [`DEFAULT_PLAN_KNOBS`].
///
/// # Errors
/// The errors of [`SentenceEncoder::load_with`] for the source directory, [`OpsError::Bundle`]
/// if the bundle cannot be written or would not verify.
pub fn import_bert(
    src: &Path,
    out: &Path,
    id: &str,
    batch: usize,
    key: &SigningKey,
) -> Result<ImportSummary, OpsError> {
    import_bert_with_plan(src, out, id, batch, DEFAULT_PLAN_KNOBS, key)
}

/// The HE planning knobs [`import_bert`] and `tandem model import-bert` sign by default:
/// plans that weigh bytes at 1 Mbit/s and let up to 4 secrets share a mask. For
/// all-MiniLM-L6-v2 at 16 tokens per request this is the plan that keeps a 16-token sentence
/// under 4 MB of traffic (3.92 MB; `plan_table --link 1000 --bounds --max-bodies 4 minilm`,
/// specs/parameters.md) at ≈ 19 000 key switches of 2 bodies, against 8.2 MB and 4 326 single-
/// body key switches at the engine's 25 Mbit/s default. Sign `link_kbit_s = 25000,
/// max_bodies = 1` for the fewest key switches on a fast link.
pub const DEFAULT_PLAN_KNOBS: PlanKnobs = PlanKnobs {
    link_kbit_s: Some(1_000),
    max_bodies: Some(4),
};

/// [`import_bert`] that signs `link_kbit_s` (kbit/s, the link rate the HE plans weigh
/// bytes at; `None` leaves it out: 25 000) instead of the default's, with the default's
/// `max_bodies`. Always signs each cloud layer's row bounds
/// (max row Σ|wq| and Σwq² of the int8 weights it ships), which device and cloud plan with
/// (TDM-PAR-HE-3).
///
/// # Errors
/// As [`import_bert`]; [`OpsError::Bundle`] for a link rate out of `1..=100 000 000`.
pub fn import_bert_with_link(
    src: &Path,
    out: &Path,
    id: &str,
    batch: usize,
    link_kbit_s: Option<u32>,
    key: &SigningKey,
) -> Result<ImportSummary, OpsError> {
    import_bert_with_plan(
        src,
        out,
        id,
        batch,
        PlanKnobs {
            link_kbit_s,
            max_bodies: DEFAULT_PLAN_KNOBS.max_bodies,
        },
        key,
    )
}

/// The public HE planning knobs an import signs into the `[encoder]` section (each `None` is
/// left out of the manifest and planned at its default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanKnobs {
    /// Link rate (kbit/s) the HE plans weigh bytes at (`None`: 25 000).
    pub link_kbit_s: Option<u32>,
    /// Most secrets one GLWE mask may be shared by (`None`: 1; `1..=8`).
    pub max_bodies: Option<u32>,
}

/// [`import_bert`] with the HE planning knobs `knobs` signed into the bundle.
///
/// # Errors
/// As [`import_bert`]; [`OpsError::Bundle`] for a knob out of its range (link rate
/// `1..=100 000 000` kbit/s, `max_bodies` `1..=8`).
pub fn import_bert_with_plan(
    src: &Path,
    out: &Path,
    id: &str,
    batch: usize,
    knobs: PlanKnobs,
    key: &SigningKey,
) -> Result<ImportSummary, OpsError> {
    let PlanKnobs {
        link_kbit_s,
        max_bodies,
    } = knobs;
    let mut rec = Recorder(Vec::new());
    let enc = SentenceEncoder::load_with(src, &mut rec)?;
    let cfg: BertConfig = enc.model().config().clone();
    let modules: Vec<ModuleEntry> = read_json(&src.join("modules.json"))?;
    let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
    let checkpoint = Checkpoint::open(&src.join("model.safetensors"))?;
    let t = checkpoint.tensors()?;
    let h = cfg.hidden_size;
    let mut tensors = Vec::new();
    let mut put_matrix = |name: &str, rows: usize| -> Result<(), OpsError> {
        let m = t.matrix(name, rows, h)?;
        tensors.push(f32t(name, vec![rows, h], m.iter().copied().collect()));
        Ok(())
    };
    put_matrix("embeddings.word_embeddings.weight", cfg.vocab_size)?;
    put_matrix(
        "embeddings.position_embeddings.weight",
        cfg.max_position_embeddings,
    )?;
    put_matrix(
        "embeddings.token_type_embeddings.weight",
        cfg.type_vocab_size,
    )?;
    let mut ops = Vec::new();
    let mut e = OpSpec::device("embedding", &[], "embedded");
    e.tensors = vec![
        "embeddings.word_embeddings.weight".into(),
        "embeddings.position_embeddings.weight".into(),
        "embeddings.token_type_embeddings.weight".into(),
    ];
    ops.push(e);
    let mut layer_norm =
        |ops: &mut Vec<OpSpec>, prefix: &str, input: &str, output: &str| -> Result<(), OpsError> {
            let (g, b) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
            tensors.push(f32t(&g, vec![h], t.vector(&g, h)?.to_vec()));
            tensors.push(f32t(&b, vec![h], t.vector(&b, h)?.to_vec()));
            let mut o = OpSpec::device("layer_norm", &[input], output);
            o.tensors = vec![g, b];
            o.eps = Some(cfg.layer_norm_eps);
            ops.push(o);
            Ok(())
        };
    layer_norm(&mut ops, "embeddings.LayerNorm", "embedded", "x0")?;
    let mut linears = Vec::new();
    let mut linear_tensors = Vec::new();
    let expected = 4 * cfg.num_hidden_layers;
    if rec.0.len() != expected {
        return Err(OpsError::shape(
            "import-bert",
            format!(
                "{} linear layers recorded, expected {expected}",
                rec.0.len()
            ),
        ));
    }
    for spec in &rec.0 {
        let q = QuantizedWeights::quantize(spec, ActivationBits::Int8)?;
        let (n_out, n_in) = q.weights.dim();
        let name = spec.name.clone();
        let w: Vec<i8> = q
            .weights
            .iter()
            .map(|&v| i8::try_from(v).unwrap_or(0))
            .collect();
        // The bounds of exactly the int8 weights shipped (0 = an all-zero layer: left out).
        let wide: Vec<i64> = w.iter().map(|&v| i64::from(v)).collect();
        let rb = tandem_he::WeightBounds::of(&wide, n_in, &[]);
        let l = CloudLinear {
            name: name.clone(),
            n_in,
            n_out,
            weight: format!("{name}.weight"),
            scales: format!("{name}.weight_scale"),
            bias: format!("{name}.bias"),
            input_bound: ActivationBits::Int8.q_max(),
            weight_bound: crate::quant::WEIGHT_Q_MAX,
            bias_bound: 0,
            max_row_l1: rb.max_row_l1.filter(|&v| v > 0),
            max_row_sq: rb.max_row_sq.filter(|&v| v > 0),
        };
        linear_tensors.push(NamedTensor {
            name: l.weight.clone(),
            shape: vec![n_out, n_in],
            data: TensorData::I8(w),
        });
        linear_tensors.push(f32t(
            &l.scales,
            vec![n_out],
            q.device.weight_scales.to_vec(),
        ));
        linear_tensors.push(f32t(&l.bias, vec![n_out], q.device.bias.to_vec()));
        linears.push(l);
    }
    let heads = cfg.num_attention_heads;
    let mut x = "x0".to_string();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        let v = |s: &str| format!("l{i}.{s}");
        let lin = |ops: &mut Vec<OpSpec>, k: usize, input: &str, output: &str| {
            let mut o = OpSpec::device("linear", &[input], output);
            o.placement = Placement::Cloud;
            o.linear = Some(4 * i + k);
            ops.push(o);
        };
        lin(&mut ops, 0, &x, &v("qkv"));
        let mut a = OpSpec::device("attention", &[&v("qkv")], &v("context"));
        a.heads = Some(heads);
        ops.push(a);
        lin(&mut ops, 1, &v("context"), &v("attn_out"));
        ops.push(OpSpec::device("add", &[&v("attn_out"), &x], &v("attn_res")));
        layer_norm(
            &mut ops,
            &format!("{p}.attention.output.LayerNorm"),
            &v("attn_res"),
            &v("attn"),
        )?;
        lin(&mut ops, 2, &v("attn"), &v("ffn_in"));
        ops.push(OpSpec::device("gelu", &[&v("ffn_in")], &v("ffn_act")));
        lin(&mut ops, 3, &v("ffn_act"), &v("ffn_out"));
        ops.push(OpSpec::device(
            "add",
            &[&v("ffn_out"), &v("attn")],
            &v("ffn_res"),
        ));
        let next = format!("x{}", i + 1);
        layer_norm(
            &mut ops,
            &format!("{p}.output.LayerNorm"),
            &v("ffn_res"),
            &next,
        )?;
        x = next;
    }
    ops.push(OpSpec::device("mean_pool", &[&x], "pooled"));
    let output = if normalize {
        ops.push(OpSpec::device("l2_normalize", &["pooled"], "embedding"));
        "embedding"
    } else {
        "pooled"
    };
    tensors.extend(linear_tensors);

    let tok = read_limited(&src.join("tokenizer.json"), MAX_TOKENIZER_BYTES)?;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&tok);
    let n_ops = ops.len();
    let n_linears = linears.len();
    let manifest = Manifest::for_encoder(
        id,
        "1.0.0",
        "sentence-transformers",
        EncoderSpec {
            hidden: h,
            max_tokens: enc.max_seq_length(),
            batch,
            vocab_size: cfg.vocab_size,
            max_position_embeddings: cfg.max_position_embeddings,
            type_vocab_size: cfg.type_vocab_size,
            tokenizer: WeightsRef {
                file: "tokenizer.json".into(),
                sha256: hex(&digest),
                bytes: tok.len() as u64,
            },
            linears,
            ops,
            output: output.into(),
            link_kbit_s,
            max_bodies,
        },
    )?;
    // Only a manifest that validates (knobs in range, graph consistent) writes anything: a
    // refused import leaves `out` as it was (no half-written directory, no replaced tokenizer
    // under an existing bundle's digest). `write_bundle` checks it again with the weights.
    manifest.validate(&tandem_model::Limits::default())?;
    std::fs::create_dir_all(out).map_err(|source| OpsError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let tok_path = out.join("tokenizer.json");
    std::fs::write(&tok_path, &tok).map_err(|source| OpsError::Io {
        path: tok_path.clone(),
        source,
    })?;
    tandem_model::write_bundle(out, &manifest, &tensors, key)?;
    let size = |f: &str| std::fs::metadata(out.join(f)).map_or(0, |m| m.len());
    Ok(ImportSummary {
        id: id.into(),
        linears: n_linears,
        ops: n_ops,
        batch,
        device_bytes: size("device.safetensors"),
        cloud_bytes: size("cloud.safetensors"),
        tokenizer_bytes: tok.len() as u64,
    })
}
