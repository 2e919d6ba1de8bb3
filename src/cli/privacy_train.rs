//! `tandem privacy-train` (issue 11): the noise-trained bottleneck variants into a signed
//! bundle. Separate from `dp.rs`, which `tandem-dp`'s `dp_cli` example compiles without
//! `tandem-model`.

use std::path::Path;
use tandem_dp::bottleneck::{self, Channel};
use tandem_dp::utility::{self, Dataset};
use tandem_dp::Mechanism;

/// `tandem privacy-train --dataset D --bundle DIR --epsilons 4,8,16 [--grid 64] --key F [--pubkey P]`:
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
pub fn run(
    dataset: &str,
    bundle: &Path,
    epsilons: &[f64],
    grid: f64,
    key: &Path,
    pubkey: Option<&Path>,
) -> anyhow::Result<()> {
    use tandem_model::{
        DpMechanism, LayerKind, LayerSpec, NamedTensor, Placement, PrivacySpec, PrivacyTraining,
        QuantSpec, TensorData, VariantSpec,
    };
    const CLAMP: i64 = 127;
    // Everything that can be checked before minutes of training is checked first.
    anyhow::ensure!(
        !epsilons.is_empty() && epsilons.len() <= 16,
        "--epsilons: give 1 to 16 values"
    );
    anyhow::ensure!(
        epsilons.iter().all(|e| e.is_finite() && *e > 0.0),
        "--epsilons: every ε must be finite and > 0"
    );
    anyhow::ensure!(
        epsilons.windows(2).all(|w| w[0] < w[1]),
        "--epsilons must be strictly increasing (e.g. 4,8,16)"
    );
    anyhow::ensure!(
        grid.is_finite() && grid >= 1.0,
        "--grid must be a finite number >= 1"
    );
    let signing = tandem_model::read_signing_key(key)?;
    if tandem_model::is_dev_key(&signing.verifying_key()) {
        eprintln!(
            "warning: {} is the public DEVELOPMENT signing key: anyone can sign with it",
            key.display()
        );
    }
    // Re-signing must never launder a bundle whose present signature does not verify.
    let current_vk = match pubkey {
        Some(p) => tandem_model::read_verifying_key(p)?,
        None => signing.verifying_key(),
    };
    let current = tandem_model::Bundle::load(bundle, &current_vk, &tandem_model::Limits::default())
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} — the bundle must verify under the key it is signed with now \
                 (--pubkey; default: the verifying key of --key) before it is re-signed",
                bundle.display()
            )
        })?;
    anyhow::ensure!(
        current.manifest().dataset == dataset,
        "{}: the bundle was trained on dataset {:?}, not {dataset:?}",
        bundle.display(),
        current.manifest().dataset
    );
    drop(current);
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
