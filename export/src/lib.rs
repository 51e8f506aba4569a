//! ONNX artifacts for RE-Control value heads, and the ONNX Runtime that runs them. This crate
//! does not depend on libtorch.
//!
//! - [`value_dir`]: the value directory format (config + safetensors weights), read and checked.
//! - [`graph`]: a small ONNX graph builder over the prost types in [`proto`] (generated from the
//!   official `onnx.proto` by `scripts/gen_onnx_proto.sh`, checked in).
//! - [`graphs`]: `value.onnx`, `value_grad.onnx` (the backward pass written out as ONNX ops)
//!   and `controller.onnx` (RE-Control's gradient steps, unrolled).
//! - [`artifact`]: the export directory with its manifest, and `inspect`.
//! - [`runner`]: running the graphs with ONNX Runtime.
//! - [`runtime`]: finding and loading ONNX Runtime at run time (the project venv's
//!   `onnxruntime` wheel, or any onnxruntime / onnxruntime-gpu a user points at).

pub mod artifact;
pub mod graph;
pub mod graphs;
#[rustfmt::skip]
#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod proto;
pub mod runner;
pub mod runtime;
pub mod value_dir;

pub use artifact::{inspect, write_export, ModelSummary, Producer};
pub use graphs::ControllerSpec;
pub use runner::{Controlled, GraphSession};
pub use runtime::{locate_onnxruntime, OrtRuntime};
pub use value_dir::{Activation, ValueConfig, ValueDir};

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

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
