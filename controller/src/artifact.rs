//! What `--value` points at, opened and checked against the LM: an export directory (from
//! `recontrol export`, with `manifest.json`), one of its `.onnx` files, or a value directory.

use std::path::{Path, PathBuf};

use recontrol_export::{inspect, write_export, ControllerSpec, OrtRuntime, Producer, ValueDir};
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
    /// `value_grad.onnx` and `controller.onnx`, when exported.
    pub value_grad: Option<PathBuf>,
    pub controller: Option<PathBuf>,
    /// The settings `controller.onnx` was exported with: steps, edit-norm bound.
    pub exported_steps: Option<usize>,
    pub exported_bound: Option<f64>,
}

impl ValueArtifact {
    /// Opens an export directory, an `.onnx` file of one, or a value directory.
    pub fn open(path: &Path) -> Result<Self> {
        let invalid = |message: String| Error::Invalid {
            path: path.to_owned(),
            message,
        };
        if path.is_dir() && path.join("config.json").is_file() {
            let dir = ValueDir::read(path)?;
            return Ok(Self {
                path: path.to_owned(),
                hidden_size: dir.config.input_dim,
                lm_identity: dir.config.lm_identity,
                value_dir: Some(path.to_owned()),
                value_grad: None,
                controller: None,
                exported_steps: None,
                exported_bound: None,
            });
        }
        let (dir, file) = if path.is_dir() {
            if !path.join("manifest.json").is_file() {
                return Err(invalid(
                    "neither an export directory (manifest.json) nor a value directory (config.json)"
                        .into(),
                ));
            }
            (path.to_owned(), path.join("value_grad.onnx"))
        } else if path.extension().is_some_and(|e| e == "onnx") {
            (
                path.parent().map(Path::to_owned).unwrap_or_default(),
                path.to_owned(),
            )
        } else {
            return Err(invalid(
                "expected an export directory, an .onnx file or a value directory".into(),
            ));
        };
        let summary = inspect(&file)?;
        let meta = |key: &str| -> Result<&String> {
            summary.metadata.get(key).ok_or_else(|| Error::Invalid {
                path: file.clone(),
                message: format!("no `{key}` metadata: not exported by recontrol"),
            })
        };
        let hidden_size = meta("hidden_size")?.parse().map_err(|_| Error::Invalid {
            path: file.clone(),
            message: "hidden_size metadata is not a number".into(),
        })?;
        let lm_identity = meta("lm_identity")?.clone();
        let sibling = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let manifest_value_dir = std::fs::read_to_string(dir.join("manifest.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|m| m["value_dir"].as_str().map(PathBuf::from))
            .filter(|p| p.join("config.json").is_file());
        let controller = sibling("controller.onnx");
        let (exported_steps, exported_bound) = match &controller {
            Some(c) => {
                let s = inspect(c)?;
                (
                    s.metadata.get("steps").and_then(|v| v.parse().ok()),
                    s.metadata.get("max_edit_norm").and_then(|v| v.parse().ok()),
                )
            }
            None => (None, None),
        };
        Ok(Self {
            path: path.to_owned(),
            hidden_size,
            lm_identity,
            value_dir: manifest_value_dir,
            value_grad: sibling("value_grad.onnx"),
            controller,
            exported_steps,
            exported_bound,
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
            return Err(Error::Mismatch(format!(
                "the value head at {} takes hidden size {}, the model's is {hidden_size}",
                self.path.display(),
                self.hidden_size
            )));
        }
        if self.lm_identity != lm_identity && !allow_foreign {
            return Err(Error::Mismatch(format!(
                "the value head at {} was trained on the states of model {}, not this model ({lm_identity}); pass --allow-foreign-value to use it anyway",
                self.path.display(),
                self.lm_identity
            )));
        }
        Ok(())
    }

    /// Builds a backend. `onnx` runs the exported graphs with ONNX Runtime (a value directory
    /// is exported on the fly into a temporary folder), with its CUDA execution provider when
    /// `device` is a GPU and the loaded onnxruntime has one, else on the CPU; `torch` runs the
    /// value directory's weights with libtorch autograd on `device`.
    pub fn backend(
        &self,
        kind: BackendKind,
        device: Device,
        runtime: Option<&OrtRuntime>,
        threads: Option<usize>,
    ) -> Result<Box<dyn GradientBackend>> {
        match kind {
            BackendKind::Torch => {
                let dir = self.value_dir.as_ref().ok_or_else(|| Error::Invalid {
                    path: self.path.clone(),
                    message: "the torch backend needs the value directory (config.json + model.safetensors); its manifest points to none that exists".into(),
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
                        .as_deref()
                        .zip(self.exported_steps)
                        .map(|(c, steps)| (c, steps, self.exported_bound));
                    return Ok(Box::new(OnnxBackend::open(
                        runtime,
                        value_grad,
                        controller,
                        self.hidden_size,
                        threads,
                        cuda,
                    )?));
                }
                let dir = self.value_dir.as_ref().ok_or_else(|| Error::Invalid {
                    path: self.path.clone(),
                    message: "no value_grad.onnx beside it".into(),
                })?;
                // Sessions hold the graphs in memory, so the temporary files can go.
                let temp = tempfile::tempdir().map_err(|e| Error::Invalid {
                    path: std::env::temp_dir(),
                    message: e.to_string(),
                })?;
                let out = temp.path().join("export");
                write_export(
                    &ValueDir::read(dir)?,
                    &out,
                    &ControllerSpec {
                        steps: 0,
                        alpha: 0.0,
                        max_edit_norm: None,
                    },
                    &Producer {
                        recontrol_version: env!("CARGO_PKG_VERSION").into(),
                        git_revision: String::new(),
                    },
                )?;
                Ok(Box::new(OnnxBackend::open(
                    runtime,
                    &out.join("value_grad.onnx"),
                    None,
                    self.hidden_size,
                    threads,
                    cuda,
                )?))
            }
        }
    }
}
