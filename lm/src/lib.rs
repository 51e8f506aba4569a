//! Causal language models hosted in libtorch, loaded from Hugging Face model directories, with
//! the numbers of HF transformers.
//!
//! A model directory holds `config.json`, `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), `tokenizer.json`, and optionally `tokenizer_config.json`
//! (special tokens, chat template), `chat_template.jinja` and `generation_config.json` (eos ids).
//! Architectures: `llama` (Llama 2, Vicuna, Llama 3 with GQA and llama3 rope scaling, tied or
//! untied embeddings), `mistral` (sliding-window attention), `qwen2` (q/k/v biases), `qwen3`
//! (per-head q/k norms), `mixtral` (sparse mixture of experts), `falcon` (rotary
//! Falcon-7B style multi-query and the new decoder architecture of Falcon-40B/180B),
//! `phi3` (fused projections, LongRoPE), `gemma2` and `gemma3_text` (scaled embeddings, (1 + w)
//! norms around each branch, GeGLU, soft-capping, interleaved sliding-window layers).
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

mod attention;
mod avx512;
pub mod bpe;
mod cache;
pub mod config;
mod decoding;
mod device;
mod error;
mod generate;
mod hook;
mod kernels;
mod layers;
mod mlp;
mod model;
mod moe;
mod packed;
pub mod pretrain;
mod rope;
pub mod sampling;
mod team;
mod tiled;
mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use cache::KvCache;
pub use config::{Architecture, ModelConfig, SUPPORTED_MODEL_TYPES};
pub use decoding::DecodingSettings;
pub use device::{DType, DeviceSpec};
pub use error::{Error, Result};
pub use generate::{
    generate, FinishReason, Generation, GenerationConfig, PromptBatch, RowProgress, StepTokens,
};
pub use hook::{HiddenStateHook, HookContext, HookError, NoHook, StateRecorder};
pub use model::{CausalLm, Positions, StepInput, PACK_MAX_BYTES};
pub use packed::DecodingProduct;
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
    /// [`model_identity`]: `sha256:<hex>` of config.json, tokenizer.json and the checkpoint
    /// headers and edges; what value nets and rollout stores record as the model they belong to.
    pub identity: String,
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
        Self::load_with(dir, device, dtype, true)
    }

    /// Loads the decoder and tokenizer without the LM head (e.g. the backbone of a
    /// sequence-classification reward model, which has none).
    pub fn load_backbone(dir: &Path, device: DeviceSpec, dtype: DType) -> Result<Self> {
        Self::load_with(dir, device, dtype, false)
    }

    fn load_with(dir: &Path, device: DeviceSpec, dtype: DType, with_head: bool) -> Result<Self> {
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
        let identity = model_identity(dir)?;
        let device = device.resolve()?;
        let model = if with_head {
            CausalLm::load(dir, config, device, dtype)?
        } else {
            CausalLm::load_backbone(dir, config, device, dtype)?
        };
        Ok(Self {
            dir: dir.to_owned(),
            identity,
            model,
            tokenizer,
            eos_token_ids,
            pad_token_id,
        })
    }

    /// Token ids of a prompt that leave room for `max_new_tokens` within the model's positions:
    /// a longer prompt loses its oldest tokens (a leading BOS is kept), and the second result
    /// says so. Errors when `max_new_tokens` alone does not fit. `add_special_tokens` applies
    /// the tokenizer's post-processor (e.g. a leading BOS); text rendered by a chat template
    /// already has its special tokens and is encoded without (as transformers does).
    pub fn encode_prompt(
        &self,
        text: &str,
        max_new_tokens: usize,
        add_special_tokens: bool,
    ) -> Result<(Vec<i64>, bool)> {
        let ids = self.tokenizer.encode(text, add_special_tokens)?;
        let Some(max) = self.model.config().max_position_embeddings else {
            return Ok((ids, false));
        };
        let bos = self.model.config().bos_token_id;
        let keep_bos = usize::from(bos.is_some() && ids.first().copied() == bos);
        let room = max.checked_sub(max_new_tokens).filter(|&r| r > keep_bos).ok_or_else(|| {
            Error::InvalidGeneration(format!(
                "max-new-tokens {max_new_tokens} leaves no room for a prompt within the model's {max} positions"
            ))
        })?;
        if ids.len() <= room {
            return Ok((ids, false));
        }
        let mut kept = ids[..keep_bos].to_vec();
        kept.extend_from_slice(&ids[ids.len() - (room - keep_bos)..]);
        Ok((kept, true))
    }

    /// Generation settings with this model's eos and pad ids.
    pub fn generation_config(&self, max_new_tokens: usize, sampling: Sampling) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens,
            sampling,
            eos_token_ids: self.eos_token_ids.clone(),
            pad_token_id: self.pad_token_id,
            first_row: 0,
            row_streams: None,
        }
    }
}

/// `sha256:<hex>` identifying a model directory: its config.json and tokenizer.json, and for
/// each checkpoint file its size, its safetensors header (names, shapes, dtypes, offsets) and
/// its first and last 64 KiB of data. Cheap to compute for a 7B model and different for
/// different weights in practice.
pub fn model_identity(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    const EDGE: u64 = 64 * 1024;
    let mut hasher = Sha256::new();
    let mut add = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    for name in ["config.json", "tokenizer.json"] {
        let path = dir.join(name);
        add(&std::fs::read(&path).map_err(|e| Error::io(&path, e))?);
    }
    for path in weights::checkpoint_files(dir)? {
        let io = |e| Error::io(&path, e);
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        add(&size.to_le_bytes());
        let mut head = vec![0u8; size.min(8 + EDGE) as usize];
        file.read_exact(&mut head).map_err(io)?;
        add(&head);
        let header_len = head
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        // The whole header (it can exceed the edge for large checkpoints).
        // A garbage length (a broken file) is left for the checkpoint reader to report.
        let header_end = header_len.saturating_add(8);
        if header_end > head.len() as u64 && header_end <= size {
            let mut header = vec![0u8; header_len as usize];
            file.seek(SeekFrom::Start(8)).map_err(io)?;
            file.read_exact(&mut header).map_err(io)?;
            add(&header);
        }
        let tail_start = size.saturating_sub(EDGE);
        let mut tail = vec![0u8; (size - tail_start) as usize];
        file.seek(SeekFrom::Start(tail_start)).map_err(io)?;
        file.read_exact(&mut tail).map_err(io)?;
        add(&tail);
    }
    let digest = hasher.finalize();
    Ok(format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}
