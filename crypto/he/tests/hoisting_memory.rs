//! Working memory of a hoisted evaluation (issue 9, engine v2): the hoisted inputs (2^L·chunks
//! key-switched ciphertexts per batch block) live one batch block at a time, so a request of
//! many blocks — a row-by-row plan with 64 rows is 64 blocks — does not hold every block's at
//! once (before: 64 × 32 × 2 polynomials ≈ 200 MB for a 50 MB layer).
//!
//! Measured as the growth of the process's peak RSS (`VmHWM`, reset through
//! `/proc/self/clear_refs`) over one evaluation, after a one-block evaluation has warmed up the
//! thread pool; the only test of this binary, so no other test's allocations are counted.
//! Skips, saying why, where `/proc` does not offer that.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use tandem_he::*;

/// `field` of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[test]
fn a_many_block_request_holds_one_blocks_hoisted_inputs_at_a_time() {
    let f = fixture();
    // Signed row bounds (one ±127 per row) give a row-by-row plan room to hoist deep.
    let (n_in, n_out) = (1024, 4096);
    let bounds = WeightBounds {
        max_abs_weight: 127,
        max_row_l1: Some(127),
        max_row_sq: Some(127 * 127),
        max_abs_bias: 0,
    };
    let plan = PreparedLayer::plan_int8_batch_bounded(
        DEFAULT_PARAMETERS,
        OutputMode::Packed,
        n_in,
        n_out,
        bounds,
        1,
        LinkModel::default(),
        1,
    )
    .unwrap();
    assert!(plan.hoisted_levels >= 4, "the premise: {plan:?}");
    let w: Vec<i64> = (0..n_in * n_out)
        .map(|i| {
            if i % n_in == (i / n_in) % n_in {
                127
            } else {
                0
            }
        })
        .collect();
    let bias = vec![0; n_out];
    let layer = PreparedLayer::prepare_with_plan(f.ctx.clone(), plan, &w, &bias).unwrap();
    let rows = limits::MAX_BATCH;
    let xs: Vec<Vec<i64>> = (0..rows)
        .map(|k| values(n_in, k as u64, -128, 127))
        .collect();
    let mut client = f.client.lock().unwrap_or_else(|e| e.into_inner());
    let ct = client.encrypt(&plan, &xs).unwrap();
    // Every block's hoisted inputs at once: blocks × chunks·2^L ciphertexts of 1 + r
    // polynomials, 3 residues of 4 bytes per coefficient under parameter set 2.
    let all_blocks = plan.batch_blocks(rows)
        * (plan.in_chunks() << plan.hoisted_levels)
        * (1 + plan.bodies())
        * 3
        * 4
        * DEFAULT_PARAMETERS.poly_size;
    assert!(all_blocks > 150 << 20, "the premise: {all_blocks} B");
    // Warm up with one block (rayon's threads and their per-thread buffers, which grow with
    // the core count), so that what is measured below is what more blocks add.
    let one = client.encrypt(&plan, &xs[..1]).unwrap();
    layer
        .eval(&one, Some(&f.prepared_key), EvalOptions { parallel: true })
        .unwrap();
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        eprintln!("skipped: /proc/self/clear_refs cannot reset the peak RSS here");
        return;
    }
    let Some(before) = status_bytes("VmHWM") else {
        eprintln!("skipped: no VmHWM in /proc/self/status");
        return;
    };
    let out = layer
        .eval(&ct, Some(&f.prepared_key), EvalOptions { parallel: true })
        .unwrap();
    let grown = status_bytes("VmHWM").unwrap().saturating_sub(before);
    assert!(
        grown < all_blocks as u64 / 3,
        "peak RSS grew {} MB over one evaluation; every block's hoisted inputs are {} MB",
        grown >> 20,
        all_blocks >> 20
    );
    let got = client.decrypt(&plan, &out).unwrap();
    for (x, y) in xs.iter().zip(&got) {
        assert_eq!(y, &reference(&w, &bias, x, n_in, n_out));
    }
}
