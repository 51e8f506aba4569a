//! Writing an export directory (`value.onnx`, `value_grad.onnx`, `controller.onnx` and
//! `manifest.json`, all or nothing) and reading a model's interface back (`inspect`).

use std::path::{Path, PathBuf};

use prost::Message;
use recontrol_io::AtomicDir;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::graph::{IR_VERSION, OPSET};
use crate::graphs::{controller_graph, value_grad_graph, value_graph, ControllerSpec};
use crate::metadata::{GraphKind, GraphMetadata};
use crate::proto::{tensor_shape_proto::dimension, type_proto, ModelProto, ValueInfoProto};
use crate::value_dir::{ValueConfig, ValueDir};
use crate::{Error, Result};

/// `format` of the manifests this crate writes and reads.
pub const MANIFEST_FORMAT: &str = "recontrol-export/1";

/// Who made an artifact (recorded in metadata and the manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Producer {
    pub recontrol_version: String,
    pub git_revision: String,
}

impl From<&recontrol_io::Provenance> for Producer {
    /// The version and revision of a run's provenance.
    fn from(p: &recontrol_io::Provenance) -> Self {
        Self {
            recontrol_version: p.recontrol_version.clone(),
            git_revision: p.git_revision.clone(),
        }
    }
}

/// The interface of one ONNX model file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSummary {
    pub ir_version: i64,
    /// `(domain, version)`; the default domain is `""`.
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    pub nodes: usize,
    pub initializers: usize,
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// A graph input or output: its name, element type and dimensions (`batch` for a named one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Port {
    pub name: String,
    pub elem_type: String,
    pub dims: Vec<String>,
}

/// `manifest.json` of an export directory, as [`write_export`] writes it and
/// [`Manifest::read`] reads it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// The value directory exported (made absolute when it could be).
    pub value_dir: PathBuf,
    pub hidden_size: usize,
    pub lm_identity: String,
    /// The settings `controller.onnx` was exported with.
    pub controller: ControllerSpec,
    pub opset: i64,
    pub ir_version: i64,
    pub files: ManifestFiles,
    pub value_config: ValueConfig,
    pub producer: Producer,
}

/// The three graph files of an export, keyed by file name in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestFiles {
    #[serde(rename = "value.onnx")]
    pub value: FileEntry,
    #[serde(rename = "value_grad.onnx")]
    pub value_grad: FileEntry,
    #[serde(rename = "controller.onnx")]
    pub controller: FileEntry,
}

impl ManifestFiles {
    /// `(file name, entry)` of each graph, in the order they are written.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &FileEntry)> {
        GraphKind::ALL.into_iter().map(|kind| {
            let entry = match kind {
                GraphKind::Value => &self.value,
                GraphKind::ValueGrad => &self.value_grad,
                GraphKind::Controller => &self.controller,
            };
            (kind.file_name(), entry)
        })
    }
}

/// One graph file of an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// sha256 (hex) of the file.
    pub sha256: String,
    pub bytes: usize,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    pub nodes: usize,
}

impl FileEntry {
    fn of(bytes: &[u8], model: &ModelProto) -> Self {
        let summary = summarize(model);
        Self {
            sha256: format!("{:x}", Sha256::digest(bytes)),
            bytes: bytes.len(),
            inputs: summary.inputs,
            outputs: summary.outputs,
            nodes: summary.nodes,
        }
    }
}

impl Manifest {
    /// Reads `dir/manifest.json`; a file that is not a manifest of this format is an error
    /// naming it.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: Self = serde_json::from_str(&text).map_err(|e| Error::Invalid {
            path: path.clone(),
            message: format!("not an export manifest: {e}"),
        })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(Error::BadValue {
                path,
                key: "format",
                expected: MANIFEST_FORMAT.to_owned(),
                found: format!("{:?}", manifest.format),
            });
        }
        Ok(manifest)
    }
}

/// Builds one graph of a value directory, with its metadata.
pub fn build_model(
    graph: GraphKind,
    value: &ValueDir,
    spec: &ControllerSpec,
    producer: &Producer,
) -> Result<ModelProto> {
    let metadata = GraphMetadata::new(graph, value, spec, producer)
        .to_props()
        .map_err(|e| Error::Invalid {
            path: value.dir.join("config.json"),
            message: e.to_string(),
        })?;
    let d = value.config.input_dim;
    Ok(match graph {
        GraphKind::Value => value_graph(value).finish(
            graph.name(),
            &format!("V(hidden [batch, {d}]) -> value [batch], in reward units"),
            &metadata,
        ),
        GraphKind::ValueGrad => value_grad_graph(value).finish(
            graph.name(),
            "hidden -> (value [batch], grad = dV/dhidden [batch, d])",
            &metadata,
        ),
        GraphKind::Controller => controller_graph(value, spec).finish(
            graph.name(),
            &format!(
                "(hidden, alpha) -> (edited_hidden, value_before, value_after): {} steps of \
                 h <- h + alpha * dV/dh{}",
                spec.steps,
                spec.max_edit_norm
                    .map_or(String::new(), |e| format!(", ||h - hidden|| <= {e}"))
            ),
            &metadata,
        ),
    })
}

/// Writes the export directory `out` (which must not exist): the three models and
/// `manifest.json`, under a temporary name renamed when complete. Returns the manifest.
pub fn write_export(
    value: &ValueDir,
    out: &Path,
    spec: &ControllerSpec,
    producer: &Producer,
) -> Result<Manifest> {
    if out.exists() {
        return Err(Error::Exists {
            path: out.to_owned(),
        });
    }
    // Every graph is built before anything is written.
    let build = |graph| build_model(graph, value, spec, producer);
    let value_model = build(GraphKind::Value)?;
    let value_grad_model = build(GraphKind::ValueGrad)?;
    let controller_model = build(GraphKind::Controller)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    let dir = AtomicDir::create(out)?;
    let temp = dir.path();
    let write = |graph: GraphKind, model: &ModelProto| -> Result<FileEntry> {
        let file = temp.join(graph.file_name());
        let bytes = model.encode_to_vec();
        std::fs::write(&file, &bytes).map_err(io(&file))?;
        Ok(FileEntry::of(&bytes, model))
    };
    let files = ManifestFiles {
        value: write(GraphKind::Value, &value_model)?,
        value_grad: write(GraphKind::ValueGrad, &value_grad_model)?,
        controller: write(GraphKind::Controller, &controller_model)?,
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_owned(),
        value_dir: std::fs::canonicalize(&value.dir).unwrap_or_else(|_| value.dir.clone()),
        hidden_size: value.config.input_dim,
        lm_identity: value.config.lm_identity.clone(),
        controller: *spec,
        opset: OPSET,
        ir_version: IR_VERSION,
        files,
        value_config: value.config.clone(),
        producer: producer.clone(),
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Invalid {
        path: temp.join("manifest.json"),
        message: e.to_string(),
    })?;
    std::fs::write(temp.join("manifest.json"), text).map_err(io(temp))?;
    dir.commit()?;
    Ok(manifest)
}

/// Reads an ONNX file's interface and metadata.
pub fn inspect(path: &Path) -> Result<ModelSummary> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let model = ModelProto::decode(bytes.as_slice()).map_err(|e| Error::Invalid {
        path: path.to_owned(),
        message: format!("not an ONNX model: {e}"),
    })?;
    if model.graph.is_none() {
        return Err(Error::Invalid {
            path: path.to_owned(),
            message: "not an ONNX model: no graph".into(),
        });
    }
    Ok(summarize(&model))
}

fn summarize(model: &ModelProto) -> ModelSummary {
    let port = |v: &ValueInfoProto| -> Port {
        let tensor = v.r#type.as_ref().and_then(|t| match &t.value {
            Some(type_proto::Value::TensorType(t)) => Some(t),
            _ => None,
        });
        Port {
            name: v.name.clone().unwrap_or_default(),
            elem_type: tensor
                .and_then(|t| t.elem_type)
                .and_then(|e| crate::proto::tensor_proto::DataType::try_from(e).ok())
                .map_or("?".to_owned(), |e| e.as_str_name().to_lowercase()),
            dims: tensor
                .and_then(|t| t.shape.as_ref())
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(dimension::Value::DimValue(n)) => n.to_string(),
                            Some(dimension::Value::DimParam(p)) => p.clone(),
                            None => "?".to_owned(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    };
    let empty = crate::proto::GraphProto::default();
    let graph = model.graph.as_ref().unwrap_or(&empty);
    ModelSummary {
        ir_version: model.ir_version.unwrap_or(0),
        opsets: model
            .opset_import
            .iter()
            .map(|o| (o.domain.clone().unwrap_or_default(), o.version.unwrap_or(0)))
            .collect(),
        producer: format!(
            "{} {}",
            model.producer_name.clone().unwrap_or_default(),
            model.producer_version.clone().unwrap_or_default()
        ),
        inputs: graph.input.iter().map(port).collect(),
        outputs: graph.output.iter().map(port).collect(),
        nodes: graph.node.len(),
        initializers: graph.initializer.len(),
        metadata: model
            .metadata_props
            .iter()
            .map(|p| {
                (
                    p.key.clone().unwrap_or_default(),
                    p.value.clone().unwrap_or_default(),
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value_dir::{Activation, Linear};

    /// A linear value head `V(h) = 0.5 h_0 - h_1 + 0.25` held in memory.
    fn value_dir(dir: &Path) -> ValueDir {
        ValueDir {
            dir: dir.to_owned(),
            config: ValueConfig {
                input_dim: 2,
                hidden_dims: vec![],
                activation: Activation::Relu,
                reward_mean: 0.0,
                reward_std: 1.0,
                lm_hidden_size: 2,
                lm_identity: "sha256:abc".into(),
                target: None,
                training: serde_json::json!({}),
                seed: 0,
                git_revision: "rev".into(),
                recontrol_version: "0.1.0".into(),
            },
            layers: vec![Linear {
                weight: ndarray::Array2::from_shape_vec((1, 2), vec![0.5, -1.0]).expect("shape"),
                bias: ndarray::Array1::from(vec![0.25]),
            }],
            weights_sha256: "00ff".into(),
        }
    }

    #[test]
    fn the_manifest_reads_back_as_written_and_a_bad_one_is_named() -> Result<()> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let value = value_dir(&tmp.path().join("value"));
        let out = tmp.path().join("export");
        let spec = ControllerSpec {
            steps: 3,
            alpha: 0.1,
            max_edit_norm: Some(0.5),
        };
        let producer = Producer {
            recontrol_version: "0.1.0".into(),
            git_revision: "rev".into(),
        };
        let written = write_export(&value, &out, &spec, &producer)?;
        let text = std::fs::read_to_string(out.join("manifest.json")).expect("manifest");
        // The keys in the order of the first manifests, f32 settings widened to f64.
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("  \"") && !l.starts_with("   "))
            .filter_map(|l| l.trim().split('"').nth(1))
            .collect();
        assert_eq!(
            keys,
            [
                "format",
                "value_dir",
                "hidden_size",
                "lm_identity",
                "controller",
                "opset",
                "ir_version",
                "files",
                "value_config",
                "producer"
            ]
        );
        assert!(
            text.contains(
                "\"controller\": {\n    \"steps\": 3,\n    \"alpha\": 0.10000000149011612,\n    \
                 \"max_edit_norm\": 0.5\n  }"
            ),
            "{text}"
        );
        let read = Manifest::read(&out)?;
        assert_eq!(read, written);
        assert_eq!(read.controller, spec, "the f32 settings read back exactly");
        let names: Vec<&str> = read.files.iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["value.onnx", "value_grad.onnx", "controller.onnx"]);
        for (name, entry) in read.files.iter() {
            let bytes = std::fs::read(out.join(name)).expect("graph");
            assert_eq!(entry.bytes, bytes.len(), "{name}");
            assert_eq!(
                entry.sha256,
                format!("{:x}", Sha256::digest(&bytes)),
                "{name}"
            );
        }
        // Every graph's metadata parses back to what was exported.
        for graph in GraphKind::ALL {
            let meta = GraphMetadata::read(&out.join(graph.file_name()))?;
            assert_eq!(meta, GraphMetadata::new(graph, &value, &spec, &producer));
        }

        std::fs::write(
            out.join("manifest.json"),
            text.replace("recontrol-export/1", "recontrol-export/9"),
        )
        .expect("write");
        let err = Manifest::read(&out).expect_err("format").to_string();
        assert!(
            err.ends_with(
                "manifest.json: `format` is \"recontrol-export/9\", not recontrol-export/1"
            ),
            "{err}"
        );
        std::fs::write(
            out.join("manifest.json"),
            text.replace("\"opset\"", "\"opsets\""),
        )
        .expect("write");
        let err = Manifest::read(&out).expect_err("opset").to_string();
        assert!(
            err.contains("manifest.json: not an export manifest: missing field `opset`"),
            "{err}"
        );
        assert!(matches!(
            write_export(&value, &out, &spec, &producer),
            Err(Error::Exists { .. })
        ));
        Ok(())
    }
}
