//! The training harness shared by pretraining, reward and value training, written once.
//!
//! - [`optim`]: AdamW with its state held as named tensors (so checkpoints resume exactly), the
//!   warmup + cosine learning-rate schedule, and global gradient-norm clipping.
//! - [`checkpoint`]: parameters, moments and a JSON training state in one safetensors file,
//!   written atomically; [`write_safetensors`] for model weights.
//! - [`run`]: [`RunControl`] (checkpoint, resume, a cap on this call's epochs or steps) and
//!   [`EpochLoop`], the resumable epoch loop of reward and value training: it continues an
//!   interrupted run exactly, refuses a checkpoint made with other settings, saves one after
//!   every epoch and stops at the cap.

pub mod checkpoint;
pub mod optim;
pub mod run;

use std::path::PathBuf;

pub use checkpoint::{write_safetensors, Tensors};
pub use optim::{cosine_lr, AdamW, AdamWConfig};
pub use run::{EpochLoop, Finished, Flow, RunControl};

/// Errors of training runs and their checkpoints; each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{checkpoint} was made with other settings; resume with the same flags, or remove it")]
    OtherSettings { checkpoint: PathBuf },

    #[error("{checkpoint}: lacks tensor {name:?}")]
    MissingTensor { checkpoint: PathBuf, name: String },

    #[error("{checkpoint}: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        checkpoint: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },

    #[error("checkpoint lacks optimizer state {name:?}")]
    MissingOptimizerState { name: String },

    #[error("optimizer state {name:?} has shape {found:?}, expected {expected:?}")]
    OptimizerStateShape {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },

    #[error("{path}: {message}")]
    Malformed { path: PathBuf, message: String },

    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: cannot write: {message}")]
    Write { path: PathBuf, message: String },

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
