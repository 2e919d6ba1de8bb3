//! The embedded key-store backend: one `redb` file, for a single replica (the default).
//!
//! Tables: `keys_v1` maps `peer ‖ key id` (64 bytes) to `[1][output mode][HE key id: 32
//! bytes][key blob]`; `key_times_v2` maps the same key to `(created µs, last use µs)`. A file
//! written before `key_times_v2` existed (use counters in `key_used_v1`) is migrated on open:
//! every record gets the opening time as creation and last use.

use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, Durability, ReadableTable, ReadableTableMetadata, StorageError,
    TableDefinition,
};

use crate::keystore::{plan_evictions, KeyBackend, KeyQuota, KeyRecord};
use crate::CloudError;

const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys_v1");
/// (peer ‖ key id) → (created µs, last use µs).
const TIMES: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("key_times_v2");
/// Tables of the counter-based layout, dropped by the migration.
const OLD_USED: TableDefinition<&[u8], u64> = TableDefinition::new("key_used_v1");
const OLD_META: TableDefinition<&str, u64> = TableDefinition::new("meta_v1");
const VALUE_VERSION: u8 = 1;
const VALUE_HEADER: usize = 34;
/// The first bytes of every `redb` file (redb's file format, `header.rs`): a non-empty file
/// that does not start with them is foreign or zero-filled and is refused before `redb` reads it.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
/// Advice for a key store that is damaged or not a key store.
const DAMAGED: &str = "restore the file from a backup, or move it away to start with no stored \
     keys; devices then register again";

/// Why `open` could not use the file, before the generic "damaged" case.
fn precheck(path: &Path) -> Result<(), CloudError> {
    let shown = path.display();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(CloudError::Store(format!(
                "{shown}: the directory {} does not exist: create it, or set key_store to a \
                 path in an existing directory",
                dir.display()
            )));
        }
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        // Created by `Database::create`.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(path, &e)),
    };
    if meta.is_dir() {
        return Err(CloudError::Store(format!(
            "{shown} is a directory: set key_store to a file path (e.g. {}/keys.redb)",
            shown
        )));
    }
    if meta.len() == 0 {
        return Ok(());
    }
    let mut head = [0u8; REDB_MAGIC.len()];
    let n = std::fs::File::open(path)
        .and_then(|mut f| {
            let mut n = 0;
            while n < head.len() {
                match f.read(&mut head[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        })
        .map_err(|e| io_error(path, &e))?;
    if n < head.len() || head != REDB_MAGIC {
        return Err(CloudError::Store(format!(
            "{shown}: not a redb key store (the file does not start with redb's header: foreign, \
             zero-filled or truncated): {DAMAGED}"
        )));
    }
    Ok(())
}

fn io_error(path: &Path, e: &std::io::Error) -> CloudError {
    let shown = path.display();
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => CloudError::Store(format!(
            "{shown}: {e}: the cloud's user may not read and write it: fix its owner or mode \
             (and its directory's), or set key_store to another path"
        )),
        std::io::ErrorKind::NotFound => CloudError::Store(format!(
            "{shown}: {e}: create its directory, or set key_store to a path in an existing \
             directory"
        )),
        std::io::ErrorKind::UnexpectedEof => {
            CloudError::Store(format!("{shown}: {e}: the file is truncated: {DAMAGED}"))
        }
        _ => CloudError::Store(format!("{shown}: {e} (check the disk and the file)")),
    }
}

/// Text of a caught panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// A `redb` file holding key records.
pub struct RedbStore {
    path: PathBuf,
    db: Database,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

fn db_key(peer: &[u8; 32], key_id: &[u8; 32]) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(peer);
    k[32..].copy_from_slice(key_id);
    k
}

fn id_of(k: &[u8]) -> Option<[u8; 32]> {
    k.get(32..64).and_then(|s| <[u8; 32]>::try_from(s).ok())
}

impl RedbStore {
    /// Opens (or creates) the store at `path`, migrating an older layout.
    ///
    /// # Errors
    /// [`CloudError::Store`] naming the file and what to do, never a panic (issue 12 item 8):
    /// the file is in use by another process (another cloud), its directory is missing, it
    /// may not be read or written, or it is damaged, truncated, zero-filled or not a key
    /// store (a panic inside `redb` on such a file is caught and reported as damage).
    pub fn open(path: &Path) -> Result<Self, CloudError> {
        precheck(path)?;
        match catch_unwind(AssertUnwindSafe(|| Self::open_checked(path))) {
            Ok(r) => r,
            Err(p) => Err(CloudError::Store(format!(
                "{}: the storage library failed on this file ({}): it is damaged or truncated: \
                 {DAMAGED}",
                path.display(),
                panic_text(p.as_ref())
            ))),
        }
    }

    fn open_checked(path: &Path) -> Result<Self, CloudError> {
        let err = |e: &dyn std::fmt::Display| {
            CloudError::Store(format!("{}: {e} ({DAMAGED})", path.display()))
        };
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => {
                return Err(CloudError::Store(format!(
                    "{}: in use by another process (is another cloud running on this \
                     key_store?): stop the other cloud, or give this one another key_store \
                     path; the file is not damaged",
                    path.display()
                )))
            }
            Err(DatabaseError::Storage(StorageError::Io(e))) => return Err(io_error(path, &e)),
            Err(e) => return Err(err(&e)),
        };
        let now = crate::keystore::now_us();
        let tx = db.begin_write().map_err(|e| err(&e))?;
        {
            let keys = tx.open_table(KEYS).map_err(|e| err(&e))?;
            let mut times = tx.open_table(TIMES).map_err(|e| err(&e))?;
            let mut missing = Vec::new();
            for item in keys.iter().map_err(|e| err(&e))? {
                let (k, _) = item.map_err(|e| err(&e))?;
                if times.get(k.value()).map_err(|e| err(&e))?.is_none() {
                    missing.push(k.value().to_vec());
                }
            }
            for k in missing {
                times
                    .insert(k.as_slice(), (now, now))
                    .map_err(|e| err(&e))?;
            }
        }
        tx.delete_table(OLD_USED).map_err(|e| err(&e))?;
        tx.delete_table(OLD_META).map_err(|e| err(&e))?;
        tx.commit().map_err(|e| err(&e))?;
        Ok(RedbStore {
            path: path.to_path_buf(),
            db,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> CloudError {
        CloudError::Store(format!("{}: {e}", self.path.display()))
    }
}

impl KeyBackend for RedbStore {
    fn put(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        mode: u8,
        he_key_id: &[u8; 32],
        blob: &[u8],
        quota: KeyQuota,
        cutoff_us: u64,
        now_us: u64,
    ) -> Result<Vec<[u8; 32]>, CloudError> {
        let mut value = Vec::with_capacity(VALUE_HEADER + blob.len());
        value.push(VALUE_VERSION);
        value.push(mode);
        value.extend_from_slice(he_key_id);
        value.extend_from_slice(blob);
        let this = db_key(peer, key_id);
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let evicted = {
            let mut keys = tx.open_table(KEYS).map_err(|e| self.err(e))?;
            let mut times = tx.open_table(TIMES).map_err(|e| self.err(e))?;
            let lo = db_key(peer, &[0u8; 32]);
            let hi = db_key(peer, &[0xffu8; 32]);
            // The device's other live keys: (key id, bytes, last use); expired ones go.
            let mut others = Vec::new();
            let mut expired = Vec::new();
            for item in keys
                .range(lo.as_slice()..=hi.as_slice())
                .map_err(|e| self.err(e))?
            {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let k = k.value();
                let Some(id) = id_of(k) else { continue };
                if k == this.as_slice() {
                    continue;
                }
                let used = times
                    .get(k)
                    .map_err(|e| self.err(e))?
                    .map_or(0, |t| t.value().1);
                if used < cutoff_us {
                    expired.push(id);
                } else {
                    let bytes = v.value().len().saturating_sub(VALUE_HEADER) as u64;
                    others.push((id, bytes, used));
                }
            }
            let evicted = plan_evictions(others, blob.len() as u64, quota);
            for id in expired.iter().chain(&evicted) {
                let k = db_key(peer, id);
                keys.remove(k.as_slice()).map_err(|e| self.err(e))?;
                times.remove(k.as_slice()).map_err(|e| self.err(e))?;
            }
            keys.insert(this.as_slice(), value.as_slice())
                .map_err(|e| self.err(e))?;
            times
                .insert(this.as_slice(), (now_us, now_us))
                .map_err(|e| self.err(e))?;
            evicted
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(evicted)
    }

    fn get(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        cutoff_us: u64,
    ) -> Result<Option<KeyRecord>, CloudError> {
        let k = db_key(peer, key_id);
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let keys = tx.open_table(KEYS).map_err(|e| self.err(e))?;
        let times = tx.open_table(TIMES).map_err(|e| self.err(e))?;
        let Some(v) = keys.get(k.as_slice()).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let (created_us, last_use_us) = times
            .get(k.as_slice())
            .map_err(|e| self.err(e))?
            .map_or((0, 0), |t| t.value());
        if last_use_us < cutoff_us {
            return Ok(None);
        }
        let v = v.value();
        let (Some(head), Some(blob)) = (v.get(..VALUE_HEADER), v.get(VALUE_HEADER..)) else {
            return Err(self.err("key record shorter than its header"));
        };
        if head[0] != VALUE_VERSION {
            return Err(self.err(format!("key record version {} unknown", head[0])));
        }
        let mut he_key_id = [0u8; 32];
        he_key_id.copy_from_slice(&head[2..]);
        Ok(Some(KeyRecord {
            mode: head[1],
            he_key_id,
            blob: blob.to_vec(),
            created_us,
            last_use_us,
        }))
    }

    fn touch(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        cutoff_us: u64,
        now_us: u64,
    ) -> Result<Option<u64>, CloudError> {
        let k = db_key(peer, key_id);
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        // Recency only: a crash forgets at most the last uses.
        tx.set_durability(Durability::None);
        let created = {
            let mut times = tx.open_table(TIMES).map_err(|e| self.err(e))?;
            let cur = times
                .get(k.as_slice())
                .map_err(|e| self.err(e))?
                .map(|t| t.value());
            match cur {
                Some((created, used)) if used >= cutoff_us => {
                    times
                        .insert(k.as_slice(), (created, used.max(now_us)))
                        .map_err(|e| self.err(e))?;
                    Some(created)
                }
                _ => None,
            }
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(created)
    }

    fn list(
        &self,
        peer: &[u8; 32],
        max: usize,
        cutoff_us: u64,
    ) -> Result<Vec<[u8; 32]>, CloudError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let times = tx.open_table(TIMES).map_err(|e| self.err(e))?;
        let lo = db_key(peer, &[0u8; 32]);
        let hi = db_key(peer, &[0xffu8; 32]);
        let mut out = Vec::new();
        for item in times
            .range(lo.as_slice()..=hi.as_slice())
            .map_err(|e| self.err(e))?
        {
            if out.len() >= max {
                break;
            }
            let (k, t) = item.map_err(|e| self.err(e))?;
            if t.value().1 < cutoff_us {
                continue;
            }
            if let Some(id) = id_of(k.value()) {
                out.push(id);
            }
        }
        Ok(out)
    }

    fn expire(&self, cutoff_us: u64) -> Result<u64, CloudError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let n = {
            let mut keys = tx.open_table(KEYS).map_err(|e| self.err(e))?;
            let mut times = tx.open_table(TIMES).map_err(|e| self.err(e))?;
            let mut old = Vec::new();
            for item in times.iter().map_err(|e| self.err(e))? {
                let (k, t) = item.map_err(|e| self.err(e))?;
                if t.value().1 < cutoff_us {
                    old.push(k.value().to_vec());
                }
            }
            for k in &old {
                keys.remove(k.as_slice()).map_err(|e| self.err(e))?;
                times.remove(k.as_slice()).map_err(|e| self.err(e))?;
            }
            old.len() as u64
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(n)
    }

    fn len(&self) -> Result<u64, CloudError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(KEYS).map_err(|e| self.err(e))?;
        t.len().map_err(|e| self.err(e))
    }

    fn ping(&self) -> Result<(), CloudError> {
        self.db.begin_read().map(|_| ()).map_err(|e| self.err(e))
    }

    fn kind(&self) -> &'static str {
        "redb"
    }
}
