//! Frozen, versioned parameter sets.
//!
//! A parameter set fixes the ring, the modulus, the noise distribution and the key-switching
//! gadget. Names carry what matters to a reader: ring size, modulus, noise, security level and
//! the failure probability the engine enforces per decrypted output. Once published a set is
//! never changed; a new set gets a new id. The security basis of each set is in
//! `specs/parameters.md`.

use crate::error::HeError;

/// The ciphertext modulus of the server's arithmetic and of the key-switching keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modulus {
    /// q = 2^64 everywhere (native wrapping arithmetic; products computed exactly over CRT
    /// primes and reduced modulo 2^64). Gadget: `ks_levels` digits of `ks_base_log` bits.
    Pow2_64,
    /// The device still encrypts and decrypts modulo 2^64, but the server computes modulo
    /// Q = p_0·p_1·p_2, the first three of tfhe-ntt's 30-bit NTT primes (≈ 2^89.9), in the
    /// residue (RNS) NTT domain: inputs are scaled by Q/2^64 on arrival and outputs by 2^64/Q
    /// before the download switch. Key-switching keys live modulo Q with the RNS gadget
    /// (Q/p_0, Q/p_1) after rounding away p_2 (`specs/parameters.md`, "Parameter set 2").
    Rns3,
}

/// A frozen GLWE parameter set (k = 1, binary secret; see [`Modulus`] for q).
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
    /// The server's modulus and the key-switching keys' (ciphertexts on the wire are modulo
    /// 2^64 in every set).
    pub modulus: Modulus,
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
    modulus: Modulus::Pow2_64,
};

/// Version 2: as version 1 on the wire (N = 4096, ciphertexts modulo 2^64, binary secret,
/// TUniform(2^4) noise), but the server computes modulo the RNS modulus Q ≈ 2^89.9 of three
/// 30-bit NTT primes and key switching uses two RNS digits of ≈ 30 bits (keys modulo Q, the
/// low prime rounded away): 9 transforms per key switch instead of 16 and three primes per
/// product instead of four, with key-switching noise ≈ 2^-22 of version 1's relative to the
/// output scale.
///
/// 132-bit security by the same tfhe-rs fit at q = Q for the keys (TUniform(2^4) still meets
/// the floor there; checked by a test) and per-output failure at most 2^-64.
pub const PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64: ParameterSet = ParameterSet {
    id: 2,
    name: "PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64",
    poly_size: 4096,
    noise_bound_log2: 4,
    ks_base_log: 30,
    ks_levels: 2,
    max_fail_log2: 64,
    modulus: Modulus::Rns3,
};

/// The parameter set used when none is named: a stable alias of the newest set.
pub const DEFAULT_PARAMETERS: ParameterSet = PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64;

/// All parameter sets this build understands.
pub const ALL_PARAMETER_SETS: [ParameterSet; 2] = [
    PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64,
    PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64,
];

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

    /// log2 of the key-switching keys' modulus (64, or log2 Q ≈ 89.9 for [`Modulus::Rns3`]).
    pub fn key_modulus_log2(&self) -> f64 {
        match self.modulus {
            Modulus::Pow2_64 => 64.0,
            Modulus::Rns3 => crate::rns::Rns3::get().q_log2(),
        }
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
            // The keys are the samples at the largest modulus: 2^64 or Q.
            let q = p.key_modulus_log2().exp2();
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
