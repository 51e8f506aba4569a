//! `recontrol reward`: train a Bradley-Terry reward model, score generations, label rollouts.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use recontrol_data::{read_generations, PromptFormat, Store};
use recontrol_io::{Provenance, WorkDirs};
use recontrol_lm::LanguageModel;
use recontrol_reward_model::stage::{
    epoch_scalars, label_start, label_store, prepare_training_pairs, train_reward, LabelMode,
    RewardOutcome, RewardSettings, RewardSummary,
};
use recontrol_reward_model::train::{EpochMetrics, RewardTrainConfig, RunControl};
use recontrol_reward_model::{load_reward, Partition, RewardModel};
use serde::Serialize;

use crate::args::{DatasetArgs, DeviceArgs, EpochRunArgs};
use crate::output::{jsonl_out, provenance};

/// Reward models and rewards.
#[derive(Debug, Args)]
pub struct RewardCommand {
    #[command(subcommand)]
    pub command: RewardSubcommand,
}

#[derive(Debug, Subcommand)]
pub enum RewardSubcommand {
    /// Train a reward model (backbone + scalar head) on preference pairs (Bradley-Terry).
    Train(Box<TrainArgs>),
    /// Add a `reward` to every record of a generations JSONL (fields prompt, response).
    Score(ScoreArgs),
    /// Fill the `reward` of every rollout of a store (resumable).
    Label(LabelArgs),
}

impl RewardCommand {
    pub fn run(self) -> Result<()> {
        match self.command {
            RewardSubcommand::Train(args) => args.run(),
            RewardSubcommand::Score(args) => args.run(),
            RewardSubcommand::Label(args) => args.run(),
        }
    }
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArgs {
    /// Backbone: an HF causal-LM (or sequence-classification) model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Preference pairs: HH-RLHF chosen/rejected by default, other formats via the data flags.
    #[arg(long)]
    pub pairs: PathBuf,
    /// Output reward-model directory (HF LlamaForSequenceClassification layout).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DatasetArgs,
    /// Seed of the train/held-out split of the pairs (the same split as every other stage).
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Share of pairs held out for accuracy.
    #[arg(long, default_value_t = 0.1, value_parser = crate::args::num::fraction, allow_negative_numbers = true)]
    pub test_fraction: f64,
    #[arg(long, default_value_t = RewardTrainConfig::default().epochs, value_parser = crate::args::num::at_least_one)]
    pub epochs: usize,
    #[arg(long, default_value_t = RewardTrainConfig::default().batch_size, value_parser = crate::args::num::at_least_one)]
    pub batch_size: usize,
    #[arg(long, default_value_t = RewardTrainConfig::default().lr, value_parser = crate::args::num::positive, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = RewardTrainConfig::default().min_lr, value_parser = crate::args::num::non_negative, allow_negative_numbers = true)]
    pub min_lr: f64,
    #[arg(long, default_value_t = RewardTrainConfig::default().warmup_steps)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = RewardTrainConfig::default().weight_decay, value_parser = crate::args::num::non_negative, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// L2 penalty on the head, added to the loss (`l2 * ||w||^2`).
    #[arg(long, default_value_t = 0.0, value_parser = crate::args::num::non_negative, allow_negative_numbers = true)]
    pub l2: f64,
    /// Choose --l2 among these (comma-separated) on a validation fifth of the training pairs.
    #[arg(long, value_delimiter = ',')]
    pub l2_candidates: Vec<f64>,
    /// Train the head on standardised features (the training pairs' mean and spread).
    #[arg(long)]
    pub standardize: bool,
    /// Render the pairs' prompts with the model's chat template (an instruct model), as
    /// `rollout --prompt-format chat-template` does.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also train the top K decoder layers and the final norm (0: the head alone, on cached
    /// features of the frozen backbone).
    #[arg(long, default_value_t = 0)]
    pub unfreeze_top_k: usize,
    /// Texts run through the backbone together when computing features.
    #[arg(long, default_value_t = 16, value_parser = crate::args::num::at_least_one)]
    pub feature_batch_size: usize,
    /// Train on at most this many pairs of the train side.
    #[arg(long, value_parser = crate::args::num::at_least_one)]
    pub max_train_pairs: Option<usize>,
    /// Train on part K of N of the training pairs: a partition seeded by --split-seed, so
    /// models trained on different parts saw disjoint pairs (e.g. a policy reward on 1/2 and
    /// an independent judge on 2/2). Applied before --max-train-pairs; the held-out pairs are
    /// the same for every part.
    #[arg(long, value_name = "K/N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<Partition>,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: EpochRunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

/// What `reward_training.json` in the reward-model directory records.
#[derive(Debug, Serialize)]
struct TrainingRecord<'a> {
    args: &'a TrainArgs,
    #[serde(flatten)]
    summary: &'a RewardSummary,
    provenance: Provenance,
}

impl TrainArgs {
    fn settings(&self) -> RewardSettings {
        RewardSettings {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            l2: self.l2,
            l2_candidates: self.l2_candidates.clone(),
            standardize: self.standardize,
            seed: self.seed,
            unfreeze_top_k: self.unfreeze_top_k,
            feature_batch_size: self.feature_batch_size,
            max_train_pairs: self.max_train_pairs,
            partition: self.partition,
            split_seed: self.split_seed,
            test_fraction: self.test_fraction,
        }
    }

    fn run(&self) -> Result<()> {
        // A finished run resumed (a requeued job) does nothing and succeeds.
        if crate::output::already_complete(
            &self.out,
            self.run.resume,
            "reward_training.json",
            "/args",
            self,
        )? {
            return Ok(());
        }
        let settings = self.settings();
        let dirs = WorkDirs::prepare(&self.out, self.run.resume, self.run.logdir.as_deref())?;
        let WorkDirs {
            checkpoint, logdir, ..
        } = dirs.clone();

        let dataset = self.data.read(&self.pairs)?;
        let pairs = dataset.pairs.as_ref().with_context(|| {
            format!(
                "--pairs {}: no chosen/rejected replies in this file",
                self.pairs.display()
            )
        })?;
        eprintln!("loading {}", self.model.display());
        let lm =
            LanguageModel::load_backbone(&self.model, self.device.device, self.device.dtype.into())
                .with_context(|| format!("--model {}", self.model.display()))?;
        let prepared = prepare_training_pairs(
            pairs,
            &settings,
            if self.chat {
                PromptFormat::ChatTemplate
            } else {
                PromptFormat::Raw
            },
            Some(&lm.tokenizer),
        )
        .with_context(|| match settings.partition {
            Some(p) => format!("--pairs {} --partition {p}", self.pairs.display()),
            None => format!("--pairs {}", self.pairs.display()),
        })?;
        if let Some(p) = settings.partition {
            eprintln!(
                "training on part {p} of the training pairs: {} pairs",
                prepared.train.chosen.len()
            );
        }
        if prepared.skipped_empty > 0 {
            eprintln!(
                "skipped {} pairs with an empty reply",
                prepared.skipped_empty
            );
        }

        dirs.create()?;
        let mut tb = tensorboard_rs::summary_writer::SummaryWriter::new(&logdir);
        let progress = ProgressBar::new(settings.epochs as u64).with_style(
            ProgressStyle::with_template("{bar:30} epoch {pos}/{len}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let control = RunControl {
            checkpoint: &checkpoint,
            resume: self.run.resume,
            max_this_run: self.run.max_epochs_per_run,
        };
        let mut on_epoch = |m: &EpochMetrics| {
            for (tag, value) in epoch_scalars(m) {
                tb.add_scalar(tag, value as f32, m.epoch);
            }
            tb.flush();
            progress.set_position(m.epoch as u64);
            progress.set_message(format!(
                "held-out accuracy {:.3}, margin {:.3}",
                m.heldout_accuracy, m.heldout_margin
            ));
        };
        let outcome = train_reward(&lm, None, &prepared, &settings, control, &mut on_epoch)?;
        tb.flush();
        progress.finish_and_clear();
        let (score, summary) = match outcome {
            RewardOutcome::Stopped { epochs_done } => {
                eprintln!(
                    "stopped after epoch {epochs_done} of {}; continue with --resume",
                    settings.epochs
                );
                return Ok(());
            }
            RewardOutcome::Complete { score, summary } => (score, summary),
        };
        let record = serde_json::to_value(TrainingRecord {
            args: self,
            summary: &summary,
            provenance: provenance(),
        })?;
        let model = RewardModel::from_parts(lm, score);
        model.save(&self.out, &[("reward_training.json", record)])?;
        let _ = std::fs::remove_file(&checkpoint);
        println!(
            "held-out pair accuracy {:.3} (length-only baseline {:.3}) on {} pairs; wrote {}",
            summary.heldout_accuracy,
            summary.length_baseline_accuracy,
            summary.heldout_pairs,
            self.out.display()
        );
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// A reward-model directory or a rules .toml file.
    #[arg(long)]
    pub reward: PathBuf,
    /// Generations: JSONL with `prompt` and `response` fields (e.g. from `recontrol generate`).
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL: each input record with `reward` added (stdout if absent).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl ScoreArgs {
    fn run(self) -> Result<()> {
        let mut records = read_generations(&self.input)
            .with_context(|| format!("--input {}", self.input.display()))?;
        let pairs: Vec<(String, String)> = records
            .iter()
            .map(|r| (r.prompt.clone(), r.response.clone()))
            .collect();
        let mut reward = load_reward(&self.reward, self.device.device)
            .with_context(|| format!("--reward {}", self.reward.display()))?;
        let rewards = reward.score(&pairs)?;
        let mut sink = jsonl_out(self.out.as_deref())?;
        for (record, r) in records.iter_mut().zip(rewards) {
            record.reward = Some(f64::from(r));
            sink.write(record)?;
        }
        sink.finish(&serde_json::json!({
            "command": "reward score",
            "reward": reward.describe(),
            "input": self.input,
            "provenance": provenance(),
        }))?;
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct LabelArgs {
    /// A reward-model directory or a rules .toml file.
    #[arg(long)]
    pub reward: PathBuf,
    /// The rollout store to label (its `reward` dataset is filled in place).
    #[arg(long)]
    pub rollouts: PathBuf,
    /// Relabel a store that is already (partly) labelled.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Finish labelling a partly labelled store (an interrupted label run).
    #[arg(long)]
    pub resume: bool,
    /// Rollouts scored and written at a time.
    #[arg(long, default_value_t = 64, value_parser = crate::args::num::at_least_one)]
    pub chunk: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl LabelArgs {
    fn run(self) -> Result<()> {
        let flag = || format!("--rollouts {}", self.rollouts.display());
        let rewards = Store::open(&self.rollouts).with_context(flag)?.rewards()?;
        let mode = match (self.overwrite, self.resume) {
            (true, _) => LabelMode::Overwrite,
            (false, true) => LabelMode::Resume,
            (false, false) => LabelMode::Fresh,
        };
        let start = label_start(&rewards, mode).with_context(flag)?;
        if start == rewards.len() && mode == LabelMode::Resume {
            // A finished run resumed (a requeued job): the store is not even opened for writing.
            eprintln!(
                "{}: already labelled: nothing to do",
                self.rollouts.display()
            );
            return Ok(());
        }
        let store = Store::open_rw(&self.rollouts).with_context(flag)?;
        let mut reward = load_reward(&self.reward, self.device.device)
            .with_context(|| format!("--reward {}", self.reward.display()))?;
        let progress = ProgressBar::new(rewards.len() as u64).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} rollouts labelled  {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        progress.set_position(start as u64);
        let summary = label_store(&store, reward.as_mut(), start, self.chunk, &mut |done| {
            progress.set_position(done as u64)
        })?;
        progress.finish_and_clear();
        eprintln!(
            "labelled {} rollouts of {} with {} (texts re-tokenised by the reward's own tokenizer)",
            summary.labelled,
            self.rollouts.display(),
            reward.describe()
        );
        Ok(())
    }
}
