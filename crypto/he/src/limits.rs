//! Limits, in one place.

/// Largest input or output dimension of one layer.
pub const MAX_LAYER_DIM: usize = 1 << 16;
/// Largest batch in one request.
pub const MAX_BATCH: usize = 64;
