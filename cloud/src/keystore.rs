//! Durable evaluation-key store: `redb`, keyed by (device identity, protocol key id).
//!
//! Value layout (version 1): `[1][output mode][HE key id: 32 bytes][key blob]`. The HE key id
//! is what the device's ciphertext headers carry: for a packed key it is read from the decoded
//! evaluation key, for a no-key registration (empty blob) it equals the protocol key id
//! (TDM-KEY-2). Every lookup includes the peer identity, so one device can never read, use or
//! overwrite another's keys (TDM-KEY-4). Prepared keys are cached in memory; after a restart
//! they are reloaded from disk on first use.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableTableMetadata, TableDefinition};
use tandem_he::{Context, EvaluationKey, OutputMode, PreparedEvaluationKey};

use crate::CloudError;

const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys_v1");
const VALUE_VERSION: u8 = 1;
const MAX_CACHED: usize = 1024;

/// A stored key, ready for evaluation.
#[derive(Clone)]
pub struct StoredKey {
    /// Output mode the key serves.
    pub mode: OutputMode,
    /// HE key id that ciphertexts under this key carry.
    pub he_key_id: [u8; 32],
    /// The prepared packing key (`None` for no-key mode).
    pub prepared: Option<Arc<PreparedEvaluationKey>>,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("mode", &self.mode)
            .finish()
    }
}

type CacheKey = ([u8; 32], [u8; 32]);

/// The key store.
pub struct KeyStore {
    db: Database,
    ctx: Arc<Context>,
    max_key_len: usize,
    cache: Mutex<HashMap<CacheKey, StoredKey>>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").finish_non_exhaustive()
    }
}

fn store_err(e: impl std::fmt::Display) -> CloudError {
    CloudError::Store(e.to_string())
}

fn db_key(peer: &[u8; 32], key_id: &[u8; 32]) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(peer);
    k[32..].copy_from_slice(key_id);
    k
}

impl KeyStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path, ctx: Arc<Context>, max_key_len: usize) -> Result<Self, CloudError> {
        let db = Database::create(path).map_err(store_err)?;
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(KEYS).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        Ok(KeyStore {
            db,
            ctx,
            max_key_len,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Validates, prepares and durably stores a registration under `(peer, key_id)`
    /// (committed before this returns). CPU-bound for packed keys: call from a blocking task.
    pub fn register(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        mode: OutputMode,
        blob: &[u8],
    ) -> Result<StoredKey, CloudError> {
        let stored = self.decode(key_id, mode, blob)?;
        let mut value = Vec::with_capacity(34 + blob.len());
        value.push(VALUE_VERSION);
        value.push(mode.to_u8());
        value.extend_from_slice(&stored.he_key_id);
        value.extend_from_slice(blob);
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut t = tx.open_table(KEYS).map_err(store_err)?;
            t.insert(db_key(peer, key_id).as_slice(), value.as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        self.cache_put((*peer, *key_id), stored.clone());
        Ok(stored)
    }

    fn decode(
        &self,
        key_id: &[u8; 32],
        mode: OutputMode,
        blob: &[u8],
    ) -> Result<StoredKey, CloudError> {
        match mode {
            OutputMode::NoKey => {
                if !blob.is_empty() {
                    return Err(CloudError::Config(
                        "no-key registration with a key blob".into(),
                    ));
                }
                Ok(StoredKey {
                    mode,
                    he_key_id: *key_id,
                    prepared: None,
                })
            }
            OutputMode::Packed => {
                let key = EvaluationKey::from_bytes(blob, self.max_key_len, &self.ctx.params())?;
                let prepared = PreparedEvaluationKey::prepare(&key, &self.ctx)?;
                Ok(StoredKey {
                    mode,
                    he_key_id: key.key_id(),
                    prepared: Some(Arc::new(prepared)),
                })
            }
        }
    }

    fn cache_put(&self, k: CacheKey, v: StoredKey) {
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= MAX_CACHED {
                c.clear();
            }
            c.insert(k, v);
        }
    }

    /// The key stored under `(peer, key_id)`, from the cache or (lazily, preparing it) from
    /// disk. `Ok(None)` if this peer has no such key. CPU-bound on a cache miss.
    pub fn get(&self, peer: &[u8; 32], key_id: &[u8; 32]) -> Result<Option<StoredKey>, CloudError> {
        if let Some(k) = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&(*peer, *key_id)).cloned())
        {
            return Ok(Some(k));
        }
        let tx = self.db.begin_read().map_err(store_err)?;
        let t = tx.open_table(KEYS).map_err(store_err)?;
        let Some(v) = t.get(db_key(peer, key_id).as_slice()).map_err(store_err)? else {
            return Ok(None);
        };
        let v = v.value();
        if v.len() < 34 || v[0] != VALUE_VERSION {
            return Err(CloudError::Store("corrupt key record".into()));
        }
        let mode = OutputMode::from_u8(v[1])?;
        let stored = self.decode(key_id, mode, &v[34..])?;
        if stored.he_key_id[..] != v[2..34] {
            return Err(CloudError::Store(
                "key record does not match its key id".into(),
            ));
        }
        self.cache_put((*peer, *key_id), stored.clone());
        Ok(Some(stored))
    }

    /// Key ids stored for `peer` (at most `max`), for `CloudSession::allow_key` (TDM-KEY-7).
    pub fn list(&self, peer: &[u8; 32], max: usize) -> Result<Vec<[u8; 32]>, CloudError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let t = tx.open_table(KEYS).map_err(store_err)?;
        let lo = db_key(peer, &[0u8; 32]);
        let hi = db_key(peer, &[0xffu8; 32]);
        let mut out = Vec::new();
        for item in t.range(lo.as_slice()..=hi.as_slice()).map_err(store_err)? {
            let (k, _) = item.map_err(store_err)?;
            let k = k.value();
            if k.len() == 64 && &k[..32] == peer {
                let mut id = [0u8; 32];
                id.copy_from_slice(&k[32..]);
                out.push(id);
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Number of records in the store.
    pub fn len(&self) -> Result<u64, CloudError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let t = tx.open_table(KEYS).map_err(store_err)?;
        t.len().map_err(store_err)
    }

    /// True if the store holds no keys.
    pub fn is_empty(&self) -> Result<bool, CloudError> {
        Ok(self.len()? == 0)
    }
}
