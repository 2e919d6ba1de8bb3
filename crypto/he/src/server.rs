//! Server side: prepare a layer once (weights to the NTT domain), then evaluate ciphertexts.

use crate::context::Context;
use crate::error::HeError;
use crate::keys::{automorphism_for_stride, PreparedEvaluationKey};
use crate::ntt::NttPoly;
use crate::plan::{LayerPlan, LinkModel, OutputMode, PlanOptions, WeightBounds, WeightStats};
use crate::poly;
use crate::wire::{EncryptedInput, EncryptedOutput, OutputCiphertext};
use std::sync::Arc;

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

/// A layer ready for evaluation: its plan, and its weights and bias in the NTT domain.
pub struct PreparedLayer {
    ctx: Arc<Context>,
    plan: LayerPlan,
    /// `weights[o * in_chunks + c]`: block o's weight polynomial for chunk c.
    weights: Vec<NttPoly>,
    /// Per block: Δ_in·bias placed at the block's output slots.
    bias: Vec<Option<NttPoly>>,
    /// CRT primes of the server's arithmetic: 4 when every |w| ≤ 128 (TDM-PAR-HE-4), else 5.
    primes: usize,
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

    /// Plans a layer from public information only — its shape and bounds on the weights and
    /// bias — so that a party without the weights (the device) derives the same plan as the
    /// cloud, which then prepares its weights with [`PreparedLayer::prepare_with_plan`].
    /// Chunk candidates are tried as in [`PreparedLayer::prepare`], with worst-case statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_public(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_input: u64,
        max_abs_weight: u64,
        max_abs_bias: u64,
        opts: PlanOptions,
    ) -> Result<LayerPlan, HeError> {
        Self::plan_public_with_link(
            params,
            mode,
            n_in,
            n_out,
            max_abs_input,
            max_abs_weight,
            max_abs_bias,
            opts,
            LinkModel::default(),
        )
    }

    /// [`PreparedLayer::plan_public`] with a batch plan's bytes weighed at `link`'s rate
    /// (TDM-PAR-HE-3). `link` is public too: both parties must pass the same value.
    ///
    /// # Errors
    /// As [`PreparedLayer::plan_public`].
    #[allow(clippy::too_many_arguments)]
    pub fn plan_public_with_link(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_input: u64,
        max_abs_weight: u64,
        max_abs_bias: u64,
        opts: PlanOptions,
        link: LinkModel,
    ) -> Result<LayerPlan, HeError> {
        Self::plan_public_bounded(
            params,
            mode,
            n_in,
            n_out,
            max_abs_input,
            WeightBounds::entries(max_abs_weight, max_abs_bias),
            opts,
            link,
        )
    }

    /// [`PreparedLayer::plan_public_with_link`] with public bounds on the weights' rows
    /// (`WeightBounds`, e.g. signed with the model): the plan assumes the worst weights those
    /// bounds allow instead of the worst int8 matrix. Weights that break the bounds are refused
    /// by [`PreparedLayer::prepare_with_plan`].
    ///
    /// # Errors
    /// As [`PreparedLayer::plan_public`].
    #[allow(clippy::too_many_arguments)]
    pub fn plan_public_bounded(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_input: u64,
        bounds: WeightBounds,
        opts: PlanOptions,
        link: LinkModel,
    ) -> Result<LayerPlan, HeError> {
        let n = params.poly_size;
        crate::plan::plan_first_fitting(params, mode, n_in, n_out, opts, link, |o| {
            let stats = bounds.stats(n_in, rows_per_block(n, n_out, o));
            LayerPlan::new(params, mode, n_in, n_out, max_abs_input, stats, o)
        })
    }

    /// The plan both parties derive for an int8 layer (|x| ≤ [`INT8_LAYER_MAX_INPUT`],
    /// |w| ≤ 127) from its shape and the public bias bound — what device and cloud runtimes
    /// use so that neither needs the other's data to agree on the layout.
    pub fn plan_int8(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_bias: u64,
    ) -> Result<LayerPlan, HeError> {
        Self::plan_public(
            params,
            mode,
            n_in,
            n_out,
            INT8_LAYER_MAX_INPUT,
            127,
            max_abs_bias,
            PlanOptions::default(),
        )
    }

    /// The plan both parties derive for an int8 layer serving requests of `batch` rows
    /// (tokens × width): like [`PreparedLayer::plan_int8`], with the batch placed in the
    /// polynomials by Cheetah's matrix layout and the chunk chosen by [`crate::plan_cost`].
    /// `batch` = 1 gives exactly the plan of [`PreparedLayer::plan_int8`]. Requests may carry
    /// any number of rows up to [`crate::limits::MAX_BATCH`]; `batch` only shapes the layout.
    ///
    /// # Errors
    /// [`HeError::Shape`] for an empty layer or a batch outside 1..=`MAX_BATCH`;
    /// [`HeError::FailureBoundExceeded`] / [`HeError::OutOfRange`] if no layout fits.
    pub fn plan_int8_batch(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_bias: u64,
        batch: usize,
    ) -> Result<LayerPlan, HeError> {
        Self::plan_int8_batch_with_link(
            params,
            mode,
            n_in,
            n_out,
            max_abs_bias,
            batch,
            LinkModel::default(),
        )
    }

    /// [`PreparedLayer::plan_int8_batch`] with the bytes weighed at `link`'s rate: a slower
    /// link gives denser uploads (fewer bytes) at the price of more key switches
    /// (TDM-PAR-HE-3). Device and cloud must pass the same `link` (from the signed bundle).
    ///
    /// # Errors
    /// As [`PreparedLayer::plan_int8_batch`].
    pub fn plan_int8_batch_with_link(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_bias: u64,
        batch: usize,
        link: LinkModel,
    ) -> Result<LayerPlan, HeError> {
        Self::plan_int8_batch_bounded(
            params,
            mode,
            n_in,
            n_out,
            WeightBounds::entries(127, max_abs_bias),
            batch,
            link,
            1,
        )
    }

    /// [`PreparedLayer::plan_int8_batch_with_link`] with public row bounds on the int8
    /// weights (`bounds.max_abs_weight` is capped at 127): tighter signed bounds give fewer
    /// bits per coefficient both ways. `max_bodies` (public, 0 or 1 = one secret) lets the
    /// planner share each mask among up to that many bodies (secrets), searched jointly with
    /// the chunk by the cost model (TDM-PAR-HE-3); the device needs an evaluation key with at
    /// least the plan's [`LayerPlan::bodies`] (see `Client::evaluation_key_for`).
    ///
    /// # Errors
    /// As [`PreparedLayer::plan_int8_batch`]; [`HeError::Shape`] if `max_bodies` exceeds
    /// [`crate::limits::MAX_BODIES`].
    #[allow(clippy::too_many_arguments)]
    pub fn plan_int8_batch_bounded(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        bounds: WeightBounds,
        batch: usize,
        link: LinkModel,
        max_bodies: usize,
    ) -> Result<LayerPlan, HeError> {
        if batch == 0 || batch > crate::limits::MAX_BATCH {
            return Err(HeError::Shape(format!(
                "batch of {batch} (1..={})",
                crate::limits::MAX_BATCH
            )));
        }
        Self::plan_public_bounded(
            params,
            mode,
            n_in,
            n_out,
            INT8_LAYER_MAX_INPUT,
            WeightBounds {
                max_abs_weight: bounds.max_abs_weight.min(127),
                ..bounds
            },
            PlanOptions {
                chunk: None,
                batch: (batch > 1).then_some(batch),
                max_bodies,
            },
            link,
        )
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
        let primes = if weights.iter().all(|w| w.unsigned_abs() <= 128) {
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
        Ok(Self {
            ctx,
            plan,
            weights: polys,
            bias: bias_polys,
            primes,
        })
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
                    for stride in 1..=plan.chunk.trailing_zeros() {
                        let g = automorphism_for_stride(plan.params.poly_size, 1 << stride);
                        if !k.levels.contains_key(&g) {
                            return Err(HeError::MissingEvaluationKey("automorphism not covered"));
                        }
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
        let jobs: Vec<(usize, usize)> = (0..blocks)
            .flat_map(|b| (0..per_block).map(move |ct| (b, ct)))
            .collect();
        let cts = map_maybe_par(jobs, opts.parallel, |(b, ct)| {
            let ins = &inputs[b * chunks..(b + 1) * chunks];
            let rows = plan.rows_in_block(input.batch, b);
            let c = match key {
                None => self.product(ins, ct),
                Some(key) => self.pack(ins, ct, key, opts),
            };
            self.finish(c, ct, rows)
        });
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
        let ntt = &self.ctx.ntt;
        let chunks = inputs.len();
        let r = inputs.first().map_or(1, |i| i.body.len());
        let mut acc_a = ntt.zero_with(self.primes);
        let mut acc_b: Vec<NttPoly> = (0..r).map(|_| ntt.zero_with(self.primes)).collect();
        for (c, inp) in inputs.iter().enumerate() {
            let w = &self.weights[o * chunks + c];
            ntt.mul_acc(&mut acc_a, &inp.mask, w);
            for (acc, body) in acc_b.iter_mut().zip(&inp.body) {
                ntt.mul_acc(acc, body, w);
            }
        }
        if let Some(b) = &self.bias[o] {
            for acc in &mut acc_b {
                ntt.add_assign(acc, b);
            }
        }
        NttCiphertext {
            mask: acc_a,
            body: acc_b,
        }
    }

    /// Packs group `group` of product ciphertexts into one (PackLWEs-style tree, then a
    /// partial trace that clears every slot but the outputs).
    fn pack(
        &self,
        inputs: &[NttCiphertext],
        group: usize,
        key: &PreparedEvaluationKey,
        opts: EvalOptions,
    ) -> NttCiphertext {
        let n = self.plan.params.poly_size;
        let leaves = self.plan.leaves_per_group();
        let first = group * self.plan.blocks_per_group();
        let last = (first + self.plan.blocks_per_group()).min(self.plan.out_blocks());
        let mut ct = self.tree(inputs, first, last, 0, 1, leaves, key, opts);
        let mut stride = self.plan.chunk / leaves;
        while stride > 1 {
            let g = automorphism_for_stride(n, stride);
            let copy = ct.clone();
            ct = self.add_rotated(ct, copy, g, key);
            stride /= 2;
        }
        ct
    }

    /// The packing tree over the leaves `offset + step·t` (t < width) of blocks
    /// `first..last`: leaf t of the group sits at offset t·chunk/leaves in the result. The
    /// even and odd halves are independent (computed in parallel when asked); missing leaves
    /// (a short group) are empty subtrees.
    #[allow(clippy::too_many_arguments)]
    fn tree(
        &self,
        inputs: &[NttCiphertext],
        first: usize,
        last: usize,
        offset: usize,
        step: usize,
        width: usize,
        key: &PreparedEvaluationKey,
        opts: EvalOptions,
    ) -> NttCiphertext {
        self.subtree(inputs, first, last, offset, step, width, key, opts)
            .unwrap_or_else(|| {
                let r = inputs.first().map_or(1, |i| i.body.len());
                NttCiphertext {
                    mask: self.ctx.ntt.zero_with(self.primes),
                    body: (0..r)
                        .map(|_| self.ctx.ntt.zero_with(self.primes))
                        .collect(),
                }
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn subtree(
        &self,
        inputs: &[NttCiphertext],
        first: usize,
        last: usize,
        offset: usize,
        step: usize,
        width: usize,
        key: &PreparedEvaluationKey,
        opts: EvalOptions,
    ) -> Option<NttCiphertext> {
        let block = first + offset;
        if block >= last {
            return None;
        }
        if width == 1 {
            return Some(self.product(inputs, block));
        }
        let half = width / 2;
        let (even, odd) = join_maybe_par(
            opts.parallel && width >= 4,
            || self.subtree(inputs, first, last, offset, step * 2, half, key, opts),
            || {
                self.subtree(
                    inputs,
                    first,
                    last,
                    offset + step,
                    step * 2,
                    half,
                    key,
                    opts,
                )
            },
        );
        let even = even?;
        // Leaves hold data on the multiples of `chunk`, a node of width w on those of
        // 2·chunk/w: its children's data sit on the multiples of s = 2·chunk/w, the odd one
        // moves to s/2, and X -> X^(2N/s + 1) clears the rest.
        let n = self.plan.params.poly_size;
        let stride = 2 * self.plan.chunk / width;
        let g = automorphism_for_stride(n, stride);
        let k = stride / 2;
        let ntt = &self.ctx.ntt;
        Some(match odd {
            None => {
                let copy = even.clone();
                self.add_rotated(even, copy, g, key)
            }
            Some(mut odd) => {
                // t = X^k·odd, then (u, v) = (even + t, even − t) in one pass.
                let mut u = even;
                let mono = &self.ctx.monomials[&k];
                ntt.mul_assign_normalize(&mut odd.mask, mono);
                ntt.butterfly(&mut u.mask, &mut odd.mask);
                for (ub, ob) in u.body.iter_mut().zip(odd.body.iter_mut()) {
                    ntt.mul_assign_normalize(ob, mono);
                    ntt.butterfly(ub, ob);
                }
                self.add_rotated(u, odd, g, key)
            }
        })
    }

    /// `u + KeySwitch(τ_g(v))`: the one non-linear step. The body's automorphism is a slot
    /// permutation added in the NTT domain; the mask goes back to coefficients once (the
    /// automorphism is applied there, on one vector instead of one per prime), is decomposed,
    /// and its digits are multiplied with the key in the NTT domain, reusing `v`'s buffers.
    fn add_rotated(
        &self,
        u: NttCiphertext,
        v: NttCiphertext,
        g: usize,
        key: &PreparedEvaluationKey,
    ) -> NttCiphertext {
        key_switch_add(&self.ctx, u, v, g, key)
    }

    /// Back to coefficients, modulus-switch, keep the full (shared) mask and the output slots
    /// of the `rows` batch rows present (row-major over the block's bodies), nothing else.
    fn finish(&self, mut ct: NttCiphertext, index: usize, rows: usize) -> OutputCiphertext {
        let plan = &self.plan;
        let n = plan.params.poly_size;
        let ntt = &self.ctx.ntt;
        let mut a = vec![0u64; n];
        ntt.inv(&mut ct.mask, &mut a);
        let bs: Vec<Vec<u64>> = ct
            .body
            .iter_mut()
            .map(|f| {
                let mut b = vec![0u64; n];
                ntt.inv(f, &mut b);
                b
            })
            .collect();
        let (bits, body_bits) = (plan.download_bits, plan.body_bits);
        let count = plan.outputs_in_ciphertext(index);
        let first = plan.first_output(index);
        let b1 = plan.batch_rows.max(1);
        // Row k of the block is row k mod b₁ of body ⌊k / b₁⌋.
        let body = (0..rows)
            .flat_map(|k| (first..first + count).map(move |j| (k, j)))
            .map(|(k, j)| {
                let v = bs
                    .get(k / b1)
                    .and_then(|b| b.get(plan.output_slot_in_row(k % b1, j).1))
                    .copied()
                    .unwrap_or(0);
                poly::round_to_bits(v, body_bits)
            })
            .collect();
        OutputCiphertext {
            mask: a.iter().map(|&v| poly::round_to_bits(v, bits)).collect(),
            body,
        }
    }
}

/// `u + KeySwitch(τ_g(v))` (see `PreparedLayer::add_rotated`); `key` must cover `g` and carry
/// at least as many bodies as `u` (extra key bodies are unused).
pub(crate) fn key_switch_add(
    ctx: &Context,
    mut u: NttCiphertext,
    v: NttCiphertext,
    g: usize,
    key: &PreparedEvaluationKey,
) -> NttCiphertext {
    let ntt = &ctx.ntt;
    let p = ctx.params();
    let n = p.poly_size;
    for (ub, vb) in u.body.iter_mut().zip(&v.body) {
        ntt.add_automorphism(g, vb, ub);
    }
    let NttCiphertext {
        mask: mut scratch,
        body: _,
    } = v;
    // Callers check that the key covers g (eval() for every automorphism of the plan).
    let Some(levels) = key.levels.get(&g) else {
        unreachable!("key switch without a key for automorphism {g}")
    };
    KS_SCRATCH.with(|cell| {
        // Per-thread buffers, overwritten in full below: no allocation or zeroing per key switch.
        let mut buffers = cell.borrow_mut();
        let KsScratch { a, ta, digits } = &mut *buffers;
        a.resize(n, 0);
        ta.resize(n, 0);
        digits.resize(p.ks_levels as usize, Vec::new());
        digits.iter_mut().for_each(|d| d.resize(n, 0));
        ntt.inv(&mut scratch, a);
        poly::automorphism_into(a, g, ta);
        crate::ntt::vectorized(
            #[inline(always)]
            || poly::decompose(ta, p.ks_base_log, p.ks_levels, digits),
        );
        // One decomposition and one forward transform per digit, shared by every body: the
        // level's mask is shared, body i accumulates with its own key body (TDM-PAR-HE-1).
        for (digit, (neg_a, neg_b)) in digits.iter().zip(levels) {
            ntt.fwd_small(digit, &mut scratch);
            ntt.mul_acc(&mut u.mask, &scratch, neg_a);
            for (ub, kb) in u.body.iter_mut().zip(neg_b) {
                ntt.mul_acc(ub, &scratch, kb);
            }
        }
    });
    u
}

/// Coefficient-domain buffers of one key switch (the mask, its automorphism, the digits).
#[derive(Default)]
struct KsScratch {
    a: Vec<u64>,
    ta: Vec<u64>,
    digits: Vec<Vec<i64>>,
}

thread_local! {
    static KS_SCRATCH: std::cell::RefCell<KsScratch> = std::cell::RefCell::new(KsScratch::default());
}

fn join_maybe_par<A: Send, B: Send>(
    parallel: bool,
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    #[cfg(feature = "parallel")]
    if parallel {
        return rayon::join(a, b);
    }
    let _ = parallel;
    (a(), b())
}

fn map_maybe_par<T: Send, U: Send>(
    items: Vec<T>,
    parallel: bool,
    f: impl Fn(T) -> U + Sync + Send,
) -> Vec<U> {
    #[cfg(feature = "parallel")]
    if parallel {
        use rayon::prelude::*;
        return items.into_par_iter().map(f).collect();
    }
    let _ = parallel;
    items.into_iter().map(f).collect()
}
