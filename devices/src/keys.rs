//! The device's HE key material for one parameter set: secret (from the persisted seed or
//! fresh), the cloud layer's plan, and the evaluation-key blob uploaded to the cloud.

use std::path::Path;
use std::sync::Arc;

use tandem_he::{
    Client, Context, EvaluationKey, LayerPlan, OutputMode, ParameterSet, PreparedLayer,
};

use crate::{state, DeviceError};

/// Largest evaluation-key file read back from the cache.
const MAX_EVAL_KEY_FILE: u64 = 64 << 20;

/// Looks a negotiated parameter-set id up among [`tandem_he::ALL_PARAMETER_SETS`].
///
/// # Errors
/// [`DeviceError::UnknownParameterSet`] if this build does not implement it.
pub fn parameter_set(id: u16) -> Result<ParameterSet, DeviceError> {
    tandem_he::ALL_PARAMETER_SETS
        .iter()
        .copied()
        .find(|p| p.id == id)
        .ok_or(DeviceError::UnknownParameterSet(id))
}

/// The cloud layer's HE plan under `params` from public information only (shape and the
/// signed manifest's bias bound): the same function the cloud uses, so both sides agree
/// without the device holding the weights.
///
/// # Errors
/// [`DeviceError::He`] if no plan meets the parameter set's failure bound.
pub fn cloud_plan(
    params: ParameterSet,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    bias_bound: i64,
) -> Result<LayerPlan, DeviceError> {
    Ok(PreparedLayer::plan_int8(
        params,
        mode,
        n_in,
        n_out,
        bias_bound.unsigned_abs(),
    )?)
}

/// The cloud layer's shape and bias bound, which is all the device needs to plan it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    /// Input length.
    pub n_in: usize,
    /// Output length.
    pub n_out: usize,
    /// The signed manifest's bias bound.
    pub bias_bound: i64,
}

/// Key material for one parameter set.
pub struct HeState {
    /// The parameter set all of this was made for.
    pub params: ParameterSet,
    /// The secret-key holder.
    pub client: Client,
    /// The first cloud layer's plan (`plans[0]`).
    pub plan: LayerPlan,
    /// The plan of every cloud layer, in pipeline order (one evaluation key covers them all:
    /// it is made for the largest chunk).
    pub plans: Vec<LayerPlan>,
    /// Evaluation-key blob (empty in no-key mode).
    pub key_blob: Vec<u8>,
    /// The key id requests name.
    pub key_id: [u8; 32],
}

impl std::fmt::Debug for HeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeState")
            .field("params", &self.params.name)
            .field("plan", &self.plan)
            .field("key_blob_len", &self.key_blob.len())
            .finish_non_exhaustive()
    }
}

impl HeState {
    /// Builds (or reloads from `state_dir`) the key material for `params`.
    ///
    /// # Errors
    /// [`DeviceError::StateFile`] for a damaged seed file, [`DeviceError::He`] if planning or
    /// key generation fails, [`DeviceError::Io`] if the state cannot be written.
    pub fn load(
        params: ParameterSet,
        mode: OutputMode,
        layer: LayerShape,
        state_dir: Option<&Path>,
    ) -> Result<HeState, DeviceError> {
        HeState::load_layers(params, mode, &[layer], state_dir)
    }

    /// [`HeState::load`] for a model with several cloud layers (`layers` in pipeline order,
    /// at least one): one plan per layer, one secret and one evaluation key for all of them.
    ///
    /// # Errors
    /// As [`HeState::load`]; [`DeviceError::Config`] if `layers` is empty.
    pub fn load_layers(
        params: ParameterSet,
        mode: OutputMode,
        layers: &[LayerShape],
        state_dir: Option<&Path>,
    ) -> Result<HeState, DeviceError> {
        let plans = layers
            .iter()
            .map(|l| cloud_plan(params, mode, l.n_in, l.n_out, l.bias_bound))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(&plan) = plans.first() else {
            return Err(DeviceError::Config("the model has no cloud layer".into()));
        };
        // The key must serve every layer's packing: make it for the largest chunk.
        let chunk = plans.iter().map(|p| p.chunk).max().unwrap_or(plan.chunk);
        // The largest first stride level every plan accepts, and the shape
        // `evaluation_key_for_plans` gives these plans. A cached key is reused if the plans
        // accept it and it is either that shape or within `MAX_PLAN_KEY_BYTES`: an older
        // build's full key (l0 = 1, over the budget) is rebuilt as the smaller key.
        let accepted = plans
            .iter()
            .map(|p| p.key_first_level.max(1))
            .min()
            .unwrap_or(1);
        let (first_level, _, bodies) = tandem_he::key_shape_for_plans(&plans);
        let ctx = Arc::new(Context::new(params));
        let make_blob = |client: &Client| -> Result<Vec<u8>, DeviceError> {
            Ok(match mode {
                OutputMode::NoKey => Vec::new(),
                OutputMode::Packed => client.evaluation_key_for_plans(&plans)?.to_bytes(),
            })
        };
        let (client, key_blob) = match state_dir {
            None => {
                let client = Client::new(ctx);
                let blob = make_blob(&client)?;
                (client, blob)
            }
            Some(dir) => {
                let seed = state::load_or_create_seed(dir)?;
                let client = Client::from_seed(ctx.clone(), seed);
                if mode == OutputMode::NoKey {
                    (client, Vec::new())
                } else {
                    let path = state::eval_key_path(dir, params.id, chunk);
                    let cached = state::read_cached(&path, MAX_EVAL_KEY_FILE).filter(|blob| {
                        let ok = EvaluationKey::from_bytes(
                            blob,
                            MAX_EVAL_KEY_FILE as usize,
                            &ctx.params(),
                        )
                        .is_ok_and(|k| {
                            k.key_id() == client.key_id()
                                && k.max_chunk() >= chunk
                                && k.first_level() <= accepted
                                && k.bodies() >= bodies
                                && (k.first_level() == first_level
                                    || blob.len() <= tandem_he::MAX_PLAN_KEY_BYTES)
                        });
                        if !ok {
                            // A cache derived from the seed: rebuilt, never trusted (issue 12).
                            tracing::warn!(
                                file = %path.display(),
                                bytes = blob.len(),
                                "cached evaluation key damaged, foreign, too small or not the \
                                 shape this model's plans take: rebuilding it from the HE seed"
                            );
                        }
                        ok
                    });
                    match cached {
                        Some(blob) => (client, blob),
                        None => {
                            let blob = make_blob(&client)?;
                            state::write_private(&path, &blob)?;
                            (client, blob)
                        }
                    }
                }
            }
        };
        let key_id = match mode {
            // TDM-KEY-2: no-key registrations use the HE engine's own key id.
            OutputMode::NoKey => client.key_id(),
            OutputMode::Packed => tandem_protocol::key_id_of(&key_blob),
        };
        Ok(HeState {
            params,
            client,
            plan,
            plans,
            key_blob,
            key_id,
        })
    }
}
