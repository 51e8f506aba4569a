//! The paper's baselines as decoding methods of `recontrol generate`: static representation
//! editing (`recontrol steer fit`, `--steer`), best-of-N, ARGS and value-guided decoding,
//! against their reference implementations in HF transformers
//! (`tests/fixtures/controller/reference_methods.py`), with
//! known-answer checks and the refusals of flags that do not fit.

use std::path::{Path, PathBuf};
use std::process::Output;

use recontrol_data::{truncate_response, GenerationRecord};
use recontrol_lm::{DType, DeviceSpec, LanguageModel, Positions};
use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};
use recontrol_tests::{lm_fixture, lm_prompts, python_json, repo_root};
use serde_json::Value;

const NEW_TOKENS: &str = "12";

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

fn reward_fixture() -> PathBuf {
    repo_root().join("tests/fixtures/generated/reward/hf-seqcls")
}

/// The first `n` fixture prompts (of different lengths: batches are left-padded) as JSON and
/// JSONL files in `dir`.
fn prompt_files(dir: &Path, n: usize) -> (Vec<String>, PathBuf, PathBuf) {
    let prompts: Vec<String> = lm_prompts().into_iter().take(n).collect();
    let json = dir.join("prompts.json");
    std::fs::write(&json, serde_json::to_string(&prompts).expect("json")).expect("write");
    let jsonl = dir.join("prompts.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).expect("write");
    (prompts, json, jsonl)
}

/// A seeded value net for the states of the model `identity` (hidden size 64), saved in `dir`.
fn value_dir(dir: &Path, identity: &str, seed: u64) -> PathBuf {
    recontrol_tests::value_dir(dir, 64, identity, seed)
}

fn records(path: &Path) -> Vec<GenerationRecord> {
    recontrol_data::read_generations(path).expect("generations")
}

fn tokens(path: &Path) -> Vec<Vec<i64>> {
    records(path)
        .into_iter()
        .map(|r| r.tokens.expect("tokens"))
        .collect()
}

/// `recontrol generate` on the llama-mha fixture, 12 new tokens, batches of 3.
fn generate(prompts: &Path, out: &Path, extra: &[&str]) {
    let model = lm_fixture("llama-mha");
    let mut args = vec![
        "generate",
        "--model",
        s(&model),
        "--prompts",
        s(prompts),
        "--max-new-tokens",
        NEW_TOKENS,
        "--batch-size",
        "3",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    let run = recontrol(&args);
    assert!(run.status.success(), "{}", stderr(&run));
}

/// The reference's tokens for `method` on the llama-mha fixture.
fn reference(method: &str, prompts: &Path, extra: &[&str]) -> Vec<Vec<i64>> {
    let model = lm_fixture("llama-mha");
    let mut args = vec![
        method,
        s(&model),
        s(prompts),
        "--max-new-tokens",
        NEW_TOKENS,
    ];
    args.extend_from_slice(extra);
    let r = python_json("tests/fixtures/controller/reference_methods.py", &args);
    serde_json::from_value(r["tokens"].clone()).expect("tokens")
}

/// A store of 24 rollouts of the llama-mha fixture, labelled by a length rule.
fn labelled_store(dir: &Path) -> PathBuf {
    cli::rule_store(env!("CARGO_BIN_EXE_recontrol"), dir, 24, true)
}

#[test]
fn static_re_args_and_value_guided_decoding_match_the_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, prompts_json, prompts) = prompt_files(dir.path(), 4);
    let model = lm_fixture("llama-mha");
    let lm = LanguageModel::load(&model, DeviceSpec::Cpu, DType::F32).expect("lm");
    let out = |name: &str| dir.path().join(format!("{name}.jsonl"));
    generate(&prompts, &out("plain"), &[]);
    let plain = tokens(&out("plain"));

    // Static RE with a vector fitted by `recontrol steer fit` on the model's own rollouts.
    let vector = dir.path().join("steer.safetensors");
    let store = labelled_store(dir.path());
    let run = recontrol(&["steer", "fit", "--rollouts", s(&store), "--out", s(&vector)]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("from 24 rollouts: top 6"),
        "{}",
        stderr(&run)
    );
    generate(
        &prompts,
        &out("steer"),
        &["--steer", s(&vector), "--steer-scale", "4"],
    );
    let steered = tokens(&out("steer"));
    assert_eq!(
        steered,
        reference(
            "steer",
            &prompts_json,
            &["--vector", s(&vector), "--scale", "4"]
        ),
        "static RE vs reference"
    );
    assert_ne!(steered, plain, "the steering vector must change tokens");

    // ARGS with a reward model sharing the LM's vocabulary (scored on token ids).
    let rm = reward_fixture();
    generate(
        &prompts,
        &out("args"),
        &["--args", s(&rm), "--args-k", "5", "--args-weight", "2"],
    );
    let args = tokens(&out("args"));
    assert_eq!(
        args,
        reference(
            "args",
            &prompts_json,
            &["--reward", s(&rm), "--k", "5", "--weight", "2"]
        ),
        "ARGS vs reference"
    );
    assert_ne!(args, plain, "the reward must change tokens");

    // Value-guided decoding, both ways of running the value head.
    let value = value_dir(&dir.path().join("value"), &lm.identity, 3);
    let want = reference(
        "cd",
        &prompts_json,
        &["--value", s(&value), "--k", "5", "--weight", "2"],
    );
    assert_ne!(want, plain, "the value must change tokens");
    for backend in ["onnx", "torch"] {
        let path = out(&format!("cd-{backend}"));
        generate(
            &prompts,
            &path,
            &[
                "--value-guided",
                s(&value),
                "--cd-k",
                "5",
                "--cd-weight",
                "2",
                "--grad-backend",
                backend,
            ],
        );
        assert_eq!(tokens(&path), want, "value-guided ({backend}) vs reference");
    }
    // Each record says how it was made.
    for (name, method) in [
        ("plain", "plain"),
        ("steer", "static-re"),
        ("args", "args"),
        ("cd-onnx", "value-guided"),
    ] {
        for r in records(&out(name)) {
            assert_eq!(r.method.as_deref(), Some(method), "{name}");
        }
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("{name}.jsonl.config.json")))
                .expect("config"),
        )
        .expect("json");
        assert_eq!(config["method"], method, "{name}");
    }
}

#[test]
fn one_candidate_or_no_weight_is_plain_greedy_decoding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, _, prompts) = prompt_files(dir.path(), 4);
    let lm =
        LanguageModel::load(&lm_fixture("llama-mha"), DeviceSpec::Cpu, DType::F32).expect("lm");
    let value = value_dir(&dir.path().join("value"), &lm.identity, 3);
    let rm = reward_fixture();
    let out = |name: &str| dir.path().join(format!("{name}.jsonl"));
    generate(&prompts, &out("plain"), &[]);
    let plain = tokens(&out("plain"));
    let runs: [(&str, Vec<&str>); 4] = [
        (
            "cd-k1",
            vec![
                "--value-guided",
                s(&value),
                "--cd-k",
                "1",
                "--cd-weight",
                "50",
            ],
        ),
        (
            "cd-w0",
            vec![
                "--value-guided",
                s(&value),
                "--cd-k",
                "8",
                "--cd-weight",
                "0",
            ],
        ),
        (
            "args-k1",
            vec!["--args", s(&rm), "--args-k", "1", "--args-weight", "50"],
        ),
        (
            "args-w0",
            vec!["--args", s(&rm), "--args-k", "8", "--args-weight", "0"],
        ),
    ];
    for (name, extra) in &runs {
        generate(&prompts, &out(name), extra);
        assert_eq!(tokens(&out(name)), plain, "{name}");
    }
}

#[test]
fn best_of_n_returns_the_reference_best_of_its_seeded_samples() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (prompts, _, prompts_jsonl) = prompt_files(dir.path(), 3);
    let n = 3;
    let rm = reward_fixture();
    let sampling = ["--temperature", "1.0", "--top-k", "40", "--seed", "11"];
    let best = dir.path().join("best.jsonl");
    // Batches of 3 prompts: 9 sequences decoded together.
    let mut args = vec!["--best-of", "3", "--reward", s(&rm)];
    args.extend_from_slice(&sampling);
    generate(&prompts_jsonl, &best, &args);
    // The same samples from plain sampling of every prompt repeated n times (stream p * n + j).
    let repeated = dir.path().join("repeated.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(serde_json::json!({ "prompt": p }).to_string(), n))
        .collect();
    std::fs::write(&repeated, lines.join("\n")).expect("write");
    let samples_path = dir.path().join("samples.jsonl");
    generate(&repeated, &samples_path, &sampling);
    let samples = records(&samples_path);
    let best = records(&best);
    assert_eq!(best.len(), prompts.len());
    let mut groups = Vec::new();
    for (p, record) in best.iter().enumerate() {
        let b = record.best_of.as_ref().expect("best_of");
        assert_eq!(b.n, n);
        let want: Vec<&str> = samples[p * n..(p + 1) * n]
            .iter()
            .map(|r| r.response.as_str())
            .collect();
        assert_eq!(b.responses, want, "prompt {p}: the seeded samples");
        assert_eq!(record.response, b.responses[b.chosen]);
        assert_eq!(record.tokens, samples[p * n + b.chosen].tokens);
        assert_eq!(record.method.as_deref(), Some("best-of-n"));
        groups.push(serde_json::json!({ "prompt": prompts[p], "samples": b.responses }));
    }
    let distinct: std::collections::HashSet<&String> = best
        .iter()
        .flat_map(|r| r.best_of.iter().flat_map(|b| &b.responses))
        .collect();
    assert!(distinct.len() > prompts.len(), "samples must differ");
    // The reference scores the same samples with HF's sequence-classification model and
    // chooses the first highest.
    let samples_json = dir.path().join("samples.json");
    std::fs::write(&samples_json, serde_json::to_string(&groups).expect("json")).expect("write");
    let reference = python_json(
        "tests/fixtures/controller/reference_methods.py",
        &["bon", s(&rm), s(&samples_json)],
    );
    let rewards: Vec<Vec<f64>> =
        serde_json::from_value(reference["rewards"].clone()).expect("rewards");
    let chosen: Vec<usize> = serde_json::from_value(reference["chosen"].clone()).expect("chosen");
    for (p, record) in best.iter().enumerate() {
        let b = record.best_of.as_ref().expect("best_of");
        for (j, (&got, &want)) in b.rewards.iter().zip(&rewards[p]).enumerate() {
            assert!(
                (got - want).abs() < 1e-4,
                "prompt {p} sample {j}: {got} vs HF {want}"
            );
        }
        assert_eq!(b.chosen, chosen[p], "prompt {p}: {:?}", rewards[p]);
    }
}

#[test]
fn rule_rewards_make_args_and_best_of_n_pick_what_the_rule_prefers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (prompts, _, prompts_jsonl) = prompt_files(dir.path(), 3);
    let rules = dir.path().join("longer.toml");
    std::fs::write(
        &rules,
        "[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = 1.0\n",
    )
    .expect("write");
    // Best-of-N: the chosen sample is the longest (truncated) response.
    let best = dir.path().join("best.jsonl");
    generate(
        &prompts_jsonl,
        &best,
        &[
            "--best-of",
            "4",
            "--reward",
            s(&rules),
            "--temperature",
            "1.0",
        ],
    );
    for record in records(&best) {
        let b = record.best_of.expect("best_of");
        let lengths: Vec<usize> = b
            .responses
            .iter()
            .map(|r| truncate_response(r).chars().count())
            .collect();
        let longest = lengths.iter().copied().max().unwrap_or(0);
        assert_eq!(lengths[b.chosen], longest, "{lengths:?}");
        assert_eq!(b.rewards[b.chosen], longest as f64);
    }
    // ARGS on text with a weight that dwarfs the logits: the first token is the top-k
    // candidate whose text is longest (the most likely among equals).
    let args = dir.path().join("args.jsonl");
    generate(
        &prompts_jsonl,
        &args,
        &[
            "--args",
            s(&rules),
            "--args-k",
            "6",
            "--args-weight",
            "1000",
        ],
    );
    let lm =
        LanguageModel::load(&lm_fixture("llama-mha"), DeviceSpec::Cpu, DType::F32).expect("lm");
    for (prompt, record) in prompts.iter().zip(records(&args)) {
        let ids = lm.tokenizer.encode(prompt, true).expect("encode");
        let input = tch::Tensor::from_slice(&ids).view([1, -1]);
        let positions = tch::Tensor::arange(ids.len() as i64, (tch::Kind::Int64, tch::Device::Cpu))
            .view([1, -1]);
        let mut cache = lm.model.new_cache(ids.len());
        let hidden = lm
            .model
            .forward_hidden(
                &recontrol_lm::StepInput {
                    input_ids: &input,
                    position_ids: &positions,
                    key_mask: None,
                },
                &mut cache,
                Positions::Last,
            )
            .expect("forward");
        let (_, top) = lm
            .model
            .logits(&hidden)
            .expect("logits")
            .topk(6, -1, true, true);
        let top = Vec::<i64>::try_from(top.flatten(0, -1)).expect("ids");
        let length = |t: i64| {
            let text = lm.tokenizer.decode(&[t], true).expect("decode");
            truncate_response(&text).chars().count()
        };
        let longest = top.iter().map(|&t| length(t)).max().unwrap_or(0);
        let want = top.iter().copied().find(|&t| length(t) == longest);
        assert_eq!(
            record.tokens.as_ref().and_then(|t| t.first()).copied(),
            want,
            "{prompt:?}: candidates {top:?}"
        );
    }
}

/// A clap refusal: non-zero exit, no panic, one `error:` message naming the conflict.
fn assert_refused(run: &Output, needle: &str) {
    let err = stderr(run);
    assert!(!run.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let errors = err.lines().filter(|l| l.starts_with("error:")).count();
    assert_eq!(errors, 1, "{err}");
    let message: String = err.split("Usage:").next().unwrap_or_default().into();
    assert!(message.contains(needle), "error lacks {needle:?}: {err}");
}

#[test]
fn flags_that_do_not_fit_together_are_one_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, _, prompts) = prompt_files(dir.path(), 2);
    let model = lm_fixture("llama-mha");
    let rm = reward_fixture();
    let out = dir.path().join("out.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            s(&model),
            "--prompts",
            s(&prompts),
            "--max-new-tokens",
            "4",
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        recontrol(&args)
    };
    assert_refused(
        &run(&["--args", s(&rm), "--best-of", "2", "--reward", s(&rm)]),
        "cannot be used with",
    );
    assert_refused(
        &run(&["--steer", "v.safetensors", "--value", "x"]),
        "cannot be used with",
    );
    assert_refused(&run(&["--best-of", "2"]), "--reward");
    assert_refused(&run(&["--cd-k", "3"]), "--value-guided");
    assert_fails_with(
        &run(&["--best-of", "2", "--reward", s(&rm)]),
        "set --temperature above 0",
    );
    assert_fails_with(
        &run(&["--args", s(&rm), "--temperature", "0.7"]),
        "ARGS is greedy",
    );
    // Sampling settings are refused before any model is read.
    let early = recontrol(&[
        "generate",
        "--model",
        "/nonexistent",
        "--prompt",
        "hi",
        "--args",
        "/nonexistent",
        "--temperature",
        "0.5",
    ]);
    assert_fails_with(&early, "ARGS is greedy");
    assert_fails_with(&run(&["--args", s(&rm), "--args-k", "0"]), "--args-k");
    assert_fails_with(
        &run(&["--args", s(&rm), "--args-k", "100000"]),
        "vocabulary size 512",
    );
    assert_fails_with(
        &run(&["--best-of", "0", "--reward", s(&rm), "--temperature", "1"]),
        "'--best-of <BEST_OF>': expected an integer >= 1, got 0",
    );
    let bogus = dir.path().join("bogus.safetensors");
    std::fs::write(&bogus, b"nope").expect("write");
    assert_fails_with(
        &run(&["--steer", s(&bogus)]),
        &format!("--steer {}", bogus.display()),
    );
    assert!(!out.exists(), "no output after a refusal");
}

#[test]
fn steer_fit_refuses_stores_it_cannot_use_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("v.safetensors");
    let missing = dir.path().join("missing.h5");
    let run = recontrol(&["steer", "fit", "--rollouts", s(&missing), "--out", s(&out)]);
    assert_fails_with(&run, &format!("--rollouts {}", missing.display()));
    let store = labelled_store(dir.path());
    let run = recontrol(&[
        "steer",
        "fit",
        "--rollouts",
        s(&store),
        "--out",
        s(&out),
        "--quantile",
        "0.7",
    ]);
    assert_fails_with(
        &run,
        "'--quantile <QUANTILE>': expected a number in (0, 0.5], got 0.7",
    );
    assert!(!out.exists());
    // A vector from another model's states is refused unless asked for.
    let run = recontrol(&["steer", "fit", "--rollouts", s(&store), "--out", s(&out)]);
    assert!(run.status.success(), "{}", stderr(&run));
    let run = recontrol(&[
        "generate",
        "--model",
        s(&lm_fixture("qwen2")),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--steer",
        s(&out),
    ]);
    assert_fails_with(&run, "was made from the states of model");
}
