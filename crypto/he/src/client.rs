//! Device side: encrypt quantised activations, decrypt and decode layer outputs.

use crate::context::Context;
use crate::error::HeError;
use crate::keys::{EvaluationKey, KeyId, SecretKey};
use crate::limits::MAX_BATCH;
use crate::plan::LayerPlan;
use crate::poly;
use crate::rng::{mask_generator, NoiseSource};
use crate::wire::{EncryptedInput, EncryptedOutput};
use std::sync::Arc;

/// The device's encryption state: its secret key and a noise source.
pub struct Client {
    ctx: Arc<Context>,
    sk: SecretKey,
    noise: NoiseSource,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("sk", &self.sk).finish()
    }
}

impl Client {
    /// A client with a fresh secret key.
    pub fn new(ctx: Arc<Context>) -> Self {
        let sk = SecretKey::generate(ctx.params(), &ctx.ntt);
        Self::with_key(ctx, sk)
    }

    /// A client whose key is derived from `seed` (reproducible; for stored device keys).
    pub fn from_seed(ctx: Arc<Context>, seed: u128) -> Self {
        let sk = SecretKey::from_seed(ctx.params(), &ctx.ntt, seed);
        Self::with_key(ctx, sk)
    }

    fn with_key(ctx: Arc<Context>, sk: SecretKey) -> Self {
        Self {
            ctx,
            sk,
            noise: NoiseSource::new(),
        }
    }

    /// The key id every ciphertext of this client carries.
    pub fn key_id(&self) -> KeyId {
        self.sk.key_id()
    }

    /// Generates the packing key for inputs chunks up to `max_chunk` values (single-secret:
    /// plans with one body per ciphertext).
    ///
    /// # Errors
    /// [`HeError::Shape`] if `max_chunk` is not a power of two in 2..=N.
    pub fn evaluation_key(&self, max_chunk: usize) -> Result<EvaluationKey, HeError> {
        EvaluationKey::generate(&self.sk, &self.ctx.ntt, max_chunk)
    }

    /// Generates the packing key for input chunks up to `max_chunk` values and plans with up
    /// to `bodies` bodies per ciphertext ([`LayerPlan::bodies`]); `bodies` = 1 is
    /// [`Client::evaluation_key`]. Its size grows with `bodies` (one body polynomial per
    /// secret per level, the masks are seeded).
    ///
    /// # Errors
    /// [`HeError::Shape`] if `max_chunk` is not a power of two in 2..=N or `bodies` is not in
    /// 1..=[`crate::limits::MAX_BODIES`].
    pub fn evaluation_key_for(
        &self,
        max_chunk: usize,
        bodies: usize,
    ) -> Result<EvaluationKey, HeError> {
        EvaluationKey::generate_for(&self.sk, &self.ctx.ntt, max_chunk, bodies)
    }

    /// [`Client::evaluation_key_for`] holding only the automorphisms of strides 2^l for
    /// l = `first_level` ..= log2(`max_chunk`) ([`EvaluationKey::generate_from`]).
    ///
    /// # Errors
    /// As [`EvaluationKey::generate_from`].
    pub fn evaluation_key_from(
        &self,
        first_level: u32,
        max_chunk: usize,
        bodies: usize,
    ) -> Result<EvaluationKey, HeError> {
        EvaluationKey::generate_from(&self.sk, &self.ctx.ntt, first_level, max_chunk, bodies)
    }

    /// The packing key that evaluates every plan in `plans` (packed mode): the largest chunk,
    /// the most bodies, and automorphisms from the smallest first stride level l₀ whose key
    /// fits [`crate::MAX_PLAN_KEY_BYTES`] — at most the smallest
    /// [`LayerPlan::key_first_level`] the plans accept (and then that one if none fits);
    /// parameter set 1 plans accept full keys only (l₀ = 1). Public inputs only, so the cloud
    /// can expect the same key.
    ///
    /// # Errors
    /// [`HeError::Shape`] if a plan's chunk or bodies are out of range.
    pub fn evaluation_key_for_plans(&self, plans: &[LayerPlan]) -> Result<EvaluationKey, HeError> {
        let (first, max_chunk, bodies) = key_shape_for_plans(plans);
        EvaluationKey::generate_from(&self.sk, &self.ctx.ntt, first, max_chunk, bodies)
    }

    /// Encrypts a batch of input vectors for `plan`'s layer.
    pub fn encrypt(
        &mut self,
        plan: &LayerPlan,
        batch: &[Vec<i64>],
    ) -> Result<EncryptedInput, HeError> {
        let params = self.ctx.params();
        plan.check_layout()?;
        if plan.params != params {
            return Err(HeError::ParameterMismatch {
                expected: params.id,
                got: plan.params.id,
            });
        }
        if batch.is_empty() || batch.len() > MAX_BATCH {
            return Err(HeError::Shape(format!(
                "batch of {} (1..={MAX_BATCH})",
                batch.len()
            )));
        }
        let n = params.poly_size;
        let chunks = plan.in_chunks();
        let mask_seed = crate::rng::fresh_seed();
        let mut masks = mask_generator(mask_seed);
        for x in batch {
            if x.len() != plan.n_in {
                return Err(HeError::Shape(format!(
                    "input of {} values, layer takes {}",
                    x.len(),
                    plan.n_in
                )));
            }
            if let Some(v) = x.iter().find(|v| v.unsigned_abs() > plan.max_abs_input) {
                return Err(HeError::OutOfRange(format!(
                    "input {v} exceeds ±{}",
                    plan.max_abs_input
                )));
            }
        }
        // Batch block S (r·b₁ rows), chunk c: one mask from the stream (order S, c) shared by
        // the block's bodies; body i carries rows i·b₁ .. (i+1)·b₁ under secret i, row k of
        // it, value v of chunk c at X^(k·n₁·m₁ + v). Stored as bodies[(S·r + i)·chunks + c].
        let b1 = plan.batch_rows.max(1);
        let r = plan.bodies();
        if r > crate::limits::MAX_BODIES {
            return Err(HeError::Shape(format!(
                "plan with {r} bodies (1..={})",
                crate::limits::MAX_BODIES
            )));
        }
        let mut bodies = Vec::with_capacity(plan.input_bodies(batch.len()) * chunks);
        for block in batch.chunks(plan.block_rows()) {
            let parts: Vec<&[Vec<i64>]> = block.chunks(b1).collect();
            let mut per = vec![Vec::new(); parts.len() * chunks];
            for c in 0..chunks {
                let ms: Vec<Vec<u64>> = parts
                    .iter()
                    .map(|rows| {
                        let mut m = vec![0u64; n];
                        for (k, x) in rows.iter().enumerate() {
                            let base = k * plan.row_offset();
                            for (i, &v) in
                                x.iter().skip(c * plan.chunk).take(plan.chunk).enumerate()
                            {
                                m[base + i] = (v as u64).wrapping_shl(plan.delta_in_log2);
                            }
                        }
                        m
                    })
                    .collect();
                let refs: Vec<&[u64]> = ms.iter().map(Vec::as_slice).collect();
                let (_, cts) =
                    self.sk
                        .encrypt_shared(&self.ctx.ntt, &refs, &mut masks, &mut self.noise);
                for (i, body) in cts.into_iter().enumerate() {
                    per[i * chunks + c] = body
                        .iter()
                        .map(|&v| poly::round_to_bits(v, plan.upload_bits))
                        .collect();
                }
            }
            bodies.extend(per);
        }
        Ok(EncryptedInput {
            params_id: params.id,
            key_id: self.key_id(),
            mask_seed,
            batch: batch.len(),
            secrets: r,
            chunks,
            bits: plan.upload_bits,
            bodies,
        })
    }

    /// Decrypts and decodes a layer's output: one vector of `n_out` integers per batch row.
    pub fn decrypt(
        &self,
        plan: &LayerPlan,
        out: &EncryptedOutput,
    ) -> Result<Vec<Vec<i64>>, HeError> {
        Ok(self
            .decrypt_with_noise(plan, out)?
            .into_iter()
            .map(|row| row.into_iter().map(|(y, _)| y).collect())
            .collect())
    }

    /// Like [`Client::decrypt`], also returning each output's residual noise (64-bit units).
    pub fn decrypt_with_noise(
        &self,
        plan: &LayerPlan,
        out: &EncryptedOutput,
    ) -> Result<Vec<Vec<(i64, i64)>>, HeError> {
        plan.check_layout()?;
        out.check_against(plan, &self.key_id())?;
        let d = plan.delta_out_log2;
        let b1 = plan.batch_rows.max(1);
        let mut result = Vec::with_capacity(out.batch);
        for (block, cts) in out.rows.iter().enumerate() {
            let present = plan.rows_in_block(out.batch, block);
            let bodies = plan.bodies_in_block(out.batch, block);
            let mut rows = vec![vec![(0i64, 0i64); plan.n_out]; present];
            for (ci, ct) in cts.iter().enumerate() {
                let a: Vec<u64> = ct
                    .mask
                    .iter()
                    .map(|&v| poly::lift_from_bits(v, out.bits))
                    .collect();
                // a·s_i for every body present: row k of the block is row k mod b₁ of body
                // ⌊k / b₁⌋.
                let a_s = self.sk.mul_mask_bodies(&self.ctx.ntt, &a, bodies);
                let first = plan.first_output(ci);
                let count = plan.outputs_in_ciphertext(ci);
                for (idx, &b) in ct.body.iter().enumerate() {
                    let (k, j) = (idx / count.max(1), first + idx % count.max(1));
                    let slot = plan.output_slot_in_row(k % b1, j).1;
                    let Some(&a_s_j) = a_s.get(k / b1).and_then(|p| p.get(slot)) else {
                        continue;
                    };
                    let phase = poly::lift_from_bits(b, out.body_bits).wrapping_sub(a_s_j);
                    let y = (phase.wrapping_add(1u64 << (d - 1)) as i64) >> d;
                    let noise = phase.wrapping_sub((y as u64).wrapping_shl(d)) as i64;
                    if let Some(slot) = rows.get_mut(k).and_then(|r| r.get_mut(j)) {
                        *slot = (y, noise);
                    }
                }
            }
            result.extend(rows);
        }
        Ok(result)
    }
}

/// The key one device registers for `plans` (packed plans of one parameter set): (first stride
/// level l₀, largest chunk, most bodies), as [`Client::evaluation_key_for_plans`] generates it.
pub fn key_shape_for_plans(plans: &[LayerPlan]) -> (u32, usize, usize) {
    let max_chunk = plans.iter().map(|p| p.chunk).max().unwrap_or(2).max(2);
    let bodies = plans.iter().map(LayerPlan::bodies).max().unwrap_or(1);
    let accepted = plans
        .iter()
        .map(|p| p.key_first_level.max(1))
        .min()
        .unwrap_or(1)
        .min(max_chunk.trailing_zeros());
    let top = max_chunk.trailing_zeros();
    let params = plans.first().map(|p| p.params);
    let fits = |l: u32| {
        params.is_some_and(|p| {
            crate::wire::eval_key_len(&p, (top + 1 - l) as usize, bodies)
                <= crate::MAX_PLAN_KEY_BYTES
        })
    };
    let first = (1..=accepted).find(|&l| fits(l)).unwrap_or(accepted);
    (first, max_chunk, bodies)
}
