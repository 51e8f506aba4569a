//! The generation stage: prompts in, one [`GenerationRecord`] per prompt out, decoded plainly
//! or under a [`Controller`] (RE-Control). `recontrol generate`, the demo and other callers
//! use this one loop.

use std::time::Instant;

use recontrol_data::{EditStats, GenerationRecord};
use recontrol_lm::{generate, GenerationConfig, HiddenStateHook, LanguageModel};

use crate::{Controller, Error, Result};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationPlan<'a> {
    /// The prompts as the user gave them: records keep these (what rewards judge).
    pub prompts: &'a [String],
    /// Text the model sees before every prompt (the paper's "+prompting" variant).
    pub prompt_prefix: Option<&'a str>,
    /// What the model decodes from instead of `prompt_prefix + prompt`, one per prompt (e.g.
    /// chat renderings with an instruction as the system message); records keep both.
    pub model_prompts: Option<&'a [String]>,
    /// Whether the tokenizer adds its special tokens (BOS); false for chat-template text,
    /// which carries its own.
    pub add_special_tokens: bool,
    /// Decoding settings (`first_row` is set per batch).
    pub config: GenerationConfig,
    /// Prompts decoded together.
    pub batch_size: usize,
}

/// What a generation run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationSummary {
    pub prompts: usize,
    pub tokens: usize,
    /// Time in the generation calls (model loading excluded).
    pub seconds: f64,
    /// Prompts whose oldest tokens were dropped to fit the model's positions.
    pub truncated_prompts: usize,
}

/// Errors of a caller's record sink (e.g. a file being written).
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Generates a response to every prompt of `plan`, `batch_size` at a time, each batch's
/// records handed to `sink` as soon as the batch is decoded. With a controller, every
/// decoding step's final hidden states are edited and each record carries its edit stats.
pub fn generate_records(
    lm: &LanguageModel,
    plan: &GenerationPlan<'_>,
    mut controller: Option<&mut Controller<'_>>,
    sink: &mut dyn FnMut(&[GenerationRecord]) -> std::result::Result<(), SinkError>,
) -> Result<GenerationSummary> {
    if plan.batch_size == 0 {
        return Err(Error::ZeroBatch);
    }
    let prefix = plan.prompt_prefix.unwrap_or("");
    if let Some(seen) = plan.model_prompts {
        if seen.len() != plan.prompts.len() {
            return Err(Error::ModelPrompts {
                prompts: plan.prompts.len(),
                model_prompts: seen.len(),
            });
        }
    }
    let mut truncated_prompts = 0;
    let mut token_ids = Vec::with_capacity(plan.prompts.len());
    for (index, prompt) in plan.prompts.iter().enumerate() {
        let text = match plan.model_prompts {
            Some(seen) => seen[index].clone(),
            None => format!("{prefix}{prompt}"),
        };
        let (ids, cut) =
            lm.encode_prompt(&text, plan.config.max_new_tokens, plan.add_special_tokens)?;
        if ids.is_empty() {
            return Err(Error::EmptyPrompt { index });
        }
        truncated_prompts += usize::from(cut);
        token_ids.push(ids);
    }
    let mut config = plan.config.clone();
    let (mut tokens, mut seconds) = (0usize, 0f64);
    for (batch, chunk) in token_ids.chunks(plan.batch_size).enumerate() {
        let first = batch * plan.batch_size;
        config.first_row = first as u64;
        let start = Instant::now();
        let hook = controller
            .as_deref_mut()
            .map(|c| c as &mut dyn HiddenStateHook);
        let outputs = generate(&lm.model, chunk, &config, hook)?;
        let batch_seconds = start.elapsed().as_secs_f64();
        seconds += batch_seconds;
        let stats = controller
            .as_deref_mut()
            .map(Controller::take_stats)
            .unwrap_or_default();
        let mut records = Vec::with_capacity(outputs.len());
        for (offset, out) in outputs.into_iter().enumerate() {
            tokens += out.tokens.len();
            let control = controller.as_ref().map(|_| {
                let s = stats.get(offset).copied().unwrap_or_default();
                EditStats {
                    edit_norm_mean: s.edit_norm_mean(),
                    edit_norm_max: s.edit_norm_max,
                    value_before_mean: s.value_before_mean(),
                    value_after_mean: s.value_after_mean(),
                }
            });
            records.push(GenerationRecord {
                prompt_prefix: plan.prompt_prefix.map(str::to_owned),
                model_prompt: plan.model_prompts.map(|seen| seen[first + offset].clone()),
                batch: Some(batch),
                tokens: Some(out.tokens.clone()),
                num_tokens: Some(out.tokens.len()),
                finish_reason: Some(out.finish_reason.as_str().to_owned()),
                seconds: Some(batch_seconds),
                control,
                ..GenerationRecord::new(
                    plan.prompts[first + offset].clone(),
                    lm.tokenizer.decode(&out.tokens, true)?,
                )
            });
        }
        sink(&records).map_err(Error::Sink)?;
    }
    Ok(GenerationSummary {
        prompts: plan.prompts.len(),
        tokens,
        seconds,
        truncated_prompts,
    })
}

/// How to open a value head for an LM.
#[derive(Debug, Clone)]
pub struct ValueOptions {
    pub backend: crate::BackendKind,
    /// Accept a value head trained on another model's states (same hidden size).
    pub allow_foreign: bool,
    /// The ONNX Runtime library for the onnx backend (default: `$ORT_DYLIB_PATH`, then the
    /// project venv).
    pub onnxruntime: Option<std::path::PathBuf>,
}

/// Opens the value head at `path` (export directory, `.onnx` file or value directory), checks
/// it against `lm` (hidden size, identity) and builds its gradient backend on the LM's device.
pub fn open_value_backend(
    path: &std::path::Path,
    lm: &LanguageModel,
    options: &ValueOptions,
) -> Result<Box<dyn crate::GradientBackend>> {
    let artifact = crate::ValueArtifact::open(path)?;
    artifact.check_lm(
        &lm.identity,
        lm.model.config().hidden_size,
        options.allow_foreign,
    )?;
    let runtime = match options.backend {
        crate::BackendKind::Onnx => Some(recontrol_export::OrtRuntime::load(
            options.onnxruntime.as_deref(),
        )?),
        crate::BackendKind::Torch => None,
    };
    artifact.backend(options.backend, lm.model.device(), runtime, None)
}
