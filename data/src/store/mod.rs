//! The HDF5 rollout store. This module owns every HDF5 call of the project.
//!
//! Layout (format version 1):
//!
//! | dataset | type | shape | meaning |
//! |---|---|---|---|
//! | `states` | f32 or f16, chunked + deflate | `[S, hidden]` | final post-norm hidden states |
//! | `rollout_offsets` | i64 | `[R+1]` | rollout i owns state rows `rollout_offsets[i]..rollout_offsets[i+1]` |
//! | `response_tokens` | i64 | `[N]` | generated token ids of all rollouts |
//! | `token_offsets` | i64 | `[R+1]` | rollout i's tokens are `token_offsets[i]..token_offsets[i+1]` |
//! | `prompt_index` | i64 | `[R]` | record index in the source dataset |
//! | `prompt`, `response` | UTF-8 strings | `[R]` | model input text, decoded response |
//! | `reward` | f32 | `[R]` | NaN until labelled |
//!
//! Row 0 of a rollout is the state at the last prompt token; row t is the state that produced
//! generated token t+1; a rollout with T tokens has T states, the last being the terminal state.
//! File attributes: `format_version`, `hidden_size`, `model`, `model_hash`, `state_dtype`,
//! `prompt_format`, `generation` (JSON), `seed`, `recontrol_version`, `dataset`, and `meta`
//! (all of it as one JSON string).
//!
//! Files of this module:
//! - `writer.rs`: [`StoreWriter`] creates a store and appends rollouts.
//! - `reader.rs`: [`Store`] opens one (its layout checked), reads rollouts, writes rewards back.
//! - `stream.rs`: [`Store::transitions`], the seeded, bounded-memory stream of training
//!   transitions.
//! - `merge.rs`: [`merge`] joins stores of the same model and settings.

mod merge;
mod reader;
mod stream;
mod writer;

use std::path::{Path, PathBuf};

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::format::PromptFormat;

pub use merge::{copy_rollouts, merge};
pub use reader::Store;
pub use stream::{
    BlockRollout, BlockTargets, RolloutBlock, StreamOptions, TransitionBatch, TransitionStream,
};
pub use writer::StoreWriter;

/// The layout version this code writes and reads.
pub const FORMAT_VERSION: i64 = 1;

/// Rows per chunk of `states` (and per block of the shuffling reader).
const CHUNK_ROWS: usize = 256;
/// Elements per chunk of the 1-D datasets.
const CHUNK_1D: usize = 4096;

/// The error a per-row target function ([`BlockTargets`]) returns.
pub type TargetError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of the rollout store; each names the file. A wrapped library error is part of the
/// message, not a `source()`, so a chain printed with `{:#}` shows it once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An HDF5 call failed (the library's message).
    #[error("{path}: {message}")]
    Hdf5 { path: PathBuf, message: String },
    #[error("{path}: no such file")]
    Missing { path: PathBuf },
    #[error("{path}: not a recontrol rollout store: {message}")]
    Layout { path: PathBuf, message: String },
    /// A rollout's states are not `[tokens, hidden]` with at least one token.
    #[error(
        "{path}: rollout of prompt {prompt_index} has states [{rows}, {hidden}] for {tokens} tokens; the store needs [tokens, {store_hidden}] with at least one token"
    )]
    StatesShape {
        path: PathBuf,
        prompt_index: i64,
        rows: usize,
        hidden: usize,
        tokens: usize,
        store_hidden: usize,
    },
    /// A prompt or response text HDF5 cannot hold.
    #[error("{path}: text of prompt {prompt_index} cannot be stored: {error}")]
    Text {
        path: PathBuf,
        prompt_index: i64,
        error: hdf5::types::StringError,
    },
    /// A metadata attribute HDF5 cannot hold.
    #[error("{path}: attribute {name} cannot be stored: {error}")]
    Attribute {
        path: PathBuf,
        name: String,
        error: hdf5::types::StringError,
    },
    #[error("{path}: {error}")]
    MetaJson {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{path}: rollout {index} out of range (the store holds {len})")]
    OutOfRange {
        path: PathBuf,
        index: usize,
        len: usize,
    },
    /// A rollout filter whose length is not the store's number of rollouts.
    #[error("{path}: a filter of {filter} rollouts for a store of {rollouts}")]
    FilterLength {
        path: PathBuf,
        filter: usize,
        rollouts: usize,
    },
    /// The per-row target function failed.
    #[error("{path}: {error}")]
    Targets { path: PathBuf, error: TargetError },
    /// The per-row target function returned the wrong number of targets.
    #[error("{path}: {targets} targets for a block of {rows} rows")]
    TargetCount {
        path: PathBuf,
        targets: usize,
        rows: usize,
    },
    #[error("{out}: nothing to merge")]
    NothingToMerge { out: PathBuf },
    /// A store that cannot join the first one of a merge.
    #[error("{path}: cannot merge with {first}: {why}")]
    Incompatible {
        path: PathBuf,
        first: PathBuf,
        why: Box<Incompatibility>,
    },
    /// A finished file could not be renamed from its temporary name.
    #[error("{path}: cannot rename {temp} into place: {error}")]
    Rename {
        path: PathBuf,
        temp: PathBuf,
        error: std::io::Error,
    },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How states are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateDtype {
    F32,
    F16,
}

impl StateDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }

    fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
}

/// What a store records about how it was made. Stores can be merged or resumed only when
/// [`StoreMeta::incompatibility`] finds nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreMeta {
    pub hidden_size: usize,
    /// The model directory the states come from.
    pub model: String,
    /// The model's identity (`recontrol_lm::model_identity`: config.json, tokenizer.json and
    /// the checkpoint files' headers and edges).
    pub model_hash: String,
    pub state_dtype: StateDtype,
    /// Stored as [`PromptFormat::as_str`] (e.g. `"chat-template"`).
    pub prompt_format: PromptFormat,
    /// Generation settings (JSON).
    pub generation: serde_json::Value,
    pub seed: u64,
    pub recontrol_version: String,
    /// The source dataset.
    pub dataset: String,
}

/// Why a store cannot join another: the first setting in which their [`StoreMeta`]s differ
/// (`expected` is the receiving store's, `found` the joining one's).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Incompatibility {
    #[error("hidden size {found} differs from {expected}")]
    HiddenSize { expected: usize, found: usize },
    #[error("model {found} ({found_hash}) differs from {expected} ({expected_hash})")]
    Model {
        expected: String,
        expected_hash: String,
        found: String,
        found_hash: String,
    },
    #[error("state dtype {} differs from {}", found.as_str(), expected.as_str())]
    StateDtype {
        expected: StateDtype,
        found: StateDtype,
    },
    #[error("prompt format {} differs from {}", found.as_str(), expected.as_str())]
    PromptFormat {
        expected: PromptFormat,
        found: PromptFormat,
    },
}

impl StoreMeta {
    /// Why `other` cannot join a store with this metadata, if it cannot.
    pub fn incompatibility(&self, other: &StoreMeta) -> Option<Incompatibility> {
        if self.hidden_size != other.hidden_size {
            return Some(Incompatibility::HiddenSize {
                expected: self.hidden_size,
                found: other.hidden_size,
            });
        }
        if self.model_hash != other.model_hash {
            return Some(Incompatibility::Model {
                expected: self.model.clone(),
                expected_hash: self.model_hash.clone(),
                found: other.model.clone(),
                found_hash: other.model_hash.clone(),
            });
        }
        if self.state_dtype != other.state_dtype {
            return Some(Incompatibility::StateDtype {
                expected: self.state_dtype,
                found: other.state_dtype,
            });
        }
        if self.prompt_format != other.prompt_format {
            return Some(Incompatibility::PromptFormat {
                expected: self.prompt_format,
                found: other.prompt_format,
            });
        }
        None
    }
}

/// One rollout: a prompt, the response generated for it, and the states along the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub prompt_index: i64,
    pub prompt: String,
    pub response: String,
    pub tokens: Vec<i64>,
    /// `[tokens.len(), hidden]`.
    pub states: Array2<f32>,
    pub reward: f32,
}

/// Closing a file closes every object opened from it, so a dropped store never keeps the
/// file (and its lock) open through a stray object handle.
fn strong_close(
    fapl: &mut hdf5::plist::file_access::FileAccessBuilder,
) -> &mut hdf5::plist::file_access::FileAccessBuilder {
    fapl.fclose_degree(hdf5::plist::file_access::FileCloseDegree::Strong)
}

/// Marks `file`'s descriptor close-on-exec. HDF5 opens files without `O_CLOEXEC`, so a child
/// process started by any thread while a store is open (another test of the same binary, a
/// server's worker) inherited the descriptor and with it the file's lock: the store, closed
/// here, then refused to open for writing ("unable to lock file", errno 11) until that child
/// exited. Seen as a flaky `labelling_fills_rewards_refuses_labelled_stores_and_resumes`.
/// Best effort: a descriptor it cannot reach stays as HDF5 left it.
#[cfg(unix)]
#[allow(unsafe_code)]
fn close_on_exec(file: &hdf5::File) {
    let id = file.id();
    hdf5::sync::sync(|| {
        let mut handle: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: `id` is an open file of this process (borrowed for the call); under the
        // crate's global HDF5 lock. With the default (sec2) driver the handle points at the
        // file's `int` descriptor, which stays open as long as `file`.
        let status = unsafe {
            hdf5_sys::h5f::H5Fget_vfd_handle(id, hdf5_sys::h5p::H5P_DEFAULT, &mut handle)
        };
        if status < 0 || handle.is_null() {
            return;
        }
        // SAFETY: as above: a live `int`.
        let fd = unsafe { *(handle as *const libc::c_int) };
        // SAFETY: fcntl on a descriptor this process owns, only adding FD_CLOEXEC.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    });
}

#[cfg(not(unix))]
fn close_on_exec(_file: &hdf5::File) {}

fn hdf5_error(path: &Path) -> impl Fn(hdf5::Error) -> StoreError + '_ {
    move |e| StoreError::Hdf5 {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// `<file>.tmp` beside `path`: the name a file is written under until it is complete (a fixed
/// name, so a run that is killed and resumed overwrites its own leftovers).
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Bytes of the file (for bytes-per-state reports).
pub fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Stores the submodules' tests write and compare against.
#[cfg(test)]
mod testing {
    use super::*;

    pub(super) fn meta(hidden: usize, dtype: StateDtype) -> StoreMeta {
        StoreMeta {
            hidden_size: hidden,
            model: "m".into(),
            model_hash: "sha256:x".into(),
            state_dtype: dtype,
            prompt_format: PromptFormat::Hh,
            generation: serde_json::json!({"max_new_tokens": 4}),
            seed: 3,
            recontrol_version: "test".into(),
            dataset: "d.jsonl".into(),
        }
    }

    /// Rollout i has 1 + i % 4 states; state (i, t) is [i, t, i + t].
    pub(super) fn rollouts(n: usize) -> Vec<Rollout> {
        (0..n)
            .map(|i| {
                let t = 1 + i % 4;
                Rollout {
                    prompt_index: 100 + i as i64,
                    prompt: format!("prompt {i} ✓"),
                    response: format!("response {i}"),
                    tokens: (0..t as i64).map(|k| k + 10 * i as i64).collect(),
                    states: Array2::from_shape_fn((t, 3), |(r, c)| match c {
                        0 => i as f32,
                        1 => r as f32,
                        _ => (i + r) as f32,
                    }),
                    reward: i as f32 * 0.5,
                }
            })
            .collect()
    }

    pub(super) fn write(path: &Path, dtype: StateDtype, rs: &[Rollout]) -> Result<()> {
        let mut w = StoreWriter::create(path, &meta(3, dtype))?;
        for chunk in rs.chunks(3) {
            w.append(chunk)?;
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::meta;
    use super::*;

    /// Whether every descriptor of this process open on `path` is close-on-exec (and one is).
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn descriptors_close_on_exec(path: &Path) -> bool {
        let path = path.canonicalize().expect("canonical path");
        let mut found = 0;
        for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
            let entry = entry.expect("entry");
            if std::fs::read_link(entry.path()).ok().as_deref() != Some(path.as_path()) {
                continue;
            }
            let fd: libc::c_int = entry.file_name().to_str().expect("fd").parse().expect("fd");
            // SAFETY: F_GETFD only reads the flags of a descriptor number.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if flags < 0 || flags & libc::FD_CLOEXEC == 0 {
                return false;
            }
            found += 1;
        }
        found > 0
    }

    /// A child process must not inherit an open store (and its lock): see [`close_on_exec`].
    #[test]
    #[cfg(target_os = "linux")]
    fn open_stores_are_not_inherited_by_child_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        let writer = StoreWriter::create(&path, &meta(3, StateDtype::F32)).expect("create");
        assert!(descriptors_close_on_exec(&path), "the writer's");
        writer.finish().expect("finish");
        for rw in [false, true] {
            let store = if rw {
                Store::open_rw(&path)
            } else {
                Store::open(&path)
            }
            .expect("open");
            assert!(descriptors_close_on_exec(&path), "rw {rw}");
            drop(store);
        }
    }

    /// Each setting that keeps stores apart, with the message it gives.
    #[test]
    fn incompatibilities_name_the_first_differing_setting() {
        let ours = meta(3, StateDtype::F32);
        assert_eq!(ours.incompatibility(&ours.clone()), None);
        // Seed, generation settings and dataset may differ.
        let mut other = StoreMeta {
            seed: 9,
            generation: serde_json::json!({}),
            dataset: "e.jsonl".into(),
            ..ours.clone()
        };
        assert_eq!(ours.incompatibility(&other), None);
        other.prompt_format = PromptFormat::ChatTemplate;
        assert_eq!(
            ours.incompatibility(&other).map(|w| w.to_string()),
            Some("prompt format chat-template differs from hh".to_owned())
        );
        other.state_dtype = StateDtype::F16;
        assert_eq!(
            ours.incompatibility(&other),
            Some(Incompatibility::StateDtype {
                expected: StateDtype::F32,
                found: StateDtype::F16
            })
        );
        other.model = "n".into();
        other.model_hash = "sha256:y".into();
        assert_eq!(
            ours.incompatibility(&other).map(|w| w.to_string()),
            Some("model n (sha256:y) differs from m (sha256:x)".to_owned())
        );
        other.hidden_size = 4;
        assert_eq!(
            ours.incompatibility(&other).map(|w| w.to_string()),
            Some("hidden size 4 differs from 3".to_owned())
        );
    }

    /// The `meta` attribute keeps the prompt format's command-line name, so stores written
    /// before it was an enum still open.
    #[test]
    fn meta_json_keeps_the_prompt_format_name() -> std::result::Result<(), serde_json::Error> {
        let mut meta = meta(3, StateDtype::F16);
        meta.prompt_format = PromptFormat::ChatTemplate;
        let json = serde_json::to_value(&meta)?;
        assert_eq!(json["prompt_format"], "chat-template");
        assert_eq!(json["state_dtype"], "f16");
        for format in [
            PromptFormat::Raw,
            PromptFormat::Hh,
            PromptFormat::Vicuna,
            PromptFormat::ChatTemplate,
        ] {
            let mut json = json.clone();
            json["prompt_format"] = format.as_str().into();
            let back: StoreMeta = serde_json::from_value(json)?;
            assert_eq!(back.prompt_format, format);
        }
        Ok(())
    }
}
