//! Unit tests of `ntt` (split from ntt.rs: pure move).
#![allow(clippy::unwrap_used)]
use super::*;
use crate::poly;

fn rand_u64(n: usize, seed: u64) -> Vec<u64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s ^ (s >> 29)
        })
        .collect()
}

/// Pooled buffers: a dropped polynomial's buffer is reused, `zero()` clears it, clones
/// are equal copies (not aliases).
#[test]
fn pooled_polynomials_are_zeroed_and_clones_independent() {
    let ntt = Ntt::new(64).unwrap();
    let mut f = ntt.uninit();
    f.0.fill(7);
    let ptr = f.0.as_ptr();
    drop(f);
    let z = ntt.zero();
    assert_eq!(z.0.as_ptr(), ptr, "the dropped buffer is reused");
    assert!(z.0.iter().all(|&v| v == 0));
    let mut c = z.clone();
    c.0[0] = 1;
    assert_eq!(z.0[0], 0);
    assert_ne!(c, z);
}

/// TDM-PAR-HE-4: the four-prime path (own f64-quotient reduction and centred CRT) gives
/// the same products modulo 2^64 as the five-prime one, for full-range u64 operands times
/// int8 weights, and its centred range exceeds the int8 bound 2^116.1.
#[test]
fn four_prime_products_match_five_prime_and_schoolbook() {
    let n = 256;
    let ntt = Ntt::new(n).unwrap();
    let m4: u128 = ntt.primes[..PRIMES_INT8]
        .iter()
        .map(|&p| u128::from(p))
        .product();
    assert!(
        (m4 / 2) as f64 > 2f64.powf(116.1),
        "M4/2 = 2^{}",
        (m4 as f64).log2() - 1.0
    );
    // Garner's step reduces a digit of one prime modulo the next by one subtraction, and
    // reduce() needs p < 2^31.
    let (lo, hi) = (
        ntt.primes.iter().min().unwrap(),
        ntt.primes.iter().max().unwrap(),
    );
    assert!(*hi < 2 * *lo && *hi < 1 << 31);
    for seed in 0..4u64 {
        let mut a = rand_u64(n, 10 + seed);
        // Extremes: 0, 2^64 − 1 and values around the primes.
        a[0] = u64::MAX;
        a[1] = 0;
        a[2] = u64::from(ntt.primes[0]);
        let b: Vec<i64> = rand_u64(n, 20 + seed)
            .iter()
            .map(|&v| {
                if seed == 0 {
                    -128
                } else {
                    (v % 257) as i64 - 128
                }
            })
            .collect();
        let bu: Vec<u64> = b.iter().map(|&v| v as u64).collect();
        let want = poly::schoolbook_mul(&a, &bu);
        for primes in [PRIMES_INT8, PRIMES] {
            let (mut fa, mut fb) = (ntt.uninit_with(primes), ntt.uninit_with(primes));
            ntt.fwd_u64(&a, &mut fa);
            ntt.fwd_small(&b, &mut fb);
            let mut acc = ntt.zero_with(primes);
            // Accumulate 64 copies: a larger integer than one product, still exact.
            for _ in 0..64 {
                ntt.mul_acc(&mut acc, &fa, &fb);
            }
            let mut out = vec![0u64; n];
            ntt.inv(&mut acc, &mut out);
            let want64: Vec<u64> = want.iter().map(|v| v.wrapping_mul(64)).collect();
            assert_eq!(out, want64, "{primes} primes, seed {seed}");
        }
    }
    // reduce() over edge values of every prime.
    for i in 0..PRIMES_INT8 {
        let (p, pinv) = (ntt.crt4.p[i], ntt.crt4.pinv[i]);
        for x in [
            0,
            1,
            p - 1,
            p,
            p + 1,
            u64::MAX,
            u64::MAX - p,
            (1 << 63) + 12345,
            p * p - 1,
        ] {
            assert_eq!(reduce(x, p, pinv), x % p, "x = {x}, p = {p}");
        }
        for x in rand_u64(10_000, 99 + i as u64) {
            assert_eq!(reduce(x, p, pinv), x % p);
        }
    }
}

#[test]
fn product_matches_schoolbook_mod_2_64() {
    let n = 64;
    let ntt = Ntt::new(n).unwrap();
    let a = rand_u64(n, 1);
    let b: Vec<i64> = rand_u64(n, 2)
        .iter()
        .map(|&v| (v % 255) as i64 - 127)
        .collect();
    let mut fa = ntt.zero();
    let mut fb = ntt.zero();
    ntt.fwd_u64(&a, &mut fa);
    ntt.fwd_small(&b, &mut fb);
    let mut acc = ntt.zero();
    ntt.mul_acc(&mut acc, &fa, &fb);
    let mut out = vec![0u64; n];
    ntt.inv(&mut acc, &mut out);
    let bu: Vec<u64> = b.iter().map(|&v| v as u64).collect();
    assert_eq!(out, poly::schoolbook_mul(&a, &bu));
}

#[test]
fn fused_node_ops_match_coefficient_domain() {
    let n = 128;
    let mut ntt = Ntt::new(n).unwrap();
    let (a, b) = (rand_u64(n, 5), rand_u64(n, 6));
    let (mut fa, mut fb) = (ntt.zero(), ntt.zero());
    ntt.fwd_u64(&a, &mut fa);
    ntt.fwd_u64(&b, &mut fb);
    // Monomial product through the normalising multiply with N·X^k.
    let k = 17;
    let mut mono = vec![0i64; n];
    mono[k] = n as i64;
    let mut fm = ntt.zero();
    ntt.fwd_small(&mono, &mut fm);
    let mut t = fb.clone();
    ntt.mul_assign_normalize(&mut t, &fm);
    let mut out = vec![0u64; n];
    ntt.inv(&mut t.clone(), &mut out);
    assert_eq!(out, poly::mul_monomial(&b, k));
    // Butterfly: (a + t, a − t).
    let (mut x, mut y) = (fa.clone(), t);
    ntt.butterfly(&mut x, &mut y);
    let tb = poly::mul_monomial(&b, k);
    ntt.inv(&mut x.clone(), &mut out);
    let sum: Vec<u64> = a.iter().zip(&tb).map(|(p, q)| p.wrapping_add(*q)).collect();
    assert_eq!(out, sum);
    ntt.inv(&mut y.clone(), &mut out);
    let diff: Vec<u64> = a.iter().zip(&tb).map(|(p, q)| p.wrapping_sub(*q)).collect();
    assert_eq!(out, diff);
    // acc += τ_g(b).
    let g = 2 * n / 4 + 1;
    ntt.register_automorphism(g);
    let mut acc = fa.clone();
    ntt.add_automorphism(g, &fb, &mut acc);
    ntt.inv(&mut acc, &mut out);
    let tg = poly::automorphism(&b, g);
    let expect: Vec<u64> = a.iter().zip(&tg).map(|(p, q)| p.wrapping_add(*q)).collect();
    assert_eq!(out, expect);
}

#[test]
fn automorphism_matches_coefficient_domain() {
    let n = 128;
    let mut ntt = Ntt::new(n).unwrap();
    let a = rand_u64(n, 3);
    for g in [3usize, 5, 2 * n - 1, n + 1, 17] {
        ntt.register_automorphism(g);
        let mut fa = ntt.zero();
        ntt.fwd_u64(&a, &mut fa);
        let mut ft = ntt.zero();
        ntt.automorphism(g, &fa, &mut ft);
        let mut out = vec![0u64; n];
        ntt.inv(&mut ft, &mut out);
        assert_eq!(out, poly::automorphism(&a, g), "g = {g}");
    }
}
