//! Model registry: bundles verified and their cloud layers prepared once, at start-up, for
//! every parameter set served and every output mode the model's policy allows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_he::{Context, LayerPlan, LinkModel, OutputMode, PreparedLayer, WeightBounds};
use tandem_model::{Bundle, Part, VerifyingKey};

use crate::CloudError;

/// The plan of a cloud layer, derived from public information only (shape and the signed
/// manifest's bounds), exactly as the device derives it.
///
/// # Errors
/// [`tandem_he::HeError`] if no plan meets the parameter set's failure bound.
pub fn cloud_plan(
    params: tandem_he::ParameterSet,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    bias_bound: i64,
) -> Result<LayerPlan, tandem_he::HeError> {
    PreparedLayer::plan_int8(params, mode, n_in, n_out, bias_bound.unsigned_abs())
}

/// Which HE output modes a model is served in (issue 12 item 9; `specs/threat-model.md`:
/// serving `packed` only keeps the per-output ciphertext layout of no-key mode from revealing
/// more about the weights). Noised (plaintext) requests are not affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPolicy {
    /// Packed outputs (an evaluation key is registered).
    pub packed: bool,
    /// No-key outputs.
    pub nokey: bool,
}

impl Default for ModelPolicy {
    /// Both modes.
    fn default() -> Self {
        ModelPolicy {
            packed: true,
            nokey: true,
        }
    }
}

impl ModelPolicy {
    /// True if `mode` is served.
    pub fn allows(&self, mode: OutputMode) -> bool {
        match mode {
            OutputMode::Packed => self.packed,
            OutputMode::NoKey => self.nokey,
        }
    }

    /// Parses mode names (`packed`, `nokey`/`no-key`); at least one is required.
    ///
    /// # Errors
    /// [`CloudError::Config`] on an unknown name or an empty list.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self, CloudError> {
        let mut p = ModelPolicy {
            packed: false,
            nokey: false,
        };
        for n in names {
            match n.as_ref() {
                "packed" => p.packed = true,
                "nokey" | "no-key" => p.nokey = true,
                other => {
                    return Err(CloudError::Config(format!(
                        "output mode `{other}`: expected `packed` or `nokey`"
                    )))
                }
            }
        }
        if !p.packed && !p.nokey {
            return Err(CloudError::Config(
                "a model needs at least one output mode (`packed`, `nokey`)".into(),
            ));
        }
        Ok(p)
    }
}

/// A bundle directory to serve and its policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Bundle directory.
    pub dir: PathBuf,
    /// Output modes served.
    pub policy: ModelPolicy,
}

/// One served model: its cloud part and every cloud layer prepared.
pub struct ServedModel {
    /// The verified bundle (cloud part only).
    pub bundle: Bundle,
    /// Output modes served.
    pub policy: ModelPolicy,
    /// Prepared layers by (protocol layer id = manifest index, parameter set id, output mode),
    /// for every cloud layer of the model and the allowed modes only.
    layers: Vec<(u32, u16, OutputMode, PreparedLayer)>,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("id", &self.bundle.id())
            .field("layer_ids", &self.bundle.cloud_indices())
            .field("policy", &self.policy)
            .finish()
    }
}

impl ServedModel {
    /// The prepared cloud layer `layer_id` (its manifest index) for a parameter set and output
    /// mode; `None` if `layer_id` is not a cloud layer of the model, the mode is not allowed or
    /// the parameter set not served (TDM-REQ-8: valid layer ids are cloud layers' manifest indices).
    pub fn layer(&self, layer_id: u32, param_set: u16, mode: OutputMode) -> Option<&PreparedLayer> {
        self.layers
            .iter()
            .find(|(i, p, m, _)| *i == layer_id && *p == param_set && *m == mode)
            .map(|(_, _, _, l)| l)
    }

    /// Whether the model is served in `mode` under `param_set` (every cloud layer is).
    pub fn serves(&self, param_set: u16, mode: OutputMode) -> bool {
        self.layers
            .iter()
            .any(|(_, p, m, _)| *p == param_set && *m == mode)
    }

    /// The largest packing chunk among the model's cloud layers under `param_set` and `mode`:
    /// an evaluation key registered for the model must cover it (one key serves every layer).
    pub fn max_chunk(&self, param_set: u16, mode: OutputMode) -> usize {
        self.layers
            .iter()
            .filter(|(_, p, m, _)| *p == param_set && *m == mode)
            .map(|(_, _, _, l)| l.plan().chunk)
            .max()
            .unwrap_or(0)
    }

    /// The most bodies per mask (`LayerPlan::bodies`, shared-mask plans) among the model's
    /// cloud layers under `param_set` and `mode`: an evaluation key registered for the model
    /// must carry at least that many (one key serves every layer; TDM-PAR-HE-3).
    pub fn max_bodies(&self, param_set: u16, mode: OutputMode) -> usize {
        self.layers
            .iter()
            .filter(|(_, p, m, _)| *p == param_set && *m == mode)
            .map(|(_, _, _, l)| l.plan().bodies())
            .max()
            .unwrap_or(1)
    }

    /// The smallest first stride level of the packing key (`LayerPlan::key_first_level`)
    /// among the model's cloud layers under `param_set` and `mode`: a registered key must start
    /// at or below it (smaller strides are composed from the key's first automorphism).
    pub fn key_first_level(&self, param_set: u16, mode: OutputMode) -> u32 {
        self.layers
            .iter()
            .filter(|(_, p, m, _)| *p == param_set && *m == mode)
            .map(|(_, _, _, l)| l.plan().key_first_level.max(1))
            .min()
            .unwrap_or(1)
    }

    fn plans(&self) -> impl Iterator<Item = &LayerPlan> {
        self.layers.iter().map(|(_, _, _, l)| l.plan())
    }
}

/// Largest wire objects the served models need, from the exact sizes the HE plans compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireSizes {
    /// Largest evaluation-key blob (0 if no model is served packed).
    pub key_len: usize,
    /// Largest ciphertext blob, input or output, for a batch of `max_batch`.
    pub ciphertext_len: usize,
    /// Most integer values in one noised request or plaintext response of `max_batch` rows.
    pub elements: usize,
    /// Largest prepared evaluation key in memory (bytes).
    pub prepared_key_bytes: usize,
    /// Most rows per request a served encoder bundle sends: the largest signed `[encoder]
    /// batch` (TDM-REQ-9; 0 if no encoder bundle is served). `max_batch` must allow it.
    pub encoder_batch: usize,
}

/// All models the cloud serves, by id.
#[derive(Debug)]
pub struct ModelRegistry {
    contexts: Vec<Arc<Context>>,
    models: Vec<ServedModel>,
}

impl ModelRegistry {
    /// Loads and verifies each bundle directory (cloud part) and prepares every cloud layer of
    /// it, each once, for every context (parameter set) in every output mode its policy allows.
    ///
    /// # Errors
    /// [`CloudError::Model`] naming the bundle if it fails to load or verify,
    /// [`CloudError::He`] if a layer cannot be planned, [`CloudError::Config`] on duplicate ids.
    pub fn load(
        contexts: Vec<Arc<Context>>,
        models: &[ModelSpec],
        key: &VerifyingKey,
    ) -> Result<Self, CloudError> {
        if contexts.is_empty() {
            return Err(CloudError::Config("no parameter set to serve".into()));
        }
        let mut served = Vec::with_capacity(models.len());
        for m in models {
            served.push(Self::prepare(&contexts, &m.dir, m.policy, key)?);
        }
        let mut ids: Vec<&str> = served.iter().map(|m| m.bundle.id()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(CloudError::Config(
                "two bundles with the same model id".into(),
            ));
        }
        Ok(ModelRegistry {
            contexts,
            models: served,
        })
    }

    fn prepare(
        contexts: &[Arc<Context>],
        dir: &Path,
        policy: ModelPolicy,
        key: &VerifyingKey,
    ) -> Result<ServedModel, CloudError> {
        let bundle = Bundle::load_part(dir, key, &tandem_model::Limits::default(), Part::Cloud)?;
        let mut layers = Vec::new();
        let encoder = bundle.encoder().cloned();
        for cl in bundle.cloud_layers()? {
            let layer_id = u32::try_from(cl.index)
                .map_err(|_| CloudError::Config("layer index out of range".into()))?;
            for ctx in contexts {
                let params = ctx.params();
                for mode in [OutputMode::Packed, OutputMode::NoKey] {
                    if !policy.allows(mode) {
                        continue;
                    }
                    // Each layer is planned from the signed manifest's public bounds; a layer
                    // whose plan exceeds the failure bound is refused here, at load.
                    let plan = match &encoder {
                        // An encoder bundle's layers are planned for its batch of tokens per
                        // request (issue 8, TDM-REQ-9) from the signed row bounds and link
                        // rate (issue 9, TDM-PAR-HE-3), exactly as the device plans them
                        // (`tandem_ops::encrypted::plan_encoder_layer`). Weights that break
                        // the signed bounds are refused below, at prepare.
                        Some(enc) => {
                            let l = enc.linears.get(cl.index).ok_or_else(|| {
                                CloudError::Config(format!(
                                    "model {}: cloud layer {} is not in the [encoder] section",
                                    bundle.id(),
                                    cl.index
                                ))
                            })?;
                            let (max_abs_weight, max_row_l1, max_row_sq, max_abs_bias) =
                                l.plan_bounds();
                            check_signed_bounds(dir, l, &cl.weights)?;
                            PreparedLayer::plan_int8_batch_bounded(
                                params,
                                mode,
                                cl.n_in,
                                cl.n_out,
                                WeightBounds {
                                    max_abs_weight,
                                    max_row_l1,
                                    max_row_sq,
                                    max_abs_bias,
                                },
                                enc.batch,
                                LinkModel {
                                    kbit_per_s: enc.link_kbit_per_s(),
                                },
                                enc.max_bodies(),
                            )?
                        }
                        None => cloud_plan(params, mode, cl.n_in, cl.n_out, cl.bias_bound)?,
                    };
                    let layer =
                        PreparedLayer::prepare_with_plan(ctx.clone(), plan, &cl.weights, &cl.bias)?;
                    layers.push((layer_id, params.id, mode, layer));
                }
            }
            tracing::info!(
                model = bundle.id(),
                layer_id,
                n_in = cl.n_in,
                n_out = cl.n_out,
                packed = policy.packed,
                nokey = policy.nokey,
                "cloud layer prepared"
            );
        }
        Ok(ServedModel {
            bundle,
            policy,
            layers,
        })
    }

    /// The HE contexts served, in preference order (one per parameter set).
    pub fn contexts(&self) -> &[Arc<Context>] {
        &self.contexts
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

    /// The largest wire objects any served model, parameter set and allowed mode needs for
    /// batches of up to `max_batch` rows (an encoder bundle: up to its signed batch; exact
    /// sizes from the HE plans).
    pub fn wire_sizes(&self, max_batch: usize) -> WireSizes {
        let mut s = WireSizes {
            key_len: 0,
            ciphertext_len: 0,
            elements: 0,
            prepared_key_bytes: 0,
            encoder_batch: 0,
        };
        for m in &self.models {
            // An encoder bundle's requests carry at most its signed batch of rows (the cloud
            // refuses more, TDM-REQ-9): its blobs are sized for that, not for `max_batch`.
            let rows = match m.bundle.encoder() {
                Some(e) => {
                    s.encoder_batch = s.encoder_batch.max(e.batch);
                    e.batch.min(max_batch)
                }
                None => max_batch,
            };
            // The device's key covers every packed layer of the model at once: the largest
            // chunk and the largest number of bodies among them (which may come from two
            // different layers), so size it from both maxima rather than per plan.
            let packed: Vec<&LayerPlan> =
                m.plans().filter(|p| p.mode == OutputMode::Packed).collect();
            for first in &packed {
                let same = packed.iter().filter(|p| p.params.id == first.params.id);
                let mut widest = **first;
                widest.chunk = same.clone().map(|p| p.chunk).max().unwrap_or(first.chunk);
                widest.bodies = same.map(|p| p.bodies()).max().unwrap_or(1);
                // Any key the plans accept may come, the full one (every stride) the largest.
                widest.key_first_level = 1;
                s.key_len = s.key_len.max(widest.eval_key_bytes());
                s.prepared_key_bytes =
                    s.prepared_key_bytes
                        .max(crate::keystore::prepared_key_bytes(
                            &widest.params,
                            widest.chunk.trailing_zeros() as usize,
                            widest.bodies,
                        ));
            }
            for plan in m.plans() {
                s.ciphertext_len = s
                    .ciphertext_len
                    .max(plan.upload_bytes(rows))
                    .max(plan.download_bytes(rows));
                s.elements = s
                    .elements
                    .max(rows.saturating_mul(plan.n_in.max(plan.n_out)));
            }
            for cl in m.bundle.cloud_layers().unwrap_or_default() {
                s.elements = s.elements.max(rows.saturating_mul(cl.n_in.max(cl.n_out)));
            }
        }
        s
    }
}

/// Refuses int8 weights of encoder layer `l` that break its signed row bounds (issue 9,
/// TDM-PAR-HE-3): the plan both sides use relies on them, so a manifest that lies about the
/// cloud weights must not be served (the plan's own check at prepare only catches lies large
/// enough to break the failure bound).
fn check_signed_bounds(
    dir: &Path,
    l: &tandem_model::CloudLinear,
    weights: &[i64],
) -> Result<(), CloudError> {
    let actual = WeightBounds::of(weights, l.n_in, &[]);
    let (max_abs_weight, max_row_l1, max_row_sq, _) = l.plan_bounds();
    let checks = [
        (
            "weight_bound",
            Some(actual.max_abs_weight),
            Some(max_abs_weight),
        ),
        ("max_row_l1", actual.max_row_l1, max_row_l1),
        ("max_row_sq", actual.max_row_sq, max_row_sq),
    ];
    for (field, got, signed) in checks {
        if let (Some(got), Some(signed)) = (got, signed) {
            if got > signed {
                return Err(CloudError::Model(tandem_model::ModelError::Tensor {
                    name: l.weight.clone(),
                    reason: format!(
                        "{}: the weights reach {got}, above the signed {field} = {signed} of \
                         linear {:?} in manifest.toml; the bundle's bounds do not match its \
                         cloud weights: re-import and re-sign the model",
                        dir.display(),
                        l.name
                    ),
                }));
            }
        }
    }
    Ok(())
}
