//! Model configuration: the serde mirror of Hugging Face `config.json` ([`HfConfig`]) and the
//! validated runtime form made from it once ([`ModelConfig`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The `model_type`s this crate implements.
pub const SUPPORTED_MODEL_TYPES: &str = "llama, mistral, qwen2";

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
/// architectures. Unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: f64,
    pub hidden_act: Option<String>,
    /// transformers 4.x: top-level theta plus an optional `rope_scaling` dict.
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Map<String, Value>>,
    /// transformers 5.x: theta and scaling together in one dict.
    pub rope_parameters: Option<Map<String, Value>>,
    pub partial_rotary_factor: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    pub layer_types: Option<Vec<String>>,
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
        serde_json::from_value(value).map_err(|source| Error::Json {
            path: path.to_owned(),
            source,
        })
    }
}

/// The decoder families implemented here. They share one block structure and differ in biases
/// and attention windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
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
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// One entry per layer.
    pub windows: Vec<AttentionWindow>,
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
        let architecture = Architecture::from_model_type(&hf.model_type).ok_or_else(|| {
            Error::UnsupportedModelType {
                path: path.to_owned(),
                found: hf.model_type.clone(),
                supported: SUPPORTED_MODEL_TYPES,
            }
        })?;
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(invalid(format!(
                    "hidden_act {act:?} is not supported (only \"silu\")"
                )));
            }
        }
        for (name, value) in [
            ("vocab_size", hf.vocab_size),
            ("hidden_size", hf.hidden_size),
            ("intermediate_size", hf.intermediate_size),
            ("num_hidden_layers", hf.num_hidden_layers),
            ("num_attention_heads", hf.num_attention_heads),
        ] {
            if value == 0 {
                return Err(invalid(format!("{name} must be positive")));
            }
        }
        let num_heads = hf.num_attention_heads;
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(invalid(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None if hf.hidden_size.is_multiple_of(num_heads) => hf.hidden_size / num_heads,
            None => {
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
        if let Some(f) = hf.partial_rotary_factor {
            if f != 1.0 {
                return Err(invalid(format!(
                    "partial_rotary_factor {f} is not supported (only 1.0)"
                )));
            }
        }
        let rope = rope_config(hf).map_err(invalid)?;
        let windows = attention_windows(hf, architecture).map_err(invalid)?;
        let first = |ids: &Option<TokenIds>| ids.as_ref().and_then(|t| t.to_vec().first().copied());
        Ok(Self {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: hf.max_position_embeddings,
            rms_norm_eps: hf.rms_norm_eps,
            rope,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias: match architecture {
                Architecture::Qwen2 => true,
                _ => hf.attention_bias.unwrap_or(false),
            },
            o_bias: match architecture {
                Architecture::Llama => hf.attention_bias.unwrap_or(false),
                _ => false,
            },
            mlp_bias: architecture == Architecture::Llama && hf.mlp_bias.unwrap_or(false),
            windows,
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

/// Reads rope settings from either layout: transformers 5 `rope_parameters`, or transformers 4
/// top-level `rope_theta` plus `rope_scaling`.
fn rope_config(hf: &HfConfig) -> std::result::Result<RopeConfig, String> {
    let empty = Map::new();
    let (params, theta) = match &hf.rope_parameters {
        Some(p) => (
            p,
            p.get("rope_theta")
                .and_then(Value::as_f64)
                .or(hf.rope_theta),
        ),
        None => (hf.rope_scaling.as_ref().unwrap_or(&empty), hf.rope_theta),
    };
    let theta = theta.unwrap_or(10_000.0);
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
        other => {
            return Err(format!(
                "rope type {other:?} is not supported (supported: default, linear, llama3)"
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
    architecture: Architecture,
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
    match architecture {
        Architecture::Llama => Ok(vec![AttentionWindow::Full; n]),
        Architecture::Mistral => match hf.sliding_window {
            Some(_) => Ok(vec![sliding(hf.sliding_window)?; n]),
            None => Ok(vec![AttentionWindow::Full; n]),
        },
        Architecture::Qwen2 => {
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
    }
}

/// Reads a JSON file into a serde type, naming the file on error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: PathBuf::from(path),
        source,
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
}
