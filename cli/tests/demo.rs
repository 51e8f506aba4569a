//! `recontrol demo` end to end with a tiny configuration: every stage runs, the reports have
//! the promised fields, a second run skips everything, and a changed setting reruns only the
//! stages that depend on it.

use std::path::Path;
use std::process::Output;

use recontrol_tests::cli::{self, arg as s, stderr};
use serde_json::Value;

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

/// The tiny configuration on the fixture model with a chat template.
fn tiny() -> String {
    recontrol_tests::tiny_demo_config(1, "")
}

fn demo(out: &Path, config: &Path) -> String {
    let run = recontrol(&["demo", "--out", s(out), "--config", s(config)]);
    assert!(run.status.success(), "{}", stderr(&run));
    stderr(&run)
}

fn report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("report")).expect("json")
}

#[test]
fn runs_every_stage_caches_them_and_reruns_only_what_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("demo.toml");
    std::fs::write(&config, tiny()).expect("write");
    let out = dir.path().join("demo");
    let first = demo(&out, &config);
    assert_eq!(first.matches(": done in").count(), 30, "{first}");

    let r = report(&out.join("report/report.json"));
    let names: Vec<&str> = r["methods"]
        .as_array()
        .expect("methods")
        .iter()
        .map(|m| m["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "base",
            "prompting",
            "static-re",
            "best-of-n",
            "args",
            "value-guided",
            "re-control",
            "re-control+prompting"
        ]
    );
    assert!(r["judge"].as_str().expect("judge").contains("judge"), "{r}");
    for m in r["methods"].as_array().expect("methods") {
        for field in [
            "avg_reward",
            "diversity",
            "coherence",
            "win_rate_vs_reference",
            "win_rate_vs_base",
            "seconds",
        ] {
            assert!(m[field].is_number(), "{field}: {m}");
        }
        for field in ["avg_reward_ci95", "reward_gain_vs_base_ci95"] {
            assert_eq!(m[field].as_array().map(Vec::len), Some(2), "{field}: {m}");
        }
    }
    let ood = report(&out.join("report-ood/report.json"));
    assert_eq!(ood["methods"].as_array().map(Vec::len), Some(4));
    // Each tuned method's sweep chose one of its grid's settings on the validation prompts.
    let sweep = report(&out.join("sweeps/value-guided/sweep.json"));
    assert_eq!(sweep["points"].as_array().map(Vec::len), Some(2));
    assert_eq!(sweep["prompts"], 4);
    let chosen = sweep["chosen"].as_u64().expect("chosen") as usize;
    let weight = sweep["points"][chosen]["setting"][0][1]
        .as_f64()
        .expect("weight");
    let settings: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("generations/hh/value-guided.jsonl.config.json"))
            .expect("config"),
    )
    .expect("json");
    assert!(settings.to_string().contains("value-guided"), "{settings}");
    let first_line = |path: &str| -> Value {
        serde_json::from_str(
            std::fs::read_to_string(out.join(path))
                .expect("generations")
                .lines()
                .next()
                .expect("a line"),
        )
        .expect("json")
    };
    assert_eq!(
        first_line("generations/hh/value-guided.jsonl")["method"],
        "value-guided"
    );
    assert!(first_line("generations/hh/best-of-n.jsonl")["best_of"]["rewards"].is_array());
    assert!(weight == 1.0 || weight == 2.0);
    // The validation prompts are train-side prompts, none of them a test prompt.
    let test: Vec<String> = std::fs::read_to_string(out.join("prompts.jsonl"))
        .expect("prompts")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json")["prompt"].to_string())
        .collect();
    for line in std::fs::read_to_string(out.join("prompts-validation.jsonl"))
        .expect("validation")
        .lines()
    {
        let prompt = serde_json::from_str::<Value>(line).expect("json")["prompt"].to_string();
        assert!(!test.contains(&prompt), "{prompt}");
    }
    assert!(out.join("report/chart.svg").is_file());
    let generation: Value = serde_json::from_str(
        std::fs::read_to_string(out.join("generations/hh/prompting.jsonl"))
            .expect("generations")
            .lines()
            .next()
            .expect("a line"),
    )
    .expect("json");
    let seen = generation["model_prompt"].as_str().expect("model_prompt");
    assert!(seen.contains("<|system|>\nBe helpful."), "{seen}");
    assert!(!generation["prompt"]
        .as_str()
        .expect("prompt")
        .contains("Be helpful."));
    for stage in ["reward", "value"] {
        let logs: Vec<_> = std::fs::read_dir(out.join("logs").join(stage))
            .expect("logs")
            .collect();
        assert!(!logs.is_empty(), "no TensorBoard log for {stage}");
    }

    // Unchanged: every stage is skipped.
    let second = demo(&out, &config);
    assert_eq!(second.matches("unchanged, skipped").count(), 30, "{second}");

    // A new alpha grid reruns RE-Control's sweep, its generations and the reports, nothing
    // upstream and no other method.
    std::fs::write(
        &config,
        tiny().replace("alphas = [0.25, 0.5]", "alphas = [0.25, 0.75]"),
    )
    .expect("write");
    let third = demo(&out, &config);
    for skipped in [
        "model",
        "rollout",
        "reward",
        "value",
        "export",
        "judge",
        "sweep-args",
        "generate-hh-base",
        "generate-hh-args",
    ] {
        assert!(
            third.contains(&format!("{skipped}: unchanged, skipped")),
            "{skipped}: {third}"
        );
    }
    for rerun in [
        "sweep-re-control",
        "generate-hh-re-control",
        "generate-hh-re-control+prompting",
        "generate-harmfulqa-re-control",
        "report",
    ] {
        assert!(
            third.contains(&format!("{rerun}: recontrol")),
            "{rerun}: {third}"
        );
    }

    // A bad configuration is one clear error.
    std::fs::write(&config, "[model]\nargs = 3\n").expect("write");
    let run = recontrol(&["demo", "--out", s(&out), "--config", s(&config)]);
    cli::assert_fails_with(&run, "--config");
    // So is a judge trained on the policy reward model's pairs.
    std::fs::write(
        &config,
        tiny().replace("partition = \"2/2\"", "partition = \"1/2\""),
    )
    .expect("write");
    let run = recontrol(&["demo", "--out", s(&out), "--config", s(&config)]);
    cli::assert_fails_with(&run, "the judge must be trained on another partition");

    // A missing model directory is named, with the set-up that makes it.
    std::fs::write(&config, "[model]\ndir = \"no/such/model\"\n").expect("write");
    let run = recontrol(&["demo", "--out", s(&out), "--config", s(&config)]);
    cli::assert_fails_with(&run, "no/such/model");
}
