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

/// Per-row cosine of two row-aligned sets of embeddings, summarised: mean, min and the row of
/// the min.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSummary {
    /// Rows compared.
    pub rows: usize,
    /// Mean of the per-row cosine.
    pub mean: f64,
    /// Smallest per-row cosine.
    pub min: f64,
    /// Index (in the given row order) of the smallest cosine.
    pub worst: usize,
}

/// Per-row cosine of `reference` and `test` (both `[S, H]`, rows in the same order, `S ≥ 1`),
/// without the nearest-neighbour part of [`agreement`] (so any `S ≥ 1` will do).
///
/// # Errors
/// [`OpsError::Shape`] if the shapes differ or there are no rows.
pub fn cosine_summary(
    reference: ArrayView2<'_, f32>,
    test: ArrayView2<'_, f32>,
) -> Result<CosineSummary, OpsError> {
    if reference.dim() != test.dim() || reference.nrows() == 0 {
        return Err(OpsError::shape(
            "cosine_summary",
            format!(
                "reference {:?}, test {:?} (need equal shapes and at least one row)",
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
    Ok(CosineSummary {
        rows: reference.nrows(),
        mean: sum / reference.nrows() as f64,
        min,
        worst,
    })
}

/// The `k` rows of `corpus` (`[S, H]`) most cosine-similar to `query` (`[H]`), most similar
/// first, ties broken by the lower index: `(row, cosine)` pairs, at most `S` of them. This is
/// the search step of a semantic search over embeddings.
///
/// # Errors
/// [`OpsError::Shape`] if `query`'s length is not the corpus width.
pub fn nearest(
    corpus: ArrayView2<'_, f32>,
    query: ArrayView1<'_, f32>,
    k: usize,
) -> Result<Vec<(usize, f64)>, OpsError> {
    if corpus.ncols() != query.len() {
        return Err(OpsError::shape(
            "nearest",
            format!(
                "corpus {:?}, query of {} values (need the corpus width)",
                corpus.dim(),
                query.len()
            ),
        ));
    }
    let mut scored: Vec<(usize, f64)> = corpus
        .outer_iter()
        .enumerate()
        .map(|(i, row)| (i, cosine(row, query)))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    Ok(scored)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2};

    #[test]
    fn nearest_ranks_by_cosine_not_by_dot_product() {
        // Row 2 has the largest dot product with the query (it is long) but the worst angle.
        let corpus = arr2(&[[1.0f32, 0.0], [0.6, 0.8], [10.0, 10.0], [0.0, 1.0]]);
        let hits = nearest(corpus.view(), arr1(&[0.0f32, 1.0]).view(), 3).unwrap();
        let rows: Vec<usize> = hits.iter().map(|h| h.0).collect();
        assert_eq!(rows, vec![3, 1, 2]);
        assert!((hits[0].1 - 1.0).abs() < 1e-12);
        assert!((hits[1].1 - 0.8).abs() < 1e-6);
        // Ties keep the lower index first; k larger than the corpus gives every row.
        let tied = arr2(&[[1.0f32, 0.0], [2.0, 0.0]]);
        let all = nearest(tied.view(), arr1(&[1.0f32, 0.0]).view(), 5).unwrap();
        assert_eq!(all.iter().map(|h| h.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!(nearest(corpus.view(), arr1(&[1.0f32]).view(), 1).is_err());
    }

    #[test]
    fn cosine_summary_finds_the_worst_row() {
        let r = arr2(&[[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]]);
        let t = arr2(&[[2.0f32, 0.0], [1.0, 1.0], [1.0, 1.0]]);
        let s = cosine_summary(r.view(), t.view()).unwrap();
        assert_eq!((s.rows, s.worst), (3, 1));
        assert!((s.min - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert!((s.mean - (2.0 + std::f64::consts::FRAC_1_SQRT_2) / 3.0).abs() < 1e-6);
        let two = arr2(&[[2.0f32, 0.0], [1.0, 1.0]]);
        assert!(cosine_summary(r.view(), two.view()).is_err());
        let empty = Array2::<f32>::zeros((0, 2));
        assert!(cosine_summary(empty.view(), empty.view()).is_err());
    }
}
