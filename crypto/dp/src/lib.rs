//! Differential privacy for device activations, with a durable privacy ledger.
//!
//! Pipeline ([`Mechanism`]): clip (L2, L∞ or L1 ≤ C) → quantise to the integer grid
//! `round(s·x)` → add **exact** discrete Gaussian (ρ-zCDP) or discrete Laplace (ε-DP) noise on
//! that grid. Never float noise then rounding.
//!
//! * [`sampler`]: our exact CKS20 samplers in u64/u128 integer arithmetic (big-integer
//!   fallback), with the derivation; tested against the exact pmf and opendp's samplers.
//! * [`rng`]: secure bits from opendp's `fill_bytes` (OpenSSL), buffered 4 KiB at a time.
//! * [`mechanism`]: sensitivities after quantisation (derivation in `specs/dp.md`) and
//!   calibration both ways through opendp's privacy maps and combinators.
//! * [`ledger`]: zCDP accountant per device and policy window over a checksummed,
//!   write-ahead, fsynced ledger file.
//! * `utility` and `plot` (cargo feature **`tools`**, off by default; development tools, not
//!   for apps): the UCI dataset loader, the trainer and utility sweep (accuracy vs ε) and the
//!   SVG plotter. An app that links `tandem-dp` without the feature does not pull ndarray,
//!   plotters or flate2.
//! * `exit_head` (feature **`tools`**): the early-exit head's distillation trainer and τ
//!   calibration (issue 10).
//!
//! ```no_run
//! use tandem_dp::{Accountant, Clip, Mechanism, Policy, Quantizer, SecureBits};
//! # fn main() -> tandem_dp::Result<()> {
//! let q = Quantizer::new(Clip::L2(1.0), 256.0, 1024)?;
//! let mech = Mechanism::gaussian_for_epsilon_delta(q, 1.0, 1e-5)?;
//! let policy = Policy::from_epsilon_delta(8.0, 1e-5, 86_400)?;
//! let (mut acct, _report) = Accountant::open("ledger.bin".as_ref(), policy)?;
//! let rho = mech.cost_rho()?;
//! let now = 1_700_000_000;
//! if !acct.would_exceed(b"device-1", now, rho) {
//!     let receipt = acct.charge(b"device-1", now, rho)?; // durable before it returns
//!     let mut rng = SecureBits::new()?;
//!     let noised: Vec<i64> = mech.release(&vec![0.1; 1024], receipt, &mut rng)?;
//!     // send `noised` (or encrypt it first)
//! #   let _ = noised;
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

#[cfg(feature = "tools")]
pub mod bottleneck;
pub mod error;
#[cfg(feature = "tools")]
pub mod exit_head;
pub mod ledger;
pub mod mechanism;
#[cfg(feature = "tools")]
pub mod plot;
pub mod rng;
pub mod sampler;
#[cfg(feature = "tools")]
pub mod utility;

pub use error::{DpError, Result};
pub use ledger::{Accountant, Cost, Ledger, OpenReport, Policy, Receipt, Record, Tail};
pub use mechanism::{Clip, Mechanism, NoiseKind, Quantizer, Sensitivity};
pub use rng::SecureBits;
pub use sampler::{DiscreteGaussian, DiscreteLaplace, Rational, Sampler};
