//! Exact negacyclic products modulo 2^64 in the NTT domain (tfhe-ntt's five 30-bit primes).
//!
//! A polynomial in the NTT domain is five residue vectors laid out prime-major in one buffer.
//! The CRT modulus is about 2^149.9 and the centred reconstruction tfhe-ntt performs is exact
//! while every accumulated coefficient stays below 2^148.9 in absolute value; the packing tree's
//! worst case is below 2^133 for every layer the engine accepts (TDM-PAR-HE-4 in
//! `specs/parameters.md` derives the bound, and why fewer primes or tfhe-ntt's 52-bit plan do
//! not pay), so reduction modulo 2^64 is exact.
//!
//! Small signed operands (weights, gadget digits, the secret key) are reduced per prime as
//! `p - |v|` instead of being wrapped to 2^64 - |v|: the integer being transformed is then the
//! true small value, which keeps accumulated products small.

use std::collections::HashMap;
use tfhe_ntt::native64::Plan32;
use tfhe_ntt::prime32::Plan;

const PRIMES: usize = 5;

/// The fewer primes an int8 layer's server-side arithmetic uses (TDM-PAR-HE-4: every integer
/// of such a layer stays below 2^116.1, inside the first four primes' centred range 2^118.9).
pub const PRIMES_INT8: usize = 4;

/// Three primes: a polynomial over exactly the first three primes is an element of Z_Q[X]
/// (Q = p_0·p_1·p_2, parameter set 2, `crate::rns`), not an exact integer polynomial: the
/// conversions from and to 2^64 ([`Ntt::fwd_u64`], [`Ntt::inv`]) scale by Q/2^64 and 2^64/Q.
pub const PRIMES_RNS: usize = 3;

/// Runs `f` compiled for AVX-512 (or AVX2) when the CPU has it, through pulp's runtime
/// dispatch, so that the plain loops inside vectorise; `f` must inline (`#[inline(always)]`).
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(simd) = pulp::x86::V4::try_new() {
            simd.vectorize(f)
        } else if let Some(simd) = pulp::x86::V3::try_new() {
            simd.vectorize(f)
        } else {
            f()
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    f()
}

/// `x mod p` for any u64 `x` and a prime p < 2^31, `pinv` = 1/p: the quotient from f64 is off
/// by at most one (x/p < 2^35, relative error < 2^-50), corrected branch-free. Vectorises.
#[inline(always)]
pub(crate) fn reduce(x: u64, p: u64, pinv: f64) -> u64 {
    let q = ((x as f64) * pinv) as u64;
    let r = x.wrapping_sub(q.wrapping_mul(p)) as i64; // in (−2p, 2p)
    let r = r + ((r >> 63) & p as i64); // [0, 2p)
    let r = r as u64;
    r.min(r.wrapping_sub(p))
}

/// `a·w mod p` for a < 2^32 and a constant w < p < 2^31 with `w_shoup` = ⌊w·2^32/p⌋
/// (Shoup's multiplication: the quotient estimate is off by at most one).
#[inline(always)]
pub(crate) fn mul_shoup(a: u64, w: u64, w_shoup: u64, p: u64) -> u64 {
    let q = (a * w_shoup) >> 32;
    let r = (a * w).wrapping_sub(q * p);
    r.min(r.wrapping_sub(p))
}

/// Constants of the centred CRT over the first [`PRIMES_INT8`] primes (Garner's mixed radix),
/// with products reduced modulo 2^64.
#[derive(Debug, Clone, Copy)]
struct Crt4 {
    p: [u64; PRIMES_INT8],
    pinv: [f64; PRIMES_INT8],
    /// `inv[i][j]` = p_j^−1 mod p_i (j < i) and its Shoup constant.
    inv: [[(u64, u64); PRIMES_INT8]; PRIMES_INT8],
    /// p_0 ⋯ p_{i−1} mod 2^64 (the mixed-radix weights).
    radix: [u64; PRIMES_INT8],
    /// M = p_0 ⋯ p_3 mod 2^64.
    m: u64,
}

pub(crate) fn pow_mod(mut base: u64, mut e: u64, p: u64) -> u64 {
    let mut r = 1u64;
    base %= p;
    while e > 0 {
        if e & 1 == 1 {
            r = r * base % p;
        }
        base = base * base % p;
        e >>= 1;
    }
    r
}

impl Crt4 {
    fn new(primes: &[u32; PRIMES]) -> Self {
        let mut c = Self {
            p: [0; PRIMES_INT8],
            pinv: [0.0; PRIMES_INT8],
            inv: [[(0, 0); PRIMES_INT8]; PRIMES_INT8],
            radix: [1; PRIMES_INT8],
            m: 1,
        };
        for i in 0..PRIMES_INT8 {
            let p = u64::from(primes[i]);
            c.p[i] = p;
            c.pinv[i] = 1.0 / p as f64;
            c.radix[i] = c.m;
            c.m = c.m.wrapping_mul(p);
            for (slot, &pj) in c.inv[i].iter_mut().zip(primes).take(i) {
                // Fermat: p_j^(p−2) = p_j^−1 mod the prime p.
                let w = pow_mod(u64::from(pj), p - 2, p);
                *slot = (w, (w << 32) / p);
            }
        }
        c
    }

    /// The centred integer with residues `r[i]` < p_i (|value| < M/2 − M/2^3.8), modulo 2^64.
    #[inline(always)]
    fn reconstruct(&self, r: [u64; PRIMES_INT8]) -> u64 {
        // Mixed-radix digits v_i < p_i with value = Σ v_i·p_0⋯p_{i−1} (Garner).
        let mut v = [0u64; PRIMES_INT8];
        let mut x = 0u64;
        for i in 0..PRIMES_INT8 {
            let p = self.p[i];
            let mut t = r[i];
            for (&vj, &(w, ws)) in v.iter().zip(&self.inv[i]).take(i) {
                // (t − v_j)·p_j^−1 mod p_i; v_j < p_j < 2·p_i (the primes are within a factor 2).
                let vj = vj.min(vj.wrapping_sub(p));
                t = mul_shoup(t + p - vj, w, ws, p);
            }
            v[i] = t;
            x = x.wrapping_add(t.wrapping_mul(self.radix[i]));
        }
        // The value is below M/2^3.8 or above M − M/2^3.8: the top digit tells which.
        let top = PRIMES_INT8 - 1;
        if 2 * v[top] >= self.p[top] {
            x.wrapping_sub(self.m)
        } else {
            x
        }
    }
}

/// A polynomial in the NTT domain (5 residue vectors of length N, prime-major).
///
/// Its buffer comes from, and returns on drop to, a small per-thread pool: the packing tree
/// creates and drops two of these per node, and fresh 80 KB allocations cost page faults and
/// zeroing (glibc trims its heap between them) that were ≈ 10 % of a key switch.
#[derive(Debug, PartialEq, Eq)]
pub struct NttPoly(pub(crate) Vec<u32>);

/// Buffers kept per thread (80 KB each at N = 4096: ≤ 5 MB per thread).
const POOL_CAP: usize = 64;

thread_local! {
    static GATHER: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    static POOL: std::cell::RefCell<Vec<Vec<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `len` values from the pool, contents unspecified (the caller overwrites it).
fn pooled(len: usize) -> Vec<u32> {
    let reused = POOL
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let at = p.iter().rposition(|v| v.len() == len)?;
            Some(p.swap_remove(at))
        })
        .ok()
        .flatten();
    reused.unwrap_or_else(|| vec![0; len])
}

impl Drop for NttPoly {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.is_empty() {
            return;
        }
        // During thread teardown the pool may be gone: then the buffer is simply freed.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_CAP {
                p.push(v);
            }
        });
    }
}

impl Clone for NttPoly {
    fn clone(&self) -> Self {
        let mut v = pooled(self.0.len());
        v.copy_from_slice(&self.0);
        Self(v)
    }
}

/// Transform plan for one ring degree, with precomputed automorphism slot permutations.
pub struct Ntt {
    plan: Plan32,
    n: usize,
    primes: [u32; PRIMES],
    crt4: Crt4,
    /// For odd g: `perm[g][i]` is the slot whose value `τ_g(f)` takes at slot i.
    perms: HashMap<usize, Vec<u32>>,
}

impl std::fmt::Debug for Ntt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ntt").field("n", &self.n).finish()
    }
}

impl Ntt {
    /// Builds the plan for ring degree `n` (a power of two tfhe-ntt supports).
    pub fn new(n: usize) -> Option<Self> {
        let plan = Plan32::try_new(n)?;
        let primes = [
            plan.ntt_0().modulus(),
            plan.ntt_1().modulus(),
            plan.ntt_2().modulus(),
            plan.ntt_3().modulus(),
            plan.ntt_4().modulus(),
        ];
        Some(Self {
            plan,
            n,
            primes,
            crt4: Crt4::new(&primes),
            perms: HashMap::new(),
        })
    }

    /// Ring degree.
    pub fn n(&self) -> usize {
        self.n
    }

    fn prime_plan(&self, i: usize) -> &Plan {
        match i {
            0 => self.plan.ntt_0(),
            1 => self.plan.ntt_1(),
            2 => self.plan.ntt_2(),
            3 => self.plan.ntt_3(),
            _ => self.plan.ntt_4(),
        }
    }

    /// The zero polynomial.
    pub fn zero(&self) -> NttPoly {
        let mut v = pooled(PRIMES * self.n);
        v.fill(0);
        NttPoly(v)
    }

    /// A polynomial whose contents the caller overwrites in full (a transform's output):
    /// no zeroing.
    pub fn uninit(&self) -> NttPoly {
        NttPoly(pooled(PRIMES * self.n))
    }

    /// The zero polynomial over the first `primes` primes (3, 4 or 5; see [`PRIMES_RNS`] and
    /// [`PRIMES_INT8`]).
    /// Every operation works on as many primes as its output has; operands with more primes
    /// (keys, monomials) contribute their first ones.
    pub fn zero_with(&self, primes: usize) -> NttPoly {
        let mut v = pooled(primes.clamp(PRIMES_RNS, PRIMES) * self.n);
        v.fill(0);
        NttPoly(v)
    }

    /// [`Ntt::uninit`] over the first `primes` primes.
    pub fn uninit_with(&self, primes: usize) -> NttPoly {
        NttPoly(pooled(primes.clamp(PRIMES_RNS, PRIMES) * self.n))
    }

    /// Forward transform of a polynomial with arbitrary coefficients modulo 2^64.
    ///
    /// Over [`PRIMES_RNS`] primes the result is round(x·Q/2^64) in Z_Q (parameter set 2).
    pub fn fwd_u64(&self, coeffs: &[u64], out: &mut NttPoly) {
        if out.0.len() == PRIMES_RNS * self.n {
            crate::rns::Rns3::get().scale_in(coeffs, &mut out.0);
            self.fwd_residues(out);
            return;
        }
        if out.0.len() < PRIMES * self.n {
            for (i, chunk) in out.0.chunks_exact_mut(self.n).enumerate() {
                let (p, pinv) = (self.crt4.p[i], self.crt4.pinv[i]);
                vectorized(
                    #[inline(always)]
                    || {
                        for (o, &v) in chunk.iter_mut().zip(coeffs) {
                            *o = reduce(v, p, pinv) as u32;
                        }
                    },
                );
                self.prime_plan(i).fwd(chunk);
            }
            return;
        }
        let (p0, rest) = out.0.split_at_mut(self.n);
        let (p1, rest) = rest.split_at_mut(self.n);
        let (p2, rest) = rest.split_at_mut(self.n);
        let (p3, p4) = rest.split_at_mut(self.n);
        self.plan.fwd(coeffs, p0, p1, p2, p3, p4);
    }

    /// Forward transform of a polynomial with small signed coefficients (|v| < 2^30).
    pub fn fwd_small(&self, coeffs: &[i64], out: &mut NttPoly) {
        for (i, chunk) in out.0.chunks_exact_mut(self.n).enumerate() {
            let p = self.primes[i] as i64;
            vectorized(
                #[inline(always)]
                || {
                    for (o, &v) in chunk.iter_mut().zip(coeffs) {
                        // v + p if v < 0 (branch-free, so the loop vectorises).
                        *o = (v + (p & (v >> 63))) as u32;
                    }
                },
            );
            self.prime_plan(i).fwd(chunk);
        }
    }

    /// Forward transform of residue vectors in place (each prime's coefficients < p_i).
    pub fn fwd_residues(&self, poly: &mut NttPoly) {
        for (i, chunk) in poly.0.chunks_exact_mut(self.n).enumerate() {
            self.prime_plan(i).fwd(chunk);
        }
    }

    /// Inverse transform to residue vectors in place (coefficients < p_i per prime).
    pub fn inv_residues(&self, poly: &mut NttPoly) {
        for (i, chunk) in poly.0.chunks_exact_mut(self.n).enumerate() {
            let plan = self.prime_plan(i);
            plan.normalize(chunk);
            plan.inv(chunk);
            let p = self.primes[i];
            vectorized(
                #[inline(always)]
                || {
                    for x in chunk.iter_mut() {
                        *x = (*x).min(x.wrapping_sub(p));
                    }
                },
            );
        }
    }

    /// The residue vectors of prime `i` (a chunk of N values).
    pub fn residues<'a>(&self, poly: &'a NttPoly, i: usize) -> &'a [u32] {
        &poly.0[i * self.n..(i + 1) * self.n]
    }

    /// Inverse transform into coefficients modulo 2^64. `scratch` is consumed (overwritten).
    ///
    /// Over [`PRIMES_RNS`] primes the input is an element x of Z_Q and the output is
    /// round(x·2^64/Q) (parameter set 2).
    pub fn inv(&self, scratch: &mut NttPoly, out: &mut [u64]) {
        if scratch.0.len() == PRIMES_RNS * self.n {
            self.inv_residues(scratch);
            let n = self.n;
            let (r0, rest) = scratch.0.split_at(n);
            let (r1, r2) = rest.split_at(n);
            crate::rns::Rns3::get().scale_out(r0, r1, r2, out);
            return;
        }
        for (i, chunk) in scratch.0.chunks_exact_mut(self.n).enumerate() {
            self.prime_plan(i).normalize(chunk);
        }
        if scratch.0.len() < PRIMES * self.n {
            for (i, chunk) in scratch.0.chunks_exact_mut(self.n).enumerate() {
                self.prime_plan(i).inv(chunk);
            }
            let (r0, rest) = scratch.0.split_at(self.n);
            let (r1, rest) = rest.split_at(self.n);
            let (r2, r3) = rest.split_at(self.n);
            let crt = self.crt4;
            vectorized(
                #[inline(always)]
                || {
                    for ((((o, &a), &b), &c), &d) in out.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3)
                    {
                        *o = crt.reconstruct([
                            u64::from(a),
                            u64::from(b),
                            u64::from(c),
                            u64::from(d),
                        ]);
                    }
                },
            );
            return;
        }
        let (p0, rest) = scratch.0.split_at_mut(self.n);
        let (p1, rest) = rest.split_at_mut(self.n);
        let (p2, rest) = rest.split_at_mut(self.n);
        let (p3, p4) = rest.split_at_mut(self.n);
        self.plan.inv(out, p0, p1, p2, p3, p4);
    }

    /// `acc += a ⊙ b` (slot-wise product).
    pub fn mul_acc(&self, acc: &mut NttPoly, a: &NttPoly, b: &NttPoly) {
        for (i, ((acc, a), b)) in acc
            .0
            .chunks_exact_mut(self.n)
            .zip(a.0.chunks_exact(self.n))
            .zip(b.0.chunks_exact(self.n))
            .enumerate()
        {
            self.prime_plan(i).mul_accumulate(acc, a, b);
        }
    }

    /// `acc += b`.
    pub fn add_assign(&self, acc: &mut NttPoly, b: &NttPoly) {
        for (i, (acc, b)) in acc
            .0
            .chunks_exact_mut(self.n)
            .zip(b.0.chunks_exact(self.n))
            .enumerate()
        {
            let p = self.primes[i];
            vectorized(
                #[inline(always)]
                || {
                    for (x, &y) in acc.iter_mut().zip(b) {
                        // Both < p < 2^30: no overflow; s − p wraps above s exactly when s < p.
                        let s = *x + y;
                        *x = s.min(s.wrapping_sub(p));
                    }
                },
            );
        }
    }

    /// `acc ← acc ⊙ b · N⁻¹` (slot-wise product with tfhe-ntt's normalisation folded in: pass
    /// `b` pre-multiplied by N to get the plain product).
    pub fn mul_assign_normalize(&self, acc: &mut NttPoly, b: &NttPoly) {
        for (i, (acc, b)) in acc
            .0
            .chunks_exact_mut(self.n)
            .zip(b.0.chunks_exact(self.n))
            .enumerate()
        {
            self.prime_plan(i).mul_assign_normalize(acc, b);
        }
    }

    /// The butterfly `(x, y) ← (x + y, x − y)` slot-wise.
    pub fn butterfly(&self, x: &mut NttPoly, y: &mut NttPoly) {
        for (i, (xs, ys)) in
            x.0.chunks_exact_mut(self.n)
                .zip(y.0.chunks_exact_mut(self.n))
                .enumerate()
        {
            let p = self.primes[i];
            vectorized(
                #[inline(always)]
                || {
                    for (x, y) in xs.iter_mut().zip(ys.iter_mut()) {
                        // Both < p < 2^30: no overflow.
                        let (a, b) = (*x, *y);
                        let s = a + b;
                        let d = a + p - b;
                        *x = s.min(s.wrapping_sub(p));
                        *y = d.min(d.wrapping_sub(p));
                    }
                },
            );
        }
    }

    /// `acc += τ_g(input)`: the automorphism's slot permutation fused with the addition.
    /// Same invariant as [`Ntt::automorphism`] for `g`.
    pub fn add_automorphism(&self, g: usize, input: &NttPoly, acc: &mut NttPoly) {
        let Some(perm) = self.perms.get(&g) else {
            unreachable!("automorphism {g} not registered");
        };
        for (pi, (acc, inp)) in acc
            .0
            .chunks_exact_mut(self.n)
            .zip(input.0.chunks_exact(self.n))
            .enumerate()
        {
            let p = self.primes[pi];
            let perm = &perm[pi * self.n..(pi + 1) * self.n];
            // Gather first (a plain indexed load: the permutation's entries are < N by
            // construction), then add in a separate loop that vectorises.
            GATHER.with(|cell| {
                let mut tmp = cell.borrow_mut();
                tmp.clear();
                tmp.extend(perm.iter().map(|&src| inp[src as usize]));
                vectorized(
                    #[inline(always)]
                    || {
                        for (x, &y) in acc.iter_mut().zip(tmp.iter()) {
                            let s = *x + y;
                            *x = s.min(s.wrapping_sub(p));
                        }
                    },
                );
            });
        }
    }

    /// Applies the ring automorphism `X -> X^g` (g odd) in the NTT domain: a slot permutation.
    /// Over as many primes as `out` has.
    ///
    /// Panics only if `g` was not registered with [`Ntt::register_automorphism`] — a local
    /// invariant of the engine, never reachable from peer input (the engine validates which
    /// automorphisms a key carries before use).
    pub fn automorphism(&self, g: usize, input: &NttPoly, out: &mut NttPoly) {
        let Some(perm) = self.perms.get(&g) else {
            unreachable!("automorphism {g} not registered");
        };
        for (pi, (o, inp)) in out
            .0
            .chunks_exact_mut(self.n)
            .zip(input.0.chunks_exact(self.n))
            .enumerate()
        {
            let perm = &perm[pi * self.n..(pi + 1) * self.n];
            for (o, &src) in o.iter_mut().zip(perm) {
                *o = inp[src as usize];
            }
        }
    }

    /// Whether the automorphism `X -> X^g` can be applied.
    pub fn has_automorphism(&self, g: usize) -> bool {
        self.perms.contains_key(&g)
    }

    /// Derives the slot permutation of `X -> X^g` from the transform itself.
    ///
    /// Slot i of the transform of f is f(ω_i) for some root ω_i; the slot order is tfhe-ntt's
    /// business, so instead of assuming it we transform X and X^g: τ_g(f)(ω_i) = f(ω_i^g), and
    /// ω_i^g is the value of slot i in the transform of X^g, found among the ω_j.
    pub fn register_automorphism(&mut self, g: usize) {
        if self.perms.contains_key(&g) {
            return;
        }
        let n = self.n;
        let mut x = vec![0i64; n];
        x[1] = 1;
        let mut x_ntt = self.zero();
        self.fwd_small(&x, &mut x_ntt);
        // X^g reduced negacyclically.
        let e = g % (2 * n);
        let mut xg = vec![0i64; n];
        if e < n {
            xg[e] = 1;
        } else {
            xg[e - n] = -1;
        }
        let mut xg_ntt = self.zero();
        self.fwd_small(&xg, &mut xg_ntt);
        let mut perm = vec![0u32; PRIMES * n];
        for pi in 0..PRIMES {
            let roots = &x_ntt.0[pi * n..(pi + 1) * n];
            let index: HashMap<u32, u32> = roots
                .iter()
                .enumerate()
                .map(|(j, &w)| (w, j as u32))
                .collect();
            for i in 0..n {
                let target = xg_ntt.0[pi * n + i];
                // The roots are the N distinct primitive 2N-th roots, closed under odd powers.
                perm[pi * n + i] = index.get(&target).copied().unwrap_or(0);
            }
        }
        self.perms.insert(g, perm);
    }
}

#[cfg(test)]
mod tests;
