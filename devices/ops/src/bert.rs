//! A BERT encoder forward pass, one struct per block of the architecture.
//!
//! Follows the Hugging Face `transformers` `modeling_bert.py` structure (`BertEmbeddings`,
//! `BertSelfAttention` + `BertSelfOutput` = `BertAttention`, `BertIntermediate` + `BertOutput`
//! inside `BertLayer`, `BertEncoder`); each `load` names the checkpoint tensor paths it reads.
//! Every linear layer is a `Box<dyn Linear>` built by the caller's [`LinearFactory`], so a
//! placement pass decides where it runs; the blocks here only call `forward` on it.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

use crate::linear::{Linear, LinearFactory, LinearSpec};
use crate::ops;
use crate::weights::Tensors;
use crate::{BertConfig, OpsError};

fn load_linear(
    t: &Tensors<'_>,
    factory: &mut dyn LinearFactory,
    name: String,
    in_features: usize,
    out_features: usize,
) -> Result<Box<dyn Linear>, OpsError> {
    let weight = t.matrix(&format!("{name}.weight"), out_features, in_features)?;
    let bias = t.vector(&format!("{name}.bias"), out_features)?;
    let layer = factory.build(LinearSpec { name, weight, bias })?;
    check_shape(&*layer, in_features, out_features)?;
    Ok(layer)
}

fn check_shape(
    layer: &dyn Linear,
    in_features: usize,
    out_features: usize,
) -> Result<(), OpsError> {
    if layer.in_features() != in_features || layer.out_features() != out_features {
        return Err(OpsError::shape(
            layer.name().to_string(),
            format!(
                "factory built {} -> {}, checkpoint is {in_features} -> {out_features}",
                layer.in_features(),
                layer.out_features()
            ),
        ));
    }
    Ok(())
}

/// LayerNorm with learned scale and shift (`{prefix}.weight`, `{prefix}.bias`, both `[H]`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Array1<f32>,
    bias: Array1<f32>,
    eps: f32,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias` of width `width`.
    ///
    /// # Errors
    /// Missing, mistyped, misshapen or non-finite tensors.
    pub fn load(t: &Tensors<'_>, prefix: &str, width: usize, eps: f64) -> Result<Self, OpsError> {
        Ok(Self {
            weight: t.vector(&format!("{prefix}.weight"), width)?,
            bias: t.vector(&format!("{prefix}.bias"), width)?,
            eps: eps as f32,
        })
    }

    /// `[T, H]` → `[T, H]`, see [`ops::layer_norm`].
    ///
    /// # Errors
    /// [`OpsError::Shape`] if `x` is not `H` wide.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>, OpsError> {
        ops::layer_norm(x, self.weight.view(), self.bias.view(), self.eps)
    }
}

/// Word + position + token type embeddings, then LayerNorm (`embeddings.*`).
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    word: Array2<f32>,
    position: Array2<f32>,
    token_type: Array2<f32>,
    layer_norm: LayerNorm,
}

impl BertEmbeddings {
    /// Loads `embeddings.{word,position,token_type}_embeddings.weight` and `embeddings.LayerNorm`.
    ///
    /// # Errors
    /// Missing, mistyped, misshapen or non-finite tensors.
    pub fn load(t: &Tensors<'_>, cfg: &BertConfig) -> Result<Self, OpsError> {
        let h = cfg.hidden_size;
        Ok(Self {
            word: t.matrix("embeddings.word_embeddings.weight", cfg.vocab_size, h)?,
            position: t.matrix(
                "embeddings.position_embeddings.weight",
                cfg.max_position_embeddings,
                h,
            )?,
            token_type: t.matrix(
                "embeddings.token_type_embeddings.weight",
                cfg.type_vocab_size,
                h,
            )?,
            layer_norm: LayerNorm::load(t, "embeddings.LayerNorm", h, cfg.layer_norm_eps)?,
        })
    }

    /// Token ids and token type ids (one each per token) → `[T, H]`.
    ///
    /// # Errors
    /// See [`ops::embed`].
    pub fn forward(&self, ids: &[u32], type_ids: &[u32]) -> Result<Array2<f32>, OpsError> {
        let _span = tracing::trace_span!("bert_embeddings", tokens = ids.len()).entered();
        let x = ops::embed(
            self.word.view(),
            self.position.view(),
            self.token_type.view(),
            ids,
            type_ids,
        )?;
        self.layer_norm.forward(x.view())
    }
}

/// The query, key and value projections: three layers, or one fused `[3H, H]` layer when the
/// factory asks for it ([`LinearFactory::fuse_qkv`]).
enum Qkv {
    Separate([Box<dyn Linear>; 3]),
    Fused(Box<dyn Linear>),
}

/// Query, key and value projections and scaled dot-product attention
/// (`encoder.layer.N.attention.self.{query,key,value}`).
pub struct BertSelfAttention {
    qkv: Qkv,
    hidden: usize,
    heads: usize,
}

impl BertSelfAttention {
    /// Loads the three projections under `{prefix}.{query,key,value}`; if the factory fuses
    /// them, builds one layer `{prefix}.qkv` from the three weights stacked in that order.
    ///
    /// # Errors
    /// Checkpoint errors, or the factory's.
    pub fn load(
        t: &Tensors<'_>,
        cfg: &BertConfig,
        prefix: &str,
        factory: &mut dyn LinearFactory,
    ) -> Result<Self, OpsError> {
        let h = cfg.hidden_size;
        let qkv = if factory.fuse_qkv() {
            let mut weights = Vec::with_capacity(3);
            let mut biases = Vec::with_capacity(3);
            for part in ["query", "key", "value"] {
                weights.push(t.matrix(&format!("{prefix}.{part}.weight"), h, h)?);
                biases.push(t.vector(&format!("{prefix}.{part}.bias"), h)?);
            }
            let stack_err =
                |e: ndarray::ShapeError| OpsError::shape(format!("{prefix}.qkv"), e.to_string());
            let weight = ndarray::concatenate(
                ndarray::Axis(0),
                &[weights[0].view(), weights[1].view(), weights[2].view()],
            )
            .map_err(stack_err)?;
            let bias = ndarray::concatenate(
                ndarray::Axis(0),
                &[biases[0].view(), biases[1].view(), biases[2].view()],
            )
            .map_err(stack_err)?;
            let name = format!("{prefix}.qkv");
            let layer = factory.build(LinearSpec { name, weight, bias })?;
            check_shape(&*layer, h, 3 * h)?;
            Qkv::Fused(layer)
        } else {
            Qkv::Separate([
                load_linear(t, factory, format!("{prefix}.query"), h, h)?,
                load_linear(t, factory, format!("{prefix}.key"), h, h)?,
                load_linear(t, factory, format!("{prefix}.value"), h, h)?,
            ])
        };
        Ok(Self {
            qkv,
            hidden: h,
            heads: cfg.num_attention_heads,
        })
    }

    /// `[T, H]` and mask `[T]` → context `[T, H]`.
    ///
    /// # Errors
    /// See [`ops::attention`] and [`Linear::forward`].
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        mask: ArrayView1<'_, bool>,
    ) -> Result<Array2<f32>, OpsError> {
        match &self.qkv {
            Qkv::Separate([query, key, value]) => {
                let q = query.forward(x)?;
                let k = key.forward(x)?;
                let v = value.forward(x)?;
                ops::attention(q.view(), k.view(), v.view(), self.heads, mask)
            }
            Qkv::Fused(layer) => {
                let y = layer.forward(x)?;
                let h = self.hidden;
                if y.ncols() != 3 * h {
                    return Err(OpsError::shape(
                        layer.name().to_string(),
                        format!("output {:?}, expected {} columns", y.dim(), 3 * h),
                    ));
                }
                let part = |i: usize| {
                    y.slice_axis(ndarray::Axis(1), ndarray::Slice::from(i * h..(i + 1) * h))
                };
                ops::attention(part(0), part(1), part(2), self.heads, mask)
            }
        }
    }

    /// The linear layers, in checkpoint order (three, or the one fused layer).
    pub fn linears(&self) -> Vec<&dyn Linear> {
        match &self.qkv {
            Qkv::Separate(layers) => layers.iter().map(|l| &**l).collect(),
            Qkv::Fused(layer) => vec![&**layer],
        }
    }
}

/// Self-attention, output projection, residual and LayerNorm (`encoder.layer.N.attention`).
pub struct BertAttention {
    self_attention: BertSelfAttention,
    output: Box<dyn Linear>,
    layer_norm: LayerNorm,
}

impl BertAttention {
    /// Loads `{prefix}.self.*`, `{prefix}.output.dense` and `{prefix}.output.LayerNorm`.
    ///
    /// # Errors
    /// Checkpoint errors, or the factory's.
    pub fn load(
        t: &Tensors<'_>,
        cfg: &BertConfig,
        prefix: &str,
        factory: &mut dyn LinearFactory,
    ) -> Result<Self, OpsError> {
        let h = cfg.hidden_size;
        Ok(Self {
            self_attention: BertSelfAttention::load(t, cfg, &format!("{prefix}.self"), factory)?,
            output: load_linear(t, factory, format!("{prefix}.output.dense"), h, h)?,
            layer_norm: LayerNorm::load(
                t,
                &format!("{prefix}.output.LayerNorm"),
                h,
                cfg.layer_norm_eps,
            )?,
        })
    }

    /// `LayerNorm(dense(attention(x)) + x)`: `[T, H]` → `[T, H]`.
    ///
    /// # Errors
    /// See [`BertSelfAttention::forward`].
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        mask: ArrayView1<'_, bool>,
    ) -> Result<Array2<f32>, OpsError> {
        let context = self.self_attention.forward(x, mask)?;
        let mut y = self.output.forward(context.view())?;
        ops::residual_add(y.view_mut(), x)?;
        self.layer_norm.forward(y.view())
    }
}

/// One transformer block (`encoder.layer.N`): attention, then the GELU feed-forward with its
/// residual and LayerNorm.
pub struct BertLayer {
    index: usize,
    attention: BertAttention,
    intermediate: Box<dyn Linear>,
    output: Box<dyn Linear>,
    layer_norm: LayerNorm,
}

impl BertLayer {
    /// Loads `encoder.layer.{index}.*`.
    ///
    /// # Errors
    /// Checkpoint errors, or the factory's.
    pub fn load(
        t: &Tensors<'_>,
        cfg: &BertConfig,
        index: usize,
        factory: &mut dyn LinearFactory,
    ) -> Result<Self, OpsError> {
        let p = format!("encoder.layer.{index}");
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            index,
            attention: BertAttention::load(t, cfg, &format!("{p}.attention"), factory)?,
            intermediate: load_linear(t, factory, format!("{p}.intermediate.dense"), h, i)?,
            output: load_linear(t, factory, format!("{p}.output.dense"), i, h)?,
            layer_norm: LayerNorm::load(
                t,
                &format!("{p}.output.LayerNorm"),
                h,
                cfg.layer_norm_eps,
            )?,
        })
    }

    /// `[T, H]` → `[T, H]`.
    ///
    /// # Errors
    /// See [`BertAttention::forward`] and [`Linear::forward`].
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        mask: ArrayView1<'_, bool>,
    ) -> Result<Array2<f32>, OpsError> {
        let _span = tracing::trace_span!("bert_layer", index = self.index).entered();
        let a = self.attention.forward(x, mask)?;
        let mut inner = self.intermediate.forward(a.view())?;
        ops::gelu_inplace(inner.view_mut());
        let mut y = self.output.forward(inner.view())?;
        ops::residual_add(y.view_mut(), a.view())?;
        self.layer_norm.forward(y.view())
    }

    /// The layer's linear maps in execution order: query, key, value (or the fused Q/K/V
    /// layer), attention output, feed-forward in, feed-forward out.
    pub fn linears(&self) -> Vec<&dyn Linear> {
        let mut l = self.attention.self_attention.linears();
        l.extend([
            &*self.attention.output,
            &*self.intermediate as &dyn Linear,
            &*self.output,
        ]);
        l
    }
}

/// The stack of [`BertLayer`]s (`encoder.layer.*`).
pub struct BertEncoder {
    layers: Vec<BertLayer>,
}

impl BertEncoder {
    /// Loads `cfg.num_hidden_layers` layers.
    ///
    /// # Errors
    /// Checkpoint errors, or the factory's.
    pub fn load(
        t: &Tensors<'_>,
        cfg: &BertConfig,
        factory: &mut dyn LinearFactory,
    ) -> Result<Self, OpsError> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(t, cfg, i, factory))
            .collect::<Result<_, _>>()?;
        Ok(Self { layers })
    }

    /// `[T, H]` → `[T, H]` through every layer.
    ///
    /// # Errors
    /// See [`BertLayer::forward`].
    pub fn forward(
        &self,
        x: Array2<f32>,
        mask: ArrayView1<'_, bool>,
    ) -> Result<Array2<f32>, OpsError> {
        self.layers
            .iter()
            .try_fold(x, |x, layer| layer.forward(x.view(), mask))
    }

    /// The layers in order.
    #[must_use]
    pub fn layers(&self) -> &[BertLayer] {
        &self.layers
    }
}

/// Embeddings + encoder: token ids → last hidden state `[T, H]` (no pooler).
pub struct BertModel {
    config: BertConfig,
    embeddings: BertEmbeddings,
    encoder: BertEncoder,
}

impl BertModel {
    /// Loads a BERT checkpoint laid out as `transformers`' `BertModel` (no `bert.` prefix), with
    /// each linear layer built by `factory`. Tensors the encoder does not use (`pooler.*`,
    /// `embeddings.position_ids`) are ignored.
    ///
    /// # Errors
    /// [`OpsError::MissingTensor`], [`OpsError::TensorDtype`], [`OpsError::TensorShape`],
    /// [`OpsError::NonFinite`], or the factory's error.
    pub fn load(
        t: &Tensors<'_>,
        config: BertConfig,
        factory: &mut dyn LinearFactory,
    ) -> Result<Self, OpsError> {
        let embeddings = BertEmbeddings::load(t, &config)?;
        let encoder = BertEncoder::load(t, &config, factory)?;
        Ok(Self {
            config,
            embeddings,
            encoder,
        })
    }

    /// Forward pass of one sequence: `ids`, `type_ids` and `mask` have one entry per token.
    /// Returns the last hidden state `[T, H]`.
    ///
    /// # Errors
    /// [`OpsError::Shape`] if the three lengths differ; see also [`ops::embed`] and
    /// [`BertLayer::forward`].
    pub fn forward(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        mask: &[bool],
    ) -> Result<Array2<f32>, OpsError> {
        if mask.len() != ids.len() {
            return Err(OpsError::shape(
                "bert",
                format!("{} ids, mask of {}", ids.len(), mask.len()),
            ));
        }
        let x = self.embeddings.forward(ids, type_ids)?;
        self.encoder.forward(x, ArrayView1::from(mask))
    }

    /// The configuration the model was loaded with.
    #[must_use]
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Every linear layer in execution order (6 per layer, 36 for MiniLM-L6; 4 per layer when
    /// Q/K/V are fused).
    #[must_use]
    pub fn linears(&self) -> Vec<&dyn Linear> {
        self.encoder
            .layers()
            .iter()
            .flat_map(BertLayer::linears)
            .collect()
    }
}
