//! Integer (quantised) linear layers: the computation the encrypted cloud performs, in the clear.
//!
//! TDM issue 8, quantisation rule:
//! - **Weights** int8 per output channel: row `r` of `W` (`[out, in]`) gets the scale
//!   `s_w[r] = max_i |W[r,i]| / 127` and `Wq[r,i] = round(W[r,i] / s_w[r]) ∈ [−127, 127]`.
//!   The scales are stored with the layer ([`QuantizedWeights::weight_scales`]).
//! - **Activations** int8 (`±127`) or int16 (`±32767`), chosen per layer ([`PrecisionPolicy`]):
//!   each row (token) `t` of the input `x` (`[T, in]`) gets the scale
//!   `s_x[t] = max_i |x[t,i]| / q_max` chosen by the device from the values it holds;
//!   `Xq[t,i] = round(x[t,i] / s_x[t])`. The scale never leaves the device.
//! - **Product**: `acc[t,r] = Σ_i Xq[t,i]·Wq[r,i]`, an exact integer (this is what the cloud
//!   computes under encryption, [`crate::encrypted`]).
//! - **Bias**: added on the device in float after dequantisation,
//!   `y[t,r] = acc[t,r]·s_x[t]·s_w[r] + b[r]`. An integer bias at the product scale would be
//!   `b[r] / (s_x[t]·s_w[r])`, which depends on the per-token scale `s_x[t]`: the cloud would
//!   have to learn the device's scales (which the issue keeps on the device) or receive a
//!   ciphertext per bias. Added in float, the bias is not quantised at all (no rounding error)
//!   and the cloud layer has bias 0, so the signed bias bound in the HE plan is 0.
//!
//! The integer product is computed with an `f64` GEMM: every product `|Xq·Wq| ≤ 32767·127 < 2^22`
//! and every partial sum `≤ n_in·2^22 < 2^53` (checked at construction, `n_in ≤ 2^30`),
//! so the `f64` result is exactly the integer sum and converts to `i64` without loss.

use ndarray::{Array1, Array2, ArrayView2, Axis, Zip};

use crate::linear::{Linear, LinearFactory, LinearSpec};
use crate::OpsError;

/// Largest |weight| after quantisation (int8, symmetric).
pub const WEIGHT_Q_MAX: i64 = 127;

/// Largest input width for which the `f64` GEMM stays exact with int16 activations:
/// `n_in · 32767 · 127 < 2^53`.
pub const MAX_EXACT_IN_FEATURES: usize = 1 << 30;

/// Activation precision of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActivationBits {
    /// Symmetric int8: `|Xq| ≤ 127`.
    Int8,
    /// Symmetric int16: `|Xq| ≤ 32767`.
    Int16,
}

impl ActivationBits {
    /// Largest |quantised activation|.
    #[must_use]
    pub fn q_max(self) -> i64 {
        match self {
            Self::Int8 => 127,
            Self::Int16 => 32767,
        }
    }

    /// `"int8"` or `"int16"` (for logs and JSON).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::Int16 => "int16",
        }
    }
}

/// Which activation precision each layer gets, by checkpoint-name suffix.
///
/// The first suffix rule that matches the layer name wins; otherwise `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrecisionPolicy {
    /// Precision of layers no rule names.
    pub default: ActivationBits,
    /// `(name suffix, precision)` rules, tried in order.
    pub rules: Vec<(String, ActivationBits)>,
}

impl PrecisionPolicy {
    /// Every layer at `bits`.
    #[must_use]
    pub fn uniform(bits: ActivationBits) -> Self {
        Self {
            default: bits,
            rules: Vec::new(),
        }
    }

    /// The policy chosen for all-MiniLM-L6-v2 from measurements over the 1,024-sentence corpus
    /// (`cargo run --release -p tandem-ops --example minilm_precision`, cleartext integer
    /// pipeline against the float path): **int8 on every layer**. All int8 gives mean cosine
    /// 0.99753, min 0.98809, top-10 overlap 0.940 — inside the bars (0.99 / 0.97 / 0.9).
    /// int16 everywhere gives 0.99961 / 0.99861 / 0.975, and int16 on one kind of layer at most
    /// +0.0013 mean cosine (Q/K/V), but an int16 layer costs more under encryption (the packed
    /// 1536 → 384 int16 plan needs chunk 4 and uploads 10.6 MB per request against 0.3 MB at
    /// int8, planning batch 16), so no layer is worth it. Every int16 plan of the MiniLM shapes
    /// does pass the failure bound (worst 2^-66.1), so the choice is accuracy against cost only.
    #[must_use]
    pub fn minilm() -> Self {
        Self::uniform(ActivationBits::Int8)
    }

    /// The precision of the layer named `name`.
    #[must_use]
    pub fn bits_for(&self, name: &str) -> ActivationBits {
        self.rules
            .iter()
            .find(|(suffix, _)| name.ends_with(suffix.as_str()))
            .map_or(self.default, |&(_, b)| b)
    }
}

/// What the device keeps of a quantised layer: shape, activation precision, the per-channel
/// weight scales and the float bias — everything but the integer weights, which only the party
/// computing the product (the cloud, or [`QuantizedLinear`] in the clear) needs.
#[derive(Debug, Clone)]
pub struct DeviceQuant {
    /// Checkpoint path of the layer.
    pub name: String,
    /// Input features per token.
    pub in_features: usize,
    /// Activation precision of the layer's input.
    pub bits: ActivationBits,
    /// `[out]`, `s_w[r] > 0` (1 for an all-zero row).
    pub weight_scales: Array1<f32>,
    /// `[out]`, added on the device in float.
    pub bias: Array1<f32>,
}

impl DeviceQuant {
    /// Output features per token.
    #[must_use]
    pub fn out_features(&self) -> usize {
        self.bias.len()
    }

    /// Quantises an input batch `x` (`[T, in]`) per row; see [`quantize_rows`].
    ///
    /// # Errors
    /// [`OpsError::Shape`] if `x` has the wrong width or holds a non-finite value.
    pub fn quantize_input(&self, x: ArrayView2<'_, f32>) -> Result<QuantizedRows, OpsError> {
        if x.ncols() != self.in_features {
            return Err(OpsError::shape(
                self.name.clone(),
                format!(
                    "input {:?}, layer {} -> {}",
                    x.dim(),
                    self.in_features,
                    self.out_features()
                ),
            ));
        }
        quantize_rows(x, self.bits)
            .ok_or_else(|| OpsError::shape(self.name.clone(), "non-finite activation".to_string()))
    }

    /// `y[t,r] = acc[t,r]·s_x[t]·s_w[r] + b[r]` (`[T, out]`), the product scaled in `f64` and
    /// rounded to `f32` once before the bias is added.
    ///
    /// # Errors
    /// [`OpsError::Shape`] if `acc` does not have one row per scale and one column per output.
    pub fn dequantize(
        &self,
        acc: ArrayView2<'_, i64>,
        row_scales: &Array1<f32>,
    ) -> Result<Array2<f32>, OpsError> {
        if acc.nrows() != row_scales.len() || acc.ncols() != self.out_features() {
            return Err(OpsError::shape(
                self.name.clone(),
                format!(
                    "product {:?} for {} rows of {} outputs",
                    acc.dim(),
                    row_scales.len(),
                    self.out_features()
                ),
            ));
        }
        let mut y = Array2::<f32>::zeros(acc.dim());
        for ((mut y_row, acc_row), &sx) in y
            .outer_iter_mut()
            .zip(acc.outer_iter())
            .zip(row_scales.iter())
        {
            Zip::from(&mut y_row)
                .and(&acc_row)
                .and(&self.weight_scales)
                .and(&self.bias)
                .for_each(|y, &a, &sw, &b| {
                    *y = (a as f64 * f64::from(sx) * f64::from(sw)) as f32 + b;
                });
        }
        Ok(y)
    }
}

/// A layer's quantised weights: `Wq` (`[out, in]`, `|w| ≤ 127`) and the device part (scales,
/// bias, precision).
#[derive(Debug, Clone)]
pub struct QuantizedWeights {
    /// `[out, in]`, values in `−127..=127`.
    pub weights: Array2<i64>,
    /// Scales, bias and precision.
    pub device: DeviceQuant,
}

impl QuantizedWeights {
    /// Quantises `spec` per output channel.
    ///
    /// # Errors
    /// [`OpsError::Shape`] if the bias length is not the weight's row count, the layer is
    /// empty or wider than [`MAX_EXACT_IN_FEATURES`], or a weight is not finite.
    pub fn quantize(spec: &LinearSpec, bits: ActivationBits) -> Result<Self, OpsError> {
        let (n_out, n_in) = spec.weight.dim();
        if spec.bias.len() != n_out || n_out == 0 || n_in == 0 || n_in > MAX_EXACT_IN_FEATURES {
            return Err(OpsError::shape(
                spec.name.clone(),
                format!(
                    "weight {:?} with bias [{}] (need a non-empty layer, bias = rows, in <= 2^30)",
                    spec.weight.dim(),
                    spec.bias.len()
                ),
            ));
        }
        if spec.weight.iter().any(|w| !w.is_finite()) || spec.bias.iter().any(|b| !b.is_finite()) {
            return Err(OpsError::shape(
                spec.name.clone(),
                "non-finite weight or bias".to_string(),
            ));
        }
        let mut weights = Array2::<i64>::zeros((n_out, n_in));
        let mut weight_scales = Array1::<f32>::ones(n_out);
        for ((row, mut q), s) in spec
            .weight
            .outer_iter()
            .zip(weights.outer_iter_mut())
            .zip(weight_scales.iter_mut())
        {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if max > 0.0 {
                *s = max / WEIGHT_Q_MAX as f32;
                let inv = WEIGHT_Q_MAX as f32 / max;
                Zip::from(&mut q).and(&row).for_each(|q, &w| {
                    *q = ((w * inv).round() as i64).clamp(-WEIGHT_Q_MAX, WEIGHT_Q_MAX);
                });
            }
        }
        Ok(Self {
            weights,
            device: DeviceQuant {
                name: spec.name.clone(),
                in_features: n_in,
                bits,
                weight_scales,
                bias: spec.bias.clone(),
            },
        })
    }

    /// The weights row-major (`out × in`), as `tandem-he` takes them.
    #[must_use]
    pub fn weights_row_major(&self) -> Vec<i64> {
        self.weights.iter().copied().collect()
    }

    /// The exact integer product `acc = Xq · Wqᵀ` (`[T, out]`), in the clear.
    ///
    /// # Errors
    /// [`OpsError::Shape`] if `q` has the wrong width.
    pub fn integer_product(&self, q: &QuantizedRows) -> Result<Array2<i64>, OpsError> {
        if q.values.ncols() != self.weights.ncols() {
            return Err(OpsError::shape(
                self.device.name.clone(),
                format!("quantised input {:?}", q.values.dim()),
            ));
        }
        Ok(exact_product(&q.values, self.weights_t_f64().view()))
    }

    /// `Wqᵀ` as `f64` (`[in, out]`, contiguous), the operand of the exact GEMM.
    #[must_use]
    pub fn weights_t_f64(&self) -> Array2<f64> {
        self.weights
            .t()
            .mapv(|v| v as f64)
            .as_standard_layout()
            .into_owned()
    }
}

/// A batch of quantised rows with the scale of each row (the scales stay on the device).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedRows {
    /// `[T, in]`, `|v| ≤ bits.q_max()`.
    pub values: Array2<i64>,
    /// `[T]`, the dequantisation scale of each row (`> 0`).
    pub scales: Array1<f32>,
}

impl QuantizedRows {
    /// The rows as `tandem-he` takes them (`T` vectors of `in` values).
    #[must_use]
    pub fn to_vecs(&self) -> Vec<Vec<i64>> {
        self.values.outer_iter().map(|r| r.to_vec()).collect()
    }
}

/// `xq · wt` for integer `xq` (`[T, in]`) and integer-valued `wt` (`[in, out]`), computed by an
/// `f64` GEMM that is exact while every partial sum stays below 2^53 (see the module docs).
fn exact_product(xq: &Array2<i64>, wt: ArrayView2<'_, f64>) -> Array2<i64> {
    xq.mapv(|v| v as f64).dot(&wt).mapv(|v| v as i64)
}

/// Quantises each row `t` of `x` (`[T, in]`) with its own scale `max|x[t,:]| / q_max`
/// (1 for an all-zero row). Returns `None` if `x` holds a non-finite value.
#[must_use]
pub fn quantize_rows(x: ArrayView2<'_, f32>, bits: ActivationBits) -> Option<QuantizedRows> {
    if x.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let q_max = bits.q_max();
    let mut values = Array2::<i64>::zeros(x.dim());
    let mut scales = Array1::<f32>::ones(x.nrows());
    for ((row, mut q), s) in x
        .axis_iter(Axis(0))
        .zip(values.outer_iter_mut())
        .zip(scales.iter_mut())
    {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max > 0.0 {
            *s = max / q_max as f32;
            let inv = q_max as f32 / max;
            Zip::from(&mut q).and(&row).for_each(|q, &v| {
                *q = ((v * inv).round() as i64).clamp(-q_max, q_max);
            });
        }
    }
    Some(QuantizedRows { values, scales })
}

/// A linear layer computed by the integer pipeline in the clear: quantise the input per row,
/// exact integer product, dequantise and add the float bias on the device.
#[derive(Debug, Clone)]
pub struct QuantizedLinear {
    weights: QuantizedWeights,
    /// `Wqᵀ` as `f64`, cached for the exact GEMM.
    weights_t: Array2<f64>,
}

impl QuantizedLinear {
    /// Wraps quantised weights.
    #[must_use]
    pub fn new(weights: QuantizedWeights) -> Self {
        let weights_t = weights.weights_t_f64();
        Self { weights, weights_t }
    }

    /// The quantised weights.
    #[must_use]
    pub fn weights(&self) -> &QuantizedWeights {
        &self.weights
    }
}

impl Linear for QuantizedLinear {
    fn name(&self) -> &str {
        &self.weights.device.name
    }

    fn in_features(&self) -> usize {
        self.weights.device.in_features
    }

    fn out_features(&self) -> usize {
        self.weights.device.out_features()
    }

    fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>, OpsError> {
        let d = &self.weights.device;
        let q = d.quantize_input(x)?;
        let acc = exact_product(&q.values, self.weights_t.view());
        d.dequantize(acc.view(), &q.scales)
    }
}

/// The factory of the cleartext integer pipeline: every layer a [`QuantizedLinear`] at the
/// precision `policy` gives it.
#[derive(Debug, Clone)]
pub struct QuantizedLinears {
    /// Activation precision per layer.
    pub policy: PrecisionPolicy,
}

impl LinearFactory for QuantizedLinears {
    fn build(&mut self, spec: LinearSpec) -> Result<Box<dyn Linear>, OpsError> {
        let bits = self.policy.bits_for(&spec.name);
        Ok(Box::new(QuantizedLinear::new(QuantizedWeights::quantize(
            &spec, bits,
        )?)))
    }
}
