//! `tandem demo --model minilm`: private semantic search with all-MiniLM-L6-v2 (issue 8).
//!
//! The device embeds a small corpus itself (float, on the device: the index never leaves it),
//! then embeds each query with every linear layer evaluated by the cloud under encryption
//! (in-process cloud: the same bytes a network transport carries, counted per query), and
//! searches the corpus with the encrypted query embedding. Beside each hit list it shows the
//! hits of the float query embedding (what the device alone would find), the cosine between the
//! two query embeddings, the query's latency and its bytes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use indicatif::ProgressBar;
use ndarray::Array1;
use serde::Serialize;
use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::{RemoteLayers, SentenceDevice};
use tandem_he::{Context, EvalOptions, OutputMode, DEFAULT_PARAMETERS};
use tandem_model::{dev_signing_key, read_verifying_key, Bundle, Limits, Part};
use tandem_ops::import::import_bert;
use tandem_ops::metrics::{cosine, nearest};
use tandem_ops::InProcessCloud;
use tandem_tls::{client_config, server_config, DevPki};

use super::demo::repo_root;
use super::eval::{bar, embed_all, parse_mode, read_corpus, EncryptedEncoder, MiniLm};

/// The queries the demo asks when none is given (about the Python documentation the corpus
/// comes from).
pub const DEFAULT_QUERIES: [&str; 5] = [
    "How can several threads exchange data safely?",
    "finding out where my program spends its time",
    "translating an application into other languages",
    "reading archives compressed with xz",
    "checking the server's certificate on a secure connection",
];

/// Options of `tandem demo` that only apply with `--model`.
#[derive(Args, Debug, Clone)]
pub struct MiniLmDemoArgs {
    /// `minilm` (TANDEM_MINILM_DIR, else the cache of scripts/fetch-minilm.sh), a MiniLM
    /// directory or a signed encoder bundle (`tandem model import-bert`): private semantic
    /// search instead of the digits demo.
    #[arg(long)]
    pub model: Option<String>,
    /// With a bundle: the MiniLM directory the device indexes the corpus with (float).
    #[arg(long, default_value = "minilm", requires = "model")]
    pub float_model: String,
    /// Corpus to search, one sentence per line (default: data/minilm-corpus.txt).
    #[arg(long, requires = "model")]
    pub corpus: Option<PathBuf>,
    /// Sentences of the corpus indexed on the device: evenly spaced through the file.
    #[arg(long, default_value_t = 64, requires = "model")]
    pub corpus_size: usize,
    /// A query (repeat for several); default: five questions about the Python documentation.
    #[arg(long = "query", requires = "model")]
    pub queries: Vec<String>,
    /// Hits shown per query.
    #[arg(long, default_value_t = 3, requires = "model")]
    pub top: usize,
    /// HE output mode of the cloud layers: `packed` (an evaluation key uploaded once) or
    /// `nokey` (no key, larger answers).
    #[arg(long, default_value = "packed", requires = "model")]
    pub mode: String,
    /// Where the cloud runs: `mtls` (a `tandem-cloud` server on 127.0.0.1 serving the signed
    /// bundle, reached over mutual TLS with a throw-away PKI; a MiniLM directory is first
    /// imported into a temporary bundle signed with the development key) or `in-process` (no
    /// network: the same ciphertext blobs, counted without framing).
    #[arg(long, default_value = "mtls", requires = "model")]
    pub cloud: String,
}

#[derive(Serialize)]
struct Hit {
    index: usize,
    score: f64,
    text: String,
}

#[derive(Serialize)]
struct QueryJson {
    query: String,
    tokens: usize,
    latency_s: f64,
    cloud_s: f64,
    requests: u64,
    bytes_up: u64,
    bytes_down: u64,
    cosine_vs_float: f64,
    same_hits_as_float: bool,
    hits: Vec<Hit>,
    float_hits: Vec<Hit>,
}

#[derive(Serialize)]
struct DemoJson {
    model: String,
    path: &'static str,
    mode: String,
    corpus_sentences: usize,
    corpus_embed_s: f64,
    load_s: f64,
    key_upload_bytes: usize,
    queries: Vec<QueryJson>,
}

/// Runs the MiniLM demo.
///
/// # Errors
/// The model is missing (with the command that fetches it), the corpus cannot be read, or an
/// embedding fails.
pub fn run(args: &MiniLmDemoArgs, json: bool) -> anyhow::Result<()> {
    let spec = args.model.as_deref().unwrap_or("minilm");
    let key = repo_root().join("models/dev-verifying-key.txt");
    let model = MiniLm::resolve(spec, &args.float_model, &key)?;
    let mode = parse_mode(&args.mode)?;
    if args.corpus_size == 0 || args.top == 0 {
        bail!("--corpus-size and --top must be at least 1");
    }
    let corpus_path = args
        .corpus
        .clone()
        .unwrap_or_else(|| repo_root().join("data/minilm-corpus.txt"));
    let all = read_corpus(&corpus_path, None)?;
    // Evenly spaced through the file, so the index spans the whole corpus.
    let size = args.corpus_size.min(all.len());
    let picked: Vec<usize> = (0..size).map(|j| j * all.len() / size).collect();
    let docs: Vec<&str> = picked.iter().map(|&i| all[i].as_str()).collect();
    let queries: Vec<String> = if args.queries.is_empty() {
        DEFAULT_QUERIES.iter().map(|q| q.to_string()).collect()
    } else {
        args.queries.clone()
    };

    let progress = bar(docs.len() + queries.len());
    progress.set_message("loading MiniLM (float)");
    let float = model.float()?;
    progress.set_message("indexing the corpus (device)");
    let t0 = Instant::now();
    let index = embed_all(|t| float.embed(t), &docs, &progress)?;
    let corpus_embed_s = t0.elapsed().as_secs_f64();

    let t_load = Instant::now();
    let backend = match args.cloud.as_str() {
        "in-process" => {
            progress.set_message("planning the cloud layers");
            let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
            let cloud = Arc::new(InProcessCloud::new(
                ctx.clone(),
                EvalOptions { parallel: true },
            ));
            let e = model.encrypted(ctx, mode, 16, cloud.clone())?;
            Backend::InProcess { e, cloud }
        }
        "mtls" => start_mtls(&model, mode, &progress)?,
        other => bail!("--cloud {other}: expected `mtls` or `in-process`"),
    };
    let load_s = t_load.elapsed().as_secs_f64();
    let key_upload_bytes = backend.key_upload_bytes();

    let hits = |scored: Vec<(usize, f64)>| -> Vec<Hit> {
        scored
            .into_iter()
            .map(|(i, score)| Hit {
                index: picked[i],
                score,
                text: docs[i].to_string(),
            })
            .collect()
    };
    let mut out = Vec::new();
    for q in &queries {
        progress.set_message("query (encrypted)");
        let (emb, cost) = backend.embed(q)?;
        let plain = float.embed(q)?;
        let got = nearest(index.view(), emb.view(), args.top)?;
        let want = nearest(index.view(), plain.view(), args.top)?;
        let same = got.iter().map(|h| h.0).eq(want.iter().map(|h| h.0));
        out.push(QueryJson {
            query: q.clone(),
            tokens: cost.tokens,
            latency_s: cost.latency_s,
            cloud_s: cost.cloud_s,
            requests: cost.requests,
            bytes_up: cost.bytes_up,
            bytes_down: cost.bytes_down,
            cosine_vs_float: cosine(emb.view(), plain.view()),
            same_hits_as_float: same,
            hits: hits(got),
            float_hits: hits(want),
        });
        progress.inc(1);
    }
    let path = backend.path();
    let described = backend.describe(&model);
    backend.close();
    progress.finish_and_clear();

    let report = DemoJson {
        model: described,
        path,
        mode: mode.name().to_string(),
        corpus_sentences: docs.len(),
        corpus_embed_s,
        load_s,
        key_upload_bytes,
        queries: out,
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// What one encrypted query cost.
struct QueryCost {
    tokens: usize,
    latency_s: f64,
    cloud_s: f64,
    requests: u64,
    bytes_up: u64,
    bytes_down: u64,
}

/// The encrypted query path: an in-process cloud, or a cloud server on loopback mTLS.
enum Backend {
    InProcess {
        e: EncryptedEncoder,
        cloud: Arc<InProcessCloud>,
    },
    Mtls(Box<Mtls>),
}

/// The loopback mTLS path: the device's encoder, its session to the cloud, the cloud server
/// and its runtime, the temporary directory (key store, imported bundle).
struct Mtls {
    device: SentenceDevice,
    key_upload_bytes: usize,
    server: Cloud,
    rt: tokio::runtime::Runtime,
    bundle: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Backend {
    fn key_upload_bytes(&self) -> usize {
        match self {
            Self::InProcess { e, .. } => e.key_upload_bytes,
            Self::Mtls(m) => m.key_upload_bytes,
        }
    }

    fn path(&self) -> &'static str {
        match self {
            Self::InProcess { .. } => "encrypted-in-process",
            Self::Mtls(_) => "encrypted-loopback-mtls",
        }
    }

    fn describe(&self, model: &MiniLm) -> String {
        match self {
            Self::Mtls(m) if model.bundle.is_none() => format!(
                "{} (imported into a temporary bundle, {})",
                model.dir.display(),
                m.bundle.display()
            ),
            _ => model.describe(),
        }
    }

    /// Embeds `q` under encryption; `cloud_s` is the cloud's evaluation time (measured in
    /// process; over mTLS as the cloud reports it in its answers, `cloud_eval_us`); bytes are
    /// ciphertext blob bytes in process, protocol frame bytes over mTLS.
    fn embed(&self, q: &str) -> anyhow::Result<(Array1<f32>, QueryCost)> {
        match self {
            Self::InProcess { e, cloud } => {
                let tokens = e.encoder.tokens(q)?;
                e.session.reset_stats();
                let busy0 = cloud.busy();
                let t = Instant::now();
                let emb = e.encoder.embed(q)?;
                let latency_s = t.elapsed().as_secs_f64();
                let st = e.session.stats();
                Ok((
                    emb,
                    QueryCost {
                        tokens,
                        latency_s,
                        cloud_s: (cloud.busy() - busy0).as_secs_f64(),
                        requests: st.requests,
                        bytes_up: st.bytes_up,
                        bytes_down: st.bytes_down,
                    },
                ))
            }
            Self::Mtls(m) => {
                let device = &m.device;
                let tokens = device.encode(q)?.ids.len();
                let s0 = device.stats();
                let t = Instant::now();
                let emb = Array1::from(device.embed(q)?);
                let latency_s = t.elapsed().as_secs_f64();
                let s1 = device.stats();
                Ok((
                    emb,
                    QueryCost {
                        tokens,
                        latency_s,
                        cloud_s: s1.cloud_eval_s - s0.cloud_eval_s,
                        requests: s1.round_trips - s0.round_trips,
                        bytes_up: s1.bytes_up - s0.bytes_up,
                        bytes_down: s1.bytes_down - s0.bytes_down,
                    },
                ))
            }
        }
    }

    fn close(self) {
        if let Self::Mtls(m) = self {
            m.device.close();
            m.rt.block_on(m.server.shutdown());
        }
    }
}

/// Starts a `tandem-cloud` server on 127.0.0.1 serving the bundle (a MiniLM directory is
/// imported into a temporary one, signed with the development key) with a throw-away PKI, and
/// connects the device's encoder to it over mutual TLS; uploads the evaluation key.
fn start_mtls(model: &MiniLm, mode: OutputMode, progress: &ProgressBar) -> anyhow::Result<Backend> {
    let tmp = tempfile::tempdir()?;
    let (bundle_dir, vk) = match &model.bundle {
        Some((dir, key)) => (
            dir.clone(),
            read_verifying_key(key)
                .with_context(|| format!("reading the verifying key {}", key.display()))?,
        ),
        None => {
            progress.set_message("importing into a bundle");
            let out = tmp.path().join("all-minilm-l6-v2");
            let sk = dev_signing_key();
            import_bert(&model.dir, &out, "all-minilm-l6-v2", 16, &sk).with_context(|| {
                format!("importing {} into a temporary bundle", model.dir.display())
            })?;
            (out, sk.verifying_key())
        }
    };
    progress.set_message("cloud: planning the layers");
    let pki = DevPki::generate(1)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let opts = ServerOptions::new(
        "127.0.0.1:0".parse()?,
        server_config(pki.server_credentials())?,
        vk,
        tmp.path().join("keys.redb"),
    );
    // Served in the demo's mode only (the other mode's layers would double the memory) and
    // under the default parameter set only (the one the device below offers), up to the HE
    // engine's batch (the bundle's blobs are sized for its own signed batch).
    let mut opts = super::sentence::loopback_options(opts, &bundle_dir, mode, 2);
    // One known device on loopback: generous handshake budgets, so a machine busy with other
    // work cannot make the demo's own connection miss them (the defaults are tuned against
    // slow-byte attackers, 1 s for the TLS ClientHello).
    opts.admission.client_hello_timeout = Duration::from_secs(60);
    opts.admission.handshake_timeout = Duration::from_secs(60);
    opts.admission.first_message_timeout = Duration::from_secs(60);
    let server = rt.block_on(Cloud::start(opts)).with_context(|| {
        format!(
            "starting the cloud on loopback with {}",
            bundle_dir.display()
        )
    })?;
    progress.set_message("device: mTLS session, key");
    let device_part = Bundle::load_part(&bundle_dir, &vk, &Limits::default(), Part::Device)
        .with_context(|| format!("loading the device part of {}", bundle_dir.display()))?;
    let remote = Arc::new(RemoteLayers::connect(
        server.local_addr(),
        "localhost",
        client_config(pki.client_credentials("device-1")?)?,
        &device_part,
        mode,
        &[DEFAULT_PARAMETERS.id],
        Duration::from_secs(120),
    )?);
    // The app-facing API: what an app linking the library does.
    let device = SentenceDevice::with_remote(&device_part, remote.clone())?;
    let key_upload_bytes = usize::try_from(device.stats().key_upload_bytes)?;
    Ok(Backend::Mtls(Box::new(Mtls {
        device,
        key_upload_bytes,
        server,
        rt,
        bundle: bundle_dir,
        _tmp: tmp,
    })))
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn print_report(r: &DemoJson) {
    println!(
        "tandem demo — private semantic search with all-MiniLM-L6-v2 ({})",
        r.model
    );
    println!(
        "device: {} corpus sentences indexed locally in {:.2} s (float; the index never leaves the device)",
        r.corpus_sentences, r.corpus_embed_s
    );
    println!(
        "cloud: every linear layer of each query under encryption ({}, {}), ready in {:.1} s, evaluation key {:.2} MB uploaded once",
        r.mode,
        r.path,
        r.load_s,
        r.key_upload_bytes as f64 / 1e6
    );
    for q in &r.queries {
        println!();
        println!("query: {:?}", q.query);
        println!(
            "  {} tokens, {:.2} s ({:.2} s cloud evaluation), {} requests, {:.2} MB up, {:.2} MB down; cosine to the float embedding {:.5}; same hits as float: {}",
            q.tokens,
            q.latency_s,
            q.cloud_s,
            q.requests,
            q.bytes_up as f64 / 1e6,
            q.bytes_down as f64 / 1e6,
            q.cosine_vs_float,
            if q.same_hits_as_float { "yes" } else { "no" }
        );
        println!(
            "  {:<56} | {:<56}",
            "encrypted query", "float query (reference)"
        );
        for (a, b) in q.hits.iter().zip(&q.float_hits) {
            println!(
                "  {:.3} {:<50} | {:.3} {:<50}",
                a.score,
                short(&a.text, 50),
                b.score,
                short(&b.text, 50)
            );
        }
    }
}
