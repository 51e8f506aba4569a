//! `recontrol generate`: plain (uncontrolled) generation.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use recontrol_lm::{generate, LanguageModel};
use serde::Serialize;

use crate::args::{DeviceArgs, GenerationArgs};
use crate::output::{JsonlSink, Provenance};

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
    /// Output JSONL file (written atomically, with FILE.config.json beside it); stdout if absent.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

/// One output line.
#[derive(Debug, Serialize)]
struct Record<'a> {
    prompt: &'a str,
    response: String,
    tokens: &'a [i64],
    num_tokens: usize,
    finish_reason: &'static str,
    /// Wall time of the generation call of this prompt's batch (model loading excluded).
    seconds: f64,
}

/// What FILE.config.json records.
#[derive(Debug, Serialize)]
struct RunRecord<'a> {
    command: &'static str,
    args: &'a GenerateArgs,
    eos_token_ids: &'a [i64],
    pad_token_id: i64,
    provenance: Provenance,
}

impl GenerateArgs {
    pub fn run(self) -> Result<()> {
        self.generation.sampling()?;
        let mut prompts = self.prompt.clone();
        if let Some(path) = &self.prompts {
            prompts.extend(recontrol_data::read_prompts(path, &self.prompt_field)?);
        }
        let mut sink = JsonlSink::create(self.out.as_deref())?;

        eprintln!("loading {}", self.model.display());
        let lm = LanguageModel::load(&self.model, self.device.device, self.device.dtype.into())
            .with_context(|| format!("--model {}", self.model.display()))?;
        let mut truncated = 0;
        let token_ids = prompts
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
            let outputs = generate(&lm.model, chunk, &config, None)?;
            let seconds = start.elapsed().as_secs_f64();
            total_seconds += seconds;
            for (offset, out) in outputs.iter().enumerate() {
                total_tokens += out.tokens.len();
                sink.write(&Record {
                    prompt: &prompts[first + offset],
                    response: lm.tokenizer.decode(&out.tokens, true)?,
                    tokens: &out.tokens,
                    num_tokens: out.tokens.len(),
                    finish_reason: out.finish_reason.as_str(),
                    seconds,
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
            provenance: Provenance::current(),
        })
    }
}
