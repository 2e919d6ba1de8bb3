//! Shared statistics helpers for the tests (χ² survival function).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

fn ln_gamma(x: f64) -> f64 {
    // Lanczos (g = 7, n = 9), relative error ~1e-15.
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Regularised upper incomplete gamma Q(a, x).
pub fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    if x < a + 1.0 {
        // series for P
        let mut sum = 1.0 / a;
        let mut del = sum;
        let mut ap = a;
        for _ in 0..10_000 {
            ap += 1.0;
            del *= x / ap;
            sum += del;
            if del.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * (-x + a * x.ln() - ln_gamma(a)).exp()
    } else {
        // continued fraction (Lentz)
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (-x + a * x.ln() - ln_gamma(a)).exp() * h
    }
}

/// P[χ²_df ≥ stat].
pub fn chi2_sf(stat: f64, df: usize) -> f64 {
    gamma_q(df as f64 / 2.0, stat / 2.0)
}

/// Goodness of fit of integer samples to a pmf on ℤ given by `pmf(x)` (normalised).
/// Bins: consecutive integers grouped so that every bin expects ≥ 50 counts; two tail bins.
/// Returns (statistic, df, p-value).
pub fn chi2_gof(samples: &[i64], pmf: &dyn Fn(i64) -> f64, support: i64) -> (f64, usize, f64) {
    chi2_gof_binned(samples, pmf, support, 50.0)
}

/// [`chi2_gof`] with bins that each expect ≥ `min_expected` counts. Fewer, wider bins keep
/// the noncentrality of a smooth deviation (a wrong scale) but cut the degrees of freedom,
/// so they detect it with far more power.
pub fn chi2_gof_binned(
    samples: &[i64],
    pmf: &dyn Fn(i64) -> f64,
    support: i64,
    min_expected: f64,
) -> (f64, usize, f64) {
    let n = samples.len() as f64;
    // Build bin edges over [-support, support].
    let mut edges: Vec<(i64, i64, f64)> = Vec::new(); // [lo, hi], prob
    let mut lo = -support;
    let mut acc = 0.0;
    for x in -support..=support {
        acc += pmf(x);
        if acc * n >= min_expected {
            edges.push((lo, x, acc));
            lo = x + 1;
            acc = 0.0;
        }
    }
    if acc > 0.0 {
        if let Some(last) = edges.last_mut() {
            last.1 = support;
            last.2 += acc;
        }
    }
    let first_lo = edges.first().unwrap().0;
    let last_hi = edges.last().unwrap().1;
    let inside: f64 = edges.iter().map(|e| e.2).sum();
    // Tails are merged into the outermost bins.
    let tail = (1.0 - inside).max(0.0) / 2.0;
    let k = edges.len();
    edges[0].2 += tail;
    edges[k - 1].2 += tail;
    edges[0].0 = i64::MIN;
    edges[k - 1].1 = i64::MAX;
    let _ = (first_lo, last_hi);
    let mut counts = vec![0u64; k];
    for &s in samples {
        let i = edges.partition_point(|e| e.1 < s);
        counts[i.min(k - 1)] += 1;
    }
    let stat: f64 = counts
        .iter()
        .zip(&edges)
        .map(|(&c, e)| {
            let exp = e.2 * n;
            (c as f64 - exp).powi(2) / exp
        })
        .sum();
    let df = k - 1;
    (stat, df, chi2_sf(stat, df))
}

/// Two-sample χ² test of homogeneity; bins are merged so each expects ≥ 20 in the smaller
/// sample. Returns (statistic, df, p-value).
pub fn chi2_two_sample(a: &[i64], b: &[i64]) -> (f64, usize, f64) {
    use std::collections::BTreeMap;
    let mut ca: BTreeMap<i64, u64> = BTreeMap::new();
    let mut cb: BTreeMap<i64, u64> = BTreeMap::new();
    for &x in a {
        *ca.entry(x).or_default() += 1;
    }
    for &x in b {
        *cb.entry(x).or_default() += 1;
    }
    let keys: std::collections::BTreeSet<i64> = ca.keys().chain(cb.keys()).copied().collect();
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let mut bins: Vec<(f64, f64)> = Vec::new();
    let (mut xa, mut xb) = (0.0, 0.0);
    for k in keys {
        xa += *ca.get(&k).unwrap_or(&0) as f64;
        xb += *cb.get(&k).unwrap_or(&0) as f64;
        // expected count in the smaller sample under H0
        if (xa + xb) * nb.min(na) / (na + nb) >= 20.0 {
            bins.push((xa, xb));
            xa = 0.0;
            xb = 0.0;
        }
    }
    if xa + xb > 0.0 {
        let last = bins.last_mut().unwrap();
        last.0 += xa;
        last.1 += xb;
    }
    let n = na + nb;
    let mut stat = 0.0;
    for &(oa, ob) in &bins {
        let tot = oa + ob;
        let ea = tot * na / n;
        let eb = tot * nb / n;
        stat += (oa - ea).powi(2) / ea + (ob - eb).powi(2) / eb;
    }
    let df = bins.len() - 1;
    (stat, df, chi2_sf(stat, df))
}
