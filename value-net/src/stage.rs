//! The value stage as a library call: train a value MLP on a labelled rollout store with the
//! Bellman loss and make the value directory's model (weights + `config.json` with the source
//! LM's identity, the normalisation and how it was trained).

use std::path::Path;

use recontrol_data::Store;
use recontrol_export::Producer;
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::train::{train_value, EpochMetrics, RunControl, ValueTrainConfig};
use crate::{Activation, Error, Result, Target, ValueConfig, ValueModel};

/// How a value net is trained. The defaults are `recontrol value train`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValueSettings {
    /// Hidden layers (the paper: 1 hidden layer as wide as the LM, or 2).
    pub layers: usize,
    /// Width of each hidden layer.
    pub hidden: usize,
    pub activation: Activation,
    pub target: Target,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    /// Share of rollouts held out for validation.
    pub val_fraction: f64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    pub seed: u64,
}

impl Default for ValueSettings {
    fn default() -> Self {
        Self {
            layers: 1,
            hidden: 256,
            activation: Activation::Relu,
            target: Target::Td0,
            epochs: 50,
            lr: 1e-3,
            batch_size: 512,
            val_fraction: 0.1,
            patience: 5,
            seed: 0,
        }
    }
}

impl ValueSettings {
    /// The training run's configuration (what checkpoints record).
    pub fn config(&self) -> ValueTrainConfig {
        ValueTrainConfig {
            hidden_dims: vec![self.hidden; self.layers],
            activation: self.activation,
            target: self.target,
            epochs: self.epochs,
            lr: self.lr,
            batch_size: self.batch_size,
            val_fraction: self.val_fraction,
            patience: self.patience,
            seed: self.seed,
            ..ValueTrainConfig::default()
        }
    }
}

/// An epoch's metrics as TensorBoard scalars (tag, value).
pub fn epoch_scalars(m: &EpochMetrics) -> [(&'static str, f64); 5] {
    [
        ("value/train_loss", m.train_loss),
        ("value/val_loss", m.val_loss),
        ("value/terminal_mse", m.terminal_mse),
        ("value/spearman_v0_reward", m.spearman),
        ("value/transitions_per_s", m.transitions_per_s),
    ]
}

/// What `config.json`'s `training` records of a run.
#[derive(Debug, Clone, Serialize)]
struct TrainingRecord<'a, A: Serialize> {
    args: &'a A,
    config: &'a ValueTrainConfig,
    rollouts: &'a Path,
    best_epoch: usize,
    history: &'a [EpochMetrics],
}

/// A training call's outcome: the model of the best validation epoch, or a run stopped at
/// its epoch cap (a checkpoint is kept to resume from).
#[derive(Debug)]
pub enum ValueOutcome {
    Complete {
        model: Box<ValueModel>,
        /// The best epoch's metrics.
        best: EpochMetrics,
    },
    Stopped {
        epochs_done: usize,
    },
}

/// Trains a value net on the labelled store at `rollouts` (opened as `store`) with
/// `settings`; `args` (the caller's resolved settings, e.g. command-line flags) is recorded
/// in the model's `training` with the run's history. `on_epoch` sees each epoch.
#[allow(clippy::too_many_arguments)]
pub fn train_value_model<A: Serialize>(
    store: &Store,
    rollouts: &Path,
    settings: &ValueSettings,
    args: &A,
    device: Device,
    control: RunControl<'_>,
    producer: &Producer,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<ValueOutcome> {
    if !(0.0..1.0).contains(&settings.val_fraction) {
        return Err(Error::ValFraction(settings.val_fraction));
    }
    settings.target.check()?;
    let config = settings.config();
    let trained = train_value(store, &config, device, control, on_epoch)?;
    if !trained.complete {
        return Ok(ValueOutcome::Stopped {
            epochs_done: trained.history.len(),
        });
    }
    let best = trained.history[trained.best_epoch.saturating_sub(1)];
    let training = serde_json::to_value(TrainingRecord {
        args,
        config: &config,
        rollouts,
        best_epoch: trained.best_epoch,
        history: &trained.history,
    })?;
    let meta = store.meta();
    let model = ValueModel {
        config: ValueConfig {
            input_dim: meta.hidden_size,
            hidden_dims: config.hidden_dims.clone(),
            activation: config.activation,
            reward_mean: trained.reward_mean,
            reward_std: trained.reward_std,
            lm_hidden_size: meta.hidden_size,
            lm_identity: meta.model_hash.clone(),
            target: Some(config.target),
            training,
            seed: settings.seed,
            git_revision: producer.git_revision.clone(),
            recontrol_version: producer.recontrol_version.clone(),
        },
        mlp: trained.mlp,
    };
    Ok(ValueOutcome::Complete {
        model: Box::new(model),
        best,
    })
}
