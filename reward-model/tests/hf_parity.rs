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

/// Replies to one dialogue run the dialogue through the backbone once (a shared prefix), and
/// still score like HF scoring each text on its own: with the prefix shared, a text that
/// begins another, a repeated text, and one that shares nothing.
#[test]
fn texts_that_share_a_dialogue_score_like_hf() {
    use recontrol_reward_model::features::prefix_groups;
    use recontrol_reward_model::model::text_ids;
    let exp = expected();
    let texts: Vec<String> = serde_json::from_value(exp["texts"].clone()).expect("texts");
    let dialogue = format!("{}{}\n\nHuman: and then?\n\nAssistant:", texts[1], texts[2]);
    let mut shared: Vec<String> = ["", " Sure.", " No, I can't.", " Let me think about it."]
        .iter()
        .map(|reply| format!("{dialogue}{reply}"))
        .collect();
    shared.push(shared[1].clone());
    shared.push(texts[0].clone());
    let mut rm = RewardModel::load(&fixture(), DeviceSpec::Cpu, DType::F32).expect("load");
    let ids: Vec<Vec<i64>> = shared
        .iter()
        .map(|t| text_ids(&rm.lm, t).expect("ids"))
        .collect();
    assert!(
        prefix_groups(&ids[..4])
            .iter()
            .any(|g| g.members.len() == 4 && g.prefix >= 16),
        "the four replies share the dialogue"
    );
    let mut args = vec![fixture().to_str().expect("utf-8").to_owned()];
    args.extend(shared.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let hf = python_json("tests/fixtures/reward/hf_score.py", &args);
    let want: Vec<f64> = serde_json::from_value(hf["scores"].clone()).expect("scores");
    for batch_size in [2, 16] {
        rm.batch_size = batch_size;
        let got = rm.score_texts(&shared).expect("score");
        assert_close(&got, &want, &format!("batches of {batch_size}"));
        assert_eq!(got[1], got[4], "a repeated text scores the same");
    }
}

/// A LongRoPE backbone (`phi3-crossing`, original_max_position_embeddings 60) takes its long
/// factors for a whole pass once one position is past 60: texts on either side of it, some
/// continuing a shared dialogue shorter than it, get in any batch the features they get one
/// at a time (each alone is HF's forward pass, checked in `tests/tests/lm_parity.rs`).
#[test]
fn longrope_features_do_not_depend_on_the_batch() {
    use recontrol_reward_model::features::{features, prefix_groups};
    use recontrol_reward_model::model::text_ids;
    let texts: Vec<String> = serde_json::from_value(expected()["texts"].clone()).expect("texts");
    let dialogue = format!("{}\n\nHuman: and then?\n\nAssistant:", texts[1]);
    let mut shared: Vec<String> = [
        "",
        " Sure.",
        " No, I can't.",
        " Let me think about it some more, please wait.",
        " Let me think about it some more, please wait: the capital of France is a long story.",
        " No. I can't tell you more than that about the capital of France, sorry.",
    ]
    .iter()
    .map(|reply| format!("{dialogue}{reply}"))
    .collect();
    // A second dialogue, shorter, whose longer replies widen the batch of the first one's.
    let other = format!("{}\n\nHuman: why?\n\nAssistant:", texts[2]);
    shared.extend(
        [
            " Because it is wrong.",
            " Because it is wrong to hurt people, and I do not want to help.",
        ]
        .iter()
        .map(|reply| format!("{other}{reply}")),
    );
    shared.extend([texts[0].clone(), texts[3].clone()]);
    let lm = recontrol_lm::LanguageModel::load(
        &recontrol_tests::lm_fixture("phi3-crossing"),
        DeviceSpec::Cpu,
        DType::F32,
    )
    .expect("phi3-crossing");
    let ids: Vec<Vec<i64>> = shared
        .iter()
        .map(|t| text_ids(&lm, t).expect("ids"))
        .collect();
    let (long, short): (Vec<Vec<i64>>, Vec<Vec<i64>>) =
        ids.iter().cloned().partition(|i| i.len() > 60);
    assert!(
        long.len() > 2 && short.len() > 2,
        "texts on both sides of 60 tokens"
    );
    assert_eq!(
        prefix_groups(&short)
            .iter()
            .filter(|g| g.members.len() > 1)
            .count(),
        2,
        "two dialogues below 60 tokens"
    );
    assert!(
        prefix_groups(&long)
            .iter()
            .any(|g| g.members.len() > 1 && g.prefix <= 60),
        "long texts continue a shared prefix shorter than 60 tokens"
    );
    let alone: Vec<tch::Tensor> = shared
        .iter()
        .map(|t| features(&lm, std::slice::from_ref(t), 1).expect("features"))
        .collect();
    let alone = tch::Tensor::cat(&alone, 0);
    for batch_size in [3, 16] {
        let together = features(&lm, &shared, batch_size).expect("features");
        let d = (&together - &alone).abs().max().double_value(&[]);
        assert!(d < 1e-5, "batches of {batch_size}: features differ by {d}");
    }
}

/// A policy reward model and a judge on one backbone (different heads) share features: the
/// judge computes nothing the policy model computed, and scores as on its own.
#[test]
fn reward_models_on_one_backbone_share_features() {
    let exp = expected();
    let texts: Vec<String> = serde_json::from_value(exp["texts"].clone()).expect("texts");
    let mut policy = RewardModel::load(&fixture(), DeviceSpec::Cpu, DType::F32).expect("load");
    let backbone = RewardModel::load(&fixture(), DeviceSpec::Cpu, DType::F32).expect("load");
    let head = &backbone.score * -2.0;
    let mut judge = RewardModel::from_parts(backbone.lm, head);
    let alone = judge.score_texts(&texts).expect("judge alone");
    assert!(policy.share_features(&mut judge).expect("compare"));
    let memo = policy.memo.clone().expect("a memo");
    let first = policy.score_texts(&texts).expect("policy");
    assert_eq!(memo.len(), texts.len());
    let shared = judge.score_texts(&texts).expect("judge");
    assert_eq!(memo.len(), texts.len(), "the judge added nothing");
    assert_close(
        &shared,
        &alone.iter().map(|&s| f64::from(s)).collect::<Vec<_>>(),
        "the judge with shared features",
    );
    assert_close(
        &shared,
        &first
            .iter()
            .map(|&s| -2.0 * f64::from(s))
            .collect::<Vec<_>>(),
        "the judge's head is -2 times the policy's",
    );
    // A different backbone shares nothing.
    let other = recontrol_lm::LanguageModel::load_backbone(
        &repo_root().join("tests/fixtures/generated/lm/llama3-gqa"),
        DeviceSpec::Cpu,
        DType::F32,
    )
    .expect("another backbone");
    let hidden = other.model.config().hidden_size as i64;
    let mut stranger =
        RewardModel::from_parts(other, tch::Tensor::zeros([1, hidden], tch::kind::FLOAT_CPU));
    assert!(!policy.share_features(&mut stranger).expect("compare"));
    assert!(stranger.memo.is_none());
}

/// A reward model on each family added in issue 17 (a seeded head on the tiny fixture LM)
/// saves as that family's `*ForSequenceClassification` and scores the same in HF.
#[test]
fn reward_models_of_every_family_load_in_hf_with_the_same_scores() {
    let exp = expected();
    let texts: Vec<String> = serde_json::from_value(exp["texts"].clone()).expect("texts");
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, name) in recontrol_tests::LM_FIXTURES_ADDED.iter().enumerate() {
        let lm = recontrol_lm::LanguageModel::load_backbone(
            &recontrol_tests::lm_fixture(name),
            DeviceSpec::Cpu,
            DType::F32,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let class = lm
            .model
            .config()
            .architecture
            .sequence_classification_class();
        tch::manual_seed(i as i64);
        let hidden = lm.model.config().hidden_size as i64;
        let head = tch::Tensor::randn([1, hidden], (tch::Kind::Float, tch::Device::Cpu)) * 0.1;
        let out = dir.path().join(name);
        RewardModel::from_parts(lm, head)
            .save(&out, &[])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours = RewardModel::load(&out, DeviceSpec::Cpu, DType::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .score_texts(&texts)
            .expect("score");
        let mut args = vec![out.to_str().expect("utf-8")];
        args.extend(texts.iter().map(String::as_str));
        let hf = python_json("tests/fixtures/reward/hf_score.py", &args);
        assert_eq!(hf["architecture"], class, "{name}");
        let theirs: Vec<f64> = serde_json::from_value(hf["scores"].clone()).expect("scores");
        assert_close(&ours, &theirs, name);
    }
}
