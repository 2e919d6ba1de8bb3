//! Model registry: bundles verified and their cloud layers prepared once, at start-up.

use std::path::Path;
use std::sync::Arc;

use tandem_he::{Context, LayerPlan, OutputMode, PreparedLayer};
use tandem_model::{Bundle, Part, VerifyingKey};

use crate::CloudError;

/// The plan of a cloud layer, derived from public information only (shape and the signed
/// manifest's bounds), exactly as the device derives it.
pub fn cloud_plan(
    params: tandem_he::ParameterSet,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    bias_bound: i64,
) -> Result<LayerPlan, tandem_he::HeError> {
    PreparedLayer::plan_int8(params, mode, n_in, n_out, bias_bound.unsigned_abs())
}

/// One served model: its cloud part and its prepared layers.
pub struct ServedModel {
    /// The verified bundle (cloud part only).
    pub bundle: Bundle,
    /// Protocol layer id of the cloud layer (its index in the manifest).
    pub layer_id: u32,
    /// The cloud layer prepared for no-key outputs.
    pub nokey: PreparedLayer,
    /// The cloud layer prepared for packed outputs.
    pub packed: PreparedLayer,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("id", &self.bundle.id())
            .field("layer_id", &self.layer_id)
            .finish()
    }
}

impl ServedModel {
    /// The prepared layer for an output mode.
    pub fn layer(&self, mode: OutputMode) -> &PreparedLayer {
        match mode {
            OutputMode::NoKey => &self.nokey,
            OutputMode::Packed => &self.packed,
        }
    }
}

/// All models the cloud serves, by id.
#[derive(Debug)]
pub struct ModelRegistry {
    ctx: Arc<Context>,
    models: Vec<ServedModel>,
}

impl ModelRegistry {
    /// Loads and verifies each bundle directory (cloud part) and prepares its cloud layer in
    /// both output modes.
    pub fn load(
        ctx: Arc<Context>,
        dirs: &[std::path::PathBuf],
        key: &VerifyingKey,
    ) -> Result<Self, CloudError> {
        let mut models = Vec::with_capacity(dirs.len());
        for dir in dirs {
            models.push(Self::prepare(ctx.clone(), dir, key)?);
        }
        let mut ids: Vec<&str> = models.iter().map(|m| m.bundle.id()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(CloudError::Config(
                "two bundles with the same model id".into(),
            ));
        }
        Ok(ModelRegistry { ctx, models })
    }

    fn prepare(
        ctx: Arc<Context>,
        dir: &Path,
        key: &VerifyingKey,
    ) -> Result<ServedModel, CloudError> {
        let bundle = Bundle::load_part(dir, key, &tandem_model::Limits::default(), Part::Cloud)?;
        let cl = bundle.cloud_layer()?;
        let params = ctx.params();
        let prep = |mode| -> Result<PreparedLayer, CloudError> {
            let plan = cloud_plan(params, mode, cl.n_in, cl.n_out, cl.bias_bound)?;
            Ok(PreparedLayer::prepare_with_plan(
                ctx.clone(),
                plan,
                &cl.weights,
                &cl.bias,
            )?)
        };
        let nokey = prep(OutputMode::NoKey)?;
        let packed = prep(OutputMode::Packed)?;
        let layer_id = u32::try_from(cl.index)
            .map_err(|_| CloudError::Config("layer index out of range".into()))?;
        tracing::info!(
            model = bundle.id(),
            layer_id,
            n_in = cl.n_in,
            n_out = cl.n_out,
            "model prepared"
        );
        Ok(ServedModel {
            bundle,
            layer_id,
            nokey,
            packed,
        })
    }

    /// The HE context shared by every layer and key.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The model with this id and digest, if served.
    pub fn get(&self, id: &str, digest: &[u8; 32]) -> Option<&ServedModel> {
        self.models
            .iter()
            .find(|m| m.bundle.id() == id && &m.bundle.digest() == digest)
    }

    /// Protocol model entries for the session configuration.
    pub fn entries(&self) -> Vec<tandem_protocol::ModelEntry> {
        self.models
            .iter()
            .map(|m| tandem_protocol::ModelEntry {
                model_id: m.bundle.id().to_string(),
                model_digest: m.bundle.digest(),
            })
            .collect()
    }
}
