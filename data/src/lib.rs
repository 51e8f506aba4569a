//! Datasets and prompt inputs for recontrol.
//!
//! Today: JSONL prompt files (`{"prompt": ...}` per line, or any field). The dataset readers
//! (HH-RLHF, HarmfulQA), prompt formats and the HDF5 rollout store come with the rollout issue.

pub mod jsonl;

pub use jsonl::read_prompts;

use std::path::PathBuf;

/// Errors from reading data files; each names the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}:{line}: {message}")]
    Record {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: no records")]
    Empty { path: PathBuf },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
