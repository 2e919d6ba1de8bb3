//! all-MiniLM-L6-v2 with all 36 linear layers computed under encryption, in-process
//! (device and cloud in one process, no network): figures per sentence.
//!
//! ```sh
//! bash scripts/fetch-minilm.sh
//! cargo run --release -p tandem-ops --example minilm_encrypted -- --json [--tokens 16,128] [--modes packed,nokey] [--threads 1,2] [--runs 1]
//! ```
//! For each sequence length (default 16 and 128 tokens, `--tokens 16` for one), output mode and
//! thread count, it loads the model through [`EncryptedLinears`] (planning batch = tokens, at
//! most 64 rows per request), uploads the evaluation key (packed mode), runs one warm-up and
//! `--runs` measured sentence embeddings, checks the embedding equals the cleartext integer
//! pipeline's bit for bit, and prints one JSON object per line with the fastest run:
//! `e2e_s` (whole embedding, tokenisation excluded), `cloud_s` (server evaluation: decode,
//! evaluate, encode), `device_s` (= e2e − cloud: quantise, encrypt, decrypt, dequantise and
//! every device op), `encrypt_s`, `decrypt_s`, `round_trips` (requests), `bytes_up` /
//! `bytes_down` (request / reply blob bytes), `key_upload_bytes`, `encrypted_macs`, and the
//! per-token and per-multiply-add figures. Threads: the cloud's evaluation runs in a rayon
//! pool of that size (1 = sequential); the device ops are single-threaded either way.

use std::sync::Arc;
use std::time::Instant;

use tandem_he::{Context, EvalOptions, OutputMode, DEFAULT_PARAMETERS};
use tandem_ops::{
    default_model_dir, Encoded, EncryptedLinears, InProcessCloud, OpsError, PrecisionPolicy,
    QuantizedLinears, SentenceEncoder,
};

const TEXT: &str = "Collaborative inference lets a phone run the first layers of a model while \
    the cloud multiplies encrypted activations by its cleartext weights, so that the server never \
    sees what the user typed, and the device never needs the memory or the energy to run the \
    whole network by itself; the price is paid in latency, in bytes on the wire, and in the care \
    needed to quantise every activation without losing the accuracy of the original float model, \
    which is why every step is measured against an independent reference before it ships. ";

/// `[CLS]` + the first `tokens − 2` word pieces of the text + `[SEP]`.
fn sequence(enc: &SentenceEncoder, tokens: usize) -> Result<Encoded, OpsError> {
    let mut e = enc.encode(&TEXT.repeat(8))?;
    let sep = e.ids.last().copied().unwrap_or(102);
    e.ids.truncate(tokens - 1);
    e.ids.push(sep);
    e.type_ids = vec![0; tokens];
    e.mask = vec![true; tokens];
    Ok(e)
}

fn list<T: std::str::FromStr>(v: &str) -> Result<Vec<T>, String> {
    v.split(',')
        .map(|s| s.parse().map_err(|_| format!("cannot parse `{s}`")))
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut lengths, mut threads, mut runs) = (vec![16usize, 128], vec![1usize, 2], 1usize);
    let mut modes = vec![OutputMode::Packed, OutputMode::NoKey];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => {}
            "--tokens" => lengths = list(&args.next().unwrap_or_default())?,
            "--threads" => threads = list(&args.next().unwrap_or_default())?,
            "--runs" => runs = args.next().unwrap_or_default().parse()?,
            "--modes" => {
                modes = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|m| match m {
                        "packed" => Ok(OutputMode::Packed),
                        "nokey" => Ok(OutputMode::NoKey),
                        _ => Err(format!("--modes: `{m}` (packed, nokey)")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            _ => {
                return Err(format!(
                    "usage: minilm_encrypted [--json] [--tokens 16,128] [--modes packed,nokey] [--threads 1,2] [--runs N]; got {a}"
                )
                .into())
            }
        }
    }
    let dir = default_model_dir();
    let integer = SentenceEncoder::load_with(
        &dir,
        &mut QuantizedLinears {
            policy: PrecisionPolicy::minilm(),
        },
    )
    .map_err(|e| format!("{e}\n(the model is fetched by scripts/fetch-minilm.sh)"))?;
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    for &t in &lengths {
        if !(2..=integer.max_seq_length()).contains(&t) {
            return Err(format!("--tokens {t}: supported 2..={}", integer.max_seq_length()).into());
        }
        let e = sequence(&integer, t)?;
        let expect = integer.embed_encoded(&e)?;
        for &mode in &modes {
            let cloud = Arc::new(InProcessCloud::new(ctx.clone(), EvalOptions::default()));
            let load = Instant::now();
            let mut factory = EncryptedLinears::new(
                ctx.clone(),
                mode,
                PrecisionPolicy::minilm(),
                t.min(tandem_he::limits::MAX_BATCH),
                cloud.clone(),
            );
            let enc = SentenceEncoder::load_with(&dir, &mut factory)?;
            let load_s = load.elapsed().as_secs_f64();
            let key_bytes = factory.upload_key()?;
            let worst_fail = factory
                .planned()
                .iter()
                .map(|p| p.plan.log2_p_fail)
                .fold(f64::NEG_INFINITY, f64::max);
            let session = factory.session();
            for &k in &threads {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(k).build()?;
                cloud.set_eval_options(EvalOptions { parallel: k > 1 });
                let mut best: Option<(f64, f64, tandem_ops::HeStats)> = None;
                for run in 0..=runs.max(1) {
                    session.reset_stats();
                    let busy0 = cloud.busy();
                    let start = Instant::now();
                    let got = pool.install(|| enc.embed_encoded(&e))?;
                    let e2e = start.elapsed().as_secs_f64();
                    let cloud_s = (cloud.busy() - busy0).as_secs_f64();
                    if got
                        .iter()
                        .zip(&expect)
                        .any(|(a, b)| a.to_bits() != b.to_bits())
                    {
                        return Err("encrypted embedding differs from the integer pipeline".into());
                    }
                    // Run 0 is the warm-up.
                    if run > 0 && best.as_ref().is_none_or(|b| e2e < b.0) {
                        best = Some((e2e, cloud_s, session.stats()));
                    }
                }
                let Some((e2e, cloud_s, st)) = best else {
                    continue;
                };
                println!(
                    "{{\"model\":\"all-MiniLM-L6-v2\",\"path\":\"encrypted-in-process\",\"mode\":\"{}\",\"tokens\":{t},\"threads\":{k},\"runs\":{runs},\"e2e_s\":{e2e:.3},\"cloud_s\":{cloud_s:.3},\"device_s\":{:.3},\"encrypt_s\":{:.3},\"decrypt_s\":{:.3},\"round_trips\":{},\"bytes_up\":{},\"bytes_down\":{},\"key_upload_bytes\":{key_bytes},\"encrypted_macs\":{},\"s_per_token\":{:.4},\"bytes_per_token\":{},\"ns_per_mac\":{:.3},\"load_s\":{load_s:.2},\"worst_log2_p_fail\":{worst_fail:.1},\"encrypted_equals_integer_path\":true}}",
                    mode.name(),
                    e2e - cloud_s,
                    st.encrypt_s,
                    st.decrypt_s,
                    st.requests,
                    st.bytes_up,
                    st.bytes_down,
                    st.encrypted_macs,
                    e2e / t as f64,
                    (st.bytes_up + st.bytes_down) / t as u64,
                    e2e * 1e9 / st.encrypted_macs.max(1) as f64,
                );
            }
        }
    }
    Ok(())
}
