//! ONNX artifacts for RE-Control value heads, and the ONNX Runtime that runs them. This crate
//! does not depend on libtorch.
//!
//! - [`value_dir`]: the value directory format (config + safetensors weights), read and checked.
//! - [`graph`]: a small ONNX graph builder over the prost types in [`proto`] (generated from the
//!   official `onnx.proto` by `scripts/gen_onnx_proto.sh`, checked in).
//! - [`graphs`]: `value.onnx`, `value_grad.onnx` (the backward pass written out as ONNX ops)
//!   and `controller.onnx` (RE-Control's gradient steps, unrolled).
//! - [`metadata`]: the metadata every exported graph carries, written and parsed back as one
//!   type ([`GraphMetadata`]).
//! - [`artifact`]: the export directory with its [`Manifest`], and `inspect`.
//! - [`runner`]: running the graphs with ONNX Runtime, on its CUDA execution provider when
//!   asked and available, else on the CPU.
//! - [`runtime`]: finding and loading ONNX Runtime at run time (the project venv's
//!   `onnxruntime` wheel, or any onnxruntime / onnxruntime-gpu a user points at).

pub mod artifact;
pub mod graph;
pub mod graphs;
pub mod metadata;
#[rustfmt::skip]
#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod proto;
pub mod runner;
pub mod runtime;
pub mod value_dir;

pub use artifact::{
    build_model, inspect, write_export, FileEntry, Manifest, ManifestFiles, ModelSummary, Producer,
};
pub use graphs::ControllerSpec;
pub use metadata::{GraphKind, GraphMetadata};
pub use runner::{Controlled, GraphSession};
pub use runtime::{locate_onnxruntime, OrtRuntime};
pub use value_dir::{Activation, Target, ValueConfig, ValueDir};

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "ONNX Runtime not found: pass --onnxruntime PATH or set {env} to a libonnxruntime.so \
         (searched: {searched})"
    )]
    OnnxRuntimeNotFound { env: &'static str, searched: String },

    #[error("{path}: cannot load ONNX Runtime: {message}")]
    OnnxRuntimeLoad { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },

    #[error("{path}: exists; remove it or choose another name")]
    Exists { path: PathBuf },

    #[error(transparent)]
    Output(#[from] recontrol_io::Error),

    /// A graph without one of the metadata keys recontrol writes.
    #[error("{path}: no `{key}` metadata: not exported by recontrol")]
    MissingMetadata { path: PathBuf, key: &'static str },

    /// A key (of ONNX metadata, a manifest or a value config) whose value is not what it
    /// should be.
    #[error("{path}: `{key}` is {found}, not {expected}")]
    BadValue {
        path: PathBuf,
        key: &'static str,
        expected: String,
        found: String,
    },

    #[error(
        "{path}: no `target` (nor `training.config.target`): the Bellman target the value net \
         was trained with is not recorded"
    )]
    NoTarget { path: PathBuf },

    #[error("lambda must be in [0, 1], got {lambda}")]
    LambdaOutOfRange { lambda: f64 },

    #[error("{path}: ONNX Runtime: {source}")]
    Runtime {
        path: PathBuf,
        #[source]
        source: ort::Error,
    },

    #[error("{path}: {values} hidden values for a batch of {batch}")]
    BatchShape {
        path: PathBuf,
        values: usize,
        batch: usize,
    },

    #[error("{path}: the graph has no output `{name}`")]
    NoOutput { path: PathBuf, name: &'static str },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
