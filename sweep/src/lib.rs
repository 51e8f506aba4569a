//! Tuning a decoding method's knob on validation prompts, the paper's way: every setting of a
//! grid decodes the same validation prompts, each is scored with the policy reward, diversity
//! and coherence (as `recontrol eval` defines them), and the setting with the highest
//! `reward + diversity + coherence` is chosen ([`choose`]). The validation prompts must come from
//! the train side of the split: the test prompts play no part in choosing.
//!
//! [`sweep`] runs a [`SweepMethod`] over its grid; [`write_sweep`] writes `sweep.json`, the
//! generations of every setting, and `sweep.svg` (the paper's ablation figure: reward,
//! diversity and coherence against the knob).

use std::path::{Path, PathBuf};

use recontrol_controller::generation::SinkError;
use recontrol_controller::{
    generate_records, ArgsReward, ControlConfig, Controller, GenerationPlan, GenerationSummary,
    GradientBackend, Method, RerankSettings, SteeringVector, UpdateRule,
};
use recontrol_data::GenerationRecord;
use recontrol_eval::{evaluate, EvalSettings, Judges, MethodGenerations};
use recontrol_lm::LanguageModel;
use serde::{Deserialize, Serialize};

/// Errors of a sweep.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Controller(#[from] recontrol_controller::Error),
    #[error(transparent)]
    Eval(#[from] recontrol_eval::Error),
    #[error(transparent)]
    Io(#[from] recontrol_io::Error),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A grid without settings, or with a value a knob cannot take.
    #[error("{knob}: {message}")]
    Grid { knob: &'static str, message: String },
    #[error("the chart: {0}")]
    Chart(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A method and the grid of its knob(s), with what it decodes with.
pub enum SweepMethod {
    /// RE-Control: `alphas x steps`.
    ReControl {
        value: Box<dyn GradientBackend>,
        alphas: Vec<f64>,
        steps: Vec<usize>,
        rule: UpdateRule,
    },
    /// Static representation editing: the vector's scale.
    Steer {
        vector: Box<SteeringVector>,
        scales: Vec<f64>,
    },
    /// ARGS: the reward's weight (k fixed).
    Args {
        reward: ArgsReward,
        k: usize,
        weights: Vec<f64>,
    },
    /// Value-guided decoding: the value's weight (k fixed).
    ValueGuided {
        value: Box<dyn GradientBackend>,
        k: usize,
        weights: Vec<f64>,
    },
    /// Best-of-N: N, the samples scored by the policy reward (the plan's sampling applies).
    BestOfN { ns: Vec<usize> },
}

impl std::fmt::Debug for SweepMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One setting of the grid: each knob's name and value.
pub type Setting = Vec<(String, f64)>;

impl SweepMethod {
    /// The method's name, as generation records carry it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ReControl { .. } => "re-control",
            Self::Steer { .. } => "static-re",
            Self::Args { .. } => "args",
            Self::ValueGuided { .. } => "value-guided",
            Self::BestOfN { .. } => "best-of-n",
        }
    }

    /// The knob the chart's x axis shows (RE-Control: alpha, one line per steps value).
    pub fn knob(&self) -> &'static str {
        match self {
            Self::ReControl { .. } => "alpha",
            Self::Steer { .. } => "scale",
            Self::Args { .. } | Self::ValueGuided { .. } => "weight",
            Self::BestOfN { .. } => "n",
        }
    }

    /// Every setting, in grid order (RE-Control: alpha fastest).
    pub fn settings(&self) -> Result<Vec<Setting>> {
        let one = |knob: &str, values: &[f64]| -> Vec<Setting> {
            values.iter().map(|&v| vec![(knob.to_owned(), v)]).collect()
        };
        let settings = match self {
            Self::ReControl { alphas, steps, .. } => {
                finite("alpha", alphas)?;
                if steps.contains(&0) {
                    return Err(grid_error("steps", "every value must be at least 1"));
                }
                steps
                    .iter()
                    .flat_map(|&s| {
                        alphas.iter().map(move |&a| {
                            vec![("alpha".to_owned(), a), ("steps".to_owned(), s as f64)]
                        })
                    })
                    .collect()
            }
            Self::Steer { scales, .. } => {
                finite("scale", scales)?;
                one("scale", scales)
            }
            Self::Args { weights, .. } | Self::ValueGuided { weights, .. } => {
                finite("weight", weights)?;
                one("weight", weights)
            }
            Self::BestOfN { ns } => {
                if ns.contains(&0) {
                    return Err(grid_error("n", "every value must be at least 1"));
                }
                one("n", &ns.iter().map(|&n| n as f64).collect::<Vec<_>>())
            }
        };
        if settings.is_empty() {
            return Err(grid_error(self.knob(), "the grid is empty"));
        }
        Ok(settings)
    }
}

/// Decodes `plan` with `method` at one `setting` of its grid, each batch's records handed to
/// `sink` (best-of-N scores its samples with `reward`, which it needs): what a sweep does at
/// each point, and what generation at the chosen point does.
pub fn decode_setting(
    method: &mut SweepMethod,
    lm: &LanguageModel,
    plan: &GenerationPlan<'_>,
    setting: &Setting,
    reward: Option<&mut dyn recontrol_reward_model::RewardSource>,
    sink: &mut dyn FnMut(&[GenerationRecord]) -> std::result::Result<(), SinkError>,
) -> Result<GenerationSummary> {
    let value_of = |knob: &str| {
        setting
            .iter()
            .find(|(k, _)| k == knob)
            .map_or(0.0, |(_, v)| *v)
    };
    let summary = match method {
        SweepMethod::ReControl { value, rule, .. } => {
            let mut controller = Controller::new(
                value.as_mut(),
                ControlConfig {
                    alpha: value_of("alpha"),
                    steps: value_of("steps") as usize,
                    rule: *rule,
                    clip_grad_norm: None,
                    max_edit_norm: None,
                },
            )?;
            generate_records(lm, plan, Method::Control(&mut controller), sink)?
        }
        SweepMethod::Steer { vector, .. } => {
            let mut hook = vector.hook(value_of("scale"), lm.model.device())?;
            generate_records(lm, plan, Method::Steer(&mut hook), sink)?
        }
        SweepMethod::Args { reward, k, .. } => {
            let settings = RerankSettings {
                k: *k,
                weight: value_of("weight"),
            };
            generate_records(lm, plan, Method::Args { reward, settings }, sink)?
        }
        SweepMethod::ValueGuided { value, k, .. } => {
            let settings = RerankSettings {
                k: *k,
                weight: value_of("weight"),
            };
            let method = Method::ValueGuided {
                value: value.as_mut(),
                settings,
            };
            generate_records(lm, plan, method, sink)?
        }
        SweepMethod::BestOfN { .. } => {
            let reward = reward.ok_or_else(|| grid_error("n", "best-of-N needs a reward"))?;
            let method = Method::BestOfN {
                n: value_of("n") as usize,
                reward,
            };
            generate_records(lm, plan, method, sink)?
        }
    };
    Ok(summary)
}

fn grid_error(knob: &'static str, message: &str) -> Error {
    Error::Grid {
        knob,
        message: message.to_owned(),
    }
}

fn finite(knob: &'static str, values: &[f64]) -> Result<()> {
    match values.iter().find(|v| !v.is_finite()) {
        Some(v) => Err(grid_error(knob, &format!("{v} is not a finite number"))),
        None => Ok(()),
    }
}

/// One setting's validation metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub setting: Setting,
    /// Mean policy reward.
    pub reward: f64,
    pub diversity: f64,
    pub coherence: f64,
    /// `reward + diversity + coherence`: what [`choose`] maximises.
    pub score: f64,
    /// Generation time of the setting (model loading excluded).
    pub seconds: f64,
    pub mean_response_tokens: f64,
}

/// A sweep's result (`sweep.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    pub method: String,
    pub knob: String,
    pub points: Vec<SweepPoint>,
    /// Index of the chosen point.
    pub chosen: usize,
    pub rule: String,
    pub prompts: usize,
    /// The policy reward and the coherence encoder.
    pub reward: String,
    pub coherence_encoder: String,
}

impl SweepReport {
    /// The chosen setting's value of `knob`.
    pub fn chosen_value(&self, knob: &str) -> Option<f64> {
        self.points
            .get(self.chosen)?
            .setting
            .iter()
            .find(|(k, _)| k == knob)
            .map(|(_, v)| *v)
    }
}

/// What [`choose`] maximises.
pub const RULE: &str = "argmax of mean policy reward + diversity + coherence on the validation \
                        prompts (the first setting in grid order on ties)";

/// The paper's choice: the first point with the highest `reward + diversity + coherence`.
pub fn choose(points: &[SweepPoint]) -> usize {
    (0..points.len()).fold(0, |best, i| {
        if points[i].score > points[best].score {
            i
        } else {
            best
        }
    })
}

/// Runs `method` over its grid on `plan`'s prompts and scores every setting with `judges`;
/// `generations` gets each setting's records as they are scored.
pub fn sweep(
    lm: &LanguageModel,
    plan: &GenerationPlan<'_>,
    method: &mut SweepMethod,
    judges: Judges<'_>,
    settings: &EvalSettings,
    generations: &mut dyn FnMut(usize, &[GenerationRecord]) -> Result<()>,
) -> Result<SweepReport> {
    let grid = method.settings()?;
    // The sweep chooses with the policy reward alone: a judge, if given, plays no part.
    let Judges {
        reward, coherence, ..
    } = judges;
    let mut points = Vec::with_capacity(grid.len());
    for (i, setting) in grid.iter().enumerate() {
        eprintln!(
            "sweep {} {}/{}: {}",
            method.name(),
            i + 1,
            grid.len(),
            describe(setting)
        );
        let mut records = Vec::new();
        decode_setting(
            method,
            lm,
            plan,
            setting,
            Some(&mut *reward),
            &mut |batch| {
                records.extend_from_slice(batch);
                Ok(())
            },
        )?;
        generations(i, &records)?;
        let one = [MethodGenerations {
            name: method.name().to_owned(),
            file: PathBuf::from(format!("point-{i}.jsonl")),
            records,
        }];
        let judges = Judges {
            reward: &mut *reward,
            judge: None,
            coherence,
        };
        let report = evaluate(&one, None, judges, settings)?;
        let m = &report.methods[0];
        points.push(SweepPoint {
            setting: setting.clone(),
            reward: m.avg_reward,
            diversity: m.diversity,
            coherence: m.coherence,
            score: m.avg_reward + m.diversity + m.coherence,
            seconds: m.seconds,
            mean_response_tokens: m.mean_response_tokens,
        });
    }
    Ok(SweepReport {
        method: method.name().to_owned(),
        knob: method.knob().to_owned(),
        chosen: choose(&points),
        points,
        rule: RULE.to_owned(),
        prompts: plan.prompts.len(),
        reward: reward.describe(),
        coherence_encoder: coherence.describe(),
    })
}

/// `alpha=5, steps=30`.
pub fn describe(setting: &Setting) -> String {
    setting
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The markdown table of a sweep: one row per setting, the chosen one marked.
pub fn table(report: &SweepReport) -> String {
    let mut out = String::from("| setting | reward | diversity | coherence | score | seconds |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for (i, p) in report.points.iter().enumerate() {
        let mark = if i == report.chosen { " (chosen)" } else { "" };
        out.push_str(&format!(
            "| {}{mark} | {:.4} | {:.4} | {:.4} | {:.4} | {:.1} |\n",
            describe(&p.setting),
            p.reward,
            p.diversity,
            p.coherence,
            p.score,
            p.seconds
        ));
    }
    out
}

/// `sweep.svg`: reward, diversity and coherence against the knob (one line per value of the
/// other knobs, e.g. RE-Control's steps), the chosen value marked: the paper's ablation
/// figure.
pub fn chart(report: &SweepReport) -> Result<String> {
    let x_of = |p: &SweepPoint| {
        p.setting
            .iter()
            .find(|(k, _)| *k == report.knob)
            .map_or(f64::NAN, |(_, v)| *v)
    };
    let rest = |p: &SweepPoint| {
        p.setting
            .iter()
            .filter(|(k, _)| *k != report.knob)
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut xs: Vec<f64> = Vec::new();
    let mut groups: Vec<String> = Vec::new();
    for p in &report.points {
        let x = x_of(p);
        if !xs.contains(&x) {
            xs.push(x);
        }
        let g = rest(p);
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    type Metric = (&'static str, fn(&SweepPoint) -> f64);
    let metrics: [Metric; 3] = [
        ("reward", |p| p.reward),
        ("diversity", |p| p.diversity),
        ("coherence", |p| p.coherence),
    ];
    let mut series = Vec::new();
    for (metric, value) in metrics {
        for g in &groups {
            let values: Vec<f64> = xs
                .iter()
                .map(|&x| {
                    report
                        .points
                        .iter()
                        .find(|p| x_of(p) == x && rest(p) == *g)
                        .map_or(f64::NAN, value)
                })
                .collect();
            let name = if g.is_empty() {
                metric.to_owned()
            } else {
                format!("{metric} ({g})")
            };
            series.push((name, values));
        }
    }
    let series: Vec<(&str, Vec<f64>)> = series
        .iter()
        .map(|(n, v)| (n.as_str(), v.clone()))
        .collect();
    let chosen = report.points.get(report.chosen).map(x_of);
    recontrol_eval::knob_chart(
        &format!("{} on {} validation prompts", report.method, report.prompts),
        &report.knob,
        &xs,
        &series,
        chosen,
    )
    .map_err(|e| Error::Chart(e.to_string()))
}

/// Writes `sweep.json`, `sweep.md` and `sweep.svg` into `out` (a folder that exists),
/// atomically each.
pub fn write_sweep(out: &Path, report: &SweepReport) -> Result<()> {
    recontrol_io::write_json_atomic(&out.join("sweep.json"), report)?;
    recontrol_io::write_atomic(&out.join("sweep.svg"), chart(report)?.as_bytes())?;
    let md = format!(
        "# Sweep of {} on {} validation prompts\n\nChosen: {} ({}).\n\n{}",
        report.method,
        report.prompts,
        report
            .points
            .get(report.chosen)
            .map(|p| describe(&p.setting))
            .unwrap_or_default(),
        report.rule,
        table(report)
    );
    recontrol_io::write_atomic(&out.join("sweep.md"), md.as_bytes())?;
    Ok(())
}

/// Writes one setting's generations as `point-<index>.jsonl` in `dir` (atomically, with its
/// config file naming the point): what [`sweep`]'s callers hand it to keep every setting.
pub fn write_point(dir: &Path, index: usize, records: &[GenerationRecord]) -> Result<()> {
    let mut sink =
        recontrol_io::JsonlSink::create(Some(&dir.join(format!("point-{index}.jsonl"))))?;
    for r in records {
        sink.write(r)?;
    }
    sink.finish(&serde_json::json!({ "sweep_point": index }))?;
    Ok(())
}

/// Reads a `sweep.json`.
pub fn read_sweep(path: &Path) -> Result<SweepReport> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::File {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::File {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(x: f64, reward: f64, diversity: f64, coherence: f64) -> SweepPoint {
        SweepPoint {
            setting: vec![("alpha".to_owned(), x)],
            reward,
            diversity,
            coherence,
            score: reward + diversity + coherence,
            seconds: 1.0,
            mean_response_tokens: 10.0,
        }
    }

    #[test]
    fn the_choice_maximises_reward_plus_diversity_plus_coherence() {
        // Alpha 10 has the highest reward but has collapsed diversity and coherence; alpha 2
        // has the best sum (0.2 + 0.8 + 0.6 = 1.6).
        let points = [
            point(0.5, -0.1, 0.85, 0.62),
            point(2.0, 0.2, 0.8, 0.6),
            point(5.0, 0.4, 0.6, 0.5),
            point(10.0, 0.9, 0.2, 0.3),
        ];
        assert_eq!(choose(&points), 1);
        // Ties: the first in grid order.
        let tied = [point(1.0, 0.5, 0.5, 0.5), point(2.0, 0.5, 0.5, 0.5)];
        assert_eq!(choose(&tied), 0);
        let report = SweepReport {
            method: "re-control".into(),
            knob: "alpha".into(),
            chosen: choose(&points),
            points: points.to_vec(),
            rule: RULE.into(),
            prompts: 8,
            reward: "r".into(),
            coherence_encoder: "c".into(),
        };
        assert_eq!(report.chosen_value("alpha"), Some(2.0));
        assert_eq!(report.chosen_value("steps"), None);
        assert!(table(&report).contains("| alpha=2 (chosen) |"));
    }

    #[test]
    fn grids_list_every_setting_and_refuse_bad_values() {
        let m = SweepMethod::BestOfN { ns: vec![1, 4] };
        let settings = m.settings().expect("settings");
        assert_eq!(
            settings,
            vec![vec![("n".to_owned(), 1.0)], vec![("n".to_owned(), 4.0)]]
        );
        assert!(SweepMethod::BestOfN { ns: vec![0] }.settings().is_err());
        assert!(SweepMethod::BestOfN { ns: vec![] }.settings().is_err());
    }
}
