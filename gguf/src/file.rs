//! An open GGUF file: its parsed header and its memory-mapped tensor data.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::header::{self, Header, TensorInfo};
use crate::metadata::Metadata;
use crate::quant::{dequantize_into, supported_list};
use crate::{Error, FormatError, Result};

/// A GGUF file, opened and checked: its metadata and tensor infos are parsed, and every
/// tensor's bytes lie inside the file. Tensor data is read from a memory map on demand.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    header: Header,
}

impl GgufFile {
    /// Opens and checks the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and lives as long as `GgufFile`. Like every reader of
        // memory-mapped checkpoints, we rely on the file not being truncated while it is open.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = header::parse(&map).map_err(|problem| Error::Format {
            path: path.to_owned(),
            problem,
        })?;
        Ok(Self {
            path: path.to_owned(),
            map,
            header,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// The metadata key/value pairs.
    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.metadata().architecture()
    }

    /// The tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// The tensor named `name`, if there is one.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors().iter().find(|t| t.name == name)
    }

    /// The alignment of the tensor data.
    pub fn alignment(&self) -> u64 {
        self.header.alignment
    }

    /// Where the tensor data section starts.
    pub fn data_start(&self) -> u64 {
        self.header.data_start
    }

    /// The raw bytes of a tensor, as stored.
    pub fn tensor_data(&self, info: &TensorInfo) -> Result<&[u8]> {
        let range = usize::try_from(info.start)
            .ok()
            .zip(usize::try_from(info.start.saturating_add(info.n_bytes)).ok());
        range
            .and_then(|(start, end)| self.map.get(start..end))
            .ok_or_else(|| Error::Format {
                path: self.path.clone(),
                problem: FormatError::OutOfFile {
                    tensor: info.name.clone(),
                    start: info.start,
                    end: info.start.saturating_add(info.n_bytes),
                    len: self.map.len() as u64,
                },
            })
    }

    /// The raw bytes of rows `first..first + count` of a tensor (a row is its fastest
    /// dimension).
    pub fn row_data(&self, info: &TensorInfo, first: u64, count: u64) -> Result<&[u8]> {
        let data = self.tensor_data(info)?;
        let row_bytes = info.row_bytes();
        let start = first.checked_mul(row_bytes);
        let end = first
            .checked_add(count)
            .and_then(|end| end.checked_mul(row_bytes));
        start
            .zip(end)
            .and_then(|(s, e)| Some((usize::try_from(s).ok()?, usize::try_from(e).ok()?)))
            .and_then(|(s, e)| data.get(s..e))
            .ok_or_else(|| Error::NoSuchRows {
                tensor: info.name.clone(),
                first,
                count,
                rows: info.n_elements / info.row_len().max(1),
            })
    }

    /// A tensor's values as f32, in GGUF order (fastest dimension first, i.e. row-major in
    /// [`TensorInfo::shape`]).
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        check_dequantizable(info)?;
        let data = self.tensor_data(info)?;
        let mut out = Vec::new();
        dequantize_into(info.ggml_type, data, &mut out)?;
        Ok(out)
    }
}

impl std::fmt::Debug for GgufFile {
    /// A summary: the metadata can hold a vocabulary of many thousand tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("metadata_keys", &self.header.metadata.len())
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

/// Refuses a tensor whose type [`crate::quant`] does not handle, naming it.
pub(crate) fn check_dequantizable(info: &TensorInfo) -> Result<()> {
    if info.ggml_type.is_dequantizable() {
        Ok(())
    } else {
        Err(Error::UnsupportedType {
            tensor: info.name.clone(),
            ggml_type: info.ggml_type,
            supported: supported_list(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_missing_and_directory_paths_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").expect("write");
        let err = GgufFile::open(&empty).expect_err("empty");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: truncated: magic at byte 0 needs 4 bytes, 0 are left",
                empty.display()
            )
        );
        let missing = dir.path().join("missing.gguf");
        let err = GgufFile::open(&missing).expect_err("missing");
        assert_eq!(
            err.to_string(),
            format!("{}: cannot read", missing.display())
        );
        assert!(GgufFile::open(dir.path()).is_err());
    }
}
