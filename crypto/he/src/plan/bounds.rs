//! What a plan is planned for: the output mode and the statistics and public bounds of a
//! layer's weights that the message range and the noise bound depend on.

use crate::error::HeError;

/// What the server returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputMode {
    /// No evaluation key: one product ciphertext per output block (full mask, useful body
    /// coefficients), modulus-switched. Reveals partial sums of W·x to the device.
    NoKey = 0,
    /// Automorphism-based packing: one ciphertext holds up to N outputs and nothing else.
    Packed = 1,
}

impl OutputMode {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        self as u8
    }
    /// From the wire value.
    pub fn from_u8(v: u8) -> Result<Self, HeError> {
        match v {
            0 => Ok(Self::NoKey),
            1 => Ok(Self::Packed),
            _ => Err(HeError::Malformed {
                what: "output mode",
                reason: "unknown mode",
            }),
        }
    }
    /// Name used in benchmarks and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::NoKey => "nokey",
            Self::Packed => "packed",
        }
    }
}

/// Statistics of a layer's weights and bias that the plan depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightStats {
    /// max over rows of Σ_i |w_ri|.
    pub max_row_l1: u64,
    /// max |b_r|.
    pub max_abs_bias: u64,
    /// max over output blocks of Σ w² over the block's rows (noise driver).
    pub max_block_sq_norm: f64,
}

impl WeightStats {
    /// The worst case for a shape with |w| ≤ `max_w`, |b| ≤ `max_b`.
    pub fn worst_case(n_in: usize, rows_per_block: usize, max_w: u64, max_b: u64) -> Self {
        Self {
            max_row_l1: n_in as u64 * max_w,
            max_abs_bias: max_b,
            max_block_sq_norm: (rows_per_block * n_in) as f64 * (max_w * max_w) as f64,
        }
    }
}

/// Public bounds on a layer's weights and bias that a plan may rely on: what a signed model
/// bundle can state about its layers so that device and cloud plan tighter than the
/// worst case of `max_abs_weight` alone (a smaller message range Y, hence a larger Δ_out,
/// and a smaller noise bound: fewer bits per uploaded and downloaded coefficient).
/// The cloud's [`crate::PreparedLayer::prepare_with_plan`] checks the actual weights against
/// the plan, so a bound that does not hold refuses the layer instead of decrypting wrongly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightBounds {
    /// max |w|.
    pub max_abs_weight: u64,
    /// max over rows of Σ_i |w_ri|, if known (else n_in · `max_abs_weight`).
    pub max_row_l1: Option<u64>,
    /// max over rows of Σ_i w_ri², if known (else n_in · `max_abs_weight`²).
    pub max_row_sq: Option<u64>,
    /// max |b|.
    pub max_abs_bias: u64,
}

impl WeightBounds {
    /// Only the entry bounds |w| ≤ `max_abs_weight`, |b| ≤ `max_abs_bias`.
    pub fn entries(max_abs_weight: u64, max_abs_bias: u64) -> Self {
        Self {
            max_abs_weight,
            max_row_l1: None,
            max_row_sq: None,
            max_abs_bias,
        }
    }

    /// The exact bounds of row-major `weights` (n_out × n_in) and `bias` — what a bundle
    /// builder computes and signs. Shapes that do not match give the entry bounds of what is
    /// there.
    pub fn of(weights: &[i64], n_in: usize, bias: &[i64]) -> Self {
        let rows = weights.chunks(n_in.max(1));
        let mut b = Self::entries(0, bias.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0));
        let (mut l1, mut sq) = (0u64, 0u64);
        for row in rows {
            let mut row_l1 = 0u64;
            let mut row_sq = 0u64;
            for v in row {
                let a = v.unsigned_abs();
                b.max_abs_weight = b.max_abs_weight.max(a);
                row_l1 = row_l1.saturating_add(a);
                row_sq = row_sq.saturating_add(a.saturating_mul(a));
            }
            l1 = l1.max(row_l1);
            sq = sq.max(row_sq);
        }
        b.max_row_l1 = Some(l1);
        b.max_row_sq = Some(sq);
        b
    }

    /// The plan statistics these bounds guarantee for `n_in` inputs and `rows_per_block`
    /// weight rows per block.
    pub fn stats(&self, n_in: usize, rows_per_block: usize) -> WeightStats {
        let w = self.max_abs_weight;
        let l1_entries = (n_in as u64).saturating_mul(w);
        let sq_entries = (n_in as f64) * (w as f64) * (w as f64);
        WeightStats {
            max_row_l1: self.max_row_l1.map_or(l1_entries, |l1| l1.min(l1_entries)),
            max_abs_bias: self.max_abs_bias,
            max_block_sq_norm: rows_per_block as f64
                * self
                    .max_row_sq
                    .map_or(sq_entries, |sq| (sq as f64).min(sq_entries)),
        }
    }
}
