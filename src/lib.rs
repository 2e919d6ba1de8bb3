//! Tandem facade.
pub use tandem_he as he;
