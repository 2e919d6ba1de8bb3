//! The engine's inner steps, for the criterion micro-benchmarks in `benches/` only (not a
//! stable API: hidden from the documentation, may change with any release).

use crate::context::Context;
use crate::keys::{automorphism_for_stride, PreparedEvaluationKey};
use crate::ntt::NttPoly;
use crate::server::{key_switch_add, NttCiphertext};
use crate::Client;
use std::sync::Arc;

/// Fixed operands for one N-sized transform, key switch and ciphertext × plaintext product.
pub struct Fixture {
    ctx: Arc<Context>,
    key: PreparedEvaluationKey,
    coeffs: Vec<u64>,
    ct: NttCiphertext,
    weights: NttPoly,
    g: usize,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture").finish()
    }
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s ^ (s >> 29)
        })
        .collect()
}

impl Fixture {
    /// Builds the operands: a client key from a fixed seed, its packing key for chunks up to
    /// 4, a ciphertext-shaped pair of uniform polynomials and int8 weights.
    ///
    /// # Errors
    /// Only if the parameter set cannot carry a packing key for chunk 4 (never for the
    /// frozen sets).
    pub fn new(ctx: Arc<Context>) -> Result<Self, crate::HeError> {
        Self::with_bodies(ctx, 1)
    }

    /// [`Fixture::new`] with ciphertexts of `bodies` bodies sharing one mask and a packing key
    /// for that many secrets: the operands of the multi-body cost-model units.
    ///
    /// # Errors
    /// [`crate::HeError::Shape`] for `bodies` outside 1..=[`crate::limits::MAX_BODIES`].
    pub fn with_bodies(ctx: Arc<Context>, bodies: usize) -> Result<Self, crate::HeError> {
        let n = ctx.params().poly_size;
        let client = Client::from_seed(ctx.clone(), 7);
        let key = PreparedEvaluationKey::prepare(&client.evaluation_key_for(4, bodies)?, &ctx)?;
        let coeffs = pseudo_random(n, 1);
        // Ciphertexts and weights over the four primes an int8 layer runs on (TDM-PAR-HE-4).
        let primes = ctx.int8_primes();
        let mut mask = ctx.ntt.uninit_with(primes);
        ctx.ntt.fwd_u64(&coeffs, &mut mask);
        let body = (0..bodies as u64)
            .map(|i| {
                let mut f = ctx.ntt.uninit_with(primes);
                ctx.ntt.fwd_u64(&pseudo_random(n, 2 + 100 * i), &mut f);
                f
            })
            .collect();
        let w: Vec<i64> = pseudo_random(n, 3)
            .iter()
            .map(|v| (v % 255) as i64 - 127)
            .collect();
        let mut weights = ctx.ntt.uninit_with(primes);
        ctx.ntt.fwd_small(&w, &mut weights);
        Ok(Self {
            g: automorphism_for_stride(n, 2),
            ctx,
            key,
            coeffs,
            ct: NttCiphertext { mask, body },
            weights,
        })
    }

    /// One forward transform of N coefficients modulo 2^64 over the four primes of an int8
    /// layer; returns one residue.
    pub fn ntt_forward(&self) -> u32 {
        let mut out = self.ctx.ntt.uninit_with(self.ctx.int8_primes());
        self.ctx.ntt.fwd_u64(&self.coeffs, &mut out);
        out.0[0]
    }

    /// One inverse transform (four primes, Garner reconstruction) back to N coefficients
    /// modulo 2^64; returns one coefficient.
    pub fn ntt_inverse(&self) -> u64 {
        let mut scratch = self.ct.mask.clone();
        let mut out = vec![0u64; self.ctx.params().poly_size];
        self.ctx.ntt.inv(&mut scratch, &mut out);
        out[0]
    }

    /// One key switch as the packing tree of an int8 layer does it (four primes):
    /// `u + KeySwitch(τ_g(v))` (operands cloned).
    pub fn key_switch(&self) -> u32 {
        let r = key_switch_add(
            &self.ctx,
            self.ct.clone(),
            self.ct.clone(),
            self.g,
            &self.key,
        );
        r.mask.0[0]
    }

    /// One ciphertext × plaintext product accumulated in the NTT domain (the mask and every
    /// body).
    pub fn ct_product(&self) -> u32 {
        let primes = self.ctx.int8_primes();
        let mut a = self.ctx.ntt.zero_with(primes);
        self.ctx.ntt.mul_acc(&mut a, &self.ct.mask, &self.weights);
        let mut x = a.0[0];
        for body in &self.ct.body {
            let mut b = self.ctx.ntt.zero_with(primes);
            self.ctx.ntt.mul_acc(&mut b, body, &self.weights);
            x ^= b.0[0];
        }
        x
    }
}
