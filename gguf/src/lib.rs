//! GGUF (llama.cpp) files: a reader, a dequantizer to f32 and an importer to a Hugging Face
//! model directory.
//!
//! - [`GgufFile::open`] parses and checks a file (GGUF v2 and v3): [`Metadata`] with typed
//!   accessors, [`TensorInfo`]s, and the tensor data through a memory map ([`header`]).
//! - [`GgufFile::dequantize`] turns a tensor into f32, bit for bit as gguf-py (and so HF
//!   transformers) does, for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
//!   ([`quant`]).
//! - [`import_gguf`] writes a llama, mistral or qwen2 model as an HF model directory
//!   ([`config`] for `config.json`, [`tensor_map`] for the weights, [`tokenizer`] for
//!   `tokenizer.json`).
//!
//! A GGUF file is untrusted input: every count, length, dimension and offset is checked
//! against the file's size before anything is allocated, and a bad file gets one error that
//! names the problem.
//!
//! ```no_run
//! # fn main() -> recontrol_gguf::Result<()> {
//! use recontrol_gguf::{import_gguf, ImportOptions, OutDtype};
//! let options = ImportOptions { dtype: OutDtype::BF16, ..ImportOptions::default() };
//! let summary = import_gguf("model.Q4_1.gguf".as_ref(), "models/model".as_ref(), &options)?;
//! println!("{} weights, {} parameters", summary.tensors, summary.parameters);
//! # Ok(()) }
//! ```

pub mod config;
mod error;
mod file;
pub mod ggml_type;
pub mod header;
mod import;
pub mod metadata;
pub mod quant;
pub mod tensor_map;
pub mod tokenizer;

pub use config::{Architecture, ModelConfig, SUPPORTED_ARCHITECTURES};
pub use error::{Error, FormatError, Result};
pub use file::GgufFile;
pub use ggml_type::GgmlType;
pub use header::{Header, TensorInfo};
pub use import::{
    import_gguf, import_gguf_once, tokenizer_config, ImportOptions, ImportOutcome, ImportRecord,
    ImportSummary, OutDtype, TokenizerWriter, IMPORT_RECORD, OUTPUT_FILES,
};
pub use metadata::{Array, Metadata, Value, ValueType};
