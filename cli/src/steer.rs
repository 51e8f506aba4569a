//! `recontrol steer`: static representation editing's steering vector.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use recontrol_controller::SteeringVector;
use recontrol_data::Store;

use crate::output::provenance;

/// Static representation editing (the paper's static RE baseline).
#[derive(Debug, Args)]
pub struct SteerCommand {
    #[command(subcommand)]
    pub command: SteerSubcommand,
}

#[derive(Debug, Subcommand)]
pub enum SteerSubcommand {
    /// Fit a steering vector on a labelled rollout store: the mean state of the top-reward
    /// quantile of rollouts minus that of the bottom quantile, unit-normalised (use it with
    /// `recontrol generate --steer FILE --steer-scale S`).
    Fit(FitArgs),
}

impl SteerCommand {
    pub fn run(self) -> Result<()> {
        match self.command {
            SteerSubcommand::Fit(args) => args.run(),
        }
    }
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// A labelled rollout store (recontrol rollout, then recontrol reward label).
    #[arg(long)]
    pub rollouts: PathBuf,
    /// Output safetensors file (tensor `vector`, provenance in its metadata; written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Fraction of rollouts in each of the top and bottom groups, in (0, 0.5].
    #[arg(long, default_value_t = 0.25, value_parser = crate::args::num::half_quantile, allow_negative_numbers = true)]
    pub quantile: f64,
}

impl FitArgs {
    fn run(self) -> Result<()> {
        if !(self.quantile > 0.0 && self.quantile <= 0.5) {
            anyhow::bail!("--quantile must be in (0, 0.5], got {}", self.quantile);
        }
        let store = Store::open(&self.rollouts)
            .with_context(|| format!("--rollouts {}", self.rollouts.display()))?;
        let mut vector = SteeringVector::fit(&store, self.quantile)
            .with_context(|| format!("--rollouts {}", self.rollouts.display()))?;
        vector.meta.provenance = serde_json::to_value(provenance())?;
        vector
            .save(&self.out)
            .with_context(|| format!("--out {}", self.out.display()))?;
        let m = &vector.meta;
        eprintln!(
            "steering vector from {} rollouts: top {} (mean reward {:.4}, {} states) minus bottom {} \
             (mean reward {:.4}, {} states), difference norm {:.4} -> {}",
            m.rollouts_total,
            m.top_rollouts,
            m.top_reward_mean,
            m.top_states,
            m.bottom_rollouts,
            m.bottom_reward_mean,
            m.bottom_states,
            m.difference_norm,
            self.out.display()
        );
        Ok(())
    }
}
