//! Causal language models hosted in libtorch, loaded from Hugging Face model directories, with
//! the numbers of HF transformers.
//!
//! A model directory holds `config.json`, `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), `tokenizer.json`, and optionally `tokenizer_config.json`
//! (special tokens, chat template), `chat_template.jinja` and `generation_config.json` (eos ids).
//! Architectures: `llama` (Llama 2, Vicuna, Llama 3 with GQA and llama3 rope scaling, tied or
//! untied embeddings), `mistral` (sliding-window attention) and `qwen2` (q/k/v biases).
//!
//! The API is shaped for RE-Control: [`CausalLm::forward_hidden`] returns the final hidden
//! state after the last norm, [`CausalLm::logits`] computes logits from a (possibly edited)
//! hidden state, and [`generate`] calls a [`HiddenStateHook`] between the two at every step.
//!
//! ```no_run
//! # fn main() -> recontrol_lm::Result<()> {
//! use recontrol_lm::{DType, DeviceSpec, LanguageModel, Sampling};
//! let lm = LanguageModel::load("models/tiny".as_ref(), DeviceSpec::Cpu, DType::F32)?;
//! let prompt = lm.tokenizer.encode("\n\nHuman: hi\n\nAssistant:", true)?;
//! let config = lm.generation_config(32, Sampling::Greedy);
//! let out = recontrol_lm::generate(&lm.model, &[prompt], &config, None)?;
//! println!("{}", lm.tokenizer.decode(&out[0].tokens, true)?);
//! # Ok(()) }
//! ```

mod cache;
pub mod config;
mod device;
mod error;
mod generate;
mod hook;
mod model;
mod rope;
pub mod sampling;
mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use cache::KvCache;
pub use config::{Architecture, ModelConfig, SUPPORTED_MODEL_TYPES};
pub use device::{DType, DeviceSpec};
pub use error::{Error, Result};
pub use generate::{generate, FinishReason, Generation, GenerationConfig};
pub use hook::{HiddenStateHook, HookContext, HookError, NoHook};
pub use model::{CausalLm, Positions, StepInput};
pub use sampling::Sampling;
pub use tokenizer::{render_chat_template, ChatMessage, LmTokenizer};

/// The parts of `generation_config.json` that generation uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationDefaults {
    pub eos_token_id: Option<config::TokenIds>,
    pub pad_token_id: Option<config::TokenIds>,
    pub bos_token_id: Option<config::TokenIds>,
}

/// A model directory loaded: weights, tokenizer and generation defaults.
#[derive(Debug)]
pub struct LanguageModel {
    pub dir: PathBuf,
    pub model: CausalLm,
    pub tokenizer: LmTokenizer,
    /// End-of-sequence ids: `generation_config.json`, else `config.json`.
    pub eos_token_ids: Vec<i64>,
    /// Padding id: `generation_config.json`, else `config.json`, else the first eos id, else 0.
    pub pad_token_id: i64,
}

impl LanguageModel {
    /// Loads a Hugging Face model directory on `device` as `dtype`.
    pub fn load(dir: &Path, device: DeviceSpec, dtype: DType) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingModelDir(dir.to_owned()));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::MissingFile {
                path: config_path,
                what: "config.json",
            });
        }
        let config = ModelConfig::from_file(&config_path)?;
        let tokenizer = LmTokenizer::from_dir(dir)?;
        let gen_path = dir.join("generation_config.json");
        let defaults: GenerationDefaults = if gen_path.is_file() {
            config::read_json(&gen_path)?
        } else {
            GenerationDefaults::default()
        };
        let eos_token_ids = match &defaults.eos_token_id {
            Some(ids) => ids.to_vec(),
            None => config.eos_token_ids.clone(),
        };
        let first =
            |ids: &Option<config::TokenIds>| ids.as_ref().and_then(|t| t.to_vec().first().copied());
        let pad_token_id = first(&defaults.pad_token_id)
            .or(config.pad_token_id)
            .or(eos_token_ids.first().copied())
            .unwrap_or(0);
        let device = device.resolve()?;
        let model = CausalLm::load(dir, config, device, dtype)?;
        Ok(Self {
            dir: dir.to_owned(),
            model,
            tokenizer,
            eos_token_ids,
            pad_token_id,
        })
    }

    /// Generation settings with this model's eos and pad ids.
    pub fn generation_config(&self, max_new_tokens: usize, sampling: Sampling) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens,
            sampling,
            eos_token_ids: self.eos_token_ids.clone(),
            pad_token_id: self.pad_token_id,
            first_row: 0,
        }
    }
}
