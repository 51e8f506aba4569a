//! `recontrol slurm submit`: a stage as a Slurm job array plus a dependent merge job.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use recontrol_io::{config_path, write_json_atomic, Provenance};
use recontrol_slurm::{submit, write_scripts, LabelStep, Resources, RolloutArray, Submitted};
use serde::Serialize;

use crate::output::provenance;
use crate::rollout::RolloutArgs;

/// Run stages on a Slurm cluster.
#[derive(Debug, Args)]
pub struct SlurmCommand {
    #[command(subcommand)]
    pub command: SlurmSubcommand,
}

#[derive(Debug, Subcommand)]
pub enum SlurmSubcommand {
    /// Submit a stage as a job array (task K takes shard K of N, resuming what a preempted
    /// attempt left) and a job that merges the shards once every task succeeded.
    Submit(SubmitArgs),
}

/// Stages that split into shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// `recontrol rollout` (each shard's store optionally labelled), merged by `rollout merge`.
    Rollout,
}

#[derive(Debug, Args, Serialize)]
pub struct SubmitArgs {
    pub stage: Stage,
    /// Array tasks (shards).
    #[arg(long, value_parser = crate::args::num::at_least_one)]
    pub tasks: usize,
    /// The merged output (the shards go to OUT.slurm/shards/, the scripts and logs beside).
    #[arg(long)]
    pub out: PathBuf,
    /// Label each shard with this reward (model directory or rules .toml) after its rollouts.
    #[arg(long)]
    pub label_reward: Option<PathBuf>,
    /// Slurm partition.
    #[arg(long)]
    pub partition: Option<String>,
    /// GPUs per task.
    #[arg(long)]
    pub gpus_per_task: Option<u32>,
    /// CPUs per task.
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// Time limit per task (Slurm's format, e.g. 4:00:00).
    #[arg(long)]
    pub time: Option<String>,
    /// A further #SBATCH option for both jobs (repeatable), e.g. --extra-sbatch=--account=lab.
    #[arg(long, allow_hyphen_values = true)]
    pub extra_sbatch: Vec<String>,
    /// Write and print the scripts without submitting them.
    #[arg(long)]
    pub dry_run: bool,
    /// The sbatch program.
    #[arg(long, default_value = "sbatch")]
    pub sbatch: String,
    /// The stage's own flags, after `--` (without --out, --shard and --resume, which the array
    /// sets).
    #[arg(last = true, required = true)]
    pub stage_args: Vec<String>,
}

/// `rollout`'s flags alone, to check the stage's flags before submitting.
#[derive(Debug, Parser)]
#[command(name = "rollout")]
struct RolloutFlags {
    #[command(flatten)]
    args: RolloutArgs,
}

#[derive(Debug, Serialize)]
struct SubmitRecord<'a> {
    command: &'static str,
    args: &'a SubmitArgs,
    array: &'a RolloutArray,
    jobs: Option<&'a Submitted>,
    provenance: Provenance,
}

impl SlurmCommand {
    pub fn run(self) -> Result<()> {
        match self.command {
            SlurmSubcommand::Submit(args) => args.run(),
        }
    }
}

impl SubmitArgs {
    fn run(self) -> Result<()> {
        if self.tasks == 0 {
            anyhow::bail!("--tasks must be at least 1");
        }
        let out = std::path::absolute(&self.out)
            .with_context(|| format!("--out {}", self.out.display()))?;
        if out.exists() {
            anyhow::bail!(
                "--out {}: exists; remove it or choose another name",
                out.display()
            );
        }
        if let Some(reward) = &self.label_reward {
            if !reward.exists() {
                anyhow::bail!("--label-reward {}: does not exist", reward.display());
            }
        }
        let array = RolloutArray {
            recontrol: std::env::current_exe()
                .and_then(std::fs::canonicalize)
                .context("the path of this recontrol executable")?,
            rollout_args: self.stage_args.clone(),
            out: out.clone(),
            workdir: std::env::current_dir().context("the current directory")?,
            label: self
                .label_reward
                .as_ref()
                .map(|reward| -> Result<LabelStep> {
                    Ok(LabelStep {
                        reward: std::path::absolute(reward)?,
                        args: Vec::new(),
                    })
                })
                .transpose()?,
            tasks: self.tasks,
            resources: Resources {
                partition: self.partition.clone(),
                gpus_per_task: self.gpus_per_task,
                cpus_per_task: self.cpus_per_task,
                time: self.time.clone(),
                extra_sbatch: self.extra_sbatch.clone(),
            },
        };
        // The scripts refuse --out/--shard/--resume among the stage flags; then the flags must
        // parse as the stage's own, with the paths they name present, before anything is
        // submitted (a typo should fail here, not on the cluster an hour later).
        let scripts = array.scripts()?;
        let shard0 = array.shard_store(0);
        let parsed = RolloutFlags::try_parse_from(
            std::iter::once("rollout".to_owned())
                .chain(self.stage_args.iter().cloned())
                .chain([
                    "--shard".to_owned(),
                    format!("0/{}", self.tasks),
                    "--out".to_owned(),
                    shard0.display().to_string(),
                ]),
        )
        .map_err(|e| {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or("invalid").to_owned();
            anyhow::anyhow!(
                "rollout flags after --: {}",
                first.trim_start_matches("error: ")
            )
        })?;
        parsed.args.check_inputs()?;

        let dir = array.dir();
        let paths = write_scripts(&dir, &scripts)?;
        let jobs = if self.dry_run {
            print!(
                "# {}\n{}\n# {}\n{}",
                paths.array.display(),
                scripts.array,
                paths.merge.display(),
                scripts.merge
            );
            None
        } else {
            let jobs = submit(&paths, &self.sbatch)?;
            println!(
                "submitted array job {} ({} tasks) and merge job {} (after it); scripts and logs in {}",
                jobs.array,
                self.tasks,
                jobs.merge,
                dir.display()
            );
            Some(jobs)
        };
        write_json_atomic(
            &config_path(&dir.join("submit")),
            &SubmitRecord {
                command: "slurm submit",
                args: &self,
                array: &array,
                jobs: jobs.as_ref(),
                provenance: provenance(),
            },
        )?;
        Ok(())
    }
}
