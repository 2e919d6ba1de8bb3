//! Coefficient-domain helpers on polynomials modulo (X^N + 1, 2^64).

/// The automorphism `X -> X^g` (g odd) applied to `a`.
pub fn automorphism(a: &[u64], g: usize) -> Vec<u64> {
    let mut out = vec![0u64; a.len()];
    automorphism_into(a, g, &mut out);
    out
}

/// The automorphism `X -> X^g` (g odd) of `a` written to `out` (same length, a power of two:
/// i ↦ i·g is a bijection modulo 2N, so every slot is written once).
pub fn automorphism_into(a: &[u64], g: usize, out: &mut [u64]) {
    let n = a.len();
    let mask = 2 * n - 1;
    for (i, &c) in a.iter().enumerate() {
        let e = i.wrapping_mul(g) & mask;
        if e < n {
            out[e] = c;
        } else {
            out[e - n] = c.wrapping_neg();
        }
    }
}

#[cfg(test)]
/// Multiplies `a` by the monomial `X^k` (any k, reduced modulo 2N).
pub fn mul_monomial(a: &[u64], k: usize) -> Vec<u64> {
    let n = a.len();
    let k = k % (2 * n);
    let mut out = vec![0u64; n];
    for (i, &c) in a.iter().enumerate() {
        let e = (i + k) % (2 * n);
        if e < n {
            out[e] = c;
        } else {
            out[e - n] = c.wrapping_neg();
        }
    }
    out
}

#[cfg(test)]
/// Schoolbook negacyclic product (reference for tests and tiny rings).
pub fn schoolbook_mul(a: &[u64], b: &[u64]) -> Vec<u64> {
    let n = a.len();
    let mut out = vec![0u64; n];
    for (i, &x) in a.iter().enumerate() {
        for (j, &y) in b.iter().enumerate() {
            let p = x.wrapping_mul(y);
            if i + j < n {
                out[i + j] = out[i + j].wrapping_add(p);
            } else {
                out[i + j - n] = out[i + j - n].wrapping_sub(p);
            }
        }
    }
    out
}

/// Signed gadget decomposition: `a ≈ Σ_j digits[j]·2^(64 - (j+1)·base_log)`, digits in
/// `[-B/2, B/2)`, the low `64 - levels·base_log` bits rounded to nearest.
///
/// `out[j]` receives level j (j = 0 most significant) for every coefficient.
#[inline(always)]
pub fn decompose(a: &[u64], base_log: u32, levels: u32, out: &mut [Vec<i64>]) {
    let kept = base_log * levels;
    let shift = 64 - kept;
    let half = 1u64 << (base_log - 1);
    let mask = (1u64 << base_log) - 1;
    let Some((top, lower)) = out.split_first_mut() else {
        return;
    };
    // Round to the nearest multiple of 2^shift and keep the top `kept` bits (in `top`, as the
    // running value), then peel digits from the least significant level up, level by level
    // over the whole vector (so each pass vectorises).
    for (t, &c) in top.iter_mut().zip(a) {
        let v = if shift == 0 {
            c
        } else {
            (c >> shift).wrapping_add((c >> (shift - 1)) & 1)
        };
        *t = v as i64;
    }
    for level in lower.iter_mut().rev() {
        for (t, d) in top.iter_mut().zip(level.iter_mut()) {
            let v = *t as u64;
            let low = v & mask;
            let carry = u64::from(low >= half);
            *d = low as i64 - (carry << base_log) as i64;
            *t = ((v >> base_log) + carry) as i64;
        }
    }
    for t in top.iter_mut() {
        let low = (*t as u64) & mask;
        *t = low as i64 - ((u64::from(low >= half)) << base_log) as i64;
    }
}

/// Rounds a value modulo 2^64 to its top `bits` bits (modulus switch to 2^bits).
pub fn round_to_bits(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        return v;
    }
    let shift = 64 - bits;
    let r = (v >> shift).wrapping_add((v >> (shift - 1)) & 1);
    r & ((1u64 << bits) - 1)
}

/// Lifts a value modulo 2^bits back to modulo 2^64.
pub fn lift_from_bits(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        v
    } else {
        v << (64 - bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decomposition_recomposes_within_rounding(a in proptest::collection::vec(any::<u64>(), 8)) {
            let (base_log, levels) = (15u32, 3u32);
            let mut out = vec![vec![0i64; 8]; levels as usize];
            decompose(&a, base_log, levels, &mut out);
            for (i, &c) in a.iter().enumerate() {
                let mut rec = 0u64;
                for (j, level) in out.iter().enumerate() {
                    let d = level[i];
                    prop_assert!((-(1i64 << 14)..(1i64 << 14)).contains(&d));
                    rec = rec.wrapping_add((d as u64).wrapping_mul(1u64 << (64 - (j as u32 + 1) * base_log)));
                }
                let err = c.wrapping_sub(rec) as i64;
                prop_assert!(err.unsigned_abs() <= 1u64 << (64 - 45 - 1));
            }
        }

        #[test]
        fn automorphisms_compose(a in proptest::collection::vec(any::<u64>(), 16), g in 0usize..16, h in 0usize..16) {
            let (g, h) = (2 * g + 1, 2 * h + 1);
            prop_assert_eq!(automorphism(&automorphism(&a, g), h), automorphism(&a, (g * h) % 32));
        }

        #[test]
        fn monomial_matches_schoolbook(a in proptest::collection::vec(any::<u64>(), 16), k in 0usize..32) {
            let mut m = vec![0u64; 16];
            if k < 16 { m[k] = 1 } else { m[k - 16] = u64::MAX }
            prop_assert_eq!(mul_monomial(&a, k), schoolbook_mul(&a, &m));
        }
    }
}
