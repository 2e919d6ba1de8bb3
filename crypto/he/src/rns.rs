//! The residue-number-system modulus of parameter set 2 (`Modulus::Rns3`): Q = p_0·p_1·p_2,
//! the first three of tfhe-ntt's 30-bit NTT primes (≈ 2^89.9).
//!
//! The server keeps every ciphertext as three residue vectors in the NTT domain, so products,
//! additions and automorphisms are exact modulo Q with no reconstruction. Three conversions
//! leave that domain:
//! - **2^64 → Q** (uploaded ciphertexts, biases): x ↦ round(x·Q/2^64), residue by residue;
//! - **Q → 2^64** (before the download switch): Garner's mixed radix x = v_0 + v_1·p_0 +
//!   v_2·p_0·p_1, then round(x·2^64/Q) = round(Σ v_i·2^64/(p_i ⋯ p_2)) from fixed-point
//!   constants ⌊2^128/(p_i ⋯ p_2)⌋ (error below 2^-32 of a unit before the rounding);
//! - **key-switching digits**: round away p_2 (c = the centred residue of x mod p_2, y =
//!   (x − c)/p_2 ∈ Z_{p_0·p_1}), then the RNS digits d_0 = [y·p_1^−1]_{p_0}, d_1 = [y·p_0^−1]_{p_1}
//!   (centred), so that x = d_0·Q/p_0 + d_1·Q/p_1 + c modulo Q with |d_j| ≤ p_j/2, |c| ≤ p_2/2.
//!
//! Every formula is restated with its error bound in `specs/parameters.md` ("Parameter set 2").

use crate::ntt::{mul_shoup, pow_mod, reduce};
use std::sync::OnceLock;

/// Constants of Q = p_0·p_1·p_2.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rns3 {
    /// The primes (each < 2^30).
    pub(crate) p: [u64; 3],
    pinv: [f64; 3],
    /// Q as an integer (< 2^90).
    pub(crate) q: u128,
    /// Q mod p_i split as Q = q_hi·2^64 + q_lo: q_hi mod p_i.
    q_hi_mod: [u64; 3],
    q_lo: u64,
    /// ⌊2^128/Q⌋, ⌊2^128/(p_1·p_2)⌋, ⌊2^128/p_2⌋ as four 32-bit limbs each, least
    /// significant first (`scale_out`).
    scale_out_limbs: [[u64; 4]; 3],
    /// Garner in Shoup form: (p_0^−1 mod p_1, its ⌊·2^32/p_1⌋), (p_0 mod p_2, ⌊·2^32/p_2⌋),
    /// ((p_0·p_1)^−1 mod p_2, ⌊·2^32/p_2⌋).
    garner_shoup: [(u64, u64); 3],
    /// Digit constants: (p_1·p_2)^−1 mod p_0 and (p_0·p_2)^−1 mod p_1, with their Shoup
    /// companions ⌊k·2^32/p⌋.
    digit_k: [u64; 2],
    digit_k_shoup: [u64; 2],
    /// The gadget Q/p_0 and Q/p_1, as residues modulo each prime: `gadget[j][i]`.
    pub(crate) gadget: [[u64; 3]; 2],
}

fn inv_mod(a: u64, p: u64) -> u64 {
    // Fermat: a^(p−2) = a^−1 modulo the prime p.
    pow_mod(a % p, p - 2, p)
}

impl Rns3 {
    /// The constants, built once from tfhe-ntt's primes.
    pub(crate) fn get() -> &'static Rns3 {
        static RNS: OnceLock<Rns3> = OnceLock::new();
        RNS.get_or_init(|| {
            let Some(plan) = tfhe_ntt::native64::Plan32::try_new(64) else {
                unreachable!("tfhe-ntt supports N = 64")
            };
            Self::new([
                u64::from(plan.ntt_0().modulus()),
                u64::from(plan.ntt_1().modulus()),
                u64::from(plan.ntt_2().modulus()),
            ])
        })
    }

    fn new(p: [u64; 3]) -> Self {
        let q = p[0] as u128 * p[1] as u128 * p[2] as u128;
        let q_hi = (q >> 64) as u64;
        let q_lo = q as u64;
        let div = |d: u128| -> u128 {
            // ⌊2^128/d⌋ for d > 1: (2^128 − 1)/d differs only when d divides 2^128 (never: d odd).
            u128::MAX / d
        };
        let gadget = [
            [
                (p[1] * p[2]) % p[0],
                (p[1] as u128 * p[2] as u128 % p[1] as u128) as u64,
                (p[1] as u128 * p[2] as u128 % p[2] as u128) as u64,
            ],
            [
                (p[0] as u128 * p[2] as u128 % p[0] as u128) as u64,
                (p[0] as u128 * p[2] as u128 % p[1] as u128) as u64,
                (p[0] as u128 * p[2] as u128 % p[2] as u128) as u64,
            ],
        ];
        let shoup = |w: u64, p: u64| (w, (w << 32) / p);
        let inv_p0_mod_p1 = inv_mod(p[0], p[1]);
        let inv_p0p1_mod_p2 = inv_mod((p[0] as u128 * p[1] as u128 % p[2] as u128) as u64, p[2]);
        let scale_out = [div(q), div(p[1] as u128 * p[2] as u128), div(p[2] as u128)];
        let digit_k = [
            inv_mod((p[1] as u128 * p[2] as u128 % p[0] as u128) as u64, p[0]),
            inv_mod((p[0] as u128 * p[2] as u128 % p[1] as u128) as u64, p[1]),
        ];
        Self {
            p,
            pinv: p.map(|x| 1.0 / x as f64),
            q,
            q_hi_mod: p.map(|x| q_hi % x),
            q_lo,
            scale_out_limbs: scale_out
                .map(|f| [0, 32, 64, 96].map(|s| (f >> s) as u64 & 0xffff_ffff)),
            garner_shoup: [
                shoup(inv_p0_mod_p1, p[1]),
                shoup(p[0] % p[2], p[2]),
                shoup(inv_p0p1_mod_p2, p[2]),
            ],
            digit_k,
            digit_k_shoup: [(digit_k[0] << 32) / p[0], (digit_k[1] << 32) / p[1]],
            gadget,
        }
    }

    /// log2 Q.
    pub(crate) fn q_log2(&self) -> f64 {
        (self.q as f64).log2()
    }

    /// Residues modulo p_i of round(x·Q/2^64) for each x (mod 2^64) in `x`: `out` holds the
    /// three residue vectors prime-major (`out.len()` = 3·`x.len()`).
    pub(crate) fn scale_in(&self, x: &[u64], out: &mut [u32]) {
        let n = x.len();
        let q_lo = self.q_lo as u128;
        for (i, chunk) in out.chunks_exact_mut(n).enumerate().take(3) {
            let (p, pinv, hi) = (self.p[i], self.pinv[i], self.q_hi_mod[i]);
            crate::ntt::vectorized(
                #[inline(always)]
                || {
                    for (o, &v) in chunk.iter_mut().zip(x) {
                        // round(v·Q/2^64) = v·q_hi + round(v·q_lo/2^64).
                        let carry = ((v as u128 * q_lo + (1u128 << 63)) >> 64) as u64;
                        let a = reduce(reduce(v, p, pinv) * hi, p, pinv);
                        let s = a + reduce(carry, p, pinv);
                        *o = s.min(s.wrapping_sub(p)) as u32;
                    }
                },
            );
        }
    }

    /// round(x·2^64/Q) mod 2^64 for the integer x ∈ [0, Q) with residues `r0`, `r1`, `r2`
    /// (each < p_i), coefficient by coefficient: the same values as
    /// [`Rns3::scale_out_reference`], in u64 lanes only so that it vectorises. Garner's steps
    /// are Shoup multiplications (every operand < 2^32); Σ v_i·F_i (F_i the 128-bit constants)
    /// is taken in 32-bit limbs: with F_i = H_i·2^64 + L_i, the result is
    /// Σ v_i·H_i + ⌊(Σ v_i·L_i + 2^63)/2^64⌋ modulo 2^64, and with L_i = L1_i·2^32 + L0_i the
    /// floor is ⌊(Σ v_i·L1_i + ⌊Σ v_i·L0_i/2^32⌋ + 2^31)/2^32⌋ — each sum of three products of
    /// a 30-bit v_i and a 32-bit limb stays below 2^64.
    pub(crate) fn scale_out(&self, r0: &[u32], r1: &[u32], r2: &[u32], out: &mut [u64]) {
        let [_, p1, p2] = self.p;
        let [(i01, i01s), (p0m2, p0m2s), (i012, i012s)] = self.garner_shoup;
        let [f0, f1, f2] = self.scale_out_limbs;
        crate::ntt::vectorized(
            #[inline(always)]
            || {
                for ((o, &a), (&b, &c)) in out.iter_mut().zip(r0).zip(r1.iter().zip(r2)) {
                    let (a, b, c) = (u64::from(a), u64::from(b), u64::from(c));
                    // a < p0 < 2·p1 and < 2·p2: one conditional subtraction reduces it.
                    let a1 = a.min(a.wrapping_sub(p1));
                    let a2 = a.min(a.wrapping_sub(p2));
                    let v1 = mul_shoup(b + p1 - a1, i01, i01s, p1);
                    let t = a2 + mul_shoup(v1, p0m2, p0m2s, p2);
                    let t = t.min(t.wrapping_sub(p2));
                    let v2 = mul_shoup(c + p2 - t, i012, i012s, p2);
                    let v0 = a;
                    let lo0 = v0 * f0[0] + v1 * f1[0] + v2 * f2[0];
                    let lo1 = v0 * f0[1] + v1 * f1[1] + v2 * f2[1] + (lo0 >> 32) + (1 << 31);
                    let hi = (v0 * f0[2] + v1 * f1[2] + v2 * f2[2]).wrapping_add(
                        (v0 * f0[3])
                            .wrapping_add(v1 * f1[3])
                            .wrapping_add(v2 * f2[3])
                            << 32,
                    );
                    *o = hi.wrapping_add(lo1 >> 32);
                }
            },
        );
    }

    /// [`Rns3::scale_out`] in u128 arithmetic, the definition the tests compare it with.
    #[cfg(test)]
    pub(crate) fn scale_out_reference(&self, r0: &[u32], r1: &[u32], r2: &[u32], out: &mut [u64]) {
        let [p0, p1, p2] = self.p;
        let (i01, i012) = (self.garner_shoup[0].0, self.garner_shoup[2].0);
        let [_, pi1, pi2] = self.pinv;
        let [f0, f1, f2] = self.scale_out_limbs.map(|l| {
            l.iter()
                .rev()
                .fold(0u128, |acc, &x| acc << 32 | u128::from(x))
        });
        for ((o, &a), (&b, &c)) in out.iter_mut().zip(r0).zip(r1.iter().zip(r2)) {
            let (a, b, c) = (u64::from(a), u64::from(b), u64::from(c));
            // Mixed radix: v0 = a, v1 = (b − a)·p0^−1 mod p1, v2 = (c − a − v1·p0)·(p0p1)^−1 mod p2.
            let v0 = a;
            let v1 = reduce((b + p1 - reduce(a, p1, pi1)) * i01, p1, pi1);
            let t = reduce(a + reduce(v1 * reduce(p0, p2, pi2), p2, pi2), p2, pi2);
            let v2 = reduce((c + p2 - t) * i012, p2, pi2);
            // x·2^128/Q = v0·2^128/Q + v1·2^128/(p1p2) + v2·2^128/p2 (each term < 2^128).
            let s = (v0 as u128 * f0)
                .wrapping_add(v1 as u128 * f1)
                .wrapping_add(v2 as u128 * f2);
            *o = (s.wrapping_add(1u128 << 63) >> 64) as u64;
        }
    }

    /// The two centred key-switching digits of x ∈ Z_Q given by its residues (each < p_i):
    /// x = d0·Q/p0 + d1·Q/p1 + c (mod Q), |d_j| ≤ p_j/2, |c| ≤ p2/2.
    pub(crate) fn digits(
        &self,
        r0: &[u32],
        r1: &[u32],
        r2: &[u32],
        d0: &mut [i64],
        d1: &mut [i64],
    ) {
        let [p0, p1, p2] = self.p;
        let [k0, k1] = self.digit_k;
        let [ks0, ks1] = self.digit_k_shoup;
        let (h0, h1, h2) = (p0 / 2, p1 / 2, p2 / 2);
        crate::ntt::vectorized(
            #[inline(always)]
            || {
                for (((o0, o1), &a), (&b, &c)) in d0
                    .iter_mut()
                    .zip(d1.iter_mut())
                    .zip(r0)
                    .zip(r1.iter().zip(r2))
                {
                    let c = u64::from(c);
                    // c > p2/2 → c − p2 (centred); shift by p_j so everything stays positive.
                    let neg = u64::from(c > h2);
                    // x_j − centred(c) + p_j, in [0, 2p_j + p2/2) ⊂ [0, 2^32): Shoup's product
                    // with the constant k_j is exact modulo p_j for any input below 2^32.
                    let t0 = u64::from(a) + p0 + neg * p2 - c;
                    let t1 = u64::from(b) + p1 + neg * p2 - c;
                    let e0 = mul_shoup(t0, k0, ks0, p0) as i64;
                    let e1 = mul_shoup(t1, k1, ks1, p1) as i64;
                    *o0 = e0 - (p0 as i64 & -i64::from(e0 as u64 > h0));
                    *o1 = e1 - (p1 as i64 & -i64::from(e1 as u64 > h1));
                }
            },
        );
    }

    /// Fills `out` with values uniform modulo `p` (rejection sampling on 30-bit draws from
    /// `gen`, so exactly uniform).
    pub(crate) fn fill_uniform(gen: &mut crate::rng::MaskGenerator, p: u64, out: &mut [u32]) {
        let mut buf = [0u64; 64];
        let mut filled = 0;
        while filled < out.len() {
            gen.fill(&mut buf);
            for &v in &buf {
                // Two 30-bit candidates per draw.
                for cand in [v & ((1 << 30) - 1), (v >> 32) & ((1 << 30) - 1)] {
                    if cand < p && filled < out.len() {
                        out[filled] = cand as u32;
                        filled += 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn to_int(r: &Rns3, x: u128) -> [u32; 3] {
        r.p.map(|p| (x % p as u128) as u32)
    }

    /// The vectorised conversion equals the u128 definition on every residue triple tried:
    /// random ones and every combination of the extremes 0, 1, p_i − 2, p_i − 1.
    #[test]
    fn scale_out_equals_its_u128_reference() {
        let r = Rns3::get();
        let mut s = 0x0bad_cafe_u128;
        let mut triples: Vec<[u32; 3]> = (0..200_000)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                to_int(r, (s ^ (s >> 17)) % r.q)
            })
            .collect();
        let edge = |p: u64| [0, 1, p - 2, p - 1].map(|v| v as u32);
        for a in edge(r.p[0]) {
            for b in edge(r.p[1]) {
                for c in edge(r.p[2]) {
                    triples.push([a, b, c]);
                }
            }
        }
        let col = |i: usize| triples.iter().map(|t| t[i]).collect::<Vec<u32>>();
        let (a, b, c) = (col(0), col(1), col(2));
        let mut fast = vec![0u64; triples.len()];
        let mut slow = vec![0u64; triples.len()];
        r.scale_out(&a, &b, &c, &mut fast);
        r.scale_out_reference(&a, &b, &c, &mut slow);
        assert!(fast == slow);
    }

    #[test]
    fn scale_out_matches_exact_division() {
        let r = Rns3::get();
        let mut s = 0x1234_5678_9abc_def0_u128;
        for _ in 0..2000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = (s ^ (s >> 7)) % r.q;
            let [a, b, c] = to_int(r, x);
            let mut out = [0u64];
            r.scale_out(&[a], &[b], &[c], &mut out);
            // Exact: x·2^64/Q via f64 is not exact; compare with u128 arithmetic on halves.
            let want_hi = (x << 38) / (r.q >> 26); // ≈ x·2^64/Q to within a few units
            let diff = (out[0] as i128 - want_hi as i128).unsigned_abs();
            assert!(
                diff <= 2 || diff >= (1u128 << 64) - 2,
                "x={x} got {} want≈{want_hi}",
                out[0]
            );
        }
    }

    #[test]
    fn scale_in_then_out_is_the_identity_within_one() {
        let r = Rns3::get();
        let xs: Vec<u64> = (0..512u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 60))
            .chain([0, 1, u64::MAX, 1 << 63])
            .collect();
        let n = xs.len();
        let mut res = vec![0u32; 3 * n];
        r.scale_in(&xs, &mut res);
        let mut back = vec![0u64; n];
        r.scale_out(&res[..n], &res[n..2 * n], &res[2 * n..], &mut back);
        for (x, y) in xs.iter().zip(&back) {
            assert!(x.wrapping_sub(*y).wrapping_add(1) <= 2, "{x} -> {y}");
        }
    }

    #[test]
    fn digits_recompose_up_to_the_rounded_residue() {
        let r = Rns3::get();
        let mut s = 77u128;
        for _ in 0..2000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = (s ^ (s >> 11)) % r.q;
            let [a, b, c] = to_int(r, x);
            let (mut d0, mut d1) = ([0i64], [0i64]);
            r.digits(&[a], &[b], &[c], &mut d0, &mut d1);
            assert!(d0[0].unsigned_abs() <= r.p[0] / 2 && d1[0].unsigned_abs() <= r.p[1] / 2);
            let g0 = r.q / r.p[0] as u128;
            let g1 = r.q / r.p[1] as u128;
            let m = |d: i64, g: u128| -> u128 {
                let v = d.unsigned_abs() as u128 * g % r.q;
                if d < 0 {
                    (r.q - v) % r.q
                } else {
                    v
                }
            };
            let rec = (m(d0[0], g0) + m(d1[0], g1)) % r.q;
            let diff = (x + r.q - rec) % r.q;
            let c = if diff > r.q / 2 { r.q - diff } else { diff };
            assert!(c <= r.p[2] as u128 / 2, "residual {c}");
        }
    }
}
