//! The one path every linear layer takes.
//!
//! A model never multiplies by a weight matrix inline: each linear layer is a `Box<dyn Linear>`
//! built by a [`LinearFactory`] from the layer's checkpoint name, weight and bias. The float
//! path uses [`FloatLinears`]; a later placement step supplies a factory whose layers run on the
//! encrypted cloud (TDM issue 8: cloud operations are linear maps with cleartext weights).

use ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::OpsError;

/// A linear map applied to every token of a sequence: `y = x · Wᵀ + b`.
pub trait Linear: Send + Sync {
    /// The layer's checkpoint path, e.g. `encoder.layer.0.attention.self.query`.
    fn name(&self) -> &str;
    /// Input features per token.
    fn in_features(&self) -> usize;
    /// Output features per token.
    fn out_features(&self) -> usize;
    /// Applies the layer to `x` of shape `[T, in_features]`; returns `[T, out_features]`.
    ///
    /// # Errors
    /// [`OpsError::Shape`] if `x` has the wrong width; [`OpsError::Linear`] if a backend fails.
    fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>, OpsError>;
}

/// What a factory gets for each linear layer of a checkpoint.
#[derive(Debug, Clone)]
pub struct LinearSpec {
    /// Checkpoint path without the `.weight` / `.bias` suffix.
    pub name: String,
    /// `[out_features, in_features]`, as PyTorch stores it.
    pub weight: Array2<f32>,
    /// `[out_features]`.
    pub bias: Array1<f32>,
}

/// Builds the implementation of each linear layer while a model loads.
pub trait LinearFactory {
    /// Returns the layer that will compute `spec`.
    ///
    /// # Errors
    /// Whatever the backend reports (for example a layer it cannot place).
    fn build(&mut self, spec: LinearSpec) -> Result<Box<dyn Linear>, OpsError>;

    /// Whether attention's query, key and value projections (same input) should be built as one
    /// fused layer `{prefix}.qkv` (`[3H, H]`: the query rows, then key, then value) instead of
    /// three. Fusing sends one request instead of three where the layer runs remotely. Default:
    /// no.
    fn fuse_qkv(&self) -> bool {
        false
    }
}

/// The float factory: every layer is a [`DenseLinear`] computed on the device.
#[derive(Debug, Default, Clone, Copy)]
pub struct FloatLinears;

impl LinearFactory for FloatLinears {
    fn build(&mut self, spec: LinearSpec) -> Result<Box<dyn Linear>, OpsError> {
        Ok(Box::new(DenseLinear::new(spec)?))
    }
}

/// A float linear layer computed with `ndarray` (pure-Rust `matrixmultiply` GEMM).
#[derive(Debug, Clone)]
pub struct DenseLinear {
    name: String,
    /// `[in, out]`, contiguous, so the product is one row-major GEMM.
    weight_t: Array2<f32>,
    bias: Array1<f32>,
}

impl DenseLinear {
    /// Takes the weight `[out, in]` and bias `[out]` of `spec`.
    ///
    /// # Errors
    /// [`OpsError::Shape`] if the bias length is not the weight's row count.
    pub fn new(spec: LinearSpec) -> Result<Self, OpsError> {
        if spec.bias.len() != spec.weight.nrows() {
            return Err(OpsError::shape(
                spec.name,
                format!(
                    "weight {:?} with bias [{}]",
                    spec.weight.dim(),
                    spec.bias.len()
                ),
            ));
        }
        let weight_t = spec.weight.t().as_standard_layout().into_owned();
        Ok(Self {
            name: spec.name,
            weight_t,
            bias: spec.bias,
        })
    }
}

impl Linear for DenseLinear {
    fn name(&self) -> &str {
        &self.name
    }

    fn in_features(&self) -> usize {
        self.weight_t.nrows()
    }

    fn out_features(&self) -> usize {
        self.weight_t.ncols()
    }

    fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>, OpsError> {
        if x.ncols() != self.in_features() {
            return Err(OpsError::shape(
                self.name.clone(),
                format!(
                    "input {:?}, layer {} -> {}",
                    x.dim(),
                    self.in_features(),
                    self.out_features()
                ),
            ));
        }
        let mut y = x.dot(&self.weight_t);
        y += &self.bias.view().insert_axis(Axis(0));
        Ok(y)
    }
}
