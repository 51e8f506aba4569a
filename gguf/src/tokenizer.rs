//! Building `tokenizer.json` from a file's `tokenizer.ggml.*` metadata.
//!
//! STUB on branch gguf-reader: the real module is written separately and replaces this file.

use std::path::Path;

use crate::{Error, GgufFile, Result};

/// Writes the `tokenizer.json` that the file's `tokenizer.ggml.*` metadata describes to
/// `path` (a file inside the model directory being written).
pub fn write_tokenizer_json(_gguf: &GgufFile, _path: &Path) -> Result<()> {
    Err(Error::Unsupported {
        what: "building tokenizer.json from GGUF metadata".to_owned(),
    })
}
