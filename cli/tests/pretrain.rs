//! `recontrol lm pretrain` end to end on a tiny configuration: deterministic, loadable by HF
//! transformers with the same logits, logged for TensorBoard, resumable.

use std::path::{Path, PathBuf};
use std::process::Output;

use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};

use recontrol_lm::{DType, DeviceSpec, LanguageModel, Positions, StepInput};
use recontrol_tests::{python_json, repo_root};
use serde_json::Value;

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

fn corpus() -> PathBuf {
    repo_root().join("data/bundled/hh-rlhf/harmless-base/test.jsonl.gz")
}

/// A tiny run: 1 layer, hidden 32, 6 steps.
fn pretrain(out: &Path, extra: &[&str]) -> Output {
    let corpus = corpus();
    let mut args = vec![
        "lm",
        "pretrain",
        "--corpus",
        s(&corpus),
        "--out",
        s(out),
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "2",
        "--eval-sequences",
        "4",
    ];
    args.extend_from_slice(&recontrol_tests::TINY_PRETRAIN);
    args.extend_from_slice(extra);
    if !extra.contains(&"--seed") {
        args.extend(["--seed", "5"]);
    }
    recontrol(&args)
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn tiny_run_is_deterministic_loads_in_hf_with_the_same_logits_and_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    for (out, extra) in [(&a, &[][..]), (&b, &[][..]), (&c, &["--seed", "6"][..])] {
        let run = pretrain(out, extra);
        assert!(run.status.success(), "{}", stderr(&run));
    }
    assert_eq!(
        bytes(&a.join("model.safetensors")),
        bytes(&b.join("model.safetensors")),
        "same seed, same weights"
    );
    assert_eq!(
        bytes(&a.join("tokenizer.json")),
        bytes(&b.join("tokenizer.json"))
    );
    assert_ne!(
        bytes(&a.join("model.safetensors")),
        bytes(&c.join("model.safetensors")),
        "another seed"
    );

    // HF transformers loads the directory; its logits equal ours.
    let text = "\n\nHuman: How do I make tea?\n\nAssistant:";
    let hf = python_json("tests/fixtures/lm/hf_check.py", &[s(&a), text]);
    assert_eq!(hf["architecture"], "LlamaForCausalLM");
    let lm = LanguageModel::load(&a, DeviceSpec::Cpu, DType::F32).expect("load");
    let ids = lm.tokenizer.encode(text, true).expect("encode");
    let hf_ids: Vec<i64> = serde_json::from_value(hf["input_ids"].clone()).expect("ids");
    assert_eq!(ids, hf_ids, "tokenisation");
    let n = ids.len() as i64;
    let input = tch::Tensor::from_slice(&ids).view([1, n]);
    let positions = tch::Tensor::arange(n, (tch::Kind::Int64, tch::Device::Cpu)).view([1, n]);
    let mut cache = lm.model.new_cache(ids.len());
    let hidden = lm
        .model
        .forward_hidden(
            &StepInput {
                input_ids: &input,
                position_ids: &positions,
                key_mask: None,
            },
            &mut cache,
            Positions::All,
        )
        .expect("forward");
    let ours = Vec::<f32>::try_from(lm.model.logits(&hidden).expect("logits").flatten(0, -1))
        .expect("f32");
    let theirs: Vec<f64> = hf["logits"]
        .as_array()
        .expect("rows")
        .iter()
        .flat_map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_f64().expect("f64"))
        })
        .collect();
    assert_eq!(ours.len(), theirs.len());
    let diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4, "logits differ from HF by {diff}");

    // TensorBoard's own reader sees the scalars.
    let tb = python_json(
        "tests/fixtures/read_tensorboard.py",
        &[s(&dir.path().join("a.work/logs"))],
    );
    let steps = |tag: &str| -> Vec<i64> {
        tb[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {tb}"))
            .iter()
            .map(|e| e[0].as_i64().expect("step"))
            .collect()
    };
    assert_eq!(steps("train/loss"), [1, 2, 3, 4, 5, 6]);
    assert_eq!(steps("train/perplexity").len(), 6);
    assert_eq!(steps("eval/perplexity"), [3, 6]);

    let record: Value =
        serde_json::from_slice(&bytes(&a.join("training.json"))).expect("training.json");
    assert!(record["heldout_perplexity"]
        .as_f64()
        .expect("ppl")
        .is_finite());
    assert!(record["unigram_perplexity"].as_f64().expect("ppl") > 1.0);
    assert_eq!(record["config"]["seed"], 5);
    assert!(
        !dir.path().join("a.work/checkpoint.safetensors").exists(),
        "checkpoint removed when done"
    );
}

#[test]
fn an_interrupted_run_resumes_to_the_same_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let whole = dir.path().join("whole");
    let run = pretrain(&whole, &[]);
    assert!(run.status.success(), "{}", stderr(&run));

    let parted = dir.path().join("parted");
    let run = pretrain(&parted, &["--max-steps-per-run", "4"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("stopped after step 4 of 6"),
        "{}",
        stderr(&run)
    );
    assert!(
        !parted.exists(),
        "no model directory before the run is complete"
    );
    let run = pretrain(&parted, &[]);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("pass --resume to continue it"),
        "{}",
        stderr(&run)
    );
    let run = pretrain(&parted, &["--resume"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(
        bytes(&parted.join("model.safetensors")),
        bytes(&whole.join("model.safetensors"))
    );
    // Requeued after it had finished: a no-op (and another cap changes nothing); the same
    // output with other flags is refused.
    let run = pretrain(&parted, &["--resume", "--max-steps-per-run", "2"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("already complete"),
        "{}",
        stderr(&run)
    );
    let run = pretrain(&parted, &["--resume", "--seed", "6"]);
    assert_fails_with(&run, "complete, but made with other flags");
}

#[test]
fn a_given_tokenizer_is_used_as_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("m");
    let tokenizer = recontrol_tests::lm_fixture("llama-mha").join("tokenizer.json");
    let run = pretrain(&out, &["--tokenizer", s(&tokenizer)]);
    assert!(run.status.success(), "{}", stderr(&run));
    let config: Value = serde_json::from_slice(&bytes(&out.join("config.json"))).expect("config");
    assert_eq!(
        config["vocab_size"], 512,
        "the fixture tokenizer's vocabulary"
    );
    let lm = LanguageModel::load(&out, DeviceSpec::Cpu, DType::F32).expect("load");
    let fixture = LanguageModel::load(
        &recontrol_tests::lm_fixture("llama-mha"),
        DeviceSpec::Cpu,
        DType::F32,
    )
    .expect("fixture");
    let text = "\n\nHuman: hi\n\nAssistant:";
    assert_eq!(
        lm.tokenizer.encode(text, true).ok(),
        fixture.tokenizer.encode(text, true).ok()
    );
}

#[test]
fn bad_settings_give_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("m");
    let corpus = corpus();
    let run = recontrol(&[
        "lm",
        "pretrain",
        "--corpus",
        s(&corpus),
        "--out",
        s(&out),
        "--hidden",
        "30",
        "--heads",
        "4",
    ]);
    assert_fails_with(&run, "must be a multiple of --heads 4");

    let run = recontrol(&[
        "lm",
        "pretrain",
        "--corpus",
        "/nonexistent/corpus.jsonl",
        "--out",
        s(&out),
    ]);
    assert_fails_with(&run, "/nonexistent/corpus.jsonl");

    std::fs::create_dir_all(&out).expect("mkdir");
    let run = pretrain(&out, &[]);
    assert_fails_with(&run, "exists; remove it");
}
