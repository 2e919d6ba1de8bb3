//! Hoisted packing levels (parameter set 2, `specs/parameters.md` § "Hoisted packing levels").
//!
//! A node of the packing tree computes `u + KeySwitch(τ_g(v))` from its children's
//! ciphertexts, and below it everything is linear in the uploaded ciphertexts `x_c`: a leaf is
//! Σ_c W_c·x_c. Automorphisms and monomials act on products factor by factor
//! (τ(W·x) = τ(W)·τ(x)), and key switching is linear up to its noise, so a node of width 2^L
//! equals Σ_G Σ_c P_{G,c}·x_{G,c}, where G runs over the subsets of the L bottom levels,
//! x_G = KeySwitch(τ_G(x)) is the input key-switched through those levels' automorphisms (one
//! key switch per level in G, with the plan's own keys), and P_G are plaintext polynomials the
//! server combines from the weights once, at preparation. The tree's key switches below width
//! 2^L (one per node) become 2^L − 1 per input ciphertext and batch block; the products stay
//! one per leaf. The price is noise: each hoisted key switch's noise is multiplied by the
//! weights, as the input's own noise is — small next to the upload rounding in set 2.

use super::{pack::map_maybe_par, NttCiphertext, PreparedLayer};
use crate::context::Context;
use crate::keys::{automorphism_for_stride, PreparedEvaluationKey};
use crate::ntt::NttPoly;

/// One packing-tree node of width 2^L in hoisted form.
pub(super) struct HoistedNode {
    /// `weights[G·in_chunks + c]`: P_{G,c}, to multiply with the hoisted input x_{G,c}.
    weights: Vec<NttPoly>,
    /// The node's bias (added to every body), already through the node's levels.
    bias: Option<NttPoly>,
}

/// The hoisted nodes of a layer: per output group, `leaves / 2^L` nodes (some absent in a
/// short last group), group-major.
pub(super) struct Hoisted {
    pub(super) levels: u32,
    pub(super) nodes: Vec<Option<HoistedNode>>,
}

/// Automorphism index g and monomial exponent k of the tree level whose nodes have `width`
/// leaves (stride 2·chunk/width; see `PreparedLayer::subtree`).
fn level(n: usize, chunk: usize, width: usize) -> (usize, usize) {
    let stride = 2 * chunk / width;
    (automorphism_for_stride(n, stride), stride / 2)
}

impl PreparedLayer {
    /// Replaces the leaf weights and biases by the hoisted nodes of `levels` levels.
    pub(super) fn hoist(&mut self, levels: u32) {
        let plan = self.plan;
        let (leaves, per_group, blocks) = (
            plan.leaves_per_group(),
            plan.blocks_per_group(),
            plan.out_blocks(),
        );
        let chunks = plan.in_chunks();
        let width = 1usize << levels;
        let step = leaves / width;
        let mut weights: Vec<Option<NttPoly>> = std::mem::take(&mut self.weights)
            .into_iter()
            .map(Some)
            .collect();
        let mut bias = std::mem::take(&mut self.bias);
        let mut nodes = Vec::with_capacity(blocks.div_ceil(per_group) * step);
        for first in (0..blocks).step_by(per_group) {
            let last = (first + per_group).min(blocks);
            for offset in 0..step {
                let mut leaf = |block: usize| {
                    let w = (0..chunks)
                        .map(|c| {
                            weights[block * chunks + c]
                                .take()
                                .unwrap_or_else(|| self.ctx.ntt.zero_with(self.primes))
                        })
                        .collect();
                    (w, bias[block].take())
                };
                nodes.push(form(
                    &self.ctx,
                    self.primes,
                    (plan.chunk, chunks),
                    &mut leaf,
                    (first, last),
                    offset,
                    step,
                    width,
                ));
            }
        }
        self.hoisted = Some(Hoisted { levels, nodes });
    }

    /// The hoisted node covering leaves `first + offset + step·t` of a group, if present.
    pub(super) fn hoisted_node(&self, first: usize, offset: usize) -> Option<&HoistedNode> {
        let h = self.hoisted.as_ref()?;
        let step = self.plan.leaves_per_group() >> h.levels;
        let group = first / self.plan.blocks_per_group();
        h.nodes.get(group * step + offset)?.as_ref()
    }

    /// Σ_i P_i·x_i over the hoisted inputs (mask and every body), plus the node's bias.
    pub(super) fn hoisted_product(
        &self,
        inputs: &[NttCiphertext],
        node: &HoistedNode,
    ) -> NttCiphertext {
        self.product_of(inputs, &node.weights, node.bias.as_ref())
    }

    /// The hoisted inputs of one batch block: `x[G·in_chunks + c]` for every subset G of the
    /// hoisted levels (bit j−1 for the level of width 2^j), x_∅ = the uploaded ciphertexts;
    /// x_{G ∪ {j}} = KeySwitch(τ_{g_j}(x_G)). Level by level, each level's key switches in
    /// parallel when asked.
    pub(super) fn hoist_inputs(
        &self,
        inputs: &[NttCiphertext],
        key: &PreparedEvaluationKey,
        parallel: bool,
    ) -> Vec<NttCiphertext> {
        let Some(h) = &self.hoisted else {
            return inputs.to_vec();
        };
        let n = self.plan.params.poly_size;
        let mut out = inputs.to_vec();
        for j in 1..=h.levels {
            let (g, _) = level(n, self.plan.chunk, 1 << j);
            let next = map_maybe_par((0..out.len()).collect(), parallel, |i: usize| {
                let v = &out[i];
                let zero = NttCiphertext::zero(&self.ctx.ntt, self.primes, v.body.len());
                super::pack::key_switch_add_ref(&self.ctx, zero, v, g, key)
            });
            out.extend(next);
        }
        out
    }
}

/// The hoisted form of the subtree over leaves `first + offset + step·t` (t < width) of the
/// group `first..last`: `weights[G·chunks + c]` for the G < width subsets of its levels, and
/// its bias; None when its first leaf is absent (as `subtree`). A node joins its children e, o
/// as u = e + X^k·o, v = e − X^k·o, node = u + τ_g(v): P_G ← u_G and P_{G ∪ {level}} ←
/// τ_g(v_G) (o = 0 when absent); the bias likewise, as one polynomial u + τ_g(v).
#[allow(clippy::too_many_arguments)]
fn form(
    ctx: &Context,
    primes: usize,
    (chunk, chunks): (usize, usize),
    leaf: &mut dyn FnMut(usize) -> (Vec<NttPoly>, Option<NttPoly>),
    (first, last): (usize, usize),
    offset: usize,
    step: usize,
    width: usize,
) -> Option<HoistedNode> {
    let block = first + offset;
    if block >= last {
        return None;
    }
    if width == 1 {
        let (weights, bias) = leaf(block);
        return Some(HoistedNode { weights, bias });
    }
    let half = width / 2;
    let range = (first, last);
    let even = form(
        ctx,
        primes,
        (chunk, chunks),
        leaf,
        range,
        offset,
        step * 2,
        half,
    )?;
    let odd = form(
        ctx,
        primes,
        (chunk, chunks),
        leaf,
        range,
        offset + step,
        step * 2,
        half,
    );
    let ntt = &ctx.ntt;
    let n = ctx.params().poly_size;
    let (g, k) = level(n, chunk, width);
    let mono = &ctx.monomials[&k];
    let join = |mut e: NttPoly, o: Option<NttPoly>| -> (NttPoly, NttPoly) {
        match o {
            Some(mut o) => {
                ntt.mul_assign_normalize(&mut o, mono);
                ntt.butterfly(&mut e, &mut o);
                (e, o)
            }
            None => (e.clone(), e),
        }
    };
    let (odd_weights, odd_bias): (Vec<Option<NttPoly>>, _) = match odd {
        Some(o) => (o.weights.into_iter().map(Some).collect(), o.bias),
        None => ((0..even.weights.len()).map(|_| None).collect(), None),
    };
    let mut lo = Vec::with_capacity(2 * even.weights.len());
    let mut hi = Vec::with_capacity(even.weights.len());
    for (e, o) in even.weights.into_iter().zip(odd_weights) {
        let (u, v) = join(e, o);
        let mut t = ntt.uninit_with(primes);
        ntt.automorphism(g, &v, &mut t);
        lo.push(u);
        hi.push(t);
    }
    lo.extend(hi);
    let bias = match (even.bias, odd_bias) {
        (None, None) => None,
        (e, o) => {
            let e = e.unwrap_or_else(|| ntt.zero_with(primes));
            let (mut u, v) = join(e, Some(o.unwrap_or_else(|| ntt.zero_with(primes))));
            ntt.add_automorphism(g, &v, &mut u);
            Some(u)
        }
    };
    Some(HoistedNode { weights: lo, bias })
}
