//! `tandem embed` and `tandem bench sentence` (issue 8): a sentence encoder bundle run on the
//! device with every linear layer computed by the cloud under encryption, over mutual TLS —
//! a cloud given with `--cloud`, or a loopback cloud started in this process with a throwaway
//! development PKI.
//!
//! Byte counts are protocol frame bytes on the session (TLS plaintext, TLS record overhead not
//! included); `cloud_s` is the evaluation time the cloud reported in its answers
//! (`InferResponse.cloud_eval_us`, summed; advisory), `wait_s` the time the device waited for
//! answers (evaluation plus queueing and loopback transport), `device_s` the rest of the
//! end-to-end time (device ops, encryption, decryption).
//!
//! Both commands go through the app-facing [`tandem_device::SentenceDevice`] (one code path
//! with the library); `bench sentence --pipeline N` measures its pipelined
//! [`tandem_device::SentenceDevice::embed_batch`] against sentences one after the other.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use tandem_cloud::{Cloud, ModelPolicy, ServerOptions};
use tandem_device::planner::LinkEstimate;
use tandem_device::{RemoteLayers, SentenceDevice, SentenceStats};
use tandem_model::{read_verifying_key, Bundle, Limits, Part, VerifyingKey};
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
    /// HE output mode of the cloud layers: `packed` (one evaluation-key upload per session,
    /// small answers) or `nokey` (nothing uploaded, larger answers); the cloud must serve the
    /// model in that mode.
    #[arg(long, default_value = "packed")]
    pub mode: String,
    /// Without `--cloud`: route the session through a shaped loopback link with this
    /// round-trip time in ms (`bench traces`' paced proxy, at `--link-mbit`).
    #[arg(long)]
    pub link_rtt_ms: Option<f64>,
    /// With `--link-rtt-ms`: the link's bandwidth in Mbit/s (both directions).
    #[arg(long, default_value_t = 1000.0)]
    pub link_mbit: f64,
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
    /// Pipelining across inferences: per `--tokens` value, embed `--sentences` sentences one
    /// after the other, then with this many in flight on the one session; one JSON line each
    /// (keys `pipeline`, `sentences`, `sentences_per_s`).
    #[arg(long)]
    pub pipeline: Option<usize>,
    /// With `--pipeline`: sentences per run.
    #[arg(long, default_value_t = 8)]
    pub sentences: usize,
    /// The cloud.
    #[command(flatten)]
    pub cloud: CloudArgs,
    /// Split depth (issue 10): `--split`, `--bandwidth`, `--rtt`, `--reps` (sentence_split.rs).
    #[command(flatten)]
    pub split: super::sentence_split::SplitArgs,
}

/// Loads the encoder bundle at `model` (part `part`), verified with the key at `key`
/// (warning on stderr when it is the public development key); returns it with that key.
///
/// # Errors
/// The key or bundle cannot be read or verified, or the bundle has no `[encoder]` section.
pub(super) fn load_encoder_bundle(
    model: &Path,
    key: &Path,
    part: Part,
) -> anyhow::Result<(Bundle, VerifyingKey)> {
    let vk = read_verifying_key(key).with_context(|| format!("verifying key {}", key.display()))?;
    if tandem_model::is_dev_key(&vk) {
        eprintln!(
            "warning: verifying with the public DEVELOPMENT key {}: use your own key outside \
             development",
            key.display()
        );
    }
    let bundle = Bundle::load_part(model, &vk, &Limits::default(), part).with_context(|| {
        if part == Part::Full {
            format!(
                "loading {} with its cloud weights file (the device runs the blocks before the \
                 split in the clear with their int8 weights)",
                model.display()
            )
        } else {
            format!("loading the bundle {}", model.display())
        }
    })?;
    if bundle.encoder().is_none() {
        bail!(
            "{} is not an encoder bundle (no [encoder] section): make one with `tandem model \
             import-bert`",
            model.display()
        );
    }
    Ok((bundle, vk))
}

/// The loopback cloud's serving options on top of `o` (address, credentials, key, store): the
/// bundle `model` in `mode` only, the HE engine's largest batch, parallel evaluation when
/// `threads > 1`, and the default parameter set only.
pub(super) fn loopback_options(
    mut o: ServerOptions,
    model: &Path,
    mode: tandem_he::OutputMode,
    threads: usize,
) -> ServerOptions {
    o.models = vec![model.to_path_buf()];
    o.policies = vec![(
        model.to_path_buf(),
        ModelPolicy {
            packed: mode == tandem_he::OutputMode::Packed,
            nokey: mode == tandem_he::OutputMode::NoKey,
        },
    )];
    // An encoder bundle's blobs are sized for its own signed batch whatever max_batch is.
    o.resources.max_batch = tandem_he::limits::MAX_BATCH as u16;
    o.parallel_eval = threads > 1;
    // The device offers the default set only (`Endpoint::connect`): another set's layers would
    // be prepared for nothing (as much memory again, ≈ 2 GB for MiniLM under set 1).
    o.param_sets = vec![tandem_he::DEFAULT_PARAMETERS.id];
    o
}

/// Where the device session goes: `--cloud` with the PKI's credentials, or a loopback cloud
/// started in this process (throwaway development PKI) serving `model`, optionally behind a
/// shaped link (`bench traces`' paced proxy).
pub(super) struct Endpoint {
    pub addr: SocketAddr,
    pub server_name: String,
    pub tls: Arc<tandem_tls::rustls::ClientConfig>,
    /// The loopback cloud and its runtime, when this process started it.
    pub local: Option<(tokio::runtime::Runtime, Cloud)>,
}

impl Endpoint {
    /// `threads > 1` lets the loopback cloud evaluate in parallel; `tag` names its key store
    /// file in the temporary directory. The loopback cloud serves the bundle in `mode` only
    /// (the other mode's layers are not prepared: about half the memory and start-up time)
    /// under the default parameter set only (the one [`Endpoint::connect`] offers) and
    /// admits the HE engine's largest batch, so a bundle imported with any `--batch` is served.
    ///
    /// # Errors
    /// `--cloud` without `--pki`, unreadable credentials, or a loopback cloud that does not
    /// start.
    pub(super) fn open(
        model: &Path,
        c: &CloudArgs,
        vk: VerifyingKey,
        threads: usize,
        link: Option<LinkEstimate>,
        tag: &str,
        mode: tandem_he::OutputMode,
    ) -> anyhow::Result<Endpoint> {
        if let Some(addr) = c.cloud {
            let Some(pki) = &c.pki else {
                bail!("--cloud needs --pki <dir> (the device's credentials)");
            };
            let files = ClientFiles::from_pki_dir(pki, &c.device)?;
            return Ok(Endpoint {
                addr,
                server_name: c.server_name.clone(),
                tls: client_config_from_files(&files)?,
                local: None,
            });
        }
        let pki = DevPki::generate(1)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let store =
            std::env::temp_dir().join(format!("tandem-{tag}-{}-keys.redb", std::process::id()));
        // Port 0: the cloud binds it and reports the port (`local_addr`).
        let addr: std::net::SocketAddr = "127.0.0.1:0".parse()?;
        let o = ServerOptions::new(addr, server_config(pki.server_credentials())?, vk, store);
        let o = loopback_options(o, model, mode, threads);
        let cloud = rt.block_on(Cloud::start(o))?;
        let tls = client_config(pki.client_credentials("device-1")?)?;
        let addr = match link {
            Some(l) => rt.block_on(super::traces::ShapedLink::new(l).proxy(cloud.local_addr()))?,
            None => cloud.local_addr(),
        };
        Ok(Endpoint {
            addr,
            server_name: "localhost".to_string(),
            tls,
            local: Some((rt, cloud)),
        })
    }

    /// A [`RemoteLayers`] session to the endpoint for `bundle` in `mode` (offering every HE
    /// parameter set, the default first; the loopback cloud serves the default only;
    /// `io_timeout` bounds connect, handshake and each answer).
    ///
    /// # Errors
    /// The cloud cannot be reached or refuses the session.
    pub(super) fn connect(
        &self,
        bundle: &Bundle,
        mode: tandem_he::OutputMode,
        io_timeout: Duration,
    ) -> anyhow::Result<Arc<RemoteLayers>> {
        Ok(Arc::new(RemoteLayers::connect(
            self.addr,
            &self.server_name,
            self.tls.clone(),
            bundle,
            mode,
            // Every set this build implements, the default first: a `--cloud` serving only
            // set 1 is met on set 1 (the session's encoder is planned under the set chosen).
            &tandem_device::default_param_sets(),
            io_timeout,
        )?))
    }

    /// Stops the loopback cloud, if this process started one.
    pub(super) fn shutdown(self) {
        if let Some((rt, cloud)) = self.local {
            rt.block_on(cloud.shutdown());
        }
    }
}

/// A device session against the cloud, with its encoder (key uploaded).
struct Session {
    remote: Arc<RemoteLayers>,
    device: SentenceDevice,
    key_upload_bytes: u64,
    /// The shaped loopback link's RTT, if any (`--link-rtt-ms`).
    link_rtt_ms: Option<f64>,
    model: String,
    /// Where the session goes (and the loopback cloud, when this process started it).
    endpoint: Endpoint,
}

impl Session {
    fn open(model: &Path, c: &CloudArgs, threads: usize) -> anyhow::Result<Session> {
        let (bundle, vk) = load_encoder_bundle(model, &c.key, Part::Device)?;
        let link = c.link_rtt_ms.map(|rtt_ms| LinkEstimate {
            bandwidth_bps: c.link_mbit * 1e6,
            rtt_ms,
        });
        let mode = super::eval::parse_mode(&c.mode)?;
        let endpoint = Endpoint::open(model, c, vk, threads, link, "sentence", mode)?;
        let remote = endpoint.connect(&bundle, mode, Duration::from_secs(120))?;
        let device = SentenceDevice::with_remote(&bundle, remote.clone())?;
        let key_upload_bytes = remote.stats().key_upload_bytes;
        Ok(Session {
            remote,
            device,
            key_upload_bytes,
            link_rtt_ms: c.link_rtt_ms.filter(|_| c.cloud.is_none()),
            model: bundle.id().to_string(),
            endpoint,
        })
    }

    fn close(self) {
        self.remote.close();
        self.endpoint.shutdown();
    }
}

/// `tandem embed`: prints the embedding as JSON.
pub fn embed(a: EmbedArgs) -> anyhow::Result<()> {
    let s = Session::open(&a.model, &a.cloud, 1)?;
    let e = s.device.encode(&a.text)?;
    let t = Instant::now();
    let v = s.device.embed_encoded(&e)?;
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
        "cloud_s": st.cloud_eval_s,
        "embedding": v,
    });
    println!("{}", serde_json::to_string(&out)?);
    s.close();
    Ok(())
}

/// The keys every `bench sentence` JSON line carries (with or without `--split`).
#[derive(Serialize)]
pub(super) struct RunLine {
    pub model: String,
    pub tokens: usize,
    pub threads: usize,
    pub e2e_s: f64,
    pub cloud_s: f64,
    pub device_s: f64,
    pub round_trips: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub key_upload_bytes: u64,
    pub encrypted_macs: u64,
    pub s_per_token: f64,
    pub bytes_per_token: f64,
    /// How bytes are counted.
    pub bytes_counted: &'static str,
    /// Seconds the device waited for answers, summed over requests (evaluation + queueing +
    /// transport; overlapping requests each count).
    pub wait_s: f64,
    /// Where `cloud_s` comes from.
    pub cloud_s_source: &'static str,
    /// HE output mode.
    pub output_mode: &'static str,
}

#[derive(Serialize)]
struct BenchLine {
    #[serde(flatten)]
    run: RunLine,
    /// Sentences embedded in this run.
    sentences: u64,
    /// Sentences in flight at once (`embed_batch` pipeline; 1 = one after the other).
    pipeline: usize,
    /// Most requests in flight at once on the session during the run.
    max_in_flight: u64,
    /// Throughput: sentences / `e2e_s`.
    sentences_per_s: f64,
    /// RTT of the shaped loopback link (`--link-rtt-ms`; `null`: plain loopback).
    link_rtt_ms: Option<f64>,
}

/// One JSON line for a run of `sentences` sentences of `tokens` tokens that took `e2e` s, from
/// the counters `before` it and now.
fn bench_line(
    s: &Session,
    tokens: usize,
    threads: usize,
    pipeline: usize,
    e2e: f64,
    before: &SentenceStats,
) -> BenchLine {
    let after = s.device.stats();
    let up = after.bytes_up - before.bytes_up;
    let down = after.bytes_down - before.bytes_down;
    let sentences = after.sentences - before.sentences;
    let wait_s = after.wait_s - before.wait_s;
    let cloud_s = after.cloud_eval_s - before.cloud_eval_s;
    let device_busy = (after.encrypt_s - before.encrypt_s) + (after.decrypt_s - before.decrypt_s);
    BenchLine {
        run: RunLine {
            model: s.model.clone(),
            tokens,
            threads,
            e2e_s: e2e,
            cloud_s,
            // One after the other: everything but the waits. Pipelined, the waits overlap device
            // work, so the sum of waits says little; then at least the HE work of the device.
            device_s: if pipeline <= 1 {
                (e2e - wait_s).max(0.0)
            } else {
                device_busy
            },
            round_trips: after.round_trips - before.round_trips,
            bytes_up: up,
            bytes_down: down,
            // Packed: the key sent at connect; no-key: the registration frame of the first request.
            key_upload_bytes: after.key_upload_bytes,
            encrypted_macs: after.encrypted_macs - before.encrypted_macs,
            s_per_token: e2e / (tokens as f64 * sentences.max(1) as f64),
            bytes_per_token: (up + down) as f64 / (tokens as f64 * sentences.max(1) as f64),
            bytes_counted: "protocol frames on the mTLS session (TLS plaintext)",
            wait_s,
            cloud_s_source: "cloud-reported evaluation time (InferResponse.cloud_eval_us), summed",
            output_mode: s.remote.mode().name(),
        },
        sentences,
        pipeline,
        max_in_flight: after.max_in_flight,
        sentences_per_s: sentences as f64 / e2e.max(f64::MIN_POSITIVE),
        link_rtt_ms: s.link_rtt_ms,
    }
}

/// `bench sentence --pipeline N`: for each `--tokens` value, `--sentences` sentences one after
/// the other, then the same with N in flight (`SentenceDevice::embed_batch`); one JSON line
/// each, with the throughput.
fn bench_pipeline(
    mut s: Session,
    a: &BenchArgs,
    threads: usize,
    pipeline: usize,
) -> anyhow::Result<()> {
    let n = a.sentences.max(1);
    for &tokens in &a.tokens {
        let e = super::plan_encoder::sentence(s.device.encoder(), tokens)?;
        let batch = vec![e; n];
        let mut lines = Vec::new();
        for p in [1, pipeline.max(1)] {
            s.device.set_pipeline(p);
            let before = s.device.stats();
            let t = Instant::now();
            s.device.embed_batch_encoded(&batch)?;
            let e2e = t.elapsed().as_secs_f64();
            let line = bench_line(&s, tokens, threads, p, e2e, &before);
            if !a.json {
                eprintln!(
                    "{n} sentences of {tokens} tokens, {p} in flight: {e2e:.2} s, {:.3} \
                     sentences/s ({} requests in flight at most)",
                    line.sentences_per_s, line.max_in_flight
                );
            }
            println!("{}", serde_json::to_string(&line)?);
            lines.push(line.sentences_per_s);
        }
        if let (false, [seq, pip]) = (a.json, lines.as_slice()) {
            eprintln!("pipelined / sequential throughput: {:.2}x", pip / seq);
        }
    }
    s.close();
    Ok(())
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
    if a.split.active() {
        let (m, c, t, j) = (&a.model, &a.cloud, &a.tokens, a.json);
        return super::sentence_split::bench(m, c, t, threads, j, &a.split);
    }
    let mut s = Session::open(&a.model, &a.cloud, threads)?;
    if let Some(pipeline) = a.pipeline {
        return bench_pipeline(s, &a, threads, pipeline);
    }
    for &tokens in &a.tokens {
        let e = super::plan_encoder::sentence(s.device.encoder(), tokens)?;
        let before = s.device.stats();
        let t = Instant::now();
        s.device.embed_encoded(&e)?;
        let e2e = t.elapsed().as_secs_f64();
        let line = bench_line(&s, tokens, threads, 1, e2e, &before);
        if !a.json {
            eprintln!(
                "{tokens} tokens, {threads} thread(s): {e2e:.2} s end to end ({:.2} s cloud \
                 evaluation, {:.2} s waiting for the cloud), {} round trips, {} B up, {} B down",
                line.run.cloud_s,
                line.run.wait_s,
                line.run.round_trips,
                line.run.bytes_up,
                line.run.bytes_down
            );
        }
        println!("{}", serde_json::to_string(&line)?);
    }
    s.device.set_pipeline(1);
    s.close();
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The loopback cloud of `embed` / `bench sentence` prepared every layer under every
    /// parameter set although its device offers only the default one: MiniLM's `bench sentence`
    /// peaked at 3.46 GB, 1.62 GB with the default set only. Now a session offering set 1 is
    /// refused (nothing is prepared for it) and the default set is negotiated, over mTLS
    /// (digits stands in for an encoder bundle: the options do not depend on the model).
    #[test]
    fn loopback_cloud_serves_the_default_parameter_set_only() {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let model = repo.join("models/digits");
        let vk = read_verifying_key(&repo.join("models/dev-verifying-key.txt")).unwrap();
        let pki = DevPki::generate(1).unwrap();
        let store = std::env::temp_dir().join(format!(
            "tandem-unit-param-sets-{}-keys.redb",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&store);
        let mode = tandem_he::OutputMode::Packed;
        let o = ServerOptions::new(
            "127.0.0.1:0".parse().unwrap(),
            server_config(pki.server_credentials()).unwrap(),
            vk,
            store.clone(),
        );
        let mut o = loopback_options(o, &model, mode, 1);
        // digits' packed answers for 64 rows exceed the protocol's ciphertext cap.
        o.resources.max_batch = 16;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tls = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
        let ledger = store.with_extension("ledger");
        let old: Vec<u16> = tandem_he::ALL_PARAMETER_SETS
            .iter()
            .map(|p| p.id)
            .filter(|&id| id != tandem_he::DEFAULT_PARAMETERS.id)
            .collect();
        assert!(!old.is_empty());
        rt.block_on(async {
            let cloud = Cloud::start(o).await.unwrap();
            let opts = tandem_device::DeviceOptions::new(
                cloud.local_addr(),
                tls,
                model.clone(),
                vk,
                ledger.clone(),
            );
            // A device offering every set (the default) gets the default set…
            let dev = tandem_device::Device::connect(opts.clone()).await.unwrap();
            assert_eq!(dev.parameter_set(), tandem_he::DEFAULT_PARAMETERS);
            dev.close().await;
            // … and one offering only the older sets is refused: none is served.
            let mut o1 = opts;
            o1.param_sets = old;
            let r = tandem_device::Device::connect(o1).await;
            assert!(
                matches!(
                    r,
                    Err(tandem_device::DeviceError::Closed(
                        tandem_protocol::ErrorCode::UnsupportedParameters
                    ))
                ),
                "expected Closed(UnsupportedParameters), got {:?}",
                r.err()
            );
            cloud.shutdown().await;
        });
        let _ = std::fs::remove_file(&ledger);
        let _ = std::fs::remove_file(&store);
    }
}
