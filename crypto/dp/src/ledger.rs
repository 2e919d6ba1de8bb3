//! Durable, write-ahead privacy ledger and zCDP accountant.
//!
//! # File format (all integers little-endian)
//!
//! ```text
//! header : "TDPLEDG1"                                   (8 bytes)
//! record : len u32 | !len u32 | payload[len] | check[8]
//! payload: seq u64 | window u64 | rho f64-bits u64 | id_len u16 | id[id_len]
//! check  : first 8 bytes of SHA-256(prev_check | len | payload), prev_check of the first
//!          record = SHA-256("tandem-dp ledger v1")[..8]
//! ```
//!
//! The checksum chain detects bit flips, edited, reordered or deleted records (except a
//! deletion of the tail, which is indistinguishable from a shorter ledger: keep the ledger on
//! storage the device owner cannot roll back, or anchor the latest check value elsewhere).
//! `seq` must be 0, 1, 2, … and `rho` finite and ≥ 0.
//!
//! # Write-ahead rule
//!
//! [`Accountant::charge`] appends the record and calls `fdatasync` (`File::sync_data`)
//! **before** it returns the [`Receipt`]; a release needs the receipt
//! ([`crate::Mechanism::release`]). So every release that leaves the process is on disk.
//! If a write or sync fails the ledger is *poisoned*: the in-memory total still includes the
//! charge (over-counting is safe) and every later charge fails until it is reopened.
//!
//! # Torn final record
//!
//! A crash during `charge` can leave an incomplete last record (the file ends before
//! `8 + len + 8` bytes of it, or inside the 8-byte length field; the length is stored with
//! its complement so that a corrupted length is not mistaken for a torn write). That charge never returned, so
//! its release was never sent: not counting it cannot under-count released data. On open
//! such a torn tail is cut off (the file is truncated and synced) and reported in
//! [`OpenReport::torn_bytes`]. Anything else that does not verify — a complete record with a
//! bad checksum, a bad length field, a sequence gap, a non-finite ρ, a bad header — is
//! corruption: [`DpError::LedgerCorrupted`], and the ledger refuses to open.
//!
//! One process writes a ledger at a time (the device runtime owns it).

use crate::error::{DpError, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"TDPLEDG1";
/// Longest device identity accepted (bytes).
pub const MAX_ID_LEN: usize = 255;
const FIXED_PAYLOAD: usize = 8 + 8 + 8 + 2;
const MAX_PAYLOAD: usize = FIXED_PAYLOAD + MAX_ID_LEN;

fn genesis() -> [u8; 8] {
    let h = Sha256::digest(b"tandem-dp ledger v1");
    let mut out = [0u8; 8];
    out.copy_from_slice(&h[..8]);
    out
}

fn check_value(prev: &[u8; 8], len: &[u8; 4], payload: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(len);
    h.update(payload);
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// One charge as stored in the ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Sequence number (0, 1, 2, …).
    pub seq: u64,
    /// Policy window index (`now_secs / window_secs`).
    pub window: u64,
    /// zCDP ρ charged.
    pub rho: f64,
    /// Device identity.
    pub device: Vec<u8>,
}

/// What [`Ledger::open`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpenReport {
    /// Complete, verified records.
    pub records: u64,
    /// Bytes of a torn final record that were cut off (0 if none).
    pub torn_bytes: u64,
}

/// Append-only, checksummed, fsynced ledger file.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: File,
    next_seq: u64,
    last_check: [u8; 8],
    poisoned: bool,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DpError + '_ {
    move |source| DpError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, offset: usize, reason: impl Into<String>) -> DpError {
    DpError::LedgerCorrupted {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason: reason.into(),
    }
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

impl Ledger {
    /// Opens (or creates) a ledger, verifying every record and passing each to `visit`.
    pub fn open(path: &Path, mut visit: impl FnMut(&Record)) -> Result<(Self, OpenReport)> {
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_err(path))?;
        if !existed {
            // Make the new directory entry durable too.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err(dir))?;
            }
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_err(path))?;
        let mut report = OpenReport::default();

        if bytes.len() < MAGIC.len() {
            // Empty, or a header torn by a crash at creation: only a prefix of MAGIC is legal.
            if MAGIC.starts_with(&bytes) {
                report.torn_bytes = bytes.len() as u64;
                file.set_len(0).map_err(io_err(path))?;
                file.write_all(MAGIC).map_err(io_err(path))?;
                file.sync_all().map_err(io_err(path))?;
                let ledger = Ledger {
                    path: path.to_path_buf(),
                    file,
                    next_seq: 0,
                    last_check: genesis(),
                    poisoned: false,
                };
                return Ok((ledger, report));
            }
            return Err(corrupt(path, 0, "bad header"));
        }
        if &bytes[..8] != MAGIC {
            return Err(corrupt(path, 0, "bad header"));
        }

        let mut off = MAGIC.len();
        let mut prev = genesis();
        let mut seq = 0u64;
        let mut torn_at = None;
        while off < bytes.len() {
            let rest = &bytes[off..];
            if rest.len() < 8 {
                torn_at = Some(off);
                break;
            }
            let len_bytes = [rest[0], rest[1], rest[2], rest[3]];
            let len32 = u32::from_le_bytes(len_bytes);
            let not_len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            if not_len != !len32 {
                return Err(corrupt(path, off, "record length check failed"));
            }
            let len = len32 as usize;
            if !(FIXED_PAYLOAD..=MAX_PAYLOAD).contains(&len) {
                return Err(corrupt(
                    path,
                    off,
                    format!("record length {len} out of range"),
                ));
            }
            if rest.len() < 8 + len + 8 {
                torn_at = Some(off);
                break;
            }
            let payload = &rest[8..8 + len];
            let mut stored = [0u8; 8];
            stored.copy_from_slice(&rest[8 + len..8 + len + 8]);
            let check = check_value(&prev, &len_bytes, payload);
            if check != stored {
                return Err(corrupt(path, off, "checksum mismatch"));
            }
            let rec = parse_payload(payload).ok_or_else(|| corrupt(path, off, "bad payload"))?;
            if rec.seq != seq {
                return Err(corrupt(
                    path,
                    off,
                    format!("sequence {} where {seq} expected", rec.seq),
                ));
            }
            visit(&rec);
            seq += 1;
            prev = check;
            off += 8 + len + 8;
        }
        if let Some(at) = torn_at {
            report.torn_bytes = (bytes.len() - at) as u64;
            file.set_len(at as u64).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
        }
        report.records = seq;
        Ok((
            Ledger {
                path: path.to_path_buf(),
                file,
                next_seq: seq,
                last_check: prev,
                poisoned: false,
            },
            report,
        ))
    }

    /// Appends a record and syncs it to stable storage before returning.
    pub fn append(&mut self, device: &[u8], window: u64, rho: f64) -> Result<Record> {
        if self.poisoned {
            return Err(DpError::LedgerPoisoned);
        }
        if device.len() > MAX_ID_LEN {
            return Err(DpError::InvalidParameter(
                "device id longer than 255 bytes".into(),
            ));
        }
        if !(rho.is_finite() && rho >= 0.0) {
            return Err(DpError::InvalidParameter(format!("rho {rho}")));
        }
        let rec = Record {
            seq: self.next_seq,
            window,
            rho,
            device: device.to_vec(),
        };
        let mut payload = Vec::with_capacity(FIXED_PAYLOAD + device.len());
        payload.extend_from_slice(&rec.seq.to_le_bytes());
        payload.extend_from_slice(&window.to_le_bytes());
        payload.extend_from_slice(&rho.to_bits().to_le_bytes());
        payload.extend_from_slice(&(device.len() as u16).to_le_bytes());
        payload.extend_from_slice(device);
        let len_bytes = (payload.len() as u32).to_le_bytes();
        let check = check_value(&self.last_check, &len_bytes, &payload);
        let mut buf = Vec::with_capacity(8 + payload.len() + 8);
        buf.extend_from_slice(&len_bytes);
        buf.extend_from_slice(&(!(payload.len() as u32)).to_le_bytes());
        buf.extend_from_slice(&payload);
        buf.extend_from_slice(&check);
        // One write call, then fdatasync; only then is the charge acknowledged.
        let res = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = res {
            self.poisoned = true;
            return Err(DpError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.next_seq += 1;
        self.last_check = check;
        Ok(rec)
    }

    /// Number of records.
    pub fn len(&self) -> u64 {
        self.next_seq
    }

    /// True if the ledger has no records.
    pub fn is_empty(&self) -> bool {
        self.next_seq == 0
    }

    /// Whether an I/O failure has poisoned the ledger.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }
}

fn parse_payload(p: &[u8]) -> Option<Record> {
    let seq = le_u64(p, 0)?;
    let window = le_u64(p, 8)?;
    let rho = f64::from_bits(le_u64(p, 16)?);
    let id_len = u16::from_le_bytes([*p.get(24)?, *p.get(25)?]) as usize;
    if p.len() != FIXED_PAYLOAD + id_len || !(rho.is_finite() && rho >= 0.0) {
        return None;
    }
    Some(Record {
        seq,
        window,
        rho,
        device: p.get(FIXED_PAYLOAD..)?.to_vec(),
    })
}

/// Privacy policy: a zCDP budget per device identity per time window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// ρ allowed per device per window.
    pub rho_per_window: f64,
    /// Window length in seconds (windows are `[k·w, (k+1)·w)`); must be ≥ 1.
    pub window_secs: u64,
}

impl Policy {
    /// A policy whose per-window budget converts (opendp) to at most (ε, δ)-DP.
    pub fn from_epsilon_delta(epsilon: f64, delta: f64, window_secs: u64) -> Result<Self> {
        Self::new(
            crate::mechanism::epsilon_delta_to_rho(epsilon, delta)?,
            window_secs,
        )
    }

    /// A policy with a ρ budget.
    pub fn new(rho_per_window: f64, window_secs: u64) -> Result<Self> {
        if !(rho_per_window.is_finite() && rho_per_window >= 0.0) || window_secs == 0 {
            return Err(DpError::InvalidParameter(
                "policy needs rho ≥ 0 finite and window ≥ 1 s".into(),
            ));
        }
        Ok(Policy {
            rho_per_window,
            window_secs,
        })
    }

    /// Window index of a time (seconds since an epoch chosen by the caller).
    pub fn window_of(&self, now_secs: u64) -> u64 {
        now_secs / self.window_secs
    }
}

/// Proof that a charge is durable; consumed by [`crate::Mechanism::release`].
#[derive(Debug)]
#[must_use = "a receipt is the permission to release; use it"]
pub struct Receipt {
    rho: f64,
    seq: u64,
}

impl Receipt {
    /// ρ charged.
    pub fn rho(&self) -> f64 {
        self.rho
    }
    /// Ledger sequence number of the charge.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// zCDP accountant per (device, window), backed by a [`Ledger`].
#[derive(Debug)]
pub struct Accountant {
    ledger: Ledger,
    policy: Policy,
    spent: HashMap<(Vec<u8>, u64), f64>,
    total_records: u64,
}

/// zCDP composition: ρ adds. Rounded one ulp up so float error never under-counts.
fn compose(a: f64, b: f64) -> f64 {
    crate::mechanism::up(a + b)
}

impl Accountant {
    /// Opens the ledger at `path` (creating it if absent) and replays it.
    pub fn open(path: &Path, policy: Policy) -> Result<(Self, OpenReport)> {
        let mut spent: HashMap<(Vec<u8>, u64), f64> = HashMap::new();
        let (ledger, report) = Ledger::open(path, |r| {
            let e = spent.entry((r.device.clone(), r.window)).or_insert(0.0);
            *e = compose(*e, r.rho);
        })?;
        Ok((
            Accountant {
                ledger,
                policy,
                spent,
                total_records: report.records,
            },
            report,
        ))
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// ρ spent by `device` in the window containing `now_secs`.
    pub fn spent(&self, device: &[u8], now_secs: u64) -> f64 {
        let w = self.policy.window_of(now_secs);
        self.spent
            .get(&(device.to_vec(), w))
            .copied()
            .unwrap_or(0.0)
    }

    /// ε at δ spent by `device` in the current window (opendp's zCDP → (ε, δ) conversion).
    pub fn spent_epsilon(&self, device: &[u8], now_secs: u64, delta: f64) -> Result<f64> {
        crate::mechanism::rho_to_epsilon(self.spent(device, now_secs), delta)
    }

    /// Whether charging `rho` now would exceed the window's budget.
    pub fn would_exceed(&self, device: &[u8], now_secs: u64, rho: f64) -> bool {
        !(rho.is_finite() && rho >= 0.0)
            || compose(self.spent(device, now_secs), rho) > self.policy.rho_per_window
    }

    /// Charges `rho` to `device` write-ahead: the record is fsynced before the receipt exists.
    pub fn charge(&mut self, device: &[u8], now_secs: u64, rho: f64) -> Result<Receipt> {
        let spent = self.spent(device, now_secs);
        if self.would_exceed(device, now_secs, rho) {
            return Err(DpError::BudgetExceeded {
                spent,
                requested: rho,
                budget: self.policy.rho_per_window,
            });
        }
        let w = self.policy.window_of(now_secs);
        // Count first: if the write fails we over-count, never under-count.
        let e = self.spent.entry((device.to_vec(), w)).or_insert(0.0);
        *e = compose(*e, rho);
        let rec = self.ledger.append(device, w, rho)?;
        self.total_records += 1;
        Ok(Receipt { rho, seq: rec.seq })
    }

    /// Number of records in the ledger.
    pub fn records(&self) -> u64 {
        self.total_records
    }
}
