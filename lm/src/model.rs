//! The decoder every supported family shares, as structs of layers built from a checkpoint
//! with tensor paths named exactly like Hugging Face's keys. A family's differences are
//! options of [`ModelConfig`] read by the components: the norms and activations in
//! [`crate::layers`], attention extras in [`crate::attention`], the MLP kinds in
//! [`crate::mlp`] and [`crate::moe`], and the block layout and tensor names here.
//!
//! The forward pass is split where RE-Control acts: [`CausalLm::forward_hidden`] returns the final
//! hidden state after the last norm, [`CausalLm::logits`] turns a hidden state into logits.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::attention::{Attention, Masks, Packed, ProjectionNames, Rotary, Segment};
use crate::cache::KvCache;
use crate::config::{Architecture, AttentionWindow, BlockKind, ModelConfig};
use crate::device::DType;
use crate::error::{Error, Result};
use crate::layers::Norm;
use crate::mlp::Mlp;
use crate::packed::PackedWeight;
use crate::rope::Rope;
use crate::weights::{ParamSource, Weights};

/// The largest model (its parameters' bytes) whose matrices are packed for decoding on the
/// CPU: the packs take about as much memory again.
pub const PACK_MAX_BYTES: usize = 4 << 30;

/// Where a family keeps its tensors.
#[derive(Debug, Clone, Copy)]
struct TensorNames {
    embed: &'static str,
    /// Layer `i` lives under `{layers}.{i}`.
    layers: &'static str,
    final_norm: &'static str,
    attention: &'static str,
    projections: ProjectionNames,
    /// The MLP under a layer (a mixture of experts names its own paths).
    mlp: &'static str,
}

impl TensorNames {
    fn of(arch: Architecture) -> Self {
        match arch {
            Architecture::Falcon => Self {
                embed: "transformer.word_embeddings.weight",
                layers: "transformer.h",
                final_norm: "transformer.ln_f",
                attention: "self_attention",
                projections: ProjectionNames {
                    fused: "query_key_value",
                    out: "dense",
                },
                mlp: "mlp",
            },
            _ => Self {
                embed: "model.embed_tokens.weight",
                layers: "model.layers",
                final_norm: "model.norm",
                attention: "self_attn",
                projections: ProjectionNames {
                    fused: "qkv_proj",
                    out: "o_proj",
                },
                mlp: "mlp",
            },
        }
    }
}

/// The norms of a block, by [`BlockKind`].
#[derive(Debug)]
enum BlockNorms {
    Sequential {
        input_layernorm: Norm,
        post_attention_layernorm: Norm,
    },
    Sandwich {
        input_layernorm: Norm,
        post_attention_layernorm: Norm,
        pre_feedforward_layernorm: Norm,
        post_feedforward_layernorm: Norm,
    },
    /// `ln_mlp` is `None` when both branches share `ln_attn` (`input_layernorm`).
    Parallel { ln_attn: Norm, ln_mlp: Option<Norm> },
}

impl BlockNorms {
    /// Parameters by checkpoint name: the norms that come before the attention in the
    /// checkpoint's order (`first`), or the others.
    fn params(&self, prefix: &str, first: bool, out: &mut Vec<(String, Tensor)>) {
        let mut add = |name: &str, n: &Norm| n.params(&format!("{prefix}.{name}"), out);
        match (self, first) {
            (
                Self::Sequential {
                    input_layernorm, ..
                },
                true,
            )
            | (
                Self::Sandwich {
                    input_layernorm, ..
                },
                true,
            ) => add("input_layernorm", input_layernorm),
            (
                Self::Sequential {
                    post_attention_layernorm,
                    ..
                },
                false,
            ) => add("post_attention_layernorm", post_attention_layernorm),
            (
                Self::Sandwich {
                    post_attention_layernorm,
                    pre_feedforward_layernorm,
                    post_feedforward_layernorm,
                    ..
                },
                false,
            ) => {
                add("post_attention_layernorm", post_attention_layernorm);
                add("pre_feedforward_layernorm", pre_feedforward_layernorm);
                add("post_feedforward_layernorm", post_feedforward_layernorm);
            }
            (
                Self::Parallel {
                    ln_attn,
                    ln_mlp: Some(ln_mlp),
                },
                true,
            ) => {
                add("ln_attn", ln_attn);
                add("ln_mlp", ln_mlp);
            }
            (
                Self::Parallel {
                    ln_attn,
                    ln_mlp: None,
                },
                true,
            ) => add("input_layernorm", ln_attn),
            (Self::Parallel { .. }, false) => {}
        }
    }
}

#[derive(Debug)]
struct DecoderLayer {
    norms: BlockNorms,
    self_attn: Attention,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(
        w: &dyn ParamSource,
        prefix: &str,
        cfg: &ModelConfig,
        window: AttentionWindow,
        names: &TensorNames,
    ) -> Result<Self> {
        let norm = |name: &str| {
            Norm::load(
                w,
                &format!("{prefix}.{name}"),
                cfg.hidden_size,
                cfg.norm,
                cfg.rms_norm_eps,
            )
        };
        let attention = || {
            let path = format!("{prefix}.{}", names.attention);
            Attention::load(w, &path, cfg, window, names.projections)
        };
        let mlp = || Mlp::load(w, &format!("{prefix}.{}", names.mlp), prefix, cfg);
        // In the checkpoint's order (a fresh model for pretraining draws its weights in it).
        Ok(match cfg.block {
            BlockKind::Sequential => {
                let input_layernorm = norm("input_layernorm")?;
                let self_attn = attention()?;
                let post_attention_layernorm = norm("post_attention_layernorm")?;
                let norms = BlockNorms::Sequential {
                    input_layernorm,
                    post_attention_layernorm,
                };
                Self {
                    norms,
                    self_attn,
                    mlp: mlp()?,
                }
            }
            BlockKind::Sandwich => {
                let input_layernorm = norm("input_layernorm")?;
                let self_attn = attention()?;
                let post_attention_layernorm = norm("post_attention_layernorm")?;
                let pre_feedforward_layernorm = norm("pre_feedforward_layernorm")?;
                let mlp = mlp()?;
                let norms = BlockNorms::Sandwich {
                    input_layernorm,
                    post_attention_layernorm,
                    pre_feedforward_layernorm,
                    post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
                };
                Self {
                    norms,
                    self_attn,
                    mlp,
                }
            }
            BlockKind::Parallel { two_norms } => {
                let norms = if two_norms {
                    BlockNorms::Parallel {
                        ln_attn: norm("ln_attn")?,
                        ln_mlp: Some(norm("ln_mlp")?),
                    }
                } else {
                    BlockNorms::Parallel {
                        ln_attn: norm("input_layernorm")?,
                        ln_mlp: None,
                    }
                };
                Self {
                    norms,
                    self_attn: attention()?,
                    mlp: mlp()?,
                }
            }
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        masks: &Masks,
        cache: Option<&mut KvCache>,
        layer: usize,
    ) -> Result<Tensor> {
        let attn = |h: &Tensor| self.self_attn.forward(h, rotary, masks, cache, layer);
        match &self.norms {
            BlockNorms::Sequential {
                input_layernorm,
                post_attention_layernorm,
            } => {
                let x = x.f_add(&attn(&input_layernorm.forward(x)?)?)?;
                let mlp = self.mlp.forward(&post_attention_layernorm.forward(&x)?)?;
                Ok(x.f_add(&mlp)?)
            }
            BlockNorms::Sandwich {
                input_layernorm,
                post_attention_layernorm,
                pre_feedforward_layernorm,
                post_feedforward_layernorm,
            } => {
                let a = post_attention_layernorm.forward(&attn(&input_layernorm.forward(x)?)?)?;
                let x = x.f_add(&a)?;
                let m = self.mlp.forward(&pre_feedforward_layernorm.forward(&x)?)?;
                Ok(x.f_add(&post_feedforward_layernorm.forward(&m)?)?)
            }
            // x + (mlp(.) + attn(.)), in transformers' order.
            BlockNorms::Parallel { ln_attn, ln_mlp } => {
                let h = ln_attn.forward(x)?;
                let a = attn(&h)?;
                let m = match ln_mlp {
                    Some(n) => self.mlp.forward(&n.forward(x)?)?,
                    None => self.mlp.forward(&h)?,
                };
                Ok(m.f_add(&a)?.f_add(x)?)
            }
        }
    }

    fn join_projections(&mut self) -> Result<()> {
        self.self_attn.join_projections()?;
        self.mlp.join_projections()
    }

    fn store_in_out(&mut self, pack: bool) -> Result<()> {
        self.self_attn.store_in_out(pack)?;
        self.mlp.store_in_out(pack)
    }

    fn params(&self, prefix: &str, names: &TensorNames, out: &mut Vec<(String, Tensor)>) {
        self.norms.params(prefix, true, out);
        self.self_attn
            .params(&format!("{prefix}.{}", names.attention), out);
        self.norms.params(prefix, false, out);
        self.mlp
            .params(&format!("{prefix}.{}", names.mlp), prefix, out);
    }
}

/// Which positions [`CausalLm::forward_hidden`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Only the newest position: `[batch, hidden]`.
    Last,
    /// Every input position: `[batch, seq, hidden]`.
    All,
}

/// One forward pass's inputs.
#[derive(Debug)]
pub struct StepInput<'a> {
    /// New token ids, `[batch, seq]` int64.
    pub input_ids: &'a Tensor,
    /// Position ids of the new tokens, `[batch, seq]` int64.
    pub position_ids: &'a Tensor,
    /// Which cache positions (past and new, `[batch, past + seq]` bool) hold real tokens; `None`
    /// when every position does (no padding).
    pub key_mask: Option<&'a Tensor>,
}

/// A causal language model hosted in libtorch.
#[derive(Debug)]
pub struct CausalLm {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    /// `[vocab, hidden]`; the embedding matrix itself when embeddings are tied; `None` for a
    /// backbone loaded without its head (sequence-classification checkpoints have none).
    lm_head: Option<Tensor>,
    /// The LM head packed for decoding on the CPU ([`CausalLm::prepare_for_inference`]).
    head_pack: Option<PackedWeight>,
    rope: Rope,
    /// Gemma 3's rotary table of the sliding-window layers.
    local_rope: Option<Rope>,
    names: TensorNames,
    device: Device,
    kind: Kind,
}

impl CausalLm {
    /// Loads the weights in `dir` for `config`, as `dtype` on `device`, for inference
    /// ([`CausalLm::prepare_for_inference`]).
    pub fn load(dir: &Path, config: ModelConfig, device: Device, dtype: DType) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let w = Weights::open(dir, device, dtype.kind())?;
        let mut model = Self::build(config, &w, device, dtype)?;
        model.prepare_for_inference()?;
        Ok(model)
    }

    /// Lays the weights out for decoding: each layer's separate q/k/v projections joined into
    /// one matrix and its gate and up projections into another (two products per layer and
    /// step instead of five, as Phi-3 checkpoints already store them), and on the CPU the
    /// layers' matrices stored `[in, out]` (MKL multiplies a few rows by them two to three
    /// times faster than by the checkpoints' `[out, in]`; the LM head, often the embedding
    /// matrix itself, keeps its layout). The joined weights are new tensors:
    /// [`CausalLm::named_params`] still gives every parameter under its checkpoint name and
    /// shape, as views, which a trainer must not treat as leaves.
    ///
    /// On the CPU, a model of at most [`PACK_MAX_BYTES`] also packs its matrices and LM head
    /// for decoding (MKL's and oneDNN's packed products): a packed copy of each, about as large
    /// again as the weights, made on the first decoding step or by [`CausalLm::warm_up`].
    pub fn prepare_for_inference(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let cpu = self.device == Device::Cpu;
        let bytes: usize = self
            .named_params()
            .iter()
            .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
            .sum();
        let pack = cpu && bytes <= PACK_MAX_BYTES;
        for layer in &mut self.layers {
            layer.join_projections()?;
            if cpu {
                layer.store_in_out(pack)?;
            }
        }
        if pack {
            self.head_pack = self
                .lm_head
                .as_ref()
                .map(|h| PackedWeight::new(h.shallow_clone()));
        }
        Ok(())
    }

    /// Makes the packed weights of the decoding products for batches of `rows` now (the
    /// one-time work of the first decoding step, [`CausalLm::prepare_for_inference`]) by
    /// running one decoding step of `rows` rows on a scratch cache; a stage calls it before
    /// it times its batches, as a benchmark warms a model up. Nothing to do where nothing is
    /// packed (a GPU, a model over [`PACK_MAX_BYTES`], a backbone).
    pub fn warm_up(&self, rows: usize) -> Result<()> {
        if self.head_pack.is_none() || rows == 0 {
            return Ok(());
        }
        let rows = rows.min(crate::kernels::MAX_ROWS) as i64;
        let zeros = Tensor::f_zeros([rows, 1], (Kind::Int64, self.device))?;
        let input = StepInput {
            input_ids: &zeros,
            position_ids: &zeros,
            key_mask: None,
        };
        let mut cache = self.new_cache(1);
        let hidden = self.forward_hidden(&input, &mut cache, Positions::Last)?;
        let _logits = self.logits(&hidden)?;
        Ok(())
    }

    /// Loads the decoder without the LM head, e.g. the backbone of a reward model.
    pub fn load_backbone(
        dir: &Path,
        config: ModelConfig,
        device: Device,
        dtype: DType,
    ) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let w = Weights::open(dir, device, dtype.kind())?;
        let mut model = Self::build_parts(config, &w, device, dtype, false)?;
        model.lm_head = None;
        Ok(model)
    }

    /// Builds the model from parameters named like HF checkpoint keys.
    pub fn build(
        config: ModelConfig,
        w: &dyn ParamSource,
        device: Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::build_parts(config, w, device, dtype, true)
    }

    fn build_parts(
        config: ModelConfig,
        w: &dyn ParamSource,
        device: Device,
        dtype: DType,
        with_lm_head: bool,
    ) -> Result<Self> {
        let kind = dtype.kind();
        let (v, h) = (config.vocab_size as i64, config.hidden_size as i64);
        let names = TensorNames::of(config.architecture);
        let embed_tokens = w.get(names.embed, &[v, h])?;
        let layers = config
            .windows
            .iter()
            .enumerate()
            .map(|(i, &window)| {
                let prefix = format!("{}.{i}", names.layers);
                DecoderLayer::load(w, &prefix, &config, window, &names)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = Norm::load(
            w,
            names.final_norm,
            config.hidden_size,
            config.norm,
            config.rms_norm_eps,
        )?;
        // Tied embeddings: the checkpoint's lm_head (if any) is ignored, as transformers does.
        let lm_head = if !with_lm_head {
            None
        } else if config.tie_word_embeddings {
            Some(embed_tokens.shallow_clone())
        } else {
            Some(w.get("lm_head.weight", &[v, h])?)
        };
        let rope = Rope::new(&config.rope, config.head_dim, device)?;
        let local_rope = match &config.local_rope {
            Some(r) => Some(Rope::new(r, config.head_dim, device)?),
            None => None,
        };
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            head_pack: None,
            rope,
            local_rope,
            names,
            device,
            kind,
        })
    }

    /// The validated configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The activation kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Token embeddings `[batch, seq, hidden]` (Gemma: times `sqrt(hidden)` in the weights'
    /// dtype, as transformers).
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let x = Tensor::f_embedding(&self.embed_tokens, input_ids, -1, false, false)?;
        Ok(match self.config.embed_scale {
            Some(scale) => {
                let scale = Tensor::from(scale as f32)
                    .f_to_kind(self.embed_tokens.kind())?
                    .f_to_device(self.device)?;
                x.f_mul(&scale)?
            }
            None => x,
        })
    }

    /// The rotary tables for `positions` `[batch, seq]`.
    fn rotary(&self, positions: &Tensor) -> Result<Rotary> {
        Ok(Rotary {
            global: self.rope.cos_sin(positions, self.kind)?,
            local: match &self.local_rope {
                Some(r) => Some(r.cos_sin(positions, self.kind)?),
                None => None,
            },
        })
    }

    /// A cache sized for `capacity` positions; with LongRoPE it also keeps the ids it is fed
    /// (see [`CausalLm::forward_hidden`]).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let cache = KvCache::new(self.layers.len(), capacity);
        match self.rope.long_after() {
            Some(_) => cache.keeping_tokens(),
            None => cache,
        }
    }

    /// Runs the decoder over the new tokens (appending their keys and values to `cache`) and
    /// returns the final hidden state after the last norm: `[batch, hidden]` for
    /// [`Positions::Last`], `[batch, seq, hidden]` for [`Positions::All`].
    ///
    /// LongRoPE (Phi-3): the first pass whose positions reach past the pretraining length, on a
    /// cache filled before it (with the short factors), runs the cached tokens again with the
    /// new ones from an empty cache, so that every key is rotated with the long factors from
    /// then on, as transformers' generation does. Transparent to the caller, whose `cache`
    /// must come from [`CausalLm::new_cache`].
    pub fn forward_hidden(
        &self,
        input: &StepInput<'_>,
        cache: &mut KvCache,
        positions: Positions,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        if self.crosses_to_long(input, cache)? {
            return self.rerun_long(input, cache, positions);
        }
        self.forward_cached(input, cache, positions)
    }

    /// Whether `input` takes LongRoPE's long factors while `cache` holds keys rotated with the
    /// short ones: transformers' `Phi3ForCausalLM.prepare_inputs_for_generation` drops its
    /// cache when the input reaches `original_max_position_embeddings + 1` tokens while the
    /// cache holds at most `original_max_position_embeddings`. A cache that short holds only
    /// short-factor keys (a position never exceeds its cache index); a longer one was filled
    /// by long passes.
    fn crosses_to_long(&self, input: &StepInput<'_>, cache: &KvCache) -> Result<bool> {
        match self.rope.long_after() {
            Some(original) if !cache.is_empty() && cache.len() as i64 <= original => {
                self.rope.is_long(input.position_ids)
            }
            _ => Ok(false),
        }
    }

    /// Empties `cache` and runs the tokens it was fed followed by `input` in one pass (with the
    /// long factors); returns the states of `input`'s positions.
    fn rerun_long(
        &self,
        input: &StepInput<'_>,
        cache: &mut KvCache,
        positions: Positions,
    ) -> Result<Tensor> {
        let original = self.rope.long_after().unwrap_or_default();
        let (past_ids, past_positions) = cache
            .restart()
            .ok_or(Error::CacheKeptNoTokens { original })?;
        let past = past_ids.size()[1];
        let input_ids = Tensor::f_cat(&[&past_ids, input.input_ids], 1)?; // [batch, past + seq]
        let position_ids = Tensor::f_cat(&[&past_positions, input.position_ids], 1)?;
        let whole = StepInput {
            input_ids: &input_ids,
            position_ids: &position_ids,
            key_mask: input.key_mask,
        };
        let hidden = self.forward_cached(&whole, cache, positions)?;
        Ok(match positions {
            Positions::Last => hidden,
            Positions::All => hidden.f_narrow(1, past, input.input_ids.size()[1])?,
        })
    }

    /// [`CausalLm::forward_hidden`] without the LongRoPE re-run.
    fn forward_cached(
        &self,
        input: &StepInput<'_>,
        cache: &mut KvCache,
        positions: Positions,
    ) -> Result<Tensor> {
        if positions == Positions::Last && cache.is_empty() {
            if let Some(hidden) = self.prefill_packed(input, cache)? {
                return Ok(hidden);
            }
        }
        let seq = input.input_ids.size()[1];
        let masks = Masks::new(
            input.key_mask,
            &self.config.windows,
            cache.len() as i64,
            seq,
            self.device,
        )?;
        let rotary = self.rotary(input.position_ids)?;
        let mut x = self.embed(input.input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rotary, &masks, Some(&mut *cache), i)?;
        }
        cache.advance(seq as usize);
        cache.record(input.input_ids, input.position_ids)?;
        let x = match positions {
            // The norm acts per position, so selecting first saves work.
            Positions::Last => x.f_select(1, seq - 1)?,
            Positions::All => x,
        };
        self.norm.forward(&x)
    }

    /// The prefill of a left-padded batch on the CPU without its padding (see [`Packed`]):
    /// the last position's states `[batch, hidden]` as the padded pass would give them, with
    /// the cache filled as it would leave it (zeros at the padding). `None` (nothing done)
    /// where it does not apply: no padding, a mask that is not left padding, a CUDA device
    /// (where the padded pass's one attention call is cheaper than one per row).
    fn prefill_packed(&self, input: &StepInput<'_>, cache: &mut KvCache) -> Result<Option<Tensor>> {
        let Some(key_mask) = input.key_mask else {
            return Ok(None);
        };
        let (batch, width) = (key_mask.size()[0], key_mask.size()[1]);
        if self.device != Device::Cpu || input.input_ids.size() != [batch, width] || batch < 2 {
            return Ok(None);
        }
        let valid = Vec::<u8>::try_from(key_mask.f_to_kind(Kind::Uint8)?.f_flatten(0, -1)?)?;
        let mut rows = Vec::with_capacity(batch as usize);
        let (mut tokens, mut last) = (Vec::new(), Vec::with_capacity(batch as usize));
        for (r, row) in valid.chunks_exact(width as usize).enumerate() {
            let pad = row.iter().take_while(|&&v| v == 0).count();
            if pad == row.len() || row[pad..].contains(&0) {
                return Ok(None);
            }
            let (start, len) = (tokens.len() as i64, (row.len() - pad) as i64);
            let first = (r * row.len() + pad) as i64;
            tokens.extend(first..first + len);
            last.push(start + len - 1);
            let masks = Masks::new(None, &self.config.windows, 0, len, self.device)?;
            rows.push(Segment { start, len, masks });
        }
        let tokens = Tensor::from_slice(&tokens);
        let pick = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_flatten(0, -1)?
                .f_index_select(0, &tokens)?
                .f_unsqueeze(0)?)
        };
        let (ids, position_ids) = (pick(input.input_ids)?, pick(input.position_ids)?);
        let masks = Masks::packed(Packed { rows, width });
        let rotary = self.rotary(&position_ids)?;
        let mut x = self.embed(&ids)?; // [1, tokens, hidden]
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rotary, &masks, Some(&mut *cache), i)?;
        }
        cache.advance(width as usize);
        cache.record(input.input_ids, input.position_ids)?;
        let x = x
            .f_select(0, 0)?
            .f_index_select(0, &Tensor::from_slice(&last))?;
        Ok(Some(self.norm.forward(&x)?))
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs the embeddings and layers `0..upto` over whole (left-padded) sequences without
    /// autograd; with [`CausalLm::forward_suffix`], the split forward pass of fine-tuning the
    /// top layers. Returns `[batch, seq, hidden]`.
    pub fn forward_prefix(&self, input: &StepInput<'_>, upto: usize) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let seq = input.input_ids.size()[1];
        let masks = Masks::new(input.key_mask, &self.config.windows, 0, seq, self.device)?;
        let rotary = self.rotary(input.position_ids)?;
        let mut x = self.embed(input.input_ids)?;
        for (i, layer) in self.layers.iter().enumerate().take(upto) {
            x = layer.forward(&x, &rotary, &masks, None, i)?;
        }
        Ok(x)
    }

    /// Runs layers `from..` and the final norm with autograd on the output of
    /// [`CausalLm::forward_prefix`]; returns the post-norm state of the last position,
    /// `[batch, hidden]`.
    pub fn forward_suffix(&self, x: &Tensor, input: &StepInput<'_>, from: usize) -> Result<Tensor> {
        let seq = input.input_ids.size()[1];
        let masks = Masks::new(input.key_mask, &self.config.windows, 0, seq, self.device)?;
        let rotary = self.rotary(input.position_ids)?;
        let mut x = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate().skip(from) {
            x = layer.forward(&x, &rotary, &masks, None, i)?;
        }
        self.norm.forward(&x.f_select(1, seq - 1)?)
    }

    /// Training forward pass: logits `[batch, seq, vocab]` of unpadded sequences `[batch, seq]`
    /// starting at position 0, with autograd (no cache, no `no_grad`).
    pub fn forward_train(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = (input_ids.size()[0], input_ids.size()[1]);
        let masks = Masks::new(None, &self.config.windows, 0, seq, self.device)?;
        let positions = Tensor::f_arange(seq, (Kind::Int64, self.device))?
            .f_unsqueeze(0)?
            .f_expand([batch, seq], false)?;
        let rotary = self.rotary(&positions)?;
        let mut x = self.embed(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rotary, &masks, None, i)?;
        }
        self.logits(&self.norm.forward(&x)?)
    }

    /// Logits `[..., vocab]` (in the model's dtype) from final hidden states `[..., hidden]`
    /// (Gemma 2: soft-capped, `cap * tanh(logit / cap)`).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().ok_or(Error::NoLmHead)?;
        let packed = match &self.head_pack {
            Some(p) => p.product(hidden)?,
            None => None,
        };
        let logits = match packed {
            Some(logits) => logits,
            None => hidden.f_linear(head, None::<&Tensor>)?,
        };
        Ok(match self.config.final_softcap {
            Some(cap) => logits.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?,
            None => logits,
        })
    }

    /// Every parameter by its HF checkpoint name (`lm_head.weight` only when untied), sharing
    /// storage with the model.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let names = &self.names;
        let mut out = vec![(names.embed.to_owned(), self.embed_tokens.shallow_clone())];
        for (i, layer) in self.layers.iter().enumerate() {
            layer.params(&format!("{}.{i}", names.layers), names, &mut out);
        }
        self.norm.params(names.final_norm, &mut out);
        if let (Some(head), false) = (&self.lm_head, self.config.tie_word_embeddings) {
            out.push(("lm_head.weight".to_owned(), head.shallow_clone()));
        }
        out
    }
}
