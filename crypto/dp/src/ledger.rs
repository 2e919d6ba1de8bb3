//! Durable, write-ahead privacy ledger and zCDP accountant.
//!
//! # File format (all integers little-endian)
//!
//! ```text
//! header : "TDPLEDG1"                                   (8 bytes)
//! record : len u32 | !len u32 | payload[len] | check[8]
//! payload: seq u64 | window u64 | rho f64-bits u64 | id_len u16 | id[id_len] [| eps f64-bits u64]
//! check  : first 8 bytes of SHA-256(prev_check | len | payload), prev_check of the first
//!          record = SHA-256("tandem-dp ledger v1")[..8]
//! ```
//!
//! The checksum chain detects bit flips, edited, reordered or deleted records (except a
//! deletion of the tail, which is indistinguishable from a shorter ledger: keep the ledger on
//! storage the device owner cannot roll back, or anchor the latest check value elsewhere).
//! `seq` must be 0, 1, 2, … and `rho` finite and ≥ 0. The optional trailing `eps` (issue 11;
//! present iff `len = 26 + id_len + 8`) is the pure ε of a pure ε-DP release (discrete
//! Laplace), finite and ≥ 0; its `rho` is then `ε²/2`. Ledgers written before it exist read
//! unchanged (every record zCDP-only).
//!
//! # Two tracks per window (TDM-LEDG-5)
//!
//! [`Accountant`] keeps, per device and window, the zCDP total Σρ of every release and the
//! pure total Σε of the pure releases, and whether every release of the window was pure. A
//! window is within a budget `(ε_B, δ)` ([`Policy::from_epsilon_delta`]) if Σρ ≤ ρ(ε_B, δ)
//! **or** every release was pure and Σε ≤ ε_B: each is a valid bound (zCDP composition, Bun &
//! Steinke 2016 Lemma 2.3, then Prop. 1.3; basic composition of pure ε-DP, Dwork & Roth 2014
//! Thm 3.16, and ε-DP ⇒ (ε, δ)-DP), and the window gets the tighter one. A ρ budget
//! ([`Policy::new`]) has no pure track: ε-DP ⇒ ε²/2-zCDP (Prop. 1.4) makes Σρ ≤ (Σε)²/2
//! always the tighter zCDP bound.
//!
//! # Write-ahead rule (TDM-LEDG-1)
//!
//! [`Accountant::charge`] appends the record and calls `fdatasync` (`File::sync_data`)
//! **before** it returns the [`Receipt`]; a release needs the receipt
//! ([`crate::Mechanism::release`]). So every release that leaves the process is on disk.
//! If a write or sync fails the ledger is *poisoned*: the in-memory total still includes the
//! charge (over-counting is safe) and every later charge fails until it is reopened.
//!
//! # Crash leftovers after the last verified record (TDM-LEDG-3, TDM-LEDG-4)
//!
//! A crash during `charge` can leave the one record it was appending unfinished: the file
//! ends inside it (a *torn* record), or — on file systems that extend the file before its
//! data reaches the disk, e.g. after a power cut — part or all of it, and possibly more, reads
//! as zero bytes (a *zero-filled* tail). That charge never returned, so its release was never
//! sent: not counting it cannot under-count released data. On open, the bytes after the last
//! verified record (the *tail*) are cut off (file truncated and synced), reported in
//! [`OpenReport`] and logged as a warning, **if and only if** they have the shape of such a
//! leftover:
//!
//! * the tail is all zero bytes, or
//! * the tail agrees, byte for byte, with a prefix of the record that would come next — a
//!   length field in range with its complement, the next sequence number, an id length that
//!   matches the length field, and, once the payload is complete, the chain check value
//!   computed from it — and every byte after that prefix is zero (or absent).
//!
//! A tail that holds a complete record (one whose check value was written in full) is never
//! cut: if such a record does not verify, it was damaged after it was acknowledged, and
//! cutting it could under-count. Anything else that does not verify — a bad header (a foreign
//! file), a record that fails its checks before the last verified record, non-zero bytes after
//! a record-shaped prefix — is [`DpError::LedgerCorrupted`] naming the file and the offset,
//! and the ledger refuses to open (it is never silently reset).
//!
//! The header is written and synced when the file is created, before any record. So a file
//! *no longer than the header* that holds a prefix of the magic followed by zeros (a crash
//! during creation) is recreated, but a file *longer than the header* without a complete
//! header — in particular one overwritten entirely with zero bytes — cannot be a crash
//! leftover: it is [`DpError::LedgerCorrupted`] at offset 0 (recreating it would reset the
//! budget; restore it from a backup, or remove it only if resetting the budget is acceptable).
//! The file is created with mode 0600 (owner only) on unix.
//!
//! Residual ambiguity, stated: damage that zeroes exactly a suffix of the last record's check
//! value (and nothing else) cannot be told apart from a write cut short and is cut.
//!
//! # One writer (TDM-LEDG-2)
//!
//! [`Ledger::open`] takes an exclusive advisory lock (`flock(LOCK_EX | LOCK_NB)` through
//! `fs4`) on the file before it reads it, and holds it for as long as the [`Ledger`] (or the
//! [`Accountant`] owning it) lives; the OS drops it when the file is closed or the process
//! dies (also on SIGKILL: no stale lock file). A second opener — another process or another
//! handle in the same process — gets [`DpError::LedgerInUse`] and nothing is read or
//! written. Hence two processes can never both charge the same ledger, and the budget cannot
//! be overdrawn by concurrency. The lock is advisory: it binds every `tandem-dp` opener, not
//! a program that writes the file without locking. It is not reliable on network file systems
//! that do not implement `flock`: keep the ledger on a local disk.

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
const MAX_PAYLOAD: usize = FIXED_PAYLOAD + MAX_ID_LEN + 8;

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
    /// Pure ε of the release, if it was pure ε-DP (then `rho = ε²/2`).
    pub epsilon: Option<f64>,
}

/// What [`Ledger::open`] found.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpenReport {
    /// Complete, verified records.
    pub records: u64,
    /// Bytes after the last verified record that were cut off (0 if none).
    pub torn_bytes: u64,
    /// What those bytes were.
    pub tail: Tail,
}

/// The bytes after the last verified record, as classified by [`scan`].
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tail {
    /// Nothing after the last verified record.
    #[default]
    None,
    /// A record (or header) cut short: a prefix of what a `charge` was writing, possibly
    /// followed by zero bytes.
    Torn,
    /// Only zero bytes (a file extended by the file system before its data was written).
    ZeroFilled,
}

/// Result of [`scan`]: the verified prefix of a ledger image.
#[derive(Clone, Debug, PartialEq)]
pub struct Scan {
    /// Verified records.
    pub records: u64,
    /// Length in bytes of the verified prefix (header + verified records); 0 if not even the
    /// header is complete (the file is new or its creation was cut short).
    pub verified_len: u64,
    /// Chain value after the last verified record (the genesis value if there is none).
    pub last_check: [u8; 8],
    /// What follows the verified prefix (cut off by [`Ledger::open`]).
    pub tail: Tail,
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
    /// Opens (or creates) the ledger at `path`, locks it exclusively, verifies every record
    /// and passes each to `visit` in order.
    ///
    /// A crash leftover after the last verified record is cut off (see the module docs) and
    /// reported in the returned [`OpenReport`]; the lock is held until the `Ledger` is dropped.
    ///
    /// # Errors
    ///
    /// * [`DpError::LedgerInUse`] if another handle (any process) holds the ledger open;
    /// * [`DpError::LedgerCorrupted`] if the file is not a ledger or a record before the end
    ///   fails its checks (the file is left untouched);
    /// * [`DpError::Io`] if the file cannot be created, locked, read, truncated or synced.
    pub fn open(path: &Path, visit: impl FnMut(&Record)) -> Result<(Self, OpenReport)> {
        let existed = path.exists();
        let mut opts = OpenOptions::new();
        opts.read(true).append(true).create(true);
        // Owner-only from the first byte (issue 12, item 3): never created group- or
        // world-readable, whatever the umask.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut file = opts.open(path).map_err(io_err(path))?;
        // TDM-LEDG-2: lock before reading anything (the recovery below also writes). Called through the
        // trait: std's inherent `File::try_lock` (Rust 1.89) is newer than our MSRV.
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                return Err(DpError::LedgerInUse {
                    path: path.to_path_buf(),
                })
            }
            Err(fs4::TryLockError::Error(source)) => {
                return Err(DpError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
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
        let scan = scan(path, &bytes, visit)?;

        let report = OpenReport {
            records: scan.records,
            torn_bytes: bytes.len() as u64 - scan.verified_len,
            tail: scan.tail,
        };
        if scan.verified_len == 0 {
            // New file, or a header cut short by a crash at creation: (re)write the header.
            file.set_len(0).map_err(io_err(path))?;
            file.write_all(MAGIC).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
        } else if report.torn_bytes > 0 {
            file.set_len(scan.verified_len).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
        }
        if report.torn_bytes > 0 {
            tracing::warn!(
                ledger = %path.display(),
                records = report.records,
                cut_bytes = report.torn_bytes,
                tail = ?report.tail,
                "privacy ledger: cut a crash leftover after the last verified record \
                 (a charge that never returned, so nothing it covered was released)"
            );
        }
        Ok((
            Ledger {
                path: path.to_path_buf(),
                file,
                next_seq: scan.records,
                last_check: scan.last_check,
                poisoned: false,
            },
            report,
        ))
    }

    /// Appends a record and syncs it to stable storage before returning.
    pub fn append(&mut self, device: &[u8], window: u64, rho: f64) -> Result<Record> {
        self.append_cost(device, window, Cost::rho(rho))
    }

    /// Appends a record of `cost` (with its pure ε, if any) and syncs it before returning.
    pub fn append_cost(&mut self, device: &[u8], window: u64, cost: Cost) -> Result<Record> {
        let rho = cost.rho;
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
        if let Some(e) = cost.epsilon.filter(|e| !(e.is_finite() && *e >= 0.0)) {
            return Err(DpError::InvalidParameter(format!("epsilon {e}")));
        }
        let rec = Record {
            seq: self.next_seq,
            window,
            rho,
            device: device.to_vec(),
            epsilon: cost.epsilon,
        };
        let mut payload = Vec::with_capacity(FIXED_PAYLOAD + device.len());
        payload.extend_from_slice(&rec.seq.to_le_bytes());
        payload.extend_from_slice(&window.to_le_bytes());
        payload.extend_from_slice(&rho.to_bits().to_le_bytes());
        payload.extend_from_slice(&(device.len() as u16).to_le_bytes());
        payload.extend_from_slice(device);
        if let Some(e) = cost.epsilon {
            payload.extend_from_slice(&e.to_bits().to_le_bytes());
        }
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

/// Verifies a ledger image (the whole file) without touching any file: the pure part of
/// [`Ledger::open`], exposed for tools and fuzzing. `path` only names the file in errors.
/// Each verified record is passed to `visit` in order.
///
/// # Errors
///
/// [`DpError::LedgerCorrupted`] with the byte offset of the first record (or the header) that
/// fails its checks, unless everything from there on is a crash leftover (module docs).
pub fn scan(path: &Path, bytes: &[u8], mut visit: impl FnMut(&Record)) -> Result<Scan> {
    let m = mismatch(bytes, MAGIC);
    if m < MAGIC.len() {
        // The header is written and synced before any record is appended, so a file longer
        // than the header without a complete header cannot come from a crash: it was
        // overwritten (e.g. zero-filled) after records were acknowledged. Recreating it would
        // reset the budget, so it is refused.
        if bytes.len() > MAGIC.len() {
            let what = if all_zero(bytes) {
                format!(
                    "the whole file ({} bytes) is zero bytes, longer than the 8-byte header: \
                     it held records and was overwritten, this is not a crash leftover",
                    bytes.len()
                )
            } else {
                "bad header: not a tandem privacy ledger (expected magic \"TDPLEDG1\")".into()
            };
            return Err(corrupt(path, 0, what));
        }
        // Empty, or a header cut short at creation: a prefix of MAGIC, then only zeros.
        if all_zero(&bytes[m..]) {
            let tail = if bytes.is_empty() {
                Tail::None
            } else if m == 0 {
                Tail::ZeroFilled
            } else {
                Tail::Torn
            };
            return Ok(Scan {
                records: 0,
                verified_len: 0,
                last_check: genesis(),
                tail,
            });
        }
        return Err(corrupt(
            path,
            0,
            "bad header: not a tandem privacy ledger (expected magic \"TDPLEDG1\")",
        ));
    }

    let mut off = MAGIC.len();
    let mut prev = genesis();
    let mut seq = 0u64;
    while off < bytes.len() {
        let rest = &bytes[off..];
        match verify_record(rest, &prev, seq) {
            Ok((rec, check, used)) => {
                visit(&rec);
                seq += 1;
                prev = check;
                off += used;
            }
            Err(reason) => {
                // TDM-LEDG-3: a crash leftover is cut; TDM-LEDG-4: anything else is refused.
                let tail = if all_zero(rest) {
                    Tail::ZeroFilled
                } else if is_torn_record(rest, &prev, seq) {
                    Tail::Torn
                } else {
                    return Err(corrupt(path, off, reason));
                };
                return Ok(Scan {
                    records: seq,
                    verified_len: off as u64,
                    last_check: prev,
                    tail,
                });
            }
        }
    }
    Ok(Scan {
        records: seq,
        verified_len: off as u64,
        last_check: prev,
        tail: Tail::None,
    })
}

/// Verifies the record at the start of `rest`: the record, its check value and its length
/// in bytes, or why it does not verify.
fn verify_record(
    rest: &[u8],
    prev: &[u8; 8],
    seq: u64,
) -> std::result::Result<(Record, [u8; 8], usize), String> {
    let (Some(len_bytes), Some(not_len)) = (rest.get(..4), rest.get(4..8)) else {
        return Err("file ends inside a record length field".into());
    };
    let len_bytes = [len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]];
    let len32 = u32::from_le_bytes(len_bytes);
    let not_len = u32::from_le_bytes([not_len[0], not_len[1], not_len[2], not_len[3]]);
    if not_len != !len32 {
        return Err("record length check failed".into());
    }
    let len = len32 as usize;
    if !(FIXED_PAYLOAD..=MAX_PAYLOAD).contains(&len) {
        return Err(format!("record length {len} out of range"));
    }
    let (Some(payload), Some(stored)) = (rest.get(8..8 + len), rest.get(8 + len..8 + len + 8))
    else {
        return Err("file ends inside a record".into());
    };
    let check = check_value(prev, &len_bytes, payload);
    if check[..] != stored[..] {
        return Err("checksum mismatch".into());
    }
    let rec = parse_payload(payload).ok_or_else(|| String::from("bad payload"))?;
    if rec.seq != seq {
        return Err(format!("sequence {} where {seq} expected", rec.seq));
    }
    Ok((rec, check, 8 + len + 8))
}

/// Whether `tail` (non-empty, not all zero, starting where record `seq` belongs) is a prefix
/// of a record that a `charge` was writing when it was cut short, followed only by zeros:
/// the record may be incomplete, but whatever of it is present must agree with the next
/// record's expected header, sequence number, id length and (once the payload is complete)
/// chain value. A complete record (its whole check value written) is never a torn one.
fn is_torn_record(tail: &[u8], prev: &[u8; 8], seq: u64) -> bool {
    let mut len_bytes = [0u8; 4];
    for (d, s) in len_bytes.iter_mut().zip(tail) {
        *d = *s;
    }
    let len32 = u32::from_le_bytes(len_bytes);
    let len = len32 as usize;
    let written = tail.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    if written <= len_bytes.len() {
        // Only (a prefix of) the little-endian length field was written: a prefix of a valid
        // length followed by zeros is at most the length itself.
        return len <= MAX_PAYLOAD;
    }
    if !(FIXED_PAYLOAD..=MAX_PAYLOAD).contains(&len) {
        return false;
    }
    // The id length is the length field less the fixed part, less 8 more if the record
    // carries a pure ε: either shape may have been cut short.
    [0usize, 8].into_iter().any(|extra| {
        len.checked_sub(FIXED_PAYLOAD + extra)
            .is_some_and(|id_len| id_len <= MAX_ID_LEN && torn_as(tail, prev, seq, len, id_len))
    })
}

/// [`is_torn_record`] for one record shape: `id_len` bytes of identity in a payload of `len`.
fn torn_as(tail: &[u8], prev: &[u8; 8], seq: u64, len: usize, id_len: usize) -> bool {
    let len32 = len as u32;
    let len_bytes = len32.to_le_bytes();
    // The record that would come next, as far as it can be known from the tail.
    let mut intended = Vec::with_capacity(8 + len + 8);
    intended.extend_from_slice(&len_bytes);
    intended.extend_from_slice(&(!len32).to_le_bytes());
    intended.extend_from_slice(&seq.to_le_bytes());
    let present = tail.get(16..).unwrap_or(&[]);
    let payload_rest = &present[..present.len().min(len - 8)];
    intended.extend_from_slice(payload_rest);
    // id_len (payload bytes 24..26) must match the length field.
    let id_len = (id_len as u16).to_le_bytes();
    for (i, b) in id_len.iter().enumerate() {
        if let Some(slot) = intended.get_mut(8 + 24 + i) {
            *slot = *b;
        }
    }
    if intended.len() == 8 + len {
        let check = check_value(prev, &len_bytes, &intended[8..]);
        intended.extend_from_slice(&check);
    }
    let m = mismatch(tail, &intended);
    // A fully written (and matching) record is not torn: it failed for another reason.
    m < 8 + len + 8 && all_zero(&tail[m..])
}

/// Index of the first byte where `a` and `b` differ (the shorter length if one is a prefix
/// of the other).
fn mismatch(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn parse_payload(p: &[u8]) -> Option<Record> {
    let seq = le_u64(p, 0)?;
    let window = le_u64(p, 8)?;
    let rho = f64::from_bits(le_u64(p, 16)?);
    let id_len = u16::from_le_bytes([*p.get(24)?, *p.get(25)?]) as usize;
    if id_len > MAX_ID_LEN || !(rho.is_finite() && rho >= 0.0) {
        return None;
    }
    let epsilon = if p.len() == FIXED_PAYLOAD + id_len {
        None
    } else if p.len() == FIXED_PAYLOAD + id_len + 8 {
        let e = f64::from_bits(le_u64(p, FIXED_PAYLOAD + id_len)?);
        if !(e.is_finite() && e >= 0.0) {
            return None;
        }
        Some(e)
    } else {
        return None;
    };
    Some(Record {
        seq,
        window,
        rho,
        device: p.get(FIXED_PAYLOAD..FIXED_PAYLOAD + id_len)?.to_vec(),
        epsilon,
    })
}

/// Privacy policy: a zCDP budget per device identity per time window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// ρ allowed per device per window.
    pub rho_per_window: f64,
    /// Pure ε allowed per device per window to a window whose releases are all pure ε-DP
    /// (the pure track, TDM-LEDG-5); `None`: ρ only.
    pub epsilon_per_window: Option<f64>,
    /// Window length in seconds (windows are `[k·w, (k+1)·w)`); must be ≥ 1.
    pub window_secs: u64,
}

impl Policy {
    /// A policy whose per-window budget converts (opendp) to at most (ε, δ)-DP.
    /// Its pure track allows Σε ≤ `epsilon` to a window of pure releases (ε-DP implies
    /// (ε, δ)-DP for every δ).
    pub fn from_epsilon_delta(epsilon: f64, delta: f64, window_secs: u64) -> Result<Self> {
        let mut p = Self::new(
            crate::mechanism::epsilon_delta_to_rho(epsilon, delta)?,
            window_secs,
        )?;
        p.epsilon_per_window = Some(epsilon);
        Ok(p)
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
            epsilon_per_window: None,
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

/// The privacy cost of one release: its zCDP ρ and, for a pure ε-DP release, its ε.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    /// zCDP ρ (for a pure release, ε²/2: Bun & Steinke 2016, Prop. 1.4).
    pub rho: f64,
    /// Pure ε, if the release is pure ε-DP.
    pub epsilon: Option<f64>,
}

impl Cost {
    /// A zCDP-only cost (e.g. a discrete Gaussian release).
    pub fn rho(rho: f64) -> Self {
        Cost { rho, epsilon: None }
    }

    /// A pure ε-DP release: ρ = ε²/2 (rounded up) and ε.
    pub fn pure(epsilon: f64) -> Self {
        Cost {
            rho: crate::mechanism::up(epsilon * epsilon / 2.0),
            epsilon: Some(epsilon),
        }
    }

    fn valid(&self) -> bool {
        self.rho.is_finite()
            && self.rho >= 0.0
            && self.epsilon.is_none_or(|e| e.is_finite() && e >= 0.0)
    }
}

/// What one device spent in one window.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spent {
    rho: f64,
    epsilon: f64,
    /// Every release of the window was pure ε-DP.
    pure: bool,
}

impl Default for Spent {
    fn default() -> Self {
        Spent {
            rho: 0.0,
            epsilon: 0.0,
            pure: true,
        }
    }
}

impl Spent {
    fn add(self, c: Cost) -> Spent {
        Spent {
            rho: compose(self.rho, c.rho),
            epsilon: compose(self.epsilon, c.epsilon.unwrap_or(0.0)),
            pure: self.pure && c.epsilon.is_some(),
        }
    }
}

/// Accountant per (device, window), backed by a [`Ledger`]: zCDP for every release, and a
/// pure-ε track for windows of pure releases (module docs, TDM-LEDG-5).
#[derive(Debug)]
pub struct Accountant {
    ledger: Ledger,
    policy: Policy,
    spent: HashMap<(Vec<u8>, u64), Spent>,
    total_records: u64,
}

/// zCDP composition: ρ adds. Rounded one ulp up so float error never under-counts.
fn compose(a: f64, b: f64) -> f64 {
    crate::mechanism::up(a + b)
}

impl Accountant {
    /// Opens the ledger at `path` (creating it if absent) and replays it.
    ///
    /// # Errors
    ///
    /// As [`Ledger::open`]: [`DpError::LedgerInUse`], [`DpError::LedgerCorrupted`],
    /// [`DpError::Io`].
    pub fn open(path: &Path, policy: Policy) -> Result<(Self, OpenReport)> {
        let mut spent: HashMap<(Vec<u8>, u64), Spent> = HashMap::new();
        let (ledger, report) = Ledger::open(path, |r| {
            let e = spent.entry((r.device.clone(), r.window)).or_default();
            *e = e.add(Cost {
                rho: r.rho,
                epsilon: r.epsilon,
            });
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

    fn window_spent(&self, device: &[u8], now_secs: u64) -> Spent {
        let w = self.policy.window_of(now_secs);
        self.spent
            .get(&(device.to_vec(), w))
            .copied()
            .unwrap_or_default()
    }

    /// ρ spent by `device` in the window containing `now_secs`.
    pub fn spent(&self, device: &[u8], now_secs: u64) -> f64 {
        self.window_spent(device, now_secs).rho
    }

    /// Σε of the window if every release in it was pure ε-DP (`Some(0.0)` for an empty
    /// window), else `None`.
    pub fn spent_pure_epsilon(&self, device: &[u8], now_secs: u64) -> Option<f64> {
        let s = self.window_spent(device, now_secs);
        s.pure.then_some(s.epsilon)
    }

    /// ε at δ spent by `device` in the current window: the tighter of opendp's zCDP → (ε, δ)
    /// conversion of Σρ and, for a window of pure releases only, Σε (TDM-LEDG-5).
    pub fn spent_epsilon(&self, device: &[u8], now_secs: u64, delta: f64) -> Result<f64> {
        let rho = self.spent(device, now_secs);
        let z = match crate::mechanism::rho_to_epsilon(rho, delta) {
            Ok(z) => z,
            // opendp's numeric conversion overflows for very large ρ (e.g. thousands of
            // releases under a demo budget): the closed form ρ + 2√(ρ ln 1/δ) is a valid, looser
            // bound (Bun & Steinke 2016, Prop. 1.3).
            Err(_) if delta > 0.0 && delta < 1.0 && rho.is_finite() => {
                crate::mechanism::up(rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt())
            }
            Err(e) => return Err(e),
        };
        Ok(match self.spent_pure_epsilon(device, now_secs) {
            Some(e) => z.min(e),
            None => z,
        })
    }

    /// Whether charging a zCDP release of `rho` now would exceed the window's budget.
    pub fn would_exceed(&self, device: &[u8], now_secs: u64, rho: f64) -> bool {
        self.would_exceed_cost(device, now_secs, Cost::rho(rho))
    }

    /// Whether charging `cost` now would exceed the window's budget: it fits if the window's
    /// Σρ stays within `rho_per_window`, or if the window stays all pure and its Σε within
    /// `epsilon_per_window` (TDM-LEDG-5).
    pub fn would_exceed_cost(&self, device: &[u8], now_secs: u64, cost: Cost) -> bool {
        if !cost.valid() {
            return true;
        }
        let after = self.window_spent(device, now_secs).add(cost);
        let rho_ok = after.rho <= self.policy.rho_per_window;
        let pure_ok = after.pure
            && self
                .policy
                .epsilon_per_window
                .is_some_and(|b| after.epsilon <= b);
        !(rho_ok || pure_ok)
    }

    /// Charges a zCDP release of `rho` to `device` write-ahead: the record is fsynced before
    /// the receipt exists.
    pub fn charge(&mut self, device: &[u8], now_secs: u64, rho: f64) -> Result<Receipt> {
        self.charge_cost(device, now_secs, Cost::rho(rho))
    }

    /// Charges `cost` to `device` write-ahead (the record, with its pure ε if any, is fsynced
    /// before the receipt exists).
    ///
    /// # Errors
    /// [`DpError::BudgetExceeded`] if [`Accountant::would_exceed_cost`]; ledger errors.
    pub fn charge_cost(&mut self, device: &[u8], now_secs: u64, cost: Cost) -> Result<Receipt> {
        let spent = self.spent(device, now_secs);
        if self.would_exceed_cost(device, now_secs, cost) {
            return Err(DpError::BudgetExceeded {
                spent,
                requested: cost.rho,
                budget: self.policy.rho_per_window,
            });
        }
        let w = self.policy.window_of(now_secs);
        // Count first: if the write fails we over-count, never under-count.
        let e = self.spent.entry((device.to_vec(), w)).or_default();
        *e = e.add(cost);
        let rec = self.ledger.append_cost(device, w, cost)?;
        self.total_records += 1;
        Ok(Receipt {
            rho: cost.rho,
            seq: rec.seq,
        })
    }

    /// Number of records in the ledger.
    pub fn records(&self) -> u64 {
        self.total_records
    }
}
