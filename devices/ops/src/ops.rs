//! Device operations of a BERT-style encoder, as small functions on `ndarray` views.
//!
//! Every function works on one sequence at a time, batched over its tokens: activations are
//! `[tokens, features]` matrices of `f32`, a mask is one `bool` per token (`true` = a real token,
//! `false` = padding). None of them is a linear layer with weights: those go through
//! [`crate::Linear`] so that a placement pass can send them elsewhere (TDM issue 8: the cloud
//! runs linear maps, the device runs everything in this module).
//!
//! Shapes are checked up front and reported as [`OpsError::Shape`]; no function here panics on
//! a shape.

use ndarray::{
    Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut, ArrayViewMut2, Axis, Dimension, Slice,
};

use crate::OpsError;

/// Sum of word, position and token-type embeddings for one sequence (before LayerNorm).
///
/// Shapes: `word` is `[vocab, H]`, `position` is `[max_positions, H]`, `token_type` is
/// `[type_vocab, H]`; `ids` and `type_ids` have one entry per token; positions are `0..T`.
/// Returns `[T, H]`.
///
/// # Errors
/// [`OpsError::Shape`] if the tables differ in width or `ids` and `type_ids` differ in length;
/// [`OpsError::Sequence`] for an empty sequence or one longer than the position table;
/// [`OpsError::TokenOutOfRange`] for an id outside its table.
pub fn embed(
    word: ArrayView2<'_, f32>,
    position: ArrayView2<'_, f32>,
    token_type: ArrayView2<'_, f32>,
    ids: &[u32],
    type_ids: &[u32],
) -> Result<Array2<f32>, OpsError> {
    let h = word.ncols();
    if position.ncols() != h || token_type.ncols() != h {
        return Err(OpsError::shape(
            "embed",
            format!(
                "word width {h}, position width {}, token type width {}",
                position.ncols(),
                token_type.ncols()
            ),
        ));
    }
    if ids.len() != type_ids.len() {
        return Err(OpsError::shape(
            "embed",
            format!("{} ids but {} token type ids", ids.len(), type_ids.len()),
        ));
    }
    let t = ids.len();
    if t == 0 {
        return Err(OpsError::Sequence {
            tokens: 0,
            reason: "empty",
        });
    }
    if t > position.nrows() {
        return Err(OpsError::Sequence {
            tokens: t,
            reason: "longer than the position embedding table",
        });
    }
    let mut out = Array2::<f32>::zeros((t, h));
    for (i, (mut row, (&id, &tt))) in out
        .rows_mut()
        .into_iter()
        .zip(ids.iter().zip(type_ids))
        .enumerate()
    {
        let w = row_of(word, id, "word")?;
        let ty = row_of(token_type, tt, "token_type")?;
        row.assign(&w);
        row += &position.row(i);
        row += &ty;
    }
    Ok(out)
}

fn row_of<'a>(
    table: ArrayView2<'a, f32>,
    id: u32,
    name: &'static str,
) -> Result<ArrayView1<'a, f32>, OpsError> {
    let rows = table.nrows();
    match usize::try_from(id) {
        Ok(i) if i < rows => Ok(table.index_axis_move(Axis(0), i)),
        _ => Err(OpsError::TokenOutOfRange {
            table: name,
            id,
            rows,
        }),
    }
}

/// LayerNorm over the last axis: `(x - mean) / sqrt(var + eps) * gamma + beta` per row, with the
/// biased variance (as PyTorch's `nn.LayerNorm`). Mean and variance are accumulated in `f64`.
///
/// Shapes: `x` is `[T, H]`, `gamma` and `beta` are `[H]`. Returns `[T, H]`.
///
/// # Errors
/// [`OpsError::Shape`] if `gamma` or `beta` is not `[H]`.
pub fn layer_norm(
    x: ArrayView2<'_, f32>,
    gamma: ArrayView1<'_, f32>,
    beta: ArrayView1<'_, f32>,
    eps: f32,
) -> Result<Array2<f32>, OpsError> {
    let h = x.ncols();
    if gamma.len() != h || beta.len() != h {
        return Err(OpsError::shape(
            "layer_norm",
            format!(
                "x is [{}, {h}], gamma [{}], beta [{}]",
                x.nrows(),
                gamma.len(),
                beta.len()
            ),
        ));
    }
    let mut out = x.to_owned();
    if h == 0 {
        return Ok(out);
    }
    let n = h as f64;
    for mut row in out.rows_mut() {
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = row
            .iter()
            .map(|&v| {
                let d = f64::from(v) - mean;
                d * d
            })
            .sum::<f64>()
            / n;
        let inv = 1.0 / (var + f64::from(eps)).sqrt();
        for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = ((f64::from(*v) - mean) * inv) as f32 * g + b;
        }
    }
    Ok(out)
}

/// GELU in the exact erf form BERT uses: `0.5 · x · (1 + erf(x / √2))` (not the tanh
/// approximation). Computed in `f64` and rounded to `f32`.
#[must_use]
pub fn gelu(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// [`gelu`] applied to every element, in place. Any shape.
pub fn gelu_inplace<D: Dimension>(mut x: ArrayViewMut<'_, f32, D>) {
    x.mapv_inplace(gelu);
}

/// Row-wise softmax in place over the columns where `mask` is `true`; masked columns get
/// probability exactly 0 (the additive `-inf` mask of the reference, without its NaN when a
/// whole row is masked). The maximum is subtracted first, so large logits do not overflow.
///
/// Shapes: `x` is `[R, C]`, `mask` is `[C]`.
///
/// # Errors
/// [`OpsError::Shape`] if `mask` is not `[C]`; [`OpsError::Sequence`] if no column is unmasked.
pub fn softmax_rows_masked(
    mut x: ArrayViewMut2<'_, f32>,
    mask: ArrayView1<'_, bool>,
) -> Result<(), OpsError> {
    if mask.len() != x.ncols() {
        return Err(OpsError::shape(
            "softmax",
            format!("scores have {} columns, mask has {}", x.ncols(), mask.len()),
        ));
    }
    if !mask.iter().any(|&m| m) {
        return Err(OpsError::Sequence {
            tokens: mask.len(),
            reason: "every token is masked",
        });
    }
    for mut row in x.rows_mut() {
        let max = row
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .fold(f32::NEG_INFINITY, |a, (&v, _)| a.max(v));
        let mut sum = 0.0f32;
        for (v, &m) in row.iter_mut().zip(mask) {
            *v = if m { (*v - max).exp() } else { 0.0 };
            sum += *v;
        }
        row.mapv_inplace(|v| v / sum);
    }
    Ok(())
}

/// Row-wise softmax in place over all columns. Shape `[R, C]`, `C ≥ 1`.
///
/// # Errors
/// [`OpsError::Sequence`] if `C = 0`.
pub fn softmax_rows(x: ArrayViewMut2<'_, f32>) -> Result<(), OpsError> {
    let mask = Array1::from_elem(x.ncols(), true);
    softmax_rows_masked(x, mask.view())
}

/// Scaled dot-product multi-head self-attention on already projected queries, keys and values:
/// for each head `h` of width `d = H / heads`, `softmax(Q_h K_hᵀ / √d + mask) V_h`, heads
/// concatenated back in order. Keys where `mask` is `false` get weight 0.
///
/// Shapes: `q`, `k`, `v` are `[T, H]`, `mask` is `[T]`. Returns `[T, H]`.
///
/// # Errors
/// [`OpsError::Shape`] if the shapes differ, `heads` is 0 or does not divide `H`;
/// [`OpsError::Sequence`] if every token is masked.
pub fn attention(
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    heads: usize,
    mask: ArrayView1<'_, bool>,
) -> Result<Array2<f32>, OpsError> {
    let (t, h) = q.dim();
    if k.dim() != (t, h) || v.dim() != (t, h) || mask.len() != t {
        return Err(OpsError::shape(
            "attention",
            format!(
                "q {:?}, k {:?}, v {:?}, mask [{}]",
                q.dim(),
                k.dim(),
                v.dim(),
                mask.len()
            ),
        ));
    }
    if heads == 0 || h % heads != 0 {
        return Err(OpsError::shape(
            "attention",
            format!("{heads} heads do not divide width {h}"),
        ));
    }
    let d = h / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = Array2::<f32>::zeros((t, h));
    for head in 0..heads {
        // `s![]` is not usable under forbid(unsafe_code); slice the head's columns by axis.
        let cols = Slice::from(head * d..(head + 1) * d);
        let mut scores = q
            .slice_axis(Axis(1), cols)
            .dot(&k.slice_axis(Axis(1), cols).t());
        scores.mapv_inplace(|x| x * scale);
        softmax_rows_masked(scores.view_mut(), mask)?;
        out.slice_axis_mut(Axis(1), cols)
            .assign(&scores.dot(&v.slice_axis(Axis(1), cols)));
    }
    Ok(out)
}

/// Residual connection in place: `x += y`.
///
/// # Errors
/// [`OpsError::Shape`] if the shapes differ.
pub fn residual_add(mut x: ArrayViewMut2<'_, f32>, y: ArrayView2<'_, f32>) -> Result<(), OpsError> {
    if x.dim() != y.dim() {
        return Err(OpsError::shape(
            "residual_add",
            format!("{:?} + {:?}", x.dim(), y.dim()),
        ));
    }
    x += &y;
    Ok(())
}

/// Mean of the rows of `x` where `mask` is `true` (sentence-transformers' mean pooling).
///
/// Shapes: `x` is `[T, H]`, `mask` is `[T]`. Returns `[H]`.
///
/// # Errors
/// [`OpsError::Shape`] if `mask` is not `[T]`; [`OpsError::Sequence`] if no token is unmasked.
pub fn mean_pool(
    x: ArrayView2<'_, f32>,
    mask: ArrayView1<'_, bool>,
) -> Result<Array1<f32>, OpsError> {
    if mask.len() != x.nrows() {
        return Err(OpsError::shape(
            "mean_pool",
            format!("{} rows, mask of {}", x.nrows(), mask.len()),
        ));
    }
    let mut sum = Array1::<f32>::zeros(x.ncols());
    let mut count = 0usize;
    for (row, &m) in x.axis_iter(Axis(0)).zip(mask) {
        if m {
            sum += &row;
            count += 1;
        }
    }
    if count == 0 {
        return Err(OpsError::Sequence {
            tokens: mask.len(),
            reason: "every token is masked",
        });
    }
    let n = count as f32;
    sum.mapv_inplace(|v| v / n);
    Ok(sum)
}

/// `x / max(‖x‖₂, 1e-12)`, as PyTorch's `F.normalize(p=2)`. Shape `[H]` in and out; the norm
/// is accumulated in `f64`.
#[must_use]
pub fn l2_normalize(x: ArrayView1<'_, f32>) -> Array1<f32> {
    let norm = x
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    let inv = 1.0 / norm.max(1e-12);
    x.mapv(|v| (f64::from(v) * inv) as f32)
}
