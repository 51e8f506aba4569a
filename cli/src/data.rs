//! `recontrol data`: look at datasets.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use recontrol_data::stats::{DatasetStats, Percentiles};

use crate::args::DatasetArgs;

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
