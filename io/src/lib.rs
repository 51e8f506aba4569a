//! How recontrol writes its outputs, written once for every stage.
//!
//! - [`atomic`]: a file or a folder appears complete or not at all. Files are written under a
//!   temporary name in their folder and renamed when complete ([`write_atomic`],
//!   [`write_json_atomic`]); folders are filled under a hidden temporary name beside their
//!   place and renamed into it by [`AtomicDir::commit`].
//! - [`jsonl`]: [`JsonlSink`], records as JSON lines to a file (atomically) or standard output.
//! - [`run`]: names beside an output (`OUT.work`, `FILE.config.json`), the folders of a
//!   resumable training run ([`WorkDirs`]) and the [`Provenance`] recorded with every output.
//!
//! This crate does not depend on libtorch or HDF5.

pub mod atomic;
pub mod jsonl;
pub mod run;

use std::path::PathBuf;

pub use atomic::{existing_folder, write_atomic, write_json_atomic, AtomicDir};
pub use jsonl::JsonlSink;
pub use run::{already_complete, config_path, sibling, work_dir, Provenance, WorkDirs};

/// Errors of writing outputs; each names the file or folder at fault. The underlying I/O or
/// JSON error is the [`source`](std::error::Error::source), not repeated in the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: folder {dir} does not exist")]
    MissingFolder { file: PathBuf, dir: PathBuf },

    #[error("{path}: is a folder; expected a file name")]
    IsAFolder { path: PathBuf },

    #[error("{path}: exists; remove it or choose another name")]
    Exists { path: PathBuf },

    #[error("{path}: names no file or folder")]
    NoFileName { path: PathBuf },

    #[error("{file}: cannot create a file in {dir}")]
    CreateFile {
        file: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot create {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: cannot write")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: cannot rename the finished output into place")]
    Rename {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: cannot write JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("cannot write a record to standard output")]
    Stdout(#[source] std::io::Error),

    #[error("cannot serialise a record")]
    Record(#[source] serde_json::Error),

    #[error("{work} holds an interrupted run; pass --resume to continue it, or remove it")]
    InterruptedRun { work: PathBuf },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
