//! The crate's errors. Each message is one line that names the file, key or tensor at fault
//! and the numbers involved; an underlying I/O error is the
//! [`source`](std::error::Error::source), not repeated in the message.

use std::path::PathBuf;

use crate::ggml_type::GgmlType;

/// What is wrong with the bytes of a GGUF file (its header, metadata or tensor infos).
/// Offsets are byte positions in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a GGUF file (starts with {found:?}, expected \"GGUF\")")]
    Magic { found: Vec<u8> },

    #[error("GGUF version {version} is not supported (versions 2 and 3 are)")]
    Version { version: u32 },

    #[error("big-endian GGUF files are not supported")]
    BigEndian,

    #[error("truncated: {what} at byte {offset} needs {needed} bytes, {left} are left")]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        left: u64,
    },

    #[error("{count} {what} starting at byte {offset} cannot fit in the {left} bytes left")]
    Count {
        what: &'static str,
        count: u64,
        offset: u64,
        left: u64,
    },

    #[error("metadata {key}: {count} array elements starting at byte {offset} cannot fit in the {left} bytes left")]
    ArrayCount {
        key: String,
        count: u64,
        offset: u64,
        left: u64,
    },

    #[error("metadata {key}: unknown value type {id} at byte {offset}")]
    ValueType { key: String, id: u32, offset: u64 },

    #[error("metadata {key}: arrays nested deeper than {max} at byte {offset}")]
    Nesting {
        key: String,
        max: usize,
        offset: u64,
    },

    #[error("{what} at byte {offset} is not UTF-8")]
    Utf8 { what: &'static str, offset: u64 },

    #[error("metadata {key}: key appears twice")]
    DuplicateKey { key: String },

    #[error("general.alignment must be a u32 power of two, found {found}")]
    Alignment { found: String },

    #[error("tensor {tensor}: {n_dims} dimensions (1 to 4 are supported)")]
    Dims { tensor: String, n_dims: u32 },

    #[error("tensor {tensor}: a dimension is 0 in {dims:?}")]
    ZeroDim { tensor: String, dims: Vec<u64> },

    #[error("tensor {tensor}: dimensions {dims:?} are too large")]
    Overflow { tensor: String, dims: Vec<u64> },

    #[error("tensor {tensor}: unknown ggml type id {id}")]
    UnknownType { tensor: String, id: u32 },

    #[error(
        "tensor {tensor}: rows of {row} elements are not a whole number of {ggml_type} blocks of {block}"
    )]
    Blocks {
        tensor: String,
        ggml_type: GgmlType,
        row: u64,
        block: usize,
    },

    #[error(
        "tensor {tensor}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    Misaligned {
        tensor: String,
        offset: u64,
        alignment: u64,
    },

    #[error("tensor {tensor}: bytes {start}..{end} lie past the end of the file ({len} bytes)")]
    OutOfFile {
        tensor: String,
        start: u64,
        end: u64,
        len: u64,
    },

    #[error("tensor {tensor}: name appears twice")]
    DuplicateTensor { tensor: String },
}

/// Errors of reading, dequantizing and importing GGUF files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot read")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {problem}")]
    Format { path: PathBuf, problem: FormatError },

    #[error("metadata {key}: missing")]
    MissingKey { key: String },

    #[error("metadata {key}: expected {expected}, found {found}")]
    KeyType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },

    #[error("metadata {key}: value {value} is out of range (expected {expected})")]
    KeyRange {
        key: String,
        value: i128,
        expected: &'static str,
    },

    #[error("metadata {key}: key appears twice")]
    DuplicateKey { key: String },

    #[error("metadata {key}: {problem}")]
    KeyValue { key: String, problem: String },

    #[error("tensor {tensor}: {ggml_type} cannot be dequantized (supported: {supported})")]
    UnsupportedType {
        tensor: String,
        ggml_type: GgmlType,
        supported: String,
    },

    #[error("{ggml_type} cannot be dequantized (supported: {supported})")]
    NotDequantizable {
        ggml_type: GgmlType,
        supported: String,
    },

    #[error("{ggml_type} data of {len} bytes is not a whole number of {type_size}-byte blocks")]
    PartialBlock {
        ggml_type: GgmlType,
        len: usize,
        type_size: usize,
    },

    #[error("tensor {tensor}: rows {first}..+{count} are out of range (it has {rows})")]
    NoSuchRows {
        tensor: String,
        first: u64,
        count: u64,
        rows: u64,
    },

    #[error("architecture {architecture} is not supported (supported: {supported})")]
    UnsupportedArchitecture {
        architecture: String,
        supported: String,
    },

    #[error("tensor {tensor}: missing; {arch} with this config needs it")]
    MissingTensor { tensor: String, arch: String },

    #[error("tensor {tensor}: HF shape {found:?} does not match the config's {expected:?}")]
    TensorShape {
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },

    #[error("tensor {tensor}: not part of a {arch} model")]
    UnexpectedTensor { tensor: String, arch: String },

    #[error("tensor {tensor}: {elements} elements do not fit in memory on this machine")]
    TooLarge { tensor: String, elements: u64 },

    #[error(transparent)]
    Output(#[from] recontrol_io::Error),

    #[error("{path}: cannot write safetensors: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("{path}: cannot write")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} is not supported yet")]
    Unsupported { what: String },

    #[error("{}: exists and is not an import of this file in {dtype}; remove it or choose another name", out.display())]
    OutputOccupied { out: PathBuf, dtype: &'static str },

    #[error("{path}: tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: crate::tokenizer::TokenizerError,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
