//! The file parsers under seeded mutation fuzzing (stable Rust: a bounded loop in the test
//! suite, not a coverage-guided fuzzer): the JSONL prompt reader, the HH and HarmfulQA dataset
//! readers, the rollout store reader, the HF config and safetensors loader, the value-directory
//! reader, the ONNX metadata reader, the GGUF reader and the rule-reward TOML.
//!
//! Each parser gets a valid seed file, then `iterations()` mutants of it (bit flips, random bytes,
//! interesting integers (0, -1, 2^31-1, 2^63-1, the file length) written over 4 or 8 bytes,
//! truncations, insertions and duplicated spans), each parsed under `catch_unwind`. A parser
//! must return (Ok or Err) without panicking, and no single allocation it makes may exceed
//! the documented bound `ALLOC_FACTOR * file length + ALLOC_SLACK` (sizes read from a file
//! are checked against its length before allocating). A counting global allocator records
//! the largest allocation of the thread that parses. HDF5's own C allocations are not Rust
//! allocations and are not counted.

#![allow(unsafe_code)] // The counting allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recontrol_data::datasets::{DatasetKind, Fields, ReadOptions};
use recontrol_data::{Dataset, Rollout, StateDtype, Store, StoreMeta, StoreWriter};
use recontrol_export::{write_export, ControllerSpec, GraphMetadata, Producer, ValueDir};
use recontrol_tests::{gguf_fixtures_root, lm_fixture, repo_root, value_dir};

/// Mutants per parser in the suite; `RECONTROL_FUZZ_ITERATIONS` sets another count for
/// exploratory runs (the mutants are seeded: the first N of a longer run are the suite's).
const ITERATIONS: usize = 2000;

fn iterations() -> usize {
    match std::env::var("RECONTROL_FUZZ_ITERATIONS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("RECONTROL_FUZZ_ITERATIONS={v}: expected a count")),
        Err(_) => ITERATIONS,
    }
}
/// The largest single allocation a parse may make: this many times the file's length ...
const ALLOC_FACTOR: usize = 64;
/// ... plus this many bytes.
const ALLOC_SLACK: usize = 16 << 20;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

fn note(size: usize) {
    // `try_with`: the thread's locals may already be gone while it exits.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are noted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One mutant of `seed`.
fn mutate(seed: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = bytes.len().max(1);
        let at = rng.random_range(0..len);
        let last = bytes.len().saturating_sub(1);
        match rng.random_range(0..7) {
            0 if !bytes.is_empty() => bytes[at.min(last)] ^= 1 << rng.random_range(0..8),
            1 if !bytes.is_empty() => bytes[at.min(last)] = rng.random(),
            2 => {
                let values: [u64; 6] = [
                    0,
                    u64::MAX,
                    i32::MAX as u64,
                    i64::MAX as u64,
                    seed.len() as u64,
                    1 << 40,
                ];
                let v = values[rng.random_range(0..values.len())];
                let width = if rng.random_bool(0.5) { 4 } else { 8 };
                let le = v.to_le_bytes();
                for (k, &byte) in le.iter().take(width).enumerate() {
                    if let Some(b) = bytes.get_mut(at + k) {
                        *b = byte;
                    }
                }
            }
            3 => bytes.truncate(at),
            4 => {
                let n = rng.random_range(1..16);
                let insert: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                let at = at.min(bytes.len());
                bytes.splice(at..at, insert);
            }
            5 if bytes.len() > 2 => {
                let start = rng.random_range(0..bytes.len() - 1);
                let end = (start + rng.random_range(1..64)).min(bytes.len());
                let span = bytes[start..end].to_vec();
                let at = at.min(bytes.len());
                bytes.splice(at..at, span);
            }
            _ => {
                // Text formats: a structural character where it hurts.
                let chars = b"{}[]\",:\n0-e.";
                if !bytes.is_empty() {
                    let i = at.min(bytes.len() - 1);
                    bytes[i] = chars[rng.random_range(0..chars.len())];
                }
            }
        }
    }
    bytes
}

/// Fuzzes `parse` (given the mutant's path) with mutants of `seed` written to `target`; the
/// mutation lands in the first `focus` bytes half the time (a binary header). Returns how
/// many mutants parsed without error.
fn fuzz(
    name: &str,
    seed: &[u8],
    target: &Path,
    focus: Option<usize>,
    parse: &dyn Fn(&Path) -> bool,
) -> usize {
    let mut rng = StdRng::seed_from_u64(0x5eed ^ name.len() as u64);
    std::fs::write(target, seed).expect("write seed");
    assert!(
        parse_guarded(name, target, seed, parse),
        "{name}: the seed does not parse"
    );
    let mut accepted = 0;
    let iterations = iterations();
    for i in 0..iterations {
        let mutant = match focus {
            Some(n) if i % 2 == 0 && seed.len() > n => {
                let mut head = mutate(&seed[..n], &mut rng);
                head.extend_from_slice(&seed[n..]);
                head
            }
            _ => mutate(seed, &mut rng),
        };
        std::fs::write(target, &mutant).expect("write mutant");
        accepted += usize::from(parse_guarded(name, target, &mutant, parse));
    }
    eprintln!("{name}: {iterations} mutants, {accepted} parsed without error");
    accepted
}

/// Parses under `catch_unwind` with the allocation counter armed; panics (failing the test)
/// on a panic or an allocation past the bound.
fn parse_guarded(name: &str, path: &Path, bytes: &[u8], parse: &dyn Fn(&Path) -> bool) -> bool {
    PEAK.with(|p| p.set(0));
    ARMED.with(|a| a.set(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| parse(path)));
    ARMED.with(|a| a.set(false));
    let peak = PEAK.with(Cell::get);
    let bound = ALLOC_FACTOR * bytes.len() + ALLOC_SLACK;
    let keep = std::env::temp_dir().join(format!("fuzz-{name}-crash"));
    match result {
        Err(_) => {
            let _ = std::fs::write(&keep, bytes);
            panic!(
                "{name}: the parser panicked (mutant kept at {})",
                keep.display()
            )
        }
        Ok(ok) => {
            if peak > bound {
                let _ = std::fs::write(&keep, bytes);
                panic!(
                    "{name}: one allocation of {peak} bytes for a {}-byte file (bound {bound}; mutant at {})",
                    bytes.len(),
                    keep.display()
                );
            }
            ok
        }
    }
}

fn quiet_panics() {
    // A parser's panic is caught and reported by `parse_guarded`: keep the default hook's
    // message for every other panic only.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !ARMED.try_with(Cell::get).unwrap_or(false) {
            default(info);
        }
    }));
}

#[test]
fn text_parsers_survive_mutants() {
    quiet_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // JSONL prompts.
    let prompts: String = (0..12)
        .map(|i| format!("{{\"prompt\": \"question {i} \\u00e9\", \"id\": {i}}}\n"))
        .collect();
    let target = d.join("prompts.jsonl");
    fuzz("jsonl-prompts", prompts.as_bytes(), &target, None, &|p| {
        recontrol_data::read_prompts(p, "prompt").is_ok()
    });
    // HH-RLHF dialogues.
    let hh = "{\"chosen\": \"\\n\\nHuman: How do I bake bread?\\n\\nAssistant: Mix flour and water.\", \"rejected\": \"\\n\\nHuman: How do I bake bread?\\n\\nAssistant: No.\"}\n"
        .repeat(6);
    let read = |kind: DatasetKind| {
        move |p: &Path| {
            Dataset::read(
                p,
                &ReadOptions {
                    kind: Some(kind),
                    fields: Fields::default(),
                    skip_bad: false,
                },
            )
            .is_ok()
        }
    };
    let target = d.join("hh.jsonl");
    fuzz("hh", hh.as_bytes(), &target, None, &read(DatasetKind::Hh));
    // HarmfulQA's nested JSON.
    let hqa = "{\"Science\": {\"Physics\": [\"How do lasers work?\", \"Why is ice slippery?\"], \"Biology\": [\"What is a cell?\"]}, \"History\": {\"Rome\": [\"Who was Caesar?\"]}}";
    let target = d.join("harmfulqa.json");
    fuzz(
        "harmfulqa",
        hqa.as_bytes(),
        &target,
        None,
        &read(DatasetKind::HarmfulQa),
    );
    // Rule-reward TOML.
    let rules = "[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = 0.1\n\n[[term]]\nkind = \"words\"\nwords = [\"sorry\", \"cannot\"]\nweight = -1.0\n";
    let target = d.join("rules.toml");
    let parsed = fuzz("rules-toml", rules.as_bytes(), &target, None, &|p| {
        recontrol_reward_model::RuleReward::from_file(p).is_ok()
    });
    assert!(parsed < iterations(), "the rule mutants were all accepted");
    // HF config.json.
    let config = std::fs::read(lm_fixture("llama3-gqa").join("config.json")).expect("config");
    let target = d.join("config.json");
    fuzz("hf-config", &config, &target, None, &|p| {
        recontrol_lm::ModelConfig::from_file(p).is_ok()
    });
}

#[test]
fn binary_parsers_survive_mutants() {
    quiet_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // safetensors through the checkpoint loader (the header is the first bytes).
    let model = d.join("model");
    recontrol_tests::copy_dir(&lm_fixture("llama-mha"), &model).expect("copy");
    let weights = model.join("model.safetensors");
    let seed = std::fs::read(&weights).expect("weights");
    let header = 8 + u64::from_le_bytes(seed[..8].try_into().expect("8 bytes")) as usize;
    fuzz("safetensors", &seed, &weights, Some(header), &|_| {
        recontrol_lm::weights::Weights::open(&model, tch::Device::Cpu, tch::Kind::Float).is_ok()
    });
    // The value directory's safetensors and config.
    let value = value_dir(&d.join("value"), 8, "sha256:fuzz", 0);
    let vweights = value.join("model.safetensors");
    let vseed = std::fs::read(&vweights).expect("value weights");
    fuzz("value-safetensors", &vseed, &vweights, Some(64), &|_| {
        ValueDir::read(&value).is_ok()
    });
    std::fs::write(&vweights, &vseed).expect("restore");
    let vconfig = value.join("config.json");
    let cseed = std::fs::read(&vconfig).expect("value config");
    fuzz("value-config", &cseed, &vconfig, None, &|_| {
        ValueDir::read(&value).is_ok()
    });
    std::fs::write(&vconfig, &cseed).expect("restore");
    // ONNX metadata (protobuf).
    let export = d.join("export");
    write_export(
        &ValueDir::read(&value).expect("value"),
        &export,
        &ControllerSpec {
            steps: 2,
            alpha: 0.5,
            max_edit_norm: None,
        },
        &Producer {
            recontrol_version: "test".into(),
            git_revision: "test".into(),
        },
    )
    .expect("export");
    let onnx = export.join("value.onnx");
    let oseed = std::fs::read(&onnx).expect("onnx");
    let target = d.join("mutant.onnx");
    fuzz("onnx-metadata", &oseed, &target, Some(256), &|p| {
        GraphMetadata::read(p).is_ok()
    });
    // GGUF.
    let gguf = gguf_fixtures_root().join("models/llama-gqa/model.gguf");
    let gseed = std::fs::read(&gguf).expect("gguf");
    let target = d.join("mutant.gguf");
    fuzz("gguf", &gseed, &target, Some(4096), &|p| {
        recontrol_gguf::GgufFile::open(p).is_ok()
    });
}

#[test]
fn the_store_reader_survives_mutants() {
    quiet_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("seed.h5");
    let meta = StoreMeta {
        hidden_size: 4,
        model: "fuzz".into(),
        model_hash: "sha256:fuzz".into(),
        state_dtype: StateDtype::F32,
        prompt_format: recontrol_data::PromptFormat::Raw,
        generation: serde_json::json!({}),
        seed: 0,
        recontrol_version: "test".into(),
        dataset: "fuzz".into(),
    };
    let mut writer = StoreWriter::create(&store, &meta).expect("create");
    for i in 0..5i64 {
        let t = (i + 1) as usize;
        writer
            .append(&[Rollout {
                prompt_index: i,
                prompt: format!("prompt {i}"),
                response: format!("response {i}"),
                tokens: (0..t as i64).collect(),
                states: ndarray::Array2::from_elem((t, 4), i as f32),
                reward: i as f32,
            }])
            .expect("append");
    }
    writer.finish().expect("finish");
    let seed = std::fs::read(&store).expect("store");
    let target: PathBuf = dir.path().join("mutant.h5");
    fuzz("store", &seed, &target, Some(2048), &|p| {
        let Ok(st) = Store::open(p) else {
            return false;
        };
        let rows = (0..st.len()).all(|i| st.rollout(i).is_ok());
        rows && st.rewards().is_ok() && st.texts().is_ok()
    });
    let _ = repo_root();
}
