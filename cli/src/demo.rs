//! `recontrol demo`: the whole RE-Control pipeline on the embedded default, one command.
//!
//! Stages (each a recontrol subcommand run in this process, configured by `cli/demo.toml` or
//! `--config`): pretrain the small default model -> rollouts on train prompts -> reward model
//! from train pairs -> label -> value net -> export -> held-out prompts -> generate with base,
//! prompting, RE-Control, RE-Control + prompting -> eval report; then the same value net on
//! HarmfulQA questions (out of distribution). A stage whose command line and inputs are
//! unchanged since its last complete run is skipped; an interrupted training stage resumes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::args::DeviceArgs;
use recontrol_io::work_dir;

/// The bundled data, embedded so that the demo needs nothing beside the binary.
const HH: &[u8] = include_bytes!("../../data/bundled/hh-rlhf/harmless-base/test.jsonl.gz");
const HARMFULQA: &[u8] = include_bytes!("../../data/bundled/harmfulqa/harmfulqa.json");
/// The default configuration (under version control as `cli/demo.toml`).
const DEFAULT_CONFIG: &str = include_str!("../demo.toml");

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output folder: every artifact, logs/ (TensorBoard), report/ and report-ood/.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// A stage configuration (default: the embedded cli/demo.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stage {
    args: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Prompting {
    prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoConfig {
    pretrain: Stage,
    rollout: Stage,
    reward: Stage,
    value: Stage,
    export: Stage,
    prompts: Stage,
    generate: Stage,
    control: Stage,
    prompting: Prompting,
    ood: Stage,
}

/// Runs stages, skipping those whose key (command line + inputs' keys) has a complete stamp.
struct Runner {
    out: PathBuf,
    device: Vec<String>,
    done: usize,
    total: usize,
    started: Instant,
}

impl Runner {
    /// Runs `argv` (a recontrol command line) unless `output` exists with a stamp for the same
    /// key; returns the key for the stages that read `output`.
    fn stage(
        &mut self,
        name: &str,
        output: &Path,
        argv: Vec<String>,
        inputs: &[&str],
        resumable: bool,
    ) -> Result<String> {
        self.stage_with(name, output, argv, inputs, resumable, &|| Ok(()))
    }

    /// [`Runner::stage`] with `prepare` run (after clearing a stale output) before the command.
    fn stage_with(
        &mut self,
        name: &str,
        output: &Path,
        argv: Vec<String>,
        inputs: &[&str],
        resumable: bool,
        prepare: &dyn Fn() -> Result<()>,
    ) -> Result<String> {
        self.done += 1;
        let mut hasher = Sha256::new();
        for part in argv
            .iter()
            .map(String::as_str)
            .chain(inputs.iter().copied())
        {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        let key = format!("{:x}", hasher.finalize());
        let stamps = self.out.join(".stamps");
        std::fs::create_dir_all(&stamps)?;
        let (stamp, pending) = (stamps.join(name), stamps.join(format!("{name}.pending")));
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let prefix = format!("[{}/{}] {name}", self.done, self.total);
        if output.exists() && read(&stamp) == key {
            eprintln!("{prefix}: unchanged, skipped");
            return Ok(key);
        }
        let resume = resumable && read(&pending) == key;
        remove(output)?;
        if !resume {
            remove(&work_dir(output))?;
            remove(&recontrol_data::rollout::parts_dir(output))?;
        }
        std::fs::write(&pending, &key)?;
        let _ = std::fs::remove_file(&stamp);
        prepare()?;
        let mut argv = argv;
        if resume {
            argv.push("--resume".into());
        }
        eprintln!(
            "{prefix}: recontrol {}  ({:.0} s so far)",
            argv.join(" "),
            self.started.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let cli = crate::Cli::try_parse_from(std::iter::once("recontrol".to_owned()).chain(argv))
            .map_err(|e| {
            anyhow::anyhow!("the demo configuration gives `{name}` bad flags: {e}")
        })?;
        crate::dispatch(cli).with_context(|| format!("demo stage {name}"))?;
        std::fs::write(&stamp, &key)?;
        let _ = std::fs::remove_file(&pending);
        eprintln!("{prefix}: done in {:.0} s", t.elapsed().as_secs_f64());
        Ok(key)
    }
}

fn remove(path: &Path) -> Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)?;
    } else if path.exists() {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn with(base: &[&str], extra: &[String]) -> Vec<String> {
    base.iter()
        .map(|x| (*x).to_owned())
        .chain(extra.iter().cloned())
        .collect()
}

impl DemoArgs {
    pub fn run(self) -> Result<()> {
        let text = match &self.config {
            Some(p) => {
                std::fs::read_to_string(p).with_context(|| format!("--config {}", p.display()))?
            }
            None => DEFAULT_CONFIG.to_owned(),
        };
        let config: DemoConfig = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "--config {}: {}",
                self.config
                    .as_deref()
                    .map_or("(embedded)".into(), |p| p.display().to_string()),
                e.to_string().replace('\n', " ")
            )
        })?;
        let out = &self.out;
        std::fs::create_dir_all(out.join("data"))
            .with_context(|| format!("--out {}", out.display()))?;
        let hh = out.join("data/hh-rlhf-harmless-base.jsonl.gz");
        let harmfulqa = out.join("data/harmfulqa.json");
        for (path, bytes) in [(&hh, HH), (&harmfulqa, HARMFULQA)] {
            if std::fs::read(path).ok().as_deref() != Some(bytes) {
                std::fs::write(path, bytes)?;
            }
        }
        let mut r = Runner {
            out: out.clone(),
            device: vec!["--device".to_owned(), self.device.device.to_string()],
            done: 0,
            total: 16,
            started: Instant::now(),
        };
        let dev = |mut v: Vec<String>, r: &Runner| {
            v.extend(r.device.iter().cloned());
            v
        };
        let p = |name: &str| out.join(name);
        let logs = |name: &str| s(&out.join("logs").join(name));

        let model = p("model");
        let k_model = r.stage(
            "pretrain",
            &model,
            dev(
                with(
                    &[
                        "lm",
                        "pretrain",
                        "--corpus",
                        &s(&hh),
                        "--out",
                        &s(&model),
                        "--logdir",
                        &logs("pretrain"),
                    ],
                    &config.pretrain.args,
                ),
                &r,
            ),
            &[],
            true,
        )?;
        let rollouts = p("rollouts.h5");
        let k_rollout = r.stage(
            "rollout",
            &rollouts,
            dev(
                with(
                    &[
                        "rollout",
                        "--model",
                        &s(&model),
                        "--dataset",
                        &s(&hh),
                        "--split",
                        "train",
                        "--out",
                        &s(&rollouts),
                    ],
                    &config.rollout.args,
                ),
                &r,
            ),
            &[&k_model],
            true,
        )?;
        let reward = p("reward");
        let k_reward = r.stage(
            "reward",
            &reward,
            dev(
                with(
                    &[
                        "reward",
                        "train",
                        "--model",
                        &s(&model),
                        "--pairs",
                        &s(&hh),
                        "--out",
                        &s(&reward),
                        "--logdir",
                        &logs("reward"),
                    ],
                    &config.reward.args,
                ),
                &r,
            ),
            &[&k_model],
            true,
        )?;
        // Labels go into a copy of the rollouts, so that a new reward relabels them without
        // new rollouts.
        let labelled = p("labelled.h5");
        let k_label = r.stage_with(
            "label",
            &labelled,
            dev(
                vec![
                    "reward".into(),
                    "label".into(),
                    "--reward".into(),
                    s(&reward),
                    "--rollouts".into(),
                    s(&labelled),
                    "--overwrite".into(),
                ],
                &r,
            ),
            &[&k_rollout, &k_reward],
            false,
            &|| {
                std::fs::copy(&rollouts, &labelled)
                    .map(|_| ())
                    .with_context(|| {
                        format!("copying {} to {}", rollouts.display(), labelled.display())
                    })
            },
        )?;
        let value = p("value");
        let k_value = r.stage(
            "value",
            &value,
            dev(
                with(
                    &[
                        "value",
                        "train",
                        "--rollouts",
                        &s(&labelled),
                        "--out",
                        &s(&value),
                        "--logdir",
                        &logs("value"),
                    ],
                    &config.value.args,
                ),
                &r,
            ),
            &[&k_label],
            true,
        )?;
        let onnx = p("onnx");
        let k_export = r.stage(
            "export",
            &onnx,
            with(
                &["export", "--value", &s(&value), "--out", &s(&onnx)],
                &config.export.args,
            ),
            &[&k_value],
            false,
        )?;
        let prompts = p("prompts.jsonl");
        let k_prompts = r.stage(
            "prompts",
            &prompts,
            with(
                &[
                    "data",
                    "prompts",
                    &s(&hh),
                    "--split",
                    "test",
                    "--out",
                    &s(&prompts),
                ],
                &config.prompts.args,
            ),
            &[],
            false,
        )?;
        let ood_prompts = p("prompts-harmfulqa.jsonl");
        let k_ood = r.stage(
            "ood-prompts",
            &ood_prompts,
            with(
                &[
                    "data",
                    "prompts",
                    &s(&harmfulqa),
                    "--split",
                    "test",
                    "--out",
                    &s(&ood_prompts),
                ],
                &config.ood.args,
            ),
            &[],
            false,
        )?;

        let methods = ["base", "prompting", "re-control", "re-control+prompting"];
        let generate = |r: &mut Runner,
                        set: &str,
                        prompts: &Path,
                        k_prompts: &str,
                        method: &str|
         -> Result<(PathBuf, String)> {
            let file = p(&format!("generations/{set}/{method}.jsonl"));
            std::fs::create_dir_all(file.parent().unwrap_or(out))?;
            let mut argv = with(
                &[
                    "generate",
                    "--model",
                    &s(&model),
                    "--prompts",
                    &s(prompts),
                    "--out",
                    &s(&file),
                ],
                &config.generate.args,
            );
            if method.starts_with("re-control") {
                argv.extend(["--value".to_owned(), s(&onnx)]);
                argv.extend(config.control.args.iter().cloned());
            }
            if method.ends_with("prompting") {
                argv.extend([
                    "--prompt-prefix".to_owned(),
                    config.prompting.prefix.clone(),
                ]);
            }
            let key = r.stage(
                &format!("generate-{set}-{method}"),
                &file,
                dev(argv, r),
                &[&k_model, &k_export, k_prompts],
                false,
            )?;
            Ok((file, key))
        };
        let mut files = Vec::new();
        for m in methods {
            files.push(generate(&mut r, "hh", &prompts, &k_prompts, m)?);
        }
        let mut ood_files = Vec::new();
        for m in ["base", "re-control"] {
            ood_files.push(generate(&mut r, "harmfulqa", &ood_prompts, &k_ood, m)?);
        }
        let eval = |r: &mut Runner,
                    name: &str,
                    files: &[(PathBuf, String)],
                    names: &[&str],
                    reference: Option<&Path>|
         -> Result<()> {
            let report = p(name);
            let mut argv = vec!["eval".to_owned(), "--generations".to_owned()];
            argv.extend(files.iter().map(|(f, _)| s(f)));
            argv.extend([
                "--names".to_owned(),
                names.join(","),
                "--reward".to_owned(),
                s(&reward),
                "--coherence-model".to_owned(),
                s(&model),
                "--out".to_owned(),
                s(&report),
            ]);
            if let Some(reference) = reference {
                argv.extend(["--reference".to_owned(), s(reference)]);
            }
            let keys: Vec<&str> = files
                .iter()
                .map(|(_, k)| k.as_str())
                .chain([k_reward.as_str()])
                .collect();
            r.stage(name, &report, dev(argv, r), &keys, false)?;
            Ok(())
        };
        eval(&mut r, "report", &files, &methods, Some(&prompts))?;
        eval(
            &mut r,
            "report-ood",
            &ood_files,
            &["base", "re-control"],
            None,
        )?;

        for (title, dir) in [
            ("HH-RLHF (held-out test prompts)", "report"),
            ("HarmfulQA (out of distribution)", "report-ood"),
        ] {
            let md = std::fs::read_to_string(p(dir).join("report.md")).unwrap_or_default();
            let table: String = md
                .lines()
                .filter(|l| l.starts_with('|'))
                .map(|l| format!("{l}\n"))
                .collect();
            println!("{title}\n{table}");
        }
        println!(
            "demo complete in {:.0} s: {} (TensorBoard: {})",
            r.started.elapsed().as_secs_f64(),
            p("report/report.md").display(),
            p("logs").display()
        );
        Ok(())
    }
}
