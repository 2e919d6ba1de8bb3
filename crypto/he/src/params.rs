//! Frozen, versioned parameter sets.
//!
//! A parameter set fixes the ring, the modulus, the noise distribution and the key-switching
//! gadget. Names carry what matters to a reader: ring size, modulus, noise, security level and
//! the failure probability the engine enforces per decrypted output. Once published a set is
//! never changed; a new set gets a new id. The security basis of each set is in
//! `specs/parameters.md`.

use crate::error::HeError;

/// A frozen GLWE parameter set (k = 1, q = 2^64, binary secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterSet {
    /// Wire identifier (never reused).
    pub id: u16,
    /// Human-readable frozen name.
    pub name: &'static str,
    /// Ring degree N (polynomials modulo X^N + 1).
    pub poly_size: usize,
    /// Fresh encryption noise is TUniform with values in `[-2^b, 2^b]`; this is `b`.
    pub noise_bound_log2: u32,
    /// Key-switching gadget: digits of `ks_base_log` bits …
    pub ks_base_log: u32,
    /// … and this many levels (the low `64 - base_log·levels` bits are rounded away).
    pub ks_levels: u32,
    /// The engine refuses any layer whose per-output failure bound exceeds `2^-this`.
    pub max_fail_log2: u32,
}

/// Version 1: N = 4096, k = 1, q = 2^64, binary secret, TUniform(2^4) noise.
///
/// 132-bit security by tfhe-rs 1.8.2's lattice-estimator fit for TUniform noise with a binary
/// secret (the noise variance is above `minimal_glwe_variance_for_132_bits_security_tuniform`,
/// checked by a test), and per-output failure probability at most 2^-64 (enforced per layer).
pub const PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64: ParameterSet = ParameterSet {
    id: 1,
    name: "PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64",
    poly_size: 4096,
    noise_bound_log2: 4,
    ks_base_log: 15,
    ks_levels: 3,
    max_fail_log2: 64,
};

/// The parameter set used when none is named: a stable alias of the newest set.
pub const DEFAULT_PARAMETERS: ParameterSet = PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64;

/// All parameter sets this build understands.
pub const ALL_PARAMETER_SETS: [ParameterSet; 1] = [PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64];

impl ParameterSet {
    /// Looks a parameter set up by its wire id.
    pub fn from_id(id: u16) -> Result<Self, HeError> {
        ALL_PARAMETER_SETS
            .iter()
            .copied()
            .find(|p| p.id == id)
            .ok_or(HeError::UnknownParameterSet(id))
    }

    /// Variance of one fresh noise coefficient (absolute units, modulus 2^64).
    ///
    /// TUniform(b) is uniform on the 2^(b+1) + 1 integers of `[-2^b, 2^b]`.
    pub fn fresh_noise_variance(&self) -> f64 {
        (2f64.powi(2 * self.noise_bound_log2 as i32 + 1) + 1.0) / 6.0
    }

    /// log2 of N.
    pub fn log2_poly_size(&self) -> u32 {
        self.poly_size.trailing_zeros()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tfhe::core_crypto::commons::noise_formulas::secure_noise::minimal_glwe_variance_for_132_bits_security_tuniform;
    use tfhe::core_crypto::prelude::{GlweDimension, PolynomialSize};

    #[test]
    fn every_set_meets_tfhe_132_bit_noise_floor() {
        for p in ALL_PARAMETER_SETS {
            let q = 2f64.powi(64);
            let min = minimal_glwe_variance_for_132_bits_security_tuniform(
                GlweDimension(1),
                PolynomialSize(p.poly_size),
                q,
            );
            // tfhe expresses variance on the torus (divided by q^2).
            let ours = p.fresh_noise_variance() / (q * q);
            assert!(ours >= min.0, "{}: {ours:e} < {:e}", p.name, min.0);
            // One step smaller would not meet the floor: the choice is not arbitrary.
            let smaller = ParameterSet {
                noise_bound_log2: p.noise_bound_log2 - 1,
                ..p
            };
            assert!(smaller.fresh_noise_variance() / (q * q) < min.0);
        }
    }

    #[test]
    fn ids_are_unique_and_resolvable() {
        for p in ALL_PARAMETER_SETS {
            assert_eq!(ParameterSet::from_id(p.id).unwrap(), p);
        }
        assert!(matches!(
            ParameterSet::from_id(999),
            Err(HeError::UnknownParameterSet(999))
        ));
    }
}
