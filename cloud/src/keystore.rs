//! Durable evaluation-key store: `redb`, keyed by (device identity, protocol key id), with a
//! per-device quota and least-recently-used eviction (TDM-KEY-4, TDM-KEY-7, TDM-KEY-9).
//!
//! Value layout (version 1): `[1][output mode][HE key id: 32 bytes][key blob]`. The HE key id
//! is what the device's ciphertext headers carry: for a packed key it is read from the decoded
//! evaluation key, for a no-key registration (empty blob) it equals the protocol key id
//! (TDM-KEY-2). Every lookup includes the peer identity, so one device can never read, use or
//! overwrite another's keys (TDM-KEY-4).
//!
//! A second table records, per stored key, the value of a persistent use counter at its last
//! registration or use; when a registration would take a device past its quota
//! ([`KeyQuota`]: keys and bytes), its least recently used keys are deleted in the same
//! transaction. A device whose key was evicted gets `UnknownKey` on its next request and
//! registers again.
//!
//! Prepared keys (≈ 5 × the blob size: NTT domain, 5 residues of 4 bytes per coefficient,
//! both halves) are cached in memory, bounded in bytes (LRU); after a restart or an eviction
//! they are prepared again from disk on first use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use tandem_he::{Context, EvaluationKey, OutputMode, ParameterSet, PreparedEvaluationKey};

use crate::CloudError;

const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys_v1");
/// (peer ‖ key id) → use counter at the key's last registration or use.
const USED: TableDefinition<&[u8], u64> = TableDefinition::new("key_used_v1");
/// "clock" → the persistent use counter.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta_v1");
const VALUE_VERSION: u8 = 1;
const VALUE_HEADER: usize = 34;
/// A cached key's recency is written to disk at most this often (non-durably).
const TOUCH_EVERY: Duration = Duration::from_secs(1);

/// Per-device storage quota (TDM-KEY-9). A registration that would exceed it evicts the
/// device's least recently used keys first; a single key larger than `max_bytes` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyQuota {
    /// Keys stored per device identity.
    pub max_keys: usize,
    /// Bytes of key blobs stored per device identity.
    pub max_bytes: u64,
}

impl Default for KeyQuota {
    /// 8 keys and 16 MiB per device.
    fn default() -> Self {
        KeyQuota {
            max_keys: 8,
            max_bytes: 16 << 20,
        }
    }
}

/// A stored key, ready for evaluation.
#[derive(Clone)]
pub struct StoredKey {
    /// Output mode the key serves.
    pub mode: OutputMode,
    /// Parameter set id the key belongs to.
    pub param_set: u16,
    /// HE key id that ciphertexts under this key carry.
    pub he_key_id: [u8; 32],
    /// Largest input chunk the key can pack (0 in no-key mode).
    pub max_chunk: usize,
    /// The prepared packing key (`None` for no-key mode).
    pub prepared: Option<Arc<PreparedEvaluationKey>>,
    /// Bytes the prepared key occupies in memory.
    pub prepared_bytes: usize,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("mode", &self.mode)
            .field("param_set", &self.param_set)
            .field("prepared_bytes", &self.prepared_bytes)
            .finish()
    }
}

/// What a registration did to the device's stored keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Keys of this device deleted to make room (least recently used first).
    pub evicted: Vec<[u8; 32]>,
}

type CacheKey = ([u8; 32], [u8; 32]);

struct CacheEntry {
    key: StoredKey,
    tick: u64,
    touched: Instant,
}

/// In-memory prepared keys, bounded in bytes, least recently used evicted first.
struct Cache {
    entries: HashMap<CacheKey, CacheEntry>,
    bytes: usize,
    max_bytes: usize,
    tick: u64,
}

impl Cache {
    fn remove(&mut self, k: &CacheKey) {
        if let Some(e) = self.entries.remove(k) {
            self.bytes = self.bytes.saturating_sub(e.key.prepared_bytes);
        }
    }

    fn put(&mut self, k: CacheKey, v: StoredKey) {
        self.remove(&k);
        if v.prepared_bytes > self.max_bytes {
            return;
        }
        while self.bytes.saturating_add(v.prepared_bytes) > self.max_bytes {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.tick)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.remove(&oldest);
        }
        self.tick += 1;
        self.bytes = self.bytes.saturating_add(v.prepared_bytes);
        self.entries.insert(
            k,
            CacheEntry {
                key: v,
                tick: self.tick,
                touched: Instant::now(),
            },
        );
    }

    /// The cached key and whether its recency should be written to disk now.
    fn get(&mut self, k: &CacheKey) -> Option<(StoredKey, bool)> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.entries.get_mut(k)?;
        e.tick = tick;
        let persist = e.touched.elapsed() >= TOUCH_EVERY;
        if persist {
            e.touched = Instant::now();
        }
        Some((e.key.clone(), persist))
    }
}

/// The key store.
pub struct KeyStore {
    path: PathBuf,
    db: Database,
    contexts: Vec<Arc<Context>>,
    max_key_len: usize,
    quota: KeyQuota,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("path", &self.path)
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

fn db_key(peer: &[u8; 32], key_id: &[u8; 32]) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(peer);
    k[32..].copy_from_slice(key_id);
    k
}

/// Bytes of a prepared evaluation key with `automorphisms` packing keys under `params`: per
/// automorphism and gadget level two polynomials in the NTT domain, each 5 residues of N
/// 32-bit words (`tandem_he` NTT layout).
pub fn prepared_key_bytes(params: &ParameterSet, automorphisms: usize) -> usize {
    automorphisms
        .saturating_mul(params.ks_levels as usize)
        .saturating_mul(2 * 5 * 4)
        .saturating_mul(params.poly_size)
}

impl KeyStore {
    /// Opens (or creates) the store at `path`. `contexts` are the parameter sets keys may use;
    /// `max_key_len` bounds a blob; `cache_bytes` bounds the prepared keys kept in memory.
    ///
    /// # Errors
    /// [`CloudError::Store`] naming the file if it cannot be opened or is not a key store.
    pub fn open(
        path: &Path,
        contexts: Vec<Arc<Context>>,
        max_key_len: usize,
        quota: KeyQuota,
        cache_bytes: usize,
    ) -> Result<Self, CloudError> {
        let err = |e: &dyn std::fmt::Display| {
            CloudError::Store(format!(
                "{}: {e} (restore the file from a backup, or move it away to start with no stored keys; devices then register again)",
                path.display()
            ))
        };
        let db = Database::create(path).map_err(|e| err(&e))?;
        let tx = db.begin_write().map_err(|e| err(&e))?;
        tx.open_table(KEYS).map_err(|e| err(&e))?;
        tx.open_table(USED).map_err(|e| err(&e))?;
        tx.open_table(META).map_err(|e| err(&e))?;
        tx.commit().map_err(|e| err(&e))?;
        Ok(KeyStore {
            path: path.to_path_buf(),
            db,
            contexts,
            max_key_len,
            quota,
            cache: Mutex::new(Cache {
                entries: HashMap::new(),
                bytes: 0,
                max_bytes: cache_bytes,
                tick: 0,
            }),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> CloudError {
        CloudError::Store(format!("{}: {e}", self.path.display()))
    }

    /// The per-device quota.
    pub fn quota(&self) -> KeyQuota {
        self.quota
    }

    /// Bytes of prepared keys currently cached.
    pub fn cached_bytes(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.bytes)
    }

    /// Decodes and validates a registration against parameter set `param_set` and the plan's
    /// `min_chunk` (the packed plan's chunk; 0 for no-key), prepares the key, then stores it
    /// durably under `(peer, key_id)` (committed before this returns), evicting the device's
    /// least recently used keys if the quota requires. CPU-bound for packed keys: call from a
    /// blocking task. Only after `Ok` may the session send `KeyAck` (TDM-KEY-8).
    ///
    /// # Errors
    /// [`CloudError::KeyInvalid`] if the blob does not decode, belongs to another parameter
    /// set, or cannot pack `min_chunk`; [`CloudError::Quota`] if the blob alone exceeds the
    /// per-device byte quota; [`CloudError::Store`] if the commit fails.
    pub fn register(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        mode: OutputMode,
        blob: &[u8],
        param_set: u16,
        min_chunk: usize,
    ) -> Result<(StoredKey, Registration), CloudError> {
        let ctx = self
            .contexts
            .iter()
            .find(|c| c.params().id == param_set)
            .ok_or_else(|| {
                CloudError::KeyInvalid(format!("parameter set {param_set} is not served"))
            })?;
        let stored = Self::decode(ctx, self.max_key_len, key_id, mode, blob)?;
        if mode == OutputMode::Packed && stored.max_chunk < min_chunk {
            return Err(CloudError::KeyInvalid(format!(
                "evaluation key packs chunks of at most {} inputs, the model's plan needs {min_chunk}",
                stored.max_chunk
            )));
        }
        let new_bytes = blob.len() as u64;
        if new_bytes > self.quota.max_bytes {
            return Err(CloudError::Quota(format!(
                "key blob of {new_bytes} bytes exceeds the per-device quota of {} bytes",
                self.quota.max_bytes
            )));
        }
        let mut value = Vec::with_capacity(VALUE_HEADER + blob.len());
        value.push(VALUE_VERSION);
        value.push(mode.to_u8());
        value.extend_from_slice(&stored.he_key_id);
        value.extend_from_slice(blob);
        let this = db_key(peer, key_id);
        let mut evicted = Vec::new();
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut keys = tx.open_table(KEYS).map_err(|e| self.err(e))?;
            let mut used = tx.open_table(USED).map_err(|e| self.err(e))?;
            let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
            // The device's other keys: (key id, bytes, last use).
            let lo = db_key(peer, &[0u8; 32]);
            let hi = db_key(peer, &[0xffu8; 32]);
            let mut others: Vec<([u8; 32], u64, u64)> = Vec::new();
            for item in keys
                .range(lo.as_slice()..=hi.as_slice())
                .map_err(|e| self.err(e))?
            {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let k = k.value();
                if k.len() != 64 || &k[..32] != peer || k == this.as_slice() {
                    continue;
                }
                let mut id = [0u8; 32];
                id.copy_from_slice(&k[32..]);
                let bytes = v.value().len().saturating_sub(VALUE_HEADER) as u64;
                let tick = used
                    .get(k)
                    .map_err(|e| self.err(e))?
                    .map_or(0, |t| t.value());
                others.push((id, bytes, tick));
            }
            // TDM-KEY-9: evict least recently used until the new key fits the quota.
            others.sort_by_key(|&(id, _, tick)| (tick, id));
            let mut count = others.len();
            let mut bytes: u64 = others.iter().map(|o| o.1).sum();
            for (id, b, _) in &others {
                if count < self.quota.max_keys
                    && bytes.saturating_add(new_bytes) <= self.quota.max_bytes
                {
                    break;
                }
                let k = db_key(peer, id);
                keys.remove(k.as_slice()).map_err(|e| self.err(e))?;
                used.remove(k.as_slice()).map_err(|e| self.err(e))?;
                count -= 1;
                bytes = bytes.saturating_sub(*b);
                evicted.push(*id);
            }
            let clock = meta
                .get("clock")
                .map_err(|e| self.err(e))?
                .map_or(0, |t| t.value())
                .saturating_add(1);
            meta.insert("clock", clock).map_err(|e| self.err(e))?;
            keys.insert(this.as_slice(), value.as_slice())
                .map_err(|e| self.err(e))?;
            used.insert(this.as_slice(), clock)
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        if let Ok(mut c) = self.cache.lock() {
            for id in &evicted {
                c.remove(&(*peer, *id));
            }
            c.put((*peer, *key_id), stored.clone());
        }
        Ok((stored, Registration { evicted }))
    }

    fn decode(
        ctx: &Arc<Context>,
        max_key_len: usize,
        key_id: &[u8; 32],
        mode: OutputMode,
        blob: &[u8],
    ) -> Result<StoredKey, CloudError> {
        let params = ctx.params();
        match mode {
            OutputMode::NoKey => {
                if !blob.is_empty() {
                    return Err(CloudError::KeyInvalid(
                        "no-key registration with a key blob".into(),
                    ));
                }
                Ok(StoredKey {
                    mode,
                    param_set: params.id,
                    he_key_id: *key_id,
                    max_chunk: 0,
                    prepared: None,
                    prepared_bytes: 0,
                })
            }
            OutputMode::Packed => {
                let key = EvaluationKey::from_bytes(blob, max_key_len, &params)
                    .map_err(|e| CloudError::KeyInvalid(e.to_string()))?;
                let prepared = PreparedEvaluationKey::prepare(&key, ctx)
                    .map_err(|e| CloudError::KeyInvalid(e.to_string()))?;
                Ok(StoredKey {
                    mode,
                    param_set: params.id,
                    he_key_id: key.key_id(),
                    max_chunk: key.max_chunk(),
                    prepared: Some(Arc::new(prepared)),
                    prepared_bytes: prepared_key_bytes(&params, key.automorphisms().len()),
                })
            }
        }
    }

    /// Records a use of `(peer, key_id)` for the LRU order (not durably: a crash forgets at
    /// most the last second of uses).
    fn touch(&self, peer: &[u8; 32], key_id: &[u8; 32]) -> Result<(), CloudError> {
        let k = db_key(peer, key_id);
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(Durability::None);
        {
            let keys = tx.open_table(KEYS).map_err(|e| self.err(e))?;
            if keys.get(k.as_slice()).map_err(|e| self.err(e))?.is_none() {
                return Ok(());
            }
            let mut used = tx.open_table(USED).map_err(|e| self.err(e))?;
            let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
            let clock = meta
                .get("clock")
                .map_err(|e| self.err(e))?
                .map_or(0, |t| t.value())
                .saturating_add(1);
            meta.insert("clock", clock).map_err(|e| self.err(e))?;
            used.insert(k.as_slice(), clock).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The key stored under `(peer, key_id)`, from the cache or (lazily, preparing it) from
    /// disk; records the use for the LRU order. `Ok(None)` if this peer has no such key (never
    /// registered, or evicted). CPU-bound on a cache miss.
    ///
    /// # Errors
    /// [`CloudError::Store`] if the store cannot be read or a record is damaged.
    pub fn get(&self, peer: &[u8; 32], key_id: &[u8; 32]) -> Result<Option<StoredKey>, CloudError> {
        let hit = self
            .cache
            .lock()
            .ok()
            .and_then(|mut c| c.get(&(*peer, *key_id)));
        if let Some((k, persist)) = hit {
            if persist {
                self.touch(peer, key_id)?;
            }
            return Ok(Some(k));
        }
        let (mode, he_key_id, blob) = {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(KEYS).map_err(|e| self.err(e))?;
            let Some(v) = t
                .get(db_key(peer, key_id).as_slice())
                .map_err(|e| self.err(e))?
            else {
                return Ok(None);
            };
            let v = v.value();
            let (Some(head), Some(blob)) = (v.get(..VALUE_HEADER), v.get(VALUE_HEADER..)) else {
                return Err(self.err("key record shorter than its header"));
            };
            if head[0] != VALUE_VERSION {
                return Err(self.err(format!("key record version {} unknown", head[0])));
            }
            let mode = OutputMode::from_u8(head[1]).map_err(|e| self.err(e))?;
            (mode, head[2..].to_vec(), blob.to_vec())
        };
        // The record's parameter set is the one its blob decodes under.
        let mut last = None;
        for ctx in &self.contexts {
            match Self::decode(ctx, self.max_key_len, key_id, mode, &blob) {
                Ok(stored) => {
                    if stored.he_key_id[..] != he_key_id[..] {
                        return Err(self.err("key record does not match its key id"));
                    }
                    self.touch(peer, key_id)?;
                    if let Ok(mut c) = self.cache.lock() {
                        c.put((*peer, *key_id), stored.clone());
                    }
                    return Ok(Some(stored));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(self.err(format!(
            "stored key does not decode: {}",
            last.map_or_else(|| "no parameter set served".into(), |e| e.to_string())
        )))
    }

    /// Key ids stored for `peer` (at most `max`), for `CloudSession::allow_key` (TDM-KEY-7).
    ///
    /// # Errors
    /// [`CloudError::Store`] if the store cannot be read.
    pub fn list(&self, peer: &[u8; 32], max: usize) -> Result<Vec<[u8; 32]>, CloudError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(KEYS).map_err(|e| self.err(e))?;
        let lo = db_key(peer, &[0u8; 32]);
        let hi = db_key(peer, &[0xffu8; 32]);
        let mut out = Vec::new();
        for item in t
            .range(lo.as_slice()..=hi.as_slice())
            .map_err(|e| self.err(e))?
        {
            if out.len() >= max {
                break;
            }
            let (k, _) = item.map_err(|e| self.err(e))?;
            let k = k.value();
            if k.len() == 64 && &k[..32] == peer {
                let mut id = [0u8; 32];
                id.copy_from_slice(&k[32..]);
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Number of records in the store.
    ///
    /// # Errors
    /// [`CloudError::Store`] if the store cannot be read.
    pub fn len(&self) -> Result<u64, CloudError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(KEYS).map_err(|e| self.err(e))?;
        t.len().map_err(|e| self.err(e))
    }

    /// True if the store holds no keys.
    ///
    /// # Errors
    /// [`CloudError::Store`] if the store cannot be read.
    pub fn is_empty(&self) -> Result<bool, CloudError> {
        Ok(self.len()? == 0)
    }
}
