//! Subcommand implementations.

pub mod bench;
pub mod demo;
pub mod demo_minilm;
pub mod dp;
pub mod early_exit;
pub mod eval;
pub mod model_bert;
pub mod plan;
pub mod plan_encoder;
pub mod privacy_train;
pub mod runtime;
pub mod sentence;
pub mod sentence_split;
pub mod traces;
