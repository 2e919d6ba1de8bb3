//! Vector runner (`tandem-conformance vectors DIR`).

use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tandem_protocol::*;

use crate::{hexutil, json as mj, transcript};

/// Outcome counts.
#[derive(Debug, Default)]
pub struct Tally {
    /// Vectors passed.
    pub passed: usize,
    /// Vectors failed.
    pub failed: usize,
    /// Vectors skipped.
    pub skipped: usize,
}

impl Tally {
    fn pass(&mut self, id: &str) {
        println!("PASSED {id}");
        self.passed += 1;
    }
    fn fail(&mut self, id: &str, why: &str) {
        println!("FAILED {id}: {why}");
        self.failed += 1;
    }
    fn skip(&mut self, id: &str, why: &str) {
        println!("SKIPPED {id}: {why}");
        self.skipped += 1;
    }
}

/// Limits from a vector file's `limits` object.
pub fn limits_from(v: &Value) -> Option<Limits> {
    let g = |k: &str| v.get(k).and_then(Value::as_u64);
    Some(Limits {
        max_frame_len: u32::try_from(g("max_frame_len")?).ok()?,
        max_key_len: u32::try_from(g("max_key_len")?).ok()?,
        max_ciphertext_len: u32::try_from(g("max_ciphertext_len")?).ok()?,
        max_ciphertexts: u32::try_from(g("max_ciphertexts")?).ok()?,
        max_elements: u32::try_from(g("max_elements")?).ok()?,
        max_batch: u16::try_from(g("max_batch")?).ok()?,
        max_in_flight: u16::try_from(g("max_in_flight")?).ok()?,
        idle_timeout_ms: u32::try_from(g("idle_timeout_ms")?).ok()?,
    })
}

/// Verifies `SHA256SUMS` in `dir`; returns the listed file names.
pub fn verify_checksums(dir: &Path) -> Result<Vec<String>, String> {
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS"))
        .map_err(|e| format!("cannot read SHA256SUMS: {e}"))?;
    let mut files = Vec::new();
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (want, name) = line
            .split_once("  ")
            .ok_or_else(|| format!("bad SHA256SUMS line: {line}"))?;
        let data = std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        let got = hexutil::encode(&Sha256::digest(&data));
        if got != want {
            return Err(format!("checksum mismatch for {name}: {got} != {want}"));
        }
        files.push(name.to_string());
    }
    Ok(files)
}

/// The protocol version whose body layout a vector is decoded under (TDM-VER-3): its
/// `version` field, 1 when absent (vector files written before version 2).
fn version_of(v: &Value) -> Result<u16, String> {
    match v.get("version") {
        None => Ok(1),
        Some(x) => x
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| format!("bad version {x}")),
    }
}

fn check_valid(v: &Value, limits: &Limits) -> Result<(), String> {
    let bytes = hexutil::decode(v["hex"].as_str().ok_or("no hex")?).ok_or("bad hex")?;
    let version = version_of(v)?;
    let decode_frame = |b: &[u8], l: &Limits| decode_frame_version(b, l, version);
    let (m, used) = decode_frame(&bytes, limits).map_err(|e| format!("decode: {e}"))?;
    if used != bytes.len() {
        return Err(format!("consumed {used} of {}", bytes.len()));
    }
    if mj::message(&m) != v["decoded"] {
        return Err("decoded fields differ".into());
    }
    if m.encode().map_err(|e| e.to_string())? != bytes {
        return Err("re-encoding differs".into());
    }
    // TDM-FRAME-7: every strict prefix must fail as malformed.
    for cut in 0..bytes.len() {
        match bytes.get(..cut).map(|p| decode_frame(p, limits)) {
            Some(Err(e)) if e.code() == ErrorCode::MalformedMessage => {}
            other => return Err(format!("prefix {cut} gave {other:?}")),
        }
    }
    Ok(())
}

fn check_invalid(v: &Value, limits: &Limits) -> Result<(), String> {
    let bytes = hexutil::decode(v["hex"].as_str().ok_or("no hex")?).ok_or("bad hex")?;
    let want = v["expect_error"].as_str().ok_or("no expect_error")?;
    match decode_frame_version(&bytes, limits, version_of(v)?) {
        Ok((m, _)) => Err(format!("decoded as {m:?}")),
        Err(e) if format!("{:?}", e.code()) == want => Ok(()),
        Err(e) => Err(format!("got {:?} ({e}), want {want}", e.code())),
    }
}

fn check_transcript(v: &Value, settings: &transcript::Settings) -> Result<(), String> {
    let role = v["role"].as_str().ok_or("no role")?;
    let steps = v["steps"].as_array().ok_or("no steps")?;
    // The first record is the implicit "start" step.
    let inputs: Vec<Value> = steps.iter().skip(1).cloned().collect();
    let (records, fin) = transcript::execute(role, &inputs, settings)?;
    if records.len() != steps.len() {
        return Err("step count differs".into());
    }
    for (i, (got, want)) in records.iter().zip(steps).enumerate() {
        for k in ["out", "events", "result"] {
            if got[k] != want[k] {
                return Err(format!("step {i} {k}: got {} want {}", got[k], want[k]));
            }
        }
    }
    if fin != v["final"] {
        return Err(format!("final: got {fin} want {}", v["final"]));
    }
    Ok(())
}

/// Runs every vector in `dir` (checksums first) and prints one line per
/// vector and the summary line.
pub fn run(dir: &Path) -> Result<Tally, String> {
    let files = verify_checksums(dir)?;
    println!("checksums OK ({} files)", files.len());
    let mut t = Tally::default();
    for name in &files {
        let text = std::fs::read_to_string(dir.join(name)).map_err(|e| e.to_string())?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| format!("{name}: {e}"))?;
        let kind = doc["kind"].as_str().unwrap_or("");
        let limits = limits_from(&doc["limits"]);
        let settings = match kind {
            "transcript" => Some(
                transcript::Settings::from_json(&doc["settings"])
                    .map_err(|e| format!("{name}: {e}"))?,
            ),
            _ => None,
        };
        for v in doc["vectors"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let id = v["id"].as_str().unwrap_or("?");
            let r = match (kind, &limits, &settings) {
                ("valid", Some(l), _) => check_valid(v, l),
                ("invalid", Some(l), _) => check_invalid(v, l),
                ("transcript", _, Some(s)) => check_transcript(v, s),
                _ => {
                    t.skip(id, &format!("unknown vector kind {kind:?}"));
                    continue;
                }
            };
            match r {
                Ok(()) => t.pass(id),
                Err(e) => t.fail(id, &e),
            }
        }
    }
    // HE known-answer vectors, checked from he-formats.md alone.
    let he = dir.join("he/kat.json");
    if he.exists() {
        let text = std::fs::read_to_string(&he).map_err(|e| format!("he/kat.json: {e}"))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| format!("he/kat.json: {e}"))?;
        for (id, r) in crate::he_kat::check(&doc) {
            match r {
                Ok(()) => t.pass(&id),
                Err(e) => t.fail(&id, &e),
            }
        }
    }
    // Anything else in the directory is reported, not silently ignored.
    let mut others: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "SHA256SUMS" && n != "README.md" && n != "he" && !files.contains(n))
        .collect();
    others.sort();
    for o in others {
        t.skip(
            &o,
            "not a protocol vector file listed in SHA256SUMS (e.g. dp/ is run by tandem-dp)",
        );
    }
    Ok(t)
}
