//! `recontrol rollout` end to end: states equal HF's, the store has the documented layout (read
//! by h5py), shards merge, and bad input gets one clear line. Its `kill -9` campaign is in
//! `crash.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};
use std::time::Duration;

use recontrol_data::{Rollout, Store};
use recontrol_tests::{lm_expected, lm_fixture, lm_prompts, python_json, repo_root};
use serde_json::Value;

const EOS: i64 = 2;

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

fn prompts_file(dir: &Path) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let lines: Vec<String> = lm_prompts()
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).expect("write prompts");
    path
}

fn bundled_hh() -> PathBuf {
    repo_root().join("data/bundled/hh-rlhf/harmless-base/test.jsonl.gz")
}

/// Runs the h5py checker on a store and returns its JSON summary.
fn h5py_summary(store: &Path, dump: Option<usize>) -> Value {
    let dump = dump.map(|i| i.to_string());
    let mut args = vec![s(store)];
    if let Some(i) = &dump {
        args.extend(["--dump-rollout", i.as_str()]);
    }
    python_json("tests/fixtures/store/check_store.py", &args)
}

#[test]
fn states_equal_hf_hidden_states_step_for_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prompts = prompts_file(dir.path());
    let store = dir.path().join("r.h5");
    let model = lm_fixture("llama-mha");
    for (dtype, path, tolerance) in [
        ("f32", store.clone(), 1e-4),
        ("f16", dir.path().join("r16.h5"), 1e-2),
    ] {
        let run = recontrol(&[
            "rollout",
            "--model",
            s(&model),
            "--dataset",
            s(&prompts),
            "--dataset-kind",
            "jsonl",
            "--prompt-format",
            "raw",
            "--split",
            "all",
            "--max-new-tokens",
            "32",
            "--batch-size",
            "3",
            "--state-dtype",
            dtype,
            "--out",
            s(&path),
        ]);
        assert!(run.status.success(), "{}", stderr(&run));
        let exp = lm_expected("llama-mha");
        let st = Store::open(&path).expect("open store");
        assert_eq!(st.len(), 4);
        for i in 0..4 {
            let r = st.rollout(i).expect("rollout");
            let hf_tokens = Vec::<i64>::try_from(exp[&format!("greedy_single_{i}")].flatten(0, -1))
                .expect("ids");
            let cut = hf_tokens
                .iter()
                .position(|&t| t == EOS)
                .map_or(hf_tokens.len(), |p| p + 1);
            assert_eq!(r.tokens, hf_tokens[..cut], "prompt {i}");
            let hf_states = &exp[&format!("states_single_{i}")];
            assert_eq!(r.states.dim(), (cut, 64), "one state per token, prompt {i}");
            let hf: Vec<f32> = Vec::<f32>::try_from(hf_states.flatten(0, -1)).expect("states");
            let diff = r
                .states
                .iter()
                .zip(&hf)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < tolerance,
                "{dtype} prompt {i}: states differ from HF by {diff}"
            );
            assert_eq!(r.prompt, lm_prompts()[i]);
            assert_eq!(r.prompt_index, i as i64);
            assert!(r.reward.is_nan(), "unlabelled");
        }
    }
    // h5py sees the documented layout, and the same numbers.
    let summary = h5py_summary(&store, Some(2));
    assert_eq!(summary["rollouts"], 4);
    assert_eq!(summary["state_dtype"], "f32");
    assert_eq!(summary["labelled"], 0);
    assert_eq!(summary["prompt_index"], serde_json::json!([0, 1, 2, 3]));
    assert_eq!(summary["prompt_format"], "raw");
    let st = Store::open(&store).expect("open");
    let r2 = st.rollout(2).expect("rollout 2");
    let py: Vec<f64> = summary["rollout"]["states"]
        .as_array()
        .expect("states")
        .iter()
        .flat_map(|row| {
            row.as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_f64().expect("f64"))
        })
        .collect();
    assert_eq!(py.len(), r2.states.len());
    // (JSON floats parse to within an ulp, not exactly.)
    assert!(py
        .iter()
        .zip(r2.states.iter())
        .all(|(a, b)| (a - f64::from(*b)).abs() <= 1e-6 * a.abs().max(1.0)));
    assert_eq!(summary["rollout"]["response"], r2.response);
    assert_eq!(
        h5py_summary(&dir.path().join("r16.h5"), None)["state_dtype"],
        "f16"
    );
    // The run record sits beside the store.
    assert!(dir.path().join("r.h5.config.json").is_file());
}

fn hh_rollout_args<'a>(model: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "rollout",
        "--model",
        s(model),
        "--dataset",
        s(&BUNDLED),
        "--limit",
        "48",
        "--max-new-tokens",
        "24",
        "--batch-size",
        "4",
        "--rollouts-per-part",
        "8",
        "--ignore-eos",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    args
}

static BUNDLED: std::sync::LazyLock<PathBuf> = std::sync::LazyLock::new(bundled_hh);

fn store_contents(path: &Path) -> Vec<Rollout> {
    let st = Store::open(path).expect("open store");
    (0..st.len())
        .map(|i| {
            let mut r = st.rollout(i).expect("rollout");
            // Unlabelled rewards are NaN, which never equals itself: compare a fixed value.
            assert!(r.reward.is_nan());
            r.reward = 0.0;
            r
        })
        .collect()
}

/// The same records in the same order: prompts, tokens and texts equal, states equal to float
/// noise (batches padded differently).
fn assert_same_records(got: &[Rollout], want: &[Rollout]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(
            (g.prompt_index, &g.prompt, &g.response, &g.tokens),
            (w.prompt_index, &w.prompt, &w.response, &w.tokens)
        );
        let diff = (&g.states - &w.states).fold(0f32, |m, d| m.max(d.abs()));
        assert!(diff < 1e-4, "prompt {}: {diff}", g.prompt_index);
    }
}

#[test]
fn shards_merge_into_the_whole_and_foreign_stores_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = lm_fixture("qwen2");
    let whole = dir.path().join("whole.h5");
    let a = dir.path().join("a.h5");
    let b = dir.path().join("b.h5");
    for (out, shard) in [(&whole, None), (&a, Some("0/2")), (&b, Some("1/2"))] {
        let mut args = hh_rollout_args(&model, out, &[]);
        if let Some(shard) = shard {
            args.extend(["--shard", shard]);
        }
        let run = recontrol(&args);
        assert!(run.status.success(), "{}", stderr(&run));
    }
    let merged = dir.path().join("merged.h5");
    let run = recontrol(&["rollout", "merge", s(&a), s(&b), "--out", s(&merged)]);
    assert!(run.status.success(), "{}", stderr(&run));
    let mut got = store_contents(&merged);
    let mut want = store_contents(&whole);
    assert_eq!(got.len(), 48);
    got.sort_by_key(|r| r.prompt_index);
    want.sort_by_key(|r| r.prompt_index);
    assert_same_records(&got, &want);

    // A store of another model cannot be merged in.
    let other = dir.path().join("other.h5");
    let run = recontrol(&hh_rollout_args(&lm_fixture("llama-mha"), &other, &[]));
    assert!(run.status.success(), "{}", stderr(&run));
    let run = recontrol(&[
        "rollout",
        "merge",
        s(&a),
        s(&other),
        "--out",
        s(&dir.path().join("bad.h5")),
    ]);
    assert_fails_with(&run, "cannot merge with");
    assert!(!dir.path().join("bad.h5").exists());
}

/// Batches sorted by prompt length (the default) against dataset order: the same records in
/// the same order, sampled from each prompt's own stream, with end tokens, states to float
/// noise.
#[test]
fn sorting_by_length_keeps_every_record_and_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = lm_fixture("qwen2");
    let sorted = dir.path().join("sorted.h5");
    let planned = dir.path().join("planned.h5");
    let sampling = [
        "--temperature",
        "0.9",
        "--seed",
        "5",
        "--samples-per-prompt",
        "2",
    ];
    for (out, extra) in [(&sorted, None), (&planned, Some("--keep-prompt-order"))] {
        let mut args: Vec<&str> = hh_rollout_args(&model, out, &sampling)
            .into_iter()
            .filter(|a| *a != "--ignore-eos")
            .collect();
        args.extend(extra);
        let run = recontrol(&args);
        assert!(run.status.success(), "{}", stderr(&run));
    }
    let (got, want) = (store_contents(&sorted), store_contents(&planned));
    assert_eq!(got.len(), 96);
    assert_same_records(&got, &want);
    let lengths: std::collections::BTreeSet<usize> = got.iter().map(|r| r.tokens.len()).collect();
    // Sampled answers of several lengths: the rows ended at their own end tokens.
    assert!(lengths.len() > 3, "{lengths:?}");
}

#[test]
fn resuming_with_another_model_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("r.h5");
    let mut child = Command::new(env!("CARGO_BIN_EXE_recontrol"))
        .args(hh_rollout_args(&lm_fixture("qwen2"), &out, &[]))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Kill it once it has begun (its plan is written before the first rollout), however
    // slow the machine is.
    let plan = dir.path().join("r.h5.parts/plan.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !plan.exists()
        && std::time::Instant::now() < deadline
        && child.try_wait().expect("wait").is_none()
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().expect("reap");
    assert!(plan.exists(), "the run never began");
    assert!(!out.exists(), "the run finished before it was killed");
    let run = recontrol(&hh_rollout_args(
        &lm_fixture("llama-mha"),
        &out,
        &["--resume"],
    ));
    assert_fails_with(&run, "cannot resume: model");
    let run = recontrol(&hh_rollout_args(&lm_fixture("qwen2"), &out, &[]));
    assert_fails_with(&run, "pass --resume to continue it");
}

#[test]
fn bad_inputs_give_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = lm_fixture("llama-mha");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"\n{\"prompt\": \"c\"}\n",
    )
    .expect("write");
    let out = dir.path().join("r.h5");
    let base = [
        "rollout",
        "--model",
        s(&model),
        "--dataset",
        s(&bad),
        "--split",
        "all",
        "--max-new-tokens",
        "4",
        "--out",
        s(&out),
    ];
    let run = recontrol(&base);
    assert_fails_with(&run, "bad.jsonl:2: malformed JSON");
    assert!(!out.exists() && !dir.path().join("r.h5.parts").exists());
    let mut skip = base.to_vec();
    skip.push("--skip-bad");
    let run = recontrol(&skip);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("skipped 1 malformed lines"),
        "{}",
        stderr(&run)
    );
    assert_eq!(Store::open(&out).expect("open").len(), 2);

    // A truncated store is a clear error, not a crash.
    let truncated = dir.path().join("truncated.h5");
    let bytes = std::fs::read(&out).expect("read");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let run = recontrol(&[
        "rollout",
        "merge",
        s(&truncated),
        "--out",
        s(&dir.path().join("m.h5")),
    ]);
    assert_fails_with(&run, "truncated.h5");
    let garbage = dir.path().join("garbage.h5");
    std::fs::write(&garbage, b"not hdf5 at all").expect("write");
    let run = recontrol(&[
        "rollout",
        "merge",
        s(&garbage),
        "--out",
        s(&dir.path().join("m.h5")),
    ]);
    assert_fails_with(&run, "not a recontrol rollout store");

    let run = recontrol(&[
        "rollout",
        "--model",
        s(&model),
        "--dataset",
        s(&bad),
        "--out",
        s(&out),
        "--shard",
        "2/2",
    ]);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("expected 0 <= K < N"),
        "{}",
        stderr(&run)
    );
}

#[test]
fn data_stats_reports_the_bundled_split() {
    let run = recontrol(&["data", "stats", s(&BUNDLED), "--json"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let v: Value = serde_json::from_slice(&run.stdout).expect("json");
    assert_eq!(v["report"]["records"], 2312);
    assert_eq!(v["report"]["skipped_different_prefix"], 5);
    assert_eq!(v["prompts"], 2307);
    assert_eq!(v["pairs"], 2307);
    assert!(v["prompt_words"]["p50"].as_u64().expect("p50") > 5);
    let run = recontrol(&["data", "stats", s(&BUNDLED)]);
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(text.contains("skipped: different prefixes  5"), "{text}");
    let harmful = repo_root().join("data/bundled/harmfulqa/harmfulqa.json");
    let run = recontrol(&["data", "stats", s(&harmful), "--json"]);
    let v: Value = serde_json::from_slice(&run.stdout).expect("json");
    assert_eq!(v["prompts"], 1960);
}

#[test]
fn chat_template_prompts_with_the_helpful_instruction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let questions = dir.path().join("q.jsonl");
    std::fs::write(&questions, "{\"question\": \"How do I bake bread?\"}\n").expect("write");
    let out = dir.path().join("r.h5");
    let run = recontrol(&[
        "rollout",
        "--model",
        s(&lm_fixture("llama3-gqa")),
        "--dataset",
        s(&questions),
        "--format",
        "jsonl",
        "--prompt-field",
        "question",
        "--split",
        "all",
        "--prompt-format",
        "chat-template",
        "--helpful-prompt",
        "--max-new-tokens",
        "4",
        "--out",
        s(&out),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let st = Store::open(&out).expect("open");
    let r = st.rollout(0).expect("rollout");
    assert_eq!(
        r.prompt,
        format!(
            "<s><|system|>\n{}</s><|user|>\nHow do I bake bread?</s><|assistant|>\n",
            recontrol_data::HELPFUL_INSTRUCTION
        )
    );
    assert_eq!(st.meta().prompt_format.as_str(), "chat-template");
}
