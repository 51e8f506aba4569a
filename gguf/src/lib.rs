//! GGUF (llama.cpp) files: a reader, a dequantizer to f32 and an importer to a Hugging Face
//! model directory.
//!
//! - [`GgufFile::open`] parses and checks a file (GGUF v2 and v3): [`Metadata`] with typed
//!   accessors, [`TensorInfo`]s, and the tensor data through a memory map.
//! - [`GgufFile::dequantize`] turns a tensor into f32, bit for bit as gguf-py (and so HF
//!   transformers) does, for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.
//!
//! A GGUF file is untrusted input: every count, length, dimension and offset is checked
//! against the file's size before anything is allocated, and a bad file gets one error that
//! names the problem.

mod error;
mod file;
pub mod ggml_type;
pub mod header;
pub mod metadata;
pub mod quant;

pub use error::{Error, FormatError, Result};
pub use file::GgufFile;
pub use ggml_type::GgmlType;
pub use header::{Header, TensorInfo};
pub use metadata::{Array, Metadata, Value, ValueType};
