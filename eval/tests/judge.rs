//! `evaluate` with an independent judge that disagrees with the policy reward: the policy
//! reward pays for length, the judge for brevity, on hand-made generations whose rewards are
//! known. The judge's columns and the win rates come from the judge, the policy columns from
//! the policy reward; without a judge the report is the policy reward's alone.

use std::collections::HashMap;

use recontrol_data::GenerationRecord;
use recontrol_eval::{
    evaluate, CoherenceEncoder, EvalSettings, Judges, MethodGenerations, Report, WinRatesBy,
};
use recontrol_reward_model::{RewardSource, RuleReward};
use recontrol_tests::lm_fixture;

const PROMPTS: [&str; 4] = [
    "Human: hi\n\nAssistant:",
    "Human: how are you\n\nAssistant:",
    "Human: tell me a story\n\nAssistant:",
    "Human: bye\n\nAssistant:",
];
const SHORT: [&str; 4] = [" a", " b", " cd", " e"];
const LONG: [&str; 4] = [" one two", " three four", " five six seven", " eight nine"];
const REFERENCE: &str = " ref";

/// `weight` per character of the response.
fn per_char(weight: f64) -> RuleReward {
    let spec = format!("[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = {weight}\n");
    RuleReward::parse(&spec, "per-char.toml".as_ref()).expect("rules")
}

/// A method's generations: one batch of 4 tokens per prompt, taking `seconds` each.
fn method(name: &str, responses: [&str; 4], seconds: f64) -> MethodGenerations {
    MethodGenerations {
        name: name.into(),
        file: format!("{name}.jsonl").into(),
        records: PROMPTS
            .iter()
            .zip(responses)
            .enumerate()
            .map(|(i, (p, r))| GenerationRecord {
                batch: Some(i),
                seconds: Some(seconds),
                num_tokens: Some(4),
                ..GenerationRecord::new(*p, r)
            })
            .collect(),
    }
}

fn mean_chars(responses: [&str; 4]) -> f64 {
    responses
        .iter()
        .map(|r| r.chars().count() as f64)
        .sum::<f64>()
        / 4.0
}

fn run(judge: Option<&mut (dyn RewardSource + 'static)>) -> Report {
    let methods = [method("short", SHORT, 1.0), method("long", LONG, 3.0)];
    let references: HashMap<String, String> = PROMPTS
        .iter()
        .map(|p| (p.to_string(), REFERENCE.to_owned()))
        .collect();
    let mut policy = per_char(0.1);
    let encoder = CoherenceEncoder::load(&lm_fixture("llama-mha"), recontrol_lm::DeviceSpec::Cpu)
        .expect("encoder");
    let judges = Judges {
        reward: &mut policy,
        judge,
        coherence: &encoder,
    };
    let settings = EvalSettings {
        bootstrap: 200,
        seed: 3,
    };
    evaluate(&methods, Some(&references), judges, &settings).expect("evaluate")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-4
}

#[test]
fn win_rates_and_judge_columns_come_from_the_judge() {
    let mut judge = per_char(-0.1);
    let judge_name = judge.describe();
    let report = run(Some(&mut judge));
    let [short, long] = &report.methods[..] else {
        panic!("two methods");
    };
    assert_eq!(report.judge.as_deref(), Some(judge_name.as_str()));
    assert_eq!(report.win_rates_by, WinRatesBy::Judge);
    assert!(close(report.reference_avg_reward.expect("policy"), 0.4));
    assert!(close(
        report.judge_reference_avg_reward.expect("judge"),
        -0.4
    ));

    // The policy columns: the policy reward (longer is better).
    assert!(close(long.avg_reward, 0.1 * mean_chars(LONG)));
    assert!(close(
        long.reward_gain_vs_base,
        0.1 * (mean_chars(LONG) - mean_chars(SHORT))
    ));
    assert!(long.reward_gain_vs_base > 0.0);
    assert_eq!(long.policy_win_rate_vs_base, Some(1.0));
    assert_eq!(long.policy_win_rate_vs_reference, Some(1.0));
    assert_eq!(short.policy_win_rate_vs_reference, Some(0.0));

    // The judge's columns and the win rates: the judge (shorter is better).
    let j = long.judge.as_ref().expect("judge metrics");
    assert!(close(j.avg_reward, -0.1 * mean_chars(LONG)));
    assert!(close(
        j.gain_vs_base,
        -0.1 * (mean_chars(LONG) - mean_chars(SHORT))
    ));
    assert!(j.avg_reward_ci95[0] <= j.avg_reward && j.avg_reward <= j.avg_reward_ci95[1]);
    assert!(j.gain_vs_base_ci95[1] < 0.0, "{:?}", j.gain_vs_base_ci95);
    assert_eq!(long.win_rate_vs_base, 0.0);
    assert_eq!(long.win_rate_vs_reference, Some(0.0));
    assert_eq!(short.win_rate_vs_reference, Some(1.0));
    assert_eq!(short.win_rate_vs_base, 0.5);
    let base = short.judge.as_ref().expect("the base's judge metrics");
    assert_eq!(
        (base.gain_vs_base, base.gain_vs_base_ci95),
        (0.0, [0.0, 0.0])
    );

    // Three seconds per four tokens against one.
    assert_eq!(short.slowdown_vs_base, Some(1.0));
    assert!(close(long.slowdown_vs_base.expect("timed"), 3.0));

    let table = recontrol_eval::report::table(&report.methods);
    let long_row = table.lines().last().expect("row");
    assert!(long_row.contains("| 0.0% | 0.0% |"), "{long_row}");
    assert!(table.contains("win vs base (judge)"), "{table}");
}

#[test]
fn without_a_judge_the_report_is_the_policy_rewards() {
    let mut judge = per_char(-0.1);
    let judged = run(Some(&mut judge));
    let report = run(None);
    assert_eq!(report.judge, None);
    assert_eq!(report.judge_reference_avg_reward, None);
    assert_eq!(report.win_rates_by, WinRatesBy::Reward);
    let long = &report.methods[1];
    assert_eq!(long.judge, None);
    assert_eq!(
        (
            long.policy_win_rate_vs_base,
            long.policy_win_rate_vs_reference
        ),
        (None, None)
    );
    assert_eq!(long.win_rate_vs_base, 1.0);
    assert_eq!(long.win_rate_vs_reference, Some(1.0));
    // The policy reward's numbers do not depend on the judge.
    for (a, b) in report.methods.iter().zip(&judged.methods) {
        assert_eq!(
            (a.avg_reward, a.avg_reward_ci95, a.reward_gain_vs_base_ci95),
            (b.avg_reward, b.avg_reward_ci95, b.reward_gain_vs_base_ci95)
        );
        assert_eq!(Some(a.win_rate_vs_base), b.policy_win_rate_vs_base);
    }
    // report.json keeps today's fields and adds no judge fields.
    let json = serde_json::to_value(&report).expect("json");
    for key in ["judge", "judge_reference_avg_reward"] {
        assert!(json.get(key).is_none(), "{key}");
    }
    let method = &json["methods"][1];
    for key in [
        "judge",
        "policy_win_rate_vs_base",
        "policy_win_rate_vs_reference",
    ] {
        assert!(method.get(key).is_none(), "{key}");
    }
    assert_eq!(method["win_rate_vs_base"], 1.0);
    assert_eq!(json["win_rates_by"], "reward");
    let table = recontrol_eval::report::table(&report.methods);
    assert!(!table.contains("judge"), "{table}");
    // A report read back is the report.
    let back: Report = serde_json::from_value(json).expect("read back");
    assert_eq!(back, report);
}
