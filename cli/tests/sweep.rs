//! `recontrol sweep`: a method over its knob's grid on validation prompts, the setting with
//! the highest reward + diversity + coherence chosen, on the llama-mha fixture with rule
//! rewards (so that the reward of each setting is known in advance).

use std::path::{Path, PathBuf};
use std::process::Output;

use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};
use recontrol_tests::{lm_fixture, lm_prompts};
use serde_json::Value;

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

fn prompts(dir: &Path) -> PathBuf {
    let path = dir.join("validation.jsonl");
    let lines: Vec<String> = lm_prompts()
        .into_iter()
        .take(4)
        .map(|p| serde_json::json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).expect("write");
    path
}

fn rules(dir: &Path, weight: f64) -> PathBuf {
    let path = dir.join(format!("length{weight}.toml"));
    std::fs::write(
        &path,
        format!("[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = {weight}\n"),
    )
    .expect("write");
    path
}

fn sweep(dir: &Path, out: &Path, extra: &[&str]) -> Output {
    let model = lm_fixture("llama-mha");
    let validation = prompts(dir);
    let mut args = vec![
        "sweep",
        "--model",
        s(&model),
        "--prompts",
        s(&validation),
        "--coherence-model",
        s(&model),
        "--max-new-tokens",
        "10",
        "--batch-size",
        "2",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    recontrol(&args)
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

#[test]
fn picks_the_setting_with_the_best_reward_plus_diversity_plus_coherence() {
    let dir = tempfile::tempdir().expect("tempdir");
    // ARGS under a reward of 1 per character: a larger weight buys longer responses, so the
    // reward (and the sum, which it dominates) grows with the weight.
    let longer = rules(dir.path(), 1.0);
    let out = dir.path().join("args");
    let run = sweep(
        dir.path(),
        &out,
        &[
            "--reward",
            s(&longer),
            "--args",
            s(&longer),
            "--args-k",
            "8",
            "--args-weight",
            "0,1000",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let report = read(&out.join("sweep.json"));
    let points = report["points"].as_array().expect("points");
    assert_eq!(points.len(), 2);
    assert_eq!(report["method"], "args");
    let scores: Vec<f64> = points
        .iter()
        .map(|p| p["score"].as_f64().expect("score"))
        .collect();
    for p in points {
        let sum = p["reward"].as_f64().expect("reward")
            + p["diversity"].as_f64().expect("diversity")
            + p["coherence"].as_f64().expect("coherence");
        assert!((p["score"].as_f64().expect("score") - sum).abs() < 1e-9);
    }
    assert!(scores[1] > scores[0], "{scores:?}");
    assert_eq!(report["chosen"], 1);
    assert_eq!(
        report["points"][1]["setting"],
        serde_json::json!([["weight", 1000.0]])
    );
    for i in 0..2 {
        let lines = std::fs::read_to_string(out.join(format!("point-{i}.jsonl"))).expect("point");
        assert_eq!(lines.lines().count(), 4);
    }
    assert!(out.join("sweep.md").is_file() && out.join("config.json").is_file());
    assert!(out.join("sweep.svg").is_file());

    // The opposite reward (shorter is better) makes the unweighted setting win.
    let shorter = rules(dir.path(), -1.0);
    let out = dir.path().join("args-short");
    let run = sweep(
        dir.path(),
        &out,
        &[
            "--reward",
            s(&shorter),
            "--args",
            s(&longer),
            "--args-k",
            "8",
            "--args-weight",
            "0,1000",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(read(&out.join("sweep.json"))["chosen"], 0);
}

#[test]
fn best_of_n_is_swept_over_n_with_the_policy_reward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let longer = rules(dir.path(), 1.0);
    let out = dir.path().join("bon");
    let run = sweep(
        dir.path(),
        &out,
        &[
            "--reward",
            s(&longer),
            "--best-of",
            "1,4",
            "--temperature",
            "1.0",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let report = read(&out.join("sweep.json"));
    let rewards: Vec<f64> = report["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["reward"].as_f64().expect("reward"))
        .collect();
    // Under a length reward the best of 4 samples is longer, on average, than one sample.
    assert!(rewards[1] >= rewards[0], "{rewards:?}");
}

#[test]
fn bad_grids_and_outputs_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let longer = rules(dir.path(), 1.0);
    let out = dir.path().join("out");
    let run = sweep(
        dir.path(),
        &out,
        &[
            "--reward",
            s(&longer),
            "--best-of",
            "0,2",
            "--temperature",
            "1",
        ],
    );
    assert_fails_with(&run, "every value must be at least 1");
    assert!(!out.exists());
    let run = sweep(
        dir.path(),
        &out,
        &["--reward", s(&longer), "--best-of", "2"],
    );
    assert_fails_with(&run, "set --temperature above 0");
    assert!(!out.exists());
    std::fs::create_dir(&out).expect("mkdir");
    let run = sweep(
        dir.path(),
        &out,
        &["--reward", s(&longer), "--args", s(&longer)],
    );
    assert_fails_with(&run, "already exists");
}
