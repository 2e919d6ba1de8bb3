//! # tandem-he: exact encrypted × clear matrix products
//!
//! The device encrypts quantised activations under a GLWE secret key that never leaves it;
//! the cloud multiplies them by its cleartext weights and returns ciphertexts that decrypt to
//! exactly `W·x + b`. Built on tfhe-rs `core_crypto` (key generation, CSPRNGs, noise
//! distributions, security formulas) and `tfhe-ntt` (exact transforms modulo 2^64).
//!
//! Batch plans may share one mask among r ≤ [`limits::MAX_BODIES`] bodies under independent
//! secrets of the same device (Peikert–Vaikuntanathan–Waters packed Regev; `LayerPlan::bodies`,
//! chosen by the planner up to `PlanOptions::max_bodies`): the download carries one mask per r
//! row blocks, products and key switches share the mask's work, and the device registers a
//! packing key with that many bodies (`Client::evaluation_key_for`). r = 1 is the
//! single-secret format, byte for byte.
//!
//! ```
//! use std::sync::Arc;
//! use tandem_he::{Client, Context, OutputMode, PlanOptions, PreparedLayer, EvalOptions, DEFAULT_PARAMETERS};
//! let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
//! let (n_in, n_out) = (8, 3);
//! let w: Vec<i64> = (0..24).map(|i| i % 7 - 3).collect();
//! let b = vec![1, -2, 3];
//! let layer = PreparedLayer::prepare(ctx.clone(), OutputMode::NoKey, n_in, n_out, &w, &b, 128, PlanOptions::default()).unwrap();
//! let mut client = Client::new(ctx);
//! let x = vec![vec![1, 2, 3, 4, -5, -6, 7, -128]];
//! let ct = client.encrypt(layer.plan(), &x).unwrap();
//! let out = layer.eval(&ct, None, EvalOptions::default()).unwrap();
//! let y = client.decrypt(layer.plan(), &out).unwrap();
//! let expect: Vec<i64> = (0..3).map(|r| (0..8).map(|i| w[r * 8 + i] * x[0][i]).sum::<i64>() + b[r]).collect();
//! assert_eq!(y[0], expect);
//! ```
#![forbid(unsafe_code)]

#[doc(hidden)]
pub mod bench_api;
mod client;
mod context;
mod error;
mod keys;
pub mod limits;
mod ntt;
mod params;
mod plan;
mod poly;
mod rng;
mod rns;
mod server;
mod wire;

pub use client::{key_shape_for_plans, Client};
pub use context::Context;
pub use error::HeError;
pub use keys::{max_key_first_level, EvaluationKey, KeyId, PreparedEvaluationKey};
pub use params::{
    Modulus, ParameterSet, ALL_PARAMETER_SETS, DEFAULT_PARAMETERS,
    PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64, PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64,
};
pub use plan::{
    log2_fail, plan_cost, plan_cost_on, CostModel, LayerPlan, LinkModel, OutputMode, PlanOptions,
    WeightBounds, WeightStats, COST_BODY_TRANSFORM_MS, COST_BYTE_MS, COST_CT_PRODUCT_MS,
    COST_CT_TRANSFORM_MS, COST_KEY_SWITCH_BODY_MS, COST_KEY_SWITCH_MS, MAX_PLAN_KEY_BYTES,
};
pub use server::{weight_stats, EvalOptions, PreparedLayer, INT8_LAYER_MAX_INPUT};
pub use wire::{EncryptedInput, EncryptedOutput, OutputCiphertext};
