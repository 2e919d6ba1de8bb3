//! Evaluation-key store: a [`KeyBackend`] holding the records durably — embedded `redb`
//! ([`crate::redb_store::RedbStore`], the default) or PostgreSQL shared by several replicas
//! ([`crate::pg_store::PgStore`], issue 13) — behind one front, [`KeyStore`], that validates
//! registrations, keeps the per-device quota and expiry policy, and caches prepared keys.
//!
//! Records are keyed by (device identity, protocol key id) and carry the output mode, the HE
//! key id that the device's ciphertext headers carry (for a packed key read from the decoded
//! evaluation key, for a no-key registration equal to the protocol key id, TDM-KEY-2), the
//! blob, its size, and the creation and last-use times (µs since the Unix epoch). Every backend
//! operation takes the peer identity, so one device can never read, use or overwrite another's
//! keys (TDM-KEY-4).
//!
//! Policy (TDM-KEY-9), the same in every backend: a registration that would take a device past
//! its [`KeyQuota`] (keys and bytes) deletes that device's least recently used keys in the same
//! transaction (ties broken by key id) — eviction rather than refusal, so a device that
//! rotates keys is never locked out; a single blob larger than the byte quota is refused. A key
//! unused for longer than the expiry ([`KeyStore::expiry`]) is treated as absent and deleted by
//! the next sweep. A device whose key was evicted or expired gets `UnknownKey` on its next
//! request and registers again.
//!
//! Prepared keys (≈ 5 × the blob size: NTT domain, 5 residues of 4 bytes per coefficient,
//! both halves) are cached per replica, bounded in bytes (LRU); after a restart, an eviction,
//! or on another replica they are prepared again from the store on first use. A cached key's
//! use is written to the store at most once a second; that write also checks that the record
//! still exists and was not replaced (by another replica), else the cache entry is dropped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_he::{Context, EvaluationKey, OutputMode, ParameterSet, PreparedEvaluationKey};

use crate::metrics::Prom;
use crate::redb_store::RedbStore;
use crate::CloudError;

/// A cached key's recency is written to the store at most this often.
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

/// One stored record as a backend returns it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Output mode (`tandem_he::OutputMode::to_u8`).
    pub mode: u8,
    /// HE key id that ciphertexts under this key carry.
    pub he_key_id: [u8; 32],
    /// The evaluation-key blob as registered (empty for no-key mode).
    pub blob: Vec<u8>,
    /// Registration time, µs since the Unix epoch.
    pub created_us: u64,
    /// Last registration or use, µs since the Unix epoch.
    pub last_use_us: u64,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("mode", &self.mode)
            .field("blob_len", &self.blob.len())
            .field("created_us", &self.created_us)
            .field("last_use_us", &self.last_use_us)
            .finish()
    }
}

/// Durable storage of key records, keyed by (peer identity, key id). Implementations are
/// blocking (call them from a blocking task) and must apply [`plan_evictions`] inside the
/// same transaction as the write, so that concurrent registrations of one device — from any
/// replica sharing the store — never leave it above its quota.
///
/// `cutoff_us`: records whose last use is older are expired (absent for reads, deleted by
/// writes and sweeps); 0 disables expiry.
pub trait KeyBackend: Send + Sync + std::fmt::Debug {
    /// Stores the record for `(peer, key_id)` (replacing that id's previous record, with
    /// `created_us = last_use_us = now_us`), after deleting the peer's expired records and
    /// evicting its least recently used ones as [`plan_evictions`] says; durable when this
    /// returns. Returns the evicted key ids.
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`]; nothing is written then.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<Vec<[u8; 32]>, CloudError>;

    /// The live record for `(peer, key_id)`, or `None` (never stored, evicted, expired).
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`].
    fn get(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        cutoff_us: u64,
    ) -> Result<Option<KeyRecord>, CloudError>;

    /// Records a use at `now_us` (last use never moves backwards; need not be durable) and
    /// returns the record's `created_us`, or `None` if there is no live record.
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`].
    fn touch(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        cutoff_us: u64,
        now_us: u64,
    ) -> Result<Option<u64>, CloudError>;

    /// Live key ids of `peer`, at most `max`, in key-id order.
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`].
    fn list(
        &self,
        peer: &[u8; 32],
        max: usize,
        cutoff_us: u64,
    ) -> Result<Vec<[u8; 32]>, CloudError>;

    /// Deletes every record last used before `cutoff_us`; returns how many.
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`].
    fn expire(&self, cutoff_us: u64) -> Result<u64, CloudError>;

    /// Number of records (live or not yet swept).
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`].
    fn len(&self) -> Result<u64, CloudError>;

    /// True if no record is stored.
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`].
    fn is_empty(&self) -> Result<bool, CloudError> {
        Ok(self.len()? == 0)
    }

    /// Cheap liveness check (readiness): the store answers and its schema is in place.
    ///
    /// # Errors
    /// [`CloudError::StoreUnavailable`] while it cannot be reached.
    fn ping(&self) -> Result<(), CloudError>;

    /// `redb` or `postgres`, for logs and metrics.
    fn kind(&self) -> &'static str;
}

/// TDM-KEY-9, shared by every backend: which of a device's other keys — `(key id, blob bytes,
/// last use)` — to delete so that one more key of `new_bytes` fits `quota`: least recently
/// used first, ties by key id.
pub fn plan_evictions(
    mut others: Vec<([u8; 32], u64, u64)>,
    new_bytes: u64,
    quota: KeyQuota,
) -> Vec<[u8; 32]> {
    others.sort_by_key(|&(id, _, used)| (used, id));
    let mut count = others.len();
    let mut bytes: u64 = others.iter().map(|o| o.1).sum();
    let mut out = Vec::new();
    for (id, b, _) in others {
        if count < quota.max_keys && bytes.saturating_add(new_bytes) <= quota.max_bytes {
            break;
        }
        count -= 1;
        bytes = bytes.saturating_sub(b);
        out.push(id);
    }
    out
}

/// Wall-clock µs since the Unix epoch, strictly increasing within this process (so that two
/// uses in one microsecond still order).
pub fn now_us() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = wall.max(prev.saturating_add(1));
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
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
    /// Bodies (secrets) per key-switching level: the most bodies per mask of a plan it can
    /// serve (`tandem_he::EvaluationKey::bodies`; 0 in no-key mode).
    pub bodies: usize,
    /// Stride level of the key's first automorphism (`tandem_he::EvaluationKey::first_level`;
    /// 1 in no-key mode).
    pub first_level: u32,
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
    created_us: u64,
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

    fn put(&mut self, k: CacheKey, v: StoredKey, created_us: u64) {
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
                created_us,
                tick: self.tick,
                touched: Instant::now(),
            },
        );
    }

    /// The cached key, its creation time, and whether its use should be written now.
    fn get(&mut self, k: &CacheKey) -> Option<(StoredKey, u64, bool)> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.entries.get_mut(k)?;
        e.tick = tick;
        let persist = e.touched.elapsed() >= TOUCH_EVERY;
        if persist {
            e.touched = Instant::now();
        }
        Some((e.key.clone(), e.created_us, persist))
    }
}

/// The key store: validation, policy and the prepared-key cache over a [`KeyBackend`].
pub struct KeyStore {
    backend: Arc<dyn KeyBackend>,
    contexts: Vec<Arc<Context>>,
    max_key_len: usize,
    quota: KeyQuota,
    expiry: Option<Duration>,
    cache: Mutex<Cache>,
    healthy: AtomicBool,
    prom: Option<Arc<Prom>>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("backend", &self.backend)
            .field("quota", &self.quota)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

/// Bytes of a prepared evaluation key with `automorphisms` packing keys for `bodies` secrets
/// (shared-mask keys, `tandem_he::EvaluationKey::bodies`) under `params`: per automorphism and
/// gadget level one mask and `bodies` body polynomials in the NTT domain, each 5 residues of N
/// 32-bit words for parameter set 1 or 3 residues (modulo Q) for set 2 (`tandem_he` NTT layout).
pub fn prepared_key_bytes(params: &ParameterSet, automorphisms: usize, bodies: usize) -> usize {
    let residues = match params.modulus {
        tandem_he::Modulus::Rns3 => 3,
        tandem_he::Modulus::Pow2_64 => 5,
    };
    automorphisms
        .saturating_mul(params.ks_levels as usize)
        .saturating_mul(bodies.max(1).saturating_add(1))
        .saturating_mul(residues * 4)
        .saturating_mul(params.poly_size)
}

impl KeyStore {
    /// Opens (or creates) the embedded `redb` store at `path`. `contexts` are the parameter
    /// sets keys may use; `max_key_len` bounds a blob; `cache_bytes` bounds the prepared keys
    /// kept in memory. No expiry (see [`KeyStore::new`]).
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
        let backend = Arc::new(RedbStore::open(path)?);
        Ok(Self::new(
            backend,
            contexts,
            max_key_len,
            quota,
            None,
            cache_bytes,
        ))
    }

    /// A store over `backend`; keys unused for `expiry` are treated as absent (`None`: never).
    pub fn new(
        backend: Arc<dyn KeyBackend>,
        contexts: Vec<Arc<Context>>,
        max_key_len: usize,
        quota: KeyQuota,
        expiry: Option<Duration>,
        cache_bytes: usize,
    ) -> Self {
        KeyStore {
            backend,
            contexts,
            max_key_len,
            quota,
            expiry,
            cache: Mutex::new(Cache {
                entries: HashMap::new(),
                bytes: 0,
                max_bytes: cache_bytes,
                tick: 0,
            }),
            healthy: AtomicBool::new(true),
            prom: None,
        }
    }

    /// Records store latency, errors and cache hits in `prom`.
    pub fn with_metrics(mut self, prom: Arc<Prom>) -> Self {
        self.prom = Some(prom);
        self
    }

    /// The backend (`redb` or `postgres`).
    pub fn backend(&self) -> &Arc<dyn KeyBackend> {
        &self.backend
    }

    /// The per-device quota.
    pub fn quota(&self) -> KeyQuota {
        self.quota
    }

    /// Time after which an unused key expires (`None`: never).
    pub fn expiry(&self) -> Option<Duration> {
        self.expiry
    }

    /// Bytes of prepared keys currently cached.
    pub fn cached_bytes(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.bytes)
    }

    /// False since the last backend operation failed, until one succeeds (readiness).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn cutoff(&self, now: u64) -> u64 {
        self.expiry.map_or(0, |e| {
            now.saturating_sub(u64::try_from(e.as_micros()).unwrap_or(u64::MAX))
        })
    }

    /// Runs one backend operation, timing it and tracking health.
    fn op<T>(
        &self,
        name: &'static str,
        f: impl FnOnce(&dyn KeyBackend) -> Result<T, CloudError>,
    ) -> Result<T, CloudError> {
        let t = Instant::now();
        let r = f(self.backend.as_ref());
        let ok = r.is_ok();
        self.healthy.store(ok, Ordering::Relaxed);
        if let Some(p) = &self.prom {
            p.store_op(name, t.elapsed(), ok);
        }
        r
    }

    fn cache_event(&self, hit: bool) {
        if let Some(p) = &self.prom {
            p.cache_event(hit, self.cached_bytes());
        }
    }

    /// Checks that the backend answers (readiness probe).
    ///
    /// # Errors
    /// [`CloudError::StoreUnavailable`] while it does not.
    pub fn ping(&self) -> Result<(), CloudError> {
        self.op("ping", |b| b.ping())
    }

    /// Deletes keys unused for longer than the expiry; returns how many (0 without expiry).
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`].
    pub fn sweep(&self) -> Result<u64, CloudError> {
        if self.expiry.is_none() {
            return Ok(0);
        }
        let cutoff = self.cutoff(now_us());
        self.op("expire", |b| b.expire(cutoff))
    }

    /// Decodes and validates a registration against parameter set `param_set`, the plans'
    /// `min_chunk` (the largest packed chunk; 0 for no-key) and `min_bodies` (the most bodies
    /// per mask of a packed plan, shared-mask plans; 0 or 1 for single-secret plans and
    /// no-key) and `first_level` (the smallest `LayerPlan::key_first_level` of the plans: the
    /// key's first automorphism must not start above it), prepares the key, then stores it
    /// durably under `(peer, key_id)` (committed before this returns), evicting the device's
    /// least recently used keys if the quota requires. CPU-bound for packed keys: call from a
    /// blocking task. Only after `Ok` may the session send `KeyAck` (TDM-KEY-8).
    ///
    /// # Errors
    /// [`CloudError::KeyInvalid`] if the blob does not decode, belongs to another parameter
    /// set, cannot pack `min_chunk`, starts above `first_level` or carries fewer than
    /// `min_bodies` bodies;
    /// [`CloudError::Quota`] if the blob alone exceeds the
    /// per-device byte quota; [`CloudError::Store`] / [`CloudError::StoreUnavailable`] if the
    /// commit fails.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &self,
        peer: &[u8; 32],
        key_id: &[u8; 32],
        mode: OutputMode,
        blob: &[u8],
        param_set: u16,
        min_chunk: usize,
        min_bodies: usize,
        first_level: u32,
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
        if mode == OutputMode::Packed && stored.first_level > first_level {
            return Err(CloudError::KeyInvalid(format!(
                "evaluation key starts at stride 2^{}, the model's plans need every stride from \
                 2^{first_level}: generate it with Client::evaluation_key_for_plans",
                stored.first_level
            )));
        }
        if mode == OutputMode::Packed && stored.bodies < min_bodies {
            return Err(CloudError::KeyInvalid(format!(
                "evaluation key carries {} bodies (secrets) per level, the model's shared-mask \
                 plans need {min_bodies}: generate it with \
                 Client::evaluation_key_for(max_chunk, {min_bodies})",
                stored.bodies
            )));
        }
        let new_bytes = blob.len() as u64;
        if new_bytes > self.quota.max_bytes {
            return Err(CloudError::Quota(format!(
                "key blob of {new_bytes} bytes exceeds the per-device quota of {} bytes",
                self.quota.max_bytes
            )));
        }
        let now = now_us();
        let cutoff = self.cutoff(now);
        let evicted = self.op("put", |b| {
            b.put(
                peer,
                key_id,
                mode.to_u8(),
                &stored.he_key_id,
                blob,
                self.quota,
                cutoff,
                now,
            )
        })?;
        if let Ok(mut c) = self.cache.lock() {
            for id in &evicted {
                c.remove(&(*peer, *id));
            }
            c.put((*peer, *key_id), stored.clone(), now);
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
                    bodies: 0,
                    first_level: 1,
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
                    bodies: key.bodies(),
                    first_level: key.first_level(),
                    prepared: Some(Arc::new(prepared)),
                    prepared_bytes: prepared_key_bytes(
                        &params,
                        key.automorphisms().len(),
                        key.bodies(),
                    ),
                })
            }
        }
    }

    /// The key stored under `(peer, key_id)`, from the cache or (lazily, preparing it) from
    /// the store; records the use for the LRU order and the expiry. `Ok(None)` if this peer
    /// has no such live key (never registered, evicted, expired, or registered under a
    /// parameter set this cloud no longer serves). CPU-bound on a cache miss.
    ///
    /// # Errors
    /// [`CloudError::Store`] if a record is damaged; [`CloudError::StoreUnavailable`] if the
    /// store cannot be reached.
    pub fn get(&self, peer: &[u8; 32], key_id: &[u8; 32]) -> Result<Option<StoredKey>, CloudError> {
        let ck = (*peer, *key_id);
        let hit = self.cache.lock().ok().and_then(|mut c| c.get(&ck));
        if let Some((k, created, persist)) = hit {
            if !persist {
                self.cache_event(true);
                return Ok(Some(k));
            }
            let now = now_us();
            let cutoff = self.cutoff(now);
            match self.op("touch", |b| b.touch(peer, key_id, cutoff, now))? {
                Some(c) if c == created => {
                    self.cache_event(true);
                    return Ok(Some(k));
                }
                // Evicted, expired or replaced (possibly by another replica).
                _ => {
                    if let Ok(mut c) = self.cache.lock() {
                        c.remove(&ck);
                    }
                }
            }
        }
        self.cache_event(false);
        let now = now_us();
        let cutoff = self.cutoff(now);
        let Some(rec) = self.op("get", |b| b.get(peer, key_id, cutoff))? else {
            return Ok(None);
        };
        let err = |m: String| {
            CloudError::Store(format!(
                "{} store: {m} (delete the record; the device then registers again)",
                self.backend.kind()
            ))
        };
        let mode = OutputMode::from_u8(rec.mode).map_err(|e| err(e.to_string()))?;
        // A key of a set this build knows but no longer serves (`param_sets` narrowed since it
        // was registered) is not usable in any session: unknown, not a damaged store.
        let header_set = rec
            .blob
            .get(6..8)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_le_bytes);
        if let Some(id) = header_set.filter(|_| mode == OutputMode::Packed) {
            if ParameterSet::from_id(id).is_ok()
                && !self.contexts.iter().any(|c| c.params().id == id)
            {
                tracing::warn!(
                    param_set = id,
                    "stored key of a parameter set no longer served: treated as unknown"
                );
                return Ok(None);
            }
        }
        // The record's parameter set is the one its blob decodes under.
        let mut last = None;
        for ctx in &self.contexts {
            match Self::decode(ctx, self.max_key_len, key_id, mode, &rec.blob) {
                Ok(stored) => {
                    if stored.he_key_id != rec.he_key_id {
                        return Err(err("key record does not match its key id".into()));
                    }
                    self.op("touch", |b| b.touch(peer, key_id, cutoff, now_us()))?;
                    if let Ok(mut c) = self.cache.lock() {
                        c.put(ck, stored.clone(), rec.created_us);
                    }
                    return Ok(Some(stored));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(err(format!(
            "stored key does not decode: {}",
            last.map_or_else(|| "no parameter set served".into(), |e| e.to_string())
        )))
    }

    /// Live key ids stored for `peer` (at most `max`), for `CloudSession::allow_key`
    /// (TDM-KEY-7).
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`].
    pub fn list(&self, peer: &[u8; 32], max: usize) -> Result<Vec<[u8; 32]>, CloudError> {
        let cutoff = self.cutoff(now_us());
        self.op("list", |b| b.list(peer, max, cutoff))
    }

    /// Number of records in the store.
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`].
    pub fn len(&self) -> Result<u64, CloudError> {
        self.op("len", |b| b.len())
    }

    /// True if the store holds no keys.
    ///
    /// # Errors
    /// [`CloudError::Store`] / [`CloudError::StoreUnavailable`].
    pub fn is_empty(&self) -> Result<bool, CloudError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evictions_least_recent_first_ties_by_id() {
        let q = KeyQuota {
            max_keys: 2,
            max_bytes: 100,
        };
        let others = vec![([3; 32], 10, 5), ([1; 32], 10, 7), ([2; 32], 10, 5)];
        assert_eq!(
            plan_evictions(others.clone(), 10, q),
            vec![[2; 32], [3; 32]]
        );
        let roomy = KeyQuota {
            max_keys: 4,
            max_bytes: 100,
        };
        assert!(plan_evictions(others.clone(), 10, roomy).is_empty());
        let tight = KeyQuota {
            max_keys: 8,
            max_bytes: 35,
        };
        assert_eq!(plan_evictions(others, 10, tight), vec![[2; 32]]);
    }

    #[test]
    fn clock_is_strictly_increasing() {
        let a = now_us();
        let b = now_us();
        assert!(b > a);
    }
}
