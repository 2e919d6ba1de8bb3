//! Early-exit head trainer and τ calibration (issue 10; `specs/planner.md` §7; feature
//! `tools`).
//!
//! * Rows ([`exit_rows`]): the bundle trainer's split (SplitMix64 seed 42, Fisher–Yates, first
//!   70 % train, last 30 % test — [`crate::utility::split`]) and then the **training** rows
//!   shuffled again by SplitMix64 seeded [`EXIT_SEED`]: the last [`HOLDOUT_PERCENT`] % are
//!   held out for calibrating τ, the head is trained on the rest. The test rows are never
//!   used for training or calibration.
//! * Head ([`distill`]): one dense layer `classes × d` on the split activation (the real-valued
//!   input of the first cloud layer), trained by distillation from the full model's logits:
//!   softmax cross-entropy against the soft targets `softmax(t / T)` at temperature `T`,
//!   Adam, mini-batches of 32 in a SplitMix64 order, L2 1e-4. Deterministic.
//! * τ ([`calibrate`]): the smallest threshold such that, at it **and at every higher
//!   threshold**, the cascade (answer with the head when its confidence ≥ τ, else with the
//!   full model) loses at most the target accuracy (in points) against the full model on the
//!   held-out rows — both as observed and as the head itself predicts (`Σ (1 − confidence)`
//!   over the rows it answers, [`CascadePoint::loss_bound_points`]): the held-out rows were
//!   part of the bundle's training split, so the device layers and the full model have seen
//!   them and the observed loss alone is optimistic (it is 0 on every bundle).

use crate::error::{DpError, Result};
use crate::utility::{Dataset, SplitMix, SEED};
use ndarray::{Array1, Array2, Axis};

/// Seed of the held-out split and of the head's initialisation and mini-batch order.
pub const EXIT_SEED: u64 = 4242;
/// Share of the training rows held out for calibrating τ, in percent.
pub const HOLDOUT_PERCENT: usize = 25;
/// Default largest accuracy loss of the cascade against the full model, in points.
pub const TARGET_LOSS_POINTS: f64 = 0.5;

/// Row indices (into the dataset) of each part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitRows {
    /// Training rows the head is fitted on.
    pub fit: Vec<usize>,
    /// Training rows held out for calibrating τ.
    pub holdout: Vec<usize>,
    /// The bundle's test rows (same order as its `test.json`).
    pub test: Vec<usize>,
}

/// The rows of `ds` by role (see the module docs).
pub fn exit_rows(ds: &Dataset) -> ExitRows {
    let n = ds.y.len();
    let mut idx: Vec<usize> = (0..n).collect();
    SplitMix(SEED).shuffle(&mut idx);
    let n_train = n * 7 / 10;
    let test = idx.split_off(n_train);
    let mut train = idx;
    SplitMix(EXIT_SEED).shuffle(&mut train);
    let n_hold = n_train * HOLDOUT_PERCENT / 100;
    let holdout = train.split_off(n_train - n_hold);
    ExitRows {
        fit: train,
        holdout,
        test,
    }
}

/// Hyper-parameters of [`distill`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistillConfig {
    /// Temperature `T` of the soft targets.
    pub temperature: f64,
    /// Epochs.
    pub epochs: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// L2 weight decay.
    pub l2: f64,
    /// Seed of the initialisation and the mini-batch order.
    pub seed: u64,
}

impl Default for DistillConfig {
    /// T = 2, 200 epochs, lr 1e-2, L2 1e-4, seed [`EXIT_SEED`].
    fn default() -> Self {
        DistillConfig {
            temperature: 2.0,
            epochs: 200,
            lr: 1e-2,
            l2: 1e-4,
            seed: EXIT_SEED,
        }
    }
}

/// A dense head: logits `W·a + b`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearHead {
    /// `[classes, d]`.
    pub w: Array2<f64>,
    /// `[classes]`.
    pub b: Array1<f64>,
}

impl LinearHead {
    /// Logits for activations `a` `[n, d]`: `[n, classes]`.
    pub fn logits(&self, a: &Array2<f64>) -> Array2<f64> {
        a.dot(&self.w.t()) + &self.b
    }
}

fn softmax_rows(z: &Array2<f64>, t: f64) -> Array2<f64> {
    let mut p = z.mapv(|v| v / t);
    for mut row in p.rows_mut() {
        let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - m).exp());
        let s = row.sum();
        row /= s;
    }
    p
}

/// Trains a [`LinearHead`] on activations `a` `[n, d]` by distillation from the full model's
/// logits `teacher` `[n, classes]` (module docs).
///
/// # Errors
/// [`DpError::InvalidInput`] for mismatched or empty inputs, non-finite values or a
/// temperature that is not positive.
pub fn distill(a: &Array2<f64>, teacher: &Array2<f64>, cfg: &DistillConfig) -> Result<LinearHead> {
    let (n, d) = a.dim();
    let k = teacher.ncols();
    if n == 0 || d == 0 || k < 2 || teacher.nrows() != n {
        return Err(DpError::InvalidInput(format!(
            "distill: {n}×{d} activations with {}×{k} teacher logits",
            teacher.nrows()
        )));
    }
    if a.iter().chain(teacher.iter()).any(|v| !v.is_finite())
        || !(cfg.temperature.is_finite() && cfg.temperature > 0.0)
    {
        return Err(DpError::InvalidInput(
            "distill: non-finite input or temperature <= 0".into(),
        ));
    }
    let target = softmax_rows(teacher, cfg.temperature);
    let mut rng = SplitMix(cfg.seed);
    let scale = 1.0 / (d as f64).sqrt();
    let mut head = LinearHead {
        w: Array2::from_shape_fn((k, d), |_| (2.0 * rng.unit() - 1.0) * scale),
        b: Array1::zeros(k),
    };
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let (mut mw, mut vw) = (Array2::<f64>::zeros((k, d)), Array2::<f64>::zeros((k, d)));
    let (mut mb, mut vb) = (Array1::<f64>::zeros(k), Array1::<f64>::zeros(k));
    let mut step = 0i32;
    let mut order: Vec<usize> = (0..n).collect();
    for _ in 0..cfg.epochs {
        rng.shuffle(&mut order);
        for chunk in order.chunks(32) {
            let xb = a.select(Axis(0), chunk);
            let tb = target.select(Axis(0), chunk);
            // d/dz of T²·CE(softmax(z/T), p_t) = T·(softmax(z/T) − p_t) (Hinton et al. 2015).
            let p = softmax_rows(&head.logits(&xb), cfg.temperature);
            let delta = (p - tb) * (cfg.temperature / chunk.len() as f64);
            let gw = delta.t().dot(&xb) + &head.w * cfg.l2;
            let gb = delta.sum_axis(Axis(0));
            step += 1;
            let c1 = 1.0 - b1.powi(step);
            let c2 = 1.0 - b2.powi(step);
            mw = &mw * b1 + &gw * (1.0 - b1);
            vw = &vw * b2 + &gw.mapv(|g| g * g) * (1.0 - b2);
            mb = &mb * b1 + &gb * (1.0 - b1);
            vb = &vb * b2 + &gb.mapv(|g| g * g) * (1.0 - b2);
            let uw = (&mw / c1) / (vw.mapv(|v| (v / c2).sqrt()) + eps);
            let ub = (&mb / c1) / (vb.mapv(|v| (v / c2).sqrt()) + eps);
            head.w.scaled_add(-cfg.lr, &uw);
            head.b.scaled_add(-cfg.lr, &ub);
        }
    }
    Ok(head)
}

/// The cascade at one τ on labelled rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CascadePoint {
    /// Threshold.
    pub tau: f64,
    /// Accuracy of the full model alone.
    pub full_accuracy: f64,
    /// Accuracy of the cascade.
    pub cascade_accuracy: f64,
    /// Fraction answered by the head (confidence ≥ τ).
    pub local_fraction: f64,
    /// The head's own error estimate on the rows it answers, `100 · Σ (1 − confidence) / n`,
    /// in points.
    pub expected_head_errors_points: f64,
}

impl CascadePoint {
    /// Accuracy lost against the full model, in percentage points (negative: a gain).
    pub fn loss_points(&self) -> f64 {
        100.0 * (self.full_accuracy - self.cascade_accuracy)
    }

    /// What calibration holds to the target: the larger of the observed loss and the
    /// head's own estimate of its errors on the rows it answers, `100 · Σ (1 − confidence) / n`
    /// over the rows with confidence ≥ τ (the held-out rows were seen by the device layers
    /// and the full model in training, so the observed loss alone is optimistic).
    pub fn loss_bound_points(&self) -> f64 {
        self.loss_points().max(self.expected_head_errors_points)
    }
}

/// Per-row outcomes the cascade is evaluated from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowOutcome {
    /// The head's confidence.
    pub confidence: f64,
    /// The head's class.
    pub head_class: usize,
    /// The full model's class.
    pub full_class: usize,
    /// The label.
    pub label: usize,
}

/// The cascade at threshold `tau` over `rows`.
pub fn cascade_at(rows: &[RowOutcome], tau: f64) -> CascadePoint {
    let n = rows.len().max(1) as f64;
    let mut full = 0usize;
    let mut cascade = 0usize;
    let mut local = 0usize;
    let mut expected = 0.0;
    for r in rows {
        full += usize::from(r.full_class == r.label);
        if r.confidence >= tau {
            local += 1;
            expected += 1.0 - r.confidence;
            cascade += usize::from(r.head_class == r.label);
        } else {
            cascade += usize::from(r.full_class == r.label);
        }
    }
    CascadePoint {
        tau,
        full_accuracy: full as f64 / n,
        cascade_accuracy: cascade as f64 / n,
        local_fraction: local as f64 / n,
        expected_head_errors_points: 100.0 * expected / n,
    }
}

/// Calibrates τ on held-out rows for at most `max_loss_points` accuracy loss (module docs):
/// candidate thresholds are the rows' confidences, taken from the highest down; the walk stops
/// at the first one whose [`CascadePoint::loss_bound_points`] exceeds the target, and the last
/// one that met it is τ.
///
/// # Errors
/// [`DpError::InvalidInput`] if `rows` is empty or holds a non-finite confidence, and if not
/// even the highest confidence meets the target (no head worth shipping).
pub fn calibrate(rows: &[RowOutcome], max_loss_points: f64) -> Result<CascadePoint> {
    if rows.is_empty() || rows.iter().any(|r| !r.confidence.is_finite()) {
        return Err(DpError::InvalidInput(
            "calibrate: no rows, or a non-finite confidence".into(),
        ));
    }
    let mut taus: Vec<f64> = rows.iter().map(|r| r.confidence).collect();
    taus.sort_by(|a, b| b.total_cmp(a));
    taus.dedup();
    let mut best = None;
    for tau in taus {
        let p = cascade_at(rows, tau);
        // A small tolerance for the float difference of two equal accuracies.
        if p.loss_bound_points() > max_loss_points + 1e-9 {
            break;
        }
        best = Some(p);
    }
    best.ok_or_else(|| {
        DpError::InvalidInput(format!(
            "calibrate: even the most confident held-out row loses more than \
             {max_loss_points} points; retrain the head or raise the target"
        ))
    })
}

/// One curve of [`write_svg`]: a name and `(τ, accuracy, offload rate)` points.
pub type TauSeries = (String, Vec<(f64, f64, f64)>);

/// Writes an SVG plot of test accuracy (solid) and offload rate (dashed) against τ, one
/// colour per series.
///
/// # Errors
/// [`DpError::Plot`] if plotters fails.
pub fn write_svg(path: &std::path::Path, title: &str, series: &[TauSeries]) -> Result<()> {
    use plotters::prelude::*;
    let perr = |e: &dyn std::fmt::Display| DpError::Plot(e.to_string());
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(&e))?;
    let xmin = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(1.0f64, f64::min);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((xmin - 0.02)..1.0f64, 0.0f64..1.0f64)
        .map_err(|e| perr(&e))?;
    chart
        .configure_mesh()
        .x_desc("τ (answer locally when the exit head's confidence ≥ τ)")
        .y_desc("test accuracy (solid) / offload rate (dashed)")
        .draw()
        .map_err(|e| perr(&e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let acc: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, p.1)).collect();
        let off: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, p.2)).collect();
        chart
            .draw_series(LineSeries::new(acc, color.stroke_width(2)))
            .map_err(|e| perr(&e))?
            .label(format!("{name}: accuracy"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(DashedLineSeries::new(off, 6, 4, color.stroke_width(2)))
            .map_err(|e| perr(&e))?
            .label(format!("{name}: offload rate"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 8, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|e| perr(&e))?;
    root.present().map_err(|e| perr(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row(confidence: f64, head_ok: bool, full_ok: bool) -> RowOutcome {
        RowOutcome {
            confidence,
            head_class: usize::from(!head_ok),
            full_class: usize::from(!full_ok),
            label: 0,
        }
    }

    #[test]
    fn calibration_stops_at_the_first_threshold_that_loses_too_much() {
        // 10 rows; the full model is right on all. The head is right and nearly sure on 8,
        // wrong at confidence 0.99 and 0.98: at τ = 0.99 the cascade loses 10 points, so with
        // a 0.5-point target τ stays at the 8th row even though lower thresholds would not
        // lose more.
        let mut rows: Vec<RowOutcome> = (0..8)
            .map(|i| row(1.0 - 1e-4 * f64::from(i), true, true))
            .collect();
        rows.push(row(0.99, false, true));
        rows.push(row(0.98, false, true));
        let p = calibrate(&rows, 0.5).unwrap();
        assert!((p.tau - (1.0 - 7e-4)).abs() < 1e-12, "{p:?}");
        assert!((p.local_fraction - 0.8).abs() < 1e-12);
        assert!(p.loss_bound_points() <= 0.5);
        // With a 10-point budget τ reaches 0.99 (one error) but not 0.98 (two).
        let p = calibrate(&rows, 10.0).unwrap();
        assert!((p.tau - 0.99).abs() < 1e-12, "{p:?}");
        // A head wrong on its most confident row is refused.
        assert!(calibrate(&[row(0.9999, false, true)], 0.5).is_err());
    }

    #[test]
    fn calibration_holds_the_heads_own_error_estimate_to_the_target() {
        // Every row right, but the head says it is only 90-99 % sure: the expected errors
        // (1 − confidence) count against the target although none is observed.
        let rows: Vec<RowOutcome> = (0..100)
            .map(|i| row(0.99 - 0.0009 * f64::from(i), true, true))
            .collect();
        let p = calibrate(&rows, 0.5).unwrap();
        assert_eq!(p.loss_points(), 0.0);
        assert!(p.expected_head_errors_points <= 0.5);
        // Lowering τ by one more row would break the bound.
        let next = rows
            .iter()
            .map(|r| r.confidence)
            .filter(|&c| c < p.tau)
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(cascade_at(&rows, next).loss_bound_points() > 0.5);
        assert!(p.local_fraction < 0.5, "{p:?}");
        // The observed-only loss would have let every row through.
        assert!(cascade_at(&rows, 0.0).loss_points() <= 0.0);
    }

    #[test]
    fn rows_partition_the_dataset_and_keep_the_bundle_split() {
        let ds = Dataset::load("breast_cancer", &crate::utility::data_dir()).unwrap();
        let r = exit_rows(&ds);
        let n = ds.y.len();
        assert_eq!(r.fit.len() + r.holdout.len(), n * 7 / 10);
        assert_eq!(r.holdout.len(), (n * 7 / 10) * HOLDOUT_PERCENT / 100);
        let mut all: Vec<usize> = r
            .fit
            .iter()
            .chain(&r.holdout)
            .chain(&r.test)
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn distillation_matches_a_linear_teacher() {
        // Teacher logits are a linear function of the input: the head recovers its argmax.
        let mut rng = SplitMix(7);
        let a = Array2::from_shape_fn((300, 4), |_| rng.unit() * 4.0);
        let wt = Array2::from_shape_fn((3, 4), |(i, j)| if i == j { 2.0 } else { -0.5 });
        let t = a.dot(&wt.t());
        let head = distill(&a, &t, &DistillConfig::default()).unwrap();
        let agree = head
            .logits(&a)
            .rows()
            .into_iter()
            .zip(t.rows())
            .filter(|(h, t)| argmax(h.iter()) == argmax(t.iter()))
            .count();
        assert!(agree >= 290, "{agree}/300");
    }

    fn argmax<'a>(v: impl Iterator<Item = &'a f64>) -> usize {
        v.enumerate()
            .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &x)| {
                if x > bv {
                    (i, x)
                } else {
                    (bi, bv)
                }
            })
            .0
    }
}
