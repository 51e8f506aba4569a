//! GGUF imports against transformers' own GGUF loader
//! (`from_pretrained(dir, gguf_file=...)`): a file imported by `recontrol_gguf::import_gguf`
//! and run by `recontrol_lm` renders the chat template, tokenizes, and gives the logits and
//! greedy tokens that transformers gives for the same file. Fixtures:
//! `tests/fixtures/gguf/make_gguf_fixtures.py` (tiny models of several quant types, both
//! tokenizer kinds, a GQA llama, a qwen2 with biases; SmolLM2-135M-Instruct when the set-up
//! has fetched it). The weights themselves are checked in `gguf/tests/import.rs`.

use std::path::Path;

use recontrol_gguf::{import_gguf, ImportOptions};
use recontrol_lm::{
    generate, ChatMessage, DType, DeviceSpec, LanguageModel, Positions, Sampling, StepInput,
};
use recontrol_tests::{gguf_fixtures_root, repo_root};
use serde_json::Value;
use tch::{Kind, Tensor};

/// The tiny models of the fixtures.
const MODELS: [&str; 4] = ["llama-gqa", "mistral", "qwen2", "llama-spm"];

/// Imports `file` (f32) into a temporary directory and loads it.
fn import_and_load(file: &Path) -> (tempfile::TempDir, LanguageModel) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("model");
    import_gguf(file, &out, &ImportOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let lm = LanguageModel::load(&out, DeviceSpec::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    (tmp, lm)
}

/// Checks `lm` against a reference folder's `expected.json` / `expected.safetensors`; returns
/// the largest logit difference.
fn check_against_reference(name: &str, lm: &LanguageModel, reference: &Path) -> f64 {
    let text = std::fs::read_to_string(reference.join("expected.json")).expect("expected.json");
    let record: Value = serde_json::from_str(&text).expect("json");
    let expected: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(reference.join("expected.safetensors"))
            .expect("expected.safetensors")
            .into_iter()
            .collect();
    let new_tokens = record["new_tokens"].as_u64().expect("new_tokens") as usize;
    let mut worst: f64 = 0.0;
    for (i, prompt) in record["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .enumerate()
    {
        let text = prompt["text"].as_str().expect("text");
        let special = prompt["add_special_tokens"].as_bool().expect("flag");
        if !special {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(prompt["messages"].clone()).expect("messages");
            let rendered = lm
                .tokenizer
                .apply_chat_template(&messages, true)
                .expect("chat template");
            assert_eq!(rendered, text, "{name} prompt {i}: chat template");
        }
        let ids = lm.tokenizer.encode(text, special).expect("encode");
        let hf_ids = Vec::<i64>::try_from(&expected[&format!("input_ids_{i}")]).expect("ids");
        assert_eq!(ids, hf_ids, "{name} prompt {i}: token ids");

        let input_ids = Tensor::from_slice(&ids).unsqueeze(0);
        let positions =
            Tensor::arange(ids.len() as i64, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
        let mut cache = lm.model.new_cache(ids.len() + new_tokens);
        let input = StepInput {
            input_ids: &input_ids,
            position_ids: &positions,
            key_mask: None,
        };
        let hidden = lm
            .model
            .forward_hidden(&input, &mut cache, Positions::All)
            .expect("forward");
        let logits = lm.model.logits(&hidden).expect("logits").squeeze_dim(0);
        let hf_logits = &expected[&format!("logits_{i}")];
        let diff = (logits - hf_logits).abs().max().double_value(&[]);
        worst = worst.max(diff);
        assert!(diff < 1e-4, "{name} prompt {i}: logits differ by {diff}");

        let mut config = lm.generation_config(new_tokens, Sampling::Greedy);
        config.eos_token_ids.clear(); // transformers generated with eos_token_id=None
        let out = generate(&lm.model, &[ids], &config, None).expect("generate");
        let hf_greedy = Vec::<i64>::try_from(&expected[&format!("greedy_{i}")]).expect("greedy");
        assert_eq!(out[0].tokens, hf_greedy, "{name} prompt {i}: greedy tokens");
    }
    worst
}

#[test]
fn tiny_imports_match_transformers_gguf_loader() {
    let root = gguf_fixtures_root();
    for name in MODELS {
        let dir = root.join("models").join(name);
        let (_tmp, lm) = import_and_load(&dir.join("model.gguf"));
        let worst = check_against_reference(name, &lm, &dir.join("reference"));
        println!("{name}: max |logits - transformers| = {worst:.2e}");
    }
}

#[test]
fn smollm2_import_matches_transformers_gguf_loader_when_present() {
    let reference = gguf_fixtures_root().join("smollm2");
    let file = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !reference.is_dir() || !file.is_file() {
        println!(
            "skipped: no SmolLM2-135M-Instruct ({} or {} missing; scripts/setup.sh fetches it)",
            file.display(),
            reference.display()
        );
        return;
    }
    let (_tmp, lm) = import_and_load(&file);
    let worst = check_against_reference("smollm2", &lm, &reference);
    println!("smollm2: max |logits - transformers| = {worst:.2e}");
}
