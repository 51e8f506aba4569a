//! Controlled generation for RE-Control: at every decoding step the LM's final post-norm
//! hidden state of each unfinished row is moved up the value function's gradient
//! (`h <- h + alpha * dV/dh`, `steps` times) before the logits are computed. The KV cache is
//! left as the LM computed it, as in the reference.
//!
//! - [`backend`]: where dV/dh comes from ([`GradientBackend`]: ONNX Runtime on the exported
//!   graphs, or libtorch autograd on the value directory).
//! - [`editor`]: the [`Controller`], a `recontrol_lm::HiddenStateHook` (SGD as in the paper,
//!   or Adam; optional gradient clip and edit-norm bound), with per-row edit statistics.
//! - [`artifact`]: opening `--value` (export dir, `.onnx` file or value dir) and checking it
//!   against the LM (hidden size, source-model identity).
//! - [`generation`]: the generation stage ([`generate_records`]): prompts in, generation
//!   records out, plain or controlled.

pub mod artifact;
pub mod backend;
pub mod editor;
pub mod generation;

pub use artifact::{BackendKind, ValueArtifact};
pub use backend::{GradientBackend, OnnxBackend, TorchBackend};
pub use editor::{ControlConfig, Controller, RowStats, UpdateRule};
pub use generation::{generate_records, GenerationPlan, GenerationSummary};

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
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// A value head that does not fit the loaded LM.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Shape(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Lm(#[from] recontrol_lm::Error),
    #[error("prompt {index} is empty")]
    EmptyPrompt { index: usize },
    /// The caller's sink refused a batch of records.
    #[error("{0}")]
    Sink(generation::SinkError),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
