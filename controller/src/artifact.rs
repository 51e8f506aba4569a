//! What `--value` points at, opened and checked against the LM: an export directory (from
//! `recontrol export`, with `manifest.json`), one of its `.onnx` files, or a value directory.

use std::path::{Path, PathBuf};

use recontrol_export::{ControllerSpec, GraphKind, GraphMetadata, Manifest, OrtRuntime, ValueDir};
use tch::Device;

use crate::backend::{GradientBackend, OnnxBackend, TorchBackend};
use crate::{Error, Result};

/// Which gradient backend to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Onnx,
    Torch,
}

/// A value head ready to build a backend from.
#[derive(Debug, Clone)]
pub struct ValueArtifact {
    pub path: PathBuf,
    pub hidden_size: usize,
    pub lm_identity: String,
    /// The value directory (weights for the torch backend), when known and present.
    pub value_dir: Option<PathBuf>,
    /// `value_grad.onnx`, when exported.
    pub value_grad: Option<PathBuf>,
    /// `controller.onnx` and the settings it was exported with, when exported.
    pub controller: Option<(PathBuf, ControllerSpec)>,
}

impl ValueArtifact {
    /// Opens an export directory, an `.onnx` file of one, or a value directory. The graphs'
    /// metadata and the manifest are parsed in full: a bad value is an error naming its file
    /// and key.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() && path.join("config.json").is_file() {
            let dir = ValueDir::read(path)?;
            return Ok(Self {
                path: path.to_owned(),
                hidden_size: dir.config.input_dim,
                lm_identity: dir.config.lm_identity,
                value_dir: Some(path.to_owned()),
                value_grad: None,
                controller: None,
            });
        }
        let (dir, file) = if path.is_dir() {
            if !path.join("manifest.json").is_file() {
                return Err(Error::NotAValueHeadDir {
                    path: path.to_owned(),
                });
            }
            (path.to_owned(), path.join(GraphKind::ValueGrad.file_name()))
        } else if path.extension().is_some_and(|e| e == "onnx") {
            (
                path.parent().map(Path::to_owned).unwrap_or_default(),
                path.to_owned(),
            )
        } else {
            return Err(Error::NotAValueHead {
                path: path.to_owned(),
            });
        };
        let meta = GraphMetadata::read(&file)?;
        let sibling = |graph: GraphKind| Some(dir.join(graph.file_name())).filter(|p| p.is_file());
        let manifest_value_dir = if dir.join("manifest.json").is_file() {
            Some(Manifest::read(&dir)?.value_dir).filter(|p| p.join("config.json").is_file())
        } else {
            None
        };
        let controller = sibling(GraphKind::Controller)
            .map(|c| GraphMetadata::read(&c).map(|m| (c, m.controller)))
            .transpose()?;
        Ok(Self {
            path: path.to_owned(),
            hidden_size: meta.hidden_size,
            lm_identity: meta.lm_identity,
            value_dir: manifest_value_dir,
            value_grad: sibling(GraphKind::ValueGrad),
            controller,
        })
    }

    /// Refuses an artifact for another hidden size, and one from another LM (same hidden size)
    /// unless `allow_foreign`.
    pub fn check_lm(
        &self,
        lm_identity: &str,
        hidden_size: usize,
        allow_foreign: bool,
    ) -> Result<()> {
        if self.hidden_size != hidden_size {
            return Err(Error::HiddenSizeMismatch {
                path: self.path.clone(),
                value_net: self.hidden_size,
                model: hidden_size,
            });
        }
        if self.lm_identity != lm_identity && !allow_foreign {
            return Err(Error::IdentityMismatch {
                path: self.path.clone(),
                value_net: self.lm_identity.clone(),
                model: lm_identity.to_owned(),
            });
        }
        Ok(())
    }

    /// Builds a backend. `onnx` runs the exported graphs with ONNX Runtime (for a value
    /// directory, its `value_grad` graph built in memory), with its CUDA execution provider
    /// when `device` is a GPU and the loaded onnxruntime has one, else on the CPU; `torch`
    /// runs the value directory's weights in libtorch on `device` (closed-form gradient).
    pub fn backend(
        &self,
        kind: BackendKind,
        device: Device,
        runtime: Option<&OrtRuntime>,
        threads: Option<usize>,
    ) -> Result<Box<dyn GradientBackend>> {
        match kind {
            BackendKind::Torch => {
                let dir = self.value_dir.as_ref().ok_or_else(|| Error::NoValueDir {
                    path: self.path.clone(),
                })?;
                Ok(Box::new(TorchBackend::load(dir, device)?))
            }
            BackendKind::Onnx => {
                let cuda = match device {
                    Device::Cuda(i) => Some(i),
                    _ => None,
                };
                let runtime = match runtime {
                    Some(r) => r,
                    None => OrtRuntime::load(None)?,
                };
                if let Some(value_grad) = &self.value_grad {
                    let controller = self
                        .controller
                        .as_ref()
                        .map(|(c, spec)| (c.as_path(), *spec));
                    return Ok(Box::new(OnnxBackend::open(
                        runtime,
                        value_grad,
                        controller,
                        self.hidden_size,
                        threads,
                        cuda,
                    )?));
                }
                let dir = self.value_dir.as_ref().ok_or_else(|| Error::NoValueGrad {
                    path: self.path.clone(),
                })?;
                Ok(Box::new(OnnxBackend::from_value_dir(
                    runtime,
                    &ValueDir::read(dir)?,
                    threads,
                    cuda,
                )?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recontrol_export::{write_export, Producer};
    use recontrol_value_net::{Activation, ValueConfig, ValueMlp, ValueModel};

    fn value_dir(dir: &Path) {
        ValueModel {
            config: ValueConfig {
                input_dim: 6,
                hidden_dims: vec![4],
                activation: Activation::Tanh,
                reward_mean: 0.0,
                reward_std: 1.0,
                lm_hidden_size: 6,
                lm_identity: "sha256:value".into(),
                target: None,
                training: serde_json::json!({}),
                seed: 1,
                git_revision: "test".into(),
                recontrol_version: "test".into(),
            },
            mlp: ValueMlp::new(6, &[4], Activation::Tanh, 1, Device::Cpu).expect("mlp"),
        }
        .save(dir)
        .expect("save");
    }

    /// An export directory and its controller.onnx open to the same head, with the settings
    /// controller.onnx was exported with and the value directory its manifest names.
    #[test]
    fn opens_an_export_with_its_settings_and_checks_it_against_the_lm() -> Result<()> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let value = tmp.path().join("value");
        value_dir(&value);
        let out = tmp.path().join("export");
        let spec = ControllerSpec {
            steps: 4,
            alpha: 0.5,
            max_edit_norm: Some(2.0),
        };
        let producer = Producer {
            recontrol_version: "test".into(),
            git_revision: "test".into(),
        };
        write_export(&ValueDir::read(&value)?, &out, &spec, &producer)?;
        let canonical = std::fs::canonicalize(&value).expect("canonical");
        for path in [out.clone(), out.join("controller.onnx")] {
            let a = ValueArtifact::open(&path)?;
            assert_eq!(a.hidden_size, 6);
            assert_eq!(a.lm_identity, "sha256:value");
            assert_eq!(a.value_dir.as_deref(), Some(canonical.as_path()));
            assert_eq!(a.value_grad, Some(out.join("value_grad.onnx")));
            assert_eq!(a.controller, Some((out.join("controller.onnx"), spec)));
        }
        let a = ValueArtifact::open(&out)?;
        assert!(matches!(
            a.check_lm("sha256:value", 8, false),
            Err(Error::HiddenSizeMismatch {
                value_net: 6,
                model: 8,
                ..
            })
        ));
        match a.check_lm("sha256:lm", 6, false) {
            Err(Error::IdentityMismatch {
                value_net, model, ..
            }) => assert_eq!(
                (value_net.as_str(), model.as_str()),
                ("sha256:value", "sha256:lm")
            ),
            other => panic!("{other:?}"),
        }
        a.check_lm("sha256:lm", 6, true)?;
        a.check_lm("sha256:value", 6, false)?;

        std::fs::write(out.join("manifest.json"), "{}").expect("write");
        let err = ValueArtifact::open(&out)
            .expect_err("bad manifest")
            .to_string();
        assert!(
            err.contains("manifest.json: not an export manifest"),
            "{err}"
        );
        Ok(())
    }
}
