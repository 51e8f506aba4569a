//! Crash campaigns: every resumable job is killed with SIGKILL at seeded random points and
//! resumed until a run finishes by itself; its outputs then equal an uninterrupted run's, nothing
//! is left behind, and one more resume on the finished output is a no-op success (a requeued
//! job that had finished). The harness is `recontrol_tests::crash`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use recontrol_tests::crash::{campaign, Compare, Job};
use recontrol_tests::{cli, lm_fixture, repo_root};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_recontrol");

fn hh() -> PathBuf {
    repo_root().join("data/bundled/hh-rlhf/harmless-base/test.jsonl.gz")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|&a| a.to_owned()).collect()
}

fn path(p: &Path) -> String {
    cli::arg(p).to_owned()
}

/// A JSON record compared without the flags that differ by design between a run and its
/// resume (`resume` in the recorded arguments, the provenance's `command_line`) and the named
/// fields, which hold times or speeds, at any depth.
fn json_without(times: &'static [&'static str]) -> Compare {
    Compare::Values(Box::new(move |p: &Path| {
        let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut value: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        strip(&mut value, &["resume", "command_line"]);
        strip(&mut value, times);
        value.to_string()
    }))
}

/// JSON lines compared as [`json_without`] compares a record, line by line.
fn jsonl_without(times: &'static [&'static str]) -> Compare {
    Compare::Values(Box::new(move |p: &Path| {
        let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        text.lines()
            .map(|line| {
                let mut value: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                strip(&mut value, &["resume", "command_line"]);
                strip(&mut value, times);
                value.to_string() + "\n"
            })
            .collect()
    }))
}

/// An ONNX graph compared as a decoded protobuf whose JSON metadata values (the value net's
/// config, with its training speed) are compared as [`json_without`] compares a record.
fn onnx_without(times: &'static [&'static str]) -> Compare {
    use prost::Message;
    Compare::Values(Box::new(move |p: &Path| {
        let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut model = recontrol_export::proto::ModelProto::decode(bytes.as_slice())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        for prop in &mut model.metadata_props {
            let json = prop.value.as_deref().map(serde_json::from_str::<Value>);
            if let Some(Ok(mut value)) = json {
                strip(&mut value, &["resume", "command_line"]);
                strip(&mut value, times);
                prop.value = Some(value.to_string());
            }
        }
        format!("{model:?}")
    }))
}

/// A Markdown report compared without the last two columns of its tables (seconds per token
/// and slowdown against the base method: times).
fn markdown_without_time_columns() -> Compare {
    Compare::Values(Box::new(|p: &Path| {
        let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        text.lines()
            .map(|line| match line.strip_prefix('|') {
                Some(row) => {
                    let cells: Vec<&str> = row.split('|').collect();
                    cells[..cells.len().saturating_sub(3)].join("|") + "\n"
                }
                None => line.to_owned() + "\n",
            })
            .collect()
    }))
}

fn strip(value: &mut Value, fields: &[&str]) {
    match value {
        Value::Object(map) => {
            for f in fields {
                map.remove(*f);
            }
            for v in map.values_mut() {
                strip(v, fields);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| strip(v, fields)),
        _ => {}
    }
}

/// TensorBoard folders are not compared: each run writes its own event file, named by its
/// start time and host, and a resumed run's file repeats the steps the killed one had logged
/// after its last checkpoint (TensorBoard shows the last value of a step).
fn is_logs(rel: &Path) -> bool {
    rel.components().any(|c| c.as_os_str() == "logs")
}

fn no_setup(_: &Path) {}

/// A training job's progress: its output complete, or the checkpoint's `counter` (steps or
/// epochs done), or nothing saved yet.
fn training_progress(out: &Path, counter: &'static str) -> String {
    if out.exists() {
        return "output complete".into();
    }
    let checkpoint = recontrol_io::work_dir(out).join("checkpoint.safetensors");
    match recontrol_train::checkpoint::load::<Value>(&checkpoint) {
        Ok((state, _)) => format!("checkpoint at {counter} {}", state[counter]),
        Err(_) => "no checkpoint".into(),
    }
}

#[test]
fn lm_pretrain_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |d: &Path| {
        let mut args = strings(&[
            "lm",
            "pretrain",
            "--corpus",
            &path(&hh_slice()),
            "--out",
            &path(&d.join("m")),
            "--steps",
            "300",
            "--eval-every",
            "100",
            "--checkpoint-every",
            "10",
            "--eval-sequences",
            "4",
            "--seed",
            "5",
        ]);
        args.extend(strings(&recontrol_tests::TINY_PRETRAIN));
        args
    };
    let compare = |rel: &Path| match rel.to_str().unwrap_or_default() {
        _ if is_logs(rel) => Compare::Ignore,
        "m/training.json" => json_without(&["train_seconds", "tokens_per_second"]),
        _ => Compare::Bytes,
    };
    let report = campaign(
        BIN,
        dir.path(),
        &Job {
            name: "lm pretrain",
            args: &args,
            resume_flag: Some("--resume"),
            setup: &no_setup,
            compare: &compare,
            already_complete: "already complete",
            progress: &|d| training_progress(&d.join("m"), "step"),
        },
        20,
        6,
    );
    println!("{report:?}");
}

/// A reward-model job on the llama-mha fixture: 80 training pairs of 240 HH records, the head
/// and the top layer trained for `epochs` (an epoch runs the backbone, so that most of the
/// job's time is in its resumable epochs, not in its start-up).
fn reward_args(d: &Path, epochs: usize) -> Vec<String> {
    strings(&[
        "reward",
        "train",
        "--unfreeze-top-k",
        "1",
        "--model",
        &path(&lm_fixture("llama-mha")),
        "--pairs",
        &path(&hh_slice()),
        "--out",
        &path(&d.join("rm")),
        "--max-train-pairs",
        "80",
        "--epochs",
        &epochs.to_string(),
        "--batch-size",
        "32",
    ])
}

/// The first 240 records of the bundled HH-RLHF split.
fn hh_slice() -> PathBuf {
    static SLICE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    SLICE
        .get_or_init(|| {
            use std::io::BufRead;
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("hh-240.jsonl");
            let reader = recontrol_data::jsonl::open_maybe_gz(&hh()).expect("bundled data");
            let lines: Vec<String> = reader.lines().take(240).map(|l| l.expect("line")).collect();
            std::fs::write(&path, lines.join("\n")).expect("write");
            (dir, path)
        })
        .1
        .clone()
}

#[test]
fn reward_train_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let compare = |rel: &Path| match rel.to_str().unwrap_or_default() {
        _ if is_logs(rel) => Compare::Ignore,
        "rm/reward_training.json" => json_without(&[]),
        _ => Compare::Bytes,
    };
    let report = campaign(
        BIN,
        dir.path(),
        &Job {
            name: "reward train",
            args: &|d| reward_args(d, 5),
            resume_flag: Some("--resume"),
            setup: &no_setup,
            compare: &compare,
            already_complete: "already complete",
            progress: &|d| training_progress(&d.join("rm"), "epochs_done"),
        },
        21,
        6,
    );
    println!("{report:?}");
}

/// An unlabelled store of 480 rollouts and a reward model (1 epoch) to label it with, made once.
fn label_inputs() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static INPUTS: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = cli::rule_store(BIN, dir.path(), 480, false);
        let args = reward_args(dir.path(), 1);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = cli::run(BIN, &args);
        assert!(run.status.success(), "{}", cli::stderr(&run));
        let rm = dir.path().join("rm");
        (dir, store, rm)
    })
}

#[test]
fn reward_label_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, store, rm) = label_inputs();
    let setup = |d: &Path| {
        std::fs::copy(store, d.join("r.h5")).expect("copy store");
    };
    let args = |d: &Path| {
        strings(&[
            "reward",
            "label",
            "--reward",
            &path(rm),
            "--rollouts",
            &path(&d.join("r.h5")),
            "--chunk",
            "1",
        ])
    };
    let compare = |_: &Path| Compare::Bytes;
    let report = campaign(
        BIN,
        dir.path(),
        &Job {
            name: "reward label",
            args: &args,
            resume_flag: Some("--resume"),
            setup: &setup,
            compare: &compare,
            already_complete: "already labelled",
            progress: &|d| {
                let rewards = recontrol_data::Store::open(&d.join("r.h5"))
                    .and_then(|s| s.rewards())
                    .expect("the store opens after a kill");
                let labelled = rewards.iter().filter(|r| !r.is_nan()).count();
                format!("{labelled} of {} labelled", rewards.len())
            },
        },
        22,
        6,
    );
    println!("{report:?}");
}

#[test]
fn value_train_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = tempfile::tempdir().expect("tempdir");
    let store = cli::rule_store(BIN, inputs.path(), 40, true);
    let args = |d: &Path| {
        strings(&[
            "value",
            "train",
            "--rollouts",
            &path(&store),
            "--out",
            &path(&d.join("value")),
            "--epochs",
            "40",
            "--patience",
            "100",
            "--hidden",
            "16",
            "--batch-size",
            "16",
            "--target",
            "lambda",
            "--lambda",
            "0.75",
        ])
    };
    let compare = |rel: &Path| match rel.to_str().unwrap_or_default() {
        _ if is_logs(rel) => Compare::Ignore,
        "value/config.json" => json_without(&["transitions_per_s"]),
        _ => Compare::Bytes,
    };
    let report = campaign(
        BIN,
        dir.path(),
        &Job {
            name: "value train",
            args: &args,
            resume_flag: Some("--resume"),
            setup: &no_setup,
            compare: &compare,
            already_complete: "already complete",
            progress: &|d| training_progress(&d.join("value"), "epochs_done"),
        },
        23,
        6,
    );
    println!("{report:?}");
}

#[test]
fn rollout_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |d: &Path| {
        strings(&[
            "rollout",
            "--model",
            &path(&lm_fixture("qwen2")),
            "--dataset",
            &path(&hh()),
            "--limit",
            "384",
            "--max-new-tokens",
            "32",
            "--batch-size",
            "8",
            "--rollouts-per-part",
            "32",
            "--ignore-eos",
            "--out",
            &path(&d.join("r.h5")),
        ])
    };
    let compare = |rel: &Path| match rel.to_str().unwrap_or_default() {
        "r.h5.config.json" => json_without(&[]),
        _ => Compare::Bytes,
    };
    let report = campaign(
        BIN,
        dir.path(),
        &Job {
            name: "rollout",
            args: &args,
            resume_flag: Some("--resume"),
            setup: &no_setup,
            compare: &compare,
            already_complete: "already complete",
            progress: &|d| {
                if d.join("r.h5").exists() {
                    return "store complete".into();
                }
                let parts = std::fs::read_dir(d.join("r.h5.parts"))
                    .map(|entries| {
                        entries
                            .flatten()
                            .filter(|e| e.file_name().to_string_lossy().ends_with("h5"))
                            .count()
                    })
                    .unwrap_or(0);
                format!("{parts} of 12 parts")
            },
        },
        24,
        8,
    );
    println!("{report:?}");
}

/// The demo has no resume flag: rerun as it is, it skips every stage whose stamp matches,
/// continues an interrupted training or rollout stage (its `.stamps/NAME.pending` holds the
/// stage's key) and redoes any other interrupted stage from scratch.
#[test]
fn demo_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_dir = tempfile::tempdir().expect("tempdir");
    let config = config_dir.path().join("demo.toml");
    std::fs::write(
        &config,
        recontrol_tests::tiny_demo_config(2, "max_train_pairs = 96\n"),
    )
    .expect("write");
    let args = |d: &Path| {
        strings(&[
            "demo",
            "--out",
            &path(&d.join("demo")),
            "--config",
            &path(&config),
        ])
    };
    let compare = |rel: &Path| {
        let name = rel.to_str().unwrap_or_default();
        match () {
            _ if is_logs(rel) => Compare::Ignore,
            _ if name.ends_with(".jsonl") => jsonl_without(&["seconds"]),
            // The export manifest records each graph's digest and size: the graphs embed the
            // value net's config, training speed included; they are compared by value.
            _ if name.ends_with(".json") => json_without(&[
                "seconds",
                "seconds_per_token",
                "slowdown_vs_base",
                "transitions_per_s",
                "sha256",
                "bytes",
            ]),
            _ if name.ends_with(".onnx") => onnx_without(&["transitions_per_s"]),
            _ if name.ends_with(".md") => markdown_without_time_columns(),
            _ => Compare::Bytes,
        }
    };
    let report = campaign(
        BIN,
        dir.path(),
        &Job {
            name: "demo",
            args: &args,
            resume_flag: None,
            setup: &no_setup,
            compare: &compare,
            already_complete: "unchanged, skipped",
            progress: &|d| {
                let stamps: Vec<String> = std::fs::read_dir(d.join("demo/.stamps"))
                    .map(|entries| {
                        entries
                            .flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                let done = stamps.iter().filter(|n| !n.ends_with(".pending")).count();
                let pending: Vec<&String> =
                    stamps.iter().filter(|n| n.ends_with(".pending")).collect();
                format!("{done} of 30 stages done, pending {pending:?}")
            },
        },
        25,
        6,
    );
    println!("{report:?}");
}
