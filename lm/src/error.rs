//! The crate's error type: one variant per thing a user's directory, file or flag can get wrong.

use std::path::PathBuf;

/// Errors from loading and running a causal LM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A CPU kernel was handed tensors it does not take (a bug, not a user's input).
    #[error("internal: {0}")]
    Kernel(String),

    #[error("model directory {0} does not exist or is not a directory")]
    MissingModelDir(PathBuf),

    #[error("{path}: missing; a model directory needs {what}")]
    MissingFile { path: PathBuf, what: &'static str },

    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: tensor {name} has NaN or Inf values (as {kind})")]
    NonFiniteTensor {
        path: PathBuf,
        name: String,
        kind: String,
    },

    #[error("{path}: field `{field}`: {message}")]
    JsonField {
        path: PathBuf,
        field: String,
        message: String,
    },

    #[error("{path}: unsupported model_type {found:?}; supported: {supported}")]
    UnsupportedModelType {
        path: PathBuf,
        found: String,
        supported: &'static str,
    },

    #[error("{path}: {message}")]
    InvalidConfig { path: PathBuf, message: String },

    #[error("{path}: malformed safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error(
        "{index}: shard {shard:?} is not a file inside the model directory; refusing to read it"
    )]
    ShardOutsideModelDir { index: PathBuf, shard: String },

    #[error("{dir}: tensor {name:?} is missing from the checkpoint")]
    MissingTensor { dir: PathBuf, name: String },

    #[error(
        "{layer}: the mixture-of-experts weights are incomplete: {missing} is missing (a layer of {experts} experts needs block_sparse_moe.gate.weight and block_sparse_moe.experts.N.w1/w2/w3 for every N, or mlp.gate.weight, mlp.experts.gate_up_proj and mlp.experts.down_proj)"
    )]
    MissingExpertTensors {
        layer: String,
        missing: String,
        experts: usize,
    },

    #[error("{dir}: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        dir: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },

    #[error("{dir}: tensor {name:?} has unsupported dtype {dtype}")]
    TensorDtype {
        dir: PathBuf,
        name: String,
        dtype: String,
    },

    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("invalid device {0:?}: expected cpu, cuda or cuda:N")]
    InvalidDevice(String),

    #[error("device {requested} requested but {available}")]
    DeviceUnavailable {
        requested: String,
        available: String,
    },

    #[error("invalid dtype {0:?}: expected f32, bf16 or f16")]
    InvalidDtype(String),

    #[error("invalid generation settings: {0}")]
    InvalidGeneration(String),

    #[error("prompt {index} is empty after tokenisation")]
    EmptyPrompt { index: usize },

    #[error(
        "prompt {index} has {tokens} tokens plus {new} new ones, over the model's {max} positions"
    )]
    PromptTooLong {
        index: usize,
        tokens: usize,
        new: usize,
        max: usize,
    },

    #[error(
        "a forward pass crosses LongRoPE's original_max_position_embeddings ({original}) on a KV cache that kept no token ids to run again: make the cache with CausalLm::new_cache"
    )]
    CacheKeptNoTokens { original: i64 },

    #[error("this model was loaded without its LM head (a backbone); it has no logits")]
    NoLmHead,

    #[error("checkpoint: {0}")]
    Checkpoint(String),

    #[error("training: {0}")]
    Training(String),

    #[error("hidden-state hook failed: {0}")]
    Hook(#[source] Box<dyn std::error::Error + Send + Sync>),

    #[error("hidden-state hook returned shape {found:?}, expected {expected:?}")]
    HookShape { expected: Vec<i64>, found: Vec<i64> },

    #[error(transparent)]
    Train(#[from] recontrol_train::Error),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("{path}: {message}")]
    Corpus { path: PathBuf, message: String },

    #[error(transparent)]
    Data(#[from] recontrol_data::Error),

    #[error(transparent)]
    Output(#[from] recontrol_io::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tokenizer(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::Tokenizer {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}
