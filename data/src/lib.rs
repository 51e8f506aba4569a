//! Datasets, prompt formats and the HDF5 rollout store of recontrol.
//!
//! - [`datasets`]: HH-RLHF preference pairs, HarmfulQA questions, generic JSONL with field names.
//! - [`split`]: seeded, deterministic train/test splits; [`selection`]: the records a stage
//!   uses (side, limit, shard) and the prompts file.
//! - [`format`]: prompt formats (raw, hh, vicuna, chat-template, with the paper's optional
//!   instruction) and the one truncation rule for responses.
//! - [`store`]: the streaming HDF5 rollout store (states, offsets, tokens, texts, rewards).
//! - [`generation`]: the generation record (one line of a generations JSONL file).
//! - [`metrics`]: the evaluation formulas (rep-n, diversity, bootstrap intervals, win rates).
//!
//! This crate does not depend on libtorch.

pub mod datasets;
pub mod dialogue;
pub mod format;
pub mod generation;
pub mod jsonl;
pub mod metrics;
pub mod rollout;
pub mod selection;
pub mod split;
pub mod stats;
pub mod store;

pub use datasets::{
    Dataset, DatasetKind, Fields, PreferencePair, PromptRecord, ReadOptions, ReadReport,
};
pub use dialogue::{Dialogue, Role, Turn};
pub use format::{
    dialogue_document, render_prompt, truncate_response, ChatRenderer, PromptFormat,
    HELPFUL_INSTRUCTION,
};
pub use generation::{read_generations, EditStats, GenerationRecord};
pub use jsonl::read_prompts;
pub use split::{Split, SplitSpec};
pub use store::{Rollout, StateDtype, Store, StoreError, StoreMeta, StoreWriter};

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
