//! `recontrol demo`: the whole RE-Control pipeline on the embedded default, one command. The
//! chain of stages lives in `recontrol_demo`; this reads the configuration (`cli/demo.toml`,
//! embedded, or `--config`), runs it and prints the reports' tables.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use recontrol_demo::{run_demo, DemoConfig, DemoRun};

use crate::args::DeviceArgs;
use crate::output::provenance;

/// The default configuration (under version control as `cli/demo.toml`).
const DEFAULT_CONFIG: &str = include_str!("../demo.toml");

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output folder: every artifact, logs/ (TensorBoard), report/ and report-ood/.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// A stage configuration (default: the embedded cli/demo.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// ONNX Runtime library for the RE-Control stages (default: $ORT_DYLIB_PATH, then the
    /// project venv).
    #[arg(long)]
    pub onnxruntime: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl DemoArgs {
    pub fn run(self) -> Result<()> {
        let (text, name) = match &self.config {
            Some(p) => (
                std::fs::read_to_string(p).with_context(|| format!("--config {}", p.display()))?,
                p.display().to_string(),
            ),
            None => (DEFAULT_CONFIG.to_owned(), "(embedded)".to_owned()),
        };
        let config =
            DemoConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("--config {name}: {e}"))?;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("--out {}", self.out.display()))?;
        let provenance = provenance();
        let run = DemoRun {
            out: &self.out,
            device: self.device.device,
            provenance: &provenance,
            onnxruntime: self.onnxruntime.clone(),
        };
        let outcome = run_demo(&config, &run)?;
        for (title, report) in [
            ("HH-RLHF (held-out test prompts)", &outcome.hh),
            ("HarmfulQA (out of distribution)", &outcome.ood),
        ] {
            println!(
                "{title}\n{}",
                recontrol_eval::report::table(&report.methods)
            );
        }
        println!(
            "demo complete in {:.0} s: {} (TensorBoard: {})",
            outcome.seconds,
            self.out.join("report/report.md").display(),
            self.out.join("logs").display()
        );
        Ok(())
    }
}
