//! `recontrol rollout`: generate from dataset prompts and store every final hidden state.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::Array2;
use recontrol_data::rollout::{self as job, PlannedPrompt, RolloutPlan, RolloutSource};
use recontrol_data::{Rollout, StateDtype, StoreMeta};
use recontrol_io::{config_path, write_json_atomic, Provenance};
use recontrol_lm::{generate, GenerationConfig, LanguageModel, StateRecorder};
use serde::Serialize;

use crate::args::{DatasetArgs, DeviceArgs, GenerationArgs, PromptArgs, SplitArgs};
use crate::output::provenance;

/// Generate from dataset prompts and store every final hidden state (HDF5), or merge stores.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RolloutCommand {
    #[command(subcommand)]
    pub merge: Option<RolloutSubcommand>,
    #[command(flatten)]
    pub run: RolloutArgs,
}

#[derive(Debug, Subcommand)]
pub enum RolloutSubcommand {
    /// Join stores of the same model and format into one (e.g. the shards of a job array).
    Merge(MergeArgs),
}

/// `--state-dtype` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StateDtypeArg {
    F32,
    F16,
}

/// A job-array shard: `K/N` takes records K, K+N, K+2N, ... (K from 0 to N-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    let (k, n) = s
        .split_once('/')
        .ok_or_else(|| format!("expected K/N, got {s:?}"))?;
    let index: usize = k
        .parse()
        .map_err(|_| format!("K in {s:?} is not a number"))?;
    let count: usize = n
        .parse()
        .map_err(|_| format!("N in {s:?} is not a number"))?;
    if count == 0 || index >= count {
        return Err(format!("expected 0 <= K < N, got {s:?}"));
    }
    Ok(Shard { index, count })
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct RolloutArgs {
    /// Model directory.
    #[arg(long, required = true)]
    pub model: Option<PathBuf>,
    /// Dataset file (HH-RLHF JSONL(.gz), HarmfulQA JSON, or JSONL with --prompt-field).
    #[arg(long, required = true)]
    pub dataset: Option<PathBuf>,
    /// Output store (HDF5).
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub split: SplitArgs,
    /// Use at most this many prompts (the first ones of the split).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Rollouts per prompt (useful with sampling).
    #[arg(long, default_value_t = 1)]
    pub samples_per_prompt: usize,
    /// Take every N-th record starting at K (0-based), for N machines writing one store each.
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<Shard>,
    /// Continue an interrupted run with the same flags.
    #[arg(long)]
    pub resume: bool,
    /// Precision of the stored states.
    #[arg(long, value_enum, default_value_t = StateDtypeArg::F32)]
    pub state_dtype: StateDtypeArg,
    /// Rollouts per crash-safe part (rounded up to whole batches); a crash loses at most one part.
    #[arg(long, default_value_t = 256)]
    pub rollouts_per_part: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub generation: GenerationArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// Stores to join, in this order.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The merged store.
    #[arg(long)]
    pub out: PathBuf,
}

impl RolloutCommand {
    pub fn run(self) -> Result<()> {
        match self.merge {
            Some(RolloutSubcommand::Merge(args)) => args.run(),
            None => self.run.run(),
        }
    }
}

impl MergeArgs {
    fn run(self) -> Result<()> {
        if self.out.exists() {
            anyhow::bail!(
                "--out {}: exists; remove it or choose another name",
                self.out.display()
            );
        }
        let inputs: Vec<&std::path::Path> = self.inputs.iter().map(PathBuf::as_path).collect();
        let n = recontrol_data::store::merge(&inputs, &self.out)?;
        eprintln!(
            "merged {} stores: {n} rollouts in {}",
            inputs.len(),
            self.out.display()
        );
        Ok(())
    }
}

/// Generates rollouts with the LM, recording the state of every step.
struct LmSource<'a> {
    lm: &'a LanguageModel,
    config: GenerationConfig,
    /// False for chat-template text, which carries its own special tokens.
    add_special_tokens: bool,
    /// Prompts whose oldest tokens were dropped to fit the model's positions.
    truncated: usize,
}

impl RolloutSource for LmSource<'_> {
    fn generate(
        &mut self,
        prompts: &[PlannedPrompt],
        first_row: u64,
    ) -> Result<Vec<Rollout>, Box<dyn std::error::Error + Send + Sync>> {
        let mut ids = Vec::with_capacity(prompts.len());
        for p in prompts {
            let (prompt_ids, truncated) = self.lm.encode_prompt(
                &p.text,
                self.config.max_new_tokens,
                self.add_special_tokens,
            )?;
            self.truncated += usize::from(truncated);
            ids.push(prompt_ids);
        }
        let mut config = self.config.clone();
        config.first_row = first_row;
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

impl RolloutArgs {
    fn run(self) -> Result<()> {
        let (Some(model_dir), Some(dataset_path), Some(out)) =
            (&self.model, &self.dataset, &self.out)
        else {
            anyhow::bail!("--model, --dataset and --out are required");
        };
        self.generation.sampling()?;
        if self.samples_per_prompt == 0 {
            anyhow::bail!("--samples-per-prompt must be at least 1");
        }
        let dataset = self.data.read(dataset_path)?;
        if dataset.report.skipped_malformed > 0 {
            eprintln!(
                "skipped {} malformed lines of {}",
                dataset.report.skipped_malformed,
                dataset_path.display()
            );
        }
        let mut records = self.split.select(&dataset.prompts)?;
        if let Some(limit) = self.limit {
            records.truncate(limit);
        }
        if let Some(shard) = self.shard {
            records = records
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % shard.count == shard.index)
                .map(|(_, r)| r)
                .collect();
        }
        if records.is_empty() {
            anyhow::bail!(
                "--dataset {}: no prompts left after --split/--limit/--shard",
                dataset_path.display()
            );
        }

        eprintln!("loading {}", model_dir.display());
        let lm = LanguageModel::load(model_dir, self.device.device, self.device.dtype.into())
            .with_context(|| format!("--model {}", model_dir.display()))?;
        let config = self.generation.config(&lm)?;
        let mut prompts = Vec::with_capacity(records.len() * self.samples_per_prompt);
        for r in &records {
            let text = self.prompt.render(r, &lm.tokenizer)?;
            for _ in 0..self.samples_per_prompt {
                prompts.push(PlannedPrompt {
                    prompt_index: r.index as i64,
                    text: text.clone(),
                });
            }
        }
        let batch = self.generation.batch_size;
        let plan = RolloutPlan {
            meta: StoreMeta {
                hidden_size: lm.model.config().hidden_size,
                model: model_dir.display().to_string(),
                model_hash: lm.identity.clone(),
                state_dtype: match self.state_dtype {
                    StateDtypeArg::F32 => StateDtype::F32,
                    StateDtypeArg::F16 => StateDtype::F16,
                },
                prompt_format: recontrol_data::PromptFormat::from(self.prompt.prompt_format)
                    .as_str()
                    .to_owned(),
                generation: serde_json::to_value(&self.generation)?,
                seed: self.generation.seed,
                recontrol_version: env!("CARGO_PKG_VERSION").to_owned(),
                dataset: dataset_path.display().to_string(),
            },
            prompts,
            batch_size: batch,
            rollouts_per_part: self.rollouts_per_part.max(1).div_ceil(batch) * batch,
        };

        let progress = ProgressBar::new(plan.prompts.len() as u64).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} rollouts  {elapsed} (eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let start = Instant::now();
        let mut source = LmSource {
            lm: &lm,
            config,
            add_special_tokens: self.prompt.prompt_format
                != crate::args::PromptFormatArg::ChatTemplate,
            truncated: 0,
        };
        let summary = job::run(&plan, out, self.resume, &mut source, &mut |done, _| {
            progress.set_position(done as u64)
        })
        .with_context(|| format!("--out {}", out.display()))?;
        progress.finish_and_clear();
        if source.truncated > 0 {
            eprintln!(
                "{} prompts were longer than the model's positions allow with --max-new-tokens {}: their oldest tokens were dropped",
                source.truncated, self.generation.max_new_tokens
            );
        }
        let seconds = start.elapsed().as_secs_f64();
        let store = recontrol_data::Store::open(out)?;
        let states = store.num_states();
        let bytes = recontrol_data::store::file_size(out);
        eprintln!(
            "{} rollouts, {states} states in {seconds:.1} s ({:.0} states/s, {:.0} bytes/state){}",
            summary.rollouts,
            states as f64 / seconds.max(1e-9),
            bytes as f64 / states.max(1) as f64,
            if summary.parts_reused > 0 {
                format!("; resumed: {} parts kept", summary.parts_reused)
            } else {
                String::new()
            }
        );
        write_json_atomic(
            &config_path(out),
            &RunRecord {
                command: "rollout",
                args: &self,
                prompts: plan.prompts.len(),
                provenance: provenance(),
            },
        )?;
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct RunRecord<'a> {
    command: &'static str,
    args: &'a RolloutArgs,
    prompts: usize,
    provenance: Provenance,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse() {
        assert_eq!(parse_shard("0/3"), Ok(Shard { index: 0, count: 3 }));
        assert!(parse_shard("3/3").is_err());
        assert!(parse_shard("1").is_err());
        assert!(parse_shard("a/2").is_err());
    }
}
