//! End-to-end tests of recontrol across crates, and the fixtures they share.
//!
//! Fixtures are made by Python scripts kept beside them (HF transformers is the reference) and
//! written under `tests/fixtures/generated/`, which is not committed: `scripts/test.sh` runs
//! the scripts before the tests.

use std::collections::HashMap;
use std::path::PathBuf;

use tch::Tensor;

/// The tiny HF models written by `tests/fixtures/lm/make_fixtures.py`, one per supported
/// architecture variant.
pub const LM_FIXTURES: [&str; 12] = [
    "llama-mha",
    "llama3-gqa",
    "mistral",
    "qwen2",
    "qwen3",
    "mixtral",
    "falcon-7b",
    "falcon-40b",
    "phi3",
    "gemma2",
    "gemma3",
    // phi3 with original_max_position_embeddings 60: generation crosses it (see the generator).
    "phi3-crossing",
];

/// The fixtures of the families added after the first four (issue 17).
pub const LM_FIXTURES_ADDED: &[&str] = LM_FIXTURES.split_at(4).1;

/// The repository root.
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("RECONTROL_REPO_ROOT") {
        return PathBuf::from(root); // a test binary run from another checkout (a GPU machine)
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Where the generated LM fixtures live.
pub fn lm_fixtures_root() -> PathBuf {
    let dir = repo_root().join("tests/fixtures/generated/lm");
    assert!(
        dir.join("prompts.json").is_file(),
        "LM fixtures missing at {}: run scripts/test.sh, or .venv/bin/python tests/fixtures/lm/make_fixtures.py",
        dir.display()
    );
    dir
}

/// Where the generated GGUF fixtures live (`tests/fixtures/gguf/make_gguf_fixtures.py`).
pub fn gguf_fixtures_root() -> PathBuf {
    let dir = repo_root().join("tests/fixtures/generated/gguf");
    assert!(
        dir.join("models").is_dir() && dir.join("bad").is_dir(),
        "GGUF fixtures missing at {}: run scripts/fixtures.sh",
        dir.display()
    );
    dir
}

/// The model directory of one LM fixture.
pub fn lm_fixture(name: &str) -> PathBuf {
    lm_fixtures_root().join(name)
}

/// The HF outputs recorded for an LM fixture (`expected.safetensors`), by name.
pub fn lm_expected(name: &str) -> HashMap<String, Tensor> {
    let path = lm_fixture(name).join("expected.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// The prompts the LM fixtures were run on.
pub fn lm_prompts() -> Vec<String> {
    let path = lm_fixtures_root().join("prompts.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_value(value["prompts"].clone())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs a script of the repo with the project venv's Python and parses its JSON output (the
/// reference implementations: HF transformers, h5py, TensorBoard's reader).
pub fn python_json(script: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script} with .venv/bin/python: {e}"));
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{script}: output is not JSON: {e}"))
}

/// Copies a fixture model directory into `dest` (for tests that break a copy).
pub fn copy_dir(src: &std::path::Path, dest: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dest.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// A seeded value net (`input -> 32 -> 1`, tanh, reward mean 0.5 and spread 4) for the states
/// of the model `identity`, saved as a value directory `dir`.
pub fn value_dir(dir: &std::path::Path, input: usize, identity: &str, seed: u64) -> PathBuf {
    use recontrol_value_net::{Activation, ValueConfig, ValueMlp, ValueModel};
    let mlp = ValueMlp::new(input, &[32], Activation::Tanh, seed, tch::Device::Cpu).expect("mlp");
    let model = ValueModel {
        config: ValueConfig {
            input_dim: input,
            hidden_dims: vec![32],
            activation: Activation::Tanh,
            reward_mean: 0.5,
            reward_std: 4.0,
            lm_hidden_size: input,
            lm_identity: identity.to_owned(),
            target: None,
            training: serde_json::json!({}),
            seed,
            git_revision: "test".into(),
            recontrol_version: "test".into(),
        },
        mlp,
    };
    model.save(dir).expect("save");
    dir.to_owned()
}

/// Helpers for tests that run the `recontrol` binary (its path comes from the calling crate's
/// `env!("CARGO_BIN_EXE_recontrol")`).
pub mod cli {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    /// Runs the binary with `args`.
    ///
    /// HDF5 file locking is off in the child: HDF5 opens files without close-on-exec, so a
    /// child spawned by one test while another test of the same process holds a store open
    /// inherits that file and its lock, and a third process then finds the store locked although
    /// nothing uses it (seen as a flaky "unable to lock file" in parallel test runs).
    pub fn run(binary: &str, args: &[&str]) -> Output {
        Command::new(binary)
            .args(args)
            .env("HDF5_USE_FILE_LOCKING", "FALSE")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {binary}: {e}"))
    }

    /// Standard error as text.
    pub fn stderr(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A path as a command-line argument.
    pub fn arg(path: &Path) -> &str {
        path.to_str().expect("utf-8 path")
    }

    /// A store of `rollouts` rollouts of the llama-mha fixture on bundled HH-RLHF prompts (12
    /// new tokens), in `dir`; with `labelled`, labelled by a rule of 0.1 per character.
    pub fn rule_store(binary: &str, dir: &Path, rollouts: usize, labelled: bool) -> PathBuf {
        let out = dir.join(if labelled {
            "labelled.h5"
        } else {
            "unlabelled.h5"
        });
        let hh = crate::repo_root().join("data/bundled/hh-rlhf/harmless-base/test.jsonl.gz");
        let model = crate::lm_fixture("llama-mha");
        let limit = rollouts.to_string();
        let run = self::run(
            binary,
            &[
                "rollout",
                "--model",
                arg(&model),
                "--dataset",
                arg(&hh),
                "--limit",
                &limit,
                "--max-new-tokens",
                "12",
                "--batch-size",
                "8",
                "--out",
                arg(&out),
            ],
        );
        assert!(run.status.success(), "{}", stderr(&run));
        if labelled {
            let rules = dir.join("rules.toml");
            std::fs::write(
                &rules,
                "[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = 0.1\n",
            )
            .expect("write");
            let run = self::run(
                binary,
                &[
                    "reward",
                    "label",
                    "--reward",
                    arg(&rules),
                    "--rollouts",
                    arg(&out),
                ],
            );
            assert!(run.status.success(), "{}", stderr(&run));
        }
        out
    }

    /// A clean failure: non-zero exit, no panic, and exactly one `error:` line containing
    /// `needle`: the last line, or, for a flag refused by the parser, followed by clap's usage
    /// hint only.
    pub fn assert_fails_with(out: &Output, needle: &str) {
        let err = stderr(out);
        assert!(
            !out.status.success(),
            "expected failure, got success; stderr: {err}"
        );
        assert!(!err.contains("panicked"), "panic: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one error line expected: {err}");
        // A flag refused by the parser is followed by clap's usage hint; any other error is
        // the last line.
        if !err.contains("For more information, try '--help'.") {
            assert_eq!(
                err.lines().last(),
                errors.first().copied(),
                "the error is the last line: {err}"
            );
        }
        assert!(errors[0].contains(needle), "error lacks {needle:?}: {err}");
    }
}
