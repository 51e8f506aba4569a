//! `recontrol generate`: plain generation, or RE-Control generation with `--value`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use recontrol_controller::{
    BackendKind, ControlConfig, Controller, GradientBackend, UpdateRule, ValueArtifact,
};
use recontrol_export::OrtRuntime;
use recontrol_io::Provenance;
use recontrol_lm::{generate, LanguageModel};
use serde::Serialize;

use crate::args::{DeviceArgs, GenerationArgs};
use crate::output::{jsonl_out, provenance};

/// Generate continuations of prompts with a Hugging Face model directory.
#[derive(Debug, Clone, Args, Serialize)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(true).args(["prompt", "prompts"])))]
pub struct GenerateArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A prompt, used as is (repeatable).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// JSONL file of prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Field of each --prompts record that holds the prompt.
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub generation: GenerationArgs,
    /// Text put before every prompt (e.g. a helpful-assistant instruction: the paper's
    /// "prompting" variant).
    #[arg(long)]
    pub prompt_prefix: Option<String>,
    /// Output JSONL file (written atomically, with FILE.config.json beside it); stdout if absent.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

/// `--grad-backend` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GradBackendArg {
    /// ONNX Runtime on the exported graphs (value_grad.onnx / controller.onnx), on the CPU.
    Onnx,
    /// libtorch autograd on the value directory, on the LM's device.
    Torch,
}

/// `--update` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateArg {
    /// h <- h + alpha * dV/dh (the paper).
    Sgd,
    /// Adam ascent on V, fresh moments at every decoding step.
    Adam,
}

/// RE-Control: edit the final hidden state with a value head at every decoding step.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ControlArgs {
    /// A value head: an export directory (recontrol export), one of its .onnx files, or a
    /// value directory. Without it, generation is plain.
    #[arg(long)]
    pub value: Option<PathBuf>,
    /// Step size of each update (the paper: 0.5 on HH-RLHF).
    #[arg(long, default_value_t = 0.5, requires = "value")]
    pub alpha: f64,
    /// Updates per decoding step (the paper: 30).
    #[arg(long, default_value_t = 30, requires = "value")]
    pub steps: usize,
    #[arg(long, value_enum, default_value_t = GradBackendArg::Onnx, requires = "value")]
    pub grad_backend: GradBackendArg,
    #[arg(long, value_enum, default_value_t = UpdateArg::Sgd, requires = "value")]
    pub update: UpdateArg,
    /// Clip each row's gradient to this L2 norm before every update.
    #[arg(long, requires = "value")]
    pub clip_grad_norm: Option<f64>,
    /// Bound each row's total edit ||h' - h||_2 (projected after every update).
    #[arg(long, requires = "value")]
    pub max_edit_norm: Option<f64>,
    /// Use a value head trained on another model's states (same hidden size).
    #[arg(long, requires = "value")]
    pub allow_foreign_value: bool,
    /// ONNX Runtime library for --grad-backend onnx (default: $ORT_DYLIB_PATH, then the
    /// project venv).
    #[arg(long)]
    pub onnxruntime: Option<PathBuf>,
}

impl ControlArgs {
    fn config(&self) -> ControlConfig {
        ControlConfig {
            alpha: self.alpha,
            steps: self.steps,
            rule: match self.update {
                UpdateArg::Sgd => UpdateRule::Sgd,
                UpdateArg::Adam => UpdateRule::Adam,
            },
            clip_grad_norm: self.clip_grad_norm,
            max_edit_norm: self.max_edit_norm,
        }
    }

    /// The gradient backend for `lm`, after checking the value head against it.
    fn backend(&self, lm: &LanguageModel) -> Result<Option<Box<dyn GradientBackend>>> {
        let Some(path) = &self.value else {
            return Ok(None);
        };
        self.config()
            .check()
            .map_err(|e| anyhow::anyhow!("--alpha/--clip-grad-norm/--max-edit-norm: {e}"))?;
        let flag = || format!("--value {}", path.display());
        let artifact = ValueArtifact::open(path).with_context(flag)?;
        artifact
            .check_lm(
                &lm.identity,
                lm.model.config().hidden_size,
                self.allow_foreign_value,
            )
            .with_context(flag)?;
        let runtime = match self.grad_backend {
            GradBackendArg::Onnx => Some(OrtRuntime::load(self.onnxruntime.as_deref())?),
            GradBackendArg::Torch => None,
        };
        let kind = match self.grad_backend {
            GradBackendArg::Onnx => BackendKind::Onnx,
            GradBackendArg::Torch => BackendKind::Torch,
        };
        Ok(Some(
            artifact
                .backend(kind, lm.model.device(), runtime, None)
                .with_context(flag)?,
        ))
    }
}

/// One output line.
#[derive(Debug, Serialize)]
struct Record<'a> {
    /// The prompt as given (without `--prompt-prefix`).
    prompt: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_prefix: Option<&'a str>,
    /// The generation call (batch) it came from; `seconds` is that call's.
    batch: usize,
    response: String,
    tokens: &'a [i64],
    num_tokens: usize,
    finish_reason: &'static str,
    /// Wall time of the generation call of this prompt's batch (model loading excluded).
    seconds: f64,
    /// With --value: the edits of this response.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    control: Option<ControlRecord>,
}

/// Per-response edit statistics (means over the decoding steps).
#[derive(Debug, Serialize)]
struct ControlRecord {
    edit_norm_mean: f64,
    edit_norm_max: f64,
    value_before_mean: f64,
    value_after_mean: f64,
}

/// What FILE.config.json records.
#[derive(Debug, Serialize)]
struct RunRecord<'a> {
    command: &'static str,
    args: &'a GenerateArgs,
    eos_token_ids: &'a [i64],
    pad_token_id: i64,
    /// With --value: the controller (backend, where it ran, settings).
    controller: Option<String>,
    provenance: Provenance,
}

impl GenerateArgs {
    pub fn run(self) -> Result<()> {
        self.generation.sampling()?;
        let mut prompts = self.prompt.clone();
        if let Some(path) = &self.prompts {
            prompts.extend(recontrol_data::read_prompts(path, &self.prompt_field)?);
        }
        // The model sees the prefix; records keep the user's prompt (what rewards judge).
        let inputs: Vec<String> = prompts
            .iter()
            .map(|p| format!("{}{p}", self.prompt_prefix.as_deref().unwrap_or("")))
            .collect();
        let mut sink = jsonl_out(self.out.as_deref())?;

        eprintln!("loading {}", self.model.display());
        let lm = LanguageModel::load(&self.model, self.device.device, self.device.dtype.into())
            .with_context(|| format!("--model {}", self.model.display()))?;
        let mut truncated = 0;
        let token_ids = inputs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (ids, cut) = lm.encode_prompt(p, self.generation.max_new_tokens, true)?;
                if ids.is_empty() {
                    anyhow::bail!("prompt {i} is empty");
                }
                truncated += usize::from(cut);
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        if truncated > 0 {
            eprintln!("{truncated} prompts were too long for the model with --max-new-tokens {}: their oldest tokens were dropped", self.generation.max_new_tokens);
        }
        let mut config = self.generation.config(&lm)?;
        let mut backend = self.control.backend(&lm)?;
        let mut controller = backend
            .as_deref_mut()
            .map(|b| Controller::new(b, self.control.config()))
            .transpose()?;
        if let Some(c) = &controller {
            eprintln!("controlling with {c:?}");
        }

        let progress = ProgressBar::new(prompts.len() as u64).with_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} prompts  {elapsed} (eta {eta})  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let (mut total_tokens, mut total_seconds) = (0usize, 0f64);
        for (chunk_index, chunk) in token_ids.chunks(self.generation.batch_size).enumerate() {
            let first = chunk_index * self.generation.batch_size;
            config.first_row = first as u64;
            let start = Instant::now();
            let hook = controller
                .as_mut()
                .map(|c| c as &mut dyn recontrol_lm::HiddenStateHook);
            let outputs = generate(&lm.model, chunk, &config, hook)?;
            let seconds = start.elapsed().as_secs_f64();
            let stats = controller
                .as_mut()
                .map(Controller::take_stats)
                .unwrap_or_default();
            total_seconds += seconds;
            for (offset, out) in outputs.iter().enumerate() {
                total_tokens += out.tokens.len();
                sink.write(&Record {
                    prompt: &prompts[first + offset],
                    prompt_prefix: self.prompt_prefix.as_deref(),
                    batch: chunk_index,
                    response: lm.tokenizer.decode(&out.tokens, true)?,
                    tokens: &out.tokens,
                    num_tokens: out.tokens.len(),
                    finish_reason: out.finish_reason.as_str(),
                    seconds,
                    control: controller.as_ref().map(|_| {
                        let s = stats.get(offset).copied().unwrap_or_default();
                        ControlRecord {
                            edit_norm_mean: s.edit_norm_mean(),
                            edit_norm_max: s.edit_norm_max,
                            value_before_mean: s.value_before_mean(),
                            value_after_mean: s.value_after_mean(),
                        }
                    }),
                })?;
            }
            progress.inc(chunk.len() as u64);
            progress.set_message(format!(
                "{:.1} tokens/s",
                total_tokens as f64 / total_seconds
            ));
        }
        progress.finish_and_clear();
        eprintln!(
            "generated {total_tokens} tokens for {} prompts in {total_seconds:.2} s ({:.1} tokens/s)",
            prompts.len(),
            total_tokens as f64 / total_seconds.max(1e-9)
        );
        sink.finish(&RunRecord {
            command: "generate",
            args: &self,
            eos_token_ids: &config.eos_token_ids,
            pad_token_id: config.pad_token_id,
            controller: controller.as_ref().map(|c| format!("{c:?}")),
            provenance: provenance(),
        })?;
        Ok(())
    }
}
