//! Reward models written by HF transformers score like HF, and ours load in HF with the same
//! scores (fixtures: `tests/fixtures/reward/make_reward_fixtures.py`).

use recontrol_lm::{DType, DeviceSpec};
use recontrol_reward_model::RewardModel;
use recontrol_tests::{python_json, repo_root};
use serde_json::Value;

fn fixture() -> std::path::PathBuf {
    repo_root().join("tests/fixtures/generated/reward/hf-seqcls")
}

fn expected() -> Value {
    let path = fixture().join("expected.json");
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("json")
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (f64::from(*g) - w).abs() < 1e-4,
            "{what}: {got:?} vs {want:?}"
        );
    }
}

#[test]
fn hf_sequence_classification_models_score_like_hf() {
    let exp = expected();
    let texts: Vec<String> = serde_json::from_value(exp["texts"].clone()).expect("texts");
    let want: Vec<f64> = serde_json::from_value(exp["scores"].clone()).expect("scores");
    let mut rm = RewardModel::load(&fixture(), DeviceSpec::Cpu, DType::F32).expect("load");
    rm.batch_size = 1;
    assert_close(
        &rm.score_texts(&texts).expect("score"),
        &want,
        "one at a time",
    );
    rm.batch_size = 5;
    assert_close(
        &rm.score_texts(&texts).expect("score"),
        &want,
        "one left-padded batch",
    );
}

#[test]
fn saved_reward_models_load_in_hf_with_the_same_scores() {
    let exp = expected();
    let texts: Vec<String> = serde_json::from_value(exp["texts"].clone()).expect("texts");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rm");
    let rm = RewardModel::load(&fixture(), DeviceSpec::Cpu, DType::F32).expect("load");
    // A different head, so the check is not of the fixture's own file.
    let head = &rm.score * -2.0;
    let ours = RewardModel::from_parts(rm.lm, head);
    ours.save(&out, &[]).expect("save");
    let mine = RewardModel::load(&out, DeviceSpec::Cpu, DType::F32).expect("reload");
    let scores = mine.score_texts(&texts).expect("score");
    let mut args = vec![out.to_str().expect("utf-8")];
    args.extend(texts.iter().map(String::as_str));
    let hf = python_json("tests/fixtures/reward/hf_score.py", &args);
    assert_eq!(hf["architecture"], "LlamaForSequenceClassification");
    assert_eq!(hf["num_labels"], 1);
    let theirs: Vec<f64> = serde_json::from_value(hf["scores"].clone()).expect("scores");
    assert_close(&scores, &theirs, "HF loading our directory");
    let original: Vec<f64> = serde_json::from_value(exp["scores"].clone()).expect("scores");
    assert_close(
        &scores,
        &original.iter().map(|s| -2.0 * s).collect::<Vec<_>>(),
        "the new head is linear in the old one",
    );
}

#[test]
fn a_causal_lm_is_not_a_reward_model() {
    let err = RewardModel::load(
        &repo_root().join("tests/fixtures/generated/lm/llama-mha"),
        DeviceSpec::Cpu,
        DType::F32,
    )
    .expect_err("no score head")
    .to_string();
    assert!(err.contains("no score.weight"), "{err}");
}
