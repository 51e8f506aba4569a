//! Checkpoint tensors from `model.safetensors` or a sharded `model.safetensors.index.json`.
//!
//! Shards are memory-mapped and each tensor is copied out once, converted to the requested dtype
//! and moved to the device as it is read, so host memory peaks at one tensor beyond the model.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The sharded checkpoint index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (8-byte length + JSON header).
    data_start: usize,
    metadata: safetensors::tensor::Metadata,
}

/// Where a model's parameters come from: a checkpoint ([`Weights`]) or fresh initialisation for
/// training. Names are Hugging Face's checkpoint keys.
pub trait ParamSource {
    /// The named tensor if the source has it, checked to have `shape`.
    fn get_opt(&self, name: &str, shape: &[i64]) -> Result<Option<Tensor>>;

    /// The named tensor, checked to have `shape`.
    fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor>;
}

/// Tensors of a checkpoint, by name, read on demand.
pub struct Weights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    by_name: HashMap<String, usize>,
    device: Device,
    kind: Kind,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.by_name.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The checkpoint files of a model directory, in order: the shards named by the index (each
/// checked to lie inside the directory), or `model.safetensors`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let index: ShardIndex = crate::config::read_json(&index_path)?;
        let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        let mut files: Vec<String> = index.weight_map.into_values().collect();
        files.sort();
        files.dedup();
        return files
            .iter()
            .map(|f| shard_path(&root, &index_path, f))
            .collect();
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        Ok(vec![single])
    } else {
        Err(Error::MissingFile {
            path: single,
            what: "model.safetensors or model.safetensors.index.json",
        })
    }
}

impl Weights {
    /// Opens the checkpoint in `dir`; tensors are returned as `kind` on `device`.
    pub fn open(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let mut shards = Vec::new();
        let mut by_name = HashMap::new();
        if index_path.is_file() {
            let index: ShardIndex = crate::config::read_json(&index_path)?;
            let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
            let mut shard_of_file: HashMap<String, usize> = HashMap::new();
            let mut names: Vec<_> = index.weight_map.into_iter().collect();
            names.sort();
            for (name, file) in names {
                let shard = match shard_of_file.get(&file) {
                    Some(&i) => i,
                    None => {
                        let path = shard_path(&root, &index_path, &file)?;
                        shards.push(Shard::open(path)?);
                        shard_of_file.insert(file, shards.len() - 1);
                        shards.len() - 1
                    }
                };
                by_name.insert(name, shard);
            }
        } else if single.is_file() {
            let shard = Shard::open(single)?;
            for name in shard.metadata.tensors().into_keys() {
                by_name.insert(name, 0);
            }
            shards.push(shard);
        } else {
            return Err(Error::MissingFile {
                path: single,
                what: "model.safetensors or model.safetensors.index.json",
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            shards,
            by_name,
            device,
            kind,
        })
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}

impl ParamSource for Weights {
    fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.get_opt(name, shape)?
            .ok_or_else(|| Error::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_owned(),
            })
    }

    fn get_opt(&self, name: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        let Some(&i) = self.by_name.get(name) else {
            return Ok(None);
        };
        let shard = &self.shards[i];
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| Error::Safetensors {
                path: shard.path.clone(),
                message: format!("the index lists {name:?} in this shard but the shard lacks it"),
            })?;
        let found: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if found != shape {
            return Err(Error::TensorShape {
                dir: self.dir.clone(),
                name: name.to_owned(),
                expected: shape.to_vec(),
                found,
            });
        }
        let kind = kind_of(info.dtype).ok_or_else(|| Error::TensorDtype {
            dir: self.dir.clone(),
            name: name.to_owned(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        let bytes = &shard.map[shard.data_start + start..shard.data_start + end];
        let tensor = Tensor::f_from_data_size(bytes, shape, kind)?
            .f_to_kind(self.kind)?
            .f_to_device(self.device)?;
        // A NaN or Inf weight (a broken file, or a value past f16's range) would make every
        // output NaN without a word: refuse it here, naming the tensor.
        if tensor.is_floating_point() && !bool::try_from(tensor.f_isfinite()?.f_all()?)? {
            return Err(Error::NonFiniteTensor {
                path: shard.path.clone(),
                name: name.to_owned(),
                kind: format!("{:?}", self.kind),
            });
        }
        Ok(Some(tensor))
    }
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only and lives as long as `Shard`. Like every reader of
        // memory-mapped checkpoints, we rely on the file not being truncated while it is open.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        // Validates the header and that every tensor's byte range lies inside the file.
        SafeTensors::deserialize(&map).map_err(|e| Error::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| Error::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Ok(Self {
            path,
            map,
            data_start: 8 + header_len,
            metadata,
        })
    }
}

/// Resolves a shard name from the index, refusing anything that is not a plain file inside
/// the model directory (absolute paths, `..`, links pointing elsewhere).
fn shard_path(root: &Path, index: &Path, file: &str) -> Result<PathBuf> {
    let outside = || Error::ShardOutsideModelDir {
        index: index.to_owned(),
        shard: file.to_owned(),
    };
    let relative = Path::new(file);
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(outside());
    }
    let path = root.join(relative);
    let resolved = path.canonicalize().map_err(|e| Error::io(&path, e))?;
    if !resolved.starts_with(root) || !resolved.is_file() {
        return Err(outside());
    }
    Ok(resolved)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Parameters from a map, for building layers in unit tests without a checkpoint.
#[cfg(test)]
pub(crate) struct MapSource(pub(crate) HashMap<String, Tensor>);

#[cfg(test)]
impl ParamSource for MapSource {
    fn get_opt(&self, name: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        Ok(self.0.get(name).map(|t| {
            assert_eq!(t.size(), shape, "{name}");
            t.shallow_clone()
        }))
    }

    fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.get_opt(name, shape)?
            .ok_or_else(|| Error::Checkpoint(format!("{name} missing")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_single(dir: &Path, tensors: &[(&str, Tensor)]) {
        Tensor::write_safetensors(tensors, dir.join(SINGLE_FILE)).expect("write test checkpoint");
    }

    #[test]
    fn reads_converts_and_checks_shapes() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]);
        write_single(dir.path(), &[("a.weight", t)]);
        let w = Weights::open(dir.path(), Device::Cpu, Kind::BFloat16)?;
        let a = w.get("a.weight", &[2, 3])?;
        assert_eq!(a.kind(), Kind::BFloat16);
        assert_eq!(
            Vec::<f32>::try_from(a.to_kind(Kind::Float).flatten(0, -1))?,
            vec![1., 2., 3., 4., 5., 6.]
        );
        let err = w
            .get("a.weight", &[3, 2])
            .expect_err("wrong shape")
            .to_string();
        assert!(
            err.contains("\"a.weight\" has shape [2, 3], expected [3, 2]"),
            "{err}"
        );
        let err = w.get("b.weight", &[1]).expect_err("missing").to_string();
        assert!(err.contains("\"b.weight\" is missing"), "{err}");
        Ok(())
    }

    #[test]
    fn index_pointing_outside_is_refused() -> Result<()> {
        let outer = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let dir = outer.path().join("model");
        std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        write_single(
            outer.path(),
            &[("a", Tensor::zeros([1], (Kind::Float, Device::Cpu)))],
        );
        for shard in ["../model.safetensors", "/etc/passwd"] {
            let index = serde_json::json!({"weight_map": {"a": shard}});
            std::fs::write(dir.join(INDEX_FILE), index.to_string())
                .map_err(|e| Error::io(&dir, e))?;
            let err = Weights::open(&dir, Device::Cpu, Kind::Float)
                .expect_err("outside")
                .to_string();
            assert!(
                err.contains("not a file inside the model directory"),
                "{err}"
            );
        }
        Ok(())
    }

    #[test]
    fn truncated_file_is_a_clear_error() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        write_single(
            dir.path(),
            &[("a", Tensor::zeros([64], (Kind::Float, Device::Cpu)))],
        );
        let path = dir.path().join(SINGLE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        std::fs::write(&path, &bytes[..bytes.len() - 10]).map_err(|e| Error::io(&path, e))?;
        let err = Weights::open(dir.path(), Device::Cpu, Kind::Float)
            .expect_err("truncated")
            .to_string();
        assert!(err.contains("malformed safetensors file"), "{err}");
        Ok(())
    }
}
