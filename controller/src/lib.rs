//! Controlled generation for RE-Control: at every decoding step the LM's final post-norm
//! hidden state of each unfinished row is moved up the value function's gradient
//! (`h <- h + alpha * dV/dh`, `steps` times) before the logits are computed. The KV cache is
//! left as the LM computed it, as in the reference.
//!
//! - [`backend`]: where dV/dh comes from ([`GradientBackend`]: ONNX Runtime on the exported
//!   graphs, or libtorch on the value directory with a closed-form gradient).
//! - [`editor`]: the [`Controller`], a `recontrol_lm::HiddenStateHook` (SGD as in the paper,
//!   or Adam; optional gradient clip and edit-norm bound), with per-row edit statistics.
//! - [`artifact`]: opening `--value` (export dir, `.onnx` file or value dir) and checking it
//!   against the LM (hidden size, source-model identity).
//! - [`steer`]: static representation editing (the paper's static RE baseline): a steering
//!   vector fitted on labelled rollouts, added at every step.
//! - [`rerank`]: decoding by reranking the top-k tokens: ARGS (a reward model) and
//!   value-guided decoding (controlled decoding with our value net as the prefix scorer).
//! - [`generation`]: the generation stage ([`generate_records`]): prompts in, generation
//!   records out, by one [`Method`] (plain, RE-Control, or a baseline).

pub mod artifact;
pub mod backend;
pub mod editor;
pub mod generation;
pub mod rerank;
pub mod steer;

pub use artifact::{BackendKind, ValueArtifact};
pub use backend::{GradientBackend, OnnxBackend, TorchBackend};
pub use editor::{ControlConfig, Controller, RowStats, UpdateRule};
pub use generation::{
    generate_records, GenerationPlan, GenerationSummary, Method, RenderedPrompts,
};
pub use rerank::{ArgsReward, RerankSettings};
pub use steer::{SteerHook, SteerMeta, SteeringVector};

use std::path::PathBuf;

/// Errors of controlled generation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Export(#[from] recontrol_export::Error),
    #[error(transparent)]
    ValueNet(#[from] recontrol_value_net::Error),
    /// `--value` is none of the things a value head can be.
    #[error("{path}: expected an export directory, an .onnx file or a value directory")]
    NotAValueHead { path: PathBuf },
    #[error(
        "{path}: neither an export directory (manifest.json) nor a value directory (config.json)"
    )]
    NotAValueHeadDir { path: PathBuf },
    /// The torch backend needs weights, and the export's manifest names no value directory
    /// that still exists.
    #[error(
        "{path}: the torch backend needs the value directory (config.json + model.safetensors); \
         its manifest points to none that exists"
    )]
    NoValueDir { path: PathBuf },
    #[error("{path}: no value_grad.onnx beside it")]
    NoValueGrad { path: PathBuf },
    /// A value head or steering vector for another hidden size than the LM's.
    #[error("{path} takes hidden size {value_net}, the model's is {model}")]
    HiddenSizeMismatch {
        path: PathBuf,
        value_net: usize,
        model: usize,
    },
    /// A value head or steering vector made from another LM's states.
    #[error(
        "{path} was made from the states of model {value_net}, not this model ({model}); pass \
         --allow-foreign-value to use it anyway"
    )]
    IdentityMismatch {
        path: PathBuf,
        value_net: String,
        model: String,
    },
    /// States that are not `[rows, hidden_size]`.
    #[error("hidden states {shape:?} for a value head of hidden size {hidden_size}")]
    StateShape { shape: Vec<i64>, hidden_size: usize },
    #[error("alpha must be finite, got {alpha}")]
    AlphaNotFinite { alpha: f64 },
    /// A gradient clip or edit-norm bound that is not a positive number.
    #[error("{setting} must be positive and finite, got {value}")]
    NotPositive { setting: &'static str, value: f64 },
    #[error(transparent)]
    Lm(#[from] recontrol_lm::Error),
    #[error("prompt {index} is empty")]
    EmptyPrompt { index: usize },
    #[error("the batch size must be at least 1")]
    ZeroBatch,
    #[error("{model_prompts} model prompts given for {prompts} prompts: one per prompt expected")]
    ModelPrompts {
        prompts: usize,
        model_prompts: usize,
    },
    #[error(transparent)]
    Reward(#[from] recontrol_reward_model::Error),
    #[error(transparent)]
    Io(#[from] recontrol_io::Error),
    #[error(transparent)]
    Store(recontrol_data::StoreError),
    /// A steering vector cannot be fitted on a store.
    #[error("{path}: {message}")]
    SteerFit { path: PathBuf, message: String },
    /// A steering-vector file that cannot be read or written.
    #[error("{path}: {message}")]
    SteerFile { path: PathBuf, message: String },
    #[error("--quantile must be in (0, 0.5], got {value}")]
    Quantile { value: f64 },
    #[error("--{setting} must be finite, got {value}")]
    NotFinite { setting: &'static str, value: f64 },
    #[error("{setting} must be between 1 and the vocabulary size {vocab}, got {k}")]
    CandidateCount {
        setting: &'static str,
        k: usize,
        vocab: usize,
    },
    #[error("--best-of must be at least 1")]
    BestOfCount,
    #[error(
        "--best-of draws samples: set --temperature above 0 (greedy decoding gives N equal responses)"
    )]
    BestOfGreedy,
    #[error("{method} is greedy: --temperature must be 0")]
    GreedyOnly { method: &'static str },
    /// The caller's sink refused a batch of records (its causes kept, e.g. a full disk).
    #[error(transparent)]
    Sink(generation::SinkError),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
