//! `tandem privacy-curve` and `tandem bench dp` (differential privacy, crate `tandem-dp`).

use std::path::Path;
use tandem_dp::bottleneck::{self, Channel};
use tandem_dp::utility::{self, Dataset, NoisePoint};
use tandem_dp::{mechanism, Clip, Mechanism, Quantizer};

/// `tandem privacy-curve --dataset NAME --out FILE [--json]`: accuracy vs ε on a UCI dataset.
///
/// Two pipelines (issue 11): `baseline` is today's (a 16- resp. 8-wide hidden activation, L2
/// clip, discrete Gaussian at δ = 1e-5, noise-aware cloud head); `trained` is the split
/// bottleneck of `tandem_dp::bottleneck` (width chosen on a validation split, trained end to
/// end with the exact noise, one variant per ε) with discrete Laplace (pure ε-DP, L1-normalised)
/// and with discrete Gaussian (L2-normalised). Writes one SVG (accuracy vs ε, the three curves)
/// to `out`; prints one line per point: with `--json` a JSON object with `epsilon` (`null` =
/// no noise), `mechanism` (`laplace` | `gaussian`), `pipeline` (`baseline` | `trained`),
/// `accuracy` (test split, mean of 5 noise draws) and context fields (`dim`, `delta`,
/// `noise_scale` on the integer grid).
pub fn privacy_curve(dataset: &str, out: &Path, json: bool) -> anyhow::Result<()> {
    let ds = Dataset::load(dataset, &utility::data_dir())?;
    let base_point = match ds.name.as_str() {
        "digits" => NoisePoint::Hidden(16),
        _ => NoisePoint::Hidden(8),
    };
    let emit = |pipeline: &str, mech: &str, eps: Option<f64>, acc: f64, dim: usize, scale: f64| {
        let delta = (mech == "gaussian" && eps.is_some()).then_some(utility::DELTA);
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "epsilon": eps,
                    "mechanism": mech,
                    "pipeline": pipeline,
                    "accuracy": acc,
                    "dim": dim,
                    "delta": delta,
                    "noise_scale": scale,
                })
            );
        } else {
            let e = eps.map_or("none".to_string(), |e| e.to_string());
            println!("{pipeline:8} {mech:8} dim {dim:2} eps {e:>5}  accuracy {acc:.3}");
        }
    };
    let baseline = utility::privacy_curve(&ds, base_point)?;
    for p in &baseline {
        emit(
            "baseline", "gaussian", p.epsilon, p.accuracy, p.dim, p.sigma,
        );
    }
    let base_dim = baseline.first().map_or(0, |p| p.dim);
    let mut series = vec![(
        format!("today's pipeline: {base_dim}-d hidden, Gaussian"),
        baseline,
    )];
    let (d, scores) = bottleneck::choose_dim(&ds)?;
    eprintln!(
        "bottleneck width chosen on the validation split (Laplace, ε = {}): {d}; validation \
         accuracy per width: {scores:?}",
        bottleneck::SELECT_EPSILON
    );
    for ch in [Channel::Laplace, Channel::Gaussian] {
        let pts = bottleneck::trained_curve(&ds, ch, d)?;
        for p in &pts {
            emit("trained", ch.name(), p.epsilon, p.accuracy, p.dim, p.scale);
        }
        let curve = pts
            .iter()
            .map(|p| utility::CurvePoint {
                epsilon: p.epsilon,
                accuracy: p.accuracy,
                accuracy_clean_head: p.accuracy,
                dim: p.dim,
                sigma: p.scale,
                sigma_over_signal: p.scale / bottleneck::GRID,
            })
            .collect();
        series.push((format!("trained {d}-d bottleneck, {}", ch.name()), curve));
    }
    tandem_dp::plot::write_svg(
        out,
        &format!("{}: accuracy vs ε per release (local DP)", ds.name),
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
