//! Float forward time of all-MiniLM-L6-v2 on the device path, one thread (ndarray's
//! `matrixmultiply` GEMM without its threading feature), for 16- and 128-token sentences.
//!
//! ```sh
//! bash scripts/fetch-minilm.sh
//! cargo run --release -p tandem-ops --example minilm_timing [-- --runs 20 --tokens 16,128]
//! ```
//! Prints one JSON object per sequence length: median and minimum seconds of the whole sentence
//! embedding (embeddings, 6 layers, pooling, normalisation; tokenisation excluded) and the
//! multiply-adds done in linear layers and in attention.

use std::time::Instant;

use tandem_ops::{default_model_dir, Encoded, OpsError, SentenceEncoder};

const TEXT: &str = "Collaborative inference lets a phone run the first layers of a model while \
    the cloud multiplies encrypted activations by its cleartext weights, so that the server never \
    sees what the user typed, and the device never needs the memory or the energy to run the \
    whole network by itself; the price is paid in latency, in bytes on the wire, and in the care \
    needed to quantise every activation without losing the accuracy of the original float model, \
    which is why every step is measured against an independent reference before it ships. ";

fn sequence(enc: &SentenceEncoder, tokens: usize) -> Result<Encoded, OpsError> {
    let mut e = enc.encode(&TEXT.repeat(8))?;
    // Keep [CLS] + the first tokens, end with [SEP]: exactly `tokens` real tokens.
    let sep = e.ids.last().copied().unwrap_or(102);
    e.ids.truncate(tokens - 1);
    e.ids.push(sep);
    e.type_ids = vec![0; tokens];
    e.mask = vec![true; tokens];
    Ok(e)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut runs = 10usize;
    let mut lengths = vec![16usize, 128];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--runs", Some(v)) => runs = v.parse()?,
            ("--tokens", Some(v)) => {
                lengths = v.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            _ => {
                return Err(
                    format!("usage: minilm_timing [--runs N] [--tokens 16,128]; got {a}").into(),
                )
            }
        }
    }
    let dir = default_model_dir();
    let enc = SentenceEncoder::load(&dir)
        .map_err(|e| format!("{e}\n(the model is fetched by scripts/fetch-minilm.sh)"))?;
    let cfg = enc.model().config().clone();
    for &t in &lengths {
        if !(2..=enc.max_seq_length()).contains(&t) {
            return Err(format!("--tokens {t}: supported 2..={}", enc.max_seq_length()).into());
        }
        let e = sequence(&enc, t)?;
        for _ in 0..2 {
            enc.embed_encoded(&e)?;
        }
        let mut secs: Vec<f64> = (0..runs.max(1))
            .map(|_| {
                let start = Instant::now();
                enc.embed_encoded(&e).map(|_| start.elapsed().as_secs_f64())
            })
            .collect::<Result<_, _>>()?;
        secs.sort_by(f64::total_cmp);
        let (h, i, l) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
        );
        let linear_macs = t * l * (4 * h * h + 2 * h * i);
        let attention_macs = l * 2 * t * t * h;
        println!(
            "{{\"model\":\"all-MiniLM-L6-v2\",\"path\":\"float\",\"tokens\":{t},\"threads\":1,\"runs\":{},\"forward_s_median\":{:.6},\"forward_s_min\":{:.6},\"linear_macs\":{linear_macs},\"attention_macs\":{attention_macs}}}",
            secs.len(),
            secs[secs.len() / 2],
            secs[0],
        );
    }
    Ok(())
}
