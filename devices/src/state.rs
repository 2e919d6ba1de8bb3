//! The device's durable state on disk: the state directory (mode 0700), the HE secret seed
//! (mode 0600 from its first byte) and the evaluation-key cache.
//!
//! Secret files are written to a fresh temporary file created with mode 0600 (never a wider
//! mode, not even for an instant), written, `fsync`ed, renamed over the target, and the
//! directory is `fsync`ed so the rename is durable.
//!
//! A damaged seed file (truncated, zero-filled, foreign) is an error naming the file: the
//! secret cannot be recovered, and silently generating a new one would hide the loss. The
//! evaluation-key files are a cache derived from the seed: a damaged one is rebuilt.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::DeviceError;

/// File name of the HE secret seed inside the state directory.
pub const SEED_FILE: &str = "he-seed.hex";
/// Largest seed file read (32 hex digits and a newline; anything much larger is foreign).
const MAX_SEED_FILE_BYTES: u64 = 256;

/// Creates `dir` (and missing parents) and restricts it to its owner (mode 0700 on Unix),
/// also when it already existed with a wider mode.
///
/// # Errors
/// [`DeviceError::StateFile`] if it cannot be created or is not a directory.
pub fn ensure_private_dir(dir: &Path) -> Result<(), DeviceError> {
    let err = |reason: String| DeviceError::StateFile {
        path: dir.to_path_buf(),
        reason,
        action: "check the state_dir setting and its permissions",
    };
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
        .map_err(|e| err(format!("cannot create: {e}")))?;
    let meta = std::fs::metadata(dir).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(err("not a directory".into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), "state directory was readable by others: now 0700");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| err(format!("cannot restrict to mode 0700: {e}")))?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically and durably, readable by the owner only: a new
/// temporary file created with mode 0600, written, synced, renamed over `path`, then the
/// directory synced.
///
/// # Errors
/// [`DeviceError::Io`] on any file-system failure (the target is then unchanged).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DeviceError> {
    write_private_with(path, bytes, false).map(|_| ())
}

/// Like [`write_private`], but never replaces an existing `path`: returns `false` (and writes
/// nothing) if it already exists, so two processes creating the same secret agree on one.
///
/// # Errors
/// [`DeviceError::Io`] on any other file-system failure.
pub fn create_private(path: &Path, bytes: &[u8]) -> Result<bool, DeviceError> {
    write_private_with(path, bytes, true)
}

fn write_private_with(path: &Path, bytes: &[u8], exclusive: bool) -> Result<bool, DeviceError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // A leftover from a crashed run of this same pid number: never reuse its contents.
    let _ = std::fs::remove_file(&tmp);
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let result = (|| {
        let mut f = o.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        if exclusive {
            // A hard link fails if the target exists: first writer wins, atomically.
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::remove_file(&tmp)?;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
            std::fs::remove_file(&tmp)?;
        } else {
            std::fs::rename(&tmp, path)?;
        }
        sync_dir(dir)?;
        Ok(true)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(result?)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn read_small(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut buf)?;
    Ok(buf)
}

/// Parses the text of a seed file: exactly 32 hex digits, optionally followed by a newline.
fn parse_seed(bytes: &[u8]) -> Result<u128, String> {
    if bytes.is_empty() {
        return Err("empty (truncated)".into());
    }
    if bytes.iter().all(|&b| b == 0) {
        return Err("zero-filled (torn write)".into());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not text (foreign file)".to_string())?;
    let t = text.strip_suffix('\n').unwrap_or(text);
    if t.len() != 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "expected 32 hex digits, found {} bytes of other content",
            bytes.len()
        ));
    }
    u128::from_str_radix(t, 16).map_err(|e| e.to_string())
}

/// The HE secret seed of the state directory `dir` (created if missing): read from
/// [`SEED_FILE`], or drawn fresh and written with mode 0600.
///
/// # Errors
/// [`DeviceError::StateFile`] naming the file if it exists but is damaged, truncated,
/// zero-filled or foreign (the secret is lost: the operator decides to start over);
/// [`DeviceError::Io`] if a new seed cannot be written.
pub fn load_or_create_seed(dir: &Path) -> Result<u128, DeviceError> {
    ensure_private_dir(dir)?;
    let path = dir.join(SEED_FILE);
    // At most two rounds: a seed another process created between our read and our write is
    // read back instead of being replaced.
    for _ in 0..2 {
        if let Some(seed) = read_seed(&path)? {
            return Ok(seed);
        }
        let s: u128 = rand::random();
        if create_private(&path, format!("{s:032x}\n").as_bytes())? {
            return Ok(s);
        }
    }
    read_seed(&path)?.ok_or_else(|| DeviceError::StateFile {
        path,
        reason: "created and removed concurrently".into(),
        action: "make sure only one process manages this state directory",
    })
}

/// Reads and parses the seed file (`None` if it does not exist).
fn read_seed(path: &Path) -> Result<Option<u128>, DeviceError> {
    let path = path.to_path_buf();
    match read_small(&path, MAX_SEED_FILE_BYTES) {
        Ok(bytes) => {
            tighten(&path);
            parse_seed(&bytes)
                .map(Some)
                .map_err(|reason| DeviceError::StateFile {
                    path,
                    reason,
                    action: "the HE secret cannot be recovered from it: move the file away to \
                             generate a new key (the cloud then receives a new evaluation key)",
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DeviceError::StateFile {
            path,
            reason: format!("cannot read: {e}"),
            action: "check the file's owner and permissions",
        }),
    }
}

/// Restricts an existing secret file written by an older version to mode 0600.
fn tighten(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), "secret file was readable by others: now 0600");
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Path of the cached evaluation key for parameter set `param_set` and input chunk `chunk`.
pub fn eval_key_path(dir: &Path, param_set: u16, chunk: usize) -> PathBuf {
    dir.join(format!("eval-key-p{param_set}-c{chunk}.bin"))
}

/// Reads a cached evaluation key (`None` if missing or unreadable: it is rebuilt from the
/// seed).
pub fn read_cached(path: &Path, limit: u64) -> Option<Vec<u8>> {
    match read_small(path, limit) {
        Ok(b) if (b.len() as u64) <= limit => Some(b),
        Ok(_) => {
            tracing::warn!(file = %path.display(), "cached evaluation key too large: rebuilding it");
            None
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cached evaluation key unreadable: rebuilding it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn seed_parser_refuses_damage() {
        assert_eq!(parse_seed(b"000000000000000000000000000000ff\n"), Ok(255));
        assert_eq!(parse_seed(b"000000000000000000000000000000ff"), Ok(255));
        for bad in [
            &b""[..],
            &[0u8; 33][..],
            b"00000000000000000000000000000ff\n",
            b"000000000000000000000000000000ff\n\n",
            b"zz0000000000000000000000000000ff\n",
            b"\x89PNG\r\n\x1a\n",
            &[0xff; 40][..],
        ] {
            assert!(parse_seed(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn create_private_never_replaces() {
        let d = std::env::temp_dir().join(format!("tandem-state-test-{}", std::process::id()));
        ensure_private_dir(&d).unwrap();
        let p = d.join("s");
        let _ = std::fs::remove_file(&p);
        assert!(create_private(&p, b"first").unwrap());
        assert!(!create_private(&p, b"second").unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn backoff_doubles_and_is_bounded() {
        let p = crate::RetryPolicy::default();
        assert_eq!(p.backoff(1, 1.0), p.initial_backoff);
        assert_eq!(p.backoff(1, 0.0), p.initial_backoff / 2);
        assert_eq!(p.backoff(3, 1.0), p.initial_backoff * 4);
        assert_eq!(p.backoff(40, 1.0), p.max_backoff);
        assert_eq!(p.backoff(usize::MAX, 0.5), p.max_backoff.mul_f64(0.75));
    }
}
