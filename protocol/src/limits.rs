//! Limits: the one place where every bound of the protocol lives (TDM-LIM-*).

/// Smallest `max_frame_len` a peer may offer (TDM-LIM-2).
pub const MIN_FRAME_LEN: u32 = 4096;
/// Largest `max_frame_len` a peer may offer: 256 MiB (TDM-LIM-2).
pub const HARD_MAX_FRAME_LEN: u32 = 256 << 20;
/// Frame-length limit in force before the handshake completes (TDM-LIM-3).
pub const HANDSHAKE_MAX_FRAME_LEN: u32 = 1024;
/// Maximum byte length of a model id (TDM-MSG-4).
pub const MAX_MODEL_ID_LEN: usize = 64;
/// Maximum number of entries in a version or parameter-set list (TDM-MSG-3).
pub const MAX_LIST_LEN: usize = 16;
/// Maximum number of keys one session may register (TDM-KEY-6).
pub const MAX_KEYS_PER_SESSION: usize = 16;

/// Negotiable limits. A `ClientHello` offers them, the `ServerHello` answers
/// with the element-wise minimum of the offer and the server's own limits
/// (TDM-LIM-1), and both sides enforce the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Maximum frame body length in bytes.
    pub max_frame_len: u32,
    /// Maximum key blob length in bytes.
    pub max_key_len: u32,
    /// Maximum length of one ciphertext blob in bytes.
    pub max_ciphertext_len: u32,
    /// Maximum number of ciphertext blobs in one message.
    pub max_ciphertexts: u32,
    /// Maximum number of integer values in one message.
    pub max_elements: u32,
    /// Maximum batch size of one request.
    pub max_batch: u16,
    /// Maximum number of requests in flight.
    pub max_in_flight: u16,
    /// Idle timeout in milliseconds.
    pub idle_timeout_ms: u32,
}

impl Default for Limits {
    /// The defaults of `specs/wire-format.md` (limits table).
    fn default() -> Self {
        Limits {
            max_frame_len: 64 << 20,
            max_key_len: 48 << 20,
            max_ciphertext_len: 1 << 20,
            max_ciphertexts: 4096,
            max_elements: 1 << 20,
            max_batch: 64,
            max_in_flight: 8,
            idle_timeout_ms: 120_000,
        }
    }
}

impl Limits {
    /// Element-wise minimum (TDM-LIM-1).
    pub fn min(&self, other: &Limits) -> Limits {
        Limits {
            max_frame_len: self.max_frame_len.min(other.max_frame_len),
            max_key_len: self.max_key_len.min(other.max_key_len),
            max_ciphertext_len: self.max_ciphertext_len.min(other.max_ciphertext_len),
            max_ciphertexts: self.max_ciphertexts.min(other.max_ciphertexts),
            max_elements: self.max_elements.min(other.max_elements),
            max_batch: self.max_batch.min(other.max_batch),
            max_in_flight: self.max_in_flight.min(other.max_in_flight),
            idle_timeout_ms: self.idle_timeout_ms.min(other.idle_timeout_ms),
        }
    }

    /// True if every field of `self` is at most the same field of `other`.
    pub fn within(&self, other: &Limits) -> bool {
        self.min(other) == *self
    }

    /// Checks the domain rules of TDM-LIM-2: every field non-zero and
    /// `MIN_FRAME_LEN <= max_frame_len <= HARD_MAX_FRAME_LEN`.
    pub fn validate(&self) -> Result<(), crate::Error> {
        // TDM-LIM-2: limits are non-zero and the frame limit is in range.
        let bad = |field| Err(crate::Error::InvalidField { field });
        if self.max_frame_len < MIN_FRAME_LEN || self.max_frame_len > HARD_MAX_FRAME_LEN {
            return bad("limits.max_frame_len");
        }
        if self.max_key_len == 0 {
            return bad("limits.max_key_len");
        }
        if self.max_ciphertext_len == 0 {
            return bad("limits.max_ciphertext_len");
        }
        if self.max_ciphertexts == 0 {
            return bad("limits.max_ciphertexts");
        }
        if self.max_elements == 0 {
            return bad("limits.max_elements");
        }
        if self.max_batch == 0 {
            return bad("limits.max_batch");
        }
        if self.max_in_flight == 0 {
            return bad("limits.max_in_flight");
        }
        if self.idle_timeout_ms == 0 {
            return bad("limits.idle_timeout_ms");
        }
        Ok(())
    }
}
