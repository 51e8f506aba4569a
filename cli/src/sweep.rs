//! `recontrol sweep`: one decoding method over a grid of its knob on validation prompts,
//! scored with the policy reward, diversity and coherence, the best setting chosen the
//! paper's way (`recontrol_sweep::sweep`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use recontrol_controller::generation::open_value_backend;
use recontrol_controller::{ArgsReward, RenderedPrompts, SteeringVector, UpdateRule};
use recontrol_eval::{CoherenceEncoder, EvalSettings, Judges};
use recontrol_io::{AtomicDir, Provenance};
use recontrol_lm::LanguageModel;
use recontrol_sweep::{sweep, write_sweep, SweepMethod};
use serde::Serialize;

use crate::args::{DeviceArgs, GenerationArgs};
use crate::generate::GradBackendArg;
use crate::output::provenance;

/// Tune one method's knob on validation prompts (train side of the split: never the test
/// prompts): every setting decodes the prompts, and the one with the highest mean policy
/// reward + diversity + coherence is chosen. Writes sweep.json, sweep.md, sweep.svg and each
/// setting's generations into --out.
#[derive(Debug, Args, Serialize)]
#[command(group(clap::ArgGroup::new("method").required(true).multiple(false).args(["value", "steer", "args", "value_guided", "best_of"])))]
pub struct SweepArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL file of validation prompts.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Field of each --prompts record that holds the prompt.
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// Text put before every prompt; with --chat, the system message.
    #[arg(long)]
    pub prompt_prefix: Option<String>,
    /// Render each prompt as a user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub generation: GenerationArgs,
    /// The policy reward that scores every setting (and best-of-N's samples): a reward model
    /// directory or rules .toml.
    #[arg(long)]
    pub reward: PathBuf,
    /// Model directory whose mean-pooled final hidden states embed texts for coherence
    /// (default: the reward model's backbone).
    #[arg(long)]
    pub coherence_model: Option<PathBuf>,
    /// Output folder (must not exist; appears when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// RE-Control with this value head, over --alpha x --steps.
    #[arg(long)]
    pub value: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_values_t = [0.5, 1.0, 2.0, 5.0], requires = "value")]
    pub alpha: Vec<f64>,
    #[arg(long, value_delimiter = ',', default_values_t = [30], requires = "value")]
    pub steps: Vec<usize>,
    /// Static RE with this steering vector, over --steer-scale.
    #[arg(long)]
    pub steer: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 2.0, 4.0, 8.0], requires = "steer")]
    pub steer_scale: Vec<f64>,
    /// ARGS with this reward model or rules, over --args-weight.
    #[arg(long)]
    pub args: Option<PathBuf>,
    #[arg(long, default_value_t = 10, requires = "args", value_parser = crate::args::num::at_least_one)]
    pub args_k: usize,
    #[arg(long, value_delimiter = ',', default_values_t = [0.5, 1.5, 5.0], requires = "args")]
    pub args_weight: Vec<f64>,
    /// Value-guided decoding with this value head, over --cd-weight.
    #[arg(long)]
    pub value_guided: Option<PathBuf>,
    #[arg(long, default_value_t = 10, requires = "value_guided", value_parser = crate::args::num::at_least_one)]
    pub cd_k: usize,
    #[arg(long, value_delimiter = ',', default_values_t = [0.5, 1.0, 3.0], requires = "value_guided")]
    pub cd_weight: Vec<f64>,
    /// Best-of-N over these N (the sampling flags apply; --reward scores the samples).
    #[arg(long, value_delimiter = ',')]
    pub best_of: Option<Vec<usize>>,
    /// How value heads run (RE-Control, value-guided).
    #[arg(long, value_enum, default_value_t = GradBackendArg::Onnx)]
    pub grad_backend: GradBackendArg,
    /// Use a value head or steering vector made from another model's states.
    #[arg(long)]
    pub allow_foreign_value: bool,
    /// ONNX Runtime library (default: $ORT_DYLIB_PATH, then the project venv).
    #[arg(long)]
    pub onnxruntime: Option<PathBuf>,
    /// Bootstrap resamples (the per-setting intervals are not used for the choice).
    #[arg(long, default_value_t = 200)]
    pub bootstrap: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

/// What `config.json` in --out records.
#[derive(Debug, Serialize)]
struct RunRecord<'a> {
    command: &'static str,
    args: &'a SweepArgs,
    provenance: Provenance,
}

impl SweepArgs {
    fn value(
        &self,
        path: &std::path::Path,
        flag: &str,
        lm: &LanguageModel,
    ) -> Result<Box<dyn recontrol_controller::GradientBackend>> {
        let options = self
            .grad_backend
            .options(self.allow_foreign_value, self.onnxruntime.clone());
        open_value_backend(path, lm, &options).with_context(|| format!("{flag} {}", path.display()))
    }

    fn method(&self, lm: &LanguageModel) -> Result<SweepMethod> {
        if let Some(path) = &self.value {
            return Ok(SweepMethod::ReControl {
                value: self.value(path, "--value", lm)?,
                alphas: self.alpha.clone(),
                steps: self.steps.clone(),
                rule: UpdateRule::Sgd,
            });
        }
        if let Some(path) = &self.steer {
            let vector = SteeringVector::open(path, lm, self.allow_foreign_value)
                .with_context(|| format!("--steer {}", path.display()))?;
            return Ok(SweepMethod::Steer {
                vector: Box::new(vector),
                scales: self.steer_scale.clone(),
            });
        }
        if let Some(path) = &self.args {
            let reward = ArgsReward::open(path, lm, self.device.device)
                .with_context(|| format!("--args {}", path.display()))?;
            return Ok(SweepMethod::Args {
                reward,
                k: self.args_k,
                weights: self.args_weight.clone(),
            });
        }
        if let Some(path) = &self.value_guided {
            return Ok(SweepMethod::ValueGuided {
                value: self.value(path, "--value-guided", lm)?,
                k: self.cd_k,
                weights: self.cd_weight.clone(),
            });
        }
        let ns = self.best_of.clone().unwrap_or_default();
        Ok(SweepMethod::BestOfN { ns })
    }

    pub fn run(self) -> Result<()> {
        let greedy = self.generation.sampling()? == recontrol_lm::Sampling::Greedy;
        if self.best_of.is_some() && greedy {
            return Err(recontrol_controller::Error::BestOfGreedy.into());
        }
        if (self.args.is_some() || self.value_guided.is_some()) && !greedy {
            anyhow::bail!("ARGS and value-guided decoding are greedy: --temperature must be 0");
        }
        if self.out.exists() {
            anyhow::bail!("--out {}: already exists", self.out.display());
        }
        let prompts = recontrol_data::read_prompts(&self.prompts, &self.prompt_field)
            .with_context(|| format!("--prompts {}", self.prompts.display()))?;
        let coherence_dir = match &self.coherence_model {
            Some(d) => d.clone(),
            None if self.reward.is_dir() => self.reward.clone(),
            None => anyhow::bail!(
                "--coherence-model is needed with a rules reward (a model directory whose hidden states embed texts)"
            ),
        };
        eprintln!("loading {}", self.model.display());
        let lm = LanguageModel::load(&self.model, self.device.device, self.device.dtype.into())
            .with_context(|| format!("--model {}", self.model.display()))?;
        let config = self.generation.config(&lm)?;
        let mut method = self.method(&lm)?;
        method.settings().context("the grid")?;
        let mut reward = recontrol_reward_model::load_reward(&self.reward, self.device.device)
            .with_context(|| format!("--reward {}", self.reward.display()))?;
        let encoder = CoherenceEncoder::load(&coherence_dir, self.device.device)
            .with_context(|| format!("coherence encoder {}", coherence_dir.display()))?;
        let rendered = RenderedPrompts::new(&lm, prompts, self.prompt_prefix.as_deref(), self.chat)
            .context("--chat")?;
        let plan = rendered.plan(config, self.generation.batch_size);
        let out = AtomicDir::create(&self.out)
            .with_context(|| format!("--out {}", self.out.display()))?;
        let settings = EvalSettings {
            bootstrap: self.bootstrap,
            seed: 0,
        };
        let judges = Judges {
            reward: reward.as_mut(),
            judge: None,
            coherence: &encoder,
        };
        let dir = out.path().to_owned();
        let report = sweep(
            &lm,
            &plan,
            &mut method,
            judges,
            &settings,
            &mut |i, records| recontrol_sweep::write_point(&dir, i, records),
        )?;
        write_sweep(out.path(), &report)?;
        recontrol_io::write_json_atomic(
            &out.path().join("config.json"),
            &RunRecord {
                command: "sweep",
                args: &self,
                provenance: provenance(),
            },
        )?;
        out.commit()?;
        println!("{}", recontrol_sweep::table(&report));
        eprintln!(
            "chose {} -> {}",
            report
                .points
                .get(report.chosen)
                .map(|p| recontrol_sweep::describe(&p.setting))
                .unwrap_or_default(),
            self.out.display()
        );
        Ok(())
    }
}
