//! Measures what activation precision each MiniLM linear layer needs, and whether its HE plan
//! passes the failure bound.
//!
//! ```sh
//! bash scripts/fetch-minilm.sh
//! cargo run --release -p tandem-ops --example minilm_precision [-- --sentences 1024]
//! ```
//! For each precision policy (all int8, all int16, int16 on one kind of layer only, and
//! [`PrecisionPolicy::minilm`]) it embeds the corpus `data/minilm-corpus.txt` with the cleartext
//! integer pipeline and prints one JSON line: mean and min cosine against the float path and the
//! top-10 nearest-neighbour overlap. Then one JSON line per (layer shape, precision, output
//! mode, planning batch) with the plan's log2 failure bound, or the refusal.

use std::path::Path;
use std::sync::Arc;

use ndarray::Array2;
use tandem_he::{Context, OutputMode, DEFAULT_PARAMETERS};
use tandem_ops::encrypted::plan_layer;
use tandem_ops::metrics::agreement;
use tandem_ops::{
    default_model_dir, ActivationBits, PrecisionPolicy, QuantizedLinears, SentenceEncoder,
};

fn embed_all(
    enc: &SentenceEncoder,
    lines: &[&str],
) -> Result<Array2<f32>, Box<dyn std::error::Error>> {
    let mut out = Array2::<f32>::zeros((lines.len(), 384));
    for (i, l) in lines.iter().enumerate() {
        out.row_mut(i).assign(&enc.embed(l)?);
    }
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut sentences = 1024usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--sentences", Some(v)) => sentences = v.parse()?,
            _ => return Err(format!("usage: minilm_precision [--sentences N]; got {a}").into()),
        }
    }
    let dir = default_model_dir();
    let corpus_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/minilm-corpus.txt");
    let corpus = std::fs::read_to_string(&corpus_path)?;
    let lines: Vec<&str> = corpus.lines().take(sentences).collect();
    let float = embed_all(&SentenceEncoder::load(&dir)?, &lines)?;

    let int16_on = |suffix: &str| PrecisionPolicy {
        default: ActivationBits::Int8,
        rules: vec![(suffix.to_string(), ActivationBits::Int16)],
    };
    // "output.dense" also ends "attention.output.dense": keep that one at int8.
    let int16_ffn_out = PrecisionPolicy {
        default: ActivationBits::Int8,
        rules: vec![
            ("attention.output.dense".into(), ActivationBits::Int8),
            ("output.dense".into(), ActivationBits::Int16),
        ],
    };
    let policies = [
        ("all_int8", PrecisionPolicy::uniform(ActivationBits::Int8)),
        ("all_int16", PrecisionPolicy::uniform(ActivationBits::Int16)),
        (
            "int16_qkv_only",
            PrecisionPolicy {
                default: ActivationBits::Int8,
                rules: vec![
                    ("query".into(), ActivationBits::Int16),
                    ("key".into(), ActivationBits::Int16),
                    ("value".into(), ActivationBits::Int16),
                ],
            },
        ),
        (
            "int16_attention_out_only",
            int16_on("attention.output.dense"),
        ),
        ("int16_ffn_in_only", int16_on("intermediate.dense")),
        ("int16_ffn_out_only", int16_ffn_out),
    ];
    for (name, policy) in policies {
        let enc = SentenceEncoder::load_with(&dir, &mut QuantizedLinears { policy })?;
        let a = agreement(float.view(), embed_all(&enc, &lines)?.view(), 10)?;
        println!(
            "{{\"policy\":\"{name}\",\"sentences\":{},\"mean_cosine\":{:.6},\"min_cosine\":{:.6},\"worst\":{},\"top10_overlap\":{:.4}}}",
            a.sentences, a.mean_cosine, a.min_cosine, a.worst, a.top_k_overlap
        );
    }

    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    for (n_in, n_out) in [(384usize, 384usize), (384, 1152), (384, 1536), (1536, 384)] {
        for bits in [ActivationBits::Int8, ActivationBits::Int16] {
            for mode in [OutputMode::NoKey, OutputMode::Packed] {
                for batch in [1usize, 16, 64] {
                    let r = plan_layer(&ctx, mode, n_in, n_out, bits, batch);
                    let (ok, detail) = match &r {
                        Ok(p) => (true, format!("\"log2_p_fail\":{:.1},\"chunk\":{},\"batch_rows\":{},\"up_bytes\":{},\"down_bytes\":{}", p.log2_p_fail, p.chunk, p.batch_rows, p.upload_bytes(batch), p.download_bytes(batch))),
                        Err(e) => (false, format!("\"error\":\"{e}\"")),
                    };
                    println!(
                        "{{\"n_in\":{n_in},\"n_out\":{n_out},\"bits\":\"{}\",\"mode\":\"{}\",\"batch\":{batch},\"ok\":{ok},{detail}}}",
                        bits.name(),
                        mode.name()
                    );
                }
            }
        }
    }
    Ok(())
}
