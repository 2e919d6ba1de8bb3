//! Device secret keys, key ids and automorphism (packing) evaluation keys.

use crate::error::HeError;
use crate::ntt::{Ntt, NttPoly};
use crate::params::ParameterSet;
use crate::poly;
use crate::rng::{mask_generator, NoiseSource};
use sha2::{Digest, Sha256};
use tfhe::core_crypto::commons::math::random::Seed;
use tfhe::core_crypto::prelude::{
    allocate_and_generate_new_binary_glwe_secret_key, DefaultRandomGenerator, GlweDimension,
    PolynomialSize, SecretRandomGenerator,
};

/// A 32-byte identifier of a secret key: every ciphertext and evaluation key carries it.
pub type KeyId = [u8; 32];

/// The device's GLWE secret key (binary polynomial). Never leaves the device.
pub struct SecretKey {
    pub(crate) params: ParameterSet,
    /// Coefficients in {0, 1}.
    pub(crate) coeffs: Vec<i64>,
    /// The key in the NTT domain, for fast `a·s`.
    pub(crate) ntt: NttPoly,
    key_id: KeyId,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("SecretKey")
            .field("params", &self.params.name)
            .field("key_id", &hex8(&self.key_id))
            .finish()
    }
}

pub(crate) fn hex8(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

impl SecretKey {
    /// Derives the key deterministically from a 128-bit seed (tfhe's secret CSPRNG).
    pub fn from_seed(params: ParameterSet, ntt: &Ntt, seed: u128) -> Self {
        let mut gen = SecretRandomGenerator::<DefaultRandomGenerator>::new(Seed(seed));
        let key = allocate_and_generate_new_binary_glwe_secret_key::<u64, _>(
            GlweDimension(1),
            PolynomialSize(params.poly_size),
            &mut gen,
        );
        let coeffs: Vec<i64> = key.as_ref().iter().map(|&c| c as i64).collect();
        Self::from_coeffs(params, ntt, coeffs)
    }

    /// A fresh key from the operating system's entropy (through tfhe's seeder).
    pub fn generate(params: ParameterSet, ntt: &Ntt) -> Self {
        Self::from_seed(params, ntt, crate::rng::fresh_seed())
    }

    fn from_coeffs(params: ParameterSet, ntt: &Ntt, coeffs: Vec<i64>) -> Self {
        let mut s_ntt = ntt.zero();
        ntt.fwd_small(&coeffs, &mut s_ntt);
        let mut h = Sha256::new();
        h.update(b"tandem-he key id v1");
        h.update(params.id.to_le_bytes());
        for c in &coeffs {
            h.update([*c as u8]);
        }
        Self {
            params,
            coeffs,
            ntt: s_ntt,
            key_id: h.finalize().into(),
        }
    }

    /// The key's id (a SHA-256 digest; the key is derived from a 128-bit seed, so it has at
    /// most 128 bits of entropy — enough that the digest reveals nothing usable about it).
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The parameter set the key belongs to.
    pub fn params(&self) -> ParameterSet {
        self.params
    }

    /// `a·s` modulo (X^N + 1, 2^64).
    pub(crate) fn mul_mask(&self, ntt: &Ntt, a: &[u64]) -> Vec<u64> {
        let mut fa = ntt.zero();
        ntt.fwd_u64(a, &mut fa);
        let mut acc = ntt.zero();
        ntt.mul_acc(&mut acc, &fa, &self.ntt);
        let mut out = vec![0u64; ntt.n()];
        ntt.inv(&mut acc, &mut out);
        out
    }

    /// Encrypts the plaintext polynomial `m` (already scaled) with the mask drawn from `mask`.
    /// Returns `(mask, body)`.
    pub(crate) fn encrypt_poly(
        &self,
        ntt: &Ntt,
        m: &[u64],
        mask: &mut crate::rng::MaskGenerator,
        noise: &mut NoiseSource,
    ) -> (Vec<u64>, Vec<u64>) {
        let n = self.params.poly_size;
        let mut a = vec![0u64; n];
        mask.fill(&mut a);
        let mut body = self.mul_mask(ntt, &a);
        let e = noise.tuniform(n, self.params.noise_bound_log2);
        for ((b, &mi), &ei) in body.iter_mut().zip(m).zip(&e) {
            *b = b.wrapping_add(mi).wrapping_add(ei);
        }
        (a, body)
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        // Best effort: overwrite key material before the allocator reuses it.
        self.coeffs.iter_mut().for_each(|c| *c = 0);
        self.ntt.0.iter_mut().for_each(|c| *c = 0);
    }
}

/// The automorphism index used to halve the stride `s` of packed slots: g = 2N/s + 1.
pub fn automorphism_for_stride(n: usize, stride: usize) -> usize {
    2 * n / stride + 1
}

/// Packing key: one key-switching key per automorphism `X -> X^g`, from τ_g(s) back to s.
///
/// On the wire only the bodies and one 128-bit mask seed travel (masks are re-derived).
#[derive(Clone, PartialEq, Eq)]
pub struct EvaluationKey {
    pub(crate) params: ParameterSet,
    pub(crate) key_id: KeyId,
    pub(crate) mask_seed: u128,
    /// Automorphism indices, in wire order.
    pub(crate) automorphisms: Vec<usize>,
    /// `bodies[k][j]`: body polynomial of level j for automorphism k.
    pub(crate) bodies: Vec<Vec<Vec<u64>>>,
}

impl std::fmt::Debug for EvaluationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvaluationKey")
            .field("params", &self.params.name)
            .field("key_id", &hex8(&self.key_id))
            .field("automorphisms", &self.automorphisms)
            .finish()
    }
}

impl EvaluationKey {
    /// Generates keys for every stride up to `max_chunk` (a power of two ≤ N): enough to pack
    /// any layer whose input chunk is at most `max_chunk` values.
    pub fn generate(sk: &SecretKey, ntt: &Ntt, max_chunk: usize) -> Result<Self, HeError> {
        let p = sk.params;
        let n = p.poly_size;
        if !max_chunk.is_power_of_two() || max_chunk < 2 || max_chunk > n {
            return Err(HeError::Shape(format!(
                "max_chunk {max_chunk} must be a power of two in 2..={n}"
            )));
        }
        let automorphisms: Vec<usize> = (1..=max_chunk.trailing_zeros())
            .map(|l| automorphism_for_stride(n, 1 << l))
            .collect();
        let mask_seed = crate::rng::fresh_seed();
        let mut masks = mask_generator(mask_seed);
        let mut noise = NoiseSource::new();
        let s_u64: Vec<u64> = sk.coeffs.iter().map(|&c| c as u64).collect();
        let mut bodies = Vec::with_capacity(automorphisms.len());
        for &g in &automorphisms {
            let ts = poly::automorphism(&s_u64, g);
            let mut levels = Vec::with_capacity(p.ks_levels as usize);
            for j in 0..p.ks_levels {
                let gadget = 1u64 << (64 - (j + 1) * p.ks_base_log);
                let m: Vec<u64> = ts.iter().map(|&c| c.wrapping_mul(gadget)).collect();
                let (_, body) = sk.encrypt_poly(ntt, &m, &mut masks, &mut noise);
                levels.push(body);
            }
            bodies.push(levels);
        }
        Ok(Self {
            params: p,
            key_id: sk.key_id,
            mask_seed,
            automorphisms,
            bodies,
        })
    }

    /// The secret key this evaluation key belongs to.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Automorphism indices covered.
    pub fn automorphisms(&self) -> &[usize] {
        &self.automorphisms
    }

    /// The largest input chunk this key can pack.
    pub fn max_chunk(&self) -> usize {
        1usize << self.automorphisms.len()
    }
}

/// An evaluation key expanded on the server: masks re-derived, everything in the NTT domain and
/// negated so that key switching is a pure multiply-accumulate.
pub struct PreparedEvaluationKey {
    pub(crate) key_id: KeyId,
    /// For each automorphism g: per level (−a_j, −b_j) in the NTT domain.
    pub(crate) levels: std::collections::HashMap<usize, Vec<(NttPoly, NttPoly)>>,
}

impl std::fmt::Debug for PreparedEvaluationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedEvaluationKey")
            .field("key_id", &hex8(&self.key_id))
            .finish()
    }
}

impl PreparedEvaluationKey {
    /// Expands an evaluation key (masks from the seed, NTT domain, negated).
    pub fn prepare(key: &EvaluationKey, ctx: &crate::Context) -> Result<Self, HeError> {
        if key.params != ctx.params() {
            return Err(HeError::ParameterMismatch {
                expected: ctx.params().id,
                got: key.params.id,
            });
        }
        let ntt = &ctx.ntt;
        let n = key.params.poly_size;
        let mut masks = mask_generator(key.mask_seed);
        let mut levels = std::collections::HashMap::new();
        let mut a = vec![0u64; n];
        for (&g, bodies) in key.automorphisms.iter().zip(&key.bodies) {
            if !ntt.has_automorphism(g) {
                return Err(HeError::Malformed {
                    what: "evaluation key",
                    reason: "automorphism outside the packing set",
                });
            }
            let mut per_level = Vec::with_capacity(bodies.len());
            for body in bodies {
                masks.fill(&mut a);
                let neg_a: Vec<u64> = a.iter().map(|v| v.wrapping_neg()).collect();
                let neg_b: Vec<u64> = body.iter().map(|v| v.wrapping_neg()).collect();
                let mut fa = ntt.zero();
                let mut fb = ntt.zero();
                ntt.fwd_u64(&neg_a, &mut fa);
                ntt.fwd_u64(&neg_b, &mut fb);
                per_level.push((fa, fb));
            }
            levels.insert(g, per_level);
        }
        Ok(Self {
            key_id: key.key_id,
            levels,
        })
    }

    /// The secret key this evaluation key belongs to.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }
}
