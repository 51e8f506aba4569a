//! `recontrol reward`: train a Bradley-Terry reward model, score generations, label rollouts.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use recontrol_data::{PromptFormat, Split, SplitSpec, Store};
use recontrol_io::{Provenance, WorkDirs};
use recontrol_lm::LanguageModel;
use recontrol_reward_model::train::{
    length_baseline_accuracy, pair_features, train_head, train_top_k, EpochMetrics, PairTexts,
    RewardTrainConfig, RunControl,
};
use recontrol_reward_model::{load_reward, scored_text, RewardModel};
use serde::Serialize;
use serde_json::Value;

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
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f64,
    #[arg(long, default_value_t = RewardTrainConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = RewardTrainConfig::default().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = RewardTrainConfig::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = RewardTrainConfig::default().min_lr)]
    pub min_lr: f64,
    #[arg(long, default_value_t = RewardTrainConfig::default().warmup_steps)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = RewardTrainConfig::default().weight_decay)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also train the top K decoder layers and the final norm (0: the head alone, on cached
    /// features of the frozen backbone).
    #[arg(long, default_value_t = 0)]
    pub unfreeze_top_k: usize,
    /// Texts run through the backbone together when computing features.
    #[arg(long, default_value_t = 16)]
    pub feature_batch_size: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: EpochRunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Serialize)]
struct TrainingRecord<'a> {
    args: &'a TrainArgs,
    backbone_identity: &'a str,
    train_pairs: usize,
    heldout_pairs: usize,
    skipped_empty: usize,
    history: &'a [EpochMetrics],
    heldout_accuracy: f64,
    length_baseline_accuracy: f64,
    provenance: Provenance,
}

impl TrainArgs {
    fn run(&self) -> Result<()> {
        if self.out.exists() {
            anyhow::bail!(
                "--out {}: exists; remove it or choose another name",
                self.out.display()
            );
        }
        let config = RewardTrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            seed: self.seed,
        };
        let WorkDirs {
            checkpoint, logdir, ..
        } = WorkDirs::prepare(&self.out, self.run.resume, self.run.logdir.as_deref())?;

        let dataset = self.data.read(&self.pairs)?;
        let pairs = dataset.pairs.as_ref().with_context(|| {
            format!(
                "--pairs {}: no chosen/rejected replies in this file",
                self.pairs.display()
            )
        })?;
        let split = SplitSpec {
            seed: self.split_seed,
            test_fraction: self.test_fraction,
        };
        let (mut train, mut heldout) = (PairTexts::default(), PairTexts::default());
        // Replies alone, for the length-only baseline: (chosen, rejected) per side.
        let (mut train_replies, mut heldout_replies) =
            ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        let mut skipped_empty = 0;
        for pair in pairs {
            if pair.chosen.is_empty() || pair.rejected.is_empty() {
                skipped_empty += 1;
                continue;
            }
            let prompt = recontrol_data::render_prompt(PromptFormat::Raw, &pair.prompt, None, None)
                .map_err(anyhow::Error::msg)?;
            let (side, replies) = if split.side_of(&pair.prompt.raw) == Split::Test {
                (&mut heldout, &mut heldout_replies)
            } else {
                (&mut train, &mut train_replies)
            };
            side.chosen
                .push(scored_text(&prompt, &format!(" {}", pair.chosen)));
            side.rejected
                .push(scored_text(&prompt, &format!(" {}", pair.rejected)));
            replies.0.push(pair.chosen.clone());
            replies.1.push(pair.rejected.clone());
        }
        if skipped_empty > 0 {
            eprintln!("skipped {skipped_empty} pairs with an empty reply");
        }
        if train.chosen.is_empty() || heldout.chosen.is_empty() {
            anyhow::bail!(
                "--pairs {}: {} training and {} held-out pairs; both sides need some",
                self.pairs.display(),
                train.chosen.len(),
                heldout.chosen.len()
            );
        }

        eprintln!("loading {}", self.model.display());
        let lm =
            LanguageModel::load_backbone(&self.model, self.device.device, self.device.dtype.into())
                .with_context(|| format!("--model {}", self.model.display()))?;

        let mut tb = tensorboard_rs::summary_writer::SummaryWriter::new(&logdir);
        let progress = ProgressBar::new(config.epochs as u64).with_style(
            ProgressStyle::with_template("{bar:30} epoch {pos}/{len}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let control = RunControl {
            checkpoint: &checkpoint,
            resume: self.run.resume,
            max_this_run: self.run.max_epochs_per_run,
        };
        let mut on_epoch = |m: &EpochMetrics| {
            tb.add_scalar("reward/train_loss", m.train_loss as f32, m.epoch);
            tb.add_scalar("reward/heldout_loss", m.heldout_loss as f32, m.epoch);
            tb.add_scalar(
                "reward/heldout_accuracy",
                m.heldout_accuracy as f32,
                m.epoch,
            );
            tb.add_scalar("reward/heldout_margin", m.heldout_margin as f32, m.epoch);
            tb.add_scalar("reward/lr", m.lr as f32, m.epoch);
            tb.flush();
            progress.set_position(m.epoch as u64);
            progress.set_message(format!(
                "held-out accuracy {:.3}, margin {:.3}",
                m.heldout_accuracy, m.heldout_margin
            ));
        };
        let trained = if self.unfreeze_top_k == 0 {
            eprintln!(
                "features of {} training and {} held-out pairs",
                train.chosen.len(),
                heldout.chosen.len()
            );
            let train_features = pair_features(&lm, &train, self.feature_batch_size)?;
            let heldout_features = pair_features(&lm, &heldout, self.feature_batch_size)?;
            train_head(
                &train_features,
                &heldout_features,
                &config,
                control,
                &mut on_epoch,
            )?
        } else {
            train_top_k(
                &lm,
                self.unfreeze_top_k,
                &train,
                &heldout,
                &config,
                control,
                &mut on_epoch,
            )?
        };
        tb.flush();
        progress.finish_and_clear();
        if !trained.complete {
            eprintln!(
                "stopped after epoch {} of {}; continue with --resume",
                trained.history.len(),
                config.epochs
            );
            return Ok(());
        }
        let accuracy = trained.history.last().map_or(0.0, |m| m.heldout_accuracy);
        let baseline = length_baseline_accuracy(
            (&train_replies.0, &train_replies.1),
            (&heldout_replies.0, &heldout_replies.1),
        );
        let identity = lm.identity.clone();
        let record = serde_json::to_value(TrainingRecord {
            args: self,
            backbone_identity: &identity,
            train_pairs: train.chosen.len(),
            heldout_pairs: heldout.chosen.len(),
            skipped_empty,
            history: &trained.history,
            heldout_accuracy: accuracy,
            length_baseline_accuracy: baseline,
            provenance: provenance(),
        })?;
        let model = RewardModel::from_parts(lm, trained.score);
        model.save(&self.out, &[("reward_training.json", record)])?;
        let _ = std::fs::remove_file(&checkpoint);
        println!(
            "held-out pair accuracy {accuracy:.3} (length-only baseline {baseline:.3}) on {} pairs; wrote {}",
            heldout.chosen.len(),
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
        let file = std::fs::File::open(&self.input)
            .with_context(|| format!("--input {}", self.input.display()))?;
        let mut records: Vec<serde_json::Map<String, Value>> = Vec::new();
        let mut pairs = Vec::new();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("--input {}", self.input.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let record: serde_json::Map<String, Value> =
                serde_json::from_str(&line).with_context(|| {
                    format!(
                        "--input {}:{}: malformed JSON object",
                        self.input.display(),
                        i + 1
                    )
                })?;
            let field = |name: &str| -> Result<String> {
                record
                    .get(name)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .with_context(|| {
                        format!(
                            "--input {}:{}: no string field {name:?}",
                            self.input.display(),
                            i + 1
                        )
                    })
            };
            pairs.push((field("prompt")?, field("response")?));
            records.push(record);
        }
        let mut reward = load_reward(&self.reward, self.device.device)
            .with_context(|| format!("--reward {}", self.reward.display()))?;
        let rewards = reward.score(&pairs)?;
        let mut sink = jsonl_out(self.out.as_deref())?;
        for (mut record, r) in records.into_iter().zip(rewards) {
            record.insert("reward".into(), Value::from(r));
            sink.write(&record)?;
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
    #[arg(long, default_value_t = 64)]
    pub chunk: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl LabelArgs {
    fn run(self) -> Result<()> {
        let store = Store::open_rw(&self.rollouts)
            .with_context(|| format!("--rollouts {}", self.rollouts.display()))?;
        let rewards = store.rewards()?;
        let labelled = rewards.iter().filter(|r| !r.is_nan()).count();
        let n = rewards.len();
        let start = if self.overwrite {
            0
        } else if labelled == n && n > 0 {
            anyhow::bail!(
                "--rollouts {}: already labelled; pass --overwrite to relabel",
                self.rollouts.display()
            );
        } else if labelled > 0 && !self.resume {
            anyhow::bail!(
                "--rollouts {}: partly labelled ({labelled} of {n}); pass --resume to finish or --overwrite to relabel",
                self.rollouts.display()
            );
        } else {
            // Labelling goes in order: resume at the first unlabelled rollout.
            rewards.iter().position(|r| r.is_nan()).unwrap_or(n)
        };
        let mut reward = load_reward(&self.reward, self.device.device)
            .with_context(|| format!("--reward {}", self.reward.display()))?;
        let texts = store.texts()?;
        let progress = ProgressBar::new(n as u64).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} rollouts labelled  {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        progress.set_position(start as u64);
        let mut at = start;
        for chunk in texts[start..].chunks(self.chunk.max(1)) {
            let scores = reward.score(chunk)?;
            store.write_rewards(at, &scores)?;
            at += chunk.len();
            progress.set_position(at as u64);
        }
        progress.finish_and_clear();
        eprintln!(
            "labelled {} rollouts of {} with {} (texts re-tokenised by the reward's own tokenizer)",
            n - start,
            self.rollouts.display(),
            reward.describe()
        );
        Ok(())
    }
}
