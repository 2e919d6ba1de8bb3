//! Subcommand implementations.

pub mod bench;
pub mod demo;
pub mod demo_minilm;
pub mod dp;
pub mod eval;
pub mod plan;
pub mod privacy_train;
pub mod runtime;
