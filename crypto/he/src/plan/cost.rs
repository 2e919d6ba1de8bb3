//! The public cost model of the batch planner (TDM-PAR-HE-3): modelled server times, the link
//! model, the cost of a plan and the search over chunk sizes and body counts that picks it.

use super::{LayerPlan, OutputMode, PlanOptions};
use crate::error::HeError;
use crate::params::ParameterSet;

/// Modelled server time of one key switch (ms, one thread, N = 4096; measured by
/// `cargo bench -p tandem-he` on the reference machine, BENCHMARKS.md). Parameter set 1's
/// figure ([`CostModel::SET1`]; set 2 has its own table, [`CostModel::SET2`]). The key-switch
/// count of [`plan_cost_on`] includes hoisting ([`LayerPlan::hoisted_levels`]) and composed
/// strides ([`LayerPlan::key_first_level`]).
pub const COST_KEY_SWITCH_MS: f64 = 0.40;
/// Modelled time of one ciphertext × plaintext product in the NTT domain (ms). A multi-body
/// product costs (1 + r)/2 of it: `ct_pt_product` 9.73 µs for mask + body against
/// `ct_pt_product/bodies4` 24.3 µs for mask + 4 bodies (4.87 µs per polynomial either way).
pub const COST_CT_PRODUCT_MS: f64 = 0.012;
/// Modelled time to expand and transform one uploaded ciphertext, or to transform back and
/// modulus-switch one returned ciphertext (ms).
pub const COST_CT_TRANSFORM_MS: f64 = 0.09;
/// Modelled time one more body adds to a key switch of a multi-body ciphertext (ms): its
/// automorphism in the NTT domain and L multiply-accumulates with its own key body (the mask's
/// decomposition and forward transforms are shared). Source: `cargo bench -p tandem-he --bench
/// he -- key_switch` (criterion, one thread, 2-core CI machine, 2026-12-01): `key_switch`
/// 131.6 µs, `key_switch/bodies4` 218.2 µs, so one more body is (218.2 − 131.6) / 3 = 28.8 µs
/// = 0.219 of a single key switch; scaled to [`COST_KEY_SWITCH_MS`]: 0.219 × 0.40 = 0.088 ms.
pub const COST_KEY_SWITCH_BODY_MS: f64 = 0.088;
/// Modelled time one more body adds to an uploaded or returned ciphertext (ms): one forward
/// (or inverse) transform and the rounding; the mask's expansion and transform are shared.
/// Source: `cargo bench -p tandem-he --bench he -- ntt/forward` (same run): 32.9 µs per
/// N = 4096 transform over four primes, rounded up to 0.035 ms.
pub const COST_BODY_TRANSFORM_MS: f64 = 0.035;
/// Modelled link of the default [`LinkModel`]: 25 Mbit/s, so one byte costs 8 / 25 000 ms.
pub const COST_BYTE_MS: f64 = 8.0 / 25_000.0;

/// The server-time constants of [`plan_cost_on`] for one parameter set (ms, one thread,
/// N = 4096). Public and fixed per set, so device and cloud derive the same plans.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// One key switch (one body).
    pub key_switch_ms: f64,
    /// One more body of a key switch.
    pub key_switch_body_ms: f64,
    /// One ciphertext × plaintext product (mask and one body).
    pub ct_product_ms: f64,
    /// Expanding and transforming an uploaded ciphertext, or transforming back and
    /// modulus-switching a returned one.
    pub ct_transform_ms: f64,
    /// One more body of an uploaded or returned ciphertext.
    pub body_transform_ms: f64,
}

impl CostModel {
    /// Parameter set 1: the `COST_*` constants above.
    pub const SET1: Self = Self {
        key_switch_ms: COST_KEY_SWITCH_MS,
        key_switch_body_ms: COST_KEY_SWITCH_BODY_MS,
        ct_product_ms: COST_CT_PRODUCT_MS,
        ct_transform_ms: COST_CT_TRANSFORM_MS,
        body_transform_ms: COST_BODY_TRANSFORM_MS,
    };

    /// Parameter set 2 (server modulo Q over three primes). Source: `cargo bench -p tandem-he
    /// --bench he -- "key_switch|ct_pt_product|ntt/"` (criterion, one thread, 2-core CI machine,
    /// 2026-12-01, set 2 the default): `key_switch` 87.8 µs, `key_switch/bodies4` 123.8 µs (one
    /// more body (123.8 − 87.8)/3 = 12.0 µs), `ntt/forward_u64` 63.5 µs (scaling to Q and three
    /// transforms) and `ntt/inverse_u64` 132.1 µs (three inverse transforms and the scaling back)
    /// per polynomial, so an uploaded mask-and-body pair ≈ 0.13 ms and a returned one ≈ 0.27 ms:
    /// 0.2 ms per ciphertext and 0.1 ms per further body. `ct_pt_product` 9.1 µs in the cache,
    /// but a layer's products read their weights from memory (≈ 15 µs per mask-and-body product
    /// measured inside 16×384@384×1536): set 1's 0.012 ms is kept.
    pub const SET2: Self = Self {
        key_switch_ms: 0.088,
        key_switch_body_ms: 0.012,
        ct_product_ms: COST_CT_PRODUCT_MS,
        ct_transform_ms: 0.2,
        body_transform_ms: 0.1,
    };

    /// The table of `params` (set 2's for [`crate::params::Modulus::Rns3`], else set 1's).
    pub fn of(params: &ParameterSet) -> Self {
        match params.modulus {
            crate::params::Modulus::Rns3 => Self::SET2,
            crate::params::Modulus::Pow2_64 => Self::SET1,
        }
    }
}

/// The link rate the batch planner's cost model ([`plan_cost_on`]) weighs bytes at
/// (TDM-PAR-HE-3). A public setting of a served model: device and cloud must use the same value
/// (it comes from the signed model bundle; the default, 25 Mbit/s, is what plans use when the
/// bundle names none). A slower link makes the planner trade key switches (cloud time) for
/// fewer bytes: denser input polynomials (larger chunk, fewer ciphertexts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkModel {
    /// Link rate in kbit/s (1 kbit = 1 000 bits), at least 1.
    pub kbit_per_s: u32,
}

impl Default for LinkModel {
    fn default() -> Self {
        Self { kbit_per_s: 25_000 }
    }
}

impl LinkModel {
    /// Modelled milliseconds per byte on this link: 8 / `kbit_per_s` (a rate of 0 counts as 1).
    pub fn byte_ms(&self) -> f64 {
        8.0 / f64::from(self.kbit_per_s.max(1))
    }
}

/// The cost model that picks the batch layout: modelled milliseconds for a request of `batch`
/// rows under `plan` — key switches, ciphertext products, transforms of the uploaded and
/// returned ciphertexts, and upload plus download bytes over a 25 Mbit/s link
/// ([`plan_cost_on`] with the default [`LinkModel`]). It depends on public values only (the
/// plan and the batch size), so device and cloud agree on it.
pub fn plan_cost(plan: &LayerPlan, batch: usize) -> f64 {
    plan_cost_on(plan, batch, LinkModel::default())
}

/// [`plan_cost`] with the bytes weighed at `link`'s rate (ms).
///
/// The server-time constants are the plan's parameter set's [`CostModel`]. Multi-body plans
/// (r > 1, TDM-PAR-HE-3): a key switch costs `key_switch_ms` plus `key_switch_body_ms` per
/// further body, a ciphertext product (1 + r)/2 × `ct_product_ms` (the mask's product is
/// shared), an uploaded or returned ciphertext `ct_transform_ms` plus `body_transform_ms` per
/// further body. Every extra term is exactly 0 for r = 1.
pub fn plan_cost_on(plan: &LayerPlan, batch: usize, link: LinkModel) -> f64 {
    let blocks = plan.batch_blocks(batch);
    let cts = blocks * (plan.in_chunks() + plan.out_ciphertexts());
    let bodies = plan.body_blocks_sum(batch);
    let extra_bodies = (plan.input_bodies(batch) - blocks) * plan.in_chunks()
        + (bodies - blocks) * plan.out_ciphertexts();
    let extra_products = plan.poly_products_for(batch) - 2 * plan.ct_products_for(batch);
    let extra_ks = plan.key_switch_bodies_for(batch) - plan.key_switches_for(batch);
    let bytes = plan.upload_bytes(batch) + plan.download_bytes(batch);
    let c = CostModel::of(&plan.params);
    plan.key_switches_for(batch) as f64 * c.key_switch_ms
        + extra_ks as f64 * c.key_switch_body_ms
        + plan.ct_products_for(batch) as f64 * c.ct_product_ms
        + extra_products as f64 * (c.ct_product_ms / 2.0)
        + cts as f64 * c.ct_transform_ms
        + extra_bodies as f64 * c.body_transform_ms
        + bytes as f64 * link.byte_ms()
}

/// Plans with the caller's chunk, or else:
/// * one row (`opts.batch` absent or 1): the mode's default chunk and then (packed mode) ever
///   smaller ones — a smaller chunk means a smaller packing factor, hence less key-switching
///   noise; the first plan that meets the failure bound wins (the v1 rule);
/// * a batch of two or more rows: every chunk from 2 to the input width jointly with every
///   body count r = 1, 2, 4, … ≤ `opts.max_bodies` with r·b₁ ≤ batch (TDM-PAR-HE-3), and
///   chunks above the input width up to N with r ≥ 2 (fewer rows per polynomial, more bodies
///   per mask), the plan
///   with the lowest [`plan_cost_on`] over `link` among those that meet the failure bound
///   (ties to the smaller chunk, then the fewer bodies); under parameter set 2, among those
///   whose evaluation key fits [`super::MAX_PLAN_KEY_BYTES`] if any does.
///
/// A caller's chunk with a batch takes the largest r the batch allows (at most
/// `opts.max_bodies`). Everything is public (shape, batch, bounds, link, max_bodies), so device
/// and cloud derive the same plan. Returns the chosen plan, or the last refusal.
pub(crate) fn plan_first_fitting(
    params: ParameterSet,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    opts: PlanOptions,
    link: LinkModel,
    mut plan_with: impl FnMut(PlanOptions) -> Result<LayerPlan, HeError>,
) -> Result<LayerPlan, HeError> {
    if opts.max_bodies > crate::limits::MAX_BODIES {
        return Err(HeError::Shape(format!(
            "max_bodies {} (0..={})",
            opts.max_bodies,
            crate::limits::MAX_BODIES
        )));
    }
    let batch = opts.batch.unwrap_or(1);
    let with = |chunk: usize| PlanOptions {
        chunk: Some(chunk),
        ..opts
    };
    if batch >= 2 && opts.chunk.is_none() {
        let top = n_in.next_power_of_two().clamp(2, params.poly_size);
        let mut best: Option<(f64, LayerPlan)> = None;
        let mut last = Err(HeError::Shape("no chunk candidate".into()));
        // Chunks above the input width (zero-padded) only pay off with shared masks: there
        // they are tried with r ≥ 2 only, so single-secret plans are searched as before.
        let wide = if opts.max_bodies >= 2 {
            params.poly_size
        } else {
            top
        };
        // Set 2 keeps the key within MAX_PLAN_KEY_BYTES when any candidate can: the cheapest
        // such candidate wins over cheaper ones with larger keys.
        let budget = params.modulus == crate::params::Modulus::Rns3;
        let mut best_fitting: Option<(f64, LayerPlan)> = None;
        let mut chunk = 2;
        while chunk <= wide {
            let mut r = if chunk > top { 2 } else { 1 };
            while r == 1 || r <= opts.max_bodies {
                let o = PlanOptions {
                    max_bodies: r,
                    ..with(chunk)
                };
                match plan_with(o) {
                    // A plan with fewer bodies than asked is one already costed (r·b₁ > batch).
                    Ok(plan) if plan.bodies() < r => break,
                    Ok(plan) => {
                        let cost = plan_cost_on(&plan, batch, link);
                        if budget
                            && plan.eval_key_bytes() <= super::MAX_PLAN_KEY_BYTES
                            && best_fitting.as_ref().is_none_or(|(c, _)| cost < *c)
                        {
                            best_fitting = Some((cost, plan));
                        }
                        if best.as_ref().is_none_or(|(c, _)| cost < *c) {
                            best = Some((cost, plan));
                        }
                    }
                    Err(e) => last = Err(e),
                }
                r *= 2;
            }
            chunk *= 2;
        }
        return best_fitting.or(best).map_or(last, |(_, p)| Ok(p));
    }
    let first = opts
        .chunk
        .unwrap_or_else(|| default_chunk(params.poly_size, mode, n_in, n_out));
    let candidates: Vec<usize> = match (opts.chunk, mode) {
        (None, OutputMode::Packed) => (1..=first.trailing_zeros())
            .rev()
            .map(|l| 1usize << l)
            .collect(),
        _ => vec![first],
    };
    let mut planned = Err(HeError::Shape("no chunk candidate".into()));
    for chunk in candidates {
        planned = plan_with(with(chunk));
        if planned.is_ok() {
            break;
        }
    }
    planned
}

/// Default chunk: packed mode uploads one dense ciphertext per input (chunk covers the input);
/// no-key mode balances upload (∝ rows) against download (∝ chunk): the fewest total
/// coefficients.
pub(crate) fn default_chunk(n: usize, mode: OutputMode, n_in: usize, n_out: usize) -> usize {
    match mode {
        OutputMode::Packed => n_in.next_power_of_two().clamp(2, n),
        OutputMode::NoKey => {
            let mut best = (usize::MAX, 2);
            let mut c = 2;
            while c <= n {
                let rows = n / c;
                let up = n_in.div_ceil(c) * n;
                let down = n_out.div_ceil(rows) * (n + rows);
                if up + down < best.0 {
                    best = (up + down, c);
                }
                c *= 2;
            }
            best.1
        }
    }
}
