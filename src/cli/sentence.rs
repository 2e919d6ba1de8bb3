//! `tandem embed` and `tandem bench sentence` (issue 8): a sentence encoder bundle run on the
//! device with every linear layer computed by the cloud under encryption, over mutual TLS —
//! a cloud given with `--cloud`, or a loopback cloud started in this process with a throwaway
//! development PKI.
//!
//! Byte counts are protocol frame bytes on the session (TLS plaintext, TLS record overhead not
//! included); `cloud_s` is the time the device waited for the cloud's answers (evaluation plus
//! loopback transport), `device_s` the rest of the end-to-end time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::RemoteLayers;
use tandem_he::{Context as HeContext, OutputMode};
use tandem_model::{read_verifying_key, Bundle, Limits, Part};
use tandem_ops::{BundleEncoder, BundleLinears, Encoded};
use tandem_tls::{client_config, client_config_from_files, server_config, ClientFiles, DevPki};

/// Where the cloud is.
#[derive(Args, Clone)]
pub struct CloudArgs {
    /// Verifying key of the bundle's signer.
    #[arg(long, default_value = "models/dev-verifying-key.txt")]
    pub key: PathBuf,
    /// Cloud address (`host:port`) serving the bundle; without it a loopback cloud is started
    /// in this process with a throwaway development PKI.
    #[arg(long)]
    pub cloud: Option<SocketAddr>,
    /// With `--cloud`: the PKI directory (`tandem pki init`) holding the device's credentials.
    #[arg(long)]
    pub pki: Option<PathBuf>,
    /// With `--cloud`: the device name in the PKI directory.
    #[arg(long, default_value = "device-1")]
    pub device: String,
    /// With `--cloud`: the TLS server name of the cloud.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
}

/// `tandem embed` arguments.
#[derive(Args)]
pub struct EmbedArgs {
    /// Encoder bundle directory (`tandem model import-bert`).
    #[arg(long)]
    pub model: PathBuf,
    /// The text to embed.
    pub text: String,
    /// The cloud.
    #[command(flatten)]
    pub cloud: CloudArgs,
}

/// `tandem bench sentence` arguments.
#[derive(Args)]
pub struct BenchArgs {
    /// Encoder bundle directory (`tandem model import-bert`).
    #[arg(long)]
    pub model: PathBuf,
    /// Sentence lengths in tokens (special tokens included), comma-separated: one JSON line
    /// each.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub tokens: Vec<usize>,
    /// Threads of the cloud's evaluation (rayon pool of this process; 1 = sequential).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Print JSON lines only.
    #[arg(long)]
    pub json: bool,
    /// The cloud.
    #[command(flatten)]
    pub cloud: CloudArgs,
}

/// A device session against the cloud, with its encoder (key uploaded).
struct Session {
    remote: Arc<RemoteLayers>,
    encoder: BundleEncoder,
    key_upload_bytes: u64,
    model: String,
    /// The loopback cloud and its runtime, when this process started it.
    local: Option<(tokio::runtime::Runtime, Cloud)>,
}

impl Session {
    fn open(model: &Path, c: &CloudArgs, threads: usize) -> anyhow::Result<Session> {
        let vk = read_verifying_key(&c.key)
            .with_context(|| format!("verifying key {}", c.key.display()))?;
        if tandem_model::is_dev_key(&vk) {
            eprintln!(
                "warning: verifying with the public DEVELOPMENT key {}: use your own key \
                 outside development",
                c.key.display()
            );
        }
        let bundle = Bundle::load_part(model, &vk, &Limits::default(), Part::Device)
            .with_context(|| format!("loading the bundle {}", model.display()))?;
        if bundle.encoder().is_none() {
            bail!(
                "{} is not an encoder bundle (no [encoder] section): make one with `tandem \
                 model import-bert`",
                model.display()
            );
        }
        let (addr, server_name, tls, local) = match c.cloud {
            Some(addr) => {
                let Some(pki) = &c.pki else {
                    bail!("--cloud needs --pki <dir> (the device's credentials)");
                };
                let files = ClientFiles::from_pki_dir(pki, &c.device)?;
                (
                    addr,
                    c.server_name.clone(),
                    client_config_from_files(&files)?,
                    None,
                )
            }
            None => {
                let pki = DevPki::generate(1)?;
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                let store = std::env::temp_dir()
                    .join(format!("tandem-sentence-{}-keys.redb", std::process::id()));
                let addr = {
                    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
                    l.local_addr()?
                };
                let mut o =
                    ServerOptions::new(addr, server_config(pki.server_credentials())?, vk, store);
                o.models = vec![model.to_path_buf()];
                o.parallel_eval = threads > 1;
                let cloud = rt.block_on(Cloud::start(o))?;
                let tls = client_config(pki.client_credentials("device-1")?)?;
                (
                    cloud.local_addr(),
                    "localhost".to_string(),
                    tls,
                    Some((rt, cloud)),
                )
            }
        };
        let remote = Arc::new(RemoteLayers::connect(
            addr,
            &server_name,
            tls,
            &bundle,
            OutputMode::Packed,
            &[tandem_he::DEFAULT_PARAMETERS.id],
            Duration::from_secs(120),
        )?);
        let ctx = Arc::new(HeContext::new(remote.params()));
        let encoder = BundleEncoder::from_bundle(
            &bundle,
            BundleLinears::Encrypted {
                ctx,
                mode: OutputMode::Packed,
                cloud: remote.clone(),
            },
        )?;
        encoder.upload_key()?;
        let key_upload_bytes = remote.stats().key_upload_bytes;
        Ok(Session {
            remote,
            encoder,
            key_upload_bytes,
            model: bundle.id().to_string(),
            local,
        })
    }

    fn close(self) {
        self.remote.close();
        if let Some((rt, cloud)) = self.local {
            rt.block_on(cloud.shutdown());
        }
    }
}

/// `tandem embed`: prints the embedding as JSON.
pub fn embed(a: EmbedArgs) -> anyhow::Result<()> {
    let s = Session::open(&a.model, &a.cloud, 1)?;
    let e = s.encoder.encode(&a.text)?;
    let t = Instant::now();
    let v = s.encoder.embed_encoded(&e)?;
    let e2e = t.elapsed().as_secs_f64();
    let st = s.remote.stats();
    let out = serde_json::json!({
        "model": s.model,
        "tokens": e.ids.len(),
        "e2e_s": e2e,
        "round_trips": st.round_trips,
        "bytes_up": st.bytes_up,
        "bytes_down": st.bytes_down,
        "key_upload_bytes": s.key_upload_bytes,
        "embedding": v.to_vec(),
    });
    println!("{}", serde_json::to_string(&out)?);
    s.close();
    Ok(())
}

/// A tokenised text of exactly `tokens` tokens: a long English text, truncated, its last
/// token replaced by the separator.
fn sentence_of(encoder: &BundleEncoder, tokens: usize) -> anyhow::Result<Encoded> {
    if tokens < 2 || tokens > encoder.max_seq_length() {
        bail!(
            "--tokens {tokens}: the model takes 2..={} tokens",
            encoder.max_seq_length()
        );
    }
    let text = "Private inference splits a model between a device and a cloud: the device keeps \
                its data and sends only encrypted activations, and the cloud multiplies them by \
                its weights without ever seeing them. "
        .repeat(16);
    let full = encoder.encode(&text)?;
    let (Some(&sep), true) = (full.ids.last(), full.ids.len() >= tokens) else {
        bail!("the benchmark text is too short for {tokens} tokens");
    };
    let mut e = Encoded {
        ids: full.ids[..tokens].to_vec(),
        type_ids: full.type_ids[..tokens].to_vec(),
        mask: full.mask[..tokens].to_vec(),
    };
    if let Some(last) = e.ids.last_mut() {
        *last = sep;
    }
    Ok(e)
}

#[derive(Serialize)]
struct BenchLine {
    model: String,
    tokens: usize,
    threads: usize,
    e2e_s: f64,
    cloud_s: f64,
    device_s: f64,
    round_trips: u64,
    bytes_up: u64,
    bytes_down: u64,
    key_upload_bytes: u64,
    encrypted_macs: u64,
    s_per_token: f64,
    bytes_per_token: f64,
    /// How bytes are counted.
    bytes_counted: &'static str,
}

/// `tandem bench sentence`: one encrypted sentence embedding per `--tokens` value, over
/// loopback mTLS (or `--cloud`); one JSON line each.
pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let threads = a.threads.max(1);
    // The cloud's evaluations (when it runs in this process) use rayon's global pool.
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("setting up the thread pool")?;
    let s = Session::open(&a.model, &a.cloud, threads)?;
    for &tokens in &a.tokens {
        let e = sentence_of(&s.encoder, tokens)?;
        let before = s.remote.stats();
        let he = s.encoder.session().map(|x| x.stats()).unwrap_or_default();
        let t = Instant::now();
        s.encoder.embed_encoded(&e)?;
        let e2e = t.elapsed().as_secs_f64();
        let after = s.remote.stats();
        let he_after = s.encoder.session().map(|x| x.stats()).unwrap_or_default();
        let cloud_s = after.wait_s - before.wait_s;
        let up = after.bytes_up - before.bytes_up;
        let down = after.bytes_down - before.bytes_down;
        let line = BenchLine {
            model: s.model.clone(),
            tokens,
            threads,
            e2e_s: e2e,
            cloud_s,
            device_s: (e2e - cloud_s).max(0.0),
            round_trips: after.round_trips - before.round_trips,
            bytes_up: up,
            bytes_down: down,
            key_upload_bytes: s.key_upload_bytes,
            encrypted_macs: he_after.encrypted_macs - he.encrypted_macs,
            s_per_token: e2e / tokens as f64,
            bytes_per_token: (up + down) as f64 / tokens as f64,
            bytes_counted: "protocol frames on the mTLS session (TLS plaintext)",
        };
        if !a.json {
            eprintln!(
                "{tokens} tokens, {threads} thread(s): {e2e:.2} s end to end ({cloud_s:.2} s \
                 waiting for the cloud), {} round trips, {up} B up, {down} B down",
                line.round_trips
            );
        }
        println!("{}", serde_json::to_string(&line)?);
    }
    s.close();
    Ok(())
}
