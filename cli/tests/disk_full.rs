//! Writes that fail midway: the command runs under a file-size limit (`ulimit -f`, with SIGXFSZ
//! ignored so that a write past the limit fails with EFBIG, as on a full disk, instead of
//! killing the process). Each command must fail with one error line naming the file and why,
//! leave the previous artifact byte-identical (or nothing, where there was none), and leave
//! no temporary files behind.

use std::path::Path;
use std::process::{Command, Output};

use recontrol_tests::cli::{self, arg as s, assert_fails_with, rule_store, stderr};
use recontrol_tests::{lm_fixture, value_dir};

const BIN: &str = env!("CARGO_BIN_EXE_recontrol");

/// Runs the binary with files limited to `kib` KiB.
fn run_limited(kib: u64, args: &[&str]) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$@\""))
        .arg("bash")
        .arg(BIN)
        .args(args)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .expect("run bash")
}

/// Names in `dir` that look like temporary outputs.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part") || n.ends_with(".tmp") || n.starts_with(".recontrol-"))
        .collect()
}

#[test]
fn a_write_that_fails_midway_keeps_the_previous_artifact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let model = lm_fixture("llama-mha");
    let prompts = d.join("prompts.jsonl");
    let lines: String = (0..40)
        .map(|i| format!("{{\"prompt\": \"question number {i}: how are you?\"}}\n"))
        .collect();
    std::fs::write(&prompts, lines).expect("prompts");

    // generate: a previous output, then a rerun that cannot finish writing.
    let out = d.join("gens.jsonl");
    let args = [
        "generate",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--max-new-tokens",
        "24",
        "--out",
        s(&out),
    ];
    let first = cli::run(BIN, &args);
    assert!(first.status.success(), "{}", stderr(&first));
    let before = std::fs::read(&out).expect("output");
    assert!(before.len() > 8 * 1024, "the output must exceed the limit");
    let mut rerun: Vec<&str> = args.to_vec();
    rerun.extend(["--seed", "1", "--temperature", "1"]);
    let failed = run_limited(4, &rerun);
    assert_fails_with(&failed, "gens.jsonl");
    assert!(
        stderr(&failed).contains("File too large"),
        "{}",
        stderr(&failed)
    );
    assert_eq!(
        std::fs::read(&out).expect("output"),
        before,
        "the previous output changed"
    );
    assert_eq!(temporaries(d), Vec::<String>::new());

    // reward score onto the same kind of output.
    let rules = d.join("rules.toml");
    std::fs::write(
        &rules,
        "[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = 0.1\n",
    )
    .expect("rules");
    let scored = d.join("scored.jsonl");
    std::fs::write(&scored, b"previous\n").expect("previous");
    let failed = run_limited(
        4,
        &[
            "reward",
            "score",
            "--reward",
            s(&rules),
            "--input",
            s(&out),
            "--out",
            s(&scored),
        ],
    );
    assert_fails_with(&failed, "scored.jsonl");
    assert_eq!(std::fs::read(&scored).expect("scored"), b"previous\n");
    assert_eq!(temporaries(d), Vec::<String>::new());

    // export: a folder output appears whole or not at all.
    let identity = recontrol_lm::model_identity(&model).expect("identity");
    let value = value_dir(&d.join("value"), 64, &identity, 0);
    let export = d.join("export");
    let failed = run_limited(
        16,
        &[
            "export",
            "--value",
            s(&value),
            "--steps",
            "30",
            "--out",
            s(&export),
        ],
    );
    assert_fails_with(&failed, "export");
    assert!(!export.exists(), "a half-written export was left");
    assert_eq!(temporaries(d), Vec::<String>::new());

    // rollout: the HDF5 store fails to grow; a finished store is never half replaced.
    let store = rule_store(BIN, d, 6, false);
    let before = std::fs::read(&store).expect("store");
    let fresh = d.join("fresh.h5");
    let hh = recontrol_tests::repo_root().join("data/bundled/hh-rlhf/harmless-base/test.jsonl.gz");
    let failed = run_limited(
        8,
        &[
            "rollout",
            "--model",
            s(&model),
            "--dataset",
            s(&hh),
            "--limit",
            "40",
            "--max-new-tokens",
            "24",
            "--out",
            s(&fresh),
        ],
    );
    assert!(!failed.status.success(), "the rollout fit under the limit");
    assert!(!stderr(&failed).contains("panicked"), "{}", stderr(&failed));
    assert!(
        !fresh.exists(),
        "a partial store appeared at the output path"
    );
    assert_eq!(std::fs::read(&store).expect("store"), before);
}
