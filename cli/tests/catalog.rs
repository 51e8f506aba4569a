//! The bad-input catalog: malformed, truncated or wrong-typed files of every kind the commands
//! read (model directories, configs, tokenizers, JSONL/JSON/TOML, HDF5 stores, value
//! directories, ONNX and GGUF files), NaN/Inf in weights, rewards and flags, out-of-range flags,
//! and outputs into missing folders or onto folders, across every subcommand.
//!
//! Every case asserts: a non-zero exit, no panic, exactly one `error:` line that names the file
//! or flag (the case's needle) and says what was expected, and nothing left at the output path.
//! Errors found while the command runs are its last line; flags refused by the parser get
//! clap's usage hint after the error line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use recontrol_tests::cli::{self, arg as s, rule_store, stderr};
use recontrol_tests::{copy_dir, gguf_fixtures_root, lm_fixture, repo_root, value_dir};
use tch::Tensor;

const BIN: &str = env!("CARGO_BIN_EXE_recontrol");

/// One bad input.
struct Case {
    /// The subcommand, for the per-command count.
    command: &'static str,
    what: &'static str,
    args: Vec<String>,
    /// What the error line must contain (the file or flag at fault, and what was wrong).
    needles: Vec<String>,
    /// Must not exist after the run.
    output: Option<PathBuf>,
}

fn case(
    command: &'static str,
    what: &'static str,
    args: &[&str],
    needles: &[&str],
    output: Option<&Path>,
) -> Case {
    Case {
        command,
        what,
        args: args.iter().map(|a| a.to_string()).collect(),
        needles: needles.iter().map(|n| n.to_string()).collect(),
        output: output.map(Path::to_owned),
    }
}

fn check(case: &Case) -> Result<(), String> {
    // A case's output never comes from an earlier case.
    if let Some(out) = case.output.as_ref().filter(|o| o.is_file()) {
        let _ = std::fs::remove_file(out);
    }
    let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
    let run = run_bounded(&args)?;
    let err = stderr(&run);
    let label = format!(
        "[{} / {}] recontrol {}",
        case.command,
        case.what,
        args.join(" ")
    );
    if run.status.success() {
        return Err(format!("{label}: succeeded\n{err}"));
    }
    if err.contains("panicked") || run.status.code().is_none() {
        return Err(format!("{label}: panicked or was killed\n{err}"));
    }
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    if errors.len() != 1 {
        return Err(format!("{label}: {} error lines\n{err}", errors.len()));
    }
    let from_parser = err.contains("For more information, try '--help'.");
    if !from_parser && err.lines().last() != Some(errors[0]) {
        return Err(format!("{label}: the error is not the last line\n{err}"));
    }
    for needle in &case.needles {
        if !errors[0].contains(needle.as_str()) {
            return Err(format!("{label}: the error lacks {needle:?}\n{err}"));
        }
    }
    if let Some(out) = &case.output {
        if out.exists() && !out.is_dir() {
            return Err(format!("{label}: {} was left behind", out.display()));
        }
        if let Some(parent) = out.parent().filter(|p| p.is_dir()) {
            let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
            let leftovers: Vec<String> = std::fs::read_dir(parent)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|f| {
                            f.ends_with(".part")
                                || f.ends_with(".tmp")
                                || name.as_ref().is_some_and(|n| f.starts_with(n.as_str()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            if !leftovers.is_empty() {
                return Err(format!("{label}: left {leftovers:?} beside the output"));
            }
        }
    }
    Ok(())
}

/// Runs the binary, killing it after two minutes (a server that wrongly starts, a job that
/// wrongly runs).
fn run_bounded(args: &[&str]) -> Result<Output, String> {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {BIN}: {e}"))?;
    let start = std::time::Instant::now();
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if start.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "recontrol {}: still running after 120 s",
                args.join(" ")
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().map_err(|e| e.to_string())
}

/// Writes `text` to `dir/name`.
fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Writes the first `keep` bytes of `src` to `dir/name`.
fn truncated(src: &Path, dir: &Path, name: &str, keep: f64) -> PathBuf {
    let bytes = std::fs::read(src).expect("read");
    let path = dir.join(name);
    std::fs::write(&path, &bytes[..(bytes.len() as f64 * keep) as usize]).expect("write");
    path
}

/// A copy of the llama-mha fixture with `edit` applied.
fn model_copy(dir: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let path = dir.join(name);
    copy_dir(&lm_fixture("llama-mha"), &path).expect("copy");
    edit(&path);
    path
}

/// Rewrites the tensors of a safetensors file.
fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let mut tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
        .expect("read safetensors")
        .into_iter()
        .collect();
    edit(&mut tensors);
    let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    Tensor::write_safetensors(&named, path).expect("write safetensors");
}

/// Puts `value` into the first element of the tensor `name`.
fn poison(tensors: &mut BTreeMap<String, Tensor>, name: &str, value: f64) {
    let t = tensors.get(name).unwrap_or_else(|| panic!("no {name}"));
    let mut first = t.view(-1).get(0);
    let _ = first.fill_(value);
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(&mut v);
    std::fs::write(path, v.to_string()).expect("write");
}

#[test]
fn every_bad_input_gets_one_clear_error_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let out_dir = d.join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let model = lm_fixture("llama-mha");
    let hh = repo_root().join("data/bundled/hh-rlhf/harmless-base/test.jsonl.gz");
    let store = rule_store(BIN, d, 6, true);
    let unlabelled = rule_store(BIN, d, 6, false);
    let rules = d.join("rules.toml");
    let identity = recontrol_lm::model_identity(&model).expect("identity");
    let value = value_dir(&d.join("value"), 64, &identity, 0);
    let prompts = file(d, "prompts.jsonl", "{\"prompt\": \"hi\"}\n");
    let gens = file(
        d,
        "gens.jsonl",
        "{\"prompt\": \"hi\", \"response\": \"yo\"}\n",
    );

    // Bad model directories.
    let m_noconfig = model_copy(d, "m-noconfig", |p| {
        std::fs::remove_file(p.join("config.json")).expect("rm")
    });
    let m_badjson = model_copy(d, "m-badjson", |p| {
        std::fs::write(p.join("config.json"), "{\"hidden_size\": ").expect("w")
    });
    let m_wrongtype = model_copy(d, "m-wrongtype", |p| {
        edit_json(&p.join("config.json"), |v| v["hidden_size"] = "big".into())
    });
    let m_arch = model_copy(d, "m-arch", |p| {
        edit_json(&p.join("config.json"), |v| {
            v["model_type"] = "gpt_neox".into();
            v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
        })
    });
    let m_shape = model_copy(d, "m-shape", |p| {
        edit_json(&p.join("config.json"), |v| {
            v["intermediate_size"] = 7.into()
        })
    });
    let m_trunc = model_copy(d, "m-trunc", |p| {
        let st = p.join("model.safetensors");
        truncated(&st.clone(), p, "model.safetensors", 0.5);
    });
    let m_garbage = model_copy(d, "m-garbage", |p| {
        std::fs::write(p.join("model.safetensors"), [0xffu8; 64]).expect("w")
    });
    let m_missing = model_copy(d, "m-missing", |p| {
        edit_safetensors(&p.join("model.safetensors"), |t| {
            t.remove("model.layers.1.mlp.down_proj.weight");
        })
    });
    let m_nan = model_copy(d, "m-nan", |p| {
        edit_safetensors(&p.join("model.safetensors"), |t| {
            poison(t, "model.layers.0.self_attn.q_proj.weight", f64::NAN)
        })
    });
    let m_inf = model_copy(d, "m-inf", |p| {
        edit_safetensors(&p.join("model.safetensors"), |t| {
            poison(t, "model.norm.weight", f64::INFINITY)
        })
    });
    let m_badtok = model_copy(d, "m-badtok", |p| {
        std::fs::write(p.join("tokenizer.json"), "not a tokenizer").expect("w")
    });
    let m_notok = model_copy(d, "m-notok", |p| {
        std::fs::remove_file(p.join("tokenizer.json")).expect("rm")
    });
    let m_genconf = model_copy(d, "m-genconf", |p| {
        std::fs::write(
            p.join("generation_config.json"),
            "{\"eos_token_id\": \"x\"}",
        )
        .expect("w")
    });

    // Bad data files.
    let p_malformed = file(
        d,
        "p-malformed.jsonl",
        "{\"prompt\": \"a\"}\n{\"prompt\": \n",
    );
    let p_nofield = file(d, "p-nofield.jsonl", "{\"text\": \"a\"}\n");
    let p_wrongtype = file(d, "p-wrongtype.jsonl", "{\"prompt\": 5}\n");
    let p_empty = file(d, "p-empty.jsonl", "");
    let hh_bad = file(
        d,
        "hh-bad.jsonl",
        "{\"chosen\": \"\\n\\nHuman: a\"}\n{oops\n",
    );
    let hh_type = file(d, "hh-type.jsonl", "{\"chosen\": 3, \"rejected\": []}\n");
    let hqa_bad = file(d, "harmfulqa.json", "{\"topic\": {\"sub\": [\"q\"]");
    let gens_bad = file(d, "gens-bad.jsonl", "{\"prompt\": \"hi\"}\n");
    let toml_bad = file(d, "bad.toml", "[[term]\nkind = ");
    let toml_kind = file(d, "kind.toml", "[[term]]\nkind = \"vibes\"\nweight = 1.0\n");
    let toml_nan = file(
        d,
        "nan.toml",
        "[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = nan\n",
    );
    let demo_toml = file(d, "demo-bad.toml", "[model]\nsource = 5\n");

    // Bad stores.
    let h5_text = file(d, "text.h5", "this is not HDF5");
    let h5_trunc = truncated(&store, d, "trunc.h5", 0.4);
    let inf_store = d.join("inf.h5");
    std::fs::copy(&unlabelled, &inf_store).expect("copy");
    let inf_rules = file(
        d,
        "inf-rules.toml",
        "[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = 1e308\n[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = 1e308\n",
    );

    // Bad value heads.
    let v_noconfig = d.join("v-noconfig");
    copy_dir(&value, &v_noconfig).expect("copy");
    std::fs::remove_file(v_noconfig.join("config.json")).expect("rm");
    let v_badconfig = d.join("v-badconfig");
    copy_dir(&value, &v_badconfig).expect("copy");
    std::fs::write(v_badconfig.join("config.json"), "{\"input_dim\": -1}").expect("w");
    let v_nan = d.join("v-nan");
    copy_dir(&value, &v_nan).expect("copy");
    edit_safetensors(&v_nan.join("model.safetensors"), |t| {
        poison(t, "layers.0.weight", f64::NAN)
    });
    let v_missing = d.join("v-missing");
    copy_dir(&value, &v_missing).expect("copy");
    edit_safetensors(&v_missing.join("model.safetensors"), |t| {
        t.remove("layers.1.weight");
    });
    let v_wide = value_dir(&d.join("v-wide"), 32, &identity, 0);
    let onnx_garbage = file(d, "garbage.onnx", "not protobuf at all \u{1}\u{2}");
    let export_dir = d.join("export");
    let run = cli::run(
        BIN,
        &["export", "--value", s(&value), "--out", s(&export_dir)],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let onnx_trunc = truncated(&export_dir.join("value_grad.onnx"), d, "trunc.onnx", 0.5);

    // Bad GGUF files.
    let gguf_text = file(d, "text.gguf", "GGUF but not really");
    let gguf_model = gguf_fixtures_root().join("models/llama-gqa/model.gguf");
    let gguf_trunc = truncated(&gguf_model, d, "trunc.gguf", 0.3);
    let gguf_huge = gguf_fixtures_root().join("bad/huge-dims.gguf");

    let o = |name: &str| out_dir.join(name);
    let missing_dir = d.join("no/such/folder");
    let (m, st, un) = (s(&model), s(&store), s(&unlabelled));
    let out_jsonl = o("out.jsonl");
    let oj = s(&out_jsonl);
    let gen = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "generate",
            "--model",
            m,
            "--prompts",
            s(&prompts),
            "--max-new-tokens",
            "2",
            "--out",
            oj,
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_owned).collect()
    };
    let gen_case = |what: &'static str, extra: &[&str], needles: &[&str]| Case {
        command: "generate",
        what,
        args: gen(extra),
        needles: needles.iter().map(|n| n.to_string()).collect(),
        output: Some(out_jsonl.clone()),
    };
    let gen_model = |what: &'static str, dir: &Path, needles: &[&str]| -> Case {
        let mut args = gen(&[]);
        args[2] = s(dir).to_owned();
        Case {
            command: "generate",
            what,
            args,
            needles: needles.iter().map(|n| n.to_string()).collect(),
            output: Some(out_jsonl.clone()),
        }
    };

    let mut cases = vec![
        // generate: model directories.
        gen_model("no config.json", &m_noconfig, &["config.json"]),
        gen_model("config.json not JSON", &m_badjson, &["config.json"]),
        gen_model(
            "config.json wrong type",
            &m_wrongtype,
            &["config.json", "field `hidden_size`"],
        ),
        gen_model("unknown architecture", &m_arch, &["gpt_neox"]),
        gen_model("weights of another shape", &m_shape, &["shape"]),
        gen_model("truncated safetensors", &m_trunc, &["model.safetensors"]),
        gen_model("garbage safetensors", &m_garbage, &["model.safetensors"]),
        gen_model("a tensor missing", &m_missing, &["down_proj"]),
        gen_model("NaN in weights", &m_nan, &["q_proj", "NaN"]),
        gen_model(
            "Inf in weights",
            &m_inf,
            &["model.norm.weight", "NaN or Inf"],
        ),
        gen_model("tokenizer.json malformed", &m_badtok, &["tokenizer.json"]),
        gen_model("no tokenizer.json", &m_notok, &["tokenizer.json"]),
        gen_model(
            "generation_config.json wrong type",
            &m_genconf,
            &["generation_config.json"],
        ),
        gen_model("model directory missing", &d.join("nope"), &["nope"]),
        // generate: prompts.
        {
            let mut c = gen_case(
                "prompts malformed",
                &[],
                &["p-malformed.jsonl:2", "malformed JSON"],
            );
            c.args[4] = s(&p_malformed).to_owned();
            c
        },
        {
            let mut c = gen_case("prompt field missing", &[], &["p-nofield.jsonl", "prompt"]);
            c.args[4] = s(&p_nofield).to_owned();
            c
        },
        {
            let mut c = gen_case(
                "prompt of the wrong type",
                &[],
                &["p-wrongtype.jsonl", "prompt"],
            );
            c.args[4] = s(&p_wrongtype).to_owned();
            c
        },
        {
            let mut c = gen_case("no prompts", &[], &["p-empty.jsonl", "no records"]);
            c.args[4] = s(&p_empty).to_owned();
            c
        },
        // generate: flags.
        gen_case(
            "negative temperature",
            &["--temperature", "-1"],
            &["--temperature", ">= 0"],
        ),
        gen_case(
            "NaN temperature",
            &["--temperature", "NaN"],
            &["--temperature"],
        ),
        gen_case("top-p above 1", &["--top-p", "1.5"], &["--top-p", "(0, 1]"]),
        gen_case("top-k 0", &["--top-k", "0"], &["--top-k", ">= 1"]),
        gen_case("batch size 0", &["--batch-size", "0"], &["--batch-size"]),
        gen_case(
            "no new tokens",
            &["--max-new-tokens", "0"],
            &["--max-new-tokens"],
        ),
        gen_case(
            "NaN alpha",
            &["--value", s(&value), "--alpha", "NaN"],
            &["--alpha"],
        ),
        gen_case(
            "inf alpha",
            &["--value", s(&value), "--alpha", "inf"],
            &["--alpha"],
        ),
        gen_case(
            "zero steps",
            &["--value", s(&value), "--steps", "0"],
            &["--steps"],
        ),
        gen_case(
            "negative edit bound",
            &["--value", s(&value), "--max-edit-norm", "-2"],
            &["--max-edit-norm"],
        ),
        gen_case("unknown device", &["--device", "tpu"], &["--device", "tpu"]),
        gen_case("unknown dtype", &["--dtype", "f8"], &["--dtype"]),
        gen_case(
            "best-of 0",
            &["--best-of", "0", "--reward", s(&rules)],
            &["--best-of"],
        ),
        // generate: value heads and ONNX files.
        gen_case(
            "value dir without config",
            &["--value", s(&v_noconfig)],
            &["v-noconfig"],
        ),
        gen_case(
            "value config malformed",
            &["--value", s(&v_badconfig), "--grad-backend", "torch"],
            &["v-badconfig"],
        ),
        gen_case(
            "NaN in value weights",
            &["--value", s(&v_nan), "--grad-backend", "torch"],
            &["v-nan", "NaN"],
        ),
        gen_case(
            "value tensor missing",
            &["--value", s(&v_missing), "--grad-backend", "torch"],
            &["v-missing", "layers.1.weight"],
        ),
        gen_case(
            "value head of another width",
            &["--value", s(&v_wide), "--grad-backend", "torch"],
            &["v-wide", "hidden size 32"],
        ),
        gen_case(
            "garbage .onnx",
            &["--value", s(&onnx_garbage)],
            &["garbage.onnx"],
        ),
        gen_case(
            "truncated .onnx",
            &["--value", s(&onnx_trunc)],
            &["trunc.onnx"],
        ),
        // generate: outputs.
        {
            let mut c = gen_case(
                "output into a missing folder",
                &[],
                &["no/such/folder", "does not exist"],
            );
            let target = missing_dir.join("out.jsonl");
            c.args[8] = s(&target).to_owned();
            c.output = Some(target);
            c
        },
        {
            let mut c = gen_case("output onto a folder", &[], &["is a folder"]);
            c.args[8] = s(&out_dir).to_owned();
            c.output = None;
            c
        },
        // rollout.
        case(
            "rollout",
            "dataset malformed",
            &[
                "rollout",
                "--model",
                m,
                "--dataset",
                s(&hh_bad),
                "--out",
                s(&o("r1.h5")),
            ],
            &["hh-bad.jsonl:2", "malformed JSON"],
            Some(&o("r1.h5")),
        ),
        case(
            "rollout",
            "dataset of the wrong type",
            &[
                "rollout",
                "--model",
                m,
                "--dataset",
                s(&hh_type),
                "--dataset-kind",
                "hh",
                "--out",
                s(&o("r2.h5")),
            ],
            &["hh-type.jsonl"],
            Some(&o("r2.h5")),
        ),
        case(
            "rollout",
            "HarmfulQA malformed",
            &[
                "rollout",
                "--model",
                m,
                "--dataset",
                s(&hqa_bad),
                "--out",
                s(&o("r3.h5")),
            ],
            &["harmfulqa.json"],
            Some(&o("r3.h5")),
        ),
        case(
            "rollout",
            "dataset missing",
            &[
                "rollout",
                "--model",
                m,
                "--dataset",
                s(&d.join("none.jsonl")),
                "--out",
                s(&o("r4.h5")),
            ],
            &["none.jsonl"],
            Some(&o("r4.h5")),
        ),
        case(
            "rollout",
            "shard beyond the count",
            &[
                "rollout",
                "--model",
                m,
                "--dataset",
                s(&hh),
                "--shard",
                "3/2",
                "--out",
                s(&o("r5.h5")),
            ],
            &["--shard"],
            Some(&o("r5.h5")),
        ),
        case(
            "rollout",
            "zero samples per prompt",
            &[
                "rollout",
                "--model",
                m,
                "--dataset",
                s(&hh),
                "--samples-per-prompt",
                "0",
                "--out",
                s(&o("r6.h5")),
            ],
            &["--samples-per-prompt"],
            Some(&o("r6.h5")),
        ),
        case(
            "rollout",
            "output into a missing folder",
            &[
                "rollout",
                "--model",
                m,
                "--dataset",
                s(&hh),
                "--limit",
                "1",
                "--out",
                s(&missing_dir.join("r.h5")),
            ],
            &["no/such/folder"],
            Some(&missing_dir.join("r.h5")),
        ),
        case(
            "rollout",
            "test fraction 1",
            &[
                "rollout",
                "--model",
                m,
                "--dataset",
                s(&hh),
                "--test-fraction",
                "1",
                "--out",
                s(&o("r7.h5")),
            ],
            &["--test-fraction"],
            Some(&o("r7.h5")),
        ),
        // rollout merge.
        case(
            "rollout merge",
            "a store that is not HDF5",
            &["rollout", "merge", st, s(&h5_text), "--out", s(&o("m1.h5"))],
            &["text.h5"],
            Some(&o("m1.h5")),
        ),
        case(
            "rollout merge",
            "a truncated store",
            &[
                "rollout",
                "merge",
                st,
                s(&h5_trunc),
                "--out",
                s(&o("m2.h5")),
            ],
            &["trunc.h5"],
            Some(&o("m2.h5")),
        ),
        // data.
        case(
            "data stats",
            "dataset malformed",
            &["data", "stats", s(&hh_bad)],
            &["hh-bad.jsonl"],
            None,
        ),
        case(
            "data prompts",
            "limit 0",
            &[
                "data",
                "prompts",
                s(&hh),
                "--limit",
                "0",
                "--out",
                s(&o("p.jsonl")),
            ],
            &["--limit"],
            Some(&o("p.jsonl")),
        ),
        case(
            "data prompts",
            "output onto a folder",
            &["data", "prompts", s(&hh), "--out", s(&out_dir)],
            &["is a folder"],
            None,
        ),
        // reward.
        case(
            "reward train",
            "pairs malformed",
            &[
                "reward",
                "train",
                "--model",
                m,
                "--pairs",
                s(&hh_bad),
                "--out",
                s(&o("rm1")),
            ],
            &["hh-bad.jsonl"],
            Some(&o("rm1")),
        ),
        case(
            "reward train",
            "zero epochs",
            &[
                "reward",
                "train",
                "--model",
                m,
                "--pairs",
                s(&hh),
                "--epochs",
                "0",
                "--out",
                s(&o("rm2")),
            ],
            &["--epochs"],
            Some(&o("rm2")),
        ),
        case(
            "reward train",
            "negative learning rate",
            &[
                "reward",
                "train",
                "--model",
                m,
                "--pairs",
                s(&hh),
                "--lr",
                "-0.1",
                "--out",
                s(&o("rm3")),
            ],
            &["--lr", "> 0"],
            Some(&o("rm3")),
        ),
        case(
            "reward train",
            "NaN weight decay",
            &[
                "reward",
                "train",
                "--model",
                m,
                "--pairs",
                s(&hh),
                "--weight-decay",
                "nan",
                "--out",
                s(&o("rm4")),
            ],
            &["--weight-decay"],
            Some(&o("rm4")),
        ),
        case(
            "reward train",
            "NaN in the backbone",
            &[
                "reward",
                "train",
                "--model",
                s(&m_nan),
                "--pairs",
                s(&hh),
                "--out",
                s(&o("rm5")),
            ],
            &["q_proj", "NaN"],
            Some(&o("rm5")),
        ),
        case(
            "reward score",
            "rules TOML malformed",
            &[
                "reward",
                "score",
                "--reward",
                s(&toml_bad),
                "--input",
                s(&gens),
                "--out",
                s(&o("s1.jsonl")),
            ],
            &["bad.toml"],
            Some(&o("s1.jsonl")),
        ),
        case(
            "reward score",
            "unknown rule kind",
            &[
                "reward",
                "score",
                "--reward",
                s(&toml_kind),
                "--input",
                s(&gens),
                "--out",
                s(&o("s2.jsonl")),
            ],
            &["kind.toml", "vibes"],
            Some(&o("s2.jsonl")),
        ),
        case(
            "reward score",
            "NaN rule weight",
            &[
                "reward",
                "score",
                "--reward",
                s(&toml_nan),
                "--input",
                s(&gens),
                "--out",
                s(&o("s3.jsonl")),
            ],
            &["nan.toml", "weight"],
            Some(&o("s3.jsonl")),
        ),
        case(
            "reward score",
            "generations without responses",
            &[
                "reward",
                "score",
                "--reward",
                s(&rules),
                "--input",
                s(&gens_bad),
                "--out",
                s(&o("s4.jsonl")),
            ],
            &["gens-bad.jsonl", "response"],
            Some(&o("s4.jsonl")),
        ),
        case(
            "reward score",
            "output into a missing folder",
            &[
                "reward",
                "score",
                "--reward",
                s(&rules),
                "--input",
                s(&gens),
                "--out",
                s(&missing_dir.join("s.jsonl")),
            ],
            &["no/such/folder"],
            Some(&missing_dir.join("s.jsonl")),
        ),
        case(
            "reward label",
            "a store that is not HDF5",
            &[
                "reward",
                "label",
                "--reward",
                s(&rules),
                "--rollouts",
                s(&h5_text),
            ],
            &["text.h5"],
            None,
        ),
        case(
            "reward label",
            "chunk 0",
            &[
                "reward",
                "label",
                "--reward",
                s(&rules),
                "--rollouts",
                un,
                "--chunk",
                "0",
            ],
            &["--chunk"],
            None,
        ),
        case(
            "reward label",
            "rewards that overflow to Inf",
            &[
                "reward",
                "label",
                "--reward",
                s(&inf_rules),
                "--rollouts",
                s(&inf_store),
            ],
            &["inf-rules.toml", "must be finite"],
            None,
        ),
        // value.
        case(
            "value train",
            "an unlabelled store",
            &["value", "train", "--rollouts", un, "--out", s(&o("v1"))],
            &["unlabelled.h5", "label"],
            Some(&o("v1")),
        ),
        case(
            "value train",
            "a truncated store",
            &[
                "value",
                "train",
                "--rollouts",
                s(&h5_trunc),
                "--out",
                s(&o("v2")),
            ],
            &["trunc.h5"],
            Some(&o("v2")),
        ),
        case(
            "value train",
            "learning rate 0",
            &[
                "value",
                "train",
                "--rollouts",
                st,
                "--lr",
                "0",
                "--out",
                s(&o("v3")),
            ],
            &["--lr"],
            Some(&o("v3")),
        ),
        case(
            "value train",
            "lambda above 1",
            &[
                "value",
                "train",
                "--rollouts",
                st,
                "--target",
                "lambda",
                "--lambda",
                "2",
                "--out",
                s(&o("v4")),
            ],
            &["--lambda", "[0, 1]"],
            Some(&o("v4")),
        ),
        case(
            "value train",
            "validation fraction 1",
            &[
                "value",
                "train",
                "--rollouts",
                st,
                "--val-fraction",
                "1",
                "--out",
                s(&o("v5")),
            ],
            &["--val-fraction"],
            Some(&o("v5")),
        ),
        case(
            "value train",
            "output onto a file",
            &["value", "train", "--rollouts", st, "--out", s(&prompts)],
            &["prompts.jsonl", "exists"],
            None,
        ),
        case(
            "value eval",
            "value dir without config",
            &["value", "eval", "--value", s(&v_noconfig), "--rollouts", st],
            &["v-noconfig"],
            None,
        ),
        case(
            "value eval",
            "NaN in value weights",
            &["value", "eval", "--value", s(&v_nan), "--rollouts", st],
            &["v-nan", "NaN"],
            None,
        ),
        // export.
        case(
            "export",
            "zero steps",
            &[
                "export",
                "--value",
                s(&value),
                "--steps",
                "0",
                "--out",
                s(&o("e1")),
            ],
            &["--steps", ">= 1"],
            Some(&o("e1")),
        ),
        case(
            "export",
            "NaN alpha",
            &[
                "export",
                "--value",
                s(&value),
                "--alpha",
                "NaN",
                "--out",
                s(&o("e2")),
            ],
            &["--alpha"],
            Some(&o("e2")),
        ),
        case(
            "export",
            "NaN in value weights",
            &["export", "--value", s(&v_nan), "--out", s(&o("e3"))],
            &["v-nan", "NaN"],
            Some(&o("e3")),
        ),
        case(
            "export",
            "value tensor missing",
            &["export", "--value", s(&v_missing), "--out", s(&o("e4"))],
            &["v-missing", "layers.1.weight"],
            Some(&o("e4")),
        ),
        case(
            "export inspect",
            "garbage .onnx",
            &["export", "inspect", s(&onnx_garbage)],
            &["garbage.onnx"],
            None,
        ),
        case(
            "export inspect",
            "truncated .onnx",
            &["export", "inspect", s(&onnx_trunc)],
            &["trunc.onnx"],
            None,
        ),
        // steer.
        case(
            "steer fit",
            "quantile above one half",
            &[
                "steer",
                "fit",
                "--rollouts",
                st,
                "--quantile",
                "0.7",
                "--out",
                s(&o("sv1.safetensors")),
            ],
            &["--quantile", "(0, 0.5]"],
            Some(&o("sv1.safetensors")),
        ),
        case(
            "steer fit",
            "an unlabelled store",
            &[
                "steer",
                "fit",
                "--rollouts",
                un,
                "--out",
                s(&o("sv2.safetensors")),
            ],
            &["unlabelled.h5"],
            Some(&o("sv2.safetensors")),
        ),
        case(
            "steer fit",
            "output onto a folder",
            &["steer", "fit", "--rollouts", st, "--out", s(&out_dir)],
            &["is a folder"],
            None,
        ),
        // eval and sweep.
        case(
            "eval",
            "generations malformed",
            &[
                "eval",
                "--generations",
                s(&p_malformed),
                "--reward",
                s(&rules),
                "--out",
                s(&o("ev1")),
            ],
            &["p-malformed.jsonl"],
            Some(&o("ev1")),
        ),
        case(
            "eval",
            "generations missing",
            &[
                "eval",
                "--generations",
                s(&d.join("none.jsonl")),
                "--reward",
                s(&rules),
                "--out",
                s(&o("ev2")),
            ],
            &["none.jsonl"],
            Some(&o("ev2")),
        ),
        case(
            "sweep",
            "cd-k 0",
            &[
                "sweep",
                "--model",
                m,
                "--prompts",
                s(&prompts),
                "--reward",
                s(&rules),
                "--value-guided",
                s(&value),
                "--cd-k",
                "0",
                "--out",
                s(&o("sw1")),
            ],
            &["--cd-k"],
            Some(&o("sw1")),
        ),
        // lm.
        case(
            "lm pretrain",
            "zero heads",
            &[
                "lm",
                "pretrain",
                "--corpus",
                s(&hh),
                "--heads",
                "0",
                "--out",
                s(&o("lm1")),
            ],
            &["--heads"],
            Some(&o("lm1")),
        ),
        case(
            "lm pretrain",
            "corpus malformed",
            &[
                "lm",
                "pretrain",
                "--corpus",
                s(&hh_bad),
                "--out",
                s(&o("lm2")),
            ],
            &["hh-bad.jsonl"],
            Some(&o("lm2")),
        ),
        case(
            "lm import-gguf",
            "not a GGUF file",
            &["lm", "import-gguf", s(&gguf_text), "--out", s(&o("g1"))],
            &["text.gguf"],
            Some(&o("g1")),
        ),
        case(
            "lm import-gguf",
            "truncated GGUF",
            &["lm", "import-gguf", s(&gguf_trunc), "--out", s(&o("g2"))],
            &["trunc.gguf"],
            Some(&o("g2")),
        ),
        case(
            "lm import-gguf",
            "dimensions past any file",
            &["lm", "import-gguf", s(&gguf_huge), "--out", s(&o("g3"))],
            &["huge-dims.gguf"],
            Some(&o("g3")),
        ),
        // slurm, demo, serve.
        case(
            "slurm submit",
            "zero tasks",
            &[
                "slurm",
                "submit",
                "rollout",
                "--tasks",
                "0",
                "--out",
                s(&o("sl.h5")),
                "--dry-run",
                "--",
                "--model",
                m,
                "--dataset",
                s(&hh),
            ],
            &["--tasks"],
            Some(&o("sl.h5")),
        ),
        case(
            "demo",
            "config of the wrong type",
            &["demo", "--config", s(&demo_toml), "--out", s(&o("demo"))],
            &["demo-bad.toml"],
            Some(&o("demo")),
        ),
        case(
            "serve",
            "NaN in weights",
            &["serve", "--model", s(&m_nan), "--port", "0"],
            &["q_proj", "NaN"],
            None,
        ),
        case(
            "serve",
            "value head of another width",
            &[
                "serve",
                "--model",
                m,
                "--value",
                &format!("w={}", s(&v_wide)),
                "--grad-backend",
                "torch",
                "--port",
                "0",
            ],
            &["v-wide", "hidden size 32"],
            None,
        ),
    ];
    cases.retain(|c| !c.args.is_empty());
    let mut failures = Vec::new();
    let mut per_command: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &cases {
        *per_command.entry(c.command).or_default() += 1;
        if let Err(e) = check(c) {
            failures.push(e);
        }
    }
    eprintln!("{} bad-input cases: {per_command:?}", cases.len());
    assert!(cases.len() >= 60, "the catalog has {} cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
