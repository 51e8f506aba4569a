//! Running the chain: stage keys, stamps, skipping and resuming, and each stage as the library
//! call that does its work.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use recontrol_controller::generation::SinkError;
use recontrol_controller::generation::{open_value_backend, ValueOptions};
use recontrol_controller::{
    generate_records, ArgsReward, GenerationPlan, GradientBackend, Method as DecodingMethod,
    SteeringVector,
};
use recontrol_data::selection::{prompt_lines, LineRendering};
use recontrol_data::{Dataset, PromptFormat, ReadOptions, Store};
use recontrol_eval::{
    evaluate, read_references, write_report, CoherenceEncoder, Judges, MethodGenerations, Report,
};
use recontrol_export::{write_export, Producer, ValueDir};
use recontrol_io::{AtomicDir, JsonlSink, Provenance, WorkDirs};
use recontrol_lm::{model_identity, DType, DeviceSpec, LanguageModel};
use recontrol_reward_model::stage::{
    epoch_scalars as reward_scalars, label_start, label_store, prepare_training_pairs,
    train_reward, LabelMode, RewardOutcome, RewardSummary,
};
use recontrol_reward_model::{load_reward, FeatureMemo, LoadedReward, RewardModel};
use recontrol_rollout::{collect_rollouts, select_prompts};
use recontrol_sweep::{Setting, SweepMethod};
use recontrol_value_net::stage::{epoch_scalars as value_scalars, train_value_model, ValueOutcome};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tensorboard_rs::summary_writer::SummaryWriter;

use crate::{DemoConfig, Error, Method, PromptSet, Result, Stage, HARMFULQA, HH_RLHF};

/// Where and how the demo runs.
#[derive(Debug, Clone)]
pub struct DemoRun<'a> {
    /// Output folder: every artifact, logs/ (TensorBoard), report/ and report-ood/.
    pub out: &'a Path,
    pub device: DeviceSpec,
    /// Recorded with every artifact.
    pub provenance: &'a Provenance,
    /// The ONNX Runtime library (default: `$ORT_DYLIB_PATH`, then the project venv).
    pub onnxruntime: Option<PathBuf>,
}

/// The demo's results: the HH report and the out-of-distribution report.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    pub hh: Report,
    pub ood: Report,
    /// Wall time of this call.
    pub seconds: f64,
}

/// Runs (or continues) the whole chain with `config`.
pub fn run_demo(config: &DemoConfig, run: &DemoRun<'_>) -> Result<DemoOutcome> {
    let out = run.out;
    let data = out.join("data");
    std::fs::create_dir_all(&data).map_err(Error::io(out))?;
    let hh = data.join("hh-rlhf-harmless-base.jsonl.gz");
    let harmfulqa = data.join("harmfulqa.json");
    for (path, bytes) in [(&hh, HH_RLHF), (&harmfulqa, HARMFULQA)] {
        if std::fs::read(path).ok().as_deref() != Some(bytes) {
            std::fs::write(path, bytes).map_err(Error::io(path))?;
        }
    }
    let model = &config.model.dir;
    let identity = model_identity(model).map_err(|e| Error::Stage {
        stage: Stage::Model.name(),
        source: format!(
            "[model] dir {}: {e} (scripts/setup.sh imports SmolLM2-135M-Instruct into {})",
            model.display(),
            crate::DEFAULT_MODEL_DIR
        )
        .into(),
    })?;
    let pipeline = Pipeline {
        config,
        run,
        hh,
        harmfulqa,
        identity,
        features: FeatureMemo::new(FeatureMemo::DEFAULT_CAPACITY_BYTES),
    };
    let chain = Stage::chain();
    let started = Instant::now();
    let stamps = out.join(".stamps");
    std::fs::create_dir_all(&stamps).map_err(Error::io(&stamps))?;
    let mut keys: HashMap<Stage, String> = HashMap::new();
    let mut reports: HashMap<PromptSet, Report> = HashMap::new();
    for (i, &stage) in chain.iter().enumerate() {
        let name = stage.name();
        let settings = pipeline.settings(stage);
        let mut hasher = Sha256::new();
        for part in [name.clone(), settings.to_string(), run.device.to_string()]
            .into_iter()
            .chain(stage.inputs().iter().map(|s| keys[s].clone()))
        {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        let key = format!("{:x}", hasher.finalize());
        keys.insert(stage, key.clone());
        let output = stage.output(out);
        let (stamp, pending) = (stamps.join(&name), stamps.join(format!("{name}.pending")));
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let prefix = format!("[{}/{}] {name}", i + 1, chain.len());
        let stage_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Stage {
            stage: name.clone(),
            source,
        };
        if output.exists() && read(&stamp) == key {
            eprintln!("{prefix}: unchanged, skipped");
            if let Stage::Eval(set) = stage {
                reports.insert(set, read_report(&output).map_err(stage_error)?);
            }
            continue;
        }
        let resume = stage.resumable() && read(&pending) == key;
        remove(&output)?;
        if !resume {
            remove(&recontrol_io::work_dir(&output))?;
            remove(&recontrol_data::rollout::parts_dir(&output))?;
        }
        std::fs::write(&pending, &key).map_err(Error::io(&pending))?;
        let _ = std::fs::remove_file(&stamp);
        eprintln!(
            "{prefix}: {} {settings}{}  ({:.0} s so far)",
            stage
                .command()
                .map_or_else(|| "checking".to_owned(), |c| format!("recontrol {c}")),
            if resume { " (resuming)" } else { "" },
            started.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        if let Some(parent) = output.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
        }
        if let Some((set, report)) = pipeline.run(stage, &output, resume).map_err(stage_error)? {
            reports.insert(set, report);
        }
        std::fs::write(&stamp, &key).map_err(Error::io(&stamp))?;
        let _ = std::fs::remove_file(&pending);
        eprintln!("{prefix}: done in {:.0} s", t.elapsed().as_secs_f64());
    }
    let mut take = |set: PromptSet| {
        reports.remove(&set).ok_or_else(|| Error::Stage {
            stage: Stage::Eval(set).name(),
            source: "no report".into(),
        })
    };
    Ok(DemoOutcome {
        hh: take(PromptSet::Hh)?,
        ood: take(PromptSet::HarmfulQa)?,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn remove(path: &Path) -> Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path).map_err(Error::io(path))?;
    } else if path.exists() {
        std::fs::remove_file(path).map_err(Error::io(path))?;
    }
    Ok(())
}

type StageResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A finished stage's report, read back when the stage is skipped.
fn read_report(dir: &Path) -> StageResult<Report> {
    let path = dir.join("report.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?)
}

/// What a stage's output folder records beside it: the stage, its settings and provenance.
#[derive(Serialize)]
struct StageRecord<'a> {
    stage: String,
    settings: &'a serde_json::Value,
    provenance: &'a Provenance,
}

struct Pipeline<'a> {
    config: &'a DemoConfig,
    run: &'a DemoRun<'a>,
    hh: PathBuf,
    harmfulqa: PathBuf,
    /// The model directory's identity (its files' digest): part of the model stage's key.
    identity: String,
    /// Features of the model's frozen backbone computed so far: the policy reward model and
    /// the judge train on it and share their held-out pairs.
    features: FeatureMemo,
}

impl Pipeline<'_> {
    fn out(&self, stage: Stage) -> PathBuf {
        stage.output(self.run.out)
    }

    fn logs(&self, name: &str) -> PathBuf {
        self.run.out.join("logs").join(name)
    }

    fn producer(&self) -> Producer {
        Producer::from(self.run.provenance)
    }

    /// A stage's own settings, as its key and its record see them.
    fn settings(&self, stage: Stage) -> serde_json::Value {
        let c = self.config;
        match stage {
            Stage::Model => serde_json::json!({
                "dir": c.model.dir,
                "prompt_format": c.model.prompt_format,
                "identity": self.identity,
            }),
            Stage::Rollout => to_json(&c.rollout),
            Stage::Reward => serde_json::json!({
                "settings": c.reward,
                "prompt_format": self.pair_format(),
            }),
            Stage::Judge => serde_json::json!({
                "settings": c.judge,
                "prompt_format": self.pair_format(),
            }),
            Stage::Label => serde_json::json!({ "mode": LabelMode::Overwrite }),
            Stage::Value => to_json(&c.value),
            Stage::Export => to_json(&c.export),
            Stage::Steer => serde_json::json!({ "quantile": c.sweep.static_re.quantile }),
            Stage::ValidationPrompts => serde_json::json!({
                "after": c.rollout.limit,
                "limit": c.validation.limit,
                "instruction": c.prompting.prefix,
            }),
            Stage::Sweep(m) => serde_json::json!({
                "grid": self.grid(m),
                "decoding": self.decoding(m),
                "control": m.controlled().then_some(c.control),
                "rule": recontrol_sweep::RULE,
            }),
            Stage::Prompts(PromptSet::Hh) => {
                serde_json::json!({ "selection": c.prompts, "instruction": c.prompting.prefix })
            }
            Stage::Prompts(PromptSet::HarmfulQa) => {
                serde_json::json!({ "selection": c.ood, "instruction": c.prompting.prefix })
            }
            Stage::Generate(_, m) => serde_json::json!({
                "decoding": self.decoding(m),
                "control": m.controlled().then_some(c.control),
                "fixed": m.tuned_by().map(|t| self.grid(t)),
                "prompted": m.prompted(),
            }),
            Stage::Eval(_) => to_json(&c.eval),
        }
    }

    /// Runs one stage into `output`; an evaluation returns its report.
    fn run(
        &self,
        stage: Stage,
        output: &Path,
        resume: bool,
    ) -> StageResult<Option<(PromptSet, Report)>> {
        match stage {
            Stage::Model => self.model(output)?,
            Stage::Rollout => self.rollout(output, resume)?,
            Stage::Reward => self.reward_model(&self.config.reward, "reward", output, resume)?,
            Stage::Judge => self.reward_model(&self.config.judge, "judge", output, resume)?,
            Stage::Label => self.label(output)?,
            Stage::Value => self.value(output, resume)?,
            Stage::Export => {
                let dir = ValueDir::read(&self.out(Stage::Value))?;
                write_export(&dir, output, &self.config.export.spec(), &self.producer())?;
            }
            Stage::Steer => self.steer(output)?,
            Stage::ValidationPrompts => self.validation_prompts(output)?,
            Stage::Sweep(method) => self.sweep(method, output)?,
            Stage::Prompts(set) => self.prompts(set, output)?,
            Stage::Generate(set, method) => self.generate(set, method, output)?,
            Stage::Eval(set) => return Ok(Some((set, self.eval(set, output)?))),
        }
        Ok(None)
    }

    /// Loads the model once (so that a broken directory fails here, named) and records it.
    fn model(&self, output: &Path) -> StageResult<()> {
        let lm = self.lm()?;
        let config = lm.model.config();
        if self.config.model.prompt_format == PromptFormat::ChatTemplate
            && !lm.tokenizer.has_chat_template()
        {
            return Err(format!(
                "[model] prompt_format = \"chat-template\": {} has no chat template",
                self.config.model.dir.display()
            )
            .into());
        }
        eprintln!(
            "  {}: {} layers, hidden {}, vocab {}",
            self.config.model.dir.display(),
            config.num_layers,
            config.hidden_size,
            config.vocab_size
        );
        recontrol_io::write_json_atomic(
            output,
            &StageRecord {
                stage: Stage::Model.name(),
                settings: &self.settings(Stage::Model),
                provenance: self.run.provenance,
            },
        )?;
        Ok(())
    }

    fn lm(&self) -> StageResult<LanguageModel> {
        Ok(LanguageModel::load(
            &self.config.model.dir,
            self.run.device,
            DType::F32,
        )?)
    }

    fn rollout(&self, output: &Path, resume: bool) -> StageResult<()> {
        let stage = &self.config.rollout;
        let dataset = Dataset::read(&self.hh, &ReadOptions::default())?;
        let mut records = select_prompts(&dataset, &stage.selection())?;
        // Prompts of similar length decode together: a batch pads to its longest prompt.
        records.sort_by_key(|r| r.raw.len());
        let lm = self.lm()?;
        let mut last = 0;
        let report = collect_rollouts(
            &lm,
            &records,
            &self.hh,
            &stage.settings(self.config.model.prompt_format),
            output,
            resume,
            &mut |done, total| {
                if done * 10 / total.max(1) > last * 10 / total.max(1) {
                    eprintln!("  {done}/{total} rollouts");
                }
                last = done;
            },
        )?;
        eprintln!(
            "  {} rollouts, {} states in {:.1} s",
            report.rollouts, report.states, report.seconds
        );
        Ok(())
    }

    /// The policy reward model or the judge: `settings` name the partition of the train pairs.
    fn reward_model(
        &self,
        settings: &recontrol_reward_model::stage::RewardSettings,
        logs: &str,
        output: &Path,
        resume: bool,
    ) -> StageResult<()> {
        let dirs = WorkDirs::prepare(output, resume, Some(&self.logs(logs)))?;
        dirs.create()?;
        let dataset = Dataset::read(&self.hh, &ReadOptions::default())?;
        let pairs = dataset
            .pairs
            .as_ref()
            .ok_or("the bundled HH-RLHF file has no pairs")?;
        let lm = LanguageModel::load_backbone(&self.config.model.dir, self.run.device, DType::F32)?;
        let prepared =
            prepare_training_pairs(pairs, settings, self.pair_format(), Some(&lm.tokenizer))?;
        let mut tb = SummaryWriter::new(&dirs.logdir);
        let control = recontrol_train::RunControl {
            checkpoint: &dirs.checkpoint,
            resume,
            max_this_run: None,
        };
        let memo = Some(&self.features);
        let outcome = train_reward(&lm, memo, &prepared, settings, control, &mut |m| {
            for (tag, value) in reward_scalars(m) {
                tb.add_scalar(tag, value as f32, m.epoch);
            }
            tb.flush();
        })?;
        let (score, summary) = match outcome {
            RewardOutcome::Complete { score, summary } => (score, summary),
            RewardOutcome::Stopped { epochs_done } => {
                return Err(format!("stopped after epoch {epochs_done}").into())
            }
        };
        eprintln!(
            "  held-out pair accuracy {:.3} (length-only baseline {:.3})",
            summary.heldout_accuracy, summary.length_baseline_accuracy
        );
        #[derive(Serialize)]
        struct Record<'a> {
            args: &'a recontrol_reward_model::stage::RewardSettings,
            #[serde(flatten)]
            summary: &'a RewardSummary,
            provenance: &'a Provenance,
        }
        let record = serde_json::to_value(Record {
            args: settings,
            summary: &summary,
            provenance: self.run.provenance,
        })?;
        RewardModel::from_parts(lm, score).save(output, &[("reward_training.json", record)])?;
        let _ = std::fs::remove_file(&dirs.checkpoint);
        Ok(())
    }

    /// Labels a copy of the rollouts, so that a new reward relabels them without new rollouts.
    fn label(&self, output: &Path) -> StageResult<()> {
        let rollouts = self.out(Stage::Rollout);
        std::fs::copy(&rollouts, output).map_err(|e| {
            format!(
                "copying {} to {}: {e}",
                rollouts.display(),
                output.display()
            )
        })?;
        let store = Store::open_rw(output)?;
        let start = label_start(&store.rewards()?, LabelMode::Overwrite)?;
        let mut reward = load_reward(&self.out(Stage::Reward), self.run.device)?;
        let summary = label_store(&store, reward.as_mut(), start, 64, &mut |_| {})?;
        eprintln!("  labelled {} rollouts", summary.labelled);
        Ok(())
    }

    fn value(&self, output: &Path, resume: bool) -> StageResult<()> {
        let settings = &self.config.value;
        let dirs = WorkDirs::prepare(output, resume, Some(&self.logs("value")))?;
        dirs.create()?;
        let labelled = self.out(Stage::Label);
        let store = Store::open(&labelled)?;
        let mut tb = SummaryWriter::new(&dirs.logdir);
        let outcome = train_value_model(
            &store,
            &labelled,
            settings,
            settings,
            self.run.device.resolve()?,
            recontrol_train::RunControl {
                checkpoint: &dirs.checkpoint,
                resume,
                max_this_run: None,
            },
            &self.producer(),
            &mut |m| {
                for (tag, value) in value_scalars(m) {
                    tb.add_scalar(tag, value as f32, m.epoch);
                }
                tb.flush();
            },
        )?;
        match outcome {
            ValueOutcome::Complete { model, best } => {
                eprintln!(
                    "  best epoch {}: validation loss {:.4}, Spearman(V(s_0), r) {:.3}",
                    best.epoch, best.val_loss, best.spearman
                );
                model.save(output)?;
                let _ = std::fs::remove_file(&dirs.checkpoint);
                Ok(())
            }
            ValueOutcome::Stopped { epochs_done } => {
                Err(format!("stopped after epoch {epochs_done}").into())
            }
        }
    }

    fn prompts(&self, set: PromptSet, output: &Path) -> StageResult<()> {
        let (path, stage) = match set {
            PromptSet::Hh => (&self.hh, &self.config.prompts),
            PromptSet::HarmfulQa => (&self.harmfulqa, &self.config.ood),
        };
        let dataset = Dataset::read(path, &ReadOptions::default())?;
        let lm = self.lm()?;
        let rendering = LineRendering {
            format: self.config.model.prompt_format,
            instruction: Some(&self.config.prompting.prefix),
            chat: Some(&lm.tokenizer),
        };
        let mut lines = prompt_lines(&dataset, &stage.selection(), &rendering)?;
        // Shortest first: every method decodes in this order, and a batch pads to its
        // longest prompt.
        lines.sort_by_key(|l| l.prompt.len());
        let mut sink = JsonlSink::create(Some(output))?;
        for line in &lines {
            sink.write(line)?;
        }
        sink.finish(&StageRecord {
            stage: Stage::Prompts(set).name(),
            settings: &self.settings(Stage::Prompts(set)),
            provenance: self.run.provenance,
        })?;
        Ok(())
    }

    /// The steering vector of static RE, from the labelled rollouts.
    fn steer(&self, output: &Path) -> StageResult<()> {
        let store = Store::open(&self.out(Stage::Label))?;
        let mut vector = SteeringVector::fit(&store, self.config.sweep.static_re.quantile)?;
        vector.meta.provenance = serde_json::to_value(self.run.provenance)?;
        vector.save(output)?;
        let m = &vector.meta;
        eprintln!(
            "  top {} rollouts (mean reward {:.3}) minus bottom {} ({:.3}), difference norm {:.3}",
            m.top_rollouts,
            m.top_reward_mean,
            m.bottom_rollouts,
            m.bottom_reward_mean,
            m.difference_norm
        );
        Ok(())
    }

    /// Train-side prompts after the rollouts' (file order), rendered like the test prompts.
    fn validation_prompts(&self, output: &Path) -> StageResult<()> {
        let c = self.config;
        let dataset = Dataset::read(&self.hh, &ReadOptions::default())?;
        let lm = self.lm()?;
        let rendering = LineRendering {
            format: c.model.prompt_format,
            instruction: Some(&c.prompting.prefix),
            chat: Some(&lm.tokenizer),
        };
        let skip = c.rollout.limit.unwrap_or(usize::MAX);
        let mut selection = c.rollout.selection();
        selection.limit = Some(skip.saturating_add(c.validation.limit));
        let lines = prompt_lines(&dataset, &selection, &rendering)?;
        let mut lines: Vec<_> = lines.into_iter().skip(skip).collect();
        if lines.is_empty() {
            return Err(format!(
                "no train-side prompts after the {skip} rolled out: lower [rollout] limit"
            )
            .into());
        }
        lines.sort_by_key(|l| l.prompt.len());
        let mut sink = JsonlSink::create(Some(output))?;
        for line in &lines {
            sink.write(line)?;
        }
        sink.finish(&StageRecord {
            stage: Stage::ValidationPrompts.name(),
            settings: &self.settings(Stage::ValidationPrompts),
            provenance: self.run.provenance,
        })?;
        Ok(())
    }

    /// A tuned method's grid, as the sweep stage's settings record it.
    fn grid(&self, method: Method) -> serde_json::Value {
        let s = &self.config.sweep;
        match method {
            Method::StaticRe => to_json(&s.static_re),
            Method::BestOfN => to_json(&s.best_of_n),
            Method::Args => to_json(&s.args),
            Method::ValueGuided => to_json(&s.value_guided),
            Method::ReControl | Method::ReControlPrompting => to_json(&s.re_control),
            Method::Base | Method::Prompting => serde_json::Value::Null,
        }
    }

    /// How a method decodes: greedy with [generate]'s settings, except best-of-N, which
    /// samples.
    fn decoding(&self, method: Method) -> recontrol_lm::DecodingSettings {
        let mut decoding = self.config.generate.clone();
        if method == Method::BestOfN {
            decoding.temperature = self.config.sweep.best_of_n.temperature;
            decoding.seed = self.config.sweep.best_of_n.seed;
        }
        decoding
    }

    fn value_backend(&self, lm: &LanguageModel) -> StageResult<Box<dyn GradientBackend>> {
        let options = ValueOptions {
            backend: self.config.control.backend,
            allow_foreign: false,
            onnxruntime: self.run.onnxruntime.clone(),
        };
        Ok(open_value_backend(&self.out(Stage::Export), lm, &options)?)
    }

    /// A tuned method over its grid (one knob value: generation), with what it decodes with.
    fn sweep_method(
        &self,
        method: Method,
        lm: &LanguageModel,
        only: Option<&Setting>,
    ) -> StageResult<SweepMethod> {
        let s = &self.config.sweep;
        let value = |knob: &str, grid: Vec<f64>| -> Vec<f64> {
            only.and_then(|o| o.iter().find(|(k, _)| k == knob).map(|(_, v)| vec![*v]))
                .unwrap_or(grid)
        };
        Ok(match method {
            Method::StaticRe => SweepMethod::Steer {
                vector: Box::new(SteeringVector::load(&self.out(Stage::Steer))?),
                scales: value("scale", s.static_re.scales.clone()),
            },
            Method::BestOfN => SweepMethod::BestOfN {
                ns: value("n", s.best_of_n.ns.iter().map(|&n| n as f64).collect())
                    .into_iter()
                    .map(|n| n as usize)
                    .collect(),
            },
            Method::Args => SweepMethod::Args {
                reward: ArgsReward::open(&self.out(Stage::Reward), lm, self.run.device)?,
                k: s.args.k,
                weights: value("weight", s.args.weights.clone()),
            },
            Method::ValueGuided => SweepMethod::ValueGuided {
                value: self.value_backend(lm)?,
                k: s.value_guided.k,
                weights: value("weight", s.value_guided.weights.clone()),
            },
            Method::ReControl | Method::ReControlPrompting => SweepMethod::ReControl {
                value: self.value_backend(lm)?,
                alphas: value("alpha", s.re_control.alphas.clone()),
                steps: value(
                    "steps",
                    s.re_control.steps.iter().map(|&n| n as f64).collect(),
                )
                .into_iter()
                .map(|n| n as usize)
                .collect(),
                rule: self.config.control.update,
            },
            Method::Base | Method::Prompting => {
                return Err(format!("{} has no knob", method.name()).into())
            }
        })
    }

    /// Tunes `method` on the validation prompts with the policy reward.
    fn sweep(&self, method: Method, output: &Path) -> StageResult<()> {
        let prompts_file = self.out(Stage::ValidationPrompts);
        let prompts = recontrol_data::read_prompts(&prompts_file, "prompt")?;
        let lm = self.lm()?;
        let mut sweep_method = self.sweep_method(method, &lm, None)?;
        let decoding = self.decoding(method);
        let plan = GenerationPlan {
            prompts: &prompts,
            prompt_prefix: None,
            model_prompts: None,
            add_special_tokens: self.config.model.prompt_format != PromptFormat::ChatTemplate,
            config: decoding.config(&lm)?,
            batch_size: decoding.batch_size,
        };
        let mut reward = load_reward(&self.out(Stage::Reward), self.run.device)?;
        let encoder = CoherenceEncoder::load(&self.config.model.dir, self.run.device)?;
        let judges = Judges {
            reward: reward.as_mut(),
            judge: None,
            coherence: &encoder,
        };
        let dir = AtomicDir::create(output)?;
        let temp = dir.path().to_owned();
        let report = recontrol_sweep::sweep(
            &lm,
            &plan,
            &mut sweep_method,
            judges,
            &self.config.eval,
            &mut |i, records| recontrol_sweep::write_point(&temp, i, records),
        )?;
        recontrol_sweep::write_sweep(dir.path(), &report)?;
        dir.commit()?;
        let chosen = &report.points[report.chosen];
        eprintln!(
            "  chose {} (reward {:.3}, diversity {:.3}, coherence {:.3})",
            recontrol_sweep::describe(&chosen.setting),
            chosen.reward,
            chosen.diversity,
            chosen.coherence
        );
        Ok(())
    }

    /// The setting a method's sweep chose.
    fn chosen(&self, method: Method) -> StageResult<Setting> {
        let path = self.out(Stage::Sweep(method)).join("sweep.json");
        let report = recontrol_sweep::read_sweep(&path)?;
        Ok(report
            .points
            .get(report.chosen)
            .ok_or_else(|| format!("{}: no chosen point", path.display()))?
            .setting
            .clone())
    }

    fn generate(&self, set: PromptSet, method: Method, output: &Path) -> StageResult<()> {
        let prompts_file = self.out(Stage::Prompts(set));
        let prompts = recontrol_data::read_prompts(&prompts_file, "prompt")?;
        let instructed = if method.prompted() {
            Some(recontrol_data::read_prompts(&prompts_file, "instructed")?)
        } else {
            None
        };
        let lm = self.lm()?;
        let decoding = self.decoding(method);
        let plan = GenerationPlan {
            prompts: &prompts,
            prompt_prefix: None,
            model_prompts: instructed.as_deref(),
            add_special_tokens: self.config.model.prompt_format != PromptFormat::ChatTemplate,
            config: decoding.config(&lm)?,
            batch_size: decoding.batch_size,
        };
        let mut sink = JsonlSink::create(Some(output))?;
        let mut write = |records: &[recontrol_data::GenerationRecord]| -> Result<(), SinkError> {
            for r in records {
                sink.write(r)?;
            }
            Ok(())
        };
        let summary = match method.tuned_by() {
            None => generate_records(&lm, &plan, DecodingMethod::Plain, &mut write)?,
            Some(tuned) => {
                let setting = self.chosen(tuned)?;
                eprintln!(
                    "  {} at {}",
                    method.name(),
                    recontrol_sweep::describe(&setting)
                );
                let mut one = self.sweep_method(tuned, &lm, Some(&setting))?;
                let mut reward = match method {
                    Method::BestOfN => {
                        Some(load_reward(&self.out(Stage::Reward), self.run.device)?)
                    }
                    _ => None,
                };
                let reward: Option<&mut dyn recontrol_reward_model::RewardSource> =
                    match &mut reward {
                        Some(r) => Some(r.as_mut()),
                        None => None,
                    };
                recontrol_sweep::decode_setting(&mut one, &lm, &plan, &setting, reward, &mut write)?
            }
        };
        eprintln!(
            "  {} tokens for {} prompts in {:.2} s",
            summary.tokens, summary.prompts, summary.seconds
        );
        sink.finish(&StageRecord {
            stage: Stage::Generate(set, method).name(),
            settings: &self.settings(Stage::Generate(set, method)),
            provenance: self.run.provenance,
        })?;
        Ok(())
    }

    fn eval(&self, set: PromptSet, output: &Path) -> StageResult<Report> {
        let methods = set
            .methods()
            .iter()
            .map(|&m| MethodGenerations::read(m.name(), &self.out(Stage::Generate(set, m))))
            .collect::<Result<Vec<_>, _>>()?;
        let references = match set {
            PromptSet::Hh => Some(read_references(
                &self.out(Stage::Prompts(set)),
                "reference",
            )?),
            PromptSet::HarmfulQa => None,
        };
        let mut reward = LoadedReward::load(&self.out(Stage::Reward), self.run.device)?;
        let mut judge = LoadedReward::load(&self.out(Stage::Judge), self.run.device)?;
        reward.share_features_with(&mut judge)?;
        let (mut reward, mut judge) = (reward.boxed(), judge.boxed());
        let encoder = CoherenceEncoder::load(&self.config.model.dir, self.run.device)?;
        let judges = Judges {
            reward: reward.as_mut(),
            judge: Some(judge.as_mut()),
            coherence: &encoder,
        };
        let report = evaluate(&methods, references.as_ref(), judges, &self.config.eval)?;
        write_report(
            output,
            &report,
            &StageRecord {
                stage: Stage::Eval(set).name(),
                settings: &self.settings(Stage::Eval(set)),
                provenance: self.run.provenance,
            },
        )?;
        Ok(report)
    }
}

impl Pipeline<'_> {
    /// How reward pairs are rendered: like every prompt of the run, except that the HH text
    /// keeps its raw form ("Human: ... Assistant:", as the dataset has it).
    fn pair_format(&self) -> PromptFormat {
        match self.config.model.prompt_format {
            PromptFormat::ChatTemplate => PromptFormat::ChatTemplate,
            _ => PromptFormat::Raw,
        }
    }
}

/// Settings as JSON (they are plain structs: serialising them cannot fail).
fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}
