//! `recontrol data prompts`: a split's prompts with their reference responses.

use std::collections::HashSet;

use recontrol_tests::cli::{self, arg as s, stderr};
use recontrol_tests::repo_root;
use serde_json::Value;

#[test]
fn writes_disjoint_splits_with_the_chosen_responses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hh = repo_root().join("data/bundled/hh-rlhf/harmless-base/test.jsonl.gz");
    let read = |split: &str| -> Vec<Value> {
        let out = dir.path().join(format!("{split}.jsonl"));
        let run = cli::run(
            env!("CARGO_BIN_EXE_recontrol"),
            &[
                "data",
                "prompts",
                s(&hh),
                "--split",
                split,
                "--out",
                s(&out),
            ],
        );
        assert!(run.status.success(), "{}", stderr(&run));
        std::fs::read_to_string(&out)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    };
    let (train, test) = (read("train"), read("test"));
    assert!(
        test.len() > 150 && train.len() > 5 * test.len(),
        "{} / {}",
        train.len(),
        test.len()
    );
    let prompts = |v: &[Value]| -> HashSet<String> {
        v.iter()
            .map(|r| r["prompt"].as_str().expect("prompt").to_owned())
            .collect()
    };
    assert!(prompts(&train).is_disjoint(&prompts(&test)));
    for r in &test {
        let p = r["prompt"].as_str().expect("prompt");
        assert!(p.trim_end().ends_with("Assistant:"), "{p}");
        assert!(!r["reference"].as_str().expect("reference").is_empty());
    }
    assert!(dir.path().join("test.jsonl.config.json").is_file());
}
