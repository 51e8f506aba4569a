//! Where the generated GGUF fixtures live, and reading their safetensors references.

#![allow(dead_code)] // each test binary uses a part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// The repository root (`RECONTROL_REPO_ROOT` for a test binary run from elsewhere).
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("RECONTROL_REPO_ROOT") {
        return PathBuf::from(root);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// `tests/fixtures/generated/gguf`, made by `tests/fixtures/gguf/make_gguf_fixtures.py`; a
/// test fails (never passes silently) when it is missing.
pub fn fixtures() -> PathBuf {
    let dir = repo_root().join("tests/fixtures/generated/gguf");
    assert!(
        dir.join("models/llama-gqa/model.gguf").is_file(),
        "GGUF fixtures missing at {}: run scripts/fixtures.sh (or .venv/bin/python tests/fixtures/gguf/make_gguf_fixtures.py)",
        dir.display()
    );
    dir
}

/// An f32 tensor of a safetensors file: shape and values.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Every tensor of a safetensors file, as f32 (F32, F16 and BF16 files are widened).
pub fn read_safetensors(path: &Path) -> BTreeMap<String, F32Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => panic!("{}: {name} is {other:?}", path.display()),
            };
            let shape = view.shape().to_vec();
            (name, F32Tensor { shape, values })
        })
        .collect()
}

/// The index and both values of the first element whose bits differ, if any.
pub fn first_bit_difference(got: &[f32], want: &[f32]) -> Option<(usize, f32, f32)> {
    got.iter()
        .zip(want)
        .enumerate()
        .find(|(_, (g, w))| g.to_bits() != w.to_bits())
        .map(|(i, (g, w))| (i, *g, *w))
}
