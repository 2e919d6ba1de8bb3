//! Server side: prepare a layer once (weights to the NTT domain), then evaluate ciphertexts.
//!
//! Submodules: `planning` (the public planning constructors `plan_public*` / `plan_int8*`)
//! and `pack` (packing tree, key switching and the final modulus switch).

use crate::context::Context;
use crate::error::HeError;
use crate::keys::PreparedEvaluationKey;
use crate::ntt::NttPoly;
use crate::plan::{LayerPlan, LinkModel, OutputMode, PlanOptions, WeightStats};
use crate::poly;
use crate::wire::{EncryptedInput, EncryptedOutput};
use std::sync::Arc;

mod hoist;
mod pack;
mod planning;

pub(crate) use pack::key_switch_add;
use pack::map_maybe_par;

/// Largest |x| an int8 layer plan accepts: int8 plus one unit, so clamped DP-noised values
/// (which may reach −128) fit too.
pub const INT8_LAYER_MAX_INPUT: u64 = 128;

/// A GLWE ciphertext in the NTT domain: one mask shared by r ≥ 1 bodies (body i under
/// secret i; r = 1 is a plain GLWE ciphertext).
#[derive(Clone)]
pub(crate) struct NttCiphertext {
    pub(crate) mask: NttPoly,
    pub(crate) body: Vec<NttPoly>,
}

impl NttCiphertext {
    /// The zero ciphertext (mask and `bodies` bodies) over `primes` CRT primes.
    pub(crate) fn zero(ntt: &crate::ntt::Ntt, primes: usize, bodies: usize) -> Self {
        Self {
            mask: ntt.zero_with(primes),
            body: (0..bodies).map(|_| ntt.zero_with(primes)).collect(),
        }
    }
}

/// A layer ready for evaluation: its plan, and its weights and bias in the NTT domain.
pub struct PreparedLayer {
    ctx: Arc<Context>,
    plan: LayerPlan,
    /// `weights[o * in_chunks + c]`: block o's weight polynomial for chunk c.
    weights: Vec<NttPoly>,
    /// Per block: Δ_in·bias placed at the block's output slots.
    bias: Vec<Option<NttPoly>>,
    /// CRT primes of the server's arithmetic: 4 when every |w| ≤ 128 (TDM-PAR-HE-4), else 5;
    /// 3 (residues modulo Q) for parameter set 2.
    primes: usize,
    /// Packed mode: the bottom level of every packing tree is folded into the weights (see
    /// [`PreparedLayer::fold_bottom_level`]): the slots of an even leaf e and its odd partner
    /// o hold W_e + X^k·W_o and W_e − X^k·W_o (biases likewise), so that node's u and v are
    /// two plain products.
    folded: bool,
    /// Packed mode, parameter set 2: the bottom levels of every packing tree hoisted to the
    /// inputs ([`LayerPlan::hoisted_levels`]); `weights` and `bias` are then empty.
    hoisted: Option<hoist::Hoisted>,
}

impl std::fmt::Debug for PreparedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedLayer")
            .field("plan", &self.plan)
            .finish()
    }
}

/// Evaluation options.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalOptions {
    /// Spread blocks and packing-tree nodes over rayon's thread pool.
    pub parallel: bool,
}

/// Computes the statistics a plan needs from row-major weights `w[out][in]` and a bias.
pub fn weight_stats(
    w: &[i64],
    n_in: usize,
    n_out: usize,
    bias: &[i64],
    rows_per_block: usize,
) -> WeightStats {
    let mut max_row_l1 = 0u64;
    let mut max_block = 0f64;
    let mut block = 0f64;
    for r in 0..n_out {
        let row = &w[r * n_in..(r + 1) * n_in];
        max_row_l1 = max_row_l1.max(row.iter().map(|v| v.unsigned_abs()).sum());
        block += row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
        if (r + 1) % rows_per_block == 0 || r + 1 == n_out {
            max_block = max_block.max(block);
            block = 0.0;
        }
    }
    WeightStats {
        max_row_l1,
        max_abs_bias: bias.iter().map(|b| b.unsigned_abs()).max().unwrap_or(0),
        max_block_sq_norm: max_block,
    }
}

/// Weight rows per weight polynomial (m₁) for a chunk candidate, as [`LayerPlan::rows`]
/// computes it, capped by the layer's output count.
fn rows_per_block(n: usize, n_out: usize, o: PlanOptions) -> usize {
    let chunk = o.chunk.unwrap_or(n).clamp(1, n);
    let b1 = o.batch.unwrap_or(1).clamp(1, (n / chunk).max(1));
    (n / chunk / b1).clamp(1, n_out.max(1))
}

impl PreparedLayer {
    /// Plans and prepares a layer `y = W·x + b` with row-major `weights` (n_out × n_in),
    /// inputs bounded by `max_abs_input`. Refuses layers whose failure bound is too high.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        ctx: Arc<Context>,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        weights: &[i64],
        bias: &[i64],
        max_abs_input: u64,
        opts: PlanOptions,
    ) -> Result<Self, HeError> {
        Self::prepare_with_link(
            ctx,
            mode,
            n_in,
            n_out,
            weights,
            bias,
            max_abs_input,
            opts,
            LinkModel::default(),
        )
    }

    /// [`PreparedLayer::prepare`] with a batch plan's bytes weighed at `link`'s rate
    /// (TDM-PAR-HE-3; only batch plans, `opts.batch` ≥ 2 without a forced chunk, depend on it).
    ///
    /// # Errors
    /// As [`PreparedLayer::prepare`].
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_with_link(
        ctx: Arc<Context>,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        weights: &[i64],
        bias: &[i64],
        max_abs_input: u64,
        opts: PlanOptions,
        link: LinkModel,
    ) -> Result<Self, HeError> {
        let params = ctx.params();
        let n = params.poly_size;
        if weights.len() != n_in.saturating_mul(n_out) || bias.len() != n_out {
            return Err(HeError::Shape(format!(
                "weights {} / bias {} do not match {n_out}x{n_in}",
                weights.len(),
                bias.len()
            )));
        }
        // Weights go into the NTT as small signed values: keep them far below the primes.
        if weights.iter().any(|w| w.unsigned_abs() >= 1 << 20) {
            return Err(HeError::OutOfRange(
                "weights must satisfy |w| < 2^20".into(),
            ));
        }
        let plan = crate::plan::plan_first_fitting(params, mode, n_in, n_out, opts, link, |o| {
            let stats = weight_stats(weights, n_in, n_out, bias, rows_per_block(n, n_out, o));
            LayerPlan::new(params, mode, n_in, n_out, max_abs_input, stats, o)
        })?;
        Self::build(ctx, plan, weights, bias)
    }
    /// Prepares weights under a plan fixed in advance (e.g. by [`PreparedLayer::plan_public`]).
    /// Refuses weights whose outputs or noise would not fit the plan's bounds.
    pub fn prepare_with_plan(
        ctx: Arc<Context>,
        plan: LayerPlan,
        weights: &[i64],
        bias: &[i64],
    ) -> Result<Self, HeError> {
        let (n_in, n_out) = (plan.n_in, plan.n_out);
        plan.check_layout()?;
        if plan.params != ctx.params() {
            return Err(HeError::ParameterMismatch {
                expected: ctx.params().id,
                got: plan.params.id,
            });
        }
        if weights.len() != n_in.saturating_mul(n_out) || bias.len() != n_out {
            return Err(HeError::Shape(format!(
                "weights {} / bias {} do not match {n_out}x{n_in}",
                weights.len(),
                bias.len()
            )));
        }
        if weights.iter().any(|w| w.unsigned_abs() >= 1 << 20) {
            return Err(HeError::OutOfRange(
                "weights must satisfy |w| < 2^20".into(),
            ));
        }
        if plan.bodies > crate::limits::MAX_BODIES {
            return Err(HeError::Shape(format!(
                "plan with {} bodies per mask (1..={})",
                plan.bodies,
                crate::limits::MAX_BODIES
            )));
        }
        let stats = weight_stats(weights, n_in, n_out, bias, plan.rows());
        let max_out = stats
            .max_row_l1
            .checked_mul(plan.max_abs_input)
            .and_then(|v| v.checked_add(stats.max_abs_bias))
            .ok_or_else(|| HeError::OutOfRange("output range overflows".into()))?;
        // (2y+1)·Δ_out ≤ 2^64 must hold for the actual weights.
        let span = 2u128 * max_out as u128 + 1;
        if span << plan.delta_out_log2 > 1u128 << 64 {
            return Err(HeError::OutOfRange(format!(
                "outputs up to {max_out} do not fit the plan"
            )));
        }
        let v_pre = plan.pre_switch_variance(stats, plan.upload_bits);
        let p_fail = crate::plan::log2_fail(
            plan.download_variance(v_pre, plan.download_bits, plan.body_bits),
            plan.delta_out_log2,
        );
        if p_fail > -(plan.params.max_fail_log2 as f64) {
            return Err(HeError::FailureBoundExceeded {
                log2_p_fail: p_fail,
                limit: plan.params.max_fail_log2,
            });
        }
        Self::build(ctx, plan, weights, bias)
    }

    fn build(
        ctx: Arc<Context>,
        plan: LayerPlan,
        weights: &[i64],
        bias: &[i64],
    ) -> Result<Self, HeError> {
        let n = plan.params.poly_size;
        let (n_in, n_out) = (plan.n_in, plan.n_out);
        let rows = plan.rows();
        let (chunk, in_chunks, blocks) = (plan.chunk, plan.in_chunks(), plan.out_blocks());
        let ntt = &ctx.ntt;
        // TDM-PAR-HE-4: int8-sized weights keep every integer of the evaluation below 2^116.1,
        // exact over four primes; larger weights (up to 2^20) need all five.
        // Parameter set 2 computes modulo Q over three primes whatever the weights.
        let primes = if plan.params.modulus == crate::params::Modulus::Rns3 {
            crate::ntt::PRIMES_RNS
        } else if weights.iter().all(|w| w.unsigned_abs() <= 128) {
            crate::ntt::PRIMES_INT8
        } else {
            5
        };
        let mut polys = Vec::with_capacity(blocks * in_chunks);
        let mut coeffs = vec![0i64; n];
        for o in 0..blocks {
            for c in 0..in_chunks {
                coeffs.iter_mut().for_each(|v| *v = 0);
                for r in 0..rows {
                    let row = o * rows + r;
                    if row >= n_out {
                        break;
                    }
                    for i in 0..chunk {
                        let col = c * chunk + i;
                        if col >= n_in {
                            break;
                        }
                        // Row r, input i at X^(r·chunk − i): the dot product lands on X^(r·chunk).
                        let w = weights[row * n_in + col];
                        let e = r * chunk;
                        if e >= i {
                            coeffs[e - i] += w;
                        } else {
                            coeffs[n + e - i] -= w;
                        }
                    }
                }
                let mut f = ntt.uninit_with(primes);
                ntt.fwd_small(&coeffs, &mut f);
                polys.push(f);
            }
        }
        // Bias at every batch row's output slots (the server drops padding rows' slots from
        // what it returns, so a short last block never reveals the bias).
        let mut bias_polys = Vec::with_capacity(blocks);
        for o in 0..blocks {
            let mut b = vec![0u64; n];
            let mut any = false;
            for r in 0..rows {
                let row = o * rows + r;
                if row < n_out && bias[row] != 0 {
                    for k in 0..plan.batch_rows {
                        b[r * chunk + k * plan.row_offset()] =
                            (bias[row] as u64).wrapping_shl(plan.delta_in_log2);
                    }
                    any = true;
                }
            }
            bias_polys.push(any.then(|| {
                let mut f = ntt.uninit_with(primes);
                ntt.fwd_u64(&b, &mut f);
                f
            }));
        }
        let mut layer = Self {
            ctx,
            plan,
            weights: polys,
            bias: bias_polys,
            primes,
            folded: false,
            hoisted: None,
        };
        match layer.plan.hoisted_levels() {
            0 => layer.fold_bottom_level(),
            levels => layer.hoist(levels),
        }
        Ok(layer)
    }

    /// The bottom node of a packing tree joins leaves e and o = e + L/2 of a group (L leaves)
    /// as u = P_e + X^k·P_o and v = P_e − X^k·P_o with k = chunk/2, where P_b = Σ_c x_c·W_{b,c}
    /// (+ bias_b). Products are linear, so u and v are the products with W_e ± X^k·W_o: stored
    /// in place of W_e and W_o, they save the node's monomial product and butterfly (on every
    /// body) at the cost of nothing — the same polynomials, the same integers (so the same
    /// bounds, TDM-PAR-HE-4, and the same outputs bit for bit). Pairs whose odd leaf is
    /// missing (a short last group) stay as they are.
    fn fold_bottom_level(&mut self) {
        let plan = self.plan;
        if plan.mode != OutputMode::Packed || plan.leaves_per_group() < 2 {
            return;
        }
        let ntt = &self.ctx.ntt;
        let Some(mono) = self.ctx.monomials.get(&(plan.chunk / 2)) else {
            return;
        };
        let (leaves, per_group, blocks) = (
            plan.leaves_per_group(),
            plan.blocks_per_group(),
            plan.out_blocks(),
        );
        let chunks = plan.in_chunks();
        for first in (0..blocks).step_by(per_group) {
            let last = (first + per_group).min(blocks);
            for t in 0..leaves / 2 {
                let (e, o) = (first + t, first + t + leaves / 2);
                if o >= last {
                    continue;
                }
                for c in 0..chunks {
                    let (lo, hi) = self.weights.split_at_mut(o * chunks + c);
                    let (we, wo) = (&mut lo[e * chunks + c], &mut hi[0]);
                    ntt.mul_assign_normalize(wo, mono);
                    ntt.butterfly(we, wo);
                }
                let (be, bo) = (self.bias[e].take(), self.bias[o].take());
                if be.is_some() || bo.is_some() {
                    let mut be = be.unwrap_or_else(|| ntt.zero_with(self.primes));
                    let mut bo = bo.unwrap_or_else(|| ntt.zero_with(self.primes));
                    ntt.mul_assign_normalize(&mut bo, mono);
                    ntt.butterfly(&mut be, &mut bo);
                    self.bias[e] = Some(be);
                    self.bias[o] = Some(bo);
                }
            }
        }
        self.folded = true;
    }

    /// The layer's plan (public: the device needs it to encrypt and decrypt).
    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// Evaluates the layer on an encrypted batch: per batch block, one product per (output
    /// block, input chunk), then (no-key) one returned ciphertext per output block or
    /// (packed) one packing tree per group of `chunk` output blocks, its leaves computed
    /// as the tree needs them (no product buffers stay alive), tree halves in parallel.
    ///
    /// # Errors
    /// [`HeError::Malformed`] / [`HeError::ParameterMismatch`] if the input does not match
    /// the plan; [`HeError::MissingEvaluationKey`] / [`HeError::KeyIdMismatch`] in packed mode
    /// without a fitting key.
    pub fn eval(
        &self,
        input: &EncryptedInput,
        key: Option<&PreparedEvaluationKey>,
        opts: EvalOptions,
    ) -> Result<EncryptedOutput, HeError> {
        let plan = &self.plan;
        input.check_against(plan)?;
        let key = match plan.mode {
            OutputMode::NoKey => None,
            OutputMode::Packed => match key {
                None => return Err(HeError::MissingEvaluationKey("packed mode needs a key")),
                Some(k) if k.key_id != input.key_id => return Err(HeError::KeyIdMismatch),
                Some(k) if k.secrets < plan.bodies() => {
                    return Err(HeError::MissingEvaluationKey(
                        "the key carries fewer bodies (secrets) than the plan; register a key \
                         from Client::evaluation_key_for with at least the plan's bodies",
                    ))
                }
                Some(k) => {
                    // A first stride level the plan accepts and every stride from there up;
                    // smaller strides are composed from the key's first automorphism.
                    if !k.covers(plan) {
                        return Err(HeError::MissingEvaluationKey("automorphism not covered"));
                    }
                    Some(k)
                }
            },
        };
        let n = plan.params.poly_size;
        let chunks = plan.in_chunks();
        let blocks = plan.batch_blocks(input.batch);
        let r = plan.bodies();
        // Expand the masks in stream order (batch block, chunk: one mask per block and chunk,
        // shared by the block's bodies), then transform every uploaded ciphertext.
        let mut masks = crate::rng::mask_generator(input.mask_seed);
        let mut raw = Vec::with_capacity(blocks * chunks);
        for block in 0..blocks {
            let present = plan.bodies_in_block(input.batch, block);
            for c in 0..chunks {
                let mut a = vec![0u64; n];
                masks.fill(&mut a);
                let bodies: Vec<&Vec<u64>> = (0..present)
                    .filter_map(|i| input.bodies.get((block * r + i) * chunks + c))
                    .collect();
                raw.push((a, bodies));
            }
        }
        let inputs: Vec<NttCiphertext> = map_maybe_par(raw, opts.parallel, |(a, bodies)| {
            let ntt = &self.ctx.ntt;
            let mut fa = ntt.uninit_with(self.primes);
            ntt.fwd_u64(&a, &mut fa);
            let body = bodies
                .into_iter()
                .map(|body| {
                    let body: Vec<u64> = body
                        .iter()
                        .map(|&v| poly::lift_from_bits(v, plan.upload_bits))
                        .collect();
                    let mut fb = ntt.uninit_with(self.primes);
                    ntt.fwd_u64(&body, &mut fb);
                    fb
                })
                .collect();
            NttCiphertext { mask: fa, body }
        });
        let per_block = plan.out_ciphertexts();
        // Hoisted levels: a batch block's inputs key-switched through the hoisted
        // automorphisms once, shared by the block's packing trees. Those 2^L·chunks
        // ciphertexts live only while their block is evaluated (one block at a time, each in
        // parallel inside), so a request of many blocks never holds more than one block's;
        // plain plans evaluate every (block, ciphertext) job at once as before.
        let window = match (&self.hoisted, key) {
            (Some(_), Some(_)) => 1,
            _ => blocks.max(1),
        };
        let mut cts = Vec::with_capacity(blocks * per_block);
        for start in (0..blocks).step_by(window) {
            let end = (start + window).min(blocks);
            let hoisted: Option<Vec<NttCiphertext>> = match (&self.hoisted, key) {
                (Some(_), Some(key)) => Some(self.hoist_inputs(
                    &inputs[start * chunks..end * chunks],
                    key,
                    opts.parallel,
                )),
                _ => None,
            };
            let jobs: Vec<(usize, usize)> = (start..end)
                .flat_map(|b| (0..per_block).map(move |ct| (b, ct)))
                .collect();
            cts.extend(map_maybe_par(jobs, opts.parallel, |(b, ct)| {
                let ins = match &hoisted {
                    Some(h) => &h[..],
                    None => &inputs[b * chunks..(b + 1) * chunks],
                };
                let rows = plan.rows_in_block(input.batch, b);
                let c = match key {
                    None => self.product(ins, ct),
                    Some(key) => self.pack(ins, ct, key, opts),
                };
                self.finish(c, ct, rows)
            }));
        }
        let mut it = cts.into_iter();
        let rows_out = (0..blocks)
            .map(|_| it.by_ref().take(per_block).collect())
            .collect();
        Ok(EncryptedOutput {
            params_id: plan.params.id,
            key_id: input.key_id,
            mode: plan.mode,
            bits: plan.download_bits,
            body_bits: plan.body_bits,
            n_out: plan.n_out,
            batch: input.batch,
            secrets: r,
            rows: rows_out,
        })
    }

    /// The accumulated product ciphertext of output block `o` (NTT domain, bias added to every
    /// body): the shared mask and each body times the same weight polynomial (1 + r products).
    fn product(&self, inputs: &[NttCiphertext], o: usize) -> NttCiphertext {
        let chunks = inputs.len();
        self.product_of(
            inputs,
            &self.weights[o * chunks..(o + 1) * chunks],
            self.bias[o].as_ref(),
        )
    }

    /// Σ_i weights_i·inputs_i (the shared mask and every body), plus `bias` on every body.
    fn product_of(
        &self,
        inputs: &[NttCiphertext],
        weights: &[NttPoly],
        bias: Option<&NttPoly>,
    ) -> NttCiphertext {
        let ntt = &self.ctx.ntt;
        let r = inputs.first().map_or(1, |i| i.body.len());
        let mut acc = NttCiphertext::zero(ntt, self.primes, r);
        for (inp, w) in inputs.iter().zip(weights) {
            ntt.mul_acc(&mut acc.mask, &inp.mask, w);
            for (a, body) in acc.body.iter_mut().zip(&inp.body) {
                ntt.mul_acc(a, body, w);
            }
        }
        if let Some(b) = bias {
            for a in &mut acc.body {
                ntt.add_assign(a, b);
            }
        }
        acc
    }
}
