//! `recontrol export` and `recontrol export inspect` end to end, and their refusals.

use std::path::Path;
use std::process::Output;

use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};
use serde_json::Value;
use tch::{Kind, Tensor};

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

/// A value directory (input 6 -> 5 -> 4 -> 1) with `activation`, weights changed by `edit`.
fn value_dir(dir: &Path, activation: &str, edit: impl Fn(&mut Vec<(String, Tensor)>)) {
    std::fs::create_dir_all(dir).expect("mkdir");
    tch::manual_seed(1);
    let mut tensors = Vec::new();
    for (i, (inp, out)) in [(6, 5), (5, 4), (4, 1)].into_iter().enumerate() {
        tensors.push((
            format!("layers.{i}.weight"),
            Tensor::randn([out, inp], (Kind::Float, tch::Device::Cpu)),
        ));
        tensors.push((
            format!("layers.{i}.bias"),
            Tensor::randn([out], (Kind::Float, tch::Device::Cpu)),
        ));
    }
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).expect("write");
    let config = serde_json::json!({
        "input_dim": 6, "hidden_dims": [5, 4], "activation": activation, "reward_mean": 1.0,
        "reward_std": 2.0, "lm_hidden_size": 6, "lm_identity": "sha256:abc", "training": {},
        "seed": 0, "git_revision": "x", "recontrol_version": "x"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write");
}

#[test]
fn exports_three_graphs_with_a_manifest_and_inspects_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let value = dir.path().join("value");
    value_dir(&value, "gelu", |_| {});
    let out = dir.path().join("onnx");
    let run = recontrol(&[
        "export",
        "--value",
        s(&value),
        "--out",
        s(&out),
        "--steps",
        "12",
        "--alpha",
        "0.25",
        "--max-edit-norm",
        "3",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("manifest.json")).expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["controller"]["steps"], 12);
    assert_eq!(manifest["controller"]["alpha"], 0.25);
    assert_eq!(manifest["controller"]["max_edit_norm"], 3.0);
    assert_eq!(manifest["hidden_size"], 6);
    assert_eq!(manifest["lm_identity"], "sha256:abc");
    for file in ["value.onnx", "value_grad.onnx", "controller.onnx"] {
        assert!(out.join(file).is_file(), "{file}");
        assert_eq!(
            manifest["files"][file]["sha256"].as_str().map(str::len),
            Some(64)
        );
    }

    let run = recontrol(&["export", "inspect", s(&out.join("controller.onnx"))]);
    assert!(run.status.success(), "{}", stderr(&run));
    let summary: Value = serde_json::from_slice(&run.stdout).expect("json");
    let names = |key: &str| -> Vec<String> {
        summary[key]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| p["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(names("inputs"), ["hidden", "alpha"]);
    assert_eq!(
        names("outputs"),
        ["edited_hidden", "value_before", "value_after"]
    );
    assert_eq!(
        summary["inputs"][0]["dims"],
        serde_json::json!(["batch", "6"])
    );
    assert_eq!(summary["ir_version"], 8);
    assert_eq!(summary["opsets"], serde_json::json!([["", 17]]));
    let meta = &summary["metadata"];
    assert_eq!(meta["hidden_size"], "6");
    assert_eq!(meta["lm_identity"], "sha256:abc");
    assert_eq!(meta["steps"], "12");
    assert_eq!(meta["alpha"], "0.25");
    assert_eq!(meta["max_edit_norm"], "3");
    assert_eq!(meta["recontrol.graph"], "controller");
    let config: Value =
        serde_json::from_str(meta["value_config"].as_str().expect("config")).expect("config json");
    assert_eq!(config["activation"], "gelu");

    // The output directory is never overwritten.
    let again = recontrol(&["export", "--value", s(&value), "--out", s(&out)]);
    assert_fails_with(&again, "exists; remove it or choose another name");
}

/// A change to a value directory's weights.
type EditWeights = Box<dyn Fn(&mut Vec<(String, Tensor)>)>;

#[test]
fn refuses_bad_value_dirs_and_flags_without_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(&str, &str, EditWeights, &str)> = vec![
        (
            "shapes",
            "relu",
            Box::new(|t| t[2].1 = Tensor::zeros([3, 5], (Kind::Float, tch::Device::Cpu))),
            "layers.1.weight has shape [3, 5]; config.json ([6, 5, 4, 1]) implies [4, 5]",
        ),
        (
            "activation",
            "swish",
            Box::new(|_| {}),
            "not a value config: unknown variant `swish`",
        ),
        (
            "nan",
            "tanh",
            Box::new(|t| t[1].1 = t[1].1.full_like(f64::NAN)),
            "layers.0.bias has a non-finite value (NaN at 0)",
        ),
        (
            "missing",
            "relu",
            Box::new(|t| {
                let _ = t.remove(5);
            }),
            "layers.2.bias is missing",
        ),
    ];
    for (name, activation, edit, message) in cases {
        let value = dir.path().join(name);
        value_dir(&value, activation, edit);
        let out = dir.path().join(format!("{name}.onnx"));
        let run = recontrol(&["export", "--value", s(&value), "--out", s(&out)]);
        assert_fails_with(&run, message);
        assert!(!out.exists(), "{name}: wrote {}", out.display());
        assert!(
            !dir.path().join(format!(".{name}.onnx.tmp")).exists(),
            "{name}: left a temporary directory"
        );
    }
    let value = dir.path().join("good");
    value_dir(&value, "relu", |_| {});
    let out = dir.path().join("x");
    let run = recontrol(&[
        "export",
        "--value",
        s(&value),
        "--out",
        s(&out),
        "--max-edit-norm=-1",
    ]);
    assert_fails_with(
        &run,
        "'--max-edit-norm <MAX_EDIT_NORM>': expected a finite number > 0, got -1",
    );
    assert!(!out.exists());
    let run = recontrol(&["export", "inspect", s(&value.join("config.json"))]);
    assert_fails_with(&run, "not an ONNX model");
    let run = recontrol(&["export", "--value", s(&value)]);
    assert!(!run.status.success());
}
