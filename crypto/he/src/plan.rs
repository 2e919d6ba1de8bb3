//! Layer plans: block layout, encodings, modulus-switch widths and the failure bound.
//!
//! A plan is public: it depends on the shape, the output mode and a few statistics of the
//! weights (row L1 norms for the message range, block Frobenius norms for the noise), and it
//! tells the device everything it needs to encrypt inputs and decode outputs.
//!
//! Layout (Cheetah-style coefficient packing). The input vector is cut into chunks of `chunk`
//! values, chunk c encoded as Σ_i x_{c·chunk+i} X^i. Output block o holds `rows` = N/chunk rows;
//! its weight polynomial for chunk c is Σ_r Σ_i w_{o·rows+r, c·chunk+i} X^{r·chunk + chunk-1-i}.
//! In the product, coefficient r·chunk + chunk − 1 is exactly the dot product of row r with the
//! chunk, and no cross term lands there (|i − i'| < chunk).
//!
//! Noise model (all variances in absolute units modulo 2^64; see `specs/parameters.md`):
//! fresh noise, body rounding on upload, the weights' convolution with the input noise, key
//! switching (gadget digits times key noise, plus the decomposition's rounding times the
//! secret) and the download rounding. Each term is a sum of independent bounded (hence
//! sub-Gaussian) variables whose variance proxy is bounded by the variance used here, with
//! digits bounded by their maximum (B/2)² rather than their variance. The failure bound is the
//! sub-Gaussian tail 2·exp(−t²/2V) at t = Δ_out/2.

use crate::error::HeError;
use crate::params::ParameterSet;

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

/// Everything both sides need to agree on for one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerPlan {
    /// Parameter set.
    pub params: ParameterSet,
    /// Output mode.
    pub mode: OutputMode,
    /// Input length.
    pub n_in: usize,
    /// Output length.
    pub n_out: usize,
    /// Inputs satisfy |x| ≤ this.
    pub max_abs_input: u64,
    /// Input values per chunk (a power of two ≤ N).
    pub chunk: usize,
    /// log2 of the input scaling factor Δ_in.
    pub delta_in_log2: u32,
    /// log2 of the output scaling factor (Δ_in times the packing factor).
    pub delta_out_log2: u32,
    /// Bits kept of each uploaded body coefficient.
    pub upload_bits: u32,
    /// Bits kept of each downloaded coefficient.
    pub download_bits: u32,
    /// log2 of the per-output failure probability bound.
    pub log2_p_fail: f64,
}

/// Options a caller (e.g. the planner) may set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PlanOptions {
    /// Force the input chunk size (power of two ≤ N); otherwise chosen by mode.
    pub chunk: Option<usize>,
}

/// Bits that must remain for a signed range [−y, y] times a power-of-two Δ within 2^64.
fn delta_out_log2_for(max_abs_output: u64) -> Option<u32> {
    // Need (2y+1)·Δ ≤ 2^64.
    let span = 2u128 * max_abs_output as u128 + 1;
    let mut d = 0u32;
    while d < 63 && span << (d + 1) <= 1u128 << 64 {
        d += 1;
    }
    if span << d <= 1u128 << 64 {
        Some(d)
    } else {
        None
    }
}

impl LayerPlan {
    /// Number of input chunks.
    pub fn in_chunks(&self) -> usize {
        self.n_in.div_ceil(self.chunk)
    }
    /// Rows per weight polynomial (outputs per product ciphertext).
    pub fn rows(&self) -> usize {
        self.params.poly_size / self.chunk
    }
    /// Number of output blocks (product ciphertexts).
    pub fn out_blocks(&self) -> usize {
        self.n_out.div_ceil(self.rows())
    }
    /// Packed mode: blocks per output ciphertext (at most `chunk`, so slots never collide).
    pub fn blocks_per_group(&self) -> usize {
        self.out_blocks().min(self.chunk)
    }
    /// Packed mode: leaves per tree, padded to a power of two.
    pub fn leaves_per_group(&self) -> usize {
        self.blocks_per_group().next_power_of_two()
    }
    /// Number of returned ciphertexts.
    pub fn out_ciphertexts(&self) -> usize {
        match self.mode {
            OutputMode::NoKey => self.out_blocks(),
            OutputMode::Packed => self.out_blocks().div_ceil(self.blocks_per_group()),
        }
    }
    /// Key switches the server performs per input row (packed mode).
    pub fn key_switches(&self) -> usize {
        match self.mode {
            OutputMode::NoKey => 0,
            OutputMode::Packed => {
                let per_group = self.leaves_per_group() - 1
                    + (self.chunk / self.leaves_per_group()).trailing_zeros() as usize;
                per_group * self.out_ciphertexts()
            }
        }
    }
    /// Coefficient position of output `j` inside returned ciphertext `ct`; `(ct, position)`.
    pub fn output_slot(&self, j: usize) -> (usize, usize) {
        let rows = self.rows();
        let (block, r) = (j / rows, j % rows);
        match self.mode {
            OutputMode::NoKey => (block, r * self.chunk),
            OutputMode::Packed => {
                let per = self.blocks_per_group();
                let (group, leaf) = (block / per, block % per);
                let stride = self.chunk / self.leaves_per_group();
                (group, r * self.chunk + leaf * stride)
            }
        }
    }
    /// Outputs carried by each returned ciphertext (the last one may carry fewer).
    pub fn outputs_per_ciphertext(&self) -> usize {
        match self.mode {
            OutputMode::NoKey => self.rows(),
            OutputMode::Packed => self.rows() * self.blocks_per_group(),
        }
    }
    /// Index of the first output carried by ciphertext `ct`.
    pub fn first_output(&self, ct: usize) -> usize {
        ct * self.outputs_per_ciphertext()
    }
    /// Number of body coefficients returned in ciphertext `ct`.
    pub fn outputs_in_ciphertext(&self, ct: usize) -> usize {
        let per_ct = self.outputs_per_ciphertext();
        per_ct.min(self.n_out.saturating_sub(ct * per_ct))
    }
    /// Upload bytes for a batch of `batch` input vectors (wire format, header included).
    pub fn upload_bytes(&self, batch: usize) -> usize {
        crate::wire::input_len(self, batch)
    }
    /// Download bytes for a batch of `batch` results (wire format, header included).
    pub fn download_bytes(&self, batch: usize) -> usize {
        crate::wire::output_len(self, batch)
    }
    /// Evaluation-key bytes this plan needs (0 in no-key mode).
    pub fn eval_key_bytes(&self) -> usize {
        match self.mode {
            OutputMode::NoKey => 0,
            OutputMode::Packed => {
                crate::wire::eval_key_len(&self.params, self.chunk.trailing_zeros() as usize)
            }
        }
    }

    /// Plans a layer; refuses it if no widths meet the parameter set's failure bound.
    pub fn new(
        params: ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_input: u64,
        stats: WeightStats,
        opts: PlanOptions,
    ) -> Result<Self, HeError> {
        let n = params.poly_size;
        if n_in == 0 || n_out == 0 {
            return Err(HeError::Shape("empty layer".into()));
        }
        if n_in > crate::limits::MAX_LAYER_DIM || n_out > crate::limits::MAX_LAYER_DIM {
            return Err(HeError::Shape(format!(
                "layer {n_in}x{n_out} exceeds {} per side",
                crate::limits::MAX_LAYER_DIM
            )));
        }
        let chunk = match opts.chunk {
            Some(c) if c.is_power_of_two() && c >= 2 && c <= n => c,
            Some(c) => {
                return Err(HeError::Shape(format!(
                    "chunk {c} must be a power of two in 2..={n}"
                )))
            }
            None => default_chunk(n, mode, n_in, n_out),
        };
        let max_out = stats
            .max_row_l1
            .checked_mul(max_abs_input)
            .and_then(|v| v.checked_add(stats.max_abs_bias))
            .ok_or_else(|| HeError::OutOfRange("output range overflows".into()))?;
        let delta_out_log2 = delta_out_log2_for(max_out).ok_or_else(|| {
            HeError::OutOfRange(format!("outputs up to {max_out} do not fit modulo 2^64"))
        })?;
        let pack_log2 = match mode {
            OutputMode::NoKey => 0,
            OutputMode::Packed => chunk.trailing_zeros(),
        };
        let delta_in_log2 = delta_out_log2
            .checked_sub(pack_log2)
            .ok_or_else(|| HeError::OutOfRange("no room for the packing factor".into()))?;
        let mut plan = Self {
            params,
            mode,
            n_in,
            n_out,
            max_abs_input,
            chunk,
            delta_in_log2,
            delta_out_log2,
            upload_bits: 64,
            download_bits: 64,
            log2_p_fail: 0.0,
        };
        let limit = -(params.max_fail_log2 as f64);
        // Narrowest upload that leaves 4 bits of failure margin for the download switch.
        plan.upload_bits = (8..=64)
            .find(|&b| {
                let v = plan.pre_switch_variance(stats, b);
                log2_fail(v, plan.delta_out_log2) <= limit - 4.0
            })
            .ok_or(HeError::FailureBoundExceeded {
                log2_p_fail: log2_fail(plan.pre_switch_variance(stats, 64), plan.delta_out_log2),
                limit: params.max_fail_log2,
            })?;
        let v_pre = plan.pre_switch_variance(stats, plan.upload_bits);
        plan.download_bits = (8..=64)
            .find(|&b| log2_fail(plan.download_variance(v_pre, b), plan.delta_out_log2) <= limit)
            .unwrap_or(64);
        plan.log2_p_fail = log2_fail(
            plan.download_variance(v_pre, plan.download_bits),
            plan.delta_out_log2,
        );
        if plan.log2_p_fail > limit {
            return Err(HeError::FailureBoundExceeded {
                log2_p_fail: plan.log2_p_fail,
                limit: params.max_fail_log2,
            });
        }
        Ok(plan)
    }

    /// Variance bound of one key switch's added noise: digits counted at their maximum
    /// (B/2)² and the secret at full weight N.
    pub fn key_switch_variance(&self) -> f64 {
        let half_base = 2f64.powi(self.params.ks_base_log as i32 - 1);
        self.key_switch_variance_with(half_base * half_base, self.params.poly_size as f64)
    }

    fn key_switch_variance_with(&self, digit_sq: f64, key_weight: f64) -> f64 {
        let p = &self.params;
        let dropped = 2f64.powi(64 - (p.ks_base_log * p.ks_levels) as i32);
        p.ks_levels as f64 * p.poly_size as f64 * digit_sq * p.fresh_noise_variance()
            + key_weight * dropped * dropped / 12.0
    }

    /// Output noise variance bound before the download switch, for a given upload width.
    pub fn pre_switch_variance(&self, stats: WeightStats, upload_bits: u32) -> f64 {
        self.pre_switch_with(
            stats.max_block_sq_norm,
            upload_bits,
            self.key_switch_variance(),
        )
    }

    fn pre_switch_with(&self, block_sq_norm: f64, upload_bits: u32, v_ks: f64) -> f64 {
        let rounding = if upload_bits >= 64 {
            0.0
        } else {
            2f64.powi(2 * (64 - upload_bits as i32)) / 12.0
        };
        let v_in = self.params.fresh_noise_variance() + rounding;
        let product = block_sq_norm * v_in;
        match self.mode {
            OutputMode::NoKey => product,
            OutputMode::Packed => {
                let f = (self.chunk as f64).powi(2);
                f * product + v_ks * (f - 1.0) / 3.0
            }
        }
    }

    /// Output variance bound after switching to `bits` (mask rounding times a binary secret
    /// of weight ≤ N, plus the body's own rounding), in 64-bit units.
    pub fn download_variance(&self, v_pre: f64, bits: u32) -> f64 {
        self.download_with(v_pre, bits, self.params.poly_size as f64)
    }

    fn download_with(&self, v_pre: f64, bits: u32, key_weight: f64) -> f64 {
        if bits >= 64 {
            return v_pre;
        }
        let unit = 2f64.powi(64 - bits as i32);
        v_pre + (key_weight + 1.0) * unit * unit / 12.0
    }

    /// Average-case prediction of the decrypted output's noise variance (not a bound): digits
    /// at their variance B²/12 and a secret of Hamming weight `key_weight` (≈ N/2), for an
    /// output block whose squared weight norm is `block_sq_norm`. Tests compare measured noise
    /// with it.
    pub fn expected_variance(&self, block_sq_norm: f64, key_weight: f64) -> f64 {
        let base = 2f64.powi(self.params.ks_base_log as i32);
        let v_ks = self.key_switch_variance_with(base * base / 12.0, key_weight);
        let v_pre = self.pre_switch_with(block_sq_norm, self.upload_bits, v_ks);
        self.download_with(v_pre, self.download_bits, key_weight)
    }
}

/// log2 of the sub-Gaussian tail bound 2·exp(−t²/2V) at t = Δ/2.
pub fn log2_fail(variance: f64, delta_log2: u32) -> f64 {
    let t = 2f64.powi(delta_log2 as i32 - 1);
    if variance <= 0.0 {
        return f64::NEG_INFINITY;
    }
    1.0 - t * t / (2.0 * variance) * std::f64::consts::LOG2_E
}

/// Plans with the caller's chunk, or else with the mode's default chunk and then (packed mode)
/// ever smaller ones: a smaller chunk means a smaller packing factor, hence less key-switching
/// noise. Returns the first plan that meets the failure bound, or the last refusal.
pub(crate) fn plan_first_fitting(
    params: ParameterSet,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    opts: PlanOptions,
    mut plan_with: impl FnMut(usize) -> Result<LayerPlan, HeError>,
) -> Result<LayerPlan, HeError> {
    let first = opts
        .chunk
        .unwrap_or_else(|| default_chunk(params.poly_size, mode, n_in, n_out));
    let candidates: Vec<usize> = match (opts.chunk, mode) {
        (None, OutputMode::Packed) => (1..=first.trailing_zeros())
            .rev()
            .map(|l| 1usize << l)
            .collect(),
        _ => vec![first],
    };
    let mut planned = Err(HeError::Shape("no chunk candidate".into()));
    for chunk in candidates {
        planned = plan_with(chunk);
        if planned.is_ok() {
            break;
        }
    }
    planned
}

/// Default chunk: packed mode uploads one dense ciphertext per input (chunk covers the input);
/// no-key mode balances upload (∝ rows) against download (∝ chunk): the fewest total
/// coefficients.
pub(crate) fn default_chunk(n: usize, mode: OutputMode, n_in: usize, n_out: usize) -> usize {
    match mode {
        OutputMode::Packed => n_in.next_power_of_two().clamp(2, n),
        OutputMode::NoKey => {
            let mut best = (usize::MAX, 2);
            let mut c = 2;
            while c <= n {
                let rows = n / c;
                let up = n_in.div_ceil(c) * n;
                let down = n_out.div_ceil(rows) * (n + rows);
                if up + down < best.0 {
                    best = (up + down, c);
                }
                c *= 2;
            }
            best.1
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::params::DEFAULT_PARAMETERS as P;

    #[test]
    fn worst_case_int8_1024_square_plans_in_both_modes() {
        for mode in [OutputMode::NoKey, OutputMode::Packed] {
            let probe = LayerPlan::new(
                P,
                mode,
                1024,
                1024,
                128,
                WeightStats::worst_case(1024, 4096, 128, 0),
                PlanOptions::default(),
            )
            .unwrap();
            assert!(probe.log2_p_fail <= -64.0);
            assert!(
                probe.upload_bits < 64 && probe.download_bits < 64,
                "{probe:?}"
            );
        }
    }

    #[test]
    fn packed_1024_matches_the_dense_layout() {
        let stats = WeightStats::worst_case(1024, 4, 128, 1 << 20);
        let p = LayerPlan::new(
            P,
            OutputMode::Packed,
            1024,
            1024,
            128,
            stats,
            PlanOptions::default(),
        )
        .unwrap();
        assert_eq!(
            (p.chunk, p.rows(), p.out_blocks(), p.out_ciphertexts()),
            (1024, 4, 256, 1)
        );
        assert_eq!(p.key_switches(), 255 + 2);
        // Every output gets its own slot.
        let mut seen = std::collections::HashSet::new();
        for j in 0..1024 {
            assert!(seen.insert(p.output_slot(j)));
        }
    }

    #[test]
    fn too_wide_outputs_are_refused() {
        let stats = WeightStats {
            max_row_l1: u64::MAX / 2,
            max_abs_bias: 0,
            max_block_sq_norm: 1.0,
        };
        assert!(LayerPlan::new(
            P,
            OutputMode::NoKey,
            4,
            4,
            128,
            stats,
            PlanOptions::default()
        )
        .is_err());
    }

    #[test]
    fn huge_noise_is_refused_with_typed_error() {
        let stats = WeightStats {
            max_row_l1: 1 << 20,
            max_abs_bias: 0,
            max_block_sq_norm: 1e30,
        };
        let e = LayerPlan::new(
            P,
            OutputMode::Packed,
            1024,
            1024,
            128,
            stats,
            PlanOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, HeError::FailureBoundExceeded { .. }), "{e}");
    }
}
