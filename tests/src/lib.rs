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

/// The demo's stages at a tiny size on the chat-template fixture model (llama3-gqa), as a
/// `demo.toml`: 24 rollouts of 8 tokens, a policy reward model and a judge each trained for
/// `reward_epochs` epochs on their half of the pairs (with `reward_extra`, more settings of
/// both), and the rest at its smallest.
pub fn tiny_demo_config(reward_epochs: usize, reward_extra: &str) -> String {
    let model = lm_fixture("llama3-gqa");
    let reward = |section: &str, part: &str| {
        format!(
            "[{section}]\nepochs = {reward_epochs}\nstandardize = true\nl2 = 0.01\npartition = \"{part}\"\n{reward_extra}"
        )
    };
    format!(
        "[model]\ndir = {:?}\nprompt_format = \"chat-template\"\n[rollout]\nlimit = 24\n\
         [rollout.decoding]\nmax_new_tokens = 8\nbatch_size = 8\ntemperature = 1.0\n{}{}{TINY_DEMO_REST}",
        model.display().to_string(),
        reward("reward", "1/2"),
        reward("judge", "2/2"),
    )
}

/// The stages after the reward models in [`tiny_demo_config`].
const TINY_DEMO_REST: &str = r#"
[value]
hidden = 16
epochs = 2
batch_size = 32
[export]
steps = 3
alpha = 0.5
[prompts]
limit = 8
[generate]
max_new_tokens = 8
batch_size = 4
[control]
update = "sgd"
[validation]
limit = 4
[sweep.re_control]
alphas = [0.25, 0.5]
steps = [3]
[sweep.static_re]
scales = [1.0, 4.0]
[sweep.best_of_n]
ns = [2]
temperature = 1.0
[sweep.args]
k = 3
weights = [1.0]
[sweep.value_guided]
k = 3
weights = [1.0, 2.0]
[prompting]
prefix = "Be helpful. "
[ood]
test_fraction = 0.1
limit = 4
"#;

/// `lm pretrain`'s model flags for a tiny model (1 layer, hidden 32, 2 heads, vocabulary 400,
/// sequences of 64 in batches of 4), for tests that train one.
pub const TINY_PRETRAIN: [&str; 12] = [
    "--vocab-size",
    "400",
    "--layers",
    "1",
    "--hidden",
    "32",
    "--heads",
    "2",
    "--seq-len",
    "64",
    "--batch-size",
    "4",
];

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

/// Crash campaigns: a command is killed with SIGKILL at seeded random points and resumed until
/// a run finishes by itself; its outputs must then equal an uninterrupted run's.
pub mod crash {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A resumable job: the command line that writes its outputs into a folder, and how it is
    /// continued after a crash.
    pub struct Job<'a> {
        pub name: &'a str,
        /// The arguments of a fresh run whose outputs go into the folder given.
        pub args: &'a dyn Fn(&Path) -> Vec<String>,
        /// Appended on restarts (`--resume`); `None` for a command that resumes by being rerun
        /// as it is (the demo's stage cache).
        pub resume_flag: Option<&'a str>,
        /// What the folder holds before the job runs (e.g. the store to label), made afresh for
        /// the uninterrupted run and for the campaign.
        pub setup: &'a dyn Fn(&Path),
        /// How a file of the outputs is compared with the uninterrupted run's.
        pub compare: &'a dyn Fn(&Path) -> Compare,
        /// What stderr says when the job is rerun (with its resume flag) on its finished output.
        pub already_complete: &'a str,
        /// How far the job had got, read from the folder after each kill (printed with the
        /// kill times: which stages the kills hit).
        pub progress: &'a dyn Fn(&Path) -> String,
    }

    impl std::fmt::Debug for Job<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Job")
                .field("name", &self.name)
                .field("resume_flag", &self.resume_flag)
                .finish_non_exhaustive()
        }
    }

    /// How one output file of a campaign is compared with the uninterrupted run's.
    pub enum Compare {
        /// Byte for byte.
        Bytes,
        /// As values: the caller's reading of both files must be equal (for formats that embed
        /// a time or the flags of the run, such as `--resume`).
        Values(Box<dyn Fn(&Path) -> String>),
        /// Neither compared nor required (TensorBoard event files: one per run, named by its
        /// start time).
        Ignore,
    }

    impl std::fmt::Debug for Compare {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(match self {
                Self::Bytes => "Bytes",
                Self::Values(_) => "Values",
                Self::Ignore => "Ignore",
            })
        }
    }

    /// What a campaign did.
    #[derive(Debug)]
    pub struct Report {
        /// Seconds of the uninterrupted run.
        pub clean_seconds: f64,
        /// The kill times drawn, in milliseconds after each run's start.
        pub drawn_ms: Vec<u64>,
        /// The kills that landed (the run was still going), in milliseconds, with the job's
        /// progress after each.
        pub landed_ms: Vec<(u64, String)>,
        /// Campaigns run: more than one when fewer than two kills landed (the machine sped up
        /// since the uninterrupted run), each from scratch with a window half as long.
        pub rounds: usize,
        /// Seconds of the whole campaign (the uninterrupted run included).
        pub seconds: f64,
    }

    fn entries(dir: &Path, compare: &dyn Fn(&Path) -> Compare) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
                let path = entry.expect("entry").path();
                let rel = path.strip_prefix(dir).expect("inside").to_owned();
                if matches!(compare(&rel), Compare::Ignore) {
                    continue;
                }
                if path.is_dir() {
                    out.insert(rel, Vec::new());
                    stack.push(path);
                } else {
                    let bytes =
                        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    out.insert(rel, bytes);
                }
            }
        }
        out
    }

    fn command(binary: &str, args: &[String], log: &Path) -> Command {
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env("HDF5_USE_FILE_LOCKING", "FALSE")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("stderr log"));
        cmd
    }

    fn run_to_end(binary: &str, args: &[String], log: &Path) -> String {
        let status = command(binary, args, log).status().expect("spawn");
        let err = std::fs::read_to_string(log).unwrap_or_default();
        assert!(status.success(), "{}: {err}", args.join(" "));
        err
    }

    /// Runs `job` in `work`, killing run `i` at `drawn_ms[i]` after its start and restarting it
    /// with the resume flag, until a run finishes by itself (at the latest the one after the
    /// last kill). Returns the kills that landed, with the job's progress after each.
    fn kill_until_done(
        binary: &str,
        job: &Job<'_>,
        work: &Path,
        log: &Path,
        drawn_ms: &[u64],
    ) -> Vec<(u64, String)> {
        let mut landed_ms = Vec::new();
        for (i, &at) in drawn_ms.iter().enumerate() {
            let args = resumed_args(job, work, i > 0);
            let mut child = command(binary, &args, log).spawn().expect("spawn");
            let deadline = Instant::now() + Duration::from_millis(at);
            let status = loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    break Some(status);
                }
                if Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            let Some(status) = status else {
                child.kill().expect("kill -9");
                child.wait().expect("reap");
                landed_ms.push((at, (job.progress)(work)));
                continue;
            };
            let err = std::fs::read_to_string(log).unwrap_or_default();
            assert!(status.success(), "{}: {err}", args.join(" "));
            return landed_ms;
        }
        run_to_end(binary, &resumed_args(job, work, true), log);
        landed_ms
    }

    /// The job's arguments, with its resume flag if `resume`.
    fn resumed_args(job: &Job<'_>, work: &Path, resume: bool) -> Vec<String> {
        let mut args = (job.args)(work);
        if let (true, Some(flag)) = (resume, job.resume_flag) {
            args.push(flag.to_owned());
        }
        args
    }

    /// Runs `job` once uninterrupted in `root/clean` and times it (`d`); then in `root/work`
    /// runs it again and kills it `kills` times, each at a time drawn (seeded by `seed`)
    /// uniformly within `(0, d/2)` after that run's start, restarting it at once with the resume
    /// flag, until a run finishes by itself (at the latest the one after the last kill). Within
    /// the first half, so that the first two kills land (a resumed run still has at least half
    /// the work ahead of it); each run starts further along, so later kills reach the end of
    /// the job (the final merge or rename). If the machine sped up since the uninterrupted run
    /// and fewer than two kills landed, the campaign starts over with a window half as long
    /// (at most four rounds). Asserts that at least two kills landed, that the two folders hold the same files (nothing left behind or
    /// missing), equal as `job.compare` says, and that one more run with the resume flag on the
    /// finished output succeeds, says `job.already_complete` and leaves every file
    /// byte-identical.
    pub fn campaign(binary: &str, root: &Path, job: &Job<'_>, seed: u64, kills: usize) -> Report {
        let started = Instant::now();
        let clean = root.join("clean");
        let work = root.join("work");
        let log = root.join(format!("{}.stderr", job.name));
        std::fs::create_dir_all(&work).expect("mkdir");
        (job.setup)(&work);
        let t = Instant::now();
        run_to_end(binary, &(job.args)(&work), &log);
        let clean_seconds = t.elapsed().as_secs_f64();
        std::fs::rename(&work, &clean).expect("rename");
        std::fs::create_dir_all(&work).expect("mkdir");
        (job.setup)(&work);

        let mut rng = StdRng::seed_from_u64(seed);
        let mut window_ms = (clean_seconds * 500.0) as u64;
        let mut rounds = 0;
        let (drawn_ms, landed_ms) = loop {
            rounds += 1;
            let drawn_ms: Vec<u64> = (0..kills)
                .map(|_| rng.random_range(1..window_ms.max(2)))
                .collect();
            let landed_ms = kill_until_done(binary, job, &work, &log, &drawn_ms);
            println!(
                "{}: seed {seed}, uninterrupted run {clean_seconds:.1} s, kill times drawn (ms \
                 after each run's start) {drawn_ms:?}, landed (with the progress they left) \
                 {landed_ms:?}",
                job.name
            );
            if landed_ms.len() >= 2 || rounds == 4 {
                break (drawn_ms, landed_ms);
            }
            // The machine got faster than it was during the uninterrupted run: again from
            // scratch, with a window half as long (the seeded draws go on).
            std::fs::remove_dir_all(&work).expect("remove");
            std::fs::create_dir_all(&work).expect("mkdir");
            (job.setup)(&work);
            window_ms /= 2;
        };
        assert!(
            landed_ms.len() >= 2,
            "{}: only {} kills landed ({landed_ms:?} of {drawn_ms:?}): the campaign proves nothing",
            job.name,
            landed_ms.len()
        );

        let want = entries(&clean, job.compare);
        let got = entries(&work, job.compare);
        let names = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(&got),
            names(&want),
            "{}: the files after {} kills differ from an uninterrupted run's",
            job.name,
            landed_ms.len()
        );
        let differ: Vec<String> = got
            .iter()
            .filter(|(rel, bytes)| match (job.compare)(rel) {
                Compare::Bytes => **bytes != want[*rel],
                Compare::Values(read) => read(&work.join(rel)) != read(&clean.join(rel)),
                Compare::Ignore => false,
            })
            .map(|(rel, _)| rel.display().to_string())
            .collect();
        assert!(
            differ.is_empty(),
            "{}: after kills at {landed_ms:?} ms these differ from the uninterrupted run's: {differ:?}",
            job.name
        );

        // A requeued job that had finished: a no-op success.
        let everything = entries(&work, &|_| Compare::Bytes);
        let err = run_to_end(binary, &resumed_args(job, &work, true), &log);
        assert!(
            err.contains(job.already_complete),
            "{}: rerun on the finished output: {err}",
            job.name
        );
        assert!(
            entries(&work, &|_| Compare::Bytes) == everything,
            "{}: a rerun on the finished output changed it",
            job.name
        );
        Report {
            clean_seconds,
            drawn_ms,
            landed_ms,
            rounds,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}
