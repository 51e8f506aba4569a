//! The value directory: `config.json` (architecture, reward normalisation, provenance) and
//! `model.safetensors` (PyTorch `nn.Linear` naming, `layers.{i}.weight` `[out, in]` and
//! `layers.{i}.bias` `[out]`). The format is defined here, without libtorch, so that exporting
//! and inspecting need no libtorch; `recontrol-value-net` writes and reads the same types.
//!
//! `config.json` records the Bellman target the net was trained with as `target`; value
//! directories written before that field existed have it only in `training.config.target`
//! (the training run's record), which [`ValueConfig::trained_target`] reads as well.

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

/// What a non-terminal state regresses to in the Bellman loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// TD(0): the stop-gradient value of the next state (the paper's Bellman equation).
    #[default]
    Td0,
    /// Monte-Carlo: the rollout's final reward (gamma = 1, no intermediate rewards).
    Mc,
    /// TD(lambda): the lambda-return, `(1 - lambda) V(s_{t+1}) + lambda G_{t+1}` with
    /// `G_{T-1} = r`; lambda 0 is TD(0), 1 is Monte-Carlo.
    Lambda(f64),
}

impl Target {
    /// Refuses a lambda outside `[0, 1]`.
    pub fn check(self) -> Result<Self> {
        match self {
            Self::Lambda(lambda) if !(0.0..=1.0).contains(&lambda) => {
                Err(Error::LambdaOutOfRange { lambda })
            }
            t => Ok(t),
        }
    }
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
    /// The source LM's hidden size and identity (`recontrol_lm::model_identity`: `sha256:...`
    /// of its config.json, tokenizer.json, and each checkpoint file's size, header and first
    /// and last 64 KiB).
    pub lm_hidden_size: usize,
    pub lm_identity: String,
    /// The Bellman target the net was trained with. `None` when this file does not say: value
    /// directories written before this field keep it in `training.config.target`, hand-made
    /// ones may have none; [`ValueConfig::trained_target`] reads both places.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// The training run's record (its arguments, settings and history), as its writer made it.
    pub training: serde_json::Value,
    pub seed: u64,
    pub git_revision: String,
    pub recontrol_version: String,
}

impl ValueConfig {
    /// The Bellman target the net was trained with: `target`, else `training.config.target`
    /// (where value directories written before `target` existed keep it). `path` is this
    /// config's file, named in the error when neither holds a target.
    pub fn trained_target(&self, path: &Path) -> Result<Target> {
        if let Some(target) = self.target {
            return Ok(target);
        }
        let recorded = self
            .training
            .get("config")
            .and_then(|config| config.get("target"))
            .ok_or_else(|| Error::NoTarget {
                path: path.to_owned(),
            })?;
        serde_json::from_value(recorded.clone()).map_err(|e| Error::BadValue {
            path: path.to_owned(),
            key: "training.config.target",
            expected: format!("a target (\"td0\", \"mc\" or {{\"lambda\": x}}): {e}"),
            found: recorded.to_string(),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(target: Option<Target>, training: serde_json::Value) -> ValueConfig {
        ValueConfig {
            input_dim: 2,
            hidden_dims: vec![],
            activation: Activation::Relu,
            reward_mean: 0.0,
            reward_std: 1.0,
            lm_hidden_size: 2,
            lm_identity: "sha256:x".into(),
            target,
            training,
            seed: 0,
            git_revision: String::new(),
            recontrol_version: String::new(),
        }
    }

    /// `target` wins; value dirs written before it have the target in the training record;
    /// one with neither, or a bad record, is refused naming the file and the key.
    #[test]
    fn the_trained_target_is_read_from_either_place_or_refused() -> Result<()> {
        let path = Path::new("v/config.json");
        let legacy = serde_json::json!({"config": {"target": {"lambda": 0.75}}});
        assert_eq!(
            config(Some(Target::Mc), legacy.clone()).trained_target(path)?,
            Target::Mc
        );
        assert_eq!(
            config(None, legacy).trained_target(path)?,
            Target::Lambda(0.75)
        );
        assert_eq!(
            config(None, serde_json::json!({"config": {"target": "td0"}})).trained_target(path)?,
            Target::Td0
        );
        let err = config(None, serde_json::json!({}))
            .trained_target(path)
            .expect_err("no target")
            .to_string();
        assert!(
            err.starts_with("v/config.json: no `target` (nor `training.config.target`)"),
            "{err}"
        );
        let err = config(None, serde_json::json!({"config": {"target": "td1"}}))
            .trained_target(path)
            .expect_err("bad target")
            .to_string();
        assert!(
            err.starts_with("v/config.json: `training.config.target` is \"td1\", not a target"),
            "{err}"
        );
        Ok(())
    }

    /// The file keeps its keys: `target` is written only when known, after `lm_identity`.
    #[test]
    fn target_is_written_only_when_known() -> serde_json::Result<()> {
        let text = serde_json::to_string(&config(None, serde_json::json!({})))?;
        assert!(!text.contains("target"), "{text}");
        let text =
            serde_json::to_string(&config(Some(Target::Lambda(0.5)), serde_json::json!({})))?;
        assert!(
            text.contains(r#""lm_identity":"sha256:x","target":{"lambda":0.5},"training":{}"#),
            "{text}"
        );
        let back: ValueConfig = serde_json::from_str(&text)?;
        assert_eq!(back.target, Some(Target::Lambda(0.5)));
        Ok(())
    }

    #[test]
    fn lambda_outside_zero_one_is_refused() {
        assert!(Target::Lambda(1.0).check().is_ok());
        assert_eq!(
            Target::Lambda(1.5).check().expect_err("1.5").to_string(),
            "lambda must be in [0, 1], got 1.5"
        );
    }
}
