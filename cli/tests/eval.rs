//! `recontrol eval` on hand-made generation files whose metrics are known, and its refusals.

use std::path::{Path, PathBuf};
use std::process::Output;

use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};
use recontrol_tests::{lm_fixture, python_json};
use serde_json::Value;

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

fn jsonl(path: &Path, rows: &[Value]) -> PathBuf {
    let text: Vec<String> = rows.iter().map(Value::to_string).collect();
    std::fs::write(path, text.join("\n")).expect("write");
    path.to_owned()
}

const PROMPTS: [&str; 4] = [
    "Human: hi\n\nAssistant:",
    "Human: how are you\n\nAssistant:",
    "Human: tell me a story\n\nAssistant:",
    "Human: bye\n\nAssistant:",
];

#[test]
fn reports_known_metrics_for_hand_made_generations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gen = |name: &str, responses: [&str; 4]| -> PathBuf {
        let rows: Vec<Value> = PROMPTS
            .iter()
            .zip(responses)
            .enumerate()
            .map(|(i, (p, r))| {
                serde_json::json!({"prompt": p, "response": r, "num_tokens": 4, "seconds": 2.0, "batch": i / 2})
            })
            .collect();
        jsonl(&dir.path().join(format!("{name}.jsonl")), &rows)
    };
    let base = gen("base", [" a b a b a", " x", " y", " z"]);
    // Longer responses (the length rule pays 0.1 per char); the last one hallucinates a turn,
    // which the shared truncation rule cuts before scoring.
    let longer = gen(
        "longer",
        [
            " one two three four",
            " five six seven",
            " eight nine ten",
            " ok\n\nHuman: and then a very long hallucinated turn",
        ],
    );
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = 0.1\n",
    )
    .expect("write");
    let reference = jsonl(
        &dir.path().join("reference.jsonl"),
        &PROMPTS
            .iter()
            .map(|p| serde_json::json!({"prompt": p, "reference": " r"}))
            .collect::<Vec<_>>(),
    );
    let out = dir.path().join("report");
    let run = recontrol(&[
        "eval",
        "--generations",
        s(&base),
        s(&longer),
        "--names",
        "base,longer",
        "--reward",
        s(&rules),
        "--reference",
        s(&reference),
        "--coherence-model",
        s(&lm_fixture("llama-mha")),
        "--out",
        s(&out),
        "--bootstrap",
        "500",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json"),
    )
    .expect("json");
    let m = &report["methods"];
    assert_eq!(m[0]["name"], "base");
    assert_eq!(m[1]["name"], "longer");
    let f = |v: &Value| v.as_f64().expect("number");
    // Rewards: 0.1 * chars of the truncated response (the rule's default target).
    let chars = |_: &str, r: &str| 0.1 * r.chars().count() as f64;
    let base_r: Vec<f64> = PROMPTS
        .iter()
        .zip([" a b a b a", " x", " y", " z"])
        .map(|(p, r)| chars(p, r))
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!((f(&m[0]["avg_reward"]) - mean(&base_r)).abs() < 1e-4);
    let longer_r: Vec<f64> = PROMPTS
        .iter()
        .zip([
            " one two three four",
            " five six seven",
            " eight nine ten",
            " ok",
        ])
        .map(|(p, r)| chars(p, r))
        .collect();
    assert!((f(&m[1]["avg_reward"]) - mean(&longer_r)).abs() < 1e-4);
    // "a b a b a": (1 - 0.6)(1 - 0.5)(1 - 1/3); one-word responses have no n-grams: 0.
    assert!((f(&m[0]["diversity"]) - 0.4 * 0.5 * (2.0 / 3.0) / 4.0).abs() < 1e-9);
    assert_eq!(f(&m[1]["win_rate_vs_base"]), 1.0, "{}", m[1]); // longer on every prompt
    assert_eq!(f(&m[0]["win_rate_vs_base"]), 0.5);
    assert_eq!(f(&m[1]["win_rate_vs_reference"]), 1.0);
    let [lo, hi] = [
        f(&m[1]["avg_reward_ci95"][0]),
        f(&m[1]["avg_reward_ci95"][1]),
    ];
    assert!(lo <= f(&m[1]["avg_reward"]) && f(&m[1]["avg_reward"]) <= hi);
    assert_eq!(
        m[0]["reward_gain_vs_base_ci95"],
        serde_json::json!([0.0, 0.0])
    );
    // Two batches of 2 s each; 16 tokens.
    assert_eq!(f(&m[0]["seconds"]), 4.0);
    assert_eq!(f(&m[0]["seconds_per_token"]), 0.25);
    let coherence = f(&m[1]["coherence"]);
    assert!((-1.0..=1.0).contains(&coherence));
    for field in [
        "avg_reward",
        "avg_reward_ci95",
        "diversity",
        "coherence",
        "win_rate_vs_reference",
        "win_rate_vs_base",
        "reward_gain_vs_base_ci95",
        "seconds",
    ] {
        assert!(!m[1][field].is_null(), "{field}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(md.contains("| longer |"), "{md}");
    let chart = std::fs::read_to_string(out.join("chart.svg")).expect("chart.svg");
    assert!(
        chart.starts_with("<svg") && chart.contains("longer"),
        "{chart}"
    );

    // A response equal to its prompt (no turn marker to cut) has coherence 1.
    let echo = jsonl(
        &dir.path().join("echo.jsonl"),
        &[
            serde_json::json!({"prompt": "the cat sat on the mat", "response": "the cat sat on the mat"}),
        ],
    );
    let run = recontrol(&[
        "eval",
        "--generations",
        s(&echo),
        "--reward",
        s(&rules),
        "--coherence-model",
        s(&lm_fixture("llama-mha")),
        "--out",
        s(&dir.path().join("echo-report")),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("echo-report/report.json")).expect("report"),
    )
    .expect("json");
    assert!((f(&report["methods"][0]["coherence"]) - 1.0).abs() < 1e-5);

    // The encoder against HF transformers on one pair.
    let (p, r) = (
        "Human: tell me a story\n\nAssistant:",
        " Once upon a time there was a dog.",
    );
    let one = jsonl(
        &dir.path().join("one.jsonl"),
        &[serde_json::json!({"prompt": p, "response": r})],
    );
    let run = recontrol(&[
        "eval",
        "--generations",
        s(&one),
        "--reward",
        s(&rules),
        "--coherence-model",
        s(&lm_fixture("llama-mha")),
        "--out",
        s(&dir.path().join("one-report")),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let ours: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("one-report/report.json")).expect("report"),
    )
    .expect("json");
    let hf = python_json(
        "tests/fixtures/eval/coherence_reference.py",
        &[s(&lm_fixture("llama-mha")), p, r],
    );
    let (a, b) = (f(&ours["methods"][0]["coherence"]), f(&hf["coherence"]));
    assert!((a - b).abs() < 1e-5, "coherence {a} vs HF {b}");
}

#[test]
fn refuses_mismatched_or_malformed_inputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = 1.0\n",
    )
    .expect("write");
    let a = jsonl(
        &dir.path().join("a.jsonl"),
        &[
            serde_json::json!({"prompt": "p1", "response": "r"}),
            serde_json::json!({"prompt": "p2", "response": "r"}),
        ],
    );
    let b = jsonl(
        &dir.path().join("b.jsonl"),
        &[
            serde_json::json!({"prompt": "p1", "response": "r"}),
            serde_json::json!({"prompt": "other", "response": "r"}),
        ],
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"p1\", \"response\": \"r\"}\nnot json\n",
    )
    .expect("write");
    let refs = jsonl(
        &dir.path().join("refs.jsonl"),
        &[serde_json::json!({"prompt": "p1", "reference": "x"})],
    );
    let model = lm_fixture("llama-mha");
    let eval = |extra: &[&str]| {
        let out = dir.path().join("out");
        let mut args = vec![
            "eval",
            "--reward",
            s(&rules),
            "--coherence-model",
            s(&model),
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        recontrol(&args)
    };
    assert_fails_with(
        &eval(&["--generations", s(&a), s(&b)]),
        "b.jsonl:2: its prompt differs from the base's",
    );
    assert_fails_with(
        &eval(&["--generations", s(&bad)]),
        "bad.jsonl:2: expected a JSON object",
    );
    assert_fails_with(
        &eval(&["--generations", s(&a), "--names", "x,y"]),
        "--names has 2 names for 1 --generations files",
    );
    assert_fails_with(
        &eval(&["--generations", s(&a), "--reference", s(&refs)]),
        "1 of 2 prompts have no reference",
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn a_judge_computes_the_win_rates_and_its_own_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gen = |name: &str, responses: [&str; 4], seconds: f64| -> PathBuf {
        let rows: Vec<Value> = PROMPTS
            .iter()
            .zip(responses)
            .map(|(p, r)| {
                serde_json::json!({"prompt": p, "response": r, "num_tokens": 2, "seconds": seconds})
            })
            .collect();
        jsonl(&dir.path().join(format!("{name}.jsonl")), &rows)
    };
    let base = gen("base", [" a", " b", " c", " d"], 1.0);
    let longer = gen(
        "longer",
        [" one two", " three", " four five", " six seven"],
        2.0,
    );
    let rules = |name: &str, weight: f64| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!("[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = {weight}\n"),
        )
        .expect("write");
        path
    };
    // The policy reward pays for length, the judge for brevity.
    let (policy, judge) = (rules("policy.toml", 0.1), rules("judge.toml", -0.1));
    let reference = jsonl(
        &dir.path().join("reference.jsonl"),
        &PROMPTS
            .iter()
            .map(|p| serde_json::json!({"prompt": p, "reference": " r r"}))
            .collect::<Vec<_>>(),
    );
    let out = dir.path().join("report");
    let eval = |judge: &Path| {
        recontrol(&[
            "eval",
            "--generations",
            s(&base),
            s(&longer),
            "--reward",
            s(&policy),
            "--judge",
            s(judge),
            "--reference",
            s(&reference),
            "--coherence-model",
            s(&lm_fixture("llama-mha")),
            "--out",
            s(&out),
            "--bootstrap",
            "200",
        ])
    };
    let run = eval(&judge);
    assert!(run.status.success(), "{}", stderr(&run));
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json"),
    )
    .expect("json");
    assert!(
        report["judge"]
            .as_str()
            .expect("judge")
            .contains("judge.toml"),
        "{}",
        report["judge"]
    );
    assert_eq!(report["win_rates_by"], "judge");
    assert_eq!(report["args"]["judge"], s(&judge));
    let f = |v: &Value| v.as_f64().expect("number");
    let longer = &report["methods"][1];
    // Policy columns from the policy reward: longer is better.
    assert!(f(&longer["avg_reward"]) > f(&report["methods"][0]["avg_reward"]));
    assert!(f(&longer["reward_gain_vs_base"]) > 0.0);
    assert_eq!(f(&longer["policy_win_rate_vs_base"]), 1.0);
    assert_eq!(f(&longer["policy_win_rate_vs_reference"]), 1.0);
    // Judge columns and win rates from the judge: shorter is better.
    assert!(f(&longer["judge"]["gain_vs_base"]) < 0.0);
    assert!(f(&longer["judge"]["avg_reward"]) < 0.0);
    assert_eq!(f(&longer["win_rate_vs_base"]), 0.0);
    assert_eq!(f(&longer["win_rate_vs_reference"]), 0.0);
    assert_eq!(f(&report["methods"][0]["win_rate_vs_reference"]), 1.0);
    // Two seconds per two tokens against one.
    assert_eq!(f(&longer["slowdown_vs_base"]), 2.0);
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(
        md.contains("judge reward [95% CI]") && md.contains("win vs base (judge)"),
        "{md}"
    );
    assert!(
        md.contains("| 0.0% | 0.0% |") && md.contains("| 2.00x |"),
        "{md}"
    );
    let chart = std::fs::read_to_string(out.join("chart.svg")).expect("chart.svg");
    assert!(chart.contains("judge reward (95% CI)"), "{chart}");

    let missing = dir.path().join("no-such-judge");
    assert_fails_with(&eval(&missing), "--judge");
}
