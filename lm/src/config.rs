//! Model configuration: the serde mirror of Hugging Face `config.json` ([`HfConfig`]) and the
//! validated runtime form made from it once ([`ModelConfig`]).
//!
//! Every family is the same decoder with a few explicit options (norm kind, MLP kind,
//! attention extras, block layout, tensor names): [`ModelConfig`] holds them, and
//! [`ModelConfig::from_hf`] is the one place that says which family uses which.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The `model_type`s this crate implements.
pub const SUPPORTED_MODEL_TYPES: &str =
    "llama, mistral, qwen2, qwen3, mixtral, falcon, phi3, gemma2, gemma3_text";

/// A token id field that Hugging Face writes either as one id or as a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// `config.json` as transformers 4.x (Hub checkpoints) and 5.x write it, for the supported
/// architectures. Unknown keys are ignored; a key only some families have is optional.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    pub vocab_size: usize,
    #[serde(alias = "n_embed")]
    pub hidden_size: usize,
    /// Falcon: `ffn_hidden_size` (default 4 x hidden).
    pub intermediate_size: Option<usize>,
    pub ffn_hidden_size: Option<usize>,
    #[serde(alias = "n_layer")]
    pub num_hidden_layers: usize,
    #[serde(alias = "n_head")]
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    /// Falcon's LayerNorm epsilon.
    pub layer_norm_epsilon: Option<f64>,
    pub hidden_act: Option<String>,
    /// Gemma's name for `hidden_act`.
    pub hidden_activation: Option<String>,
    /// transformers 4.x: top-level theta plus an optional `rope_scaling` dict.
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Map<String, Value>>,
    /// transformers 5.x: theta and scaling together in one dict (Gemma 3: one dict per layer
    /// type).
    pub rope_parameters: Option<Map<String, Value>>,
    /// Gemma 3 (transformers 4.x): theta of the sliding-window layers.
    pub rope_local_base_freq: Option<f64>,
    /// Phi-3 LongRoPE: the pretraining length.
    pub original_max_position_embeddings: Option<usize>,
    pub partial_rotary_factor: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 (transformers 4.x): every n-th layer is global.
    pub sliding_window_pattern: Option<usize>,
    /// Gemma: attention scores are scaled by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Mixtral.
    pub num_local_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    /// Falcon.
    pub new_decoder_architecture: Option<bool>,
    pub multi_query: Option<bool>,
    pub parallel_attn: Option<bool>,
    pub num_ln_in_parallel_attn: Option<usize>,
    pub num_kv_heads: Option<usize>,
    pub bias: Option<bool>,
    pub alibi: Option<bool>,
    pub activation: Option<String>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<TokenIds>,
}

impl HfConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        // Check the model type first, so an unsupported architecture is named as such rather
        // than as a missing field of ours.
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_owned(),
            source,
        })?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if Architecture::from_model_type(model_type).is_none() {
            return Err(Error::UnsupportedModelType {
                path: path.to_owned(),
                found: model_type.to_owned(),
                supported: SUPPORTED_MODEL_TYPES,
            });
        }
        serde_path_to_error::deserialize(value).map_err(|e| Error::JsonField {
            path: path.to_owned(),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }
}

/// The decoder families implemented here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Mixtral,
    Falcon,
    Phi3,
    Gemma2,
    Gemma3,
}

impl Architecture {
    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "mixtral" => Some(Self::Mixtral),
            "falcon" => Some(Self::Falcon),
            "phi3" => Some(Self::Phi3),
            "gemma2" => Some(Self::Gemma2),
            "gemma3_text" => Some(Self::Gemma3),
            _ => None,
        }
    }

    /// `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Mixtral => "mixtral",
            Self::Falcon => "falcon",
            Self::Phi3 => "phi3",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3_text",
        }
    }

    /// The transformers class of a one-label reward model on this backbone.
    pub fn sequence_classification_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForSequenceClassification",
            Self::Mistral => "MistralForSequenceClassification",
            Self::Qwen2 => "Qwen2ForSequenceClassification",
            Self::Qwen3 => "Qwen3ForSequenceClassification",
            Self::Mixtral => "MixtralForSequenceClassification",
            Self::Falcon => "FalconForSequenceClassification",
            Self::Phi3 => "Phi3ForSequenceClassification",
            Self::Gemma2 => "Gemma2ForSequenceClassification",
            Self::Gemma3 => "Gemma3TextForSequenceClassification",
        }
    }
}

/// How rotary frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (inverse frequencies divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling of low, medium and high frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Phi-3's LongRoPE (`su`): per-frequency factors, the long ones for a forward pass whose
    /// positions reach past `original_max_position_embeddings`, and cos/sin scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Which key positions a layer's queries see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionWindow {
    Full,
    /// Keys at most `window - 1` cache positions behind the query.
    Sliding(usize),
}

/// The normalisation layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `w * x / rms(x)` (Llama).
    Rms,
    /// `(1 + w) * x / rms(x)`, all in float32 (Gemma).
    RmsOnePlus,
    /// LayerNorm with a bias (Falcon).
    LayerNorm,
}

/// The activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// GELU's tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Self::GeluTanh),
            _ => None,
        }
    }
}

/// The feed-forward part of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// `down(act(gate(x)) * up(x))` with separate `gate_proj` and `up_proj`.
    Gated,
    /// The same with one fused `gate_up_proj` (Phi-3).
    GatedFused,
    /// `dense_4h_to_h(act(dense_h_to_4h(x)))` (Falcon).
    Plain,
    /// Sparse mixture of experts (Mixtral): each token goes to its `top_k` experts by router
    /// probability, their outputs weighted by those probabilities renormalised to sum to 1.
    Moe { num_experts: usize, top_k: usize },
}

/// How the q, k and v projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// `q_proj`, `k_proj`, `v_proj`.
    Separate,
    /// One projection whose output is all queries, then all keys, then all values (Phi-3's
    /// `qkv_proj`; Falcon-7B's multi-query `query_key_value`).
    Fused,
    /// Falcon's new decoder architecture: per kv group, its queries then one key and one value.
    FusedGrouped,
    /// Falcon without multi-query: per head, its query, key and value.
    FusedPerHead,
}

/// How the attention and MLP of a block are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `x + attn(norm(x))`, then `+ mlp(norm(.))` (Llama; `input_layernorm`,
    /// `post_attention_layernorm`).
    Sequential,
    /// Gemma 2/3: each branch normalised before and after (`input_layernorm`,
    /// `post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm`).
    Sandwich,
    /// Falcon: `x + (mlp(norm(x)) + attn(norm(x)))` with one shared norm (`input_layernorm`)
    /// or two (`ln_attn`, `ln_mlp`).
    Parallel { two_norms: bool },
}

/// The validated runtime configuration of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: Option<usize>,
    /// The epsilon of every norm (Falcon's `layer_norm_epsilon`).
    pub rms_norm_eps: f64,
    /// The rotary settings of full-attention layers (of every layer without `local_rope`).
    pub rope: RopeConfig,
    /// Gemma 3: the rotary settings of sliding-window layers.
    pub local_rope: Option<RopeConfig>,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// One entry per layer.
    pub windows: Vec<AttentionWindow>,
    pub norm: NormKind,
    pub activation: Activation,
    pub mlp: MlpKind,
    pub qkv: QkvLayout,
    pub block: BlockKind,
    /// Per-head norms of queries and keys before the rotation (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// The factor of the attention scores (`head_dim^-0.5`; Gemma: `query_pre_attn_scalar^-0.5`).
    pub attention_scale: f64,
    /// `cap * tanh(score / cap)` on attention scores (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `cap * tanh(logit / cap)` on the logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Embeddings multiplied by this (Gemma: `sqrt(hidden_size)`).
    pub embed_scale: Option<f64>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
}

impl ModelConfig {
    /// Reads `config.json` and validates it.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_hf(&HfConfig::from_file(path)?, path)
    }

    /// Validates a parsed config; `path` names the file in errors.
    pub fn from_hf(hf: &HfConfig, path: &Path) -> Result<Self> {
        let invalid = |message: String| Error::InvalidConfig {
            path: path.to_owned(),
            message,
        };
        let arch = Architecture::from_model_type(&hf.model_type).ok_or_else(|| {
            Error::UnsupportedModelType {
                path: path.to_owned(),
                found: hf.model_type.clone(),
                supported: SUPPORTED_MODEL_TYPES,
            }
        })?;
        use Architecture as A;
        let gemma = matches!(arch, A::Gemma2 | A::Gemma3);
        let falcon = arch == A::Falcon;
        if falcon && hf.alibi.unwrap_or(false) {
            return Err(invalid(
                "Falcon with ALiBi positions (alibi: true) is not supported; only rotary Falcon models are"
                    .to_owned(),
            ));
        }
        let new_decoder = falcon && hf.new_decoder_architecture.unwrap_or(false);
        let parallel_attn = hf.parallel_attn.unwrap_or(true);
        if new_decoder && !parallel_attn {
            return Err(invalid(
                "Falcon's new decoder architecture needs parallel_attn: true".to_owned(),
            ));
        }
        let activation = match (&hf.hidden_activation, &hf.hidden_act, &hf.activation) {
            (Some(a), _, _) if gemma => a.as_str(),
            (_, Some(a), _) if !falcon => a.as_str(),
            (_, _, Some(a)) if falcon => a.as_str(),
            _ if falcon => "gelu",
            _ if gemma => "gelu_pytorch_tanh",
            _ => "silu",
        };
        let activation = Activation::parse(activation).ok_or_else(|| {
            invalid(format!(
                "activation {activation:?} is not supported (supported: silu, gelu, gelu_pytorch_tanh, gelu_new)"
            ))
        })?;
        let intermediate_size = match (falcon, hf.ffn_hidden_size, hf.intermediate_size) {
            (true, Some(n), _) => n,
            (true, None, _) => 4 * hf.hidden_size,
            (false, _, Some(n)) => n,
            (false, _, None) => return Err(invalid("intermediate_size is missing".to_owned())),
        };
        for (name, value) in [
            ("vocab_size", hf.vocab_size),
            ("hidden_size", hf.hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", hf.num_hidden_layers),
            ("num_attention_heads", hf.num_attention_heads),
        ] {
            if value == 0 {
                return Err(invalid(format!("{name} must be positive")));
            }
        }
        let num_heads = hf.num_attention_heads;
        let num_kv_heads = match arch {
            A::Falcon if new_decoder => hf.num_kv_heads.unwrap_or(num_heads),
            A::Falcon if hf.multi_query.unwrap_or(true) => 1,
            A::Falcon => num_heads,
            _ => hf.num_key_value_heads.unwrap_or(num_heads),
        };
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(invalid(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = match hf.head_dim {
            Some(d) if !falcon => d,
            _ if hf.hidden_size.is_multiple_of(num_heads) => hf.hidden_size / num_heads,
            _ => {
                return Err(invalid(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {num_heads} and no head_dim is given",
                    hf.hidden_size
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            )));
        }
        let nested_partial = hf
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(Value::as_f64);
        for f in [hf.partial_rotary_factor, nested_partial]
            .into_iter()
            .flatten()
        {
            if f != 1.0 {
                return Err(invalid(format!(
                    "partial_rotary_factor {f} is not supported (only 1.0)"
                )));
            }
        }
        let eps = match (falcon, hf.layer_norm_epsilon, hf.rms_norm_eps) {
            (true, Some(e), _) => e,
            (true, None, _) => 1e-5,
            (false, _, Some(e)) => e,
            (false, _, None) => return Err(invalid("rms_norm_eps is missing".to_owned())),
        };
        let (rope, local_rope) = rope_configs(hf, arch, head_dim).map_err(invalid)?;
        let windows = attention_windows(hf, arch).map_err(invalid)?;
        let mlp = match arch {
            A::Mixtral => {
                let num_experts = hf.num_local_experts.unwrap_or(8);
                let top_k = hf.num_experts_per_tok.unwrap_or(2);
                if top_k == 0 || top_k > num_experts {
                    return Err(invalid(format!(
                        "num_experts_per_tok {top_k} must be between 1 and num_local_experts {num_experts}"
                    )));
                }
                MlpKind::Moe { num_experts, top_k }
            }
            A::Phi3 => MlpKind::GatedFused,
            A::Falcon => MlpKind::Plain,
            _ => MlpKind::Gated,
        };
        let qkv = match arch {
            A::Phi3 => QkvLayout::Fused,
            A::Falcon if new_decoder => QkvLayout::FusedGrouped,
            A::Falcon if num_kv_heads == 1 => QkvLayout::Fused,
            A::Falcon => QkvLayout::FusedPerHead,
            _ => QkvLayout::Separate,
        };
        let block = match arch {
            A::Falcon if new_decoder => BlockKind::Parallel {
                two_norms: hf.num_ln_in_parallel_attn.unwrap_or(2) == 2,
            },
            A::Falcon if parallel_attn => BlockKind::Parallel { two_norms: false },
            A::Gemma2 | A::Gemma3 => BlockKind::Sandwich,
            _ => BlockKind::Sequential,
        };
        let attention_scale = match (gemma, hf.query_pre_attn_scalar) {
            (true, Some(s)) if s > 0.0 => s.powf(-0.5),
            (true, _) => return Err(invalid("query_pre_attn_scalar must be positive".to_owned())),
            (false, _) => (head_dim as f64).powf(-0.5),
        };
        let softcap = |name: &str, cap: Option<f64>| match cap {
            Some(c) if c <= 0.0 => Err(invalid(format!("{name} must be positive, got {c}"))),
            _ => Ok(cap.filter(|_| gemma)),
        };
        let attention_bias = hf.attention_bias.unwrap_or(false);
        let falcon_bias = falcon && hf.bias.unwrap_or(false);
        let first = |ids: &Option<TokenIds>| ids.as_ref().and_then(|t| t.to_vec().first().copied());
        Ok(Self {
            architecture: arch,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: hf.max_position_embeddings,
            rms_norm_eps: eps,
            rope,
            local_rope,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(falcon || gemma),
            qkv_bias: match arch {
                A::Qwen2 => true,
                A::Falcon => falcon_bias,
                A::Phi3 => false,
                _ => attention_bias,
            },
            o_bias: match arch {
                A::Llama | A::Qwen3 | A::Gemma2 | A::Gemma3 => attention_bias,
                A::Falcon => falcon_bias,
                _ => false,
            },
            mlp_bias: match arch {
                A::Llama => hf.mlp_bias.unwrap_or(false),
                A::Falcon => falcon_bias,
                _ => false,
            },
            windows,
            norm: match arch {
                A::Falcon => NormKind::LayerNorm,
                A::Gemma2 | A::Gemma3 => NormKind::RmsOnePlus,
                _ => NormKind::Rms,
            },
            activation,
            mlp,
            qkv,
            block,
            qk_norm: matches!(arch, A::Qwen3 | A::Gemma3),
            attention_scale,
            attn_softcap: softcap("attn_logit_softcapping", hf.attn_logit_softcapping)?,
            final_softcap: softcap("final_logit_softcapping", hf.final_logit_softcapping)?,
            embed_scale: gemma.then(|| (hf.hidden_size as f64).sqrt()),
            bos_token_id: first(&hf.bos_token_id),
            eos_token_ids: hf
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
            pad_token_id: first(&hf.pad_token_id),
        })
    }
}

/// The rotary settings of full-attention layers and, for Gemma 3, of sliding-window layers.
fn rope_configs(
    hf: &HfConfig,
    arch: Architecture,
    head_dim: usize,
) -> std::result::Result<(RopeConfig, Option<RopeConfig>), String> {
    if arch != Architecture::Gemma3 {
        return Ok((rope_config(hf, head_dim)?, None));
    }
    // transformers 5: one dict per layer type; 4.x: `rope_theta` (+ `rope_scaling`) for the
    // global layers and `rope_local_base_freq` for the local ones.
    let nested = |kind: &str| {
        hf.rope_parameters
            .as_ref()
            .and_then(|p| p.get(kind))
            .and_then(Value::as_object)
    };
    match (nested("full_attention"), nested("sliding_attention")) {
        (Some(full), Some(local)) => Ok((
            rope_from(full, None, 1_000_000.0, hf, head_dim)?,
            Some(rope_from(local, None, 10_000.0, hf, head_dim)?),
        )),
        _ => {
            let empty = Map::new();
            let full = rope_from(
                hf.rope_scaling.as_ref().unwrap_or(&empty),
                hf.rope_theta,
                1_000_000.0,
                hf,
                head_dim,
            )?;
            let local = RopeConfig {
                theta: hf.rope_local_base_freq.unwrap_or(10_000.0),
                scaling: RopeScaling::None,
            };
            Ok((full, Some(local)))
        }
    }
}

/// Reads rope settings from either layout: transformers 5 `rope_parameters`, or transformers 4
/// top-level `rope_theta` plus `rope_scaling`.
fn rope_config(hf: &HfConfig, head_dim: usize) -> std::result::Result<RopeConfig, String> {
    let empty = Map::new();
    match &hf.rope_parameters {
        Some(p) => rope_from(p, hf.rope_theta, 10_000.0, hf, head_dim),
        None => rope_from(
            hf.rope_scaling.as_ref().unwrap_or(&empty),
            hf.rope_theta,
            10_000.0,
            hf,
            head_dim,
        ),
    }
}

/// One rope dict (`rope_parameters` or `rope_scaling`): its `rope_theta`, else `theta`, else
/// `default_theta`, and its scaling.
fn rope_from(
    params: &Map<String, Value>,
    theta: Option<f64>,
    default_theta: f64,
    hf: &HfConfig,
    head_dim: usize,
) -> std::result::Result<RopeConfig, String> {
    let theta = params
        .get("rope_theta")
        .and_then(Value::as_f64)
        .or(theta)
        .unwrap_or(default_theta);
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> std::result::Result<f64, String> {
        params
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope type {kind:?} needs a numeric {key:?}"))
    };
    let factors = |key: &str| -> std::result::Result<Vec<f64>, String> {
        let list = params
            .get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .ok_or_else(|| format!("rope type {kind:?} needs a list of numbers {key:?}"))?;
        if list.len() != head_dim / 2 {
            return Err(format!(
                "rope {key} has {} entries; head_dim {head_dim} needs {}",
                list.len(),
                head_dim / 2
            ));
        }
        Ok(list)
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        "longrope" | "su" => {
            // The top-level value first: transformers copies it over the dict's (Phi-3 keeps
            // it outside the rope dict; `standardize_rope_params`).
            let original = hf
                .original_max_position_embeddings
                .or_else(|| {
                    params
                        .get("original_max_position_embeddings")
                        .and_then(Value::as_u64)
                        .map(|n| n as usize)
                })
                .filter(|&n| n > 1)
                .ok_or_else(|| {
                    format!("rope type {kind:?} needs original_max_position_embeddings above 1")
                })?;
            let factor = match params.get("factor").and_then(Value::as_f64) {
                Some(f) => f,
                None => hf.max_position_embeddings.ok_or_else(|| {
                    format!("rope type {kind:?} needs a factor or max_position_embeddings")
                })? as f64
                    / original as f64,
            };
            // transformers' `_compute_longrope_parameters`.
            let attention_factor = match params.get("attention_factor").and_then(Value::as_f64) {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err(format!(
                "rope type {other:?} is not supported (supported: default, linear, llama3, longrope/su)"
            ))
        }
    };
    if let RopeScaling::Llama3 {
        low_freq_factor,
        high_freq_factor,
        ..
    } = scaling
    {
        if high_freq_factor <= low_freq_factor {
            return Err(format!(
                "llama3 rope scaling needs high_freq_factor > low_freq_factor, got {high_freq_factor} and {low_freq_factor}"
            ));
        }
    }
    Ok(RopeConfig { theta, scaling })
}

/// The attention window of each layer, as transformers applies it.
fn attention_windows(
    hf: &HfConfig,
    arch: Architecture,
) -> std::result::Result<Vec<AttentionWindow>, String> {
    let n = hf.num_hidden_layers;
    let sliding = |w: Option<usize>| -> std::result::Result<AttentionWindow, String> {
        match w {
            Some(w) if w > 0 => Ok(AttentionWindow::Sliding(w)),
            _ => Err("a sliding-attention layer needs a positive sliding_window".to_owned()),
        }
    };
    if let Some(types) = &hf.layer_types {
        if types.len() != n {
            return Err(format!(
                "layer_types has {} entries for {n} layers",
                types.len()
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(AttentionWindow::Full),
                "sliding_attention" => sliding(hf.sliding_window),
                other => Err(format!("layer type {other:?} is not supported")),
            })
            .collect();
    }
    // Every `p`-th layer global, the others sliding (Gemma; a pattern longer than the model
    // makes every layer sliding, as in transformers).
    let pattern = |p: usize| -> std::result::Result<Vec<AttentionWindow>, String> {
        if p == 0 {
            return Err(format!(
                "sliding_window_pattern 0 does not fit {n} layers (every p-th layer is global; p must be at least 1)"
            ));
        }
        (0..n)
            .map(|i| {
                if (i + 1) % p == 0 {
                    Ok(AttentionWindow::Full)
                } else {
                    sliding(hf.sliding_window)
                }
            })
            .collect()
    };
    match arch {
        Architecture::Llama | Architecture::Falcon => Ok(vec![AttentionWindow::Full; n]),
        Architecture::Mistral | Architecture::Mixtral | Architecture::Phi3 => {
            match hf.sliding_window {
                Some(_) => Ok(vec![sliding(hf.sliding_window)?; n]),
                None => Ok(vec![AttentionWindow::Full; n]),
            }
        }
        Architecture::Qwen2 | Architecture::Qwen3 => {
            if hf.use_sliding_window.unwrap_or(false) {
                let from = hf.max_window_layers.unwrap_or(n);
                (0..n)
                    .map(|i| {
                        if i >= from {
                            sliding(hf.sliding_window)
                        } else {
                            Ok(AttentionWindow::Full)
                        }
                    })
                    .collect()
            } else {
                Ok(vec![AttentionWindow::Full; n])
            }
        }
        Architecture::Gemma2 => pattern(2),
        Architecture::Gemma3 => pattern(hf.sliding_window_pattern.unwrap_or(6)),
    }
}

/// Reads a JSON file into a serde type, naming the file on error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: PathBuf::from(path),
        source,
    })?;
    // Well-formed JSON of the wrong shape: name the field.
    serde_path_to_error::deserialize(value).map_err(|e| Error::JsonField {
        path: PathBuf::from(path),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "rms_norm_eps": 1e-5
        })
    }

    fn parse(v: Value) -> Result<ModelConfig> {
        let hf: HfConfig = serde_json::from_value(v).expect("test config parses");
        ModelConfig::from_hf(&hf, Path::new("config.json"))
    }

    #[test]
    fn both_rope_layouts_give_the_same_config() -> Result<()> {
        let mut v4 = base();
        v4["rope_theta"] = 500000.0.into();
        v4["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = base();
        v5["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let (a, b) = (parse(v4)?, parse(v5)?);
        assert_eq!(a.rope, b.rope);
        assert_eq!(a.rope.theta, 500000.0);
        assert!(matches!(a.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        Ok(())
    }

    #[test]
    fn unknown_rope_type_is_named() {
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        let err = parse(v).expect_err("yarn is not supported").to_string();
        assert!(err.contains("\"yarn\"") && err.contains("llama3"), "{err}");
    }

    #[test]
    fn heads_must_divide() {
        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        let err = parse(v).expect_err("2 heads, 3 kv heads").to_string();
        assert!(err.contains("num_key_value_heads 3"), "{err}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_mistral_slides() -> Result<()> {
        let mut q = base();
        q["model_type"] = "qwen2".into();
        let q = parse(q)?;
        assert!(q.qkv_bias && !q.o_bias);
        let mut m = base();
        m["model_type"] = "mistral".into();
        m["sliding_window"] = 4.into();
        assert_eq!(parse(m)?.windows, vec![AttentionWindow::Sliding(4); 2]);
        Ok(())
    }

    #[test]
    fn eos_list_and_single() -> Result<()> {
        let mut v = base();
        v["eos_token_id"] = serde_json::json!([2, 7]);
        assert_eq!(parse(v)?.eos_token_ids, vec![2, 7]);
        let mut v = base();
        v["eos_token_id"] = 2.into();
        assert_eq!(parse(v)?.eos_token_ids, vec![2]);
        Ok(())
    }

    #[test]
    fn falcon_7b_is_multi_query_and_parallel() -> Result<()> {
        let v = serde_json::json!({
            "model_type": "falcon", "vocab_size": 10, "hidden_size": 8, "n_layer": 2,
            "n_head": 2, "multi_query": true, "parallel_attn": true, "bias": false
        });
        let c = parse(v)?;
        assert_eq!(
            (c.num_kv_heads, c.head_dim, c.intermediate_size),
            (1, 4, 32)
        );
        assert_eq!(c.qkv, QkvLayout::Fused);
        assert_eq!(c.block, BlockKind::Parallel { two_norms: false });
        assert_eq!(
            (c.norm, c.activation, c.mlp),
            (NormKind::LayerNorm, Activation::Gelu, MlpKind::Plain)
        );
        assert!(c.tie_word_embeddings && !c.qkv_bias);
        Ok(())
    }

    #[test]
    fn falcon_new_decoder_groups_kv_heads_and_has_two_norms() -> Result<()> {
        let v = serde_json::json!({
            "model_type": "falcon", "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_kv_heads": 2, "new_decoder_architecture": true,
            "bias": true, "ffn_hidden_size": 24
        });
        let c = parse(v)?;
        assert_eq!((c.num_kv_heads, c.qkv), (2, QkvLayout::FusedGrouped));
        assert_eq!(c.block, BlockKind::Parallel { two_norms: true });
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias);
        assert_eq!(c.intermediate_size, 24);
        Ok(())
    }

    #[test]
    fn alibi_falcon_is_refused() {
        let v = serde_json::json!({
            "model_type": "falcon", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "alibi": true
        });
        let err = parse(v).expect_err("alibi").to_string();
        assert!(
            err.contains("ALiBi") && err.contains("alibi: true"),
            "{err}"
        );
    }

    #[test]
    fn mixtral_routes_to_at_most_its_experts() -> Result<()> {
        let mut v = base();
        v["model_type"] = "mixtral".into();
        v["num_local_experts"] = 4.into();
        v["num_experts_per_tok"] = 2.into();
        assert_eq!(
            parse(v.clone())?.mlp,
            MlpKind::Moe {
                num_experts: 4,
                top_k: 2
            }
        );
        v["num_experts_per_tok"] = 5.into();
        let err = parse(v).expect_err("5 of 4 experts").to_string();
        assert!(
            err.contains("num_experts_per_tok 5") && err.contains("num_local_experts 4"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn gemma3_patterns_and_local_rope() -> Result<()> {
        let mut v = base();
        v["model_type"] = "gemma3_text".into();
        v["num_hidden_layers"] = 4.into();
        v["query_pre_attn_scalar"] = 16.into();
        v["sliding_window"] = 3.into();
        v["sliding_window_pattern"] = 2.into();
        v["rope_theta"] = 1000.0.into();
        v["rope_local_base_freq"] = 10.0.into();
        let c = parse(v.clone())?;
        let s = AttentionWindow::Sliding(3);
        assert_eq!(
            c.windows,
            vec![s, AttentionWindow::Full, s, AttentionWindow::Full]
        );
        assert_eq!(c.rope.theta, 1000.0);
        assert_eq!(c.local_rope.as_ref().map(|r| r.theta), Some(10.0));
        assert_eq!(
            (c.norm, c.block, c.qk_norm),
            (NormKind::RmsOnePlus, BlockKind::Sandwich, true)
        );
        assert_eq!(c.attention_scale, 0.25);
        assert_eq!(c.embed_scale, Some(8f64.sqrt()));
        v["sliding_window_pattern"] = 0.into();
        let err = parse(v.clone()).expect_err("pattern 0").to_string();
        assert!(
            err.contains("sliding_window_pattern 0 does not fit 4 layers"),
            "{err}"
        );
        v["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"]);
        let err = parse(v).expect_err("2 types, 4 layers").to_string();
        assert!(
            err.contains("layer_types has 2 entries for 4 layers"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn phi3_longrope_factors_and_attention_factor() -> Result<()> {
        let mut v = base();
        v["model_type"] = "phi3".into();
        v["max_position_embeddings"] = 256.into();
        v["original_max_position_embeddings"] = 16.into();
        v["rope_scaling"] = serde_json::json!({"type": "su", "short_factor": [1.0, 1.5],
            "long_factor": [2.0, 3.0]});
        let c = parse(v.clone())?;
        let RopeScaling::LongRope {
            attention_factor,
            original_max_position_embeddings,
            ..
        } = &c.rope.scaling
        else {
            panic!("longrope expected: {:?}", c.rope.scaling);
        };
        assert_eq!(*original_max_position_embeddings, 16);
        let want = (1.0 + 16f64.ln() / 16f64.ln()).sqrt();
        assert!((attention_factor - want).abs() < 1e-12);
        assert_eq!((c.qkv, c.mlp), (QkvLayout::Fused, MlpKind::GatedFused));
        // The top-level pretraining length wins over the rope dict's, as in transformers.
        let mut both = v.clone();
        both["rope_scaling"]["original_max_position_embeddings"] = 32.into();
        let RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } = parse(both.clone())?.rope.scaling
        else {
            panic!("longrope expected");
        };
        assert_eq!(original_max_position_embeddings, 16);
        // Only in the dict: taken from there (transformers' Phi3Config would take its default,
        // 4096, which no checkpoint it writes relies on: it always writes the top-level one).
        if let Some(fields) = both.as_object_mut() {
            fields.remove("original_max_position_embeddings");
        }
        let RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } = parse(both)?.rope.scaling
        else {
            panic!("longrope expected");
        };
        assert_eq!(original_max_position_embeddings, 32);
        v["rope_scaling"]["long_factor"] = serde_json::json!([2.0]);
        let err = parse(v).expect_err("short list").to_string();
        assert!(
            err.contains("long_factor has 1 entries; head_dim 4 needs 2"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn qwen3_has_qk_norms_and_explicit_head_dim() -> Result<()> {
        let mut v = base();
        v["model_type"] = "qwen3".into();
        v["head_dim"] = 16.into();
        let c = parse(v)?;
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!((c.head_dim, c.attention_scale), (16, 0.25));
        Ok(())
    }
}
