//! Errors of the evaluation; each names the file or what is missing.

use std::path::PathBuf;

/// Errors of the evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no generation files to evaluate")]
    NoMethods,
    #[error("{file}: no generations")]
    NoGenerations { file: PathBuf },
    #[error("{file}: {len} generations, the base ({base_file}) has {base_len}")]
    LengthMismatch {
        file: PathBuf,
        len: usize,
        base_file: PathBuf,
        base_len: usize,
    },
    #[error("{file}:{line}: its prompt differs from the base's at that line")]
    PromptMismatch { file: PathBuf, line: usize },
    #[error("{missing} of {prompts} prompts have no reference")]
    MissingReferences { missing: usize, prompts: usize },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] recontrol_data::Error),
    #[error(transparent)]
    Lm(#[from] recontrol_lm::Error),
    #[error(transparent)]
    Reward(#[from] recontrol_reward_model::Error),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("report: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Output(#[from] recontrol_io::Error),
    /// A chart the plotting library could not draw.
    #[error("chart: {0}")]
    Chart(String),
    #[error("knob chart: {knob} needs finite values, got {values:?}")]
    KnobValues { knob: String, values: Vec<f64> },
    #[error("knob chart: series {series:?} has {len} values for {knob_values} knob values")]
    KnobSeriesLength {
        series: String,
        len: usize,
        knob_values: usize,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
