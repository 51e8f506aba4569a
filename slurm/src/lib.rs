//! Stages as Slurm job arrays.
//!
//! A stage that splits into shards (`rollout --shard K/N`) runs as an array of N tasks, each
//! taking its shard from the scheduler (`--shard auto`: `SLURM_ARRAY_TASK_ID` of
//! `SLURM_ARRAY_TASK_COUNT`) and resuming whatever an earlier attempt left (`--resume`), so a
//! preempted and requeued task continues its shard and a task whose shard is complete exits 0.
//! A second job, which starts only when every task succeeded (`--dependency=afterok`), merges
//! the shards. [`RolloutArray`] writes both sbatch scripts; [`submit`] hands them to `sbatch`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use recontrol_data::selection::Shard;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--shard auto: {0} is not set: not a task of a Slurm job array (give --shard K/N)")]
    NotInArray(&'static str),
    #[error("--shard auto: {name}={value:?} is not a whole number")]
    BadVariable { name: &'static str, value: String },
    #[error("--shard auto: task {task} of an array of {count} tasks starting at {min}")]
    OutOfRange { task: u64, min: u64, count: u64 },
    #[error("--tasks must be at least 1")]
    NoTasks,
    #[error("{flag} {value:?}: {why}")]
    BadFlag {
        flag: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{0}: cannot be quoted for a shell script (it holds a NUL byte)")]
    Unquotable(String),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] recontrol_io::Error),
    #[error("{program}: could not run it ({error}); is Slurm installed and SLURM_CONF set?")]
    NoSbatch {
        program: String,
        error: std::io::Error,
    },
    #[error("sbatch {script}: {stderr}")]
    Rejected { script: PathBuf, stderr: String },
    #[error("sbatch {script}: printed no job id ({stdout:?})")]
    NoJobId { script: PathBuf, stdout: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `--shard`: a fixed `K/N`, or `auto` (the array task's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSpec {
    Fixed(Shard),
    Auto,
}

impl std::str::FromStr for ShardSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            Ok(Self::Auto)
        } else {
            s.parse()
                .map(Self::Fixed)
                .map_err(|e| format!("{e} or \"auto\""))
        }
    }
}

impl std::fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(s) => write!(f, "{}/{}", s.index, s.count),
            Self::Auto => f.write_str("auto"),
        }
    }
}

/// Recorded as written on the command line (`"auto"` or `"K/N"`).
impl Serialize for ShardSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl ShardSpec {
    /// The shard: a fixed one as given, `auto` from the Slurm variables that `env` reads.
    pub fn resolve(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Shard> {
        match self {
            Self::Fixed(shard) => Ok(shard),
            Self::Auto => shard_from_env(env),
        }
    }
}

/// This array task's shard: task `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` (the minimum is 0
/// when unset) of `SLURM_ARRAY_TASK_COUNT`.
pub fn shard_from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Shard> {
    let read = |name: &'static str| -> Result<Option<u64>> {
        env(name)
            .map(|value| {
                value
                    .trim()
                    .parse()
                    .map_err(|_| Error::BadVariable { name, value })
            })
            .transpose()
    };
    let task = read("SLURM_ARRAY_TASK_ID")?.ok_or(Error::NotInArray("SLURM_ARRAY_TASK_ID"))?;
    let count =
        read("SLURM_ARRAY_TASK_COUNT")?.ok_or(Error::NotInArray("SLURM_ARRAY_TASK_COUNT"))?;
    let min = read("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
    let index = task
        .checked_sub(min)
        .filter(|&k| k < count)
        .ok_or(Error::OutOfRange { task, min, count })?;
    Ok(Shard {
        index: index as usize,
        count: count as usize,
    })
}

/// What the scheduler is asked for, per task (each `None` is left to the cluster's defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub partition: Option<String>,
    pub gpus_per_task: Option<u32>,
    pub cpus_per_task: Option<u32>,
    /// Slurm's time format, e.g. `4:00:00` or `1-00:00:00`.
    pub time: Option<String>,
    /// Further `#SBATCH` options, e.g. `--account=abc` or `--qos=high`, one per entry.
    pub extra_sbatch: Vec<String>,
}

impl Resources {
    /// Refuses values that would break a script line (newlines) or are not sbatch options.
    pub fn check(&self) -> Result<()> {
        let line = |flag: &'static str, value: &str| -> Result<()> {
            if value.is_empty() || value.contains(['\n', '\r']) {
                return Err(Error::BadFlag {
                    flag,
                    value: value.to_owned(),
                    why: "must be one non-empty line",
                });
            }
            Ok(())
        };
        if let Some(p) = &self.partition {
            line("--partition", p)?;
        }
        if let Some(t) = &self.time {
            line("--time", t)?;
        }
        for extra in &self.extra_sbatch {
            line("--extra-sbatch", extra)?;
            if !extra.starts_with('-') {
                return Err(Error::BadFlag {
                    flag: "--extra-sbatch",
                    value: extra.clone(),
                    why: "expected an sbatch option such as --account=abc",
                });
            }
        }
        Ok(())
    }

    fn directives(&self, out: &mut String) {
        let mut add = |option: String| {
            let _ = writeln!(out, "#SBATCH {option}");
        };
        if let Some(p) = &self.partition {
            add(format!("--partition={p}"));
        }
        if let Some(g) = self.gpus_per_task {
            add(format!("--gpus-per-task={g}"));
        }
        if let Some(c) = self.cpus_per_task {
            add(format!("--cpus-per-task={c}"));
        }
        if let Some(t) = &self.time {
            add(format!("--time={t}"));
        }
        for extra in &self.extra_sbatch {
            add(extra.clone());
        }
    }
}

/// Labelling each shard right after its rollouts, with `reward label --resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabelStep {
    /// A reward-model directory or a rules `.toml` file.
    pub reward: PathBuf,
    /// Further `reward label` flags (e.g. `--device cuda`).
    pub args: Vec<String>,
}

/// `rollout` as a job array: task K rolls out shard K of N into its own store (and labels it),
/// and a dependent job merges the N stores into `out`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutArray {
    /// The `recontrol` executable the tasks run (an absolute path on the shared disk).
    pub recontrol: PathBuf,
    /// The `rollout` flags, without `--out`, `--shard` and `--resume` (which the array sets).
    pub rollout_args: Vec<String>,
    /// The merged store.
    pub out: PathBuf,
    /// Where the jobs run (relative paths among the flags are relative to it).
    pub workdir: PathBuf,
    pub label: Option<LabelStep>,
    pub tasks: usize,
    pub resources: Resources,
}

/// The two sbatch scripts of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scripts {
    pub array: String,
    pub merge: String,
}

fn quote(word: &str) -> Result<String> {
    shlex::try_quote(word)
        .map(|q| q.into_owned())
        .map_err(|_| Error::Unquotable(word.to_owned()))
}

fn quote_path(path: &Path) -> Result<String> {
    quote(&path.display().to_string())
}

fn command_line(words: &[String]) -> Result<String> {
    Ok(words
        .iter()
        .map(|w| quote(w))
        .collect::<Result<Vec<_>>>()?
        .join(" "))
}

impl RolloutArray {
    /// `OUT.slurm/`: the scripts, `shards/` and `logs/`.
    pub fn dir(&self) -> PathBuf {
        recontrol_io::sibling(&self.out, ".slurm")
    }

    /// Task `k`'s store.
    pub fn shard_store(&self, k: usize) -> PathBuf {
        self.dir().join("shards").join(format!("shard-{k}.h5"))
    }

    fn job_name(&self) -> String {
        let stem = self
            .out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("recontrol-rollout-{stem}")
    }

    /// The array script and the merge script.
    pub fn scripts(&self) -> Result<Scripts> {
        if self.tasks == 0 {
            return Err(Error::NoTasks);
        }
        self.resources.check()?;
        for word in &self.rollout_args {
            let flag = word.split('=').next().unwrap_or(word);
            if matches!(flag, "--out" | "--shard" | "--resume") {
                return Err(Error::BadFlag {
                    flag: "rollout flags",
                    value: word.clone(),
                    why: "set by the job array itself; leave it out",
                });
            }
        }
        // `#SBATCH` lines are not shell words: paths named there must not hold blanks.
        for (flag, path) in [
            ("--out", &self.out),
            ("the working directory", &self.workdir),
        ] {
            let text = path.display().to_string();
            if text.chars().any(char::is_whitespace) {
                return Err(Error::BadFlag {
                    flag,
                    value: text,
                    why: "#SBATCH lines cannot name a path with blanks",
                });
            }
        }
        let dir = self.dir();
        let logs = dir.join("logs");
        let recontrol = quote_path(&self.recontrol)?;
        let shards = quote_path(&dir.join("shards"))?;
        let name = self.job_name();

        let mut array = String::from("#!/bin/bash\n");
        let _ = writeln!(
            array,
            "# Written by `recontrol slurm submit rollout`: task K of {n} rolls out shard K/{n}\n\
             # into shards/shard-K.h5, resuming what an earlier attempt left (a preempted task is\n\
             # requeued and continues; a task whose shard is complete exits 0).",
            n = self.tasks
        );
        let _ = writeln!(array, "#SBATCH --job-name={name}");
        let _ = writeln!(array, "#SBATCH --array=0-{}", self.tasks - 1);
        let _ = writeln!(array, "#SBATCH --requeue");
        let _ = writeln!(array, "#SBATCH --open-mode=append");
        let _ = writeln!(array, "#SBATCH --chdir={}", self.workdir.display());
        let _ = writeln!(
            array,
            "#SBATCH --output={}",
            logs.join("rollout-%A_%a.out").display()
        );
        self.resources.directives(&mut array);
        let _ = writeln!(array, "set -euo pipefail");
        let _ = writeln!(array, "mkdir -p {shards}");
        let _ = writeln!(array, "shard={shards}/shard-\"$SLURM_ARRAY_TASK_ID\".h5");
        let _ = writeln!(
            array,
            "echo \"task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT, attempt $((${{SLURM_RESTART_COUNT:-0}} + 1)), on $(hostname)\""
        );
        let _ = writeln!(
            array,
            "{recontrol} rollout {} --shard auto --resume --out \"$shard\"",
            command_line(&self.rollout_args)?
        );
        if let Some(label) = &self.label {
            let _ = writeln!(
                array,
                "{recontrol} reward label --reward {} --rollouts \"$shard\" --resume{}{}",
                quote_path(&label.reward)?,
                if label.args.is_empty() { "" } else { " " },
                command_line(&label.args)?
            );
        }

        let mut merge = String::from("#!/bin/bash\n");
        let _ = writeln!(
            merge,
            "# Written by `recontrol slurm submit rollout`: merges the {} shard stores into\n\
             # {} once every task of the array succeeded (submitted with\n\
             # --dependency=afterok on the array). A rerun after a complete merge does nothing.",
            self.tasks,
            self.out.display()
        );
        let _ = writeln!(merge, "#SBATCH --job-name={name}-merge");
        let _ = writeln!(merge, "#SBATCH --requeue");
        let _ = writeln!(merge, "#SBATCH --open-mode=append");
        let _ = writeln!(merge, "#SBATCH --chdir={}", self.workdir.display());
        let _ = writeln!(
            merge,
            "#SBATCH --output={}",
            logs.join("merge-%j.out").display()
        );
        if let Some(p) = &self.resources.partition {
            let _ = writeln!(merge, "#SBATCH --partition={p}");
        }
        for extra in &self.resources.extra_sbatch {
            let _ = writeln!(merge, "#SBATCH {extra}");
        }
        let _ = writeln!(merge, "set -euo pipefail");
        let out = quote_path(&self.out)?;
        let _ = writeln!(
            merge,
            "if [ -e {out} ]; then echo \"{} exists: already merged\"; exit 0; fi",
            self.out.display()
        );
        let stores = (0..self.tasks)
            .map(|k| quote_path(&self.shard_store(k)))
            .collect::<Result<Vec<_>>>()?
            .join(" ");
        let _ = writeln!(merge, "{recontrol} rollout merge {stores} --out {out}");
        Ok(Scripts { array, merge })
    }
}

/// Where [`write_scripts`] put the scripts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScriptPaths {
    pub array: PathBuf,
    pub merge: PathBuf,
}

/// Writes `array.sbatch` and `merge.sbatch` into `dir` (each atomically), with `dir/logs/`.
pub fn write_scripts(dir: &Path, scripts: &Scripts) -> Result<ScriptPaths> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|error| Error::Io { path: logs, error })?;
    let paths = ScriptPaths {
        array: dir.join("array.sbatch"),
        merge: dir.join("merge.sbatch"),
    };
    recontrol_io::write_atomic(&paths.array, scripts.array.as_bytes())?;
    recontrol_io::write_atomic(&paths.merge, scripts.merge.as_bytes())?;
    Ok(paths)
}

/// The job ids of a submitted stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Submitted {
    pub array: String,
    pub merge: String,
}

/// Submits the array, then the merge with `--dependency=afterok` on it, with `sbatch` (the
/// program's name or path).
pub fn submit(paths: &ScriptPaths, sbatch: &str) -> Result<Submitted> {
    let array = run_sbatch(sbatch, &[], &paths.array)?;
    let merge = run_sbatch(
        sbatch,
        &[format!("--dependency=afterok:{array}")],
        &paths.merge,
    )?;
    Ok(Submitted { array, merge })
}

/// Runs `sbatch --parsable [args] script` and returns the job id (`--parsable` prints
/// `id` or `id;cluster`).
fn run_sbatch(sbatch: &str, args: &[String], script: &Path) -> Result<String> {
    let output = Command::new(sbatch)
        .arg("--parsable")
        .args(args)
        .arg(script)
        .output()
        .map_err(|error| Error::NoSbatch {
            program: sbatch.to_owned(),
            error,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Error::Rejected {
            script: script.to_owned(),
            stderr: stderr.lines().next().unwrap_or("failed").to_owned(),
        });
    }
    let id = stdout.split(';').next().unwrap_or("").trim();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(Error::NoJobId {
            script: script.to_owned(),
            stdout,
        });
    }
    Ok(id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn auto_shards_come_from_the_array_task() {
        let shard = |vars: &[(&str, &str)]| ShardSpec::Auto.resolve(&env(vars));
        assert_eq!(
            shard(&[
                ("SLURM_ARRAY_TASK_ID", "2"),
                ("SLURM_ARRAY_TASK_COUNT", "4")
            ])
            .ok(),
            Some(Shard { index: 2, count: 4 })
        );
        // Arrays numbered from 1 (--array=1-4).
        assert_eq!(
            shard(&[
                ("SLURM_ARRAY_TASK_ID", "4"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_MIN", "1")
            ])
            .ok(),
            Some(Shard { index: 3, count: 4 })
        );
        let err = shard(&[]).expect_err("no array").to_string();
        assert!(err.contains("SLURM_ARRAY_TASK_ID is not set"), "{err}");
        assert!(err.contains("--shard K/N"), "{err}");
        let err = shard(&[
            ("SLURM_ARRAY_TASK_ID", "x"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ])
        .expect_err("not a number")
        .to_string();
        assert!(err.contains("SLURM_ARRAY_TASK_ID=\"x\""), "{err}");
        let err = shard(&[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ])
        .expect_err("out of range")
        .to_string();
        assert!(err.contains("task 4 of an array of 4"), "{err}");
        // A fixed shard ignores the environment.
        let fixed: ShardSpec = "1/3".parse().expect("K/N");
        assert_eq!(
            fixed.resolve(&env(&[])).ok(),
            Some(Shard { index: 1, count: 3 })
        );
        assert!("3/3".parse::<ShardSpec>().is_err());
        assert!("automatic".parse::<ShardSpec>().is_err());
    }

    fn array() -> RolloutArray {
        RolloutArray {
            recontrol: "/opt/recontrol bin/recontrol".into(),
            rollout_args: vec![
                "--model".into(),
                "/models/m".into(),
                "--instruction".into(),
                "Be kind; don't lie".into(),
            ],
            out: "/data/run/rollouts.h5".into(),
            workdir: "/data/run".into(),
            label: Some(LabelStep {
                reward: "/data/rm".into(),
                args: vec!["--chunk".into(), "32".into()],
            }),
            tasks: 4,
            resources: Resources {
                partition: Some("gpu".into()),
                gpus_per_task: Some(1),
                cpus_per_task: None,
                time: Some("2:00:00".into()),
                extra_sbatch: vec!["--account=lab".into()],
            },
        }
    }

    #[test]
    fn the_array_script_resumes_its_shard_and_the_merge_waits_for_it() {
        let scripts = array().scripts().expect("scripts");
        let a = &scripts.array;
        for line in [
            "#SBATCH --array=0-3",
            "#SBATCH --requeue",
            "#SBATCH --open-mode=append",
            "#SBATCH --chdir=/data/run",
            "#SBATCH --partition=gpu",
            "#SBATCH --gpus-per-task=1",
            "#SBATCH --time=2:00:00",
            "#SBATCH --account=lab",
            "#SBATCH --output=/data/run/rollouts.h5.slurm/logs/rollout-%A_%a.out",
            "shard=/data/run/rollouts.h5.slurm/shards/shard-\"$SLURM_ARRAY_TASK_ID\".h5",
            "'/opt/recontrol bin/recontrol' rollout --model /models/m --instruction \"Be kind; don't lie\" --shard auto --resume --out \"$shard\"",
            "'/opt/recontrol bin/recontrol' reward label --reward /data/rm --rollouts \"$shard\" --resume --chunk 32",
        ] {
            assert!(a.lines().any(|l| l == line), "missing {line:?} in\n{a}");
        }
        let m = &scripts.merge;
        assert!(m.contains("rollout merge /data/run/rollouts.h5.slurm/shards/shard-0.h5 /data/run/rollouts.h5.slurm/shards/shard-1.h5 /data/run/rollouts.h5.slurm/shards/shard-2.h5 /data/run/rollouts.h5.slurm/shards/shard-3.h5 --out /data/run/rollouts.h5"), "{m}");
        assert!(m.contains("if [ -e /data/run/rollouts.h5 ]"), "{m}");
        assert!(!m.contains("--array"), "{m}");
    }

    #[test]
    fn quoted_words_reach_the_command_unchanged() {
        let words: Vec<String> = [
            "plain",
            "two words",
            "don't",
            "$HOME `id` \\ \"q\"",
            "semi;colon|pipe&amp>redirect",
            "new\nline",
            "",
        ]
        .iter()
        .map(|w| (*w).to_owned())
        .collect();
        let line = command_line(&words).expect("quotable");
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("printf '%s\\0' {line}"))
            .output()
            .expect("bash");
        assert!(out.status.success());
        let got: Vec<String> = String::from_utf8(out.stdout)
            .expect("utf-8")
            .split_terminator('\0')
            .map(str::to_owned)
            .collect();
        assert_eq!(got, words);
        assert!(quote("nul\0byte").is_err());
    }

    #[test]
    fn flags_the_array_sets_and_broken_options_are_refused() {
        for word in ["--out", "--shard=1/2", "--resume"] {
            let mut a = array();
            a.rollout_args.push(word.into());
            let err = a.scripts().expect_err(word).to_string();
            assert!(err.contains("set by the job array itself"), "{err}");
        }
        let mut a = array();
        a.resources.extra_sbatch = vec!["account=lab".into()];
        assert!(a
            .scripts()
            .expect_err("not an option")
            .to_string()
            .contains("--extra-sbatch"));
        let mut a = array();
        a.resources.partition = Some("gpu\nrm -rf /".into());
        assert!(a
            .scripts()
            .expect_err("two lines")
            .to_string()
            .contains("one non-empty line"));
        let mut a = array();
        a.tasks = 0;
        assert!(matches!(a.scripts(), Err(Error::NoTasks)));
    }

    #[test]
    fn submission_chains_the_merge_after_the_array() {
        // A stand-in sbatch that logs its arguments and answers like `sbatch --parsable`.
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("calls");
        let fake = dir.path().join("sbatch");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\nn=$(wc -l < {})\necho \"$((100 + n));cluster\"\n",
                log.display(),
                log.display()
            ),
        )
        .expect("write");
        let status = Command::new("chmod")
            .arg("+x")
            .arg(&fake)
            .status()
            .expect("chmod");
        assert!(status.success());
        let scripts = array().scripts().expect("scripts");
        let paths = write_scripts(&dir.path().join("rollouts.h5.slurm"), &scripts).expect("write");
        let submitted = submit(&paths, &fake.display().to_string()).expect("submit");
        assert_eq!(
            submitted,
            Submitted {
                array: "101".into(),
                merge: "102".into()
            }
        );
        let calls = std::fs::read_to_string(&log).expect("log");
        let calls: Vec<&str> = calls.lines().collect();
        assert_eq!(
            calls,
            vec![
                format!("--parsable {}", paths.array.display()),
                format!(
                    "--parsable --dependency=afterok:101 {}",
                    paths.merge.display()
                ),
            ]
        );
        let err = submit(&paths, "/nonexistent/sbatch").expect_err("no sbatch");
        assert!(err.to_string().contains("is Slurm installed"), "{err}");
    }
}
