//! Writing an export directory (`value.onnx`, `value_grad.onnx`, `controller.onnx` and
//! `manifest.json`, all or nothing) and reading a model's interface back (`inspect`).

use std::path::Path;

use prost::Message;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::graph::{IR_VERSION, OPSET};
use crate::graphs::{controller_graph, value_grad_graph, value_graph, ControllerSpec};
use crate::proto::{tensor_shape_proto::dimension, type_proto, ModelProto, ValueInfoProto};
use crate::value_dir::ValueDir;
use crate::{Error, Result};

/// The three graph files, in the order they are written.
pub const FILES: [&str; 3] = ["value.onnx", "value_grad.onnx", "controller.onnx"];

/// Who made an artifact (recorded in metadata and the manifest).
#[derive(Debug, Clone, Serialize)]
pub struct Producer {
    pub recontrol_version: String,
    pub git_revision: String,
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
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Port {
    pub name: String,
    pub elem_type: String,
    pub dims: Vec<String>,
}

/// Builds the three models of a value directory.
pub fn build_models(
    value: &ValueDir,
    spec: &ControllerSpec,
    producer: &Producer,
) -> Result<Vec<(&'static str, ModelProto)>> {
    let config = serde_json::to_string(&value.config).map_err(|e| Error::Invalid {
        path: value.dir.join("config.json"),
        message: e.to_string(),
    })?;
    let metadata = |graph: &str| -> Vec<(String, String)> {
        let c = &value.config;
        [
            ("recontrol.graph", graph.to_owned()),
            ("hidden_size", c.input_dim.to_string()),
            ("lm_hidden_size", c.lm_hidden_size.to_string()),
            ("lm_identity", c.lm_identity.clone()),
            ("value_weights_sha256", value.weights_sha256.clone()),
            ("value_config", config.clone()),
            ("alpha", spec.alpha.to_string()),
            ("steps", spec.steps.to_string()),
            (
                "max_edit_norm",
                spec.max_edit_norm
                    .map_or("none".to_owned(), |e| e.to_string()),
            ),
            ("recontrol_version", producer.recontrol_version.clone()),
            ("git_revision", producer.git_revision.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };
    let d = value.config.input_dim;
    Ok(vec![
        (
            FILES[0],
            value_graph(value).finish(
                "value",
                &format!("V(hidden [batch, {d}]) -> value [batch], in reward units"),
                &metadata("value"),
            ),
        ),
        (
            FILES[1],
            value_grad_graph(value).finish(
                "value_grad",
                "hidden -> (value [batch], grad = dV/dhidden [batch, d])",
                &metadata("value_grad"),
            ),
        ),
        (
            FILES[2],
            controller_graph(value, spec).finish(
                "controller",
                &format!(
                    "(hidden, alpha) -> (edited_hidden, value_before, value_after): {} steps of \
                     h <- h + alpha * dV/dh{}",
                    spec.steps,
                    spec.max_edit_norm
                        .map_or(String::new(), |e| format!(", ||h - hidden|| <= {e}"))
                ),
                &metadata("controller"),
            ),
        ),
    ])
}

/// Writes the export directory `out` (which must not exist): the three models and
/// `manifest.json`, under a temporary name renamed when complete. Returns the manifest.
pub fn write_export(
    value: &ValueDir,
    out: &Path,
    spec: &ControllerSpec,
    producer: &Producer,
) -> Result<serde_json::Value> {
    if out.exists() {
        return Err(Error::Invalid {
            path: out.to_owned(),
            message: "exists; remove it or choose another name".into(),
        });
    }
    let models = build_models(value, spec, producer)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    let temp = out.with_file_name(format!(".{name}.tmp"));
    if temp.exists() {
        std::fs::remove_dir_all(&temp).map_err(io(&temp))?;
    }
    std::fs::create_dir_all(&temp).map_err(io(&temp))?;
    let mut files = serde_json::Map::new();
    for (file, model) in &models {
        let bytes = model.encode_to_vec();
        std::fs::write(temp.join(file), &bytes).map_err(io(&temp.join(file)))?;
        let summary = summarize(model);
        files.insert(
            (*file).to_owned(),
            serde_json::json!({
                "sha256": format!("{:x}", Sha256::digest(&bytes)),
                "bytes": bytes.len(),
                "inputs": summary.inputs,
                "outputs": summary.outputs,
                "nodes": summary.nodes,
            }),
        );
    }
    let manifest = serde_json::json!({
        "format": "recontrol-export/1",
        "value_dir": std::fs::canonicalize(&value.dir).unwrap_or_else(|_| value.dir.clone()),
        "hidden_size": value.config.input_dim,
        "lm_identity": value.config.lm_identity,
        "controller": {
            "steps": spec.steps,
            "alpha": spec.alpha,
            "max_edit_norm": spec.max_edit_norm,
        },
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "files": files,
        "value_config": value.config,
        "producer": producer,
    });
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Invalid {
        path: temp.join("manifest.json"),
        message: e.to_string(),
    })?;
    std::fs::write(temp.join("manifest.json"), text).map_err(io(&temp))?;
    std::fs::rename(&temp, out).map_err(io(out))?;
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
