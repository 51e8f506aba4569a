//! `recontrol value train | eval` end to end on a rule-labelled store of a fixture model.

use std::path::{Path, PathBuf};
use std::process::Output;

use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};
use recontrol_tests::{python_json, repo_root};
use serde_json::Value;

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

/// A store of 40 rollouts of the llama-mha fixture, labelled (or not) by a length rule.
fn store(dir: &Path, labelled: bool) -> PathBuf {
    cli::rule_store(env!("CARGO_BIN_EXE_recontrol"), dir, 40, labelled)
}

#[test]
fn trains_saves_logs_and_evaluates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rollouts = store(dir.path(), true);
    let out = dir.path().join("value");
    let run = recontrol(&[
        "value",
        "train",
        "--rollouts",
        s(&rollouts),
        "--out",
        s(&out),
        "--epochs",
        "3",
        "--hidden",
        "16",
        "--batch-size",
        "32",
        "--val-fraction",
        "0.25",
        "--target",
        "lambda",
        "--lambda",
        "0.75",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(String::from_utf8_lossy(&run.stdout).contains("best epoch"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(config["input_dim"], 64);
    assert_eq!(config["hidden_dims"], serde_json::json!([16]));
    assert_eq!(config["activation"], "relu");
    assert!(config["lm_identity"]
        .as_str()
        .expect("identity")
        .starts_with("sha256:"));
    assert!(config["reward_std"].as_f64().expect("std") > 0.0);
    assert_eq!(
        config["training"]["config"]["target"],
        serde_json::json!({"lambda": 0.75})
    );
    let tb = python_json(
        "tests/fixtures/read_tensorboard.py",
        &[s(&dir.path().join("value.work/logs"))],
    );
    assert_eq!(tb["value/val_loss"].as_array().map(Vec::len), Some(3));
    assert!(tb["value/spearman_v0_reward"].is_array());

    let run = recontrol(&[
        "value",
        "eval",
        "--value",
        s(&out),
        "--rollouts",
        s(&rollouts),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let metrics: Value = serde_json::from_slice(&run.stdout).expect("json");
    assert_eq!(metrics["rollouts"], 40);
    assert_eq!(metrics["target"], serde_json::json!({"lambda": 0.75}));
    assert!(metrics["terminal_mse"].as_f64().expect("mse").is_finite());

    // The target is recorded as `target`; value dirs written before that field have it only
    // in the training record, which eval reads too; one with neither is refused.
    assert_eq!(config["target"], serde_json::json!({"lambda": 0.75}));
    let eval = |config: &Value, name: &str| {
        let value = dir.path().join(name);
        std::fs::create_dir_all(&value).expect("mkdir");
        std::fs::copy(
            out.join("model.safetensors"),
            value.join("model.safetensors"),
        )
        .expect("copy");
        std::fs::write(value.join("config.json"), config.to_string()).expect("write");
        let run = recontrol(&[
            "value",
            "eval",
            "--value",
            s(&value),
            "--rollouts",
            s(&rollouts),
        ]);
        (run, value)
    };
    let mut legacy = config.clone();
    legacy.as_object_mut().expect("object").remove("target");
    let (run, _) = eval(&legacy, "legacy");
    assert!(run.status.success(), "{}", stderr(&run));
    let metrics: Value = serde_json::from_slice(&run.stdout).expect("json");
    assert_eq!(metrics["target"], serde_json::json!({"lambda": 0.75}));
    legacy["training"]["config"]
        .as_object_mut()
        .expect("object")
        .remove("target");
    let (run, value) = eval(&legacy, "untargeted");
    assert_fails_with(
        &run,
        &format!(
            "{}: no `target` (nor `training.config.target`)",
            value.join("config.json").display()
        ),
    );
}

#[test]
fn refuses_unlabelled_stores_and_mismatched_nets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rollouts = store(dir.path(), false);
    let run = recontrol(&[
        "value",
        "train",
        "--rollouts",
        s(&rollouts),
        "--out",
        s(&dir.path().join("v")),
    ]);
    assert_fails_with(&run, "40 of 40 rollouts have no (finite) reward");
    assert!(!dir.path().join("v").exists());
    let run = recontrol(&[
        "value",
        "train",
        "--rollouts",
        s(&rollouts),
        "--out",
        s(&dir.path().join("v")),
        "--target",
        "lambda",
        "--lambda",
        "1.5",
    ]);
    assert_fails_with(
        &run,
        "'--lambda <LAMBDA>': expected a number in [0, 1], got 1.5",
    );
    assert!(!dir.path().join("v").exists());

    // A value net for another hidden size.
    let net = dir.path().join("other");
    std::fs::create_dir_all(&net).expect("mkdir");
    let golden = repo_root().join("tests/fixtures/generated/value/golden.safetensors");
    let tensors: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&golden)
        .expect("golden")
        .into_iter()
        .filter(|(n, _)| n.starts_with("layers."))
        .collect();
    tch::Tensor::write_safetensors(&tensors, net.join("model.safetensors")).expect("write");
    let config = serde_json::json!({
        "input_dim": 6, "hidden_dims": [5, 4], "activation": "relu", "reward_mean": 0.0,
        "reward_std": 1.0, "lm_hidden_size": 6, "lm_identity": "sha256:x", "training": {},
        "seed": 0, "git_revision": "x", "recontrol_version": "x"
    });
    std::fs::write(net.join("config.json"), config.to_string()).expect("write");
    let run = recontrol(&[
        "value",
        "eval",
        "--value",
        s(&net),
        "--rollouts",
        s(&rollouts),
    ]);
    assert_fails_with(&run, "takes hidden size 6, but --rollouts");
}
