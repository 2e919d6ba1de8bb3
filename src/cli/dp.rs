//! `tandem privacy-curve` and `tandem bench dp` (differential privacy, crate `tandem-dp`).

use std::path::Path;
use tandem_dp::utility::{self, Dataset, NoisePoint};
use tandem_dp::{mechanism, Clip, Mechanism, Quantizer};

/// `tandem privacy-curve --dataset NAME --out FILE`: accuracy vs ε on a UCI dataset.
///
/// Writes an SVG plot to `out` (main curve plus wider-activation comparisons) and prints one
/// JSON object per line for the main curve: `epsilon` (number, or `null` for no noise),
/// `accuracy`, and context fields (`delta`, `dim`, `accuracy_clean_head`, `sigma`).
pub fn privacy_curve(dataset: &str, out: &Path) -> anyhow::Result<()> {
    let ds = Dataset::load(dataset, &utility::data_dir())?;
    let (main, extras): (NoisePoint, Vec<NoisePoint>) = match ds.name.as_str() {
        "digits" => (
            NoisePoint::Hidden(16),
            vec![NoisePoint::Hidden(64), NoisePoint::Input(32)],
        ),
        _ => (
            NoisePoint::Hidden(8),
            vec![NoisePoint::Hidden(32), NoisePoint::Input(16)],
        ),
    };
    let label = |p: NoisePoint, d: usize| match p {
        NoisePoint::Hidden(h) => format!("hidden activation, {h} dims"),
        NoisePoint::Input(_) => format!("input features, {d} dims"),
    };
    let main_curve = utility::privacy_curve(&ds, main)?;
    for p in &main_curve {
        println!(
            "{}",
            serde_json::json!({
                "epsilon": p.epsilon,
                "accuracy": p.accuracy,
                "accuracy_clean_head": p.accuracy_clean_head,
                "delta": utility::DELTA,
                "dim": p.dim,
                "sigma": p.sigma,
            })
        );
    }
    let dim = main_curve.first().map_or(0, |p| p.dim);
    let mut series = vec![(label(main, dim), main_curve)];
    for e in extras {
        let c = utility::privacy_curve(&ds, e)?;
        let d = c.first().map_or(0, |p| p.dim);
        series.push((label(e, d), c));
    }
    tandem_dp::plot::write_svg(
        out,
        &format!("{}: accuracy vs ε (local DP, discrete Gaussian)", ds.name),
        &series,
    )?;
    Ok(())
}

/// `tandem bench dp [--json]`: time to draw exact discrete Gaussian noise for n = 1024
/// activations (L2 clip C = 1, grid s = 256, (ε, δ) = (1, 1e-5) per vector), median of 11 runs.
pub fn bench_dp(json: bool) -> anyhow::Result<()> {
    let n = 1024;
    let q = Quantizer::new(Clip::L2(1.0), 256.0, n)?;
    let mech = Mechanism::gaussian_for_epsilon_delta(q, 1.0, 1e-5)?;
    let mut runs = mechanism::bench_noise_ms(&mech, 11)?;
    runs.sort_by(f64::total_cmp);
    let median = runs.get(runs.len() / 2).copied().unwrap_or(f64::NAN);
    let lap = Mechanism::laplace_for_epsilon(q, 1.0)?;
    let mut lruns = mechanism::bench_noise_ms(&lap, 11)?;
    lruns.sort_by(f64::total_cmp);
    let lmedian = lruns.get(lruns.len() / 2).copied().unwrap_or(f64::NAN);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "n": n,
                "mechanism": "discrete_gaussian",
                "noise_ms": median,
                "runs": runs.len(),
                "min_ms": runs.first(),
                "max_ms": runs.last(),
                "sigma": mech.sigma_or_scale(),
                "epsilon": 1.0,
                "delta": 1e-5,
                "laplace_noise_ms": lmedian,
                "laplace_scale": lap.sigma_or_scale(),
            })
        );
    } else {
        println!(
            "dp noise, n = {n}: discrete Gaussian σ = {:.1}: median {median:.3} ms over {} runs \
             (min {:.3}, max {:.3}); discrete Laplace b = {:.1}: median {lmedian:.3} ms",
            mech.sigma_or_scale(),
            runs.len(),
            runs.first().copied().unwrap_or(f64::NAN),
            runs.last().copied().unwrap_or(f64::NAN),
            lap.sigma_or_scale()
        );
    }
    Ok(())
}
