//! `recontrol export`: a value directory as ONNX artifacts (value, value + gradient, controller
//! step), and `recontrol export inspect` to read a model's interface and metadata.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use recontrol_export::{inspect, write_export, ControllerSpec, Producer, ValueDir};

use crate::output::provenance;

/// Export a value head as ONNX, or inspect an ONNX file.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ExportCommand {
    #[command(subcommand)]
    pub command: Option<ExportSubcommand>,
    #[command(flatten)]
    pub export: ExportArgs,
}

#[derive(Debug, Subcommand)]
pub enum ExportSubcommand {
    /// Print an ONNX file's inputs, outputs and metadata (JSON).
    Inspect(InspectArgs),
}

impl ExportCommand {
    pub fn run(self) -> Result<()> {
        match self.command {
            Some(ExportSubcommand::Inspect(args)) => args.run(),
            None => self.export.run(),
        }
    }
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A value directory (config.json + model.safetensors).
    #[arg(long, required = true)]
    pub value: Option<PathBuf>,
    /// Output directory (value.onnx, value_grad.onnx, controller.onnx, manifest.json).
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Gradient steps per decoding step in controller.onnx (the paper: 30 on HH-RLHF).
    #[arg(long, default_value_t = 30, value_parser = crate::args::num::at_least_one)]
    pub steps: usize,
    /// The default step size recorded with the artifacts (alpha is an input of
    /// controller.onnx; the paper: 0.5).
    #[arg(long, default_value_t = 0.5, value_parser = crate::args::num::finite_f32, allow_negative_numbers = true)]
    pub alpha: f32,
    /// Bound each row's total edit ||h_edited - h||_2 (projected after every step).
    #[arg(long, value_parser = crate::args::num::positive_f32, allow_negative_numbers = true)]
    pub max_edit_norm: Option<f32>,
}

impl ExportArgs {
    fn run(self) -> Result<()> {
        let (Some(value), Some(out)) = (self.value, self.out) else {
            anyhow::bail!("--value and --out are required");
        };
        if !(self.alpha.is_finite()) {
            anyhow::bail!("--alpha must be finite, got {}", self.alpha);
        }
        if let Some(e) = self.max_edit_norm {
            if !(e.is_finite() && e > 0.0) {
                anyhow::bail!("--max-edit-norm must be positive and finite, got {e}");
            }
        }
        let dir = ValueDir::read(&value).with_context(|| format!("--value {}", value.display()))?;
        let provenance = provenance();
        let spec = ControllerSpec {
            steps: self.steps,
            alpha: self.alpha,
            max_edit_norm: self.max_edit_norm,
        };
        let producer = Producer::from(&provenance);
        let manifest = write_export(&dir, &out, &spec, &producer)
            .with_context(|| format!("--out {}", out.display()))?;
        let files = manifest
            .files
            .iter()
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "wrote {} ({files}, manifest.json): hidden {}, {} steps, alpha {}",
            out.display(),
            dir.config.input_dim,
            self.steps,
            self.alpha
        );
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An ONNX file.
    pub file: PathBuf,
}

impl InspectArgs {
    fn run(self) -> Result<()> {
        let summary = inspect(&self.file)?;
        println!("{}", serde_json::to_string_pretty(&summary)?);
        Ok(())
    }
}
