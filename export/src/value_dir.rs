//! The value directory: `config.json` (architecture, reward normalisation, provenance) and
//! `model.safetensors` (PyTorch `nn.Linear` naming, `layers.{i}.weight` `[out, in]` and
//! `layers.{i}.bias` `[out]`). The format is defined here, without libtorch, so that exporting
//! and inspecting need no libtorch; `recontrol-value-net` writes and reads the same types.

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The nonlinearity between layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Tanh,
    /// The exact (erf) GELU, PyTorch's default.
    Gelu,
    Silu,
}

/// `config.json` of a value directory: the architecture, the reward normalisation, and where
/// the net comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueConfig {
    pub input_dim: usize,
    pub hidden_dims: Vec<usize>,
    pub activation: Activation,
    /// V in reward units = raw output * reward_std + reward_mean.
    pub reward_mean: f64,
    pub reward_std: f64,
    /// The source LM's hidden size and identity (`sha256:...` of its config, tokenizer and
    /// checkpoint headers).
    pub lm_hidden_size: usize,
    pub lm_identity: String,
    pub training: serde_json::Value,
    pub seed: u64,
    pub git_revision: String,
    pub recontrol_version: String,
}

/// One linear layer, float32: `y = x W^T + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Array2<f32>,
    /// `[out]`.
    pub bias: Array1<f32>,
}

/// A value directory read and checked: layers that chain from `input_dim` through
/// `hidden_dims` to one output, finite weights, a usable normalisation.
#[derive(Debug, Clone)]
pub struct ValueDir {
    pub dir: PathBuf,
    pub config: ValueConfig,
    pub layers: Vec<Linear>,
    /// sha256 (hex) of `model.safetensors` as read.
    pub weights_sha256: String,
}

impl ValueDir {
    /// Reads `dir/config.json` and `dir/model.safetensors`; every problem is an error naming
    /// the file and what was expected.
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::Invalid {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        let config: ValueConfig = serde_json::from_str(&text).map_err(|e| Error::Invalid {
            path: config_path.clone(),
            message: format!("not a value config: {e}"),
        })?;
        let invalid = |path: &Path, message: String| Error::Invalid {
            path: path.to_owned(),
            message,
        };
        if !(config.reward_std.is_finite()
            && config.reward_std > 0.0
            && config.reward_mean.is_finite())
        {
            return Err(invalid(
                &config_path,
                "reward_mean/reward_std must be finite, std positive".into(),
            ));
        }
        if config.input_dim == 0 || config.hidden_dims.contains(&0) {
            return Err(invalid(
                &config_path,
                "input_dim and hidden_dims must be positive".into(),
            ));
        }
        let weights_path = dir.join("model.safetensors");
        let bytes =
            std::fs::read(&weights_path).map_err(|e| invalid(&weights_path, e.to_string()))?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| invalid(&weights_path, format!("not a safetensors file: {e}")))?;
        let mut dims = vec![config.input_dim];
        dims.extend_from_slice(&config.hidden_dims);
        dims.push(1);
        let mut layers = Vec::with_capacity(dims.len() - 1);
        for (i, w) in dims.windows(2).enumerate() {
            let (fan_in, fan_out) = (w[0], w[1]);
            let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
                let t = tensors.tensor(name).map_err(|_| {
                    invalid(
                        &weights_path,
                        format!("{name} is missing (config.json: {dims:?})"),
                    )
                })?;
                if t.shape() != shape {
                    return Err(invalid(
                        &weights_path,
                        format!(
                            "{name} has shape {:?}; config.json ({dims:?}) implies {shape:?}",
                            t.shape()
                        ),
                    ));
                }
                let values = to_f32(t.dtype(), t.data()).ok_or_else(|| {
                    invalid(
                        &weights_path,
                        format!(
                            "{name} has dtype {:?}; expected F32, F64, F16 or BF16",
                            t.dtype()
                        ),
                    )
                })?;
                if let Some(k) = values.iter().position(|v| !v.is_finite()) {
                    return Err(invalid(
                        &weights_path,
                        format!("{name} has a non-finite value ({} at {k})", values[k]),
                    ));
                }
                Ok(values)
            };
            let weight = read(&format!("layers.{i}.weight"), &[fan_out, fan_in])?;
            let bias = read(&format!("layers.{i}.bias"), &[fan_out])?;
            layers.push(Linear {
                weight: Array2::from_shape_vec((fan_out, fan_in), weight)
                    .map_err(|e| invalid(&weights_path, e.to_string()))?,
                bias: Array1::from(bias),
            });
        }
        let extra = format!("layers.{}.weight", layers.len());
        if tensors.tensor(&extra).is_ok() {
            return Err(invalid(
                &weights_path,
                format!("has {extra}, more layers than config.json's {dims:?}"),
            ));
        }
        Ok(Self {
            dir: dir.to_owned(),
            config,
            layers,
            weights_sha256: format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        })
    }
}

/// Little-endian tensor bytes as f32, for the float dtypes a value net is saved in.
fn to_f32(dtype: safetensors::Dtype, data: &[u8]) -> Option<Vec<f32>> {
    use safetensors::Dtype;
    match dtype {
        Dtype::F32 => Some(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        Dtype::F64 => Some(
            data.chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
        ),
        Dtype::F16 => Some(
            data.chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            data.chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}
