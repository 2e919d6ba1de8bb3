//! The signed τ of each bundle's exit head meets its accuracy-loss target on the held-out
//! rows it was calibrated on (issue 10, `specs/planner.md` §7), recomputed from the data and
//! the signed head — not read back from the record.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};

use tandem_dp::exit_head::{cascade_at, exit_rows, RowOutcome, EXIT_SEED};
use tandem_dp::utility::{data_dir, Dataset};
use tandem_model::{read_verifying_key, Bundle, Limits, TestSet};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

#[test]
fn calibrated_tau_meets_the_target_on_the_held_out_rows() {
    let vk = read_verifying_key(&repo().join("models/dev-verifying-key.txt")).unwrap();
    for name in ["digits", "breast_cancer"] {
        let dir = repo().join("models").join(name);
        let b = Bundle::load(&dir, &vk, &Limits::default()).unwrap();
        let head = b.exit_head().unwrap();
        let cal = head.spec().calibration.clone().unwrap();
        assert_eq!(cal.seed, EXIT_SEED);
        let ds = Dataset::load(name, &data_dir()).unwrap();
        let rows = exit_rows(&ds);
        // The held-out rows come from the training split: disjoint from test.json.
        let test = TestSet::load(&dir.join("test.json")).unwrap();
        assert_eq!(rows.test, test.indices);
        assert!(rows.holdout.iter().all(|i| !test.indices.contains(i)));
        assert_eq!(rows.holdout.len(), cal.holdout_samples);
        let outcomes: Vec<RowOutcome> = rows
            .holdout
            .iter()
            .map(|&i| {
                let x: Vec<f32> = ds.x.row(i).iter().map(|&v| v as f32).collect();
                let o = b.exit_confidence(&x).unwrap().unwrap();
                RowOutcome {
                    confidence: o.confidence,
                    head_class: o.class,
                    full_class: b.predict_plain(&x).unwrap().class,
                    label: ds.y[i],
                }
            })
            .collect();
        let p = cascade_at(&outcomes, head.threshold());
        assert!(
            p.loss_bound_points() <= cal.target_loss_points + 1e-9,
            "{name}: {p:?}"
        );
        assert!(cal.target_loss_points <= 0.5);
        assert!((p.local_fraction - cal.holdout_local_fraction).abs() < 1e-12);
        assert!(
            p.local_fraction > 0.5,
            "{name}: the head answers most held-out rows"
        );
        // The test split (never used for τ) reports what the record says.
        let t: Vec<RowOutcome> = test
            .x
            .iter()
            .zip(&test.y)
            .map(|(x, &label)| {
                let o = b.exit_confidence(x).unwrap().unwrap();
                RowOutcome {
                    confidence: o.confidence,
                    head_class: o.class,
                    full_class: b.predict_plain(x).unwrap().class,
                    label,
                }
            })
            .collect();
        let q = cascade_at(&t, head.threshold());
        assert!((q.cascade_accuracy - cal.test_cascade_accuracy).abs() < 1e-12);
    }
}
