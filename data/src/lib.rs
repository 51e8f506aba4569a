//! Datasets, prompt formats and the HDF5 rollout store of recontrol.
//!
//! - [`datasets`]: HH-RLHF preference pairs, HarmfulQA questions, generic JSONL with field names.
//! - [`split`]: seeded, deterministic train/test splits; [`selection`]: the records a stage
//!   uses (side, limit, shard) and the prompts file.
//! - [`format`](mod@format): prompt formats (raw, hh, vicuna, chat-template, with the paper's optional
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
pub use generation::{read_generations, BestOf, EditStats, GenerationRecord};
pub use jsonl::read_prompts;
pub use split::{Split, SplitSpec};
pub use store::{Rollout, StateDtype, Store, StoreError, StoreMeta, StoreWriter};

use std::path::PathBuf;

/// Errors of reading data files (each names the file, and line, at fault), of parsing
/// dialogues and of rendering prompts. The rollout store has its own [`StoreError`].
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
    /// HH-format text where a turn marker should be; `found` is the text's next 30 characters.
    #[error("expected \"Human:\" or \"Assistant:\" turn, found {found:?}")]
    TurnMarker { found: String },
    /// HH-format text without a single turn.
    #[error("no turns")]
    NoTurns,
    /// [`PromptFormat::ChatTemplate`] asked for without a model to render it.
    #[error("the chat-template format needs a model with a chat template")]
    NoChatRenderer,
    /// A model's chat template failed on a dialogue (the [`ChatRenderer`]'s own error).
    #[error(transparent)]
    ChatTemplate {
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A split whose test side is not a share.
    #[error("test fraction must be in [0, 1], got {0}")]
    TestFraction(f64),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
