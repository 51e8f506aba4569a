//! Static representation editing, the paper's "static RE" baseline: one fixed direction `v`
//! added to the final post-norm hidden state of the newest position at every decoding step,
//! `h' = h + s * v` (the KV cache is left alone, as under RE-Control).
//!
//! `v` is fitted on labelled rollouts ([`SteeringVector::fit`]): the mean state of the
//! top-reward quantile of rollouts minus the mean state of the bottom quantile (every state of
//! those rollouts counts once), unit-normalised. It is stored as a safetensors file holding
//! `vector` (`[hidden]`, float32) with its provenance as JSON under the metadata key
//! [`METADATA_KEY`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use recontrol_data::Store;
use recontrol_lm::{HiddenStateHook, HookContext, HookError};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// The safetensors metadata key holding a steering vector's [`SteerMeta`] as JSON.
pub const METADATA_KEY: &str = "recontrol_steer";
/// The tensor holding the direction.
pub const TENSOR_NAME: &str = "vector";

/// Where a steering vector comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SteerMeta {
    /// The labelled rollout store it was fitted on.
    pub rollouts: String,
    /// The model whose states those are, and its identity (`recontrol_lm::model_identity`).
    pub model: String,
    pub model_identity: String,
    pub hidden_size: usize,
    /// Fraction of rollouts in each of the top and bottom groups.
    pub quantile: f64,
    pub rollouts_total: usize,
    /// Rollouts and states in each group.
    pub top_rollouts: usize,
    pub bottom_rollouts: usize,
    pub top_states: usize,
    pub bottom_states: usize,
    /// Mean reward of each group.
    pub top_reward_mean: f64,
    pub bottom_reward_mean: f64,
    /// `||mean(top) - mean(bottom)||_2` before normalisation.
    pub difference_norm: f64,
    /// How the file was made (version, revision, command line), as the caller records it.
    #[serde(default)]
    pub provenance: serde_json::Value,
}

/// A unit direction in the model's final hidden space.
#[derive(Debug, Clone, PartialEq)]
pub struct SteeringVector {
    pub vector: Vec<f32>,
    pub meta: SteerMeta,
}

impl SteeringVector {
    /// Fits the direction on a labelled store: rollouts ranked by reward (ties by index), the
    /// `quantile` highest and lowest (at least one each) averaged state by state, their
    /// difference unit-normalised.
    pub fn fit(store: &Store, quantile: f64) -> Result<Self> {
        let path = store.path();
        if !(quantile > 0.0 && quantile <= 0.5) {
            return Err(Error::Quantile { value: quantile });
        }
        let rewards = store.rewards().map_err(Error::Store)?;
        let unlabelled = rewards.iter().filter(|r| !r.is_finite()).count();
        if unlabelled > 0 {
            return Err(Error::SteerFit {
                path: path.to_owned(),
                message: format!(
                    "{unlabelled} of {} rollouts have no (finite) reward; label the store first \
                     (recontrol reward label)",
                    rewards.len()
                ),
            });
        }
        let n = rewards.len();
        let group = ((quantile * n as f64).round() as usize).max(1);
        if 2 * group > n {
            return Err(Error::SteerFit {
                path: path.to_owned(),
                message: format!(
                    "{n} rollouts cannot make two disjoint groups of {group} (quantile {quantile})"
                ),
            });
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| rewards[b].total_cmp(&rewards[a]).then(a.cmp(&b)));
        let top = &order[..group];
        let bottom = &order[n - group..];
        let hidden = store.meta().hidden_size;
        let mean_of = |rollouts: &[usize]| -> Result<(Vec<f64>, usize, f64)> {
            let mut sum = vec![0f64; hidden];
            let (mut states, mut reward) = (0usize, 0f64);
            for &i in rollouts {
                let rollout = store.rollout(i).map_err(Error::Store)?;
                for row in rollout.states.rows() {
                    for (s, &x) in sum.iter_mut().zip(row.iter()) {
                        *s += f64::from(x);
                    }
                }
                states += rollout.states.nrows();
                reward += f64::from(rollout.reward);
            }
            if states == 0 {
                return Err(Error::SteerFit {
                    path: path.to_owned(),
                    message: "a group of rollouts holds no states".to_owned(),
                });
            }
            sum.iter_mut().for_each(|s| *s /= states as f64);
            Ok((sum, states, reward / rollouts.len() as f64))
        };
        let (top_mean, top_states, top_reward_mean) = mean_of(top)?;
        let (bottom_mean, bottom_states, bottom_reward_mean) = mean_of(bottom)?;
        let difference: Vec<f64> = top_mean
            .iter()
            .zip(&bottom_mean)
            .map(|(a, b)| a - b)
            .collect();
        let norm = difference.iter().map(|d| d * d).sum::<f64>().sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            return Err(Error::SteerFit {
                path: path.to_owned(),
                message: format!(
                    "the top and bottom groups have the same mean state (difference norm {norm})"
                ),
            });
        }
        let meta = store.meta();
        Ok(Self {
            vector: difference.iter().map(|d| (d / norm) as f32).collect(),
            meta: SteerMeta {
                rollouts: path.display().to_string(),
                model: meta.model.clone(),
                model_identity: meta.model_hash.clone(),
                hidden_size: hidden,
                quantile,
                rollouts_total: n,
                top_rollouts: group,
                bottom_rollouts: group,
                top_states,
                bottom_states,
                top_reward_mean,
                bottom_reward_mean,
                difference_norm: norm,
                provenance: serde_json::Value::Null,
            },
        })
    }

    /// Writes the vector and its provenance to `path` (whole or not at all).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes: Vec<u8> = self.vector.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![self.vector.len()],
            &bytes,
        )
        .map_err(|e| file_error(path, e))?;
        let meta = serde_json::to_string(&self.meta).map_err(|e| file_error(path, e))?;
        let metadata = HashMap::from([(METADATA_KEY.to_owned(), meta)]);
        let data = safetensors::serialize([(TENSOR_NAME, view)], Some(metadata))
            .map_err(|e| file_error(path, e))?;
        recontrol_io::write_atomic(path, &data)?;
        Ok(())
    }

    /// Reads a file written by [`SteeringVector::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| file_error(path, format!("not a safetensors file: {e}")))?;
        let meta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| {
                file_error(
                    path,
                    format!("no {METADATA_KEY} metadata (write it with recontrol steer fit)"),
                )
            })?;
        let meta: SteerMeta = serde_json::from_str(meta)
            .map_err(|e| file_error(path, format!("{METADATA_KEY} metadata: {e}")))?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| file_error(path, format!("not a safetensors file: {e}")))?;
        let view = tensors
            .tensor(TENSOR_NAME)
            .map_err(|_| file_error(path, format!("no tensor {TENSOR_NAME:?}")))?;
        if view.dtype() != safetensors::Dtype::F32 || view.shape() != [meta.hidden_size] {
            return Err(file_error(
                path,
                format!(
                    "{TENSOR_NAME:?} is {:?} {:?}, expected F32 [{}]",
                    view.dtype(),
                    view.shape(),
                    meta.hidden_size
                ),
            ));
        }
        let vector: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(bad) = vector.iter().find(|x| !x.is_finite()) {
            return Err(file_error(path, format!("non-finite entry {bad}")));
        }
        Ok(Self { vector, meta })
    }

    /// Reads the vector at `path` and checks it against `lm` ([`SteeringVector::check_lm`]).
    pub fn open(
        path: &Path,
        lm: &recontrol_lm::LanguageModel,
        allow_foreign: bool,
    ) -> Result<Self> {
        let vector = Self::load(path)?;
        vector.check_lm(
            path,
            &lm.identity,
            lm.model.config().hidden_size,
            allow_foreign,
        )?;
        Ok(vector)
    }

    /// Refuses a vector for another hidden size, or (unless `allow_foreign`) fitted on another
    /// model's states.
    pub fn check_lm(
        &self,
        path: &Path,
        lm_identity: &str,
        hidden_size: usize,
        allow_foreign: bool,
    ) -> Result<()> {
        if self.vector.len() != hidden_size {
            return Err(Error::HiddenSizeMismatch {
                path: path.to_owned(),
                value_net: self.vector.len(),
                model: hidden_size,
            });
        }
        if self.meta.model_identity != lm_identity && !allow_foreign {
            return Err(Error::IdentityMismatch {
                path: path.to_owned(),
                value_net: self.meta.model_identity.clone(),
                model: lm_identity.to_owned(),
            });
        }
        Ok(())
    }

    /// The hook adding `scale * vector` on `device`.
    pub fn hook(&self, scale: f64, device: Device) -> Result<SteerHook> {
        if !scale.is_finite() {
            return Err(Error::NotFinite {
                setting: "steer-scale",
                value: scale,
            });
        }
        let offset = Tensor::from_slice(&self.vector)
            .f_mul_scalar(scale)?
            .f_to_device(device)?;
        Ok(SteerHook { offset })
    }
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::SteerFile {
        path: PathBuf::from(path),
        message: e.to_string(),
    }
}

/// Adds a fixed offset (`scale * v`, float32) to every row's final hidden state.
#[derive(Debug)]
pub struct SteerHook {
    offset: Tensor,
}

impl HiddenStateHook for SteerHook {
    fn apply(&mut self, _ctx: &HookContext<'_>, hidden: Tensor) -> Result<Tensor, HookError> {
        let kind = hidden.kind();
        let moved = hidden.f_to_kind(Kind::Float)?.f_add(&self.offset)?;
        Ok(moved.f_to_kind(kind)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(values: Vec<f32>) -> SteeringVector {
        SteeringVector {
            meta: SteerMeta {
                rollouts: "r.h5".into(),
                model: "m".into(),
                model_identity: "sha256:m".into(),
                hidden_size: values.len(),
                quantile: 0.25,
                rollouts_total: 8,
                top_rollouts: 2,
                bottom_rollouts: 2,
                top_states: 5,
                bottom_states: 6,
                top_reward_mean: 1.0,
                bottom_reward_mean: -1.0,
                difference_norm: 2.0,
                provenance: serde_json::json!({"recontrol_version": "test"}),
            },
            vector: values,
        }
    }

    /// Eight rollouts with rewards 0..8: the top quarter (7, 6) holds states averaging
    /// (2, 0, 0), the bottom quarter (0, 1) states averaging (0, 0, 1), counted state by state.
    fn store(dir: &Path, labelled: bool) -> PathBuf {
        use recontrol_data::{PromptFormat, Rollout, StateDtype, StoreMeta, StoreWriter};
        let meta = StoreMeta {
            hidden_size: 3,
            model: "synthetic".into(),
            model_hash: "sha256:synthetic".into(),
            state_dtype: StateDtype::F32,
            prompt_format: PromptFormat::Raw,
            generation: serde_json::json!({}),
            seed: 0,
            recontrol_version: "test".into(),
            dataset: "synthetic".into(),
        };
        let states: [&[[f32; 3]]; 8] = [
            &[[0.0, 0.0, 1.0]],
            &[[0.0, 0.0, -1.0], [0.0, 0.0, 3.0], [0.0, 0.0, 1.0]],
            &[[9.0, 9.0, 9.0]],
            &[[-9.0, 5.0, 0.0], [1.0, 1.0, 1.0]],
            &[[4.0, -7.0, 2.0]],
            &[[0.5, 0.5, 0.5]],
            &[[0.0, 0.0, 0.0]],
            &[[1.0, 0.0, 0.0], [5.0, 0.0, 0.0]],
        ];
        let path = dir.join("labelled.h5");
        let mut writer = StoreWriter::create(&path, &meta).expect("create");
        for (i, s) in states.iter().enumerate() {
            let flat: Vec<f32> = s.iter().flatten().copied().collect();
            writer
                .append(&[Rollout {
                    prompt_index: i as i64,
                    prompt: format!("p{i}"),
                    response: format!("r{i}"),
                    tokens: (0..s.len() as i64).collect(),
                    states: ndarray::Array2::from_shape_vec((s.len(), 3), flat).expect("shape"),
                    reward: if labelled { i as f32 } else { f32::NAN },
                }])
                .expect("append");
        }
        writer.finish().expect("finish");
        path
    }

    #[test]
    fn the_vector_is_the_unit_difference_of_the_top_and_bottom_mean_states() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| file_error(Path::new("tmp"), e))?;
        let path = store(dir.path(), true);
        let fitted = SteeringVector::fit(&Store::open(&path).map_err(Error::Store)?, 0.25)?;
        let root5 = 5f32.sqrt();
        for (got, want) in fitted.vector.iter().zip([2.0 / root5, 0.0, -1.0 / root5]) {
            assert!((got - want).abs() < 1e-6, "{:?}", fitted.vector);
        }
        let m = &fitted.meta;
        assert_eq!((m.top_rollouts, m.bottom_rollouts), (2, 2));
        assert_eq!((m.top_states, m.bottom_states), (3, 4));
        assert_eq!((m.top_reward_mean, m.bottom_reward_mean), (6.5, 0.5));
        assert!((m.difference_norm - 5f64.sqrt()).abs() < 1e-9);
        assert_eq!(m.model_identity, "sha256:synthetic");
        assert_eq!(m.rollouts_total, 8);
        // A quantile too small for one rollout still takes one from each end: rollout 7's
        // mean (3, 0, 0) minus rollout 0's (0, 0, 1).
        let one = SteeringVector::fit(&Store::open(&path).map_err(Error::Store)?, 0.01)?;
        let root10 = 10f32.sqrt();
        let want = [3.0 / root10, 0.0, -1.0 / root10];
        for (got, want) in one.vector.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{:?}", one.vector);
        }
        Ok(())
    }

    #[test]
    fn stores_and_quantiles_that_cannot_make_a_vector_are_refused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| file_error(Path::new("tmp"), e))?;
        let labelled = Store::open(&store(dir.path(), true)).map_err(Error::Store)?;
        for q in [0.0, 0.6, f64::NAN] {
            assert!(matches!(
                SteeringVector::fit(&labelled, q),
                Err(Error::Quantile { .. })
            ));
        }
        drop(labelled);
        let unlabelled_dir = dir.path().join("u");
        std::fs::create_dir(&unlabelled_dir).map_err(|e| file_error(&unlabelled_dir, e))?;
        let unlabelled = Store::open(&store(&unlabelled_dir, false)).map_err(Error::Store)?;
        let message = SteeringVector::fit(&unlabelled, 0.25)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("labelled.h5") && message.contains("8 of 8 rollouts have no"),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn the_hook_adds_the_scaled_vector_to_every_row() -> Result<()> {
        let v = vector(vec![0.6, 0.0, -0.8]);
        let mut hook = v.hook(2.5, Device::Cpu)?;
        let h = Tensor::from_slice(&[1f32, 2.0, 3.0, -1.0, 0.0, 1.0]).f_view([2, 3])?;
        let ctx = HookContext {
            step: 0,
            rows: &[0, 1],
        };
        let out = hook.apply(&ctx, h).map_err(Error::Sink)?;
        let got = Vec::<f32>::try_from(out.f_flatten(0, -1)?)?;
        assert_eq!(got, vec![2.5, 2.0, 1.0, 0.5, 0.0, -1.0]);
        assert!(v.hook(f64::NAN, Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn a_saved_vector_reads_back_and_bad_files_are_refused() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| file_error(Path::new("tmp"), e))?;
        let path = dir.path().join("v.safetensors");
        let v = vector(vec![0.6, 0.0, -0.8]);
        v.save(&path)?;
        assert_eq!(SteeringVector::load(&path)?, v);
        v.check_lm(&path, "sha256:m", 3, false)?;
        assert!(matches!(
            v.check_lm(&path, "sha256:m", 4, false),
            Err(Error::HiddenSizeMismatch { .. })
        ));
        assert!(matches!(
            v.check_lm(&path, "sha256:other", 3, false),
            Err(Error::IdentityMismatch { .. })
        ));
        v.check_lm(&path, "sha256:other", 3, true)?;
        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"not a file").map_err(|e| file_error(&garbage, e))?;
        let message = SteeringVector::load(&garbage)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("garbage.safetensors"), "{message}");
        Ok(())
    }
}
