//! Public planning constructors of [`PreparedLayer`]: the plan both parties derive from a
//! layer's shape and public bounds (no weights needed), for one row or a batch.

use super::{rows_per_block, PreparedLayer, INT8_LAYER_MAX_INPUT};
use crate::error::HeError;
use crate::plan::{LayerPlan, LinkModel, OutputMode, PlanOptions, WeightBounds};

impl PreparedLayer {
    /// Plans a layer from public information only — its shape and bounds on the weights and
    /// bias — so that a party without the weights (the device) derives the same plan as the
    /// cloud, which then prepares its weights with [`PreparedLayer::prepare_with_plan`].
    /// Chunk candidates are tried as in [`PreparedLayer::prepare`], with worst-case statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_public(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_input: u64,
        max_abs_weight: u64,
        max_abs_bias: u64,
        opts: PlanOptions,
    ) -> Result<LayerPlan, HeError> {
        Self::plan_public_with_link(
            params,
            mode,
            n_in,
            n_out,
            max_abs_input,
            max_abs_weight,
            max_abs_bias,
            opts,
            LinkModel::default(),
        )
    }

    /// [`PreparedLayer::plan_public`] with a batch plan's bytes weighed at `link`'s rate
    /// (TDM-PAR-HE-3). `link` is public too: both parties must pass the same value.
    ///
    /// # Errors
    /// As [`PreparedLayer::plan_public`].
    #[allow(clippy::too_many_arguments)]
    pub fn plan_public_with_link(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_input: u64,
        max_abs_weight: u64,
        max_abs_bias: u64,
        opts: PlanOptions,
        link: LinkModel,
    ) -> Result<LayerPlan, HeError> {
        Self::plan_public_bounded(
            params,
            mode,
            n_in,
            n_out,
            max_abs_input,
            WeightBounds::entries(max_abs_weight, max_abs_bias),
            opts,
            link,
        )
    }

    /// [`PreparedLayer::plan_public_with_link`] with public bounds on the weights' rows
    /// (`WeightBounds`, e.g. signed with the model): the plan assumes the worst weights those
    /// bounds allow instead of the worst int8 matrix. Weights that break the bounds are refused
    /// by [`PreparedLayer::prepare_with_plan`].
    ///
    /// # Errors
    /// As [`PreparedLayer::plan_public`].
    #[allow(clippy::too_many_arguments)]
    pub fn plan_public_bounded(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_input: u64,
        bounds: WeightBounds,
        opts: PlanOptions,
        link: LinkModel,
    ) -> Result<LayerPlan, HeError> {
        let n = params.poly_size;
        crate::plan::plan_first_fitting(params, mode, n_in, n_out, opts, link, |o| {
            let stats = bounds.stats(n_in, rows_per_block(n, n_out, o));
            LayerPlan::new(params, mode, n_in, n_out, max_abs_input, stats, o)
        })
    }

    /// The plan both parties derive for an int8 layer (|x| ≤ [`INT8_LAYER_MAX_INPUT`],
    /// |w| ≤ 127) from its shape and the public bias bound — what device and cloud runtimes
    /// use so that neither needs the other's data to agree on the layout.
    pub fn plan_int8(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_bias: u64,
    ) -> Result<LayerPlan, HeError> {
        Self::plan_public(
            params,
            mode,
            n_in,
            n_out,
            INT8_LAYER_MAX_INPUT,
            127,
            max_abs_bias,
            PlanOptions::default(),
        )
    }

    /// The plan both parties derive for an int8 layer serving requests of `batch` rows
    /// (tokens × width): like [`PreparedLayer::plan_int8`], with the batch placed in the
    /// polynomials by Cheetah's matrix layout and the chunk chosen by [`crate::plan_cost`].
    /// `batch` = 1 gives exactly the plan of [`PreparedLayer::plan_int8`]. Requests may carry
    /// any number of rows up to [`crate::limits::MAX_BATCH`]; `batch` only shapes the layout.
    ///
    /// # Errors
    /// [`HeError::Shape`] for an empty layer or a batch outside 1..=`MAX_BATCH`;
    /// [`HeError::FailureBoundExceeded`] / [`HeError::OutOfRange`] if no layout fits.
    pub fn plan_int8_batch(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_bias: u64,
        batch: usize,
    ) -> Result<LayerPlan, HeError> {
        Self::plan_int8_batch_with_link(
            params,
            mode,
            n_in,
            n_out,
            max_abs_bias,
            batch,
            LinkModel::default(),
        )
    }

    /// [`PreparedLayer::plan_int8_batch`] with the bytes weighed at `link`'s rate: a slower
    /// link gives denser uploads (fewer bytes) at the price of more key switches
    /// (TDM-PAR-HE-3). Device and cloud must pass the same `link` (from the signed bundle).
    ///
    /// # Errors
    /// As [`PreparedLayer::plan_int8_batch`].
    pub fn plan_int8_batch_with_link(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        max_abs_bias: u64,
        batch: usize,
        link: LinkModel,
    ) -> Result<LayerPlan, HeError> {
        Self::plan_int8_batch_bounded(
            params,
            mode,
            n_in,
            n_out,
            WeightBounds::entries(127, max_abs_bias),
            batch,
            link,
            1,
        )
    }

    /// [`PreparedLayer::plan_int8_batch_with_link`] with public row bounds on the int8
    /// weights (`bounds.max_abs_weight` is capped at 127): tighter signed bounds give fewer
    /// bits per coefficient both ways. `max_bodies` (public, 0 or 1 = one secret) lets the
    /// planner share each mask among up to that many bodies (secrets), searched jointly with
    /// the chunk by the cost model (TDM-PAR-HE-3); the device needs an evaluation key with at
    /// least the plan's [`LayerPlan::bodies`] (see `Client::evaluation_key_for`). Both runtimes
    /// call this; its plans for a fixed grid of inputs are pinned by
    /// `specs/vectors/he/plans.json` (TDM-PAR-HE-5: a layout change needs a new parameter-set
    /// id).
    ///
    /// # Errors
    /// As [`PreparedLayer::plan_int8_batch`]; [`HeError::Shape`] if `max_bodies` exceeds
    /// [`crate::limits::MAX_BODIES`].
    #[allow(clippy::too_many_arguments)]
    pub fn plan_int8_batch_bounded(
        params: crate::ParameterSet,
        mode: OutputMode,
        n_in: usize,
        n_out: usize,
        bounds: WeightBounds,
        batch: usize,
        link: LinkModel,
        max_bodies: usize,
    ) -> Result<LayerPlan, HeError> {
        if batch == 0 || batch > crate::limits::MAX_BATCH {
            return Err(HeError::Shape(format!(
                "batch of {batch} (1..={})",
                crate::limits::MAX_BATCH
            )));
        }
        Self::plan_public_bounded(
            params,
            mode,
            n_in,
            n_out,
            INT8_LAYER_MAX_INPUT,
            WeightBounds {
                max_abs_weight: bounds.max_abs_weight.min(127),
                ..bounds
            },
            PlanOptions {
                chunk: None,
                batch: (batch > 1).then_some(batch),
                max_bodies,
            },
            link,
        )
    }
}
