//! Agreement between two sets of sentence embeddings (TDM issue 8 acceptance figures): cosine
//! per sentence, and top-k nearest-neighbour overlap among the set itself.

use ndarray::{Array2, ArrayView1, ArrayView2};

use crate::OpsError;

/// Cosine similarity of two vectors of the same length, in `f64` (0 if either is zero).
#[must_use]
pub fn cosine(a: ArrayView1<'_, f32>, b: ArrayView1<'_, f32>) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b.iter()) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// How a set of embeddings (`test`, `[S, H]`) agrees with a reference set (`[S, H]`, same row
/// order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    /// Sentences compared.
    pub sentences: usize,
    /// Mean of the per-sentence cosine.
    pub mean_cosine: f64,
    /// Smallest per-sentence cosine.
    pub min_cosine: f64,
    /// Index of the sentence with the smallest cosine.
    pub worst: usize,
    /// Mean over sentences of |top-k(test) ∩ top-k(reference)| / k, where top-k are the k most
    /// cosine-similar other sentences of the same set (the sentence itself excluded).
    pub top_k_overlap: f64,
    /// The k of `top_k_overlap`.
    pub k: usize,
}

/// Compares `test` with `reference` (both `[S, H]`, rows in the same order).
///
/// # Errors
/// [`OpsError::Shape`] if the shapes differ or there are not more than `k` sentences.
pub fn agreement(
    reference: ArrayView2<'_, f32>,
    test: ArrayView2<'_, f32>,
    k: usize,
) -> Result<Agreement, OpsError> {
    let s = reference.nrows();
    if reference.dim() != test.dim() || s <= k || k == 0 {
        return Err(OpsError::shape(
            "agreement",
            format!(
                "reference {:?}, test {:?}, k = {k} (need equal shapes and more than k rows)",
                reference.dim(),
                test.dim()
            ),
        ));
    }
    let (mut sum, mut min, mut worst) = (0f64, f64::INFINITY, 0);
    for (i, (r, t)) in reference.outer_iter().zip(test.outer_iter()).enumerate() {
        let c = cosine(r, t);
        sum += c;
        if c < min {
            (min, worst) = (c, i);
        }
    }
    let top_ref = top_k(&normalized(reference), k);
    let top_test = top_k(&normalized(test), k);
    let overlap: usize = top_ref
        .iter()
        .zip(&top_test)
        .map(|(a, b)| a.iter().filter(|x| b.contains(x)).count())
        .sum();
    Ok(Agreement {
        sentences: s,
        mean_cosine: sum / s as f64,
        min_cosine: min,
        worst,
        top_k_overlap: overlap as f64 / (s * k) as f64,
        k,
    })
}

fn normalized(x: ArrayView2<'_, f32>) -> Array2<f64> {
    let mut y = x.mapv(f64::from);
    for mut row in y.outer_iter_mut() {
        let n = row.dot(&row).sqrt();
        if n > 0.0 {
            row /= n;
        }
    }
    y
}

/// For each row, the indices of the `k` most similar other rows (unit rows, so the dot product
/// is the cosine), most similar first; ties broken by the lower index.
fn top_k(unit: &Array2<f64>, k: usize) -> Vec<Vec<usize>> {
    let sim = unit.dot(&unit.t());
    sim.outer_iter()
        .enumerate()
        .map(|(i, row)| {
            let mut idx: Vec<usize> = (0..row.len()).filter(|&j| j != i).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            idx.truncate(k);
            idx
        })
        .collect()
}
