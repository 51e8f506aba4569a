//! `recontrol data`: look at datasets.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use recontrol_data::selection::{prompt_lines, LineRendering};
use recontrol_data::stats::{DatasetStats, Percentiles};

use crate::args::{DatasetArgs, PromptFormatArg, SplitArgs};
use crate::output::jsonl_out;

/// Look at datasets.
#[derive(Debug, Args)]
pub struct DataCommand {
    #[command(subcommand)]
    pub command: DataSubcommand,
}

#[derive(Debug, Subcommand)]
pub enum DataSubcommand {
    /// Counts (kept, skipped and why) and length percentiles of a dataset file.
    Stats(StatsArgs),
    /// Write a split's prompts as JSONL (`prompt`, `index`, and `reference`: the preferred
    /// response where the data has pairs), for `generate --prompts` and `eval --reference`.
    Prompts(PromptsArgs),
}

#[derive(Debug, Args, serde::Serialize)]
pub struct PromptsArgs {
    /// Dataset file.
    pub file: PathBuf,
    #[command(flatten)]
    #[serde(skip)]
    pub data: DatasetArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub split: SplitArgs,
    /// Keep the first N prompts of the split.
    #[arg(long, value_parser = crate::args::num::at_least_one)]
    pub limit: Option<usize>,
    /// Prompt format (chat templates need a model: use `rollout`/`generate` for those).
    #[arg(long, value_enum, default_value_t = PromptFormatArg::Hh)]
    pub prompt_format: PromptFormatArg,
    /// Output JSONL (atomic, with FILE.config.json); stdout if absent.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl PromptsArgs {
    fn run(self) -> Result<()> {
        let dataset = self.data.read(&self.file)?;
        let selection = recontrol_data::selection::PromptSelection {
            limit: self.limit,
            ..self.split.selection()?
        };
        let rendering = LineRendering::plain(self.prompt_format.into());
        let lines = prompt_lines(&dataset, &selection, &rendering).context("--prompt-format")?;
        let mut sink = jsonl_out(self.out.as_deref())?;
        for line in &lines {
            sink.write(line)?;
        }
        eprintln!("{} prompts", lines.len());
        sink.finish(&serde_json::json!({ "command": "data prompts", "args": &self }))?;
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Dataset file.
    pub file: PathBuf,
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl DataCommand {
    pub fn run(self) -> Result<()> {
        match self.command {
            DataSubcommand::Stats(args) => args.run(),
            DataSubcommand::Prompts(args) => args.run(),
        }
    }
}

impl StatsArgs {
    fn run(self) -> Result<()> {
        let dataset = self.data.read(&self.file)?;
        let stats = DatasetStats::of(&dataset);
        if self.json {
            println!("{}", serde_json::to_string_pretty(&stats)?);
            return Ok(());
        }
        let r = &stats.report;
        println!("{} ({})", self.file.display(), stats.kind);
        println!("records                      {}", r.records);
        println!("prompts kept                 {}", stats.prompts);
        if let Some(pairs) = stats.pairs {
            println!("preference pairs             {pairs}");
        }
        println!("skipped: malformed lines     {}", r.skipped_malformed);
        println!(
            "skipped: different prefixes  {}",
            r.skipped_different_prefix
        );
        println!("pairs with an empty reply    {}", r.empty_replies);
        println!(
            "consecutive assistant turns  {}",
            r.consecutive_assistant_turns
        );
        println!();
        println!(
            "{:<22} {:>6} {:>6} {:>6} {:>6}",
            "length", "p50", "p90", "p99", "max"
        );
        let row = |name: &str, p: &Percentiles| {
            println!(
                "{name:<22} {:>6} {:>6} {:>6} {:>6}",
                p.p50, p.p90, p.p99, p.max
            );
        };
        row("prompt turns", &stats.prompt_turns);
        row("prompt words", &stats.prompt_words);
        if let Some(p) = &stats.chosen_words {
            row("chosen reply words", p);
        }
        if let Some(p) = &stats.rejected_words {
            row("rejected reply words", p);
        }
        Ok(())
    }
}
