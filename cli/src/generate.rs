//! `recontrol generate`: plain generation, RE-Control generation with `--value`, or one of the
//! paper's baselines (`--steer`, `--best-of`, `--args`, `--value-guided`); one method per run,
//! each with `--prompt-prefix`/`--chat`, batching and seeding.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use recontrol_controller::generation::{open_value_backend, ValueOptions};
use recontrol_controller::{
    generate_records, ArgsReward, BackendKind, ControlConfig, Controller, Error as ControllerError,
    GradientBackend, Method, RenderedPrompts, RerankSettings, SteerHook, SteeringVector,
    UpdateRule,
};
use recontrol_io::Provenance;
use recontrol_lm::{LanguageModel, Sampling};
use recontrol_reward_model::{load_reward, RewardSource};
use serde::Serialize;

use crate::args::{DeviceArgs, GenerationArgs};
use crate::output::{jsonl_out, provenance};

/// Generate continuations of prompts with a Hugging Face model directory.
#[derive(Debug, Clone, Args, Serialize)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(true).args(["prompt", "prompts"])))]
#[command(group(clap::ArgGroup::new("method").multiple(false).args(["value", "steer", "best_of", "args", "value_guided"])))]
pub struct GenerateArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A prompt, used as is (repeatable).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// JSONL file of prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Field of each --prompts record that holds the prompt.
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub generation: GenerationArgs,
    /// Text put before every prompt (e.g. a helpful-assistant instruction: the paper's
    /// "prompting" variant); with --chat, the system message.
    #[arg(long)]
    pub prompt_prefix: Option<String>,
    /// Render each prompt as a user message with the model's chat template (an instruct
    /// model's format); records keep the rendering.
    #[arg(long)]
    pub chat: bool,
    /// Output JSONL file (written atomically, with FILE.config.json beside it); stdout if absent.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub baselines: BaselineArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

/// The paper's baselines, each a decoding method of its own (one method per run).
#[derive(Debug, Clone, Args, Serialize)]
pub struct BaselineArgs {
    /// Static representation editing: add `--steer-scale` times this steering vector (from
    /// `recontrol steer fit`) to the final hidden state at every step.
    #[arg(long)]
    pub steer: Option<PathBuf>,
    /// The steering vector's multiplier s in h' = h + s * v.
    #[arg(long, default_value_t = 1.0, requires = "steer", value_parser = crate::args::num::finite, allow_negative_numbers = true)]
    pub steer_scale: f64,
    /// Best-of-N: decode N samples per prompt (the sampling flags apply; sample j of prompt p
    /// draws from stream p * N + j of --seed) and return the one --reward scores highest.
    #[arg(long, requires = "reward", value_parser = crate::args::num::at_least_one)]
    pub best_of: Option<usize>,
    /// The reward best-of-N scores with: a reward model directory or a rules .toml, scored
    /// exactly as `recontrol reward score` does.
    #[arg(long, requires = "best_of")]
    pub reward: Option<PathBuf>,
    /// ARGS (greedy): rerank the top --args-k tokens by logit + --args-weight * reward, with
    /// this reward model directory (scored on token ids when it shares the model's vocabulary,
    /// else on decoded text) or rules .toml.
    #[arg(long)]
    pub args: Option<PathBuf>,
    /// Candidates ARGS rescores at each step (the paper: 10).
    #[arg(long, default_value_t = 10, requires = "args", value_parser = crate::args::num::at_least_one)]
    pub args_k: usize,
    /// Weight of the reward against the logit (the ARGS paper: 1.5 on HH-RLHF).
    #[arg(long, default_value_t = 1.5, requires = "args", value_parser = crate::args::num::finite, allow_negative_numbers = true)]
    pub args_weight: f64,
    /// Value-guided decoding (controlled decoding with a prefix scorer): rerank the top --cd-k
    /// tokens by logit + --cd-weight * V(h(c)), h(c) the next final hidden state on token c,
    /// with this value head (export directory, .onnx file or value directory; --grad-backend
    /// chooses how V runs).
    #[arg(long)]
    pub value_guided: Option<PathBuf>,
    /// Candidates value-guided decoding rescores at each step.
    #[arg(long, default_value_t = 10, requires = "value_guided", value_parser = crate::args::num::at_least_one)]
    pub cd_k: usize,
    /// Weight of the value against the logit.
    #[arg(long, default_value_t = 1.0, requires = "value_guided", value_parser = crate::args::num::finite, allow_negative_numbers = true)]
    pub cd_weight: f64,
}

/// `--grad-backend` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GradBackendArg {
    /// ONNX Runtime on the exported graphs (value_grad.onnx / controller.onnx), with its CUDA
    /// execution provider when --device is a GPU and the onnxruntime has it, else on the CPU.
    Onnx,
    /// libtorch on the value directory, on the LM's device (closed-form value gradient).
    Torch,
}

/// `--update` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateArg {
    /// h <- h + alpha * dV/dh (the paper).
    Sgd,
    /// Adam ascent on V, fresh moments at every decoding step.
    Adam,
}

/// RE-Control: edit the final hidden state with a value head at every decoding step.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ControlArgs {
    /// A value head: an export directory (recontrol export), one of its .onnx files, or a
    /// value directory. Without it, generation is plain.
    #[arg(long)]
    pub value: Option<PathBuf>,
    /// Step size of each update (the paper: 0.5 on HH-RLHF).
    #[arg(long, default_value_t = 0.5, requires = "value", value_parser = crate::args::num::finite, allow_negative_numbers = true)]
    pub alpha: f64,
    /// Updates per decoding step (the paper: 30).
    #[arg(long, default_value_t = 30, requires = "value", value_parser = crate::args::num::at_least_one)]
    pub steps: usize,
    /// How the value head runs (for --value and --value-guided).
    #[arg(long, value_enum, default_value_t = GradBackendArg::Onnx)]
    pub grad_backend: GradBackendArg,
    #[arg(long, value_enum, default_value_t = UpdateArg::Sgd, requires = "value")]
    pub update: UpdateArg,
    /// Clip each row's gradient to this L2 norm before every update.
    #[arg(long, requires = "value", value_parser = crate::args::num::positive, allow_negative_numbers = true)]
    pub clip_grad_norm: Option<f64>,
    /// Bound each row's total edit ||h' - h||_2 (projected after every update).
    #[arg(long, requires = "value", value_parser = crate::args::num::positive, allow_negative_numbers = true)]
    pub max_edit_norm: Option<f64>,
    /// Use a value head or steering vector made from another model's states (same hidden size).
    #[arg(long)]
    pub allow_foreign_value: bool,
    /// ONNX Runtime library for --grad-backend onnx (default: $ORT_DYLIB_PATH, then the
    /// project venv).
    #[arg(long)]
    pub onnxruntime: Option<PathBuf>,
}

impl ControlArgs {
    fn config(&self) -> ControlConfig {
        ControlConfig {
            alpha: self.alpha,
            steps: self.steps,
            rule: match self.update {
                UpdateArg::Sgd => UpdateRule::Sgd,
                UpdateArg::Adam => UpdateRule::Adam,
            },
            clip_grad_norm: self.clip_grad_norm,
            max_edit_norm: self.max_edit_norm,
        }
    }

    /// The gradient backend for `lm`, after checking the value head against it.
    fn backend(&self, lm: &LanguageModel) -> Result<Option<Box<dyn GradientBackend>>> {
        let Some(path) = &self.value else {
            return Ok(None);
        };
        self.config()
            .check()
            .map_err(|e| anyhow::anyhow!("--alpha/--clip-grad-norm/--max-edit-norm: {e}"))?;
        self.open_value(path, "--value", lm).map(Some)
    }

    /// The value head at `path` (given as `flag`) on `lm`'s device, checked against `lm`.
    fn open_value(
        &self,
        path: &std::path::Path,
        flag: &str,
        lm: &LanguageModel,
    ) -> Result<Box<dyn GradientBackend>> {
        let options = self
            .grad_backend
            .options(self.allow_foreign_value, self.onnxruntime.clone());
        open_value_backend(path, lm, &options).with_context(|| format!("{flag} {}", path.display()))
    }
}

impl GradBackendArg {
    /// How to open a value head with this backend.
    pub(crate) fn options(self, allow_foreign: bool, onnxruntime: Option<PathBuf>) -> ValueOptions {
        ValueOptions {
            backend: match self {
                Self::Onnx => BackendKind::Onnx,
                Self::Torch => BackendKind::Torch,
            },
            allow_foreign,
            onnxruntime,
        }
    }
}

/// What FILE.config.json records.
#[derive(Debug, Serialize)]
struct RunRecord<'a> {
    command: &'static str,
    args: &'a GenerateArgs,
    eos_token_ids: &'a [i64],
    pad_token_id: i64,
    /// The decoding method (`plain`, `re-control`, `static-re`, `best-of-n`, `args`,
    /// `value-guided`).
    method: &'static str,
    /// With --value: the controller (backend, where it ran, settings).
    controller: Option<String>,
    /// With a baseline: what it scores or steers with.
    baseline: Option<String>,
    provenance: Provenance,
}

impl GenerateArgs {
    pub fn run(self) -> Result<()> {
        let sampling = self.generation.sampling()?;
        self.baselines.check(&sampling)?;
        let mut prompts = self.prompt.clone();
        if let Some(path) = &self.prompts {
            prompts.extend(recontrol_data::read_prompts(path, &self.prompt_field)?);
        }
        let mut sink = jsonl_out(self.out.as_deref())?;

        eprintln!("loading {}", self.model.display());
        let lm = LanguageModel::load(&self.model, self.device.device, self.device.dtype.into())
            .with_context(|| format!("--model {}", self.model.display()))?;
        let config = self.generation.config(&lm)?;
        let mut backend = self.control.backend(&lm)?;
        let mut controller = backend
            .as_deref_mut()
            .map(|b| Controller::new(b, self.control.config()))
            .transpose()?;
        let controller_description = controller.as_ref().map(|c| format!("{c:?}"));
        if let Some(c) = &controller_description {
            eprintln!("controlling with {c}");
        }
        let mut baseline = self.baselines.open(&self.control, &self.device, &lm)?;
        let baseline_description = baseline.as_ref().map(Baseline::describe);
        if let Some(d) = &baseline_description {
            eprintln!("decoding with {d}");
        }
        let rendered = RenderedPrompts::new(&lm, prompts, self.prompt_prefix.as_deref(), self.chat)
            .context("--chat")?;
        let prompts = &rendered.prompts;
        let plan = rendered.plan(config.clone(), self.generation.batch_size);
        let progress = ProgressBar::new(prompts.len() as u64).with_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} prompts  {elapsed} (eta {eta})  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let (mut tokens, mut seconds) = (0usize, 0f64);
        let method = match (controller.as_mut(), baseline.as_mut()) {
            (Some(controller), _) => Method::Control(controller),
            (None, Some(baseline)) => baseline.method(),
            (None, None) => Method::Plain,
        };
        let method_name = method.name();
        let summary = generate_records(&lm, &plan, method, &mut |records| {
            for r in records {
                sink.write(r)?;
                tokens += r.num_tokens.unwrap_or(0);
            }
            seconds += records.first().and_then(|r| r.seconds).unwrap_or(0.0);
            progress.inc(records.len() as u64);
            progress.set_message(format!("{:.1} tokens/s", tokens as f64 / seconds));
            Ok(())
        })?;
        progress.finish_and_clear();
        if summary.truncated_prompts > 0 {
            eprintln!(
                "{} prompts were too long for the model with --max-new-tokens {}: their oldest tokens were dropped",
                summary.truncated_prompts, self.generation.max_new_tokens
            );
        }
        eprintln!(
            "generated {} tokens for {} prompts in {:.2} s ({:.1} tokens/s)",
            summary.tokens,
            summary.prompts,
            summary.seconds,
            summary.tokens as f64 / summary.seconds.max(1e-9)
        );
        sink.finish(&RunRecord {
            command: "generate",
            args: &self,
            eos_token_ids: &config.eos_token_ids,
            pad_token_id: config.pad_token_id,
            method: method_name,
            controller: controller_description,
            baseline: baseline_description,
            provenance: provenance(),
        })?;
        Ok(())
    }
}

/// A baseline opened for a model: what its [`Method`] borrows.
enum Baseline {
    Steer(SteerHook, String),
    BestOfN(usize, Box<dyn RewardSource>),
    Args(ArgsReward, RerankSettings),
    ValueGuided(Box<dyn GradientBackend>, RerankSettings),
}

impl Baseline {
    fn describe(&self) -> String {
        match self {
            Self::Steer(_, d) => d.clone(),
            Self::BestOfN(n, reward) => format!("best-of-{n} under {}", reward.describe()),
            Self::Args(reward, s) => {
                format!(
                    "ARGS (k {}, weight {}) with {}",
                    s.k,
                    s.weight,
                    reward.describe()
                )
            }
            Self::ValueGuided(value, s) => format!(
                "value-guided decoding (k {}, weight {}) with {}",
                s.k,
                s.weight,
                value.describe()
            ),
        }
    }

    fn method(&mut self) -> Method<'_, '_> {
        match self {
            Self::Steer(hook, _) => Method::Steer(hook),
            Self::BestOfN(n, reward) => Method::BestOfN {
                n: *n,
                reward: &mut **reward,
            },
            Self::Args(reward, settings) => Method::Args {
                reward,
                settings: *settings,
            },
            Self::ValueGuided(value, settings) => Method::ValueGuided {
                value: &mut **value,
                settings: *settings,
            },
        }
    }
}

impl BaselineArgs {
    /// What can be refused before any model is loaded: best-of-N needs sampling, ARGS and
    /// value-guided decoding are greedy.
    fn check(&self, sampling: &Sampling) -> Result<()> {
        let greedy = *sampling == Sampling::Greedy;
        if self.best_of == Some(0) {
            return Err(ControllerError::BestOfCount.into());
        }
        if self.best_of.is_some() && greedy {
            return Err(ControllerError::BestOfGreedy.into());
        }
        if self.args.is_some() && !greedy {
            return Err(ControllerError::GreedyOnly { method: "ARGS" }.into());
        }
        if self.value_guided.is_some() && !greedy {
            return Err(ControllerError::GreedyOnly {
                method: "value-guided decoding",
            }
            .into());
        }
        Ok(())
    }

    /// The baseline these flags ask for, its files opened and checked against `lm`.
    fn open(
        &self,
        control: &ControlArgs,
        device: &DeviceArgs,
        lm: &LanguageModel,
    ) -> Result<Option<Baseline>> {
        let vocab = lm.model.config().vocab_size;
        if let Some(path) = &self.steer {
            let vector = SteeringVector::open(path, lm, control.allow_foreign_value)
                .with_context(|| format!("--steer {}", path.display()))?;
            let hook = vector
                .hook(self.steer_scale, lm.model.device())
                .context("--steer-scale")?;
            let description = format!(
                "static RE: {} x the steering vector {} (quantile {} of {})",
                self.steer_scale,
                path.display(),
                vector.meta.quantile,
                vector.meta.rollouts
            );
            return Ok(Some(Baseline::Steer(hook, description)));
        }
        if let (Some(n), Some(path)) = (self.best_of, &self.reward) {
            let reward = load_reward(path, device.device)
                .with_context(|| format!("--reward {}", path.display()))?;
            return Ok(Some(Baseline::BestOfN(n, reward)));
        }
        if let Some(path) = &self.args {
            let settings = RerankSettings {
                k: self.args_k,
                weight: self.args_weight,
            };
            settings.check(vocab, "--args-k", "--args-weight")?;
            let reward = ArgsReward::open(path, lm, device.device)
                .with_context(|| format!("--args {}", path.display()))?;
            return Ok(Some(Baseline::Args(reward, settings)));
        }
        if let Some(path) = &self.value_guided {
            let settings = RerankSettings {
                k: self.cd_k,
                weight: self.cd_weight,
            };
            settings.check(vocab, "--cd-k", "--cd-weight")?;
            let value = control.open_value(path, "--value-guided", lm)?;
            return Ok(Some(Baseline::ValueGuided(value, settings)));
        }
        Ok(None)
    }
}
