//! `recontrol slurm submit` on a real Slurm cluster (scripts/slurm-local.sh starts a one-node
//! one and sets SLURM_CONF; scripts/test.sh does so and sets RECONTROL_REQUIRE_SLURM=1, so that
//! CI fails rather than skips when the cluster is missing). Without a cluster these tests print
//! why they skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use recontrol_data::{Rollout, Store};
use recontrol_tests::cli::{self, arg as s, assert_fails_with, stderr};
use recontrol_tests::{lm_fixture, repo_root};

fn recontrol(args: &[&str]) -> std::process::Output {
    cli::run(env!("CARGO_BIN_EXE_recontrol"), args)
}

/// Whether a cluster is there; without one the test is skipped (with the reason printed),
/// unless RECONTROL_REQUIRE_SLURM=1 demands it.
fn cluster() -> bool {
    let conf = std::env::var("SLURM_CONF").ok();
    let up = conf.as_deref().is_some_and(|c| Path::new(c).is_file())
        && Command::new("sinfo")
            .arg("-h")
            .output()
            .is_ok_and(|o| o.status.success());
    if !up {
        assert!(
            std::env::var("RECONTROL_REQUIRE_SLURM").as_deref() != Ok("1"),
            "RECONTROL_REQUIRE_SLURM=1 but no Slurm cluster answers (SLURM_CONF={conf:?})"
        );
        eprintln!(
            "skipped: no Slurm cluster (start one with scripts/slurm-local.sh start DIR, which prints SLURM_CONF)"
        );
    }
    up
}

fn squeue_states(job: &str) -> Vec<String> {
    let out = Command::new("squeue")
        .args(["-h", "-r", "-j", job, "-o", "%i %T"])
        .output()
        .expect("squeue");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until `job` has left the queue (or fails the test after `limit`).
fn wait_gone(job: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !squeue_states(job).is_empty() {
        assert!(
            Instant::now() < deadline,
            "job {job} still queued: {:?}",
            squeue_states(job)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn job_ids(stdout: &str) -> (String, String) {
    // "submitted array job A (N tasks) and merge job M (after it); ..."
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let ids: Vec<String> = words
        .windows(2)
        .filter(|p| p[0] == "job" && p[1].chars().all(|c| c.is_ascii_digit()))
        .map(|p| p[1].to_owned())
        .collect();
    match ids.as_slice() {
        [array, merge] => (array.clone(), merge.clone()),
        _ => panic!("expected two job ids in {stdout:?}"),
    }
}

fn rollout_args(model: &Path) -> Vec<String> {
    let hh = repo_root().join("data/bundled/hh-rlhf/harmless-base/test.jsonl.gz");
    [
        "--model",
        s(model),
        "--dataset",
        s(&hh),
        "--limit",
        "160",
        "--max-new-tokens",
        "24",
        "--batch-size",
        "4",
        "--rollouts-per-part",
        "4",
        "--ignore-eos",
    ]
    .iter()
    .map(|w| (*w).to_owned())
    .collect()
}

/// `recontrol rollout` with the stage's flags and `extra` (e.g. `--out FILE`).
fn rollout_command<'a>(stage: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["rollout"];
    args.extend(stage.iter().map(String::as_str));
    args.extend_from_slice(extra);
    args
}

fn sorted(path: &Path) -> Vec<Rollout> {
    let st = Store::open(path).expect("open store");
    let mut rows: Vec<Rollout> = (0..st.len())
        .map(|i| st.rollout(i).expect("rollout"))
        .collect();
    rows.sort_by_key(|r| r.prompt_index);
    rows
}

/// The merged store holds the single-process run's rollouts: prompts, tokens, texts and
/// rewards exactly, states to float noise (other batches pad differently).
fn assert_same_rollouts(got: &Path, want: &Path) {
    let (got, want) = (sorted(got), sorted(want));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            (g.prompt_index, &g.prompt, &g.response, &g.tokens),
            (w.prompt_index, &w.prompt, &w.response, &w.tokens)
        );
        assert!(
            g.reward.to_bits() == w.reward.to_bits(),
            "prompt {}: reward {} vs {}",
            g.prompt_index,
            g.reward,
            w.reward
        );
        let diff = (&g.states - &w.states).fold(0f32, |m, d| m.max(d.abs()));
        assert!(diff < 1e-4, "prompt {}: {diff}", g.prompt_index);
    }
}

fn submit(dir: &Path, out: &Path, extra: &[&str], stage: &[String]) -> (String, String) {
    let mut args = vec![
        "slurm",
        "submit",
        "rollout",
        "--tasks",
        "4",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend(stage.iter().map(String::as_str));
    let run = Command::new(env!("CARGO_BIN_EXE_recontrol"))
        .args(&args)
        .current_dir(dir)
        .output()
        .expect("run recontrol");
    assert!(run.status.success(), "{}", stderr(&run));
    job_ids(&String::from_utf8_lossy(&run.stdout))
}

#[test]
fn a_requeued_task_resumes_its_shard_and_the_merge_equals_one_process() {
    if !cluster() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let model = lm_fixture("qwen2");
    let stage = rollout_args(&model);
    let whole = dir.path().join("whole.h5");
    let started = Instant::now();
    let run = recontrol(&rollout_command(&stage, &["--out", s(&whole)]));
    assert!(run.status.success(), "{}", stderr(&run));
    let one_process = started.elapsed();

    let merged = dir.path().join("merged.h5");
    let started = Instant::now();
    let (array, merge) = submit(dir.path(), &merged, &[], &stage);
    // Requeue task 1 once it is running and has written a part: it must resume, not restart.
    let task = format!("{array}_1");
    let parts = merged
        .with_extension("h5.slurm")
        .join("shards/shard-1.h5.parts");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let running = squeue_states(&task).iter().any(|l| l.ends_with("RUNNING"));
        let written = std::fs::read_dir(&parts)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".h5"))
            })
            .unwrap_or(false);
        if running && written {
            break;
        }
        assert!(
            Instant::now() < deadline && !squeue_states(&task).is_empty(),
            "task {task} finished or never ran before it could be requeued: {:?}",
            squeue_states(&array)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let requeue = Command::new("scontrol")
        .args(["requeue", &task])
        .output()
        .expect("scontrol");
    assert!(requeue.status.success(), "{}", stderr(&requeue));
    wait_gone(&array, Duration::from_secs(600));
    wait_gone(&merge, Duration::from_secs(120));
    let array_time = started.elapsed();
    assert!(
        merged.is_file(),
        "the merge job did not write {}",
        merged.display()
    );
    assert_same_rollouts(&merged, &whole);

    let logs = merged.with_extension("h5.slurm").join("logs");
    let log = std::fs::read_dir(&logs)
        .expect("logs")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("_1.out"))
        .expect("task 1's log");
    let log = std::fs::read_to_string(&log).expect("log");
    assert!(log.contains("attempt 2"), "task 1 was not requeued:\n{log}");
    assert!(log.contains("parts kept"), "task 1 did not resume:\n{log}");
    eprintln!(
        "one process: {:.1} s; 4-task array with a requeue, merged: {:.1} s",
        one_process.as_secs_f64(),
        array_time.as_secs_f64()
    );

    // A requeued task whose shard is complete exits 0 without redoing it.
    let shard0 = merged.with_extension("h5.slurm").join("shards/shard-0.h5");
    let before = std::fs::read(&shard0).expect("shard");
    let again = recontrol(&rollout_command(
        &stage,
        &["--shard", "0/4", "--resume", "--out", s(&shard0)],
    ));
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(std::fs::read(&shard0).expect("shard"), before);
}

#[test]
fn shards_labelled_in_the_array_equal_one_labelled_store() {
    if !cluster() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[term]]\nkind = \"length\"\nunit = \"chars\"\nweight = 0.1\n",
    )
    .expect("write");
    let model = lm_fixture("llama-mha");
    let mut stage = rollout_args(&model);
    stage[5] = "32".into(); // --limit
    let whole = dir.path().join("whole.h5");
    let run = recontrol(&rollout_command(&stage, &["--out", s(&whole)]));
    assert!(run.status.success(), "{}", stderr(&run));
    let run = recontrol(&[
        "reward",
        "label",
        "--reward",
        s(&rules),
        "--rollouts",
        s(&whole),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));

    let merged = dir.path().join("labelled.h5");
    let (array, merge) = submit(dir.path(), &merged, &["--label-reward", s(&rules)], &stage);
    wait_gone(&array, Duration::from_secs(600));
    wait_gone(&merge, Duration::from_secs(120));
    assert!(
        merged.is_file(),
        "the merge job did not write {}",
        merged.display()
    );
    assert_same_rollouts(&merged, &whole);
    assert!(sorted(&merged).iter().all(|r| r.reward.is_finite()));
}

#[test]
fn submit_checks_the_stage_flags_before_submitting() {
    // No cluster needed: nothing reaches sbatch.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("r.h5");
    let model = lm_fixture("qwen2");
    let stage = rollout_args(&model);
    let base = [
        "slurm",
        "submit",
        "rollout",
        "--tasks",
        "2",
        "--out",
        s(&out),
    ];
    let with = |extra: &[&str], stage: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        args.push("--");
        args.extend_from_slice(stage);
        recontrol(&args)
    };
    let stage: Vec<&str> = stage.iter().map(String::as_str).collect();
    let mut bad = stage.clone();
    bad.push("--bogus");
    assert_fails_with(&with(&[], &bad), "rollout flags after --");
    let mut bad = stage.clone();
    bad.extend(["--shard", "0/2"]);
    assert_fails_with(&with(&[], &bad), "set by the job array itself");
    let mut bad = stage.clone();
    bad[1] = "/nonexistent/model";
    assert_fails_with(&with(&[], &bad), "--model /nonexistent/model");
    assert_fails_with(
        &with(&["--extra-sbatch", "account=x"], &stage),
        "--extra-sbatch",
    );
    assert!(
        !out.with_extension("h5.slurm").exists(),
        "nothing written on refusal"
    );
    // A dry run prints and keeps the scripts, and submits nothing.
    let run = with(&["--dry-run", "--sbatch", "/nonexistent/sbatch"], &stage);
    assert!(run.status.success(), "{}", stderr(&run));
    let printed = String::from_utf8_lossy(&run.stdout);
    assert!(printed.contains("#SBATCH --array=0-1"), "{printed}");
    assert!(printed.contains("--shard auto --resume"), "{printed}");
    let dir_slurm: PathBuf = out.with_extension("h5.slurm");
    assert!(dir_slurm.join("array.sbatch").is_file());
    assert!(dir_slurm.join("merge.sbatch").is_file());
    // Without a dry run a missing sbatch is one clear error.
    let other = dir.path().join("s.h5");
    let mut args: Vec<&str> = vec![
        "slurm",
        "submit",
        "rollout",
        "--tasks",
        "2",
        "--out",
        s(&other),
        "--sbatch",
        "/nonexistent/sbatch",
        "--",
    ];
    args.extend_from_slice(&stage);
    assert_fails_with(&recontrol(&args), "is Slurm installed");
}

#[test]
fn shard_auto_outside_an_array_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = lm_fixture("qwen2");
    let stage = rollout_args(&model);
    let out = dir.path().join("r.h5");
    let args = rollout_command(&stage, &["--shard", "auto", "--out", s(&out)]);
    let run = Command::new(env!("CARGO_BIN_EXE_recontrol"))
        .args(&args)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .output()
        .expect("run");
    assert_fails_with(&run, "--shard auto: SLURM_ARRAY_TASK_ID is not set");
    // Inside one, the task's shard is taken.
    let run = Command::new(env!("CARGO_BIN_EXE_recontrol"))
        .args(&args)
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "4")
        .output()
        .expect("run");
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("shard 1/4"), "{}", stderr(&run));
    assert_eq!(Store::open(&out).expect("store").len(), 40);
}
