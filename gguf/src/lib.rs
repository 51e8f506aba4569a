//! GGUF (llama.cpp) files: a reader, a dequantizer to f32 and an importer to a Hugging Face
//! model directory.
//!
//! A GGUF file is untrusted input: every count, length, dimension and offset is checked
//! against the file's size before anything is allocated, and a bad file gets one error that
//! names the problem.

mod error;
pub mod ggml_type;
pub mod metadata;

pub use error::{Error, FormatError, Result};
pub use ggml_type::GgmlType;
pub use metadata::{Array, Metadata, Value, ValueType};
