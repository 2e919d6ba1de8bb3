//! Packed-mode evaluation: the packing tree over product ciphertexts, the partial trace,
//! key switching, the final modulus switch of a returned ciphertext, and the optional
//! rayon helpers.

use super::{EvalOptions, NttCiphertext, PreparedLayer};
use crate::context::Context;
use crate::keys::{automorphism_for_stride, PreparedEvaluationKey};
use crate::ntt::NttPoly;
use crate::poly;
use crate::wire::OutputCiphertext;

impl PreparedLayer {
    /// Packs group `group` of product ciphertexts into one (PackLWEs-style tree, then a
    /// partial trace that clears every slot but the outputs).
    pub(super) fn pack(
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
                NttCiphertext::zero(&self.ctx.ntt, self.primes, r)
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
        if let Some(h) = &self.hoisted {
            if width == 1 << h.levels {
                let node = self.hoisted_node(first, offset)?;
                return Some(self.hoisted_product(inputs, node));
            }
        }
        if width == 1 {
            return Some(self.product(inputs, block));
        }
        let n = self.plan.params.poly_size;
        if width == 2 && self.folded && first + offset + step < last {
            // The bottom level folded into the weights: u and v are plain products.
            let u = self.product(inputs, block);
            let v = self.product(inputs, first + offset + step);
            let g = automorphism_for_stride(n, self.plan.chunk);
            return Some(self.add_rotated(u, v, g, key));
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
    pub(super) fn finish(
        &self,
        mut ct: NttCiphertext,
        index: usize,
        rows: usize,
    ) -> OutputCiphertext {
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
    if !key.levels.contains_key(&g) {
        return compose(ctx, u, &v, g, key);
    }
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
    if scratch.0.len() == crate::ntt::PRIMES_RNS * n {
        key_switch_rns(ctx, &mut u, &scratch, g, levels);
        return u;
    }
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

/// [`key_switch_add`] reading `v` in place: parameter set 2's key switch only reads the mask
/// (set 1 transforms it in place, so it works on a copy).
pub(crate) fn key_switch_add_ref(
    ctx: &Context,
    mut u: NttCiphertext,
    v: &NttCiphertext,
    g: usize,
    key: &PreparedEvaluationKey,
) -> NttCiphertext {
    let n = ctx.params().poly_size;
    let Some(levels) = key.levels.get(&g) else {
        return compose(ctx, u, v, g, key);
    };
    if v.mask.0.len() != crate::ntt::PRIMES_RNS * n {
        return key_switch_add(ctx, u, v.clone(), g, key);
    }
    for (ub, vb) in u.body.iter_mut().zip(&v.body) {
        ctx.ntt.add_automorphism(g, vb, ub);
    }
    key_switch_rns(ctx, &mut u, &v.mask, g, levels);
    u
}

/// `u + KeySwitch(τ_g(v))` for an automorphism the key does not hold: g = g_l of a stride
/// below the key's first level l₀ is g_{l₀}^(2^(l₀ − l)) (`keys::max_key_first_level`), so
/// τ_g(v) is 2^(l₀ − l) rounds of τ_{g_{l₀}} each followed by its key switch.
fn compose(
    ctx: &Context,
    mut u: NttCiphertext,
    v: &NttCiphertext,
    g: usize,
    key: &PreparedEvaluationKey,
) -> NttCiphertext {
    let n = ctx.params().poly_size;
    let first = key.first_level;
    // eval() checks that the key covers the plan: every stride from the plan's first level
    // up is held, and the plan's first level is at least the key's.
    let Some(l) = crate::keys::stride_level(n, g).filter(|&l| l < first) else {
        unreachable!("key switch without a key for automorphism {g}")
    };
    let g0 = automorphism_for_stride(n, 1 << first);
    let primes = v.mask.0.len() / n;
    let zero = |c: &NttCiphertext| NttCiphertext::zero(&ctx.ntt, primes, c.body.len());
    let mut w = key_switch_add_ref(ctx, zero(v), v, g0, key);
    for _ in 1..1usize << (first - l) {
        w = key_switch_add_ref(ctx, zero(&w), &w, g0, key);
    }
    ctx.ntt.add_assign(&mut u.mask, &w.mask);
    for (ub, wb) in u.body.iter_mut().zip(&w.body) {
        ctx.ntt.add_assign(ub, wb);
    }
    u
}

/// Parameter set 2: `u += KeySwitch(τ_g(mask))` modulo Q with the RNS gadget. τ_g is a slot
/// permutation of the mask's residues; each prime's residues go back to coefficients (three
/// inverse transforms), the two centred digits d_j (|d_j| ≤ p_j/2, the residue modulo p_2
/// rounded away) are formed coefficient-wise and transformed over the three primes (six forward
/// transforms), and multiplied with the key's levels.
fn key_switch_rns(
    ctx: &Context,
    u: &mut NttCiphertext,
    mask: &NttPoly,
    g: usize,
    levels: &[(NttPoly, Vec<NttPoly>)],
) {
    let ntt = &ctx.ntt;
    let n = ctx.params().poly_size;
    let mut t = ntt.uninit_with(crate::ntt::PRIMES_RNS);
    ntt.automorphism(g, mask, &mut t);
    ntt.inv_residues(&mut t);
    RNS_SCRATCH.with(|cell| {
        let mut d = cell.borrow_mut();
        let (d0, d1) = &mut *d;
        d0.resize(n, 0);
        d1.resize(n, 0);
        crate::rns::Rns3::get().digits(
            ntt.residues(&t, 0),
            ntt.residues(&t, 1),
            ntt.residues(&t, 2),
            d0,
            d1,
        );
        for (digit, (neg_a, neg_b)) in [&*d0, &*d1].into_iter().zip(levels) {
            ntt.fwd_small(digit, &mut t);
            ntt.mul_acc(&mut u.mask, &t, neg_a);
            for (ub, kb) in u.body.iter_mut().zip(neg_b) {
                ntt.mul_acc(ub, &t, kb);
            }
        }
    });
}

thread_local! {
    static RNS_SCRATCH: std::cell::RefCell<(Vec<i64>, Vec<i64>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
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

pub(super) fn map_maybe_par<T: Send, U: Send>(
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
