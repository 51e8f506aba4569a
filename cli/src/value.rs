//! `recontrol value`: train a value net on a labelled rollout store, and evaluate one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use recontrol_data::Store;
use recontrol_export::Producer;
use recontrol_io::WorkDirs;
use recontrol_value_net::stage::{epoch_scalars, train_value_model, ValueOutcome, ValueSettings};
use recontrol_value_net::train::{
    check_labelled, evaluate, EpochMetrics, RunControl, ValueTrainConfig,
};
use recontrol_value_net::{Activation, Target, ValueModel};
use serde::Serialize;

use crate::args::{DeviceArgs, EpochRunArgs};
use crate::output::provenance;

/// Value functions on hidden states.
#[derive(Debug, Args)]
pub struct ValueCommand {
    #[command(subcommand)]
    pub command: ValueSubcommand,
}

#[derive(Debug, Subcommand)]
pub enum ValueSubcommand {
    /// Train a value MLP with the Bellman loss on a labelled rollout store.
    Train(Box<TrainArgs>),
    /// Validation metrics of a value net on a labelled store.
    Eval(EvalArgs),
}

impl ValueCommand {
    pub fn run(self) -> Result<()> {
        match self.command {
            ValueSubcommand::Train(args) => args.run(),
            ValueSubcommand::Eval(args) => args.run(),
        }
    }
}

/// `--activation` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationArg {
    Relu,
    Tanh,
    Gelu,
    Silu,
}

impl From<ActivationArg> for Activation {
    fn from(a: ActivationArg) -> Self {
        match a {
            ActivationArg::Relu => Self::Relu,
            ActivationArg::Tanh => Self::Tanh,
            ActivationArg::Gelu => Self::Gelu,
            ActivationArg::Silu => Self::Silu,
        }
    }
}

/// `--target` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetArg {
    /// TD(0): the stop-gradient value of the next state (the paper's Bellman equation).
    Td0,
    /// Monte-Carlo: the rollout's reward.
    Mc,
    /// TD(lambda): the lambda-return (set --lambda); 0 is TD(0), 1 Monte-Carlo.
    Lambda,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArgs {
    /// A labelled rollout store.
    #[arg(long)]
    pub rollouts: PathBuf,
    /// Output value directory (config.json + model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Hidden layers (the paper: 1 hidden layer as wide as the LM, or 2).
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    /// Width of each hidden layer.
    #[arg(long, default_value_t = 256, value_parser = crate::args::num::at_least_one)]
    pub hidden: usize,
    #[arg(long, value_enum, default_value_t = ActivationArg::Relu)]
    pub activation: ActivationArg,
    #[arg(long, value_enum, default_value_t = TargetArg::Td0)]
    pub target: TargetArg,
    /// Lambda of `--target lambda`, in [0, 1].
    #[arg(long, default_value_t = 0.9, value_parser = crate::args::num::unit, allow_negative_numbers = true)]
    pub lambda: f64,
    #[arg(long, default_value_t = 50, value_parser = crate::args::num::at_least_one)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1e-3, value_parser = crate::args::num::positive, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = 512, value_parser = crate::args::num::at_least_one)]
    pub batch_size: usize,
    /// Share of rollouts held out for validation.
    #[arg(long, default_value_t = 0.1, value_parser = crate::args::num::fraction, allow_negative_numbers = true)]
    pub val_fraction: f64,
    /// Epochs without a better validation loss before stopping.
    #[arg(long, default_value_t = 5)]
    pub patience: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: EpochRunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

impl TrainArgs {
    fn settings(&self) -> ValueSettings {
        ValueSettings {
            layers: self.layers,
            hidden: self.hidden,
            activation: self.activation.into(),
            target: match self.target {
                TargetArg::Td0 => Target::Td0,
                TargetArg::Mc => Target::Mc,
                TargetArg::Lambda => Target::Lambda(self.lambda),
            },
            epochs: self.epochs,
            lr: self.lr,
            batch_size: self.batch_size,
            val_fraction: self.val_fraction,
            patience: self.patience,
            seed: self.seed,
        }
    }

    fn run(&self) -> Result<()> {
        // A finished run resumed (a requeued job) does nothing and succeeds.
        if crate::output::already_complete(
            &self.out,
            self.run.resume,
            "config.json",
            "/training/args",
            self,
        )? {
            return Ok(());
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            anyhow::bail!(
                "--val-fraction must be in [0, 1), got {}",
                self.val_fraction
            );
        }
        if self.target == TargetArg::Lambda {
            Target::Lambda(self.lambda)
                .check()
                .map_err(|e| anyhow::anyhow!("--lambda: {e}"))?;
        }
        let dirs = WorkDirs::prepare(&self.out, self.run.resume, self.run.logdir.as_deref())?;
        let WorkDirs {
            checkpoint, logdir, ..
        } = dirs.clone();
        let store = Store::open(&self.rollouts)
            .with_context(|| format!("--rollouts {}", self.rollouts.display()))?;
        recontrol_value_net::train::check_labelled(&store)
            .with_context(|| format!("--rollouts {}", self.rollouts.display()))?;
        let device = self.device.device.resolve()?;
        let provenance = provenance();
        let producer = Producer::from(&provenance);
        dirs.create()?;
        let mut tb = tensorboard_rs::summary_writer::SummaryWriter::new(&logdir);
        let outcome = train_value_model(
            &store,
            &self.rollouts,
            &self.settings(),
            self,
            device,
            RunControl {
                checkpoint: &checkpoint,
                resume: self.run.resume,
                max_this_run: self.run.max_epochs_per_run,
            },
            &producer,
            &mut |m: &EpochMetrics| {
                for (tag, value) in epoch_scalars(m) {
                    tb.add_scalar(tag, value as f32, m.epoch);
                }
                tb.flush();
                eprintln!(
                    "epoch {}: train {:.4}, val {:.4}, terminal MSE {:.4}, Spearman {:.3}, {:.0} transitions/s",
                    m.epoch, m.train_loss, m.val_loss, m.terminal_mse, m.spearman, m.transitions_per_s
                );
            },
        )
        .with_context(|| format!("--rollouts {}", self.rollouts.display()))?;
        tb.flush();
        let (model, best) = match outcome {
            ValueOutcome::Stopped { epochs_done } => {
                eprintln!("stopped after epoch {epochs_done}; continue with --resume");
                return Ok(());
            }
            ValueOutcome::Complete { model, best } => (model, best),
        };
        model.save(&self.out)?;
        let _ = std::fs::remove_file(&checkpoint);
        println!(
            "best epoch {}: validation loss {:.4}, terminal MSE {:.4}, Spearman(V(s_0), r) {:.3}; wrote {}",
            best.epoch,
            best.val_loss,
            best.terminal_mse,
            best.spearman,
            self.out.display()
        );
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A value directory.
    #[arg(long)]
    pub value: PathBuf,
    /// A labelled rollout store (every rollout is evaluated).
    #[arg(long)]
    pub rollouts: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl EvalArgs {
    fn run(self) -> Result<()> {
        let device = self.device.device.resolve()?;
        let model = ValueModel::load(&self.value, device)
            .with_context(|| format!("--value {}", self.value.display()))?;
        let store = Store::open(&self.rollouts)
            .with_context(|| format!("--rollouts {}", self.rollouts.display()))?;
        if store.meta().hidden_size != model.config.input_dim {
            anyhow::bail!(
                "--value {} takes hidden size {}, but --rollouts {} holds states of {}",
                self.value.display(),
                model.config.input_dim,
                self.rollouts.display(),
                store.meta().hidden_size
            );
        }
        let rewards = check_labelled(&store)?;
        let all = vec![true; rewards.len()];
        // The Bellman loss with the target the net was trained with.
        let target = model
            .config
            .trained_target(&self.value.join("config.json"))
            .with_context(|| format!("--value {}", self.value.display()))?;
        let config = ValueTrainConfig {
            activation: model.config.activation,
            target,
            ..ValueTrainConfig::default()
        };
        let (loss, terminal_mse, rho) = evaluate(
            &store,
            &model.mlp,
            &all,
            (model.config.reward_mean, model.config.reward_std),
            &config,
            device,
        )?;
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "rollouts": rewards.len(),
                "bellman_loss": loss,
                "target": target,
                "terminal_mse": terminal_mse,
                "spearman_v0_reward": rho,
            }))?
        );
        Ok(())
    }
}
