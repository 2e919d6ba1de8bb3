//! Subcommand implementations.

pub mod bench;
pub mod demo;
pub mod dp;
pub mod plan;
pub mod runtime;
