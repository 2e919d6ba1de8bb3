//! Layer plans: block layout, encodings, modulus-switch widths and the failure bound.
//!
//! A plan is public: it depends on the shape, the output mode and a few statistics of the
//! weights (row L1 norms for the message range, block Frobenius norms for the noise), and it
//! tells the device everything it needs to encrypt inputs and decode outputs.
//!
//! Layout (Cheetah's matrix-multiplication packing). The batch is cut into blocks of
//! b₁ = `batch_rows` input rows and each row into chunks of n₁ = `chunk` values; one input
//! polynomial carries a block's chunk, row k's value i at X^{k·n₁·m₁ + i}. Output block o holds
//! m₁ = `rows()` = ⌊N/(n₁·b₁)⌋ weight rows; its weight polynomial for chunk c is
//! Σ_j Σ_i w_{o·m₁+j, c·n₁+i} X^{j·n₁ − i} (negacyclic). In the product, coefficient
//! n₁·(k·m₁ + j) is exactly the dot product of batch row k with weight row j over the chunk,
//! and no cross term lands there: a cross term's exponent differs from it by
//! (k'−k)·n₁·m₁ + (j'−j)·n₁ + (i'−i) with |i'−i| < n₁, never 0 mod 2N unless k'=k, j'=j, i'=i
//! (b₁·n₁·m₁ ≤ N). The outputs of a product sit on the multiples of n₁, so packing (a tree
//! over n₁ products) fills every coefficient of a download ciphertext with outputs of all the
//! block's rows. b₁ = 1 is the row-by-row layout of format v1.
//!
//! Noise model (all variances in absolute units modulo 2^64; see `specs/parameters.md`):
//! fresh noise, body rounding on upload, the weights' convolution with the input noise, key
//! switching (gadget digits times key noise, plus the decomposition's rounding times the
//! secret) and the download rounding. Each term is a sum of independent bounded (hence
//! sub-Gaussian) variables whose variance proxy is bounded by the variance used here, with
//! digits bounded by their maximum (B/2)² rather than their variance. The failure bound is the
//! sub-Gaussian tail 2·exp(−t²/2V) at t = Δ_out/2.

//!
//! Submodules: `bounds` (output mode, weight statistics and bounds) and `cost` (the batch
//! planner's public cost model and chunk search).

mod bounds;
mod cost;

pub use bounds::{OutputMode, WeightBounds, WeightStats};
pub(crate) use cost::{default_chunk, plan_first_fitting};
pub use cost::{
    plan_cost, plan_cost_on, CostModel, LinkModel, COST_BODY_TRANSFORM_MS, COST_BYTE_MS,
    COST_CT_PRODUCT_MS, COST_CT_TRANSFORM_MS, COST_KEY_SWITCH_BODY_MS, COST_KEY_SWITCH_MS,
};

use crate::error::HeError;
use crate::params::ParameterSet;

/// Everything both sides need to agree on for one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerPlan {
    /// Parameter set.
    pub params: ParameterSet,
    /// Output mode.
    pub mode: OutputMode,
    /// Input length.
    pub n_in: usize,
    /// Output length.
    pub n_out: usize,
    /// Inputs satisfy |x| ≤ this.
    pub max_abs_input: u64,
    /// Input values per chunk (a power of two ≤ N).
    pub chunk: usize,
    /// Batch rows carried by one input polynomial (b₁ ≥ 1; 1 = one row per polynomial).
    pub batch_rows: usize,
    /// Bodies per ciphertext, r ≥ 1 (TDM-PAR-HE-1, TDM-PAR-HE-3): r independent secrets share
    /// one mask (Peikert–Vaikuntanathan–Waters packed Regev), so a batch block of r·b₁ rows
    /// travels as one mask and r bodies of b₁ rows each. 1 = one secret (the v1 format).
    pub bodies: usize,
    /// log2 of the input scaling factor Δ_in.
    pub delta_in_log2: u32,
    /// log2 of the output scaling factor (Δ_in times the packing factor).
    pub delta_out_log2: u32,
    /// Bits kept of each uploaded body coefficient.
    pub upload_bits: u32,
    /// Bits kept of each downloaded mask coefficient (b_mask).
    pub download_bits: u32,
    /// Bits kept of each downloaded body coefficient (b_body ≤ `download_bits` in practice:
    /// the body's rounding adds its variance once, the mask's N times; TDM-PAR-HE-1).
    pub body_bits: u32,
    /// log2 of the per-output failure probability bound.
    pub log2_p_fail: f64,
    /// Packed mode: levels L of every packing tree hoisted to the inputs (0 = none; see
    /// [`LayerPlan::key_switches`] and `specs/parameters.md` § "Hoisted packing levels"). A
    /// server-side evaluation order: the wire is the same for every L, only the key-switch
    /// count and the noise differ. [`LayerPlan::new`] chooses it (parameter set 2 only).
    pub hoisted_levels: u32,
    /// Packed mode: the largest first stride level l₀ of a packing key this plan accepts
    /// (its failure bound counts the composed strides of such a key: a key starting at l₀
    /// holds the automorphisms of strides 2^l for l ≥ l₀ only and applies the smaller ones as
    /// 2^(l₀ − l) key switches under its first, [`crate::keys::max_key_first_level`],
    /// `specs/parameters.md` § "Smaller keys"). 1 = only full keys (parameter set 1). Which
    /// l₀ ≤ this a device's key actually starts at is the device's choice
    /// ([`crate::Client::evaluation_key_for_plans`]: the smallest whose key fits
    /// [`MAX_PLAN_KEY_BYTES`]); [`LayerPlan::key_first_level_alone`] is the one this plan
    /// alone would get, which its key-switch count and [`LayerPlan::eval_key_bytes`] assume.
    pub key_first_level: u32,
}

/// The evaluation-key budget (bytes, the issue-9 goal): under parameter set 2 a device's key
/// starts at the smallest stride level (up to what its plans accept) that keeps it within this
/// size ([`LayerPlan::key_first_level`]), and the batch planner prefers plans whose key fits.
pub const MAX_PLAN_KEY_BYTES: usize = 1_000_000;

/// Options a caller (e.g. the planner) may set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PlanOptions {
    /// Force the input chunk size (power of two ≤ N); otherwise chosen by mode (or, with
    /// `batch`, by the cost model).
    pub chunk: Option<usize>,
    /// Rows a request is expected to carry (public). `None` or `Some(1)` plans one row per
    /// input polynomial (the v1 layout); a larger batch places ⌈batch⌉ ≤ N/chunk rows in one
    /// polynomial (Cheetah's matrix layout) and picks the chunk from [`plan_cost`].
    pub batch: Option<usize>,
    /// Largest number of bodies per ciphertext the planner may choose (a power of two is
    /// searched up to it, at most [`crate::limits::MAX_BODIES`]); 0 or 1 = one secret.
    pub max_bodies: usize,
}

/// Bits that must remain for a signed range [−y, y] times a power-of-two Δ within 2^64.
fn delta_out_log2_for(max_abs_output: u64) -> Option<u32> {
    // Need (2y+1)·Δ ≤ 2^64.
    let span = 2u128 * max_abs_output as u128 + 1;
    let mut d = 0u32;
    while d < 63 && span << (d + 1) <= 1u128 << 64 {
        d += 1;
    }
    if span << d <= 1u128 << 64 {
        Some(d)
    } else {
        None
    }
}

impl LayerPlan {
    /// Checks the plan's layout fields are consistent before anything indexes polynomials
    /// with them: `chunk` a power of two ≤ N, `chunk · batch_rows` ≤ N (a block's rows fit one
    /// polynomial), `bodies` ≤ [`crate::limits::MAX_BODIES`], non-empty shapes, bit widths in
    /// `1..=64`, Δ_in ≤ Δ_out < 2^64 and (packed mode) `hoisted_levels` at most the packing
    /// tree's depth and 0 outside parameter set 2. Plans from this crate's planner always
    /// pass; a plan built or edited by hand (the fields are public) gets a typed error instead
    /// of an index out of bounds or an evaluation outside its bounds.
    ///
    /// # Errors
    /// [`HeError::Shape`] naming the first inconsistent field.
    pub fn check_layout(&self) -> Result<(), HeError> {
        let n = self.params.poly_size;
        let bad = |what: String| Err(HeError::Shape(format!("layer plan: {what}")));
        if !self.chunk.is_power_of_two() || self.chunk > n {
            return bad(format!("chunk {} (a power of two <= N = {n})", self.chunk));
        }
        if self.chunk.saturating_mul(self.batch_rows.max(1)) > n {
            return bad(format!(
                "chunk {} x batch_rows {} exceeds N = {n}",
                self.chunk, self.batch_rows
            ));
        }
        if self.bodies > crate::limits::MAX_BODIES {
            return bad(format!(
                "{} bodies per mask (1..={})",
                self.bodies,
                crate::limits::MAX_BODIES
            ));
        }
        if self.n_in == 0 || self.n_out == 0 {
            return bad(format!("shape {}x{}", self.n_out, self.n_in));
        }
        for (name, bits) in [
            ("upload_bits", self.upload_bits),
            ("download_bits", self.download_bits),
            ("body_bits", self.body_bits),
        ] {
            if !(1..=64).contains(&bits) {
                return bad(format!("{name} = {bits} (1..=64)"));
            }
        }
        if self.mode == OutputMode::Packed
            && self.hoisted_levels > self.leaves_per_group().trailing_zeros()
        {
            return bad(format!(
                "hoisted_levels {} above the tree's {} levels",
                self.hoisted_levels,
                self.leaves_per_group().trailing_zeros()
            ));
        }
        // Set 1 computes exact integers over the CRT primes and reduces modulo 2^64 only at
        // the end; a hoisted input is a key-switch output (up to ks_levels·N·2^(ks_base_log−1)
        // ·2^64 before reduction) that the weights then multiply, beyond the range
        // TDM-PAR-HE-4 bounds. Only parameter set 2 (arithmetic modulo Q) hoists.
        if self.mode == OutputMode::Packed
            && self.hoisted_levels > 0
            && self.params.modulus != crate::params::Modulus::Rns3
        {
            return bad(format!(
                "hoisted_levels {} under parameter set {} (only parameter set 2 hoists packing \
                 levels; use hoisted_levels = 0)",
                self.hoisted_levels, self.params.id
            ));
        }
        // Set 1 accepts full keys only; set 2 any first level whose smaller strides compose.
        let first_max = match self.params.modulus {
            crate::params::Modulus::Rns3 => crate::keys::max_key_first_level(n),
            crate::params::Modulus::Pow2_64 => 1,
        };
        if self.mode == OutputMode::Packed && !(1..=first_max).contains(&self.key_first_level) {
            return bad(format!(
                "key_first_level {} (1..={first_max} under parameter set {})",
                self.key_first_level, self.params.id
            ));
        }
        if self.delta_out_log2 >= 64 || self.delta_in_log2 > self.delta_out_log2 {
            return bad(format!(
                "delta_in_log2 {} / delta_out_log2 {} (delta_in <= delta_out < 2^64)",
                self.delta_in_log2, self.delta_out_log2
            ));
        }
        Ok(())
    }

    /// Number of input chunks.
    pub fn in_chunks(&self) -> usize {
        self.n_in.div_ceil(self.chunk)
    }
    /// Weight rows per weight polynomial (outputs per batch row per product ciphertext): m₁.
    pub fn rows(&self) -> usize {
        (self.params.poly_size / self.chunk / self.batch_rows.max(1)).max(1)
    }
    /// Coefficient offset between consecutive batch rows of a block: n₁·m₁.
    pub fn row_offset(&self) -> usize {
        self.chunk * self.rows()
    }
    /// Bodies per ciphertext, r (at least 1).
    pub fn bodies(&self) -> usize {
        self.bodies.max(1)
    }
    /// Batch rows of one batch block: r·b₁ (body i carries the block's rows i·b₁ .. (i+1)·b₁).
    pub fn block_rows(&self) -> usize {
        self.batch_rows.max(1) * self.bodies()
    }
    /// Number of batch blocks for `batch` input rows (each one shared mask per ciphertext).
    pub fn batch_blocks(&self, batch: usize) -> usize {
        batch.div_ceil(self.block_rows())
    }
    /// Rows present in batch block `block` of a `batch`-row request.
    pub fn rows_in_block(&self, batch: usize, block: usize) -> usize {
        let rows = self.block_rows();
        rows.min(batch.saturating_sub(block * rows))
    }
    /// Bodies present in batch block `block` of a `batch`-row request: a short last block
    /// carries only the bodies its rows need (public: derived from `batch`).
    pub fn bodies_in_block(&self, batch: usize, block: usize) -> usize {
        self.rows_in_block(batch, block)
            .div_ceil(self.batch_rows.max(1))
    }
    /// Uploaded body polynomials per input chunk for `batch` rows: ⌈batch / b₁⌉ (the same
    /// for every r: masks are seeded, bodies are what travels).
    pub fn input_bodies(&self, batch: usize) -> usize {
        batch.div_ceil(self.batch_rows.max(1))
    }
    /// Number of output blocks (product ciphertexts).
    pub fn out_blocks(&self) -> usize {
        self.n_out.div_ceil(self.rows())
    }
    /// Packed mode: blocks per output ciphertext (at most `chunk`, so slots never collide).
    pub fn blocks_per_group(&self) -> usize {
        self.out_blocks().min(self.chunk)
    }
    /// Packed mode: leaves per tree, padded to a power of two.
    pub fn leaves_per_group(&self) -> usize {
        self.blocks_per_group().next_power_of_two()
    }
    /// Number of returned ciphertexts.
    pub fn out_ciphertexts(&self) -> usize {
        match self.mode {
            OutputMode::NoKey => self.out_blocks(),
            OutputMode::Packed => self.out_blocks().div_ceil(self.blocks_per_group()),
        }
    }
    /// Key switches the server performs for a request of `batch` rows: each one decomposes a
    /// shared mask once and accumulates it into every body of its batch block (see
    /// [`LayerPlan::key_switch_bodies_for`]).
    pub fn key_switches_for(&self, batch: usize) -> usize {
        self.key_switches() * self.batch_blocks(batch)
    }
    /// Body accumulations over all key switches of a `batch`-row request (Σ over batch blocks
    /// of key switches × bodies present; equal to [`LayerPlan::key_switches_for`] when r = 1).
    pub fn key_switch_bodies_for(&self, batch: usize) -> usize {
        self.key_switches() * self.body_blocks_sum(batch)
    }
    /// Ciphertext × plaintext products the server performs for a request of `batch` rows (one
    /// per batch block, input chunk and output block; each multiplies the shared mask and
    /// every body present by the same weight polynomial).
    pub fn ct_products_for(&self, batch: usize) -> usize {
        self.batch_blocks(batch) * self.in_chunks() * self.products_per_chunk()
    }
    /// Polynomial × weight products behind [`LayerPlan::ct_products_for`]: 1 + r per
    /// ciphertext product with r bodies present (2 per product when r = 1).
    pub fn poly_products_for(&self, batch: usize) -> usize {
        (self.batch_blocks(batch) + self.body_blocks_sum(batch))
            * self.in_chunks()
            * self.products_per_chunk()
    }
    /// Σ over the batch blocks of a `batch`-row request of the bodies present.
    pub(crate) fn body_blocks_sum(&self, batch: usize) -> usize {
        (0..self.batch_blocks(batch))
            .map(|b| self.bodies_in_block(batch, b))
            .sum()
    }
    /// Key switches the server performs per batch block (packed mode; one row when
    /// `batch_rows` is 1): per returned ciphertext, the tree above the hoisted levels
    /// (leaves/2^L − 1 nodes) and the partial trace; per input chunk, the 2^L − 1 key switches
    /// of the hoisted inputs ([`LayerPlan::hoisted_levels`]).
    pub fn key_switches(&self) -> usize {
        match self.mode {
            OutputMode::NoKey => 0,
            OutputMode::Packed => self.key_switches_hoisting(self.hoisted_levels()),
        }
    }

    /// Key switches per batch block with `levels` hoisted levels (see
    /// [`LayerPlan::key_switches`]); a level of stride 2^l below the key's first level l₀
    /// costs 2^(l₀ − l) key switches per node.
    fn key_switches_hoisting(&self, levels: u32) -> usize {
        let t = self.chunk.trailing_zeros();
        let leaves = self.leaves_per_group();
        let ll = leaves.trailing_zeros();
        let first = self.key_first_level_alone();
        let m = |i: u32| Self::composition(first, t + 1 - i);
        let tree: usize = (levels + 1..=ll)
            .map(|i| (leaves >> i) * m(i))
            .sum::<usize>()
            + (ll + 1..=t).map(m).sum::<usize>();
        let hoisted: usize = (1..=levels).map(|i| (1usize << (i - 1)) * m(i)).sum();
        tree * self.out_ciphertexts() + hoisted * self.in_chunks()
    }

    /// Key switches one automorphism of stride 2^l takes under a key starting at `first`: 1
    /// from l = first up, 2^(first − l) below it.
    fn composition(first: u32, l: u32) -> usize {
        // check_layout bounds the first level by 6; the clamp keeps a hand-built plan's
        // estimates finite without it.
        1usize << first.clamp(1, 16).saturating_sub(l)
    }

    /// The first stride level of the key this plan alone would get (packed mode): the smallest
    /// l₀ ≤ [`LayerPlan::key_first_level`] whose key fits [`MAX_PLAN_KEY_BYTES`], else
    /// `key_first_level` (the smallest key it accepts).
    pub fn key_first_level_alone(&self) -> u32 {
        let top = self.key_first_level.clamp(1, 16);
        (1..=top)
            .find(|&l| self.key_bytes_from(l) <= MAX_PLAN_KEY_BYTES)
            .unwrap_or(top)
    }

    /// Wire bytes of a key for this plan's chunk and bodies starting at stride level `first`
    /// (at least one automorphism).
    fn key_bytes_from(&self, first: u32) -> usize {
        let top = self.chunk.trailing_zeros();
        crate::wire::eval_key_len(
            &self.params,
            (top + 1).saturating_sub(first.max(1)).max(1) as usize,
            self.bodies(),
        )
    }

    /// The order [`LayerPlan::new`] tries hoisting levels in for parameter set 2: every L in
    /// 0..=log2(leaves), fewest key switches per batch block first (ties to the smaller L).
    /// Each uploaded ciphertext is key switched once per element of the group the bottom L
    /// levels' automorphisms generate (2^L − 1 key switches per input chunk and batch block)
    /// and every tree node of width 2^L becomes 2^L plain products with weights combined at
    /// preparation, so key switches cost in_chunks·(2^L − 1) + K·(leaves/2^L − 1) per batch
    /// block (K returned ciphertexts; more below the key's first level). Set 1 (key-switch
    /// noise 2^48.4, too large to be multiplied by the weights) and no-key plans: [0].
    fn hoisting_candidates(&self) -> Vec<u32> {
        if self.mode != OutputMode::Packed
            || self.params.modulus != crate::params::Modulus::Rns3
            || self.leaves_per_group() < 2
        {
            return vec![0];
        }
        let mut c: Vec<u32> = (0..=self.leaves_per_group().trailing_zeros()).collect();
        c.sort_by_key(|&l| (self.key_switches_hoisting(l), l));
        c
    }

    /// This plan with the first hoisting candidate ([`LayerPlan::hoisting_candidates`], L = 0
    /// among them) whose noise meets the bound `limit` (log2) at the plan's widths, and its
    /// failure bound; `None` if none does.
    fn with_hoisting(self, stats: WeightStats, limit: f64) -> Option<Self> {
        self.hoisting_candidates().into_iter().find_map(|l| {
            let p = Self {
                hoisted_levels: l,
                ..self
            };
            let v = p.pre_switch_variance(stats, p.upload_bits);
            let f = log2_fail(
                p.download_variance(v, p.download_bits, p.body_bits),
                p.delta_out_log2,
            );
            (f <= limit).then_some(Self {
                log2_p_fail: f,
                ..p
            })
        })
    }

    /// Packed mode: the hoisted levels L (the plan's [`LayerPlan::hoisted_levels`], 0 in
    /// no-key mode).
    pub fn hoisted_levels(&self) -> u32 {
        match self.mode {
            OutputMode::NoKey => 0,
            // check_layout refuses more than the tree's depth; estimates on a hand-built plan
            // stay within it.
            OutputMode::Packed => self
                .hoisted_levels
                .min(self.leaves_per_group().trailing_zeros()),
        }
    }

    /// Ciphertext products per batch block: per input chunk, every leaf of every packing tree
    /// (no-key mode: every output block); with L hoisted levels, 2^L per present node of
    /// width 2^L (a node of a short last group still multiplies all 2^L hoisted inputs).
    fn products_per_chunk(&self) -> usize {
        let levels = self.hoisted_levels();
        if levels == 0 {
            return self.out_blocks();
        }
        let (per_group, blocks) = (self.blocks_per_group(), self.out_blocks());
        let step = self.leaves_per_group() >> levels;
        (0..blocks)
            .step_by(per_group)
            .map(|first| step.min(blocks - first) << levels)
            .sum()
    }
    /// Coefficient position of output `j` of the block's row `k`; `(ct, position)`.
    pub fn output_slot_in_row(&self, k: usize, j: usize) -> (usize, usize) {
        let (ct, pos) = self.output_slot(j);
        (ct, pos + k * self.row_offset())
    }
    /// Coefficient position of output `j` (first row of a block) inside returned ciphertext
    /// `ct`; `(ct, position)`.
    pub fn output_slot(&self, j: usize) -> (usize, usize) {
        let rows = self.rows();
        let (block, r) = (j / rows, j % rows);
        match self.mode {
            OutputMode::NoKey => (block, r * self.chunk),
            OutputMode::Packed => {
                let per = self.blocks_per_group();
                let (group, leaf) = (block / per, block % per);
                let stride = self.chunk / self.leaves_per_group();
                (group, r * self.chunk + leaf * stride)
            }
        }
    }
    /// Outputs carried by each returned ciphertext (the last one may carry fewer).
    pub fn outputs_per_ciphertext(&self) -> usize {
        match self.mode {
            OutputMode::NoKey => self.rows(),
            OutputMode::Packed => self.rows() * self.blocks_per_group(),
        }
    }
    /// Index of the first output carried by ciphertext `ct`.
    pub fn first_output(&self, ct: usize) -> usize {
        ct * self.outputs_per_ciphertext()
    }
    /// Number of outputs per batch row returned in ciphertext `ct` (the body carries this
    /// many for each row present in the block).
    pub fn outputs_in_ciphertext(&self, ct: usize) -> usize {
        let per_ct = self.outputs_per_ciphertext();
        per_ct.min(self.n_out.saturating_sub(ct * per_ct))
    }
    /// Upload bytes for a batch of `batch` input vectors (wire format, header included).
    pub fn upload_bytes(&self, batch: usize) -> usize {
        crate::wire::input_len(self, batch)
    }
    /// Download bytes for a batch of `batch` results (wire format, header included).
    pub fn download_bytes(&self, batch: usize) -> usize {
        crate::wire::output_len(self, batch)
    }
    /// Evaluation-key bytes this plan needs (0 in no-key mode).
    pub fn eval_key_bytes(&self) -> usize {
        match self.mode {
            OutputMode::NoKey => 0,
            OutputMode::Packed => self.key_bytes_from(self.key_first_level_alone()),
        }
    }

    /// Plans a layer; refuses it if no widths meet the parameter set's failure bound.
    pub fn new(
        params: ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_input: u64,
        stats: WeightStats,
        opts: PlanOptions,
    ) -> Result<Self, HeError> {
        let n = params.poly_size;
        if n_in == 0 || n_out == 0 {
            return Err(HeError::Shape("empty layer".into()));
        }
        if n_in > crate::limits::MAX_LAYER_DIM || n_out > crate::limits::MAX_LAYER_DIM {
            return Err(HeError::Shape(format!(
                "layer {n_in}x{n_out} exceeds {} per side",
                crate::limits::MAX_LAYER_DIM
            )));
        }
        let batch = opts.batch.unwrap_or(1);
        if batch == 0 || batch > crate::limits::MAX_BATCH {
            return Err(HeError::Shape(format!(
                "batch of {batch} (1..={})",
                crate::limits::MAX_BATCH
            )));
        }
        if opts.max_bodies > crate::limits::MAX_BODIES {
            return Err(HeError::Shape(format!(
                "max_bodies {} (0..={})",
                opts.max_bodies,
                crate::limits::MAX_BODIES
            )));
        }
        let chunk = match opts.chunk {
            Some(c) if c.is_power_of_two() && c >= 2 && c <= n => c,
            Some(c) => {
                return Err(HeError::Shape(format!(
                    "chunk {c} must be a power of two in 2..={n}"
                )))
            }
            None => default_chunk(n, mode, n_in, n_out),
        };
        let max_out = stats
            .max_row_l1
            .checked_mul(max_abs_input)
            .and_then(|v| v.checked_add(stats.max_abs_bias))
            .ok_or_else(|| HeError::OutOfRange("output range overflows".into()))?;
        let delta_out_log2 = delta_out_log2_for(max_out).ok_or_else(|| {
            HeError::OutOfRange(format!("outputs up to {max_out} do not fit modulo 2^64"))
        })?;
        let pack_log2 = match mode {
            OutputMode::NoKey => 0,
            OutputMode::Packed => chunk.trailing_zeros(),
        };
        let delta_in_log2 = delta_out_log2
            .checked_sub(pack_log2)
            .ok_or_else(|| HeError::OutOfRange("no room for the packing factor".into()))?;
        // b₁ rows per polynomial; r bodies (a power of two ≤ max_bodies) with r·b₁ ≤ batch.
        let batch_rows = batch.min(n / chunk).max(1);
        let mut bodies = 1;
        while bodies * 2 <= opts.max_bodies && bodies * 2 * batch_rows <= batch {
            bodies *= 2;
        }
        let mut plan = Self {
            params,
            mode,
            n_in,
            n_out,
            max_abs_input,
            chunk,
            batch_rows,
            bodies,
            delta_in_log2,
            delta_out_log2,
            upload_bits: 64,
            download_bits: 64,
            body_bits: 64,
            log2_p_fail: 0.0,
            hoisted_levels: 0,
            key_first_level: 1,
        };
        let limit = -(params.max_fail_log2 as f64);
        // Narrowest upload that leaves 4 bits of failure margin for the download switch.
        plan.upload_bits = (8..=64)
            .find(|&b| {
                let v = plan.pre_switch_variance(stats, b);
                log2_fail(v, plan.delta_out_log2) <= limit - 4.0
            })
            .ok_or(HeError::FailureBoundExceeded {
                log2_p_fail: log2_fail(plan.pre_switch_variance(stats, 64), plan.delta_out_log2),
                limit: params.max_fail_log2,
            })?;
        let v_pre = plan.pre_switch_variance(stats, plan.upload_bits);
        // Mask and body widths: the pair meeting the bound with the fewest bits per full
        // batch block (its K·N mask coefficients and b₁·n_out bodies), ties to the narrower
        // mask.
        let masks = (plan.out_ciphertexts() * n) as u64;
        let bodies = (plan.block_rows() * n_out) as u64;
        let mut best: Option<(u64, u32, u32)> = None;
        for bm in 8..=64u32 {
            let Some(bb) = (8..=64u32).find(|&bb| {
                log2_fail(plan.download_variance(v_pre, bm, bb), plan.delta_out_log2) <= limit
            }) else {
                continue;
            };
            let cost = masks * u64::from(bm) + bodies * u64::from(bb);
            if best.is_none_or(|(c, _, _)| cost < c) {
                best = Some((cost, bm, bb));
            }
        }
        (plan.download_bits, plan.body_bits) = best.map_or((64, 64), |(_, bm, bb)| (bm, bb));
        plan.log2_p_fail = log2_fail(
            plan.download_variance(v_pre, plan.download_bits, plan.body_bits),
            plan.delta_out_log2,
        );
        if plan.log2_p_fail > limit {
            return Err(HeError::FailureBoundExceeded {
                log2_p_fail: plan.log2_p_fail,
                limit: params.max_fail_log2,
            });
        }
        // Set 2: the largest key first level (smallest keys) and the hoisting depth (fewest
        // key switches) whose added noise still meets the bound at the widths chosen above,
        // so neither changes a byte on the wire. The composed strides' noise is small (the
        // top of the tree), so the first try nearly always fits.
        if params.modulus == crate::params::Modulus::Rns3 && mode == OutputMode::Packed {
            let base = plan;
            for first in (1..=crate::keys::max_key_first_level(n)).rev() {
                let c = Self {
                    key_first_level: first,
                    ..base
                };
                if let Some(h) = c.with_hoisting(stats, limit) {
                    plan = h;
                    break;
                }
            }
        }
        Ok(plan)
    }

    /// Variance bound of one key switch's added noise: digits counted at their maximum
    /// (B/2)² and the secret at full weight N.
    ///
    /// Parameter set 2 (`Modulus::Rns3`), in the same 2^64 units: digits |d_j| ≤ p_j/2 < 2^29
    /// (`ks_base_log` = 30 bounds (B/2)² by 2^58) times key noise, plus the rounded-away residue
    /// modulo p_2 (< 2^30) times the secret, all computed modulo Q and scaled by (2^64/Q)².
    pub fn key_switch_variance(&self) -> f64 {
        let half_base = 2f64.powi(self.params.ks_base_log as i32 - 1);
        self.key_switch_variance_with(half_base * half_base, self.params.poly_size as f64)
    }

    /// (2^64/Q)² for parameter set 2 (1 for set 1): the factor that turns a variance modulo Q
    /// into 2^64 units.
    fn q_scale_sq(&self) -> f64 {
        match self.params.modulus {
            crate::params::Modulus::Pow2_64 => 1.0,
            crate::params::Modulus::Rns3 => (2.0 * (64.0 - self.params.key_modulus_log2())).exp2(),
        }
    }

    /// Variance (2^64 units) of the 2^64 ↔ Q conversions of set 2 per ciphertext: a rounding
    /// of ≤ 1/2 per coefficient of the mask (times a secret of weight `key_weight`) and of the
    /// body; 0 for set 1.
    fn conversion_variance(&self, key_weight: f64) -> f64 {
        match self.params.modulus {
            crate::params::Modulus::Pow2_64 => 0.0,
            crate::params::Modulus::Rns3 => (key_weight + 1.0) / 12.0,
        }
    }

    fn key_switch_variance_with(&self, digit_sq: f64, key_weight: f64) -> f64 {
        let p = &self.params;
        if p.modulus == crate::params::Modulus::Rns3 {
            let dropped = 2f64.powi(p.ks_base_log as i32);
            return self.q_scale_sq()
                * (p.ks_levels as f64 * p.poly_size as f64 * digit_sq * p.fresh_noise_variance()
                    + key_weight * dropped * dropped / 12.0);
        }
        let dropped = 2f64.powi(64 - (p.ks_base_log * p.ks_levels) as i32);
        p.ks_levels as f64 * p.poly_size as f64 * digit_sq * p.fresh_noise_variance()
            + key_weight * dropped * dropped / 12.0
    }

    /// Output noise variance bound before the download switch, for a given upload width.
    pub fn pre_switch_variance(&self, stats: WeightStats, upload_bits: u32) -> f64 {
        self.pre_switch_with(
            stats.max_block_sq_norm,
            upload_bits,
            self.key_switch_variance(),
        )
    }

    fn pre_switch_with(&self, block_sq_norm: f64, upload_bits: u32, v_ks: f64) -> f64 {
        let rounding = if upload_bits >= 64 {
            0.0
        } else {
            2f64.powi(2 * (64 - upload_bits as i32)) / 12.0
        };
        // Set 2: the server's scaling to Q adds a rounding of ≤ 1/2 (Q units) per mask and body
        // coefficient, (2^64/Q)² smaller in 2^64 units.
        let v_in = self.params.fresh_noise_variance()
            + rounding
            + self.q_scale_sq() * self.conversion_variance(self.params.poly_size as f64);
        match self.mode {
            OutputMode::NoKey => block_sq_norm * v_in,
            OutputMode::Packed => {
                // Tree levels double the noise's deviation (4 in variance) per level: f =
                // chunk² over all of them. With L levels hoisted, each hoisted input carries
                // ≤ L key switches' noise, multiplied by the weights like the input's own; the
                // remaining log2(chunk) − L levels add one key switch each.
                // A stride below the key's first level adds 2^(l₀ − l) key switches' noise.
                let f = (self.chunk as f64).powi(2);
                let t = self.chunk.trailing_zeros();
                let m = |i: u32| Self::composition(self.key_first_level, t + 1 - i) as f64;
                let l = self.hoisted_levels();
                let hoisted: f64 = (1..=l).map(m).sum();
                let tree: f64 = (l + 1..=t).map(|i| m(i) * 4f64.powi((t - i) as i32)).sum();
                f * block_sq_norm * (v_in + hoisted * v_ks) + v_ks * tree
            }
        }
    }

    /// Output variance bound after switching the mask to `mask_bits` and the body to
    /// `body_bits` (64-bit units): the mask's rounding error times a binary secret of weight
    /// ≤ N, (N·2^(2(64−b_mask)))/12, plus the body's own rounding, 2^(2(64−b_body))/12.
    pub fn download_variance(&self, v_pre: f64, mask_bits: u32, body_bits: u32) -> f64 {
        self.download_with(v_pre, mask_bits, body_bits, self.params.poly_size as f64)
    }

    fn download_with(&self, v_pre: f64, mask_bits: u32, body_bits: u32, key_weight: f64) -> f64 {
        let rounding = |bits: u32| {
            if bits >= 64 {
                0.0
            } else {
                2f64.powi(2 * (64 - bits as i32)) / 12.0
            }
        };
        v_pre
            + key_weight * rounding(mask_bits)
            + rounding(body_bits)
            + self.conversion_variance(key_weight)
    }

    /// Average-case prediction of the decrypted output's noise variance (not a bound): digits
    /// at their variance B²/12 and a secret of Hamming weight `key_weight` (≈ N/2), for an
    /// output block whose squared weight norm is `block_sq_norm`. Tests compare measured noise
    /// with it.
    pub fn expected_variance(&self, block_sq_norm: f64, key_weight: f64) -> f64 {
        let base = 2f64.powi(self.params.ks_base_log as i32);
        let v_ks = self.key_switch_variance_with(base * base / 12.0, key_weight);
        let v_pre = self.pre_switch_with(block_sq_norm, self.upload_bits, v_ks);
        self.download_with(v_pre, self.download_bits, self.body_bits, key_weight)
    }
}

/// log2 of the sub-Gaussian tail bound 2·exp(−t²/2V) at t = Δ/2.
pub fn log2_fail(variance: f64, delta_log2: u32) -> f64 {
    let t = 2f64.powi(delta_log2 as i32 - 1);
    if variance <= 0.0 {
        return f64::NEG_INFINITY;
    }
    1.0 - t * t / (2.0 * variance) * std::f64::consts::LOG2_E
}

#[cfg(test)]
mod tests;
