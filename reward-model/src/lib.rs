//! Rewards for RE-Control: Bradley-Terry reward models trained on preference pairs (an LM
//! backbone plus a scalar head, the layout of Hugging Face `LlamaForSequenceClassification`),
//! and rule-based rewards from a small TOML spec. Both score `prompt + truncated response`
//! (the shared truncation rule of `recontrol_data::truncate_response`).
//!
//! [`stage`] holds the stages as library calls: pair preparation, training, store labelling.

pub mod features;
pub mod loss;
pub mod model;
pub mod partition;
pub mod rules;
pub mod stage;
pub mod train;

pub use features::FeatureMemo;
pub use loss::bradley_terry_loss;
pub use model::RewardModel;
pub use partition::{Partition, PartitionError};
pub use rules::RuleReward;

use std::path::{Path, PathBuf};

/// Errors of reward models and rules; each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Lm(#[from] recontrol_lm::Error),
    /// A reward that is not a finite number (a store would read it as unlabelled).
    #[error("{source_name} gave rollout {index} the reward {value}; rewards must be finite")]
    NonFiniteReward {
        source_name: String,
        index: usize,
        value: f32,
    },
    #[error(transparent)]
    Train(#[from] recontrol_train::Error),
    #[error(transparent)]
    Output(#[from] recontrol_io::Error),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("the reward of text {index} is {value}; rewards must be finite")]
    NonFinite { index: usize, value: f32 },
    #[error("no texts to encode")]
    EmptyBatch,
    /// A text of a batch that tokenises to no tokens at all.
    #[error("text {index} of the batch tokenises to nothing")]
    EmptyText { index: usize },
    #[error("{path}: a reward model has one output label, this one has {labels}")]
    LabelCount { path: PathBuf, labels: u64 },
    #[error("{path}: no score.weight: not a sequence-classification (reward) model")]
    NoScoreHead { path: PathBuf },
    /// A rules setting (`bias`, a term's `weight`) that is not a finite number.
    #[error("{path}: {setting} must be finite, got {value}")]
    NotFinite {
        path: PathBuf,
        setting: &'static str,
        value: f64,
    },
    #[error("training: {0}")]
    Training(String),
    #[error("{train} training and {heldout} held-out pairs; both sides need some")]
    EmptySide { train: usize, heldout: usize },
    #[error(transparent)]
    Store(recontrol_data::StoreError),
    #[error(transparent)]
    Data(#[from] recontrol_data::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

/// Something that scores (prompt, response) pairs: a reward model or rules.
pub trait RewardSource {
    /// Rewards of `prompt + truncate_response(response)` for each pair.
    fn score(&mut self, pairs: &[(String, String)]) -> Result<Vec<f32>>;

    /// What to record as the reward's identity (a path and a hash or the rules).
    fn describe(&self) -> String;
}

/// The text a reward scores: the prompt followed by the response cut by the shared rule.
pub fn scored_text(prompt: &str, response: &str) -> String {
    format!("{prompt}{}", recontrol_data::truncate_response(response))
}

/// A loaded reward: rules or a model.
#[derive(Debug)]
pub enum LoadedReward {
    Rules(RuleReward),
    Model(Box<RewardModel>),
}

impl LoadedReward {
    /// Loads a `.toml` file of rules, or a reward model directory (float32).
    pub fn load(path: &Path, device: recontrol_lm::DeviceSpec) -> Result<Self> {
        if path.is_file() && path.extension().is_some_and(|e| e == "toml") {
            Ok(Self::Rules(RuleReward::from_file(path)?))
        } else {
            Ok(Self::Model(Box::new(RewardModel::load(
                path,
                device,
                recontrol_lm::DType::F32,
            )?)))
        }
    }

    /// When both are reward models on the same backbone (e.g. a policy reward model and a
    /// judge), they share computed features, so a text both score runs through it once.
    /// Returns whether they do.
    pub fn share_features_with(&mut self, other: &mut LoadedReward) -> Result<bool> {
        match (self, other) {
            (Self::Model(a), Self::Model(b)) => a.share_features(b),
            _ => Ok(false),
        }
    }

    pub fn boxed(self) -> Box<dyn RewardSource> {
        match self {
            Self::Rules(r) => Box::new(r),
            Self::Model(m) => m,
        }
    }
}

/// Loads a reward: a `.toml` file of rules, or a reward model directory.
pub fn load_reward(path: &Path, device: recontrol_lm::DeviceSpec) -> Result<Box<dyn RewardSource>> {
    Ok(LoadedReward::load(path, device)?.boxed())
}
