//! The model a GGUF file describes, read from its metadata as HF transformers' GGUF loader
//! reads it (`gguf_config_mapping` / `modeling_gguf_pytorch_utils`), and the `config.json`
//! written for it.
//!
//! | GGUF key (`{arch}.` prefix)          | `config.json`               |
//! |--------------------------------------|-----------------------------|
//! | `context_length`                     | `max_position_embeddings`   |
//! | `block_count`                        | `num_hidden_layers`         |
//! | `feed_forward_length`                | `intermediate_size`         |
//! | `embedding_length`                   | `hidden_size`               |
//! | `rope.dimension_count` (llama only)  | `head_dim`                  |
//! | `rope.freq_base`                     | `rope_theta`                |
//! | `attention.head_count`               | `num_attention_heads`       |
//! | `attention.head_count_kv`            | `num_key_value_heads`       |
//! | `attention.layer_norm_rms_epsilon`   | `rms_norm_eps`              |
//! | `vocab_size`, else the token count   | `vocab_size`                |
//! | `tokenizer.ggml.{bos,eos,unknown,padding}_token_id` | `{bos,eos,unk,pad}_token_id` |
//!
//! `tie_word_embeddings` is true when the file has no `output.weight`. Beyond transformers,
//! `rope.scaling.type = linear` becomes `rope_scaling` (transformers drops it), and any other
//! rope scaling is refused rather than silently dropped.

use serde_json::{json, Map, Value};

use crate::header::TensorInfo;
use crate::metadata::Metadata;
use crate::{Error, Result};

/// The architectures an import handles, as named in errors.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, mistral (written as llama), qwen2";

/// The decoder family of a GGUF model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    /// llama.cpp writes Mistral models as `llama`; transformers makes `model_type: mistral` of
    /// the ones whose `general.name` is exactly `mistral`.
    Mistral,
    Qwen2,
}

impl Architecture {
    /// The architecture of a file from `general.architecture` (and `general.name`).
    pub fn detect(metadata: &Metadata) -> Result<Self> {
        let arch = metadata.architecture()?;
        match arch {
            // transformers: `"llama" in architecture and "mistral" in model_name`, where
            // `model_name` is the list of `general.name`'s values: an exact match.
            "llama" if metadata.get_str("general.name")? == Some("mistral") => Ok(Self::Mistral),
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(Error::UnsupportedArchitecture {
                architecture: other.to_owned(),
                supported: SUPPORTED_ARCHITECTURES.to_owned(),
            }),
        }
    }

    /// `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    /// The transformers class, for `architectures` in `config.json`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// The prefix of the model's metadata keys (`general.architecture`).
    pub fn key_prefix(self) -> &'static str {
        match self {
            Self::Llama | Self::Mistral => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    /// Whether llama.cpp permuted the rows of Q and K (its llama family does).
    pub fn permutes_qk(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral)
    }

    /// Whether the q, k and v projections have biases.
    pub fn qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }
}

/// The model a GGUF file describes, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub max_position_embeddings: Option<u64>,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    /// The factor of linear rope scaling, if the file asks for it.
    pub rope_linear_factor: Option<f32>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// transformers' `rope_theta` default for these architectures.
const DEFAULT_ROPE_THETA: f32 = 10_000.0;

impl ModelConfig {
    /// Reads the model's configuration from a file's metadata and tensor names.
    pub fn from_gguf(metadata: &Metadata, tensors: &[TensorInfo]) -> Result<Self> {
        let architecture = Architecture::detect(metadata)?;
        let prefix = architecture.key_prefix();
        let key = |name: &str| format!("{prefix}.{name}");
        let require = |name: &str| -> Result<u64> {
            let k = key(name);
            match metadata.require_u64(&k)? {
                0 => Err(invalid(&k, "must not be 0")),
                v => Ok(v),
            }
        };
        // llama.cpp writes Mixtral as `llama` with experts; the importer maps dense layers only.
        if let Some(experts @ 1..) = metadata.get_u64(&key("expert_count"))? {
            return Err(Error::UnsupportedArchitecture {
                architecture: format!(
                    "{} with {experts} experts (a mixture of experts such as Mixtral; load its Hugging Face directory instead)",
                    metadata.architecture()?
                ),
                supported: SUPPORTED_ARCHITECTURES.to_owned(),
            });
        }
        let hidden_size = require("embedding_length")?;
        let num_heads = require("attention.head_count")?;
        let num_kv_heads = match metadata.get_u64(&key("attention.head_count_kv"))? {
            None => num_heads,
            Some(0) => return Err(invalid(&key("attention.head_count_kv"), "must not be 0")),
            Some(n) => n,
        };
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(invalid(
                &key("attention.head_count_kv"),
                &format!("{num_kv_heads} does not divide the {num_heads} attention heads"),
            ));
        }
        let head_dim = head_dim(metadata, architecture, hidden_size, num_heads)?;
        let rms_norm_eps = metadata
            .get_f32(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| Error::MissingKey {
                key: key("attention.layer_norm_rms_epsilon"),
            })?;
        let token_id = |name: &str| metadata.get_u32(&format!("tokenizer.ggml.{name}"));
        Ok(Self {
            architecture,
            vocab_size: vocab_size(metadata, &key("vocab_size"))?,
            hidden_size,
            intermediate_size: require("feed_forward_length")?,
            num_layers: require("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: metadata.get_u64(&key("context_length"))?,
            rms_norm_eps,
            rope_theta: metadata
                .get_f32(&key("rope.freq_base"))?
                .unwrap_or(DEFAULT_ROPE_THETA),
            rope_linear_factor: rope_scaling(metadata, prefix)?,
            tie_word_embeddings: !tensors.iter().any(|t| t.name == "output.weight"),
            bos_token_id: token_id("bos_token_id")?,
            eos_token_id: token_id("eos_token_id")?,
            unk_token_id: token_id("unknown_token_id")?,
            pad_token_id: token_id("padding_token_id")?,
        })
    }

    /// `config.json` for transformers and recontrol, with weights stored as `torch_dtype`
    /// (`float32`, ...).
    pub fn hf_config(&self, torch_dtype: &str) -> Value {
        let arch = self.architecture;
        let mut c = Map::new();
        c.insert("architectures".into(), json!([arch.hf_class()]));
        c.insert("model_type".into(), json!(arch.model_type()));
        c.insert("vocab_size".into(), json!(self.vocab_size));
        c.insert("hidden_size".into(), json!(self.hidden_size));
        c.insert("intermediate_size".into(), json!(self.intermediate_size));
        c.insert("num_hidden_layers".into(), json!(self.num_layers));
        c.insert("num_attention_heads".into(), json!(self.num_heads));
        c.insert("num_key_value_heads".into(), json!(self.num_kv_heads));
        if arch != Architecture::Qwen2 {
            c.insert("head_dim".into(), json!(self.head_dim));
        }
        c.insert("hidden_act".into(), json!("silu"));
        if let Some(n) = self.max_position_embeddings {
            c.insert("max_position_embeddings".into(), json!(n));
        }
        c.insert("rms_norm_eps".into(), json!(f64::from(self.rms_norm_eps)));
        c.insert("rope_theta".into(), json!(f64::from(self.rope_theta)));
        if let Some(factor) = self.rope_linear_factor {
            let scaling = json!({"rope_type": "linear", "factor": f64::from(factor)});
            c.insert("rope_scaling".into(), scaling);
        }
        c.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        match arch {
            Architecture::Llama => {
                c.insert("attention_bias".into(), json!(false));
                c.insert("mlp_bias".into(), json!(false));
            }
            // llama.cpp computes full attention for a llama-architecture file.
            Architecture::Mistral => {
                c.insert("sliding_window".into(), Value::Null);
            }
            Architecture::Qwen2 => {
                c.insert("use_sliding_window".into(), json!(false));
                c.insert("sliding_window".into(), Value::Null);
            }
        }
        for (name, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("unk_token_id", self.unk_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = id {
                c.insert(name.into(), json!(id));
            }
        }
        c.insert("dtype".into(), json!(torch_dtype));
        Value::Object(c)
    }

    /// `generation_config.json`: the special token ids generation uses.
    pub fn generation_config(&self) -> Value {
        let mut c = Map::new();
        for (name, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = id {
                c.insert(name.into(), json!(id));
            }
        }
        Value::Object(c)
    }
}

fn invalid(key: &str, problem: &str) -> Error {
    Error::KeyValue {
        key: key.to_owned(),
        problem: problem.to_owned(),
    }
}

/// `head_dim`: `rope.dimension_count` for the llama family (as transformers maps it), else
/// `hidden_size / num_heads`. It must be even (rotary halves, and llama.cpp's Q/K order).
fn head_dim(metadata: &Metadata, arch: Architecture, hidden: u64, heads: u64) -> Result<u64> {
    let key = format!("{}.rope.dimension_count", arch.key_prefix());
    let stated = match arch {
        Architecture::Llama | Architecture::Mistral => metadata.get_u64(&key)?,
        Architecture::Qwen2 => None,
    };
    let head_dim = match stated {
        Some(d) => d,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            let k = format!("{}.attention.head_count", arch.key_prefix());
            let problem = format!("{heads} heads do not divide the hidden size {hidden}");
            return Err(invalid(&k, &problem));
        }
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(invalid(
            &key,
            &format!("head dimension {head_dim} is not even"),
        ));
    }
    Ok(head_dim)
}

/// `{arch}.vocab_size`, else the number of `tokenizer.ggml.tokens`.
fn vocab_size(metadata: &Metadata, key: &str) -> Result<u64> {
    if let Some(n) = metadata.get_u64(key)? {
        return Ok(n);
    }
    match metadata.get_str_array("tokenizer.ggml.tokens")? {
        Some(tokens) if !tokens.is_empty() => Ok(tokens.len() as u64),
        _ => Err(Error::MissingKey {
            key: format!("{key} (or tokenizer.ggml.tokens)"),
        }),
    }
}

/// The factor of `rope.scaling.type = linear`; `none` or no key is no scaling; other kinds
/// (yarn, ...) are refused.
fn rope_scaling(metadata: &Metadata, prefix: &str) -> Result<Option<f32>> {
    let type_key = format!("{prefix}.rope.scaling.type");
    let factor_key = format!("{prefix}.rope.scaling.factor");
    match metadata.get_str(&type_key)? {
        None | Some("none") => Ok(None),
        Some("linear") => match metadata.get_f32(&factor_key)? {
            Some(f) if f > 0.0 && f.is_finite() => Ok(Some(f)),
            Some(f) => Err(invalid(
                &factor_key,
                &format!("{f} is not a positive factor"),
            )),
            None => Err(Error::MissingKey { key: factor_key }),
        },
        Some(other) => Err(Error::Unsupported {
            what: format!("{type_key} = {other}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Array, Value};

    fn metadata(extra: Vec<(&str, Value)>) -> Metadata {
        let mut entries: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.embedding_length".into(), Value::U32(64)),
            ("llama.feed_forward_length".into(), Value::U32(256)),
            ("llama.block_count".into(), Value::U32(2)),
            ("llama.attention.head_count".into(), Value::U32(4)),
            ("llama.attention.head_count_kv".into(), Value::U32(2)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(1e-5),
            ),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(Array::String(vec!["a".into(); 10])),
            ),
        ];
        for (k, v) in extra {
            entries.retain(|(key, _)| key != k);
            entries.push((k.to_owned(), v));
        }
        Metadata::from_entries(entries).expect("unique keys")
    }

    #[test]
    fn defaults_fill_what_the_file_leaves_out() -> Result<()> {
        let c = ModelConfig::from_gguf(&metadata(vec![]), &[])?;
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.vocab_size, c.head_dim, c.num_kv_heads), (10, 16, 2));
        assert_eq!((c.rope_theta, c.rope_linear_factor), (10_000.0, None));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.max_position_embeddings, None);
        let json = c.hf_config("float32");
        assert_eq!(json["rms_norm_eps"], json!(9.999999747378752e-06));
        assert_eq!(json["architectures"], json!(["LlamaForCausalLM"]));
        assert!(json.get("bos_token_id").is_none());
        Ok(())
    }

    #[test]
    fn mistral_is_llama_named_exactly_mistral() -> Result<()> {
        let named = |name: &str| metadata(vec![("general.name", Value::String(name.into()))]);
        assert_eq!(
            Architecture::detect(&named("mistral"))?,
            Architecture::Mistral
        );
        assert_eq!(
            Architecture::detect(&named("Mistral 7B"))?,
            Architecture::Llama
        );
        Ok(())
    }

    #[test]
    fn families_loaded_only_from_hf_directories_are_refused_by_name() {
        for arch in ["falcon", "qwen3", "phi3", "gemma2", "gemma3"] {
            let m = metadata(vec![("general.architecture", Value::String(arch.into()))]);
            let err = ModelConfig::from_gguf(&m, &[]).expect_err(arch).to_string();
            assert!(
                err.starts_with(&format!("architecture {arch} is not supported")),
                "{err}"
            );
        }
        let m = metadata(vec![("llama.expert_count", Value::U32(8))]);
        let err = ModelConfig::from_gguf(&m, &[])
            .expect_err("experts")
            .to_string();
        assert!(
            err.contains("llama with 8 experts") && err.contains("Mixtral"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_architectures_and_bad_values_are_refused() {
        let m = metadata(vec![("general.architecture", Value::String("bert".into()))]);
        let err = ModelConfig::from_gguf(&m, &[]).expect_err("bert");
        assert_eq!(
            err.to_string(),
            "architecture bert is not supported (supported: llama, mistral (written as llama), qwen2)"
        );
        let m = metadata(vec![("llama.attention.head_count_kv", Value::U32(3))]);
        let err = ModelConfig::from_gguf(&m, &[]).expect_err("3 kv heads");
        assert_eq!(
            err.to_string(),
            "metadata llama.attention.head_count_kv: 3 does not divide the 4 attention heads"
        );
        let m = metadata(vec![(
            "llama.rope.scaling.type",
            Value::String("yarn".into()),
        )]);
        let err = ModelConfig::from_gguf(&m, &[]).expect_err("yarn");
        assert_eq!(
            err.to_string(),
            "llama.rope.scaling.type = yarn is not supported yet"
        );
        let m = metadata(vec![("llama.rope.dimension_count", Value::U32(15))]);
        assert!(ModelConfig::from_gguf(&m, &[]).is_err());
        let m = metadata(vec![("llama.block_count", Value::U32(0))]);
        let err = ModelConfig::from_gguf(&m, &[]).expect_err("no layers");
        assert_eq!(err.to_string(), "metadata llama.block_count: must not be 0");
    }

    #[test]
    fn linear_rope_scaling_is_kept() -> Result<()> {
        let m = metadata(vec![
            ("llama.rope.scaling.type", Value::String("linear".into())),
            ("llama.rope.scaling.factor", Value::F32(4.0)),
        ]);
        let c = ModelConfig::from_gguf(&m, &[])?;
        assert_eq!(
            c.hf_config("float32")["rope_scaling"],
            json!({"rope_type": "linear", "factor": 4.0})
        );
        Ok(())
    }
}
