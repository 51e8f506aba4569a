//! The metadata of an exported graph (ONNX `metadata_props`), one type that the exporter
//! writes and readers parse back: which graph it is, the value head's sizes, identity and
//! config, the controller settings fixed at export, and who exported it. All three graphs of
//! an export carry the same keys; only `recontrol.graph` differs.
//!
//! On disk every value is a string: numbers in Rust's `Display` form (`0.25`, `12`), a
//! missing edit-norm bound as `none`, the value config as compact JSON.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use crate::artifact::{inspect, Producer};
use crate::graphs::ControllerSpec;
use crate::value_dir::{ValueConfig, ValueDir};
use crate::{Error, Result};

/// One of the three graphs of an export (`recontrol.graph`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphKind {
    /// `value.onnx`: V.
    Value,
    /// `value_grad.onnx`: V and dV/dh.
    ValueGrad,
    /// `controller.onnx`: the unrolled gradient steps.
    Controller,
}

impl GraphKind {
    /// The three, in the order they are written.
    pub const ALL: [Self; 3] = [Self::Value, Self::ValueGrad, Self::Controller];

    /// The graph's name, as `recontrol.graph` records it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Value => "value",
            Self::ValueGrad => "value_grad",
            Self::Controller => "controller",
        }
    }

    /// Its file in an export directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Value => "value.onnx",
            Self::ValueGrad => "value_grad.onnx",
            Self::Controller => "controller.onnx",
        }
    }
}

/// The metadata of one exported graph.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphMetadata {
    /// `recontrol.graph`.
    pub graph: GraphKind,
    /// The value head's input width (the value config's `input_dim`).
    pub hidden_size: usize,
    /// The source LM's hidden size and identity (from the value config).
    pub lm_hidden_size: usize,
    pub lm_identity: String,
    /// sha256 (hex) of the value directory's `model.safetensors`.
    pub value_weights_sha256: String,
    /// The value directory's `config.json`.
    pub value_config: ValueConfig,
    /// `steps`, `alpha`, `max_edit_norm`: the controller settings fixed at export.
    pub controller: ControllerSpec,
    /// `recontrol_version`, `git_revision`.
    pub producer: Producer,
}

impl GraphMetadata {
    /// The metadata of `graph` exported from `value` with `controller` by `producer`.
    pub fn new(
        graph: GraphKind,
        value: &ValueDir,
        controller: &ControllerSpec,
        producer: &Producer,
    ) -> Self {
        Self {
            graph,
            hidden_size: value.config.input_dim,
            lm_hidden_size: value.config.lm_hidden_size,
            lm_identity: value.config.lm_identity.clone(),
            value_weights_sha256: value.weights_sha256.clone(),
            value_config: value.config.clone(),
            controller: *controller,
            producer: producer.clone(),
        }
    }

    /// The `(key, value)` pairs as written into the model, in this order.
    pub fn to_props(&self) -> serde_json::Result<Vec<(String, String)>> {
        let c = &self.controller;
        Ok([
            ("recontrol.graph", self.graph.name().to_owned()),
            ("hidden_size", self.hidden_size.to_string()),
            ("lm_hidden_size", self.lm_hidden_size.to_string()),
            ("lm_identity", self.lm_identity.clone()),
            ("value_weights_sha256", self.value_weights_sha256.clone()),
            ("value_config", serde_json::to_string(&self.value_config)?),
            ("alpha", c.alpha.to_string()),
            ("steps", c.steps.to_string()),
            (
                "max_edit_norm",
                c.max_edit_norm.map_or("none".to_owned(), |e| e.to_string()),
            ),
            ("recontrol_version", self.producer.recontrol_version.clone()),
            ("git_revision", self.producer.git_revision.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect())
    }

    /// Parses the metadata of the model at `path` (named in errors): a missing key, or a
    /// value that is not what its key holds, is an error naming the key.
    pub fn parse(path: &Path, props: &BTreeMap<String, String>) -> Result<Self> {
        let get = |key: &'static str| -> Result<&str> {
            props
                .get(key)
                .map(String::as_str)
                .ok_or(Error::MissingMetadata {
                    path: path.to_owned(),
                    key,
                })
        };
        let bad = |key: &'static str, expected: String| Error::BadValue {
            path: path.to_owned(),
            key,
            expected,
            found: format!("{:?}", props.get(key).map_or("", String::as_str)),
        };
        fn number<T: FromStr>(text: &str) -> Option<T> {
            text.parse().ok()
        }
        let count = |key: &'static str| -> Result<usize> {
            number(get(key)?).ok_or_else(|| bad(key, "an unsigned integer".into()))
        };
        let graph = match get("recontrol.graph")? {
            "value" => GraphKind::Value,
            "value_grad" => GraphKind::ValueGrad,
            "controller" => GraphKind::Controller,
            _ => {
                return Err(bad(
                    "recontrol.graph",
                    "value, value_grad or controller".into(),
                ))
            }
        };
        let value_config = serde_json::from_str(get("value_config")?)
            .map_err(|e| bad("value_config", format!("a value config ({e})")))?;
        let alpha = number(get("alpha")?).ok_or_else(|| bad("alpha", "a number".into()))?;
        let max_edit_norm = match get("max_edit_norm")? {
            "none" => None,
            text => {
                Some(number(text).ok_or_else(|| bad("max_edit_norm", "a number or none".into()))?)
            }
        };
        Ok(Self {
            graph,
            hidden_size: count("hidden_size")?,
            lm_hidden_size: count("lm_hidden_size")?,
            lm_identity: get("lm_identity")?.to_owned(),
            value_weights_sha256: get("value_weights_sha256")?.to_owned(),
            value_config,
            controller: ControllerSpec {
                steps: count("steps")?,
                alpha,
                max_edit_norm,
            },
            producer: Producer {
                recontrol_version: get("recontrol_version")?.to_owned(),
                git_revision: get("git_revision")?.to_owned(),
            },
        })
    }

    /// Reads and parses the metadata of the ONNX file at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        Self::parse(path, &inspect(path)?.metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value_dir::{Activation, Target};

    fn metadata() -> GraphMetadata {
        GraphMetadata {
            graph: GraphKind::Controller,
            hidden_size: 6,
            lm_hidden_size: 6,
            lm_identity: "sha256:abc".into(),
            value_weights_sha256: "00ff".into(),
            value_config: ValueConfig {
                input_dim: 6,
                hidden_dims: vec![4],
                activation: Activation::Gelu,
                reward_mean: 0.5,
                reward_std: 2.0,
                lm_hidden_size: 6,
                lm_identity: "sha256:abc".into(),
                target: Some(Target::Lambda(0.75)),
                training: serde_json::json!({"epochs": 3}),
                seed: 7,
                git_revision: "rev".into(),
                recontrol_version: "0.1.0".into(),
            },
            controller: ControllerSpec {
                steps: 12,
                alpha: 0.1,
                max_edit_norm: Some(3.0),
            },
            producer: Producer {
                recontrol_version: "0.1.0".into(),
                git_revision: "rev".into(),
            },
        }
    }

    fn props(m: &GraphMetadata) -> BTreeMap<String, String> {
        m.to_props().expect("props").into_iter().collect()
    }

    /// The strings on disk, written out by hand, and the parse that gives the struct back.
    #[test]
    fn writes_the_keys_and_strings_on_disk_and_parses_them_back() -> Result<()> {
        let m = metadata();
        let written = m.to_props().expect("props");
        let want = [
            ("recontrol.graph", "controller"),
            ("hidden_size", "6"),
            ("lm_hidden_size", "6"),
            ("lm_identity", "sha256:abc"),
            ("value_weights_sha256", "00ff"),
            (
                "value_config",
                r#"{"input_dim":6,"hidden_dims":[4],"activation":"gelu","reward_mean":0.5,"reward_std":2.0,"lm_hidden_size":6,"lm_identity":"sha256:abc","target":{"lambda":0.75},"training":{"epochs":3},"seed":7,"git_revision":"rev","recontrol_version":"0.1.0"}"#,
            ),
            ("alpha", "0.1"),
            ("steps", "12"),
            ("max_edit_norm", "3"),
            ("recontrol_version", "0.1.0"),
            ("git_revision", "rev"),
        ];
        let written: Vec<(&str, &str)> = written
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(written, want);
        assert_eq!(GraphMetadata::parse(Path::new("c.onnx"), &props(&m))?, m);
        // No bound is written `none` and read back as none.
        let unbounded = GraphMetadata {
            controller: ControllerSpec {
                max_edit_norm: None,
                ..m.controller
            },
            ..m
        };
        let p = props(&unbounded);
        assert_eq!(p["max_edit_norm"], "none");
        assert_eq!(GraphMetadata::parse(Path::new("c.onnx"), &p)?, unbounded);
        Ok(())
    }

    #[test]
    fn a_bad_or_missing_value_names_its_key() {
        let parse = |key: &str, value: Option<&str>| {
            let mut p = props(&metadata());
            match value {
                Some(v) => p.insert(key.to_owned(), v.to_owned()),
                None => p.remove(key),
            };
            GraphMetadata::parse(Path::new("m.onnx"), &p)
                .expect_err(key)
                .to_string()
        };
        assert_eq!(
            parse("hidden_size", Some("six")),
            "m.onnx: `hidden_size` is \"six\", not an unsigned integer"
        );
        assert_eq!(
            parse("steps", Some("-1")),
            "m.onnx: `steps` is \"-1\", not an unsigned integer"
        );
        assert_eq!(
            parse("max_edit_norm", Some("big")),
            "m.onnx: `max_edit_norm` is \"big\", not a number or none"
        );
        assert_eq!(
            parse("alpha", Some("")),
            "m.onnx: `alpha` is \"\", not a number"
        );
        assert_eq!(
            parse("recontrol.graph", Some("policy")),
            "m.onnx: `recontrol.graph` is \"policy\", not value, value_grad or controller"
        );
        assert!(parse("value_config", Some("{}"))
            .starts_with("m.onnx: `value_config` is \"{}\", not a value config (missing field"));
        assert_eq!(
            parse("lm_identity", None),
            "m.onnx: no `lm_identity` metadata: not exported by recontrol"
        );
    }
}
