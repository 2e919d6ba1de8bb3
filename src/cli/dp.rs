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

/// `tandem privacy-train --dataset D --bundle DIR --epsilons 4,8,16 [--grid 64] [--key F]`:
/// trains the noise-trained bottleneck variants of issue 11 (discrete Laplace, one per ε,
/// `tandem_dp::bottleneck::train_variants`), writes them into the bundle's `[privacy]` section
/// (device tensors in the device file, the int8 cloud layer in the cloud file) and re-signs
/// the bundle; then measures each variant's accuracy on the bundle's `test.json` through the
/// bundle's exact pipeline with the calibrated release (5 noise draws), records it in the
/// manifest and signs again. Prints one JSON object per variant.
///
/// The bottleneck width d is chosen from `bottleneck::DIMS` on a validation split carved from
/// the training rows (never the test split). The released integers are clamped to ±127 (the
/// int8 input range of the encrypted layer; post-processing) in training and at release.
pub fn privacy_train(
    dataset: &str,
    bundle: &Path,
    epsilons: &[f64],
    grid: f64,
    key: &Path,
) -> anyhow::Result<()> {
    use tandem_model::{
        DpMechanism, LayerKind, LayerSpec, NamedTensor, Placement, PrivacySpec, PrivacyTraining,
        QuantSpec, TensorData, VariantSpec,
    };
    const CLAMP: i64 = 127;
    let ds = Dataset::load(dataset, &utility::data_dir())?;
    let (d, scores) = bottleneck::choose_dim_at(&ds, grid, CLAMP as f64)?;
    eprintln!(
        "bottleneck width chosen on the validation split: {d} (accuracy per width: {scores:?})"
    );
    let trained =
        bottleneck::train_variants(&ds, Channel::Laplace, d, grid, CLAMP as f64, epsilons)?;
    let mut variants = Vec::new();
    let mut tensors = Vec::new();
    let f32s = |v: &[f64]| TensorData::F32(v.iter().map(|&x| x as f32).collect());
    for t in &trained {
        let tag = format!("dp.eps{}", t.epsilon);
        let mut layers = Vec::new();
        let names = ["fc0", "bottleneck", "cloud", "head"];
        for (i, (name, l)) in names.iter().zip(&t.layers).enumerate() {
            let weight = format!("{tag}.{name}.weight");
            let bias = format!("{tag}.{name}.bias");
            let (activation, placement) = match i {
                0 | 2 => (tandem_model::Activation::Relu, Placement::Device),
                1 => (tandem_model::Activation::None, Placement::Device),
                _ => (tandem_model::Activation::Argmax, Placement::Device),
            };
            let placement = if i == 2 { Placement::Cloud } else { placement };
            let mut quant = None;
            if i == 2 {
                let max_w = l.w.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
                let weight_scale = (max_w / 127.0) as f32;
                let input_scale = (1.0 / grid) as f32;
                let unit = f64::from(input_scale) * f64::from(weight_scale);
                let wq: Vec<i8> =
                    l.w.iter()
                        .map(|v| (v / f64::from(weight_scale)).round().clamp(-127.0, 127.0) as i8)
                        .collect();
                let bq: Vec<i64> = l.b.iter().map(|v| (v / unit).round() as i64).collect();
                let max_abs_bias = bq.iter().map(|v| v.abs()).max().unwrap_or(0);
                quant = Some(QuantSpec {
                    input_scale,
                    weight_scale,
                    input_clip: CLAMP,
                    max_abs_bias: Some(max_abs_bias),
                });
                tensors.push(NamedTensor {
                    name: weight.clone(),
                    shape: vec![l.n_out, l.n_in],
                    data: TensorData::I8(wq),
                });
                tensors.push(NamedTensor {
                    name: bias.clone(),
                    shape: vec![l.n_out],
                    data: TensorData::I64(bq),
                });
            } else {
                tensors.push(NamedTensor {
                    name: weight.clone(),
                    shape: vec![l.n_out, l.n_in],
                    data: f32s(&l.w),
                });
                tensors.push(NamedTensor {
                    name: bias.clone(),
                    shape: vec![l.n_out],
                    data: f32s(&l.b),
                });
            }
            layers.push(LayerSpec {
                name: format!("{tag}.{name}"),
                kind: LayerKind::Dense,
                n_in: l.n_in,
                n_out: l.n_out,
                activation,
                placement,
                weight,
                bias,
                quant,
            });
        }
        variants.push(VariantSpec {
            epsilon: t.epsilon,
            test_accuracy: None,
            layers,
        });
    }
    let eps_arg: Vec<String> = epsilons.iter().map(|e| e.to_string()).collect();
    let mut spec = PrivacySpec {
        mechanism: DpMechanism::Laplace,
        delta: None,
        bottleneck: d,
        training: Some(PrivacyTraining {
            command: format!(
                "cargo run --release -- privacy-train --dataset {dataset} --bundle {} \
                 --epsilons {} --grid {grid}",
                bundle.display(),
                eps_arg.join(",")
            ),
            seed: utility::SEED,
            method: format!(
                "tandem_dp::bottleneck::train_variants: 70/30 split (seed {}), d = {d} chosen \
                 from {:?} on the last 20 % of the training rows at eps {} (Laplace); {} clean \
                 epochs, then per eps {} ramp + {} epochs with the exact noise (grid {grid}, \
                 released integers clamped to ±{CLAMP}); cloud layer quantised to int8 \
                 (per-tensor scale max|w|/127)",
                utility::SEED,
                bottleneck::DIMS,
                bottleneck::SELECT_EPSILON,
                bottleneck::CLEAN_EPOCHS,
                bottleneck::RAMP_EPOCHS,
                bottleneck::FULL_EPOCHS
            ),
        }),
        variants,
    };
    let signing = tandem_model::read_signing_key(key)?;
    tandem_model::attach_privacy(bundle, spec.clone(), tensors.clone(), &signing)?;
    // Measure through the signed bundle's own pipeline, then record the figures.
    let vk = signing.verifying_key();
    let b = tandem_model::Bundle::load(bundle, &vk, &tandem_model::Limits::default())?;
    let test = tandem_model::TestSet::load(&bundle.join("test.json"))?;
    let mut rng = tandem_dp::SecureBits::new()?;
    for (v, t) in b.variants().iter().zip(&trained) {
        let mech = Mechanism::for_bottleneck(true, d, v.grid(), v.epsilon(), None)?;
        let mut ok = 0usize;
        let draws = utility::NOISE_REPEATS;
        for _ in 0..draws {
            for (x, &y) in test.x.iter().zip(&test.y) {
                let p = v.predict_with(x, &mut |a| {
                    let a: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
                    let q = mech
                        .release_unaccounted(&a, &mut rng)
                        .map_err(|e| tandem_model::ModelError::InvalidInput(e.to_string()))?;
                    Ok(q.into_iter().map(|v| v.clamp(-CLAMP, CLAMP)).collect())
                })?;
                ok += usize::from(p.class == y);
            }
        }
        let acc = ok as f64 / (draws * test.y.len()) as f64;
        if let Some(s) = spec.variants.iter_mut().find(|s| s.epsilon == v.epsilon()) {
            s.test_accuracy = Some(acc);
        }
        println!(
            "{}",
            serde_json::json!({
                "dataset": dataset,
                "epsilon": v.epsilon(),
                "mechanism": "laplace",
                "dim": d,
                "grid": v.grid(),
                "noise_scale": mech.sigma_or_scale(),
                "float_test_accuracy": t.float_test_accuracy,
                "bundle_test_accuracy": acc,
            })
        );
    }
    tandem_model::attach_privacy(bundle, spec, tensors, &signing)?;
    Ok(())
}
