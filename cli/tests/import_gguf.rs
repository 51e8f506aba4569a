//! `recontrol lm import-gguf` end to end: an import that HF transformers loads as it loads the
//! GGUF file itself, a second import of the same file that does nothing, and bad files that
//! each give one error line and leave nothing at `--out`.

use std::path::Path;
use std::process::Output;

use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};
use recontrol_tests::{gguf_fixtures_root, python_json};

fn recontrol(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

fn import(file: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["lm", "import-gguf", s(file), "--out", s(out)];
    args.extend_from_slice(extra);
    recontrol(&args)
}

#[test]
fn an_import_loads_in_transformers_and_a_second_import_does_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = gguf_fixtures_root().join("models/qwen2");
    let out = dir.path().join("qwen2");
    let first = import(&model.join("model.gguf"), &out, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let check = python_json(
        "tests/fixtures/gguf/check_hf_loads.py",
        &[s(&out), s(&model.join("reference"))],
    );
    assert_eq!(check["ids_equal"], true, "{check}");
    assert_eq!(check["model_type"], "qwen2", "{check}");
    let diff = check["max_abs_logit_diff"].as_f64().expect("diff");
    assert!(
        diff < 1e-4,
        "transformers on the import vs on the GGUF: {diff}"
    );

    let again = import(&model.join("model.gguf"), &out, &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already imported"),
        "{}",
        stderr(&again)
    );

    // Another dtype is another import: refused while the first is there.
    let other = import(&model.join("model.gguf"), &out, &["--dtype", "bf16"]);
    assert_fails_with(&other, "--out");
    let bf16 = dir.path().join("qwen2-bf16");
    let run = import(&model.join("model.gguf"), &bf16, &["--dtype", "bf16"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let config = std::fs::read_to_string(bf16.join("config.json")).expect("config");
    assert!(config.contains("\"bfloat16\""), "{config}");
}

#[test]
fn bad_files_give_one_error_and_leave_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (file, needle) in [
        ("truncated.gguf", "truncated"),
        ("truncated-data.gguf", "truncated-data.gguf"),
        ("offset-past-end.gguf", "offset-past-end.gguf"),
        ("tensor-count.gguf", "tensor"),
        ("huge-dims.gguf", "too large"),
        ("unknown-type.gguf", "unknown ggml type id 99"),
        ("bert.gguf", "bert"),
        ("missing-tensor.gguf", "blk.1.ffn_down.weight"),
        ("wrong-shape.gguf", "blk.0.attn_k.weight"),
    ] {
        let out = dir.path().join(file);
        let run = import(&gguf_fixtures_root().join("bad").join(file), &out, &[]);
        assert_fails_with(&run, needle);
        assert!(!out.exists(), "{file}: something was left at --out");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(leftovers.is_empty(), "{file}: left {leftovers:?}");
    }
    let missing = import(&dir.path().join("none.gguf"), &dir.path().join("m"), &[]);
    assert_fails_with(&missing, "none.gguf");
}
