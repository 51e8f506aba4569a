//! Rollout collection, the first stage of RE-Control: the unaligned LM answers dataset prompts
//! and every final post-norm hidden state along each response is stored (the HDF5 store of
//! `recontrol_data::store`), written crash-safe in parts by `recontrol_data::rollout`.
//!
//! [`select_prompts`] (from `recontrol_data::selection`) picks a dataset's prompts (split side,
//! limit, job-array shard); [`collect_rollouts`] renders them, decodes them with a [`StateRecorder`] on the LM, and
//! writes (or resumes) the store.

use std::path::Path;
use std::time::Instant;

use ndarray::Array2;
use recontrol_data::rollout::{self as job, PlannedPrompt, RolloutPlan, RolloutSource};
pub use recontrol_data::selection::{select_prompts, PromptSelection, Shard};
use recontrol_data::{PromptFormat, PromptRecord, Rollout, StateDtype, StoreMeta};
use recontrol_lm::{generate, DecodingSettings, GenerationConfig, LanguageModel, StateRecorder};
use serde::{Deserialize, Serialize};

/// Errors of rollout collection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no prompts left after the split, limit and shard")]
    NoPrompts,
    #[error("samples per prompt must be at least 1")]
    NoSamples,
    #[error(transparent)]
    Data(#[from] recontrol_data::Error),
    #[error(transparent)]
    Lm(#[from] recontrol_lm::Error),
    #[error(transparent)]
    Job(#[from] recontrol_data::rollout::RolloutError),
    #[error(transparent)]
    Store(#[from] recontrol_data::StoreError),
    #[error("settings: {0}")]
    Json(#[from] serde_json::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How prompts are rolled out and stored. The defaults are `recontrol rollout`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutSettings {
    /// Rollouts per prompt (useful with sampling).
    pub samples_per_prompt: usize,
    /// Precision of the stored states.
    pub state_dtype: StateDtype,
    /// Rollouts per crash-safe part (rounded up to whole batches).
    pub rollouts_per_part: usize,
    pub prompt_format: PromptFormat,
    /// An instruction put before every prompt (the paper's "+prompting").
    pub instruction: Option<String>,
    pub decoding: DecodingSettings,
    /// Batch each part's prompts by tokenized length (less padding); the store's records and
    /// their order are the same either way, each row keeping its own random stream.
    pub sort_by_length: bool,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        Self {
            samples_per_prompt: 1,
            state_dtype: StateDtype::F32,
            rollouts_per_part: 256,
            prompt_format: PromptFormat::Hh,
            instruction: None,
            decoding: DecodingSettings::default(),
            sort_by_length: true,
        }
    }
}

/// What a finished collection did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutReport {
    pub rollouts: usize,
    pub states: usize,
    /// Wall time of this call (a resumed run counts only what it did).
    pub seconds: f64,
    /// Size of the store.
    pub bytes: u64,
    /// Parts kept from an interrupted run.
    pub parts_reused: usize,
    /// Prompts whose oldest tokens were dropped to fit the model's positions.
    pub truncated_prompts: usize,
    /// The store was complete before this (resumed) call: nothing was done.
    pub already_complete: bool,
}

/// Rolls out `records` of the dataset at `dataset_path` with `lm` into the store `out` (or,
/// with `resume`, finishes an interrupted run of the same settings). `progress(done, total)`
/// follows each batch.
pub fn collect_rollouts(
    lm: &LanguageModel,
    records: &[&PromptRecord],
    dataset_path: &Path,
    settings: &RolloutSettings,
    out: &Path,
    resume: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<RolloutReport> {
    if settings.samples_per_prompt == 0 {
        return Err(Error::NoSamples);
    }
    if records.is_empty() {
        return Err(Error::NoPrompts);
    }
    let config = settings.decoding.config(lm)?;
    let mut prompts = Vec::with_capacity(records.len() * settings.samples_per_prompt);
    for r in records {
        let text = recontrol_data::render_prompt(
            settings.prompt_format,
            r,
            settings.instruction.as_deref(),
            Some(&lm.tokenizer),
        )?;
        for _ in 0..settings.samples_per_prompt {
            prompts.push(PlannedPrompt {
                prompt_index: r.index as i64,
                text: text.clone(),
            });
        }
    }
    let batch = settings.decoding.batch_size;
    let plan = RolloutPlan {
        meta: StoreMeta {
            hidden_size: lm.model.config().hidden_size,
            model: lm.dir.display().to_string(),
            model_hash: lm.identity.clone(),
            state_dtype: settings.state_dtype,
            prompt_format: settings.prompt_format,
            generation: serde_json::to_value(&settings.decoding)?,
            seed: settings.decoding.seed,
            recontrol_version: env!("CARGO_PKG_VERSION").to_owned(),
            dataset: dataset_path.display().to_string(),
        },
        prompts,
        batch_size: batch,
        rollouts_per_part: settings.rollouts_per_part.max(1).div_ceil(batch) * batch,
        sort_by_length: settings.sort_by_length,
    };
    lm.model.warm_up(batch.min(plan.prompts.len()))?;
    let start = Instant::now();
    let mut source = LmSource {
        lm,
        config,
        add_special_tokens: settings.prompt_format != PromptFormat::ChatTemplate,
        truncated: 0,
    };
    let summary = job::run(&plan, out, resume, &mut source, progress)?;
    let seconds = start.elapsed().as_secs_f64();
    let states = recontrol_data::Store::open(out)?.num_states();
    Ok(RolloutReport {
        rollouts: summary.rollouts,
        states,
        seconds,
        bytes: recontrol_data::store::file_size(out),
        parts_reused: summary.parts_reused,
        truncated_prompts: source.truncated,
        already_complete: summary.already_complete,
    })
}

/// The LM as a rollout source: generates a batch, recording the state of every step.
struct LmSource<'a> {
    lm: &'a LanguageModel,
    config: GenerationConfig,
    /// False for chat-template text, which carries its own special tokens.
    add_special_tokens: bool,
    /// Prompts whose oldest tokens were dropped to fit the model's positions.
    truncated: usize,
}

impl LmSource<'_> {
    /// A prompt's ids as they will be fed, and whether its oldest tokens were dropped.
    fn encode(&self, p: &PlannedPrompt) -> recontrol_lm::Result<(Vec<i64>, bool)> {
        self.lm
            .encode_prompt(&p.text, self.config.max_new_tokens, self.add_special_tokens)
    }
}

impl RolloutSource for LmSource<'_> {
    /// Shortest prompt (in tokens, as it will be fed) first; ties keep the planned order.
    fn order(
        &mut self,
        prompts: &[PlannedPrompt],
    ) -> Result<Vec<usize>, Box<dyn std::error::Error + Send + Sync>> {
        let mut lengths = Vec::with_capacity(prompts.len());
        for p in prompts {
            lengths.push(self.encode(p)?.0.len());
        }
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| lengths[i]);
        Ok(order)
    }

    fn generate(
        &mut self,
        prompts: &[PlannedPrompt],
        rows: &[u64],
    ) -> Result<Vec<Rollout>, Box<dyn std::error::Error + Send + Sync>> {
        let mut ids = Vec::with_capacity(prompts.len());
        for p in prompts {
            let (prompt_ids, truncated) = self.encode(p)?;
            self.truncated += usize::from(truncated);
            ids.push(prompt_ids);
        }
        let mut config = self.config.clone();
        config.row_streams = Some(rows.to_vec());
        let mut recorder = StateRecorder::new(prompts.len());
        let outputs = generate(&self.lm.model, &ids, &config, Some(&mut recorder))?;
        let hidden = self.lm.model.config().hidden_size;
        let states = recorder.into_rows();
        prompts
            .iter()
            .zip(outputs)
            .zip(states)
            .map(|((p, out), flat)| {
                let steps = out.tokens.len();
                // [steps, hidden]
                let states = Array2::from_shape_vec((steps, hidden), flat)
                    .map_err(|e| format!("prompt {}: {e}", p.prompt_index))?;
                Ok(Rollout {
                    prompt_index: p.prompt_index,
                    prompt: p.text.clone(),
                    response: self.lm.tokenizer.decode(&out.tokens, true)?,
                    tokens: out.tokens,
                    states,
                    reward: f32::NAN,
                })
            })
            .collect()
    }
}
