//! ONNX artifacts for RE-Control value heads, and the ONNX Runtime that runs them.
//!
//! Today: [`runtime`], which finds and loads ONNX Runtime at run time (the project venv's
//! `onnxruntime` wheel, or any onnxruntime / onnxruntime-gpu a user points at). The writers of
//! `value.onnx`, `value_grad.onnx` and `controller.onnx` come with the export issue. This crate
//! does not depend on libtorch.

pub mod runtime;

pub use runtime::{locate_onnxruntime, OrtRuntime};

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
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
