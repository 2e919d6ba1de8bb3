//! Device secret keys, key ids and automorphism (packing) evaluation keys.

use crate::error::HeError;
use crate::limits::MAX_BODIES;
use crate::ntt::{Ntt, NttPoly};
use crate::params::{Modulus, ParameterSet};
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

/// One binary secret: its coefficients and its NTT-domain form.
pub(crate) struct Secret {
    /// Coefficients in {0, 1}.
    pub(crate) coeffs: Vec<i64>,
    /// The secret in the NTT domain, for fast `a·s`.
    pub(crate) ntt: NttPoly,
}

impl Secret {
    fn wipe(&mut self) {
        self.coeffs.iter_mut().for_each(|c| *c = 0);
        self.ntt.0.iter_mut().for_each(|c| *c = 0);
    }
}

/// The device's GLWE secret keys (binary polynomials). Never leave the device.
///
/// Secret 0 is the key of the single-secret format; secrets 1 .. [`MAX_BODIES`] are the
/// further independent secrets of multi-body ciphertexts (one shared mask, one body per
/// secret; TDM-PAR-HE-1). All of them come from the same 128-bit seed, so a device that
/// persists only the seed recovers every one; secrets 1.. are derived on first use (a
/// single-secret client never holds them).
pub struct SecretKey {
    pub(crate) params: ParameterSet,
    seed: u128,
    first: Secret,
    rest: std::sync::OnceLock<Vec<Secret>>,
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

/// The first `count` secrets of `seed`'s stream (tfhe's secret CSPRNG), in order.
fn derive(params: ParameterSet, ntt: &Ntt, seed: u128, count: usize) -> Vec<Secret> {
    let mut gen = SecretRandomGenerator::<DefaultRandomGenerator>::new(Seed(seed));
    (0..count)
        .map(|_| {
            let key = allocate_and_generate_new_binary_glwe_secret_key::<u64, _>(
                GlweDimension(1),
                PolynomialSize(params.poly_size),
                &mut gen,
            );
            let coeffs: Vec<i64> = key.as_ref().iter().map(|&c| c as i64).collect();
            let mut f = ntt.zero();
            ntt.fwd_small(&coeffs, &mut f);
            Secret { coeffs, ntt: f }
        })
        .collect()
}

impl SecretKey {
    /// Derives the keys deterministically from a 128-bit seed (tfhe's secret CSPRNG): secret 0
    /// first, then secrets 1 .. [`MAX_BODIES`] from the same stream (so secret 0, and with it
    /// the key id, is what a single-secret key from this seed always was).
    pub fn from_seed(params: ParameterSet, ntt: &Ntt, seed: u128) -> Self {
        let first = derive(params, ntt, seed, 1)
            .pop()
            .unwrap_or_else(|| unreachable!("derive(1) yields one secret"));
        // The id names secret 0 only (stable for single-secret keys); the others are bound to
        // it through the seed they share.
        let mut h = Sha256::new();
        h.update(b"tandem-he key id v1");
        h.update(params.id.to_le_bytes());
        for c in &first.coeffs {
            h.update([*c as u8]);
        }
        Self {
            params,
            seed,
            first,
            rest: std::sync::OnceLock::new(),
            key_id: h.finalize().into(),
        }
    }

    /// A fresh key from the operating system's entropy (through tfhe's seeder).
    pub fn generate(params: ParameterSet, ntt: &Ntt) -> Self {
        Self::from_seed(params, ntt, crate::rng::fresh_seed())
    }

    /// The key's id (a SHA-256 digest of secret 0; the keys are derived from a 128-bit seed,
    /// so it has at most 128 bits of entropy — enough that the digest reveals nothing usable
    /// about it).
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The parameter set the key belongs to.
    pub fn params(&self) -> ParameterSet {
        self.params
    }

    /// Secrets 0 .. `count` (at most [`MAX_BODIES`]); secrets 1.. are derived on first use.
    pub(crate) fn secrets(&self, ntt: &Ntt, count: usize) -> Vec<&Secret> {
        let mut all = vec![&self.first];
        if count > 1 {
            let rest = self.rest.get_or_init(|| {
                let mut v = derive(self.params, ntt, self.seed, MAX_BODIES);
                v.remove(0).wipe();
                v
            });
            all.extend(rest.iter().take(count - 1));
        }
        all
    }

    /// `a·s_i` for the first `count` secrets (one forward transform of `a`).
    pub(crate) fn mul_mask_bodies(&self, ntt: &Ntt, a: &[u64], count: usize) -> Vec<Vec<u64>> {
        let mut fa = ntt.zero();
        ntt.fwd_u64(a, &mut fa);
        self.secrets(ntt, count)
            .into_iter()
            .map(|s| {
                let mut acc = ntt.zero();
                ntt.mul_acc(&mut acc, &fa, &s.ntt);
                let mut out = vec![0u64; ntt.n()];
                ntt.inv(&mut acc, &mut out);
                out
            })
            .collect()
    }

    /// Encrypts plaintext `ms[i]` under secret i, all with the one mask drawn from `mask`:
    /// body_i = a·s_i + e_i + m_i (fresh noise e_i per body). Returns `(mask, bodies)`.
    /// At most [`MAX_BODIES`] plaintexts are used.
    pub(crate) fn encrypt_shared(
        &self,
        ntt: &Ntt,
        ms: &[&[u64]],
        mask: &mut crate::rng::MaskGenerator,
        noise: &mut NoiseSource,
    ) -> (Vec<u64>, Vec<Vec<u64>>) {
        let n = self.params.poly_size;
        let mut a = vec![0u64; n];
        mask.fill(&mut a);
        let products = self.mul_mask_bodies(ntt, &a, ms.len());
        let bodies = products
            .into_iter()
            .zip(ms)
            .map(|(mut body, m)| {
                let e = noise.tuniform(n, self.params.noise_bound_log2);
                for ((b, &mi), &ei) in body.iter_mut().zip(m.iter()).zip(&e) {
                    *b = b.wrapping_add(mi).wrapping_add(ei);
                }
                body
            })
            .collect();
        (a, bodies)
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        // Best effort: overwrite key material before the allocator reuses it.
        self.seed = 0;
        self.first.wipe();
        if let Some(rest) = self.rest.get_mut() {
            rest.iter_mut().for_each(Secret::wipe);
        }
    }
}

/// The automorphism index used to halve the stride `s` of packed slots: g = 2N/s + 1.
pub fn automorphism_for_stride(n: usize, stride: usize) -> usize {
    2 * n / stride + 1
}

/// The largest first stride level l₀ an evaluation key may start at in ring size `n`: the
/// automorphism of stride 2^l is g_l = 2N/2^l + 1, and g_{l+1}² = 2^(2(log2 2N − l − 1)) + g_l
/// ≡ g_l (mod 2N) exactly when 2(log2 2N − l − 1) ≥ log2 2N, i.e. l ≤ (log2 N − 1)/2; so every
/// g_l with l < l₀ is a power of g_{l₀} when l₀ ≤ ⌊(log2 N − 1)/2⌋ + 1 (6 for N = 4096), and a
/// key holding g_{l₀} … applies the smaller strides as 2^(l₀ − l) key switches under g_{l₀}.
pub fn max_key_first_level(n: usize) -> u32 {
    (n.trailing_zeros().saturating_sub(1)) / 2 + 1
}

/// The stride level l of automorphism `g` (g = 2N/2^l + 1), if it is one.
pub(crate) fn stride_level(n: usize, g: usize) -> Option<u32> {
    let s = (2 * n).checked_div(g.checked_sub(1)?)?;
    (s.is_power_of_two() && automorphism_for_stride(n, s) == g).then(|| s.trailing_zeros())
}

/// Packing key: one key-switching key per automorphism `X -> X^g`, from τ_g(s_i) back to s_i
/// for each of the key's r = [`EvaluationKey::bodies`] secrets.
///
/// Level ℓ of automorphism g has one mask A_{g,ℓ} shared by the r secrets and r bodies
/// A_{g,ℓ}·s_i + e + gadget_ℓ·τ_g(s_i) (TDM-PAR-HE-1), so one decomposition of a shared mask
/// switches every body. On the wire only the bodies and one 128-bit mask seed travel (masks are
/// re-derived); r = 1 is the single-secret key format.
#[derive(Clone, PartialEq, Eq)]
pub struct EvaluationKey {
    pub(crate) params: ParameterSet,
    pub(crate) key_id: KeyId,
    pub(crate) mask_seed: u128,
    /// Bodies (secrets) per level, r ≥ 1.
    pub(crate) secrets: usize,
    /// Automorphism indices, in wire order.
    pub(crate) automorphisms: Vec<usize>,
    /// `bodies[k][j]`: the r body polynomials of level j for automorphism k, concatenated
    /// (r·N values, secret 0 first).
    pub(crate) bodies: Vec<Vec<Vec<u64>>>,
}

impl std::fmt::Debug for EvaluationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvaluationKey")
            .field("params", &self.params.name)
            .field("key_id", &hex8(&self.key_id))
            .field("bodies", &self.secrets)
            .field("automorphisms", &self.automorphisms)
            .finish()
    }
}

impl EvaluationKey {
    /// Generates single-secret keys for every stride up to `max_chunk` (a power of two ≤ N):
    /// enough to pack any layer whose input chunk is at most `max_chunk` values.
    ///
    /// # Errors
    /// [`HeError::Shape`] if `max_chunk` is not a power of two in 2..=N.
    pub fn generate(sk: &SecretKey, ntt: &Ntt, max_chunk: usize) -> Result<Self, HeError> {
        Self::generate_for(sk, ntt, max_chunk, 1)
    }

    /// [`EvaluationKey::generate`] for plans with up to `bodies` bodies per ciphertext (each
    /// level: one shared seeded mask, `bodies` bodies). `bodies` = 1 is exactly
    /// [`EvaluationKey::generate`].
    ///
    /// # Errors
    /// [`HeError::Shape`] if `max_chunk` is not a power of two in 2..=N or `bodies` is not in
    /// 1..=[`MAX_BODIES`].
    pub fn generate_for(
        sk: &SecretKey,
        ntt: &Ntt,
        max_chunk: usize,
        bodies: usize,
    ) -> Result<Self, HeError> {
        Self::generate_from(sk, ntt, 1, max_chunk, bodies)
    }

    /// [`EvaluationKey::generate_for`] holding only the automorphisms of strides 2^l for
    /// l = `first_level` ..= log2(`max_chunk`) (a plan's
    /// [`crate::LayerPlan::key_first_level`]): smaller strides are applied as repeated key
    /// switches under the first one ([`max_key_first_level`]). `first_level` = 1 is
    /// [`EvaluationKey::generate_for`].
    ///
    /// # Errors
    /// [`HeError::Shape`] as [`EvaluationKey::generate_for`], or if `first_level` is not in
    /// 1..=min(log2 `max_chunk`, [`max_key_first_level`]).
    pub fn generate_from(
        sk: &SecretKey,
        ntt: &Ntt,
        first_level: u32,
        max_chunk: usize,
        bodies: usize,
    ) -> Result<Self, HeError> {
        let p = sk.params;
        let n = p.poly_size;
        if !max_chunk.is_power_of_two() || max_chunk < 2 || max_chunk > n {
            return Err(HeError::Shape(format!(
                "max_chunk {max_chunk} must be a power of two in 2..={n}"
            )));
        }
        let top = max_chunk.trailing_zeros();
        if first_level == 0 || first_level > top.min(max_key_first_level(n)) {
            return Err(HeError::Shape(format!(
                "key first level {first_level} (1..={})",
                top.min(max_key_first_level(n))
            )));
        }
        if bodies == 0 || bodies > MAX_BODIES {
            return Err(HeError::Shape(format!(
                "evaluation key for {bodies} bodies (1..={MAX_BODIES})"
            )));
        }
        let automorphisms: Vec<usize> = (first_level..=top)
            .map(|l| automorphism_for_stride(n, 1 << l))
            .collect();
        let mask_seed = crate::rng::fresh_seed();
        let mut masks = mask_generator(mask_seed);
        let mut noise = NoiseSource::new();
        if p.modulus == Modulus::Rns3 {
            let all = automorphisms
                .iter()
                .map(|&g| rns_levels(sk, ntt, g, bodies, &mut masks, &mut noise))
                .collect();
            return Ok(Self {
                params: p,
                key_id: sk.key_id,
                mask_seed,
                secrets: bodies,
                automorphisms,
                bodies: all,
            });
        }
        let secrets: Vec<Vec<u64>> = sk
            .secrets(ntt, bodies)
            .into_iter()
            .map(|s| s.coeffs.iter().map(|&c| c as u64).collect())
            .collect();
        let mut all = Vec::with_capacity(automorphisms.len());
        for &g in &automorphisms {
            let ts: Vec<Vec<u64>> = secrets.iter().map(|s| poly::automorphism(s, g)).collect();
            let mut levels = Vec::with_capacity(p.ks_levels as usize);
            for j in 0..p.ks_levels {
                let gadget = 1u64 << (64 - (j + 1) * p.ks_base_log);
                let ms: Vec<Vec<u64>> = ts
                    .iter()
                    .map(|t| t.iter().map(|&c| c.wrapping_mul(gadget)).collect())
                    .collect();
                let refs: Vec<&[u64]> = ms.iter().map(Vec::as_slice).collect();
                let (_, level) = sk.encrypt_shared(ntt, &refs, &mut masks, &mut noise);
                levels.push(level.concat());
            }
            all.push(levels);
        }
        Ok(Self {
            params: p,
            key_id: sk.key_id,
            mask_seed,
            secrets: bodies,
            automorphisms,
            bodies: all,
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
        1usize << (self.first_level() as usize + self.automorphisms.len() - 1)
    }

    /// The stride level l₀ of the key's first automorphism (1 = every stride from 2 up; see
    /// [`EvaluationKey::generate_from`]).
    pub fn first_level(&self) -> u32 {
        self.automorphisms
            .first()
            .and_then(|&g| stride_level(self.params.poly_size, g))
            .unwrap_or(1)
    }

    /// Bodies (secrets) per key-switching level: the most bodies per ciphertext of a plan
    /// this key can evaluate (1 = single-secret key).
    pub fn bodies(&self) -> usize {
        self.secrets
    }
}

/// The two key-switching levels of automorphism `g` for parameter set 2 (`Modulus::Rns3`),
/// as residues: level j has one mask A_j uniform modulo Q (residues drawn from `masks`, prime
/// by prime, N values each) and, per secret i, the body A_j·s_i + e_{j,i} + (Q/p_j)·τ_g(s_i)
/// modulo Q, stored as its three residue vectors (prime-major, secret 0 first: 3·r·N values).
fn rns_levels(
    sk: &SecretKey,
    ntt: &Ntt,
    g: usize,
    bodies: usize,
    masks: &mut crate::rng::MaskGenerator,
    noise: &mut NoiseSource,
) -> Vec<Vec<u64>> {
    let rns = crate::rns::Rns3::get();
    let n = sk.params.poly_size;
    let secrets = sk.secrets(ntt, bodies);
    let taus: Vec<Vec<i64>> = secrets
        .iter()
        .map(|s| {
            let t = poly::automorphism(&s.coeffs.iter().map(|&c| c as u64).collect::<Vec<_>>(), g);
            t.iter().map(|&c| c as i64).collect()
        })
        .collect();
    (0..2)
        .map(|j| {
            let mut a = ntt.zero_with(crate::ntt::PRIMES_RNS);
            for (i, &p) in rns.p.iter().enumerate() {
                crate::rns::Rns3::fill_uniform(masks, p, &mut a.0[i * n..(i + 1) * n]);
            }
            let mut fa = a.clone();
            ntt.fwd_residues(&mut fa);
            let mut level = Vec::with_capacity(3 * n * secrets.len());
            for (s, tau) in secrets.iter().zip(&taus) {
                let mut prod = ntt.zero_with(crate::ntt::PRIMES_RNS);
                ntt.mul_acc(&mut prod, &fa, &s.ntt);
                ntt.inv_residues(&mut prod);
                let e = noise.tuniform(n, sk.params.noise_bound_log2);
                for (i, &p) in rns.p.iter().enumerate() {
                    let gj = rns.gadget[j][i];
                    let res = &prod.0[i * n..(i + 1) * n];
                    for ((&as_, &ei), &t) in res.iter().zip(&e).zip(tau) {
                        // TUniform noise arrives as a two's-complement u64; t ∈ {−1, 0, 1}
                        // (a negacyclic automorphism of a binary secret).
                        let ei = ei as i64;
                        let noise = (ei.rem_euclid(p as i64)) as u64;
                        let tg = (t.rem_euclid(p as i64) as u64) * gj % p;
                        level.push((u64::from(as_) + noise + tg) % p);
                    }
                }
            }
            level
        })
        .collect()
}

/// One set-1 level as the server uses it: −A (re-drawn from the seed stream, modulo 2^64) and
/// each −b_i, in the NTT domain over all five primes.
fn expand_level_pow2(
    ntt: &Ntt,
    masks: &mut crate::rng::MaskGenerator,
    body: &[u64],
    n: usize,
) -> (NttPoly, Vec<NttPoly>) {
    let mut a = vec![0u64; n];
    masks.fill(&mut a);
    let neg_a: Vec<u64> = a.iter().map(|v| v.wrapping_neg()).collect();
    let mut fa = ntt.zero();
    ntt.fwd_u64(&neg_a, &mut fa);
    let fbs = body
        .chunks_exact(n)
        .map(|b| {
            let neg_b: Vec<u64> = b.iter().map(|v| v.wrapping_neg()).collect();
            let mut fb = ntt.zero();
            ntt.fwd_u64(&neg_b, &mut fb);
            fb
        })
        .collect();
    (fa, fbs)
}

/// One set-2 level as the server uses it: −A (residues re-drawn from the seed stream, prime by
/// prime) and each −b_i (three residue vectors, each below its prime as the decoder checked),
/// in the NTT domain over the three primes of Q.
fn expand_level_rns(
    ntt: &Ntt,
    masks: &mut crate::rng::MaskGenerator,
    body: &[u64],
    n: usize,
) -> (NttPoly, Vec<NttPoly>) {
    let primes = crate::rns::Rns3::get().p;
    let mut fa = ntt.zero_with(crate::ntt::PRIMES_RNS);
    for (i, &p) in primes.iter().enumerate() {
        let chunk = &mut fa.0[i * n..(i + 1) * n];
        crate::rns::Rns3::fill_uniform(masks, p, chunk);
        chunk
            .iter_mut()
            .for_each(|v| *v = ((p - u64::from(*v)) % p) as u32);
    }
    ntt.fwd_residues(&mut fa);
    let fbs = body
        .chunks_exact(3 * n)
        .map(|b| {
            let mut fb = ntt.zero_with(crate::ntt::PRIMES_RNS);
            for (i, &p) in primes.iter().enumerate() {
                for (o, &v) in fb.0[i * n..(i + 1) * n]
                    .iter_mut()
                    .zip(&b[i * n..(i + 1) * n])
                {
                    *o = ((p - v % p) % p) as u32;
                }
            }
            ntt.fwd_residues(&mut fb);
            fb
        })
        .collect();
    (fa, fbs)
}

/// An evaluation key expanded on the server: masks re-derived, everything in the NTT domain and
/// negated so that key switching is a pure multiply-accumulate.
pub struct PreparedEvaluationKey {
    pub(crate) key_id: KeyId,
    /// Bodies (secrets) per level.
    pub(crate) secrets: usize,
    /// For each automorphism g: per level (−A_j, [−b_{j,i} for each secret i]) in the NTT
    /// domain.
    pub(crate) levels: std::collections::HashMap<usize, Vec<(NttPoly, Vec<NttPoly>)>>,
    /// Stride level of the first automorphism (the one smaller strides are composed from).
    pub(crate) first_level: u32,
}

impl std::fmt::Debug for PreparedEvaluationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedEvaluationKey")
            .field("key_id", &hex8(&self.key_id))
            .field("bodies", &self.secrets)
            .finish()
    }
}

impl PreparedEvaluationKey {
    /// Expands an evaluation key (masks from the seed, NTT domain, negated).
    ///
    /// # Errors
    /// [`HeError::ParameterMismatch`] for a key of another parameter set;
    /// [`HeError::Malformed`] for an automorphism outside the packing set or bodies that do not
    /// match the key's body count.
    pub fn prepare(key: &EvaluationKey, ctx: &crate::Context) -> Result<Self, HeError> {
        if key.params != ctx.params() {
            return Err(HeError::ParameterMismatch {
                expected: ctx.params().id,
                got: key.params.id,
            });
        }
        let ntt = &ctx.ntt;
        let n = key.params.poly_size;
        let r = key.secrets;
        if r == 0 || r > MAX_BODIES {
            return Err(HeError::Malformed {
                what: "evaluation key",
                reason: "body count out of range",
            });
        }
        let mut masks = mask_generator(key.mask_seed);
        let mut levels = std::collections::HashMap::new();
        let rns = key.params.modulus == Modulus::Rns3;
        // Set 2 stores three residues per coefficient (TDM-HE-8).
        let per_body = if rns { 3 * n } else { n };
        for (&g, bodies) in key.automorphisms.iter().zip(&key.bodies) {
            if !ntt.has_automorphism(g) {
                return Err(HeError::Malformed {
                    what: "evaluation key",
                    reason: "automorphism outside the packing set",
                });
            }
            let mut per_level = Vec::with_capacity(bodies.len());
            for body in bodies {
                if body.len() != r * per_body {
                    return Err(HeError::Malformed {
                        what: "evaluation key",
                        reason: "level length does not match the body count",
                    });
                }
                per_level.push(if rns {
                    expand_level_rns(ntt, &mut masks, body, n)
                } else {
                    expand_level_pow2(ntt, &mut masks, body, n)
                });
            }
            levels.insert(g, per_level);
        }
        Ok(Self {
            key_id: key.key_id,
            secrets: r,
            levels,
            first_level: key.first_level(),
        })
    }

    /// The secret key this evaluation key belongs to.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Bodies (secrets) per key-switching level.
    pub fn bodies(&self) -> usize {
        self.secrets
    }

    /// The stride level l₀ of the key's first (smallest-stride) automorphism; smaller strides
    /// are composed from it (see [`EvaluationKey::generate_from`]).
    pub fn first_level(&self) -> u32 {
        self.first_level
    }

    /// Whether the key can evaluate `plan`: as many bodies, a first stride level the plan
    /// accepts (at most [`crate::LayerPlan::key_first_level`]; the smaller strides are
    /// composed from it) and every automorphism from there up to the plan's chunk.
    pub fn covers(&self, plan: &crate::LayerPlan) -> bool {
        let n = plan.params.poly_size;
        self.secrets >= plan.bodies()
            && self.first_level <= plan.key_first_level.max(1)
            && (self.first_level..=plan.chunk.trailing_zeros()).all(|l| {
                self.levels
                    .contains_key(&automorphism_for_stride(n, 1 << l))
            })
    }
}
