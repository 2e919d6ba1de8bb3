//! `tandem model import-bert <dir> --out <bundle>` (issue 8): a sentence-transformers BERT
//! directory (all-MiniLM-L6-v2 from `scripts/fetch-minilm.sh`) → a signed encoder bundle
//! (`tandem_ops::import`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

/// `tandem model import-bert` arguments.
#[derive(Args)]
pub struct ImportArgs {
    /// The sentence-transformers directory (`config.json`, `model.safetensors`,
    /// `tokenizer.json`, ...).
    pub src: PathBuf,
    /// Bundle directory to write (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Signing-key file (64 hex digits). Without it the bundle is signed with the public
    /// DEVELOPMENT key (a warning is printed): fine for trying it out, never for shipping.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Model id in the manifest (what devices name in the handshake).
    #[arg(long, default_value = "all-minilm-l6-v2")]
    pub id: String,
    /// Tokens per cloud request the HE layouts are planned for (1..=64; the cloud's
    /// `max_batch` must allow it).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Link rate (kbit/s) the HE plans weigh bytes at, signed into the bundle (device and
    /// cloud plan with it; a slower link trades key switches for fewer bytes). The default
    /// (1 000) keeps a 16-token MiniLM sentence under 4 MB; 25000 gives the fewest key
    /// switches.
    #[arg(long, default_value_t = 1_000)]
    pub link_kbit: u32,
    /// Most secrets one GLWE mask may be shared by in the HE plans (1..=8), signed into the
    /// bundle: r token blocks of a request travel as r bodies with one mask, so downloads
    /// carry one mask per r bodies (the evaluation key grows with the r the plans choose).
    #[arg(long, default_value_t = 4)]
    pub max_bodies: u32,
}

/// Runs the import and prints what it wrote.
pub fn run(a: ImportArgs) -> anyhow::Result<()> {
    let key = match &a.key {
        Some(k) => {
            let sk = tandem_model::read_signing_key(k)?;
            if tandem_model::is_dev_key(&sk.verifying_key()) {
                eprintln!(
                    "warning: {} is the public DEVELOPMENT signing key: use your own key outside \
                     development",
                    k.display()
                );
            }
            sk
        }
        None => {
            eprintln!(
                "warning: no --key: signing with the public DEVELOPMENT key (anyone can sign \
                 with it; verify with models/dev-verifying-key.txt). Pass --key for a bundle \
                 you ship."
            );
            tandem_model::dev_signing_key()
        }
    };
    let s = tandem_ops::import::import_bert_with_plan(
        &a.src,
        &a.out,
        &a.id,
        a.batch,
        tandem_ops::import::PlanKnobs {
            link_kbit_s: Some(a.link_kbit),
            max_bodies: Some(a.max_bodies),
        },
        &key,
    )
    .with_context(|| format!("importing {} into {}", a.src.display(), a.out.display()))?;
    println!(
        "wrote {}: model {} — {} ops, {} cloud linear layers (int8 per channel, planned for {} \
         tokens per request); device.safetensors {} B (embeddings, LayerNorms, scales, biases), \
         cloud.safetensors {} B (int8 weights only), tokenizer.json {} B; manifest.toml + \
         manifest.sig",
        a.out.display(),
        s.id,
        s.ops,
        s.linears,
        s.batch,
        s.device_bytes,
        s.cloud_bytes,
        s.tokenizer_bytes
    );
    Ok(())
}
