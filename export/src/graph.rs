//! A small builder of ONNX graphs over the prost types: fresh value names, float32 and int64
//! initializers, single-output nodes with typed attributes, and the model around the graph
//! (IR version, opset, metadata).

use crate::proto::attribute_proto::AttributeType;
use crate::proto::tensor_proto::DataType;
use crate::proto::tensor_shape_proto::{dimension, Dimension};
use crate::proto::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The default-domain opset the graphs use (Gemm, Erf, ReduceL2 with an `axes` attribute).
pub const OPSET: i64 = 17;
/// The IR version that goes with opset 17 (ONNX 1.12), which onnxruntime >= 1.12 reads.
pub const IR_VERSION: i64 = 8;

/// One dimension of a graph input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// A named dynamic dimension (e.g. `batch`).
    Named(&'static str),
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// Builds one graph: nodes in topological order as they are added.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    names: usize,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.names += 1;
        format!("{hint}_{}", self.names)
    }

    /// Declares a float32 graph input.
    pub fn input(&mut self, name: &str, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, dims));
        name.to_owned()
    }

    /// Declares `value` (already computed) as the float32 graph output `name`.
    pub fn output(&mut self, value: &str, name: &str, dims: &[Dim]) {
        self.op_to("Identity", &[value], &[], name);
        self.outputs.push(value_info(name, dims));
    }

    /// A float32 initializer of `shape`, row-major `data`.
    pub fn constant(&mut self, hint: &str, shape: &[usize], data: &[f32]) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            name: Some(name.clone()),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(DataType::Float as i32),
            raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..TensorProto::default()
        });
        name
    }

    /// A float32 scalar initializer.
    pub fn scalar(&mut self, hint: &str, value: f32) -> String {
        self.constant(hint, &[], &[value])
    }

    /// An int64 initializer of shape `[values.len()]`.
    pub fn ints(&mut self, hint: &str, values: &[i64]) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            name: Some(name.clone()),
            dims: vec![values.len() as i64],
            data_type: Some(DataType::Int64 as i32),
            raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..TensorProto::default()
        });
        name
    }

    /// A node with one output (a fresh name, returned).
    pub fn op(&mut self, op_type: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        let out = self.fresh(&op_type.to_lowercase());
        self.op_to(op_type, inputs, attrs, &out);
        out
    }

    fn op_to(&mut self, op_type: &str, inputs: &[&str], attrs: &[(&str, Attr)], output: &str) {
        let name = self.fresh(op_type);
        self.nodes.push(NodeProto {
            name: Some(name),
            op_type: Some(op_type.to_owned()),
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![output.to_owned()],
            attribute: attrs.iter().map(|(n, a)| attribute(n, a)).collect(),
            ..NodeProto::default()
        });
    }

    /// The model: this graph, the opset, producer and `metadata` (key, value) pairs.
    /// Initializers no node reads are left out.
    pub fn finish(mut self, name: &str, doc: &str, metadata: &[(String, String)]) -> ModelProto {
        let used: std::collections::HashSet<&String> =
            self.nodes.iter().flat_map(|n| &n.input).collect();
        self.initializers
            .retain(|t| t.name.as_ref().is_some_and(|n| used.contains(n)));
        ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET),
            }],
            producer_name: Some("recontrol".to_owned()),
            producer_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            doc_string: Some(doc.to_owned()),
            graph: Some(GraphProto {
                name: Some(name.to_owned()),
                node: self.nodes,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..GraphProto::default()
            }),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: Some(k.clone()),
                    value: Some(v.clone()),
                })
                .collect(),
            ..ModelProto::default()
        }
    }
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Named(s) => dimension::Value::DimParam((*s).to_owned()),
            }),
            ..Dimension::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_owned()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

fn attribute(name: &str, value: &Attr) -> AttributeProto {
    let mut a = AttributeProto {
        name: Some(name.to_owned()),
        ..AttributeProto::default()
    };
    match value {
        Attr::Int(i) => {
            a.r#type = Some(AttributeType::Int as i32);
            a.i = Some(*i);
        }
        Attr::Ints(v) => {
            a.r#type = Some(AttributeType::Ints as i32);
            a.ints = v.clone();
        }
        Attr::Float(f) => {
            a.r#type = Some(AttributeType::Float as i32);
            a.f = Some(*f);
        }
    }
    a
}
