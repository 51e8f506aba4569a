//! `recontrol demo`: the whole RE-Control pipeline on the embedded default, one typed chain of
//! library calls.
//!
//! [`Stage::chain`] lists the stages in order: the model (SmolLM2-135M-Instruct, imported by
//! the set-up) -> rollouts on train prompts -> reward model from train pairs on the model's
//! backbone -> label -> value net -> export -> held-out prompts -> generate with every
//! [`Method`] -> eval report; then the same value net on HarmfulQA questions (out of
//! distribution). Every stage renders dialogues the same way (the model's chat template). Each stage's settings come from its section of
//! the [`DemoConfig`] (`cli/demo.toml`). A stage's key is a digest of its serialised settings,
//! the device and the keys of the stages it reads; a stage whose output exists with a stamp of
//! the same key is skipped, and an interrupted training stage with the same key resumes.

mod config;
mod stages;

use std::path::{Path, PathBuf};

pub use config::{
    BestOfNGrid, ControlStage, DemoConfig, ExportStage, ModelStage, PromptingStage, PromptsStage,
    ReControlGrid, RerankGrid, RolloutStage, StaticReGrid, SweepStage, ValidationStage,
    DEFAULT_MODEL_DIR,
};
pub use stages::{run_demo, DemoOutcome, DemoRun};

/// The bundled data, embedded so that the demo needs nothing beside the binary.
pub const HH_RLHF: &[u8] = include_bytes!("../../data/bundled/hh-rlhf/harmless-base/test.jsonl.gz");
pub const HARMFULQA: &[u8] = include_bytes!("../../data/bundled/harmfulqa/harmfulqa.json");

/// Errors of the demo: a stage's error, named by the stage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("demo stage {stage}: {source}")]
    Stage {
        stage: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The prompt sets the methods are evaluated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromptSet {
    /// Held-out HH-RLHF test prompts, with reference responses.
    Hh,
    /// HarmfulQA questions (out of distribution for the value net).
    HarmfulQa,
}

impl PromptSet {
    pub fn name(self) -> &'static str {
        match self {
            Self::Hh => "hh",
            Self::HarmfulQa => "harmfulqa",
        }
    }

    /// The methods compared on this set (the first is the base): the paper's Table 1 on
    /// HH-RLHF; base, prompting and RE-Control with and without it out of distribution.
    pub fn methods(self) -> &'static [Method] {
        match self {
            Self::Hh => &[
                Method::Base,
                Method::Prompting,
                Method::StaticRe,
                Method::BestOfN,
                Method::Args,
                Method::ValueGuided,
                Method::ReControl,
                Method::ReControlPrompting,
            ],
            Self::HarmfulQa => &[
                Method::Base,
                Method::Prompting,
                Method::ReControl,
                Method::ReControlPrompting,
            ],
        }
    }
}

/// A decoding method of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Base,
    /// The helpful-assistant instruction before the prompt.
    Prompting,
    /// Static representation editing: a steering vector fitted on the labelled rollouts.
    StaticRe,
    /// Best-of-N samples under the policy reward model.
    BestOfN,
    /// ARGS: the top-k tokens reranked by the policy reward model.
    Args,
    /// Value-guided decoding: the top-k tokens reranked by the value net.
    ValueGuided,
    /// RE-Control: the value net edits every decoding step's hidden state.
    ReControl,
    ReControlPrompting,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Prompting => "prompting",
            Self::StaticRe => "static-re",
            Self::BestOfN => "best-of-n",
            Self::Args => "args",
            Self::ValueGuided => "value-guided",
            Self::ReControl => "re-control",
            Self::ReControlPrompting => "re-control+prompting",
        }
    }

    /// Whether the value net steers it by editing states (it reads the export).
    pub fn controlled(self) -> bool {
        matches!(self, Self::ReControl | Self::ReControlPrompting)
    }

    /// Whether the prompting instruction goes before the prompt.
    pub fn prompted(self) -> bool {
        matches!(self, Self::Prompting | Self::ReControlPrompting)
    }

    /// The method whose sweep sets this one's knob (RE-Control + prompting takes RE-Control's).
    pub fn tuned_by(self) -> Option<Method> {
        match self {
            Self::Base | Self::Prompting => None,
            Self::ReControlPrompting => Some(Self::ReControl),
            m => Some(m),
        }
    }

    /// The methods tuned on validation prompts, in the order their sweeps run.
    pub const TUNED: [Method; 5] = [
        Self::StaticRe,
        Self::BestOfN,
        Self::Args,
        Self::ValueGuided,
        Self::ReControl,
    ];
}

/// One stage of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Checks the model directory and records which model the run uses.
    Model,
    Rollout,
    /// The policy reward model (it labels the rollouts), on one partition of the train pairs.
    Reward,
    /// The judge: a reward model on the other partition, used only to evaluate.
    Judge,
    Label,
    Value,
    Export,
    /// The static-RE steering vector, fitted on the labelled rollouts.
    Steer,
    /// Train-side prompts after the rollouts', for tuning.
    ValidationPrompts,
    /// A tuned method's knob chosen on the validation prompts.
    Sweep(Method),
    Prompts(PromptSet),
    Generate(PromptSet, Method),
    Eval(PromptSet),
}

impl Stage {
    /// Every stage, in the order it runs (each after the stages it reads).
    pub fn chain() -> Vec<Stage> {
        let sets = [PromptSet::Hh, PromptSet::HarmfulQa];
        let mut chain = vec![
            Self::Model,
            Self::Rollout,
            Self::Reward,
            Self::Judge,
            Self::Label,
            Self::Value,
            Self::Export,
            Self::Steer,
            Self::ValidationPrompts,
        ];
        chain.extend(Method::TUNED.map(Self::Sweep));
        chain.extend(sets.map(Self::Prompts));
        for set in sets {
            chain.extend(set.methods().iter().map(|&m| Self::Generate(set, m)));
        }
        chain.extend(sets.map(Self::Eval));
        chain
    }

    /// The stage's name (stamps and progress lines).
    pub fn name(self) -> String {
        match self {
            Self::Model => "model".into(),
            Self::Rollout => "rollout".into(),
            Self::Reward => "reward".into(),
            Self::Judge => "judge".into(),
            Self::Label => "label".into(),
            Self::Value => "value".into(),
            Self::Export => "export".into(),
            Self::Steer => "steer".into(),
            Self::ValidationPrompts => "validation-prompts".into(),
            Self::Sweep(m) => format!("sweep-{}", m.name()),
            Self::Prompts(PromptSet::Hh) => "prompts".into(),
            Self::Prompts(PromptSet::HarmfulQa) => "ood-prompts".into(),
            Self::Generate(set, m) => format!("generate-{}-{}", set.name(), m.name()),
            Self::Eval(PromptSet::Hh) => "report".into(),
            Self::Eval(PromptSet::HarmfulQa) => "report-ood".into(),
        }
    }

    /// The `recontrol` subcommand that does the same work on its own (none for the model
    /// check: `scripts/setup.sh` imports the model with `recontrol lm import-gguf`).
    pub fn command(self) -> Option<&'static str> {
        Some(match self {
            Self::Model => return None,
            Self::Rollout => "rollout",
            Self::Reward | Self::Judge => "reward train",
            Self::Label => "reward label",
            Self::Value => "value train",
            Self::Export => "export",
            Self::Steer => "steer fit",
            Self::ValidationPrompts | Self::Prompts(_) => "data prompts",
            Self::Sweep(_) => "sweep",
            Self::Generate(..) => "generate",
            Self::Eval(_) => "eval",
        })
    }

    /// The artifacts a method decodes with, besides the model and its prompts.
    fn method_inputs(m: Method) -> Vec<Stage> {
        match m {
            Method::Base | Method::Prompting => vec![],
            Method::StaticRe => vec![Self::Steer],
            Method::BestOfN | Method::Args => vec![Self::Reward],
            Method::ValueGuided | Method::ReControl | Method::ReControlPrompting => {
                vec![Self::Export]
            }
        }
    }

    /// The stages whose outputs this one reads.
    pub fn inputs(self) -> Vec<Stage> {
        match self {
            Self::Model => vec![],
            Self::Rollout
            | Self::Reward
            | Self::Judge
            | Self::Prompts(_)
            | Self::ValidationPrompts => vec![Self::Model],
            Self::Label => vec![Self::Rollout, Self::Reward],
            Self::Value | Self::Steer => vec![Self::Label],
            Self::Export => vec![Self::Value],
            Self::Sweep(m) => {
                let mut inputs = vec![Self::Model, Self::ValidationPrompts, Self::Reward];
                inputs.extend(Self::method_inputs(m));
                inputs.dedup();
                inputs
            }
            Self::Generate(set, m) => {
                let mut inputs = vec![Self::Model, Self::Prompts(set)];
                inputs.extend(Self::method_inputs(m));
                inputs.extend(m.tuned_by().map(Self::Sweep));
                inputs
            }
            Self::Eval(set) => {
                let mut inputs: Vec<Stage> = set
                    .methods()
                    .iter()
                    .map(|&m| Self::Generate(set, m))
                    .collect();
                inputs.extend([Self::Reward, Self::Judge, Self::Model]);
                inputs
            }
        }
    }

    /// Whether an interrupted run continues from its checkpoint (or finished parts).
    pub fn resumable(self) -> bool {
        matches!(
            self,
            Self::Rollout | Self::Reward | Self::Judge | Self::Value
        )
    }

    /// Where the stage writes, inside the demo's folder.
    pub fn output(self, out: &Path) -> PathBuf {
        match self {
            Self::Model => out.join("model.json"),
            Self::Rollout => out.join("rollouts.h5"),
            Self::Reward => out.join("reward"),
            Self::Judge => out.join("judge"),
            Self::Label => out.join("labelled.h5"),
            Self::Value => out.join("value"),
            Self::Export => out.join("onnx"),
            Self::Steer => out.join("steer.safetensors"),
            Self::ValidationPrompts => out.join("prompts-validation.jsonl"),
            Self::Sweep(m) => out.join("sweeps").join(m.name()),
            Self::Prompts(PromptSet::Hh) => out.join("prompts.jsonl"),
            Self::Prompts(PromptSet::HarmfulQa) => out.join("prompts-harmfulqa.jsonl"),
            Self::Generate(set, m) => out
                .join("generations")
                .join(set.name())
                .join(format!("{}.jsonl", m.name())),
            Self::Eval(PromptSet::Hh) => out.join("report"),
            Self::Eval(PromptSet::HarmfulQa) => out.join("report-ood"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_comes_after_its_inputs_and_has_its_own_output() {
        let chain = Stage::chain();
        assert_eq!(chain.len(), 30);
        for (i, stage) in chain.iter().enumerate() {
            for input in stage.inputs() {
                let at = chain.iter().position(|s| *s == input).expect("in chain");
                assert!(at < i, "{} reads {}", stage.name(), input.name());
            }
        }
        let out = Path::new("d");
        let mut outputs: Vec<PathBuf> = chain.iter().map(|s| s.output(out)).collect();
        let mut names: Vec<String> = chain.iter().map(|s| s.name()).collect();
        outputs.sort();
        outputs.dedup();
        names.sort();
        names.dedup();
        assert_eq!((outputs.len(), names.len()), (30, 30));
        assert_eq!(
            Stage::Generate(PromptSet::HarmfulQa, Method::ReControl).name(),
            "generate-harmfulqa-re-control"
        );
    }

    #[test]
    fn methods_say_what_they_add() {
        let flags: Vec<(bool, bool)> = PromptSet::Hh
            .methods()
            .iter()
            .map(|m| (m.controlled(), m.prompted()))
            .collect();
        assert_eq!(
            flags,
            [
                (false, false),
                (false, true),
                (false, false),
                (false, false),
                (false, false),
                (false, false),
                (true, false),
                (true, true)
            ]
        );
        // Every tuned method has its sweep in the chain, before the generations it tunes.
        let chain = Stage::chain();
        for m in PromptSet::Hh.methods() {
            if let Some(t) = m.tuned_by() {
                assert!(chain.contains(&Stage::Sweep(t)), "{}", m.name());
            }
        }
        // The judge is read by the reports, never by a method or a sweep.
        for stage in &chain {
            let judged = stage.inputs().contains(&Stage::Judge);
            assert_eq!(judged, matches!(stage, Stage::Eval(_)), "{}", stage.name());
        }
    }

    #[test]
    fn the_configuration_refuses_unknown_keys_and_fills_defaults() {
        let config =
            DemoConfig::from_toml("[rollout]\nlimit = 5\n[rollout.decoding]\ntemperature = 1.0\n")
                .expect("parse");
        assert_eq!(config.rollout.limit, Some(5));
        assert_eq!(config.rollout.decoding.temperature, 1.0);
        assert_eq!(config.export, ExportStage::default());
        let err = DemoConfig::from_toml("[model]\nargs = 3\n").expect_err("unknown key");
        assert!(err.contains("args"), "{err}");
        assert!(!err.contains('\n'));
    }
}
