//! `recontrol generate`: plain generation, or RE-Control generation with `--value`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use recontrol_controller::generation::{open_value_backend, ValueOptions};
use recontrol_controller::{
    generate_records, BackendKind, ControlConfig, Controller, GenerationPlan, GradientBackend,
    UpdateRule,
};
use recontrol_io::Provenance;
use recontrol_lm::{ChatMessage, LanguageModel};
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
    /// "prompting" variant); with --chat, the system message.
    #[arg(long)]
    pub prompt_prefix: Option<String>,
    /// Render each prompt as a user message with the model's chat template (an instruct
    /// model's format); records keep the rendering.
    #[arg(long)]
    pub chat: bool,
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
    /// ONNX Runtime on the exported graphs (value_grad.onnx / controller.onnx), with its CUDA
    /// execution provider when --device is a GPU and the onnxruntime has it, else on the CPU.
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
        let options = ValueOptions {
            backend: match self.grad_backend {
                GradBackendArg::Onnx => BackendKind::Onnx,
                GradBackendArg::Torch => BackendKind::Torch,
            },
            allow_foreign: self.allow_foreign_value,
            onnxruntime: self.onnxruntime.clone(),
        };
        let backend = open_value_backend(path, lm, &options)
            .with_context(|| format!("--value {}", path.display()))?;
        Ok(Some(backend))
    }
}

/// `prompt` as a user message (after `system`, if any) in `lm`'s chat template.
fn chat_prompt(lm: &LanguageModel, system: Option<&str>, prompt: &str) -> Result<String> {
    let message = |role: &str, content: &str| ChatMessage {
        role: role.to_owned(),
        content: content.to_owned(),
    };
    let mut messages: Vec<ChatMessage> = system.map(|s| message("system", s)).into_iter().collect();
    messages.push(message("user", prompt));
    lm.tokenizer
        .apply_chat_template(&messages, true)
        .context("--chat")
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
        let mut sink = jsonl_out(self.out.as_deref())?;

        eprintln!("loading {}", self.model.display());
        let lm = LanguageModel::load(&self.model, self.device.device, self.device.dtype.into())
            .with_context(|| format!("--model {}", self.model.display()))?;
        let config = self.generation.config(&lm)?;
        let mut backend = self.control.backend(&lm)?;
        let mut controller = backend
            .as_deref_mut()
            .map(|b| Controller::new(b, self.control.config()))
            .transpose()?;
        if let Some(c) = &controller {
            eprintln!("controlling with {c:?}");
        }
        let (prompts, model_prompts) = if self.chat {
            let render = |system: Option<&str>| {
                prompts
                    .iter()
                    .map(|p| chat_prompt(&lm, system, p))
                    .collect::<Result<Vec<_>>>()
            };
            let seen = self
                .prompt_prefix
                .as_deref()
                .map(|s| render(Some(s)))
                .transpose()?;
            (render(None)?, seen)
        } else {
            (prompts, None)
        };
        let plan = GenerationPlan {
            prompts: &prompts,
            prompt_prefix: self.prompt_prefix.as_deref().filter(|_| !self.chat),
            model_prompts: model_prompts.as_deref(),
            add_special_tokens: !self.chat,
            config: config.clone(),
            batch_size: self.generation.batch_size,
        };
        let progress = ProgressBar::new(prompts.len() as u64).with_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} prompts  {elapsed} (eta {eta})  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let (mut tokens, mut seconds) = (0usize, 0f64);
        let summary = generate_records(&lm, &plan, controller.as_mut(), &mut |records| {
            for r in records {
                sink.write(r)?;
                tokens += r.num_tokens.unwrap_or(0);
            }
            seconds += records.first().and_then(|r| r.seconds).unwrap_or(0.0);
            progress.inc(records.len() as u64);
            progress.set_message(format!("{:.1} tokens/s", tokens as f64 / seconds));
            Ok(())
        })?;
        progress.finish_and_clear();
        if summary.truncated_prompts > 0 {
            eprintln!(
                "{} prompts were too long for the model with --max-new-tokens {}: their oldest tokens were dropped",
                summary.truncated_prompts, self.generation.max_new_tokens
            );
        }
        eprintln!(
            "generated {} tokens for {} prompts in {:.2} s ({:.1} tokens/s)",
            summary.tokens,
            summary.prompts,
            summary.seconds,
            summary.tokens as f64 / summary.seconds.max(1e-9)
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
