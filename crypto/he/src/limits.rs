//! Limits, in one place.

/// Largest input or output dimension of one layer.
pub const MAX_LAYER_DIM: usize = 1 << 16;
/// Largest batch in one request.
pub const MAX_BATCH: usize = 64;
/// Most bodies (independent secrets sharing one mask) one ciphertext or evaluation key may
/// carry (TDM-PAR-HE-1).
pub const MAX_BODIES: usize = 8;
