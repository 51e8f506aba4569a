//! `recontrol generate --value`: RE-Control decoding against the reference algorithm run in HF
//! transformers (`tests/fixtures/controller/reference_generate.py`), both gradient backends,
//! and the refusals of value heads that do not fit the model.

use std::path::Path;
use std::process::Output;

use recontrol_lm::{DType, DeviceSpec, LanguageModel};
use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};
use recontrol_tests::{lm_fixture, lm_prompts, python_json, value_dir};
use serde_json::Value;

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

fn tokens(path: &Path) -> Vec<Vec<i64>> {
    std::fs::read_to_string(path)
        .expect("generations")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            serde_json::from_value(v["tokens"].clone()).expect("tokens")
        })
        .collect()
}

fn generate(model: &Path, prompts: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "generate",
        "--model",
        s(model),
        "--prompts",
        s(prompts),
        "--max-new-tokens",
        "12",
        "--batch-size",
        "3",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    let run = recontrol(&args);
    assert!(run.status.success(), "{}", stderr(&run));
}

#[test]
fn controlled_tokens_match_the_reference_with_both_backends() {
    check_against_the_reference(&["llama-mha", "qwen2"]);
}

/// The families added in issue 17 whose RE-Control tokens are checked against the reference:
/// Falcon (the paper's second model; multi-query and the new decoder architecture) and
/// Mixtral (a mixture of experts).
#[test]
fn controlled_tokens_match_the_reference_on_falcon_and_mixtral() {
    check_against_the_reference(&["falcon-7b", "falcon-40b", "mixtral"]);
}

/// For each fixture model: plain, onnx (8 fused steps and 5 looped ones) and torch backends
/// against `reference_generate.py`.
fn check_against_the_reference(models: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let prompts: Vec<String> = lm_prompts().into_iter().take(3).collect();
    let prompts_json = dir.path().join("prompts.json");
    std::fs::write(
        &prompts_json,
        serde_json::to_string(&prompts).expect("json"),
    )
    .expect("write");
    let prompts_jsonl = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(&prompts_jsonl, lines.join("\n")).expect("write");
    for (m, name) in models.iter().copied().enumerate() {
        let model = lm_fixture(name);
        let lm = LanguageModel::load(&model, DeviceSpec::Cpu, DType::F32).expect("lm");
        let value = value_dir(
            &dir.path().join(format!("v{m}")),
            64,
            &lm.identity,
            7 + m as u64,
        );
        let export = dir.path().join(format!("e{m}"));
        let run = recontrol(&[
            "export",
            "--value",
            s(&value),
            "--out",
            s(&export),
            "--steps",
            "8",
            "--alpha",
            "0.3",
        ]);
        assert!(run.status.success(), "{}", stderr(&run));
        let out = |k: &str| dir.path().join(format!("{name}-{k}.jsonl"));
        let control = ["--alpha", "0.3", "--steps", "8"];
        generate(&model, &prompts_jsonl, &out("plain"), &[]);
        // onnx: controller.onnx fuses the 8 steps; with 5 steps it loops over value_grad.onnx.
        generate(
            &model,
            &prompts_jsonl,
            &out("onnx"),
            &[&["--value", s(&export)], &control[..]].concat(),
        );
        generate(
            &model,
            &prompts_jsonl,
            &out("torch"),
            &[
                &["--value", s(&value), "--grad-backend", "torch"],
                &control[..],
            ]
            .concat(),
        );
        generate(
            &model,
            &prompts_jsonl,
            &out("onnx5"),
            &["--value", s(&export), "--alpha", "0.3", "--steps", "5"],
        );
        let reference = |steps: &str| -> Vec<Vec<i64>> {
            let r = python_json(
                "tests/fixtures/controller/reference_generate.py",
                &[
                    s(&model),
                    s(&value),
                    s(&prompts_json),
                    "--alpha",
                    "0.3",
                    "--steps",
                    steps,
                    "--max-new-tokens",
                    "12",
                ],
            );
            serde_json::from_value(r["tokens"].clone()).expect("tokens")
        };
        let want = reference("8");
        assert_eq!(
            tokens(&out("onnx")),
            want,
            "{name}: onnx backend vs reference"
        );
        assert_eq!(
            tokens(&out("torch")),
            want,
            "{name}: torch backend vs reference"
        );
        assert_eq!(
            tokens(&out("onnx5")),
            reference("5"),
            "{name}: 5 steps vs reference"
        );
        assert_ne!(
            tokens(&out("plain")),
            want,
            "{name}: the edit must change tokens"
        );
        assert_eq!(
            tokens(&out("plain")),
            reference("0"),
            "{name}: plain vs reference"
        );
        for line in std::fs::read_to_string(out("onnx")).expect("read").lines() {
            let r: Value = serde_json::from_str(line).expect("json");
            let (before, after) = (
                r["value_before_mean"].as_f64().expect("before"),
                r["value_after_mean"].as_f64().expect("after"),
            );
            assert!(after > before, "{name}: V {before} -> {after}");
            assert!(r["edit_norm_mean"].as_f64().expect("norm") > 0.0);
            assert!(r["edit_norm_max"].as_f64() >= r["edit_norm_mean"].as_f64());
        }
    }
}

#[test]
fn refuses_value_heads_that_do_not_fit_the_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = lm_fixture("llama-mha");
    let lm = LanguageModel::load(&model, DeviceSpec::Cpu, DType::F32).expect("lm");
    let plain = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "3",
        ];
        args.extend_from_slice(extra);
        recontrol(&args)
    };
    let small = value_dir(&dir.path().join("small"), 32, &lm.identity, 1);
    assert_fails_with(
        &plain(&["--value", s(&small)]),
        "takes hidden size 32, the model's is 64",
    );
    let foreign = value_dir(&dir.path().join("foreign"), 64, "sha256:another", 1);
    assert_fails_with(
        &plain(&["--value", s(&foreign)]),
        "was made from the states of model sha256:another",
    );
    let run = plain(&["--value", s(&foreign), "--allow-foreign-value"]);
    assert!(run.status.success(), "{}", stderr(&run));
    // The torch backend needs the value directory; an export whose directory is gone has none.
    let export = dir.path().join("export");
    let run = recontrol(&["export", "--value", s(&foreign), "--out", s(&export)]);
    assert!(run.status.success(), "{}", stderr(&run));
    std::fs::remove_dir_all(&foreign).expect("remove");
    assert_fails_with(
        &plain(&[
            "--value",
            s(&export),
            "--grad-backend",
            "torch",
            "--allow-foreign-value",
        ]),
        "the torch backend needs the value directory",
    );
    assert_fails_with(
        &plain(&["--value", s(&dir.path().join("nothing"))]),
        "expected an export directory, an .onnx file or a value directory",
    );
    assert_fails_with(
        &plain(&["--value", s(&small), "--max-edit-norm=-2"]),
        "'--max-edit-norm <MAX_EDIT_NORM>': expected a finite number > 0, got -2",
    );
    let run = plain(&["--alpha", "0.5"]);
    assert!(!run.status.success(), "--alpha without --value");
}
