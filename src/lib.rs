//! # Tandem
//!
//! Private device–cloud collaborative inference: the facade that apps link. Each module
//! re-exports one crate of the workspace.
#![forbid(unsafe_code)]

/// Differential privacy on activations and the privacy ledger.
pub use tandem_dp as dp;
/// Exact encrypted × clear linear layers (GLWE).
pub use tandem_he as he;
/// The sans-IO wire protocol.
pub use tandem_protocol as protocol;
