//! Value functions on LM hidden states for RE-Control.
//!
//! - [`mlp`]: the value MLP (configurable depth, width, activation; PyTorch `nn.Linear` naming
//!   `layers.{i}.weight` / `layers.{i}.bias`; reward normalisation so V comes back in reward
//!   units) and its `config.json`.
//! - [`loss`]: the Bellman loss, written once: the terminal state regresses the reward, every
//!   other state the stop-gradient value of its successor, its TD(lambda) return or the
//!   Monte-Carlo return.
//! - [`train`]: streaming training from the rollout store (bounded memory, seeded split by
//!   rollout, early stopping, resumable checkpoints) and evaluation.
//! - [`stage`]: the value stage as one call: settings in, the value directory's model out.

pub mod grad;
pub mod loss;
pub mod mlp;
pub mod stage;
pub mod train;

pub use loss::{bellman_loss, lambda_returns, td0_target, Target};
pub use mlp::{Activation, ValueConfig, ValueMlp, ValueModel};

use std::path::PathBuf;

/// Errors of value networks; each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Train(#[from] recontrol_train::Error),
    #[error(transparent)]
    Output(#[from] recontrol_io::Error),
    #[error(transparent)]
    Store(#[from] recontrol_data::StoreError),
    #[error(transparent)]
    Format(#[from] recontrol_export::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("val fraction must be in [0, 1), got {0}")]
    ValFraction(f64),
    #[error("training record: {0}")]
    Json(#[from] serde_json::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The PyTorch golden values of `tests/fixtures/value/make_value_fixtures.py`.
#[cfg(test)]
pub(crate) fn golden() -> std::collections::HashMap<String, tch::Tensor> {
    let path =
        recontrol_tests::repo_root().join("tests/fixtures/generated/value/golden.safetensors");
    tch::Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fixtures.sh)", path.display()))
        .into_iter()
        .collect()
}
