//! The Llama-family decoder (Llama 2/3, Vicuna, Mistral, Qwen2) as structs of layers, built from
//! a checkpoint with tensor paths named exactly like Hugging Face's keys.
//!
//! The forward pass is split where RE-Control acts: [`CausalLm::forward_hidden`] returns the final
//! hidden state after the last norm, [`CausalLm::logits`] turns a hidden state into logits.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::cache::KvCache;
use crate::config::{AttentionWindow, ModelConfig};
use crate::device::DType;
use crate::error::{Error, Result};
use crate::rope::{apply_rotary, Rope};
use crate::weights::{ParamSource, Weights};

/// `y = x W^T + b`.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(
        w: &dyn ParamSource,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.get(
            &format!("{prefix}.weight"),
            &[out_dim as i64, in_dim as i64],
        )?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_dim as i64])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, self.bias.as_ref())?)
    }

    fn params(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{prefix}.weight"), self.weight.shallow_clone()));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), b.shallow_clone()));
        }
    }
}

/// RMSNorm with the variance in float32, as transformers' `LlamaRMSNorm`.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(w: &dyn ParamSource, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{prefix}.weight"), &[dim as i64])?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        let x32 = x.f_to_kind(Kind::Float)?;
        let variance = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = x32.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(self.weight.f_mul(&normed.f_to_kind(kind)?)?)
    }

    fn params(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{prefix}.weight"), self.weight.shallow_clone()));
    }
}

/// Multi-head attention with grouped key/value heads and rotary positions.
#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    window: AttentionWindow,
}

impl Attention {
    fn load(
        w: &dyn ParamSource,
        prefix: &str,
        cfg: &ModelConfig,
        window: AttentionWindow,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            q_proj: Linear::load(
                w,
                &format!("{prefix}.q_proj"),
                h,
                cfg.num_heads * d,
                cfg.qkv_bias,
            )?,
            k_proj: Linear::load(
                w,
                &format!("{prefix}.k_proj"),
                h,
                cfg.num_kv_heads * d,
                cfg.qkv_bias,
            )?,
            v_proj: Linear::load(
                w,
                &format!("{prefix}.v_proj"),
                h,
                cfg.num_kv_heads * d,
                cfg.qkv_bias,
            )?,
            o_proj: Linear::load(
                w,
                &format!("{prefix}.o_proj"),
                cfg.num_heads * d,
                h,
                cfg.o_bias,
            )?,
            num_heads: cfg.num_heads as i64,
            num_kv_heads: cfg.num_kv_heads as i64,
            head_dim: d as i64,
            window,
        })
    }

    /// `x` `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    fn forward(
        &self,
        x: &Tensor,
        rotary: &(Tensor, Tensor),
        masks: &Masks,
        cache: Option<&mut KvCache>,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, s) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor, n: i64| -> Result<Tensor> {
            Ok(t.f_view([b, s, n, self.head_dim])?.f_transpose(1, 2)?)
        };
        // [batch, heads, seq, head_dim]
        let q = heads(self.q_proj.forward(x)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let (cos, sin) = rotary;
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        // [batch, kv_heads, past + seq, head_dim]
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let mask = masks.get(self.window);
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.tensor.as_ref(),
            0.0,
            mask.is_causal,
            (self.head_dim as f64).powf(-0.5),
            self.num_kv_heads != self.num_heads,
        )?;
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([b, s, self.num_heads * self.head_dim])?;
        self.o_proj.forward(&out)
    }
}

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &dyn ParamSource, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), h, i, bias)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), h, i, bias)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), i, h, bias)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.f_silu()?;
        self.down_proj
            .forward(&gate.f_mul(&self.up_proj.forward(x)?)?)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(
        w: &dyn ParamSource,
        prefix: &str,
        cfg: &ModelConfig,
        window: AttentionWindow,
    ) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(w, &format!("{prefix}.input_layernorm"), h, eps)?,
            self_attn: Attention::load(w, &format!("{prefix}.self_attn"), cfg, window)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{prefix}.post_attention_layernorm"),
                h,
                eps,
            )?,
            mlp: Mlp::load(w, &format!("{prefix}.mlp"), cfg)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rotary: &(Tensor, Tensor),
        masks: &Masks,
        cache: Option<&mut KvCache>,
        layer: usize,
    ) -> Result<Tensor> {
        let attn = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            rotary,
            masks,
            cache,
            layer,
        )?;
        let x = x.f_add(&attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok(x.f_add(&mlp)?)
    }

    fn params(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        self.input_layernorm
            .params(&format!("{prefix}.input_layernorm"), out);
        let a = &self.self_attn;
        for (name, linear) in [
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
            ("o_proj", &a.o_proj),
        ] {
            linear.params(&format!("{prefix}.self_attn.{name}"), out);
        }
        self.post_attention_layernorm
            .params(&format!("{prefix}.post_attention_layernorm"), out);
        let m = &self.mlp;
        for (name, linear) in [
            ("gate_proj", &m.gate_proj),
            ("up_proj", &m.up_proj),
            ("down_proj", &m.down_proj),
        ] {
            linear.params(&format!("{prefix}.mlp.{name}"), out);
        }
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

/// An attention mask for one window kind: either a boolean tensor `[batch, 1, seq, keys]`
/// (true = attend) or none at all with or without libtorch's causal flag.
#[derive(Debug)]
struct Mask {
    tensor: Option<Tensor>,
    is_causal: bool,
}

#[derive(Debug)]
struct Masks {
    full: Mask,
    /// Per window size (a model has at most one).
    sliding: Option<(usize, Mask)>,
}

impl Masks {
    fn get(&self, window: AttentionWindow) -> &Mask {
        match (window, &self.sliding) {
            (AttentionWindow::Sliding(w), Some((sw, mask))) if *sw == w => mask,
            _ => &self.full,
        }
    }

    /// Builds the masks for `seq` new queries after `past` cached positions.
    fn new(
        key_mask: Option<&Tensor>,
        windows: &[AttentionWindow],
        past: i64,
        seq: i64,
        device: Device,
    ) -> Result<Self> {
        let sliding_window = windows.iter().find_map(|w| match w {
            AttentionWindow::Sliding(w) => Some(*w),
            AttentionWindow::Full => None,
        });
        let full = Self::build(key_mask, None, past, seq, device)?;
        let sliding = match sliding_window {
            Some(w) => Some((w, Self::build(key_mask, Some(w as i64), past, seq, device)?)),
            None => None,
        };
        Ok(Self { full, sliding })
    }

    fn build(
        key_mask: Option<&Tensor>,
        window: Option<i64>,
        past: i64,
        seq: i64,
        device: Device,
    ) -> Result<Mask> {
        let keys = past + seq;
        let window_matters = window.is_some_and(|w| keys > w);
        // No padding: libtorch's own causal masking (one query needs none). Several queries
        // after cached positions need the offset mask built below (libtorch's causal flag
        // aligns the diagonal to the top-left corner).
        if key_mask.is_none() && !window_matters && (seq == 1 || past == 0) {
            return Ok(Mask {
                tensor: None,
                is_causal: seq > 1,
            });
        }
        // Query i sits at cache position past + i; key j is visible when j <= past + i,
        // (window) past + i - j < w, and j holds a real token. A padding query also sees
        // itself, so that no row is entirely masked (that would give NaN, and NaN * 0 is NaN).
        let q_pos = Tensor::f_arange_start(past, keys, (Kind::Int64, device))?.f_unsqueeze(1)?;
        let k_pos = Tensor::f_arange(keys, (Kind::Int64, device))?.f_unsqueeze(0)?;
        let mut allowed = k_pos.f_le_tensor(&q_pos)?; // [seq, keys]
        if let Some(w) = window {
            allowed = allowed.f_logical_and(&q_pos.f_sub(&k_pos)?.f_lt(w)?)?;
        }
        let allowed = match key_mask {
            Some(m) => allowed
                .f_unsqueeze(0)?
                .f_logical_and(&m.f_unsqueeze(1)?)?
                .f_logical_or(&k_pos.f_eq_tensor(&q_pos)?.f_unsqueeze(0)?)?,
            None => allowed.f_unsqueeze(0)?,
        };
        Ok(Mask {
            tensor: Some(allowed.f_unsqueeze(1)?), // [batch | 1, 1, seq, keys]
            is_causal: false,
        })
    }
}

/// A causal language model hosted in libtorch.
#[derive(Debug)]
pub struct CausalLm {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`; the embedding matrix itself when embeddings are tied; `None` for a
    /// backbone loaded without its head (sequence-classification checkpoints have none).
    lm_head: Option<Tensor>,
    rope: Rope,
    device: Device,
    kind: Kind,
}

impl CausalLm {
    /// Loads the weights in `dir` for `config`, as `dtype` on `device`.
    pub fn load(dir: &Path, config: ModelConfig, device: Device, dtype: DType) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let w = Weights::open(dir, device, dtype.kind())?;
        Self::build(config, &w, device, dtype)
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
        let embed_tokens = w.get("model.embed_tokens.weight", &[v, h])?;
        let layers = config
            .windows
            .iter()
            .enumerate()
            .map(|(i, &window)| {
                DecoderLayer::load(w, &format!("model.layers.{i}"), &config, window)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(w, "model.norm", config.hidden_size, config.rms_norm_eps)?;
        // Tied embeddings: the checkpoint's lm_head (if any) is ignored, as transformers does.
        let lm_head = if !with_lm_head {
            None
        } else if config.tie_word_embeddings {
            Some(embed_tokens.shallow_clone())
        } else {
            Some(w.get("lm_head.weight", &[v, h])?)
        };
        let rope = Rope::new(&config.rope, config.head_dim, device)?;
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
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

    /// A cache sized for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.layers.len(), capacity)
    }

    /// Runs the decoder over the new tokens (appending their keys and values to `cache`) and
    /// returns the final hidden state after the last norm: `[batch, hidden]` for
    /// [`Positions::Last`], `[batch, seq, hidden]` for [`Positions::All`].
    pub fn forward_hidden(
        &self,
        input: &StepInput<'_>,
        cache: &mut KvCache,
        positions: Positions,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let seq = input.input_ids.size()[1];
        let masks = Masks::new(
            input.key_mask,
            &self.config.windows,
            cache.len() as i64,
            seq,
            self.device,
        )?;
        let rotary = self.rope.cos_sin(input.position_ids, self.kind)?;
        let mut x = Tensor::f_embedding(&self.embed_tokens, input.input_ids, -1, false, false)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rotary, &masks, Some(&mut *cache), i)?;
        }
        cache.advance(seq as usize);
        let x = match positions {
            // The norm acts per position, so selecting first saves work.
            Positions::Last => x.f_select(1, seq - 1)?,
            Positions::All => x,
        };
        self.norm.forward(&x)
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
        let rotary = self.rope.cos_sin(input.position_ids, self.kind)?;
        let mut x = Tensor::f_embedding(&self.embed_tokens, input.input_ids, -1, false, false)?;
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
        let rotary = self.rope.cos_sin(input.position_ids, self.kind)?;
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
        let rotary = self.rope.cos_sin(&positions, self.kind)?;
        let mut x = Tensor::f_embedding(&self.embed_tokens, input_ids, -1, false, false)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rotary, &masks, None, i)?;
        }
        self.logits(&self.norm.forward(&x)?)
    }

    /// Logits `[..., vocab]` (in the model's dtype) from final hidden states `[..., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().ok_or(Error::NoLmHead)?;
        Ok(hidden.f_linear(head, None::<&Tensor>)?)
    }

    /// Every parameter by its HF checkpoint name (`lm_head.weight` only when untied), sharing
    /// storage with the model.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_owned(),
            self.embed_tokens.shallow_clone(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            layer.params(&format!("model.layers.{i}"), &mut out);
        }
        self.norm.params("model.norm", &mut out);
        if let (Some(head), false) = (&self.lm_head, self.config.tie_word_embeddings) {
            out.push(("lm_head.weight".to_owned(), head.shallow_clone()));
        }
        out
    }
}
