//! `recontrol eval`: the paper's metrics for one or more generation files (the first is the
//! base), computed by `recontrol_eval::evaluate`; writes `report.json`, `report.md` and
//! `chart.svg` into `--out`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use recontrol_eval::{
    evaluate, read_references, write_report, CoherenceEncoder, EvalSettings, Judges,
    MethodGenerations,
};
use recontrol_io::Provenance;
use recontrol_reward_model::LoadedReward;
use serde::Serialize;

use crate::args::DeviceArgs;
use crate::output::provenance;

#[derive(Debug, Args, Serialize)]
pub struct EvalArgs {
    /// Generation files (recontrol generate JSONL), the base first; the same prompts in each.
    #[arg(long, num_args = 1.., required = true)]
    pub generations: Vec<PathBuf>,
    /// Method names, comma-separated, one per file (default: the file stems).
    #[arg(long, value_delimiter = ',')]
    pub names: Vec<String>,
    /// The policy reward (the one the methods optimise): a reward model directory or a TOML
    /// file of rules.
    #[arg(long)]
    pub reward: PathBuf,
    /// An independent judge (a reward model directory or a TOML file of rules, e.g. a reward
    /// model trained on another --partition of the pairs): it scores every response too, gets
    /// its own reward and gain columns, and computes the win rates.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge: Option<PathBuf>,
    /// JSONL with each prompt's reference (dataset-preferred) response, for the win rate
    /// against it.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Field of --reference records holding the reference response.
    #[arg(long, default_value = "reference")]
    pub reference_field: String,
    /// Model directory whose mean-pooled final hidden states embed prompts and responses for
    /// coherence (cosine similarity); default: the reward model's backbone.
    #[arg(long)]
    pub coherence_model: Option<PathBuf>,
    /// Output folder (report.json, report.md, chart.svg).
    #[arg(long)]
    pub out: PathBuf,
    /// Bootstrap resamples for the 95% intervals.
    #[arg(long, default_value_t = 2000)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

/// What `report.json` adds to the report: how this run was made.
#[derive(Debug, Serialize)]
struct RunRecord<'a> {
    args: &'a EvalArgs,
    provenance: Provenance,
}

impl EvalArgs {
    pub fn run(self) -> Result<()> {
        if !self.names.is_empty() && self.names.len() != self.generations.len() {
            anyhow::bail!(
                "--names has {} names for {} --generations files",
                self.names.len(),
                self.generations.len()
            );
        }
        if self.out.exists() && !self.out.is_dir() {
            anyhow::bail!("--out {}: exists and is not a folder", self.out.display());
        }
        let methods = self
            .generations
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let name = match self.names.get(i) {
                    Some(name) => name.clone(),
                    None => path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                };
                MethodGenerations::read(name, path).context("--generations")
            })
            .collect::<Result<Vec<_>>>()?;
        recontrol_eval::check_aligned(&methods).context("--generations")?;
        let references = self
            .reference
            .as_ref()
            .map(|p| {
                read_references(p, &self.reference_field)
                    .with_context(|| format!("--reference {}", p.display()))
            })
            .transpose()?;
        let coherence_dir = match &self.coherence_model {
            Some(d) => d.clone(),
            None if self.reward.is_dir() => self.reward.clone(),
            None => anyhow::bail!(
                "--coherence-model is needed with a rules reward (a model directory whose hidden states embed texts)"
            ),
        };

        let device = self.device.device;
        eprintln!("loading the reward {}", self.reward.display());
        let mut reward = LoadedReward::load(&self.reward, device)
            .with_context(|| format!("--reward {}", self.reward.display()))?;
        let mut judge = self
            .judge
            .as_ref()
            .map(|path| {
                eprintln!("loading the judge {}", path.display());
                LoadedReward::load(path, device)
                    .with_context(|| format!("--judge {}", path.display()))
            })
            .transpose()?;
        if let Some(judge) = judge.as_mut() {
            if reward.share_features_with(judge)? {
                eprintln!(
                    "the reward and the judge share a backbone: each text runs through it once"
                );
            }
        }
        let mut reward = reward.boxed();
        let mut judge = judge.map(LoadedReward::boxed);
        let encoder = CoherenceEncoder::load(&coherence_dir, self.device.device)
            .with_context(|| format!("coherence encoder {}", coherence_dir.display()))?;
        let judges = Judges {
            reward: reward.as_mut(),
            judge: judge.as_deref_mut(),
            coherence: &encoder,
        };
        let settings = EvalSettings {
            bootstrap: self.bootstrap,
            seed: self.seed,
        };
        let report = evaluate(&methods, references.as_ref(), judges, &settings).with_context(
            || match &self.reference {
                Some(p) => format!("--reference {}", p.display()),
                None => "eval".to_owned(),
            },
        )?;
        let run = RunRecord {
            args: &self,
            provenance: provenance(),
        };
        write_report(&self.out, &report, &run)
            .with_context(|| format!("--out {}", self.out.display()))?;
        println!("{}", recontrol_eval::report::table(&report.methods));
        eprintln!("wrote {}", self.out.display());
        Ok(())
    }
}
