//! The device-side profile of a split encoder (issue 10, TDM-SPLIT-2): what each graph step
//! costs on this machine for one sentence of a given token count, measured once and cached in
//! a small JSON file, from which the planner prices every split depth without running it.
//!
//! [`BundleEncoder::profile`] runs the graph `reps` times with every linear on the device
//! (split depth = all blocks: each op's time and each linear's in-the-clear time) and `reps`
//! times with every linear offloaded to the encoder's cloud (split depth 0: each linear's
//! encryption, decryption, quantisation and cloud time, and its request bytes), and keeps the
//! median of each step. The cloud time is the cloud's evaluation only when the cloud is an
//! [`crate::InProcessCloud`] (what `tandem plan` uses); over a network it would include the
//! transport.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bundle::StepTime;
use crate::sentence::Encoded;
use crate::{BundleEncoder, OpsError};

/// Version of the profile file format.
pub const PROFILE_FORMAT: u32 = 1;
/// Largest profile file read (bytes).
const MAX_PROFILE_BYTES: u64 = 1 << 20;
/// Most encoder blocks a profile may name (all-MiniLM-L6-v2 has 6; BERT-large 24).
pub const MAX_PROFILE_BLOCKS: usize = 256;
/// Most tokens a profiled sentence may have.
const MAX_PROFILE_TOKENS: usize = 1 << 16;
/// Most bytes one linear's requests (or replies, or the key) may count (1 TiB): sums over
/// every linear of a profile cannot overflow `u64`.
const MAX_PROFILE_BYTES_PER_ITEM: u64 = 1 << 40;
/// Longest step time a profile may hold, ms (one day).
const MAX_STEP_MS: f64 = 86_400_000.0;

/// One non-linear graph step (runs on the device at every split depth).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpProfile {
    /// Position in the graph.
    pub step: usize,
    /// Op name (`embedding`, `layer_norm`, `attention`, ...).
    pub op: String,
    /// Median wall time, ms.
    pub ms: f64,
}

/// One linear layer: its cost in the clear on the device and offloaded under encryption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearProfile {
    /// Protocol `layer_id` (index in `[encoder] linears`).
    pub index: usize,
    /// Name.
    pub name: String,
    /// Block (runs on the device at split depths `> block`).
    pub block: usize,
    /// Input width.
    pub n_in: usize,
    /// Output width.
    pub n_out: usize,
    /// Multiply-adds for the profiled sentence (`tokens · n_in · n_out`).
    pub macs: u64,
    /// Median wall time in the clear on the device (quantise, int8 product, dequantise), ms.
    pub local_ms: f64,
    /// Median time to quantise, encrypt and encode the requests, ms.
    pub encrypt_ms: f64,
    /// Median time to decode and decrypt the replies, ms.
    pub decrypt_ms: f64,
    /// Median rest of the offloaded step on the device (quantise, dequantise, bias), ms.
    pub offload_other_ms: f64,
    /// Median time waiting for the cloud (in process: its evaluation), ms.
    pub cloud_ms: f64,
    /// Requests per sentence (`⌈tokens / batch⌉`).
    pub requests: u64,
    /// Request blob bytes per sentence (`Σ LayerPlan::upload_bytes(rows)`).
    pub upload_bytes: u64,
    /// Reply blob bytes per sentence (`Σ LayerPlan::download_bytes(rows)`).
    pub download_bytes: u64,
}

/// The profile of one encoder bundle at one token count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitProfile {
    /// [`PROFILE_FORMAT`].
    pub format: u32,
    /// Model id of the bundle.
    pub model: String,
    /// SHA-256 of the bundle's signed manifest (hex): a profile applies to this bundle only.
    pub model_digest: String,
    /// Tokens of the profiled sentence.
    pub tokens: usize,
    /// Rows per cloud request.
    pub batch: usize,
    /// Blocks of the encoder.
    pub blocks: usize,
    /// Runs per placement the medians are over.
    pub reps: usize,
    /// Evaluation-key bytes (packed mode; uploaded once per session).
    pub key_bytes: u64,
    /// The non-linear steps.
    pub ops: Vec<OpProfile>,
    /// The linear layers, by index.
    pub linears: Vec<LinearProfile>,
}

impl SplitProfile {
    /// Reads a cached profile.
    ///
    /// # Errors
    /// [`OpsError::Io`] if the file cannot be read, [`OpsError::FileTooLarge`] above 1 MiB,
    /// [`OpsError::Config`] if it is not a profile of this format (delete it to re-profile),
    /// [`OpsError::InvalidConfig`] if its values are out of range or inconsistent
    /// ([`SplitProfile::validate`]): the file is input the device reads, it is checked before
    /// anything is sized or summed by it.
    pub fn read(path: &Path) -> Result<Self, OpsError> {
        if path.is_dir() {
            return Err(OpsError::InvalidConfig {
                path: path.to_path_buf(),
                reason: "is a directory, not a split-profile file: pass a file path (it is \
                         created when absent)"
                    .to_string(),
            });
        }
        let bytes = crate::weights::read_limited(path, MAX_PROFILE_BYTES)?;
        let p: SplitProfile =
            serde_json::from_slice(&bytes).map_err(|source| OpsError::Config {
                path: path.to_path_buf(),
                source,
            })?;
        if p.format != PROFILE_FORMAT {
            return Err(OpsError::InvalidConfig {
                path: path.to_path_buf(),
                reason: format!(
                    "profile format {} (this build writes {PROFILE_FORMAT}): delete the file to \
                     re-profile",
                    p.format
                ),
            });
        }
        p.validate().map_err(|reason| OpsError::InvalidConfig {
            path: path.to_path_buf(),
            reason: format!("not a usable split profile: {reason}; delete the file to re-profile"),
        })?;
        Ok(p)
    }

    /// Checks that the profile is consistent and its values in range: at least one and at
    /// most [`MAX_PROFILE_BLOCKS`] blocks, `tokens` in `1..=65536`, `batch` and `reps` ≥ 1,
    /// at least one linear, linear `i` has index `i` and a block `< blocks`, every block has a
    /// linear, `requests` in `1..=tokens`, `macs ≤ tokens · n_in · n_out`, byte counts
    /// ≤ 2^40 each, every time finite in `[0, 86 400 000]` ms.
    ///
    /// # Errors
    /// What is wrong, as text (the caller names the file).
    pub fn validate(&self) -> Result<(), String> {
        if self.blocks == 0 || self.blocks > MAX_PROFILE_BLOCKS {
            return Err(format!(
                "blocks {} outside 1..={MAX_PROFILE_BLOCKS}",
                self.blocks
            ));
        }
        if self.tokens == 0 || self.tokens > MAX_PROFILE_TOKENS {
            return Err(format!(
                "tokens {} outside 1..={MAX_PROFILE_TOKENS}",
                self.tokens
            ));
        }
        if self.batch == 0 || self.reps == 0 {
            return Err("batch and reps must be at least 1".to_string());
        }
        if self.key_bytes > MAX_PROFILE_BYTES_PER_ITEM {
            return Err(format!("key_bytes {} too large", self.key_bytes));
        }
        if self.linears.is_empty() {
            return Err("no linear layer".to_string());
        }
        let time = |what: &str, ms: f64| {
            if ms.is_finite() && (0.0..=MAX_STEP_MS).contains(&ms) {
                Ok(())
            } else {
                Err(format!(
                    "{what}: {ms} ms is not a time in [0, {MAX_STEP_MS}] ms"
                ))
            }
        };
        for o in &self.ops {
            time(&format!("op {} ({})", o.step, o.op), o.ms)?;
        }
        let mut seen = vec![false; self.blocks];
        for (i, l) in self.linears.iter().enumerate() {
            let at = format!("linear {i}");
            if l.index != i {
                return Err(format!("{at} has index {}", l.index));
            }
            match seen.get_mut(l.block) {
                Some(s) => *s = true,
                None => {
                    return Err(format!(
                        "{at} in block {} of {} blocks",
                        l.block, self.blocks
                    ))
                }
            }
            if l.requests == 0 || l.requests > self.tokens as u64 {
                return Err(format!(
                    "{at}: {} requests for {} tokens",
                    l.requests, self.tokens
                ));
            }
            let most_macs = (self.tokens as u64)
                .checked_mul(l.n_in as u64)
                .and_then(|x| x.checked_mul(l.n_out as u64));
            if most_macs.is_none_or(|m| l.macs > m) {
                return Err(format!(
                    "{at}: {} multiply-adds for {} tokens of {}x{}",
                    l.macs, self.tokens, l.n_in, l.n_out
                ));
            }
            if l.upload_bytes > MAX_PROFILE_BYTES_PER_ITEM
                || l.download_bytes > MAX_PROFILE_BYTES_PER_ITEM
            {
                return Err(format!("{at}: byte counts too large"));
            }
            time(&format!("{at} local"), l.local_ms)?;
            time(&format!("{at} encrypt"), l.encrypt_ms)?;
            time(&format!("{at} decrypt"), l.decrypt_ms)?;
            time(&format!("{at} offload rest"), l.offload_other_ms)?;
            time(&format!("{at} cloud"), l.cloud_ms)?;
        }
        if let Some(b) = seen.iter().position(|s| !s) {
            return Err(format!("block {b} has no linear layer"));
        }
        Ok(())
    }

    /// Writes the profile as JSON (parent directories created), atomically: to a file of its
    /// own beside `path` (named by process id and a counter), then renamed over `path`, so a reader never sees
    /// half a profile and concurrent writers each leave a whole one.
    ///
    /// # Errors
    /// [`OpsError::Io`] if it cannot be written.
    pub fn write(&self, path: &Path) -> Result<(), OpsError> {
        let io = |source| OpsError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let json = serde_json::to_vec_pretty(self).map_err(|source| OpsError::Config {
            path: path.to_path_buf(),
            source,
        })?;
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}-{n}.tmp", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        // A failed write (disk full) or rename leaves no temporary file behind.
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io(e)
            })
    }

    /// Device time of the non-linear steps (the same at every split depth), ms.
    #[must_use]
    pub fn ops_ms(&self) -> f64 {
        self.ops.iter().map(|o| o.ms).sum()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl BundleEncoder {
    /// Profiles this encoder on `e` (see the module docs): `reps` (≥ 1) runs all on the
    /// device and `reps` runs all offloaded, after one warm-up run of each. `model` and
    /// `model_digest` name the bundle in the profile. In packed mode the evaluation key must
    /// have been uploaded ([`BundleEncoder::upload_key`]); `key_bytes` is recorded as given.
    ///
    /// # Errors
    /// [`OpsError::Split`] unless both split depth 0 and all blocks can run (encrypted path,
    /// bundle loaded with its cloud weights file); the graph's errors.
    pub fn profile(
        &self,
        e: &Encoded,
        reps: usize,
        model: &str,
        model_digest: &str,
        key_bytes: u64,
    ) -> Result<SplitProfile, OpsError> {
        let reps = reps.max(1);
        let blocks = self.blocks();
        let kinds = self.step_kinds();
        let mut runs: [Vec<Vec<StepTime>>; 2] = [Vec::new(), Vec::new()];
        for (slot, k) in [(0usize, blocks), (1usize, 0usize)] {
            // Checks the depth and warms caches up.
            self.embed_encoded_split(e, k)?;
            for _ in 0..reps {
                let mut t = vec![StepTime::default(); kinds.len()];
                self.run(e, k, Some(&mut t))?;
                if let Some(r) = runs.get_mut(slot) {
                    r.push(t);
                }
            }
        }
        let [local_runs, offload_runs] = runs;
        let med = |runs: &[Vec<StepTime>], step: usize, f: &dyn Fn(&StepTime) -> f64| {
            median(runs.iter().filter_map(|r| r.get(step)).map(f).collect()) * 1e3
        };
        let mut ops = Vec::new();
        let mut linears: Vec<Option<LinearProfile>> = vec![None; self.linear_count()];
        let tokens = e.ids.len();
        for (step, (op, linear)) in kinds.iter().enumerate() {
            let Some(index) = *linear else {
                ops.push(OpProfile {
                    step,
                    op: (*op).to_string(),
                    ms: med(&local_runs, step, &|t| t.total_s),
                });
                continue;
            };
            let (n_in, n_out) = self.linear_shape(index).unwrap_or((0, 0));
            let first = offload_runs.first().and_then(|r| r.get(step));
            let encrypt_ms = med(&offload_runs, step, &|t| t.encrypt_s);
            let decrypt_ms = med(&offload_runs, step, &|t| t.decrypt_s);
            let cloud_ms = med(&offload_runs, step, &|t| t.cloud_s);
            let total = med(&offload_runs, step, &|t| t.total_s);
            let name = self.linear_name(index).unwrap_or_default();
            if let Some(slot) = linears.get_mut(index) {
                *slot = Some(LinearProfile {
                    index,
                    name,
                    block: self.block_of(index).unwrap_or(0),
                    n_in,
                    n_out,
                    macs: (tokens * n_in * n_out) as u64,
                    local_ms: med(&local_runs, step, &|t| t.total_s),
                    encrypt_ms,
                    decrypt_ms,
                    offload_other_ms: (total - encrypt_ms - decrypt_ms - cloud_ms).max(0.0),
                    cloud_ms,
                    requests: first.map_or(0, |t| t.requests),
                    upload_bytes: first.map_or(0, |t| t.bytes_up),
                    download_bytes: first.map_or(0, |t| t.bytes_down),
                });
            }
        }
        let linears = linears
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                l.ok_or_else(|| OpsError::Split {
                    requested: 0,
                    blocks,
                    reason: format!("linear {i} is not used by the graph: cannot profile it"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SplitProfile {
            format: PROFILE_FORMAT,
            model: model.to_string(),
            model_digest: model_digest.to_string(),
            tokens,
            batch: self.batch(),
            blocks,
            reps,
            key_bytes,
            ops,
            linears,
        })
    }
}
