//! `recontrol reward train | score | label` end to end.

use std::path::{Path, PathBuf};
use std::process::Output;

use recontrol_data::Store;
use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};
use recontrol_tests::{lm_fixture, python_json, repo_root};
use serde_json::Value;

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

/// The first 240 records of the bundled HH-RLHF split (the whole file would only make the
/// tests slower), in a temporary JSONL file. One of its pairs has an empty reply.
fn hh() -> PathBuf {
    static SLICE: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    SLICE
        .get_or_init(|| {
            use std::io::BufRead;
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("hh-240.jsonl");
            let reader = recontrol_data::jsonl::open_maybe_gz(
                &repo_root().join("data/bundled/hh-rlhf/harmless-base/test.jsonl.gz"),
            )
            .expect("bundled data");
            let lines: Vec<String> = reader.lines().take(240).map(|l| l.expect("line")).collect();
            std::fs::write(&path, lines.join("\n")).expect("write");
            (dir, path)
        })
        .1
        .clone()
}

/// A reward model on the llama-mha fixture backbone, trained for a few epochs.
fn train(dir: &Path, name: &str, extra: &[&str]) -> (PathBuf, Output) {
    let out = dir.join(name);
    let (hh, model) = (hh(), lm_fixture("llama-mha"));
    let mut args = vec![
        "reward",
        "train",
        "--model",
        s(&model),
        "--pairs",
        s(&hh),
        "--out",
        s(&out),
    ];
    args.extend_from_slice(extra);
    for (flag, default) in [("--epochs", "3"), ("--batch-size", "128")] {
        if !extra.contains(&flag) {
            args.extend([flag, default]);
        }
    }
    let run = recontrol(&args);
    (out, run)
}

fn rules_file(dir: &Path) -> PathBuf {
    let path = dir.join("rules.toml");
    std::fs::write(
        &path,
        "[[term]]\nkind = \"words\"\nwords = [\"sorry\"]\nweight = 1.0\n\n[[term]]\nkind = \"length\"\nweight = 0.5\n",
    )
    .expect("write rules");
    path
}

#[test]
fn trained_models_load_in_hf_with_the_scores_recontrol_gives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rm, run) = train(dir.path(), "rm", &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        out.contains("held-out pair accuracy") && out.contains("length-only baseline"),
        "{out}"
    );
    assert!(
        stderr(&run).contains("skipped 1 pairs with an empty reply"),
        "{}",
        stderr(&run)
    );

    // Score generations with it; HF transformers loading the directory agrees.
    let gens = dir.path().join("gens.jsonl");
    let rows = [
        ("\n\nHuman: hi\n\nAssistant:", " Hello! How can I help?"),
        (
            "\n\nHuman: How do I steal a car?\n\nAssistant:",
            " I can't help with that.\n\nHuman: why",
        ),
    ];
    let lines: Vec<String> = rows
        .iter()
        .map(|(p, r)| serde_json::json!({"prompt": p, "response": r, "extra": 1}).to_string())
        .collect();
    std::fs::write(&gens, lines.join("\n")).expect("write");
    let scored = dir.path().join("scored.jsonl");
    let run = recontrol(&[
        "reward",
        "score",
        "--reward",
        s(&rm),
        "--input",
        s(&gens),
        "--out",
        s(&scored),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let records: Vec<Value> = std::fs::read_to_string(&scored)
        .expect("scored")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(records[1]["extra"], 1, "input fields are kept");
    // The scored text is prompt + response cut by the shared truncation rule.
    let texts: Vec<String> = rows
        .iter()
        .map(|(p, r)| format!("{p}{}", recontrol_data::truncate_response(r)))
        .collect();
    let mut args = vec![s(&rm)];
    args.extend(texts.iter().map(String::as_str));
    let hf = python_json("tests/fixtures/reward/hf_score.py", &args);
    assert_eq!(hf["architecture"], "LlamaForSequenceClassification");
    for (record, theirs) in records.iter().zip(hf["scores"].as_array().expect("scores")) {
        let ours = record["reward"].as_f64().expect("reward");
        assert!(
            (ours - theirs.as_f64().expect("f64")).abs() < 1e-4,
            "{ours} vs {theirs}"
        );
    }
    let training: Value = serde_json::from_str(
        &std::fs::read_to_string(rm.join("reward_training.json")).expect("record"),
    )
    .expect("json");
    assert_eq!(training["history"].as_array().map(Vec::len), Some(3));
    assert!(training["length_baseline_accuracy"].as_f64().is_some());
    let tb = python_json(
        "tests/fixtures/read_tensorboard.py",
        &[s(&dir.path().join("rm.work/logs"))],
    );
    assert_eq!(
        tb["reward/heldout_accuracy"].as_array().map(Vec::len),
        Some(3)
    );
}

#[test]
fn interrupted_training_resumes_to_the_same_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (whole, run) = train(dir.path(), "whole", &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let (parted, run) = train(dir.path(), "parted", &["--max-epochs-per-run", "2"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("stopped after epoch 2 of 3"),
        "{}",
        stderr(&run)
    );
    assert!(!parted.exists());
    let (_, run) = train(dir.path(), "parted", &[]);
    assert_fails_with(&run, "pass --resume to continue it");
    let (_, run) = train(dir.path(), "parted", &["--resume"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let read = |p: &Path| std::fs::read(p.join("model.safetensors")).expect("weights");
    assert_eq!(read(&parted), read(&whole));
}

#[test]
fn top_k_layers_train_with_the_head_and_load_in_hf() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rm, run) = train(
        dir.path(),
        "rm",
        &[
            "--unfreeze-top-k",
            "1",
            "--epochs",
            "2",
            "--batch-size",
            "16",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let tensors = |dir: &Path| -> std::collections::HashMap<String, tch::Tensor> {
        tch::Tensor::read_safetensors(dir.join("model.safetensors"))
            .expect("weights")
            .into_iter()
            .collect()
    };
    let (base, tuned) = (tensors(&lm_fixture("llama-mha")), tensors(&rm));
    let same = |name: &str| base[name].equal(&tuned[name]);
    // llama-mha has 2 layers: layer 1 and the final norm trained, layer 0 and embeddings frozen.
    assert!(!same("model.layers.1.mlp.down_proj.weight"));
    assert!(!same("model.norm.weight"));
    assert!(same("model.layers.0.mlp.down_proj.weight"));
    assert!(same("model.embed_tokens.weight"));

    // HF scores the fine-tuned directory as we do.
    let text = "\n\nHuman: hi\n\nAssistant: Hello!";
    let hf = python_json("tests/fixtures/reward/hf_score.py", &[s(&rm), text]);
    let ours = recontrol_reward_model::RewardModel::load(
        &rm,
        recontrol_lm::DeviceSpec::Cpu,
        recontrol_lm::DType::F32,
    )
    .expect("load")
    .score_texts(&[text.to_owned()])
    .expect("score");
    assert!((f64::from(ours[0]) - hf["scores"][0].as_f64().expect("f64")).abs() < 1e-4);

    // Interrupted after one epoch and resumed: the same weights.
    let (parted, run) = train(
        dir.path(),
        "parted",
        &[
            "--unfreeze-top-k",
            "1",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--max-epochs-per-run",
            "1",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let (_, run) = train(
        dir.path(),
        "parted",
        &[
            "--unfreeze-top-k",
            "1",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--resume",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let read = |p: &Path| std::fs::read(p.join("model.safetensors")).expect("weights");
    assert_eq!(read(&parted), read(&rm));

    let (_, run) = train(dir.path(), "bad", &["--unfreeze-top-k", "3"]);
    assert_fails_with(
        &run,
        "--unfreeze-top-k 3 must be between 1 and the backbone's 2 layers",
    );
}

fn rollout_store(dir: &Path) -> PathBuf {
    let out = dir.join("r.h5");
    let hh = hh();
    let run = recontrol(&[
        "rollout",
        "--model",
        s(&lm_fixture("llama-mha")),
        "--dataset",
        s(&hh),
        "--limit",
        "10",
        "--max-new-tokens",
        "8",
        "--out",
        s(&out),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    out
}

#[test]
fn labelling_fills_rewards_refuses_labelled_stores_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = rollout_store(dir.path());
    let rules = rules_file(dir.path());
    let run = recontrol(&[
        "reward",
        "label",
        "--reward",
        s(&rules),
        "--rollouts",
        s(&store),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let st = Store::open(&store).expect("open");
    let rule = recontrol_reward_model::RuleReward::from_file(&rules).expect("rules");
    for (i, (p, r)) in st.texts().expect("texts").iter().enumerate() {
        let want = rule.reward(p, r) as f32;
        assert_eq!(st.rewards().expect("rewards")[i], want, "rollout {i}");
    }
    // h5py sees them too.
    let summary = python_json("tests/fixtures/store/check_store.py", &[s(&store)]);
    assert_eq!(summary["labelled"], 10);
    drop(st);

    let label = |extra: &[&str]| {
        let mut args = vec![
            "reward",
            "label",
            "--reward",
            s(&rules),
            "--rollouts",
            s(&store),
        ];
        args.extend_from_slice(extra);
        recontrol(&args)
    };
    let run = label(&[]);
    assert_fails_with(&run, "already labelled; pass --overwrite");

    // A partly labelled store (an interrupted run) needs --resume, which labels the rest.
    Store::open_rw(&store)
        .expect("rw")
        .write_rewards(6, &[f32::NAN; 4])
        .expect("unlabel");
    let run = label(&[]);
    assert_fails_with(&run, "partly labelled (6 of 10)");
    let run = label(&["--resume"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("labelled 4 rollouts"),
        "{}",
        stderr(&run)
    );
    assert!(Store::open(&store)
        .expect("open")
        .rewards()
        .expect("rewards")
        .iter()
        .all(|r| r.is_finite()));
    // Resuming a finished run (a requeued job) succeeds and labels nothing.
    let before = std::fs::read(&store).expect("store");
    let run = label(&["--resume"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("already labelled: nothing to do"),
        "{}",
        stderr(&run)
    );
    assert_eq!(std::fs::read(&store).expect("store"), before);

    // A reward model with another tokenizer than the rollouts' model: texts are re-tokenised.
    let other = dir.path().join("other-backbone");
    let run = recontrol(&[
        "lm",
        "pretrain",
        "--corpus",
        s(&hh()),
        "--out",
        s(&other),
        "--vocab-size",
        "300",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "2",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let rm = dir.path().join("other-rm");
    let run = recontrol(&[
        "reward",
        "train",
        "--model",
        s(&other),
        "--pairs",
        s(&hh()),
        "--out",
        s(&rm),
        "--epochs",
        "1",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let run = recontrol(&[
        "reward",
        "label",
        "--reward",
        s(&rm),
        "--rollouts",
        s(&store),
        "--overwrite",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("re-tokenised"), "{}", stderr(&run));
}

#[test]
fn bad_inputs_give_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gens = dir.path().join("gens.jsonl");
    std::fs::write(
        &gens,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n",
    )
    .expect("write");
    let rules = rules_file(dir.path());
    let run = recontrol(&[
        "reward",
        "score",
        "--reward",
        s(&rules),
        "--input",
        s(&gens),
    ]);
    assert_fails_with(&run, "gens.jsonl:2: no string field \"response\"");

    let bad_rules = dir.path().join("bad.toml");
    std::fs::write(
        &bad_rules,
        "[[term]]\nkind = \"regex\"\npattern = \"(\"\nweight = 1.0\n",
    )
    .expect("write");
    std::fs::write(&gens, "{\"prompt\": \"a\", \"response\": \"b\"}\n").expect("write");
    let run = recontrol(&[
        "reward",
        "score",
        "--reward",
        s(&bad_rules),
        "--input",
        s(&gens),
    ]);
    assert_fails_with(&run, "bad.toml: pattern \"(\"");

    // A reward model whose head is NaN: scoring fails instead of writing NaN rewards.
    let rm = dir.path().join("nan-rm");
    let base = recontrol_reward_model::RewardModel::load(
        &repo_root().join("tests/fixtures/generated/reward/hf-seqcls"),
        recontrol_lm::DeviceSpec::Cpu,
        recontrol_lm::DType::F32,
    )
    .expect("load");
    let nan = base.score.full_like(f64::NAN);
    recontrol_reward_model::RewardModel::from_parts(base.lm, nan)
        .save(&rm, &[])
        .expect("save");
    let out = dir.path().join("scored.jsonl");
    let run = recontrol(&[
        "reward",
        "score",
        "--reward",
        s(&rm),
        "--input",
        s(&gens),
        "--out",
        s(&out),
    ]);
    assert_fails_with(&run, "score.weight has NaN or Inf values");
    assert!(!out.exists());

    let run = recontrol(&[
        "reward",
        "label",
        "--reward",
        s(&rules),
        "--rollouts",
        s(&dir.path().join("none.h5")),
    ]);
    assert_fails_with(&run, "none.h5");
}

#[test]
fn partitions_train_on_disjoint_halves_of_the_training_pairs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = |name: &str, extra: &[&str]| -> Value {
        let mut args = vec!["--epochs", "1"];
        args.extend_from_slice(extra);
        let (rm, run) = train(dir.path(), name, &args);
        assert!(run.status.success(), "{}", stderr(&run));
        serde_json::from_str(
            &std::fs::read_to_string(rm.join("reward_training.json")).expect("record"),
        )
        .expect("json")
    };
    let whole = record("whole", &[]);
    let first = record("first", &["--partition", "1/2"]);
    let second = record("second", &["--partition", "2/2"]);
    assert!(whole.get("partition").is_none(), "{whole}");
    assert_eq!(first["partition"], "1/2");
    assert_eq!(second["partition"], "2/2");
    assert_eq!(first["args"]["partition"], "1/2");
    let count = |v: &Value, key: &str| v[key].as_u64().expect("count");
    // The halves split the training pairs between them; the held-out pairs are everyone's.
    assert_eq!(
        count(&first, "train_pairs") + count(&second, "train_pairs"),
        count(&whole, "train_pairs")
    );
    assert!(count(&first, "train_pairs").abs_diff(count(&second, "train_pairs")) <= 1);
    for part in [&first, &second] {
        assert_eq!(count(part, "heldout_pairs"), count(&whole, "heldout_pairs"));
    }
    // Digests are XORs of per-pair hashes: disjoint halves that cover the training pairs XOR
    // to the whole's (a pair in both halves would cancel out).
    let digest = |v: &Value| {
        u64::from_str_radix(v["train_pairs_digest"].as_str().expect("digest"), 16).expect("hex")
    };
    assert_ne!(digest(&first), digest(&second));
    assert_eq!(digest(&first) ^ digest(&second), digest(&whole));
    // The same part again is the same pairs; another split seed partitions differently.
    assert_eq!(
        digest(&record("first-again", &["--partition", "1/2"])),
        digest(&first)
    );
    let reseeded = record("reseeded", &["--partition", "1/2", "--split-seed", "7"]);
    assert_ne!(digest(&reseeded), digest(&first));

    for bad in ["0/2", "3/2", "a/b", "2"] {
        let (out, run) = train(dir.path(), "bad", &["--partition", bad]);
        assert!(!run.status.success(), "--partition {bad} was accepted");
        let err = stderr(&run);
        assert!(
            err.contains(&format!("invalid value '{bad}' for '--partition <K/N>'"))
                && err.contains("expected K/N with 1 <= K <= N"),
            "{err}"
        );
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{err}"
        );
        assert!(!out.exists());
    }
}
