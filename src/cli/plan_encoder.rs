//! `tandem plan` for an encoder bundle (`[encoder]`, e.g. all-MiniLM-L6-v2 from `tandem model
//! import-bert`): every split depth `k` (blocks `< k` on the device in the clear, the linears
//! of the rest offloaded encrypted; `k = blocks` is Local) priced by
//! `tandem_device::planner::plan_split` (`specs/planner.md` §9, TDM-SPLIT-2).
//!
//! The device side is a profile measured once and cached as JSON ([`tandem_ops::SplitProfile`]):
//! `--profile PATH`, by default `$TANDEM_CACHE/split-profiles/<model>-<digest>-t<tokens>.json`
//! (`TANDEM_CACHE` defaults to `~/.cache/tandem`). Profiling runs the bundle's graph on a
//! sentence of `--tokens` tokens three times with every linear in the clear and three times
//! with every linear encrypted against an in-process cloud (packed mode, evaluation over
//! rayon's pool as the loopback cloud of `tandem bench sentence` runs it); it needs the
//! bundle's cloud weights file. A cached file is reused as long as it names the same bundle
//! digest and token count; delete it to measure again (e.g. after the device's load changed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use serde::Serialize;
use tandem::device::energy::Radio;
use tandem::device::planner::{plan_split, LinkEstimate, Objective, SplitOptions, SplitPlan};
use tandem::he::{Context, EvalOptions, OutputMode, DEFAULT_PARAMETERS};
use tandem::model::Bundle;
use tandem_ops::{BundleEncoder, BundleLinears, Encoded, InProcessCloud, SplitProfile};

/// Runs per placement a profile's medians are over.
const PROFILE_REPS: usize = 3;

/// What `tandem plan` passes for an encoder bundle.
pub struct EncoderPlanArgs {
    /// Bundle directory.
    pub model: PathBuf,
    /// Link (`LinkEstimate::NONE` for no link).
    pub link: LinkEstimate,
    /// Radio for the energy model.
    pub radio: Radio,
    /// Minimise energy instead of latency.
    pub energy: bool,
    /// Print every candidate.
    pub explain: bool,
    /// Print one JSON line per candidate.
    pub json: bool,
    /// Sentence length priced, tokens (special tokens included).
    pub tokens: usize,
    /// Profile file (default: the cache path).
    pub profile: Option<PathBuf>,
    /// Latency target, ms.
    pub latency_target_ms: Option<f64>,
    /// The evaluation key is not registered with the cloud yet.
    pub key_not_registered: bool,
}

/// The default profile path of `bundle` at `tokens` tokens.
pub fn default_profile_path(bundle: &Bundle, tokens: usize) -> PathBuf {
    let cache = std::env::var_os("TANDEM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tandem")))
        .unwrap_or_else(|| std::env::temp_dir().join("tandem"));
    let digest = hex(&bundle.digest());
    let id: String = bundle
        .id()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    cache.join("split-profiles").join(format!(
        "{id}-{}-t{tokens}.json",
        digest.get(..16).unwrap_or(&digest)
    ))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The cached profile of `bundle` (loaded with its cloud part) at `tokens` tokens, measured
/// and written to `path` (default [`default_profile_path`]) when absent or made for another
/// bundle or length. Returns the profile and the depths the device can run.
pub fn load_or_profile(
    bundle: &Bundle,
    tokens: usize,
    path: Option<&Path>,
) -> anyhow::Result<(SplitProfile, PathBuf)> {
    let path = path.map_or_else(|| default_profile_path(bundle, tokens), Path::to_path_buf);
    let digest = hex(&bundle.digest());
    if path.exists() {
        let p = SplitProfile::read(&path).with_context(|| {
            format!(
                "reading the cached split profile {}: delete it (or pass another --profile) to \
                 measure again",
                path.display()
            )
        })?;
        if p.model_digest == digest && p.tokens == tokens {
            return Ok((p, path));
        }
        eprintln!(
            "{} profiles another bundle or length ({} tokens): profiling again",
            path.display(),
            p.tokens
        );
    }
    if bundle.cloud_layers().is_err() {
        bail!(
            "profiling {} needs its cloud weights file (the device runs blocks in the clear with \
             the int8 weights): load the full bundle directory",
            bundle.id()
        );
    }
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    let cloud = Arc::new(InProcessCloud::new(
        ctx.clone(),
        EvalOptions { parallel: true },
    ));
    let enc = BundleEncoder::from_bundle(
        bundle,
        BundleLinears::Encrypted {
            ctx,
            mode: OutputMode::Packed,
            cloud,
        },
    )?;
    let key_bytes = enc.upload_key()? as u64;
    let e = sentence(&enc, tokens)?;
    eprintln!(
        "profiling {} at {tokens} tokens ({PROFILE_REPS} runs in the clear, {PROFILE_REPS} \
         encrypted; once, cached in {})",
        bundle.id(),
        path.display()
    );
    let p = enc.profile(&e, PROFILE_REPS, bundle.id(), &digest, key_bytes)?;
    p.write(&path)
        .with_context(|| format!("caching the profile in {}", path.display()))?;
    Ok((p, path))
}

/// A tokenised sentence of exactly `tokens` tokens (special tokens included): a fixed English
/// text, truncated, its last token replaced by the separator.
///
/// # Errors
/// `tokens` outside `2..=max_seq_length`.
pub fn sentence(encoder: &BundleEncoder, tokens: usize) -> anyhow::Result<Encoded> {
    if tokens < 2 || tokens > encoder.max_seq_length() {
        bail!(
            "--tokens {tokens}: the model takes 2..={} tokens",
            encoder.max_seq_length()
        );
    }
    let text = "A device and a cloud share the work of a language model: the device keeps the \
                text, runs what it can in the clear and sends the rest encrypted, and the cloud \
                computes on ciphertexts it cannot read. "
        .repeat(16);
    let full = encoder.encode(&text)?;
    let (Some(&sep), true) = (full.ids.last(), full.ids.len() >= tokens) else {
        bail!("the profiling text is too short for {tokens} tokens");
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

/// Plans every depth of `profile` on `link`.
pub fn plan_for(
    profile: &SplitProfile,
    depths: Vec<usize>,
    link: LinkEstimate,
    radio: Radio,
    objective: Objective,
    key_registered: bool,
    latency_target_ms: Option<f64>,
) -> SplitPlan {
    let mut o = SplitOptions::all_depths(profile);
    o.depths = depths;
    o.radio = radio;
    o.objective = objective;
    o.key_registered = key_registered;
    o.latency_target_ms = latency_target_ms;
    plan_split(profile, link, &o)
}

#[derive(Serialize)]
struct CandidateLine<'a> {
    model: &'a str,
    tokens: usize,
    bandwidth_bps: f64,
    rtt_ms: f64,
    split: usize,
    local: bool,
    chosen: bool,
    predicted_e2e_ms: f64,
    device_ms: f64,
    cloud_ms: f64,
    network_ms: f64,
    bytes_up: u64,
    bytes_down: u64,
    round_trips: u64,
    energy_mj: f64,
    refused: Option<String>,
}

/// `tandem plan` for an encoder bundle (already loaded and verified, full).
pub fn run(bundle: &Bundle, a: EncoderPlanArgs) -> anyhow::Result<()> {
    let (profile, path) = load_or_profile(bundle, a.tokens, a.profile.as_deref())?;
    let depths: Vec<usize> = (0..=profile.blocks).collect();
    let objective = if a.energy {
        Objective::Energy
    } else {
        Objective::Latency
    };
    let p = plan_for(
        &profile,
        depths,
        a.link,
        a.radio,
        objective,
        !a.key_not_registered,
        a.latency_target_ms,
    );
    if a.json {
        for (i, c) in p.candidates.iter().enumerate() {
            let line = CandidateLine {
                model: bundle.id(),
                tokens: profile.tokens,
                bandwidth_bps: a.link.bandwidth_bps,
                rtt_ms: a.link.rtt_ms,
                split: c.depth,
                local: c.local,
                chosen: p.chosen == Some(i),
                predicted_e2e_ms: c.latency_ms,
                device_ms: c.device_ms,
                cloud_ms: c.cloud_ms,
                network_ms: c.network_ms,
                bytes_up: c.bytes_up,
                bytes_down: c.bytes_down,
                round_trips: c.round_trips,
                energy_mj: c.energy_mj,
                refused: c.refused.map(|r| format!("{r:?}")),
            };
            println!("{}", serde_json::to_string(&line)?);
        }
    } else {
        println!(
            "model {} ({}), {} blocks, {} linears, {} tokens; link {}, radio {}; device profile \
             {} (ops {:.1} ms; cloud time measured in process)",
            bundle.id(),
            a.model.display(),
            profile.blocks,
            profile.linears.len(),
            profile.tokens,
            if a.link.bandwidth_bps > 0.0 {
                format!(
                    "{:.3} Mbit/s, RTT {} ms",
                    a.link.bandwidth_bps / 1e6,
                    a.link.rtt_ms
                )
            } else {
                "none".to_string()
            },
            a.radio.name(),
            path.display(),
            profile.ops_ms(),
        );
        if a.explain {
            print!("{}", p.explain());
        } else {
            match p.choice() {
                Some(c) => println!(
                    "choice: {} ({:.1} ms, {:.1} mJ)",
                    c.name(),
                    c.latency_ms,
                    c.energy_mj
                ),
                None => println!("no feasible candidate (run with --explain for the reasons)"),
            }
        }
    }
    if p.chosen.is_none() {
        bail!("no feasible split depth on this link");
    }
    Ok(())
}
