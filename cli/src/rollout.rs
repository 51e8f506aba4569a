//! `recontrol rollout`: generate from dataset prompts and store every final hidden state.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use recontrol_data::StateDtype;
use recontrol_io::{config_path, write_json_atomic, Provenance};
use recontrol_lm::LanguageModel;
use recontrol_rollout::{
    collect_rollouts, select_prompts, PromptSelection, RolloutSettings, Shard,
};
use recontrol_slurm::ShardSpec;
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
    #[arg(long, value_parser = crate::args::num::at_least_one)]
    pub limit: Option<usize>,
    /// Rollouts per prompt (useful with sampling).
    #[arg(long, default_value_t = 1, value_parser = crate::args::num::at_least_one)]
    pub samples_per_prompt: usize,
    /// Take every N-th record starting at K (0-based), for N machines writing one store each;
    /// `auto`: this Slurm array task's (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT).
    #[arg(long, value_name = "K/N|auto")]
    pub shard: Option<ShardSpec>,
    /// Continue an interrupted run with the same flags.
    #[arg(long)]
    pub resume: bool,
    /// Precision of the stored states.
    #[arg(long, value_enum, default_value_t = StateDtypeArg::F32)]
    pub state_dtype: StateDtypeArg,
    /// Rollouts per crash-safe part (rounded up to whole batches); a crash loses at most one part.
    #[arg(long, default_value_t = 256, value_parser = crate::args::num::at_least_one)]
    pub rollouts_per_part: usize,
    /// Batch each part's prompts in dataset order rather than by tokenized length (the
    /// store's records and their order are the same either way; sorting pads less).
    #[arg(long)]
    pub keep_prompt_order: bool,
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

impl RolloutArgs {
    /// The library's settings of these flags.
    fn settings(&self) -> RolloutSettings {
        RolloutSettings {
            samples_per_prompt: self.samples_per_prompt,
            state_dtype: match self.state_dtype {
                StateDtypeArg::F32 => StateDtype::F32,
                StateDtypeArg::F16 => StateDtype::F16,
            },
            rollouts_per_part: self.rollouts_per_part,
            prompt_format: self.prompt.prompt_format.into(),
            instruction: self.prompt.instruction().map(str::to_owned),
            decoding: self.generation.settings(),
            sort_by_length: !self.keep_prompt_order,
        }
    }

    /// The checks made before anything is read: flag values, and that the model directory and
    /// the dataset exist (also run by `slurm submit` before it submits).
    pub fn check_inputs(&self) -> Result<()> {
        let (Some(model_dir), Some(dataset_path)) = (&self.model, &self.dataset) else {
            anyhow::bail!("--model, --dataset and --out are required");
        };
        self.generation.sampling()?;
        if self.samples_per_prompt == 0 {
            anyhow::bail!("--samples-per-prompt must be at least 1");
        }
        if !model_dir.join("config.json").is_file() {
            anyhow::bail!(
                "--model {}: not a model directory (no config.json)",
                model_dir.display()
            );
        }
        if !dataset_path.is_file() {
            anyhow::bail!("--dataset {}: no such file", dataset_path.display());
        }
        Ok(())
    }

    fn run(self) -> Result<()> {
        let (Some(model_dir), Some(dataset_path), Some(out)) =
            (&self.model, &self.dataset, &self.out)
        else {
            anyhow::bail!("--model, --dataset and --out are required");
        };
        self.check_inputs()?;
        let dataset = self.data.read(dataset_path)?;
        if dataset.report.skipped_malformed > 0 {
            eprintln!(
                "skipped {} malformed lines of {}",
                dataset.report.skipped_malformed,
                dataset_path.display()
            );
        }
        let shard = self
            .shard
            .map(|spec| spec.resolve(&|name| std::env::var(name).ok()))
            .transpose()?;
        if let (Some(ShardSpec::Auto), Some(s)) = (self.shard, shard) {
            eprintln!(
                "--shard auto: shard {}/{} (Slurm array task)",
                s.index, s.count
            );
        }
        let selection = PromptSelection {
            limit: self.limit,
            shard,
            ..self.split.selection()?
        };
        let records = select_prompts(&dataset, &selection)?;
        if records.is_empty() {
            anyhow::bail!(
                "--dataset {}: no prompts left after --split/--limit/--shard",
                dataset_path.display()
            );
        }

        eprintln!("loading {}", model_dir.display());
        let lm = LanguageModel::load(model_dir, self.device.device, self.device.dtype.into())
            .with_context(|| format!("--model {}", model_dir.display()))?;
        let settings = self.settings();
        let total = records.len() * self.samples_per_prompt;
        let progress = ProgressBar::new(total as u64).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} rollouts  {elapsed} (eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let report = collect_rollouts(
            &lm,
            &records,
            dataset_path,
            &settings,
            out,
            self.resume,
            &mut |done, _| progress.set_position(done as u64),
        )
        .with_context(|| format!("--out {}", out.display()))?;
        progress.finish_and_clear();
        if report.already_complete {
            eprintln!(
                "{}: already complete with these settings ({} rollouts): nothing to do",
                out.display(),
                report.rollouts
            );
            if config_path(out).exists() {
                return Ok(());
            }
        }
        if report.truncated_prompts > 0 {
            eprintln!(
                "{} prompts were longer than the model's positions allow with --max-new-tokens {}: their oldest tokens were dropped",
                report.truncated_prompts, self.generation.max_new_tokens
            );
        }
        eprintln!(
            "{} rollouts, {} states in {:.1} s ({:.0} states/s, {:.0} bytes/state){}",
            report.rollouts,
            report.states,
            report.seconds,
            report.states as f64 / report.seconds.max(1e-9),
            report.bytes as f64 / report.states.max(1) as f64,
            if report.parts_reused > 0 {
                format!("; resumed: {} parts kept", report.parts_reused)
            } else {
                String::new()
            }
        );
        write_json_atomic(
            &config_path(out),
            &RunRecord {
                command: "rollout",
                args: &self,
                shard,
                prompts: total,
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
    /// The shard taken (resolved from the scheduler with `--shard auto`).
    shard: Option<Shard>,
    prompts: usize,
    provenance: Provenance,
}
