//! The demo's configuration (`cli/demo.toml`): one typed section per stage, each the stage's
//! library settings (or a small demo-side view of them). A missing key takes the stage's
//! default; an unknown key is an error.

use std::path::PathBuf;

use recontrol_controller::{BackendKind, ControlConfig, UpdateRule};
use recontrol_data::selection::PromptSelection;
use recontrol_data::{PromptFormat, Split, StateDtype, HELPFUL_INSTRUCTION};
use recontrol_eval::EvalSettings;
use recontrol_export::ControllerSpec;
use recontrol_lm::DecodingSettings;
use recontrol_reward_model::stage::RewardSettings;
use recontrol_reward_model::Partition;
use recontrol_rollout::RolloutSettings;
use recontrol_value_net::stage::ValueSettings;
use serde::{Deserialize, Serialize};

/// Every stage's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// The model every stage uses: the policy, the reward model's backbone, the value net's
    /// states.
    pub model: ModelStage,
    /// Rollouts of the default model on train prompts.
    pub rollout: RolloutStage,
    /// The policy reward model on the default model's backbone: one partition of the train
    /// pairs. It labels the rollouts, scores best-of-N and ARGS, and tunes every method.
    pub reward: RewardSettings,
    /// The judge: a reward model like the policy's, trained on another partition of the train
    /// pairs; it only evaluates (win rates and the judge-reward column).
    pub judge: RewardSettings,
    /// The value net on the labelled rollouts.
    pub value: ValueSettings,
    /// The ONNX artifacts.
    pub export: ExportStage,
    /// Held-out HH test prompts with their reference responses.
    pub prompts: PromptsStage,
    /// Decoding of every method.
    pub generate: DecodingSettings,
    /// What the RE-Control methods add (their alpha and steps come from the sweep).
    pub control: ControlStage,
    /// Train-side prompts the knobs are tuned on.
    pub validation: ValidationStage,
    /// The grids the methods are tuned over, and the baselines' fixed settings.
    pub sweep: SweepStage,
    /// What the prompting methods add.
    pub prompting: PromptingStage,
    /// Out-of-distribution HarmfulQA questions.
    pub ood: PromptsStage,
    /// Bootstrap intervals of the reports.
    pub eval: EvalSettings,
}

impl Default for DemoConfig {
    /// Every stage's defaults; the policy reward model and the judge train on the two halves
    /// of the train pairs.
    fn default() -> Self {
        let half = |k| RewardSettings {
            partition: Partition::new(k, 2).ok(),
            ..RewardSettings::default()
        };
        Self {
            model: ModelStage::default(),
            rollout: RolloutStage::default(),
            reward: half(1),
            judge: half(2),
            value: ValueSettings::default(),
            export: ExportStage::default(),
            prompts: PromptsStage::default(),
            generate: DecodingSettings::default(),
            control: ControlStage::default(),
            validation: ValidationStage::default(),
            sweep: SweepStage::default(),
            prompting: PromptingStage::default(),
            ood: PromptsStage::default(),
            eval: EvalSettings::default(),
        }
    }
}

impl DemoConfig {
    /// Parses a TOML configuration and checks it; the error is one line.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string().replace('\n', " "))?;
        config.check()?;
        Ok(config)
    }

    /// Refuses a comparison that would not be fair: a judge that saw the policy reward
    /// model's training pairs (both must name partitions of the same split, and differ).
    pub fn check(&self) -> Result<(), String> {
        let (policy, judge) = (&self.reward, &self.judge);
        match (policy.partition, judge.partition) {
            (Some(p), Some(j)) if p.n() == j.n() && p.k() != j.k() => {}
            (p, j) => {
                return Err(format!(
                    "[reward] partition {} and [judge] partition {}: the judge must be trained on \
                     another partition of the same pairs (e.g. \"1/2\" and \"2/2\"), or it is \
                     not independent of the policy reward",
                    p.map_or("(all pairs)".to_owned(), |p| p.to_string()),
                    j.map_or("(all pairs)".to_owned(), |j| j.to_string())
                ))
            }
        }
        if policy.split_seed != judge.split_seed || policy.test_fraction != judge.test_fraction {
            return Err(
                "[reward] and [judge] must split the pairs alike (split_seed, test_fraction)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The model, and how prompts are put to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelStage {
    /// A Hugging Face model directory (relative paths from the working directory).
    pub dir: PathBuf,
    /// How every stage renders a dialogue for the model: `chat-template` (an instruct
    /// model's own template; the "+prompting" instruction becomes the system message) or
    /// `hh` ("Human: ... Assistant:" text; the instruction goes before it).
    pub prompt_format: PromptFormat,
}

/// Where `scripts/setup.sh` imports SmolLM2-135M-Instruct.
pub const DEFAULT_MODEL_DIR: &str = "models/smollm2-135m-instruct";

impl Default for ModelStage {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(DEFAULT_MODEL_DIR),
            prompt_format: PromptFormat::ChatTemplate,
        }
    }
}

/// Which train prompts are rolled out, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutStage {
    /// Use at most this many train prompts.
    pub limit: Option<usize>,
    pub samples_per_prompt: usize,
    pub state_dtype: StateDtype,
    pub rollouts_per_part: usize,
    pub decoding: DecodingSettings,
}

impl Default for RolloutStage {
    fn default() -> Self {
        let s = RolloutSettings::default();
        Self {
            limit: None,
            samples_per_prompt: s.samples_per_prompt,
            state_dtype: s.state_dtype,
            rollouts_per_part: s.rollouts_per_part,
            decoding: s.decoding,
        }
    }
}

impl RolloutStage {
    /// The train side of the default split, up to the limit.
    pub fn selection(&self) -> PromptSelection {
        PromptSelection {
            split: Split::Train,
            limit: self.limit,
            ..PromptSelection::default()
        }
    }

    /// The rollout settings: prompts in `format`, no instruction.
    pub fn settings(&self, format: PromptFormat) -> RolloutSettings {
        RolloutSettings {
            samples_per_prompt: self.samples_per_prompt,
            state_dtype: self.state_dtype,
            rollouts_per_part: self.rollouts_per_part,
            prompt_format: format,
            decoding: self.decoding.clone(),
            ..RolloutSettings::default()
        }
    }
}

/// The export's controller settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportStage {
    /// Gradient steps per decoding step in controller.onnx.
    pub steps: usize,
    /// The default step size recorded with the artifacts.
    pub alpha: f32,
    /// Bound on each row's total edit norm.
    pub max_edit_norm: Option<f32>,
}

impl Default for ExportStage {
    fn default() -> Self {
        Self {
            steps: 30,
            alpha: 0.5,
            max_edit_norm: None,
        }
    }
}

impl ExportStage {
    pub fn spec(&self) -> ControllerSpec {
        ControllerSpec {
            steps: self.steps,
            alpha: self.alpha,
            max_edit_norm: self.max_edit_norm,
        }
    }
}

/// Which test-side prompts of a dataset are evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptsStage {
    pub split_seed: u64,
    /// Share of prompts on the test side.
    pub test_fraction: f64,
    /// Keep the first N test prompts.
    pub limit: Option<usize>,
}

impl Default for PromptsStage {
    fn default() -> Self {
        let s = PromptSelection::default();
        Self {
            split_seed: s.split_seed,
            test_fraction: s.test_fraction,
            limit: None,
        }
    }
}

impl PromptsStage {
    /// The test side of the split, up to the limit.
    pub fn selection(&self) -> PromptSelection {
        PromptSelection {
            split: Split::Test,
            split_seed: self.split_seed,
            test_fraction: self.test_fraction,
            limit: self.limit,
            shard: None,
        }
    }
}

/// RE-Control's settings at generation time (alpha and steps: the sweep's choice).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlStage {
    pub update: UpdateRule,
    pub clip_grad_norm: Option<f64>,
    pub max_edit_norm: Option<f64>,
    /// Where dV/dh comes from.
    pub backend: BackendKind,
}

impl Default for ControlStage {
    fn default() -> Self {
        Self {
            update: UpdateRule::Sgd,
            clip_grad_norm: None,
            max_edit_norm: None,
            backend: BackendKind::Onnx,
        }
    }
}

impl ControlStage {
    /// The controller's settings with the tuned `alpha` and `steps`.
    pub fn config(&self, alpha: f64, steps: usize) -> ControlConfig {
        ControlConfig {
            alpha,
            steps,
            rule: self.update,
            clip_grad_norm: self.clip_grad_norm,
            max_edit_norm: self.max_edit_norm,
        }
    }
}

/// The "+prompting" variant's instruction (the system message of a chat template).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptingStage {
    pub prefix: String,
}

impl Default for PromptingStage {
    fn default() -> Self {
        Self {
            prefix: HELPFUL_INSTRUCTION.to_owned(),
        }
    }
}

/// The validation prompts: train-side prompts (same split as the rollouts) after the ones
/// rolled out, so that neither the test prompts nor the value net's training prompts choose a
/// knob.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationStage {
    pub limit: usize,
}

impl Default for ValidationStage {
    fn default() -> Self {
        Self { limit: 24 }
    }
}

/// The knobs' grids (the paper's choice rule: reward + diversity + coherence on the
/// validation prompts) and each baseline's fixed settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SweepStage {
    pub re_control: ReControlGrid,
    pub static_re: StaticReGrid,
    pub best_of_n: BestOfNGrid,
    pub args: RerankGrid,
    pub value_guided: RerankGrid,
}

/// RE-Control: alpha x steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReControlGrid {
    pub alphas: Vec<f64>,
    pub steps: Vec<usize>,
}

impl Default for ReControlGrid {
    fn default() -> Self {
        Self {
            alphas: vec![0.5, 2.0, 5.0],
            steps: vec![30],
        }
    }
}

/// Static RE: the vector's scale, and the reward quantile it is fitted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticReGrid {
    pub scales: Vec<f64>,
    pub quantile: f64,
}

impl Default for StaticReGrid {
    fn default() -> Self {
        Self {
            scales: vec![1.0, 4.0, 16.0],
            quantile: 0.25,
        }
    }
}

/// Best-of-N: N, and the sampling its candidates are drawn with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BestOfNGrid {
    pub ns: Vec<usize>,
    pub temperature: f64,
    pub seed: u64,
}

impl Default for BestOfNGrid {
    fn default() -> Self {
        Self {
            ns: vec![2, 4, 8],
            temperature: 0.7,
            seed: 0,
        }
    }
}

/// ARGS or value-guided decoding: the weight (k fixed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RerankGrid {
    pub k: usize,
    pub weights: Vec<f64>,
}

impl Default for RerankGrid {
    fn default() -> Self {
        Self {
            k: 10,
            weights: vec![0.5, 1.5, 5.0],
        }
    }
}
