//! A crash-safe rollout job: prompts in, a complete store out, resumable after `kill -9`.
//!
//! The job writes parts beside the output, `OUT.parts/part-NNNNNN.h5`, each a complete store of
//! `rollouts_per_part` consecutive rollouts (whole batches). A part is written under a temporary
//! name and renamed when closed, so a crash loses at most the part in progress. `--resume` keeps
//! the finished parts, redoes the rest with the same batches, and merges the parts into `OUT`
//! (again under a temporary name). Because parts align with batches and every prompt's
//! sampling stream depends only on its position in the job, the result holds exactly the
//! records of an uninterrupted run.

use std::path::{Path, PathBuf};

use recontrol_io::write_atomic;
use serde::{Deserialize, Serialize};

use crate::store::{self, Incompatibility, Rollout, Store, StoreError, StoreMeta, StoreWriter};

/// A prompt to roll out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPrompt {
    /// Record index in the source dataset.
    pub prompt_index: i64,
    /// Model input text.
    pub text: String,
}

/// Everything that determines a job's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutPlan {
    pub meta: StoreMeta,
    /// One entry per rollout (a prompt appears `samples_per_prompt` times in a row).
    pub prompts: Vec<PlannedPrompt>,
    pub batch_size: usize,
    /// Rollouts per part; a multiple of `batch_size`.
    pub rollouts_per_part: usize,
    /// Generate each part's prompts in the source's [`RolloutSource::order`] (shortest first:
    /// less padding per batch) rather than as planned. The store's records and their order
    /// are the same either way; absent from plans written before it existed.
    #[serde(default)]
    pub sort_by_length: bool,
}

type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Makes rollouts for batches of prompts.
pub trait RolloutSource {
    /// One rollout per prompt, in order; `rows[i]` is prompt `i`'s position in the job (its
    /// random stream), so a rollout does not depend on the batch it was made in.
    fn generate(
        &mut self,
        prompts: &[PlannedPrompt],
        rows: &[u64],
    ) -> Result<Vec<Rollout>, SourceError>;

    /// The order in which to generate a part's prompts when the plan sorts them (a
    /// permutation of `0..prompts.len()`, e.g. by tokenized length). Default: as planned.
    fn order(&mut self, prompts: &[PlannedPrompt]) -> Result<Vec<usize>, SourceError> {
        Ok((0..prompts.len()).collect())
    }
}

/// Errors of a rollout job; `out` is the store the job writes. As in
/// [`StoreError`], a wrapped error is part of the message, not a `source()`.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{out}: rollouts per part ({rollouts_per_part}) must be a positive multiple of the batch size ({batch_size})"
    )]
    PartSize {
        out: PathBuf,
        rollouts_per_part: usize,
        batch_size: usize,
    },
    #[error("{out}: exists; remove it or choose another --out")]
    Exists { out: PathBuf },
    #[error("{out}: an interrupted run left {parts}; pass --resume to continue it, or remove it")]
    Interrupted { out: PathBuf, parts: PathBuf },
    /// The interrupted run's store settings differ from this one's.
    #[error("{out}: cannot resume: {why}")]
    Incompatible {
        out: PathBuf,
        why: Box<Incompatibility>,
    },
    /// The interrupted run's prompts or generation settings differ from this one's.
    #[error("{out}: cannot resume: the prompts or generation settings differ from the interrupted run's")]
    PlanDiffers { out: PathBuf },
    /// Reading or writing `file` (the plan, a part, the parts folder) failed.
    #[error("{out}: {file}: {error}")]
    Io {
        out: PathBuf,
        file: PathBuf,
        error: std::io::Error,
    },
    /// The plan could not be written, or the interrupted run's could not be read.
    #[error("{out}: {file}: {error}")]
    Plan {
        out: PathBuf,
        file: PathBuf,
        error: serde_json::Error,
    },
    /// The source returned another number of rollouts than it was given prompts.
    #[error("{out}: the generator returned {rollouts} rollouts for {prompts} prompts")]
    SourceCount {
        out: PathBuf,
        rollouts: usize,
        prompts: usize,
    },
    #[error(transparent)]
    Write(#[from] recontrol_io::Error),
    #[error("generation failed: {0}")]
    Source(Box<dyn std::error::Error + Send + Sync>),
}

/// What a finished job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutSummary {
    pub rollouts: usize,
    /// Parts found complete and kept (non-zero after a resume).
    pub parts_reused: usize,
    pub parts_written: usize,
    /// The store was complete before this run (a resumed job that had finished): nothing was
    /// done.
    pub already_complete: bool,
}

/// A resumed job whose store is complete: a no-op when the store holds this plan's rollouts
/// (same store settings, the same prompts in the same order), else the reason it does not.
fn already_complete(plan: &RolloutPlan, out: &Path) -> Result<RolloutSummary, RolloutError> {
    let store = Store::open(out)?;
    if let Some(why) = store.meta().incompatibility(&plan.meta) {
        return Err(RolloutError::Incompatible {
            out: out.to_owned(),
            why: Box::new(why),
        });
    }
    let texts = store.texts()?;
    let same_prompts = texts.len() == plan.prompts.len()
        && texts
            .iter()
            .zip(&plan.prompts)
            .all(|((prompt, _), planned)| *prompt == planned.text);
    if !same_prompts {
        return Err(RolloutError::PlanDiffers {
            out: out.to_owned(),
        });
    }
    Ok(RolloutSummary {
        rollouts: texts.len(),
        parts_reused: 0,
        parts_written: 0,
        already_complete: true,
    })
}

/// `OUT.parts`.
pub fn parts_dir(out: &Path) -> PathBuf {
    recontrol_io::sibling(out, ".parts")
}

fn part_path(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("part-{k:06}.h5"))
}

/// Runs (or with `resume`, continues) a job. `progress(done, total)` is called after each batch.
pub fn run(
    plan: &RolloutPlan,
    out: &Path,
    resume: bool,
    source: &mut dyn RolloutSource,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<RolloutSummary, RolloutError> {
    let io = |file: &Path| {
        let file = file.to_owned();
        move |error| RolloutError::Io {
            out: out.to_owned(),
            file,
            error,
        }
    };
    let plan_error = |file: &Path| {
        let file = file.to_owned();
        move |error| RolloutError::Plan {
            out: out.to_owned(),
            file,
            error,
        }
    };
    if plan.batch_size == 0
        || plan.rollouts_per_part == 0
        || !plan.rollouts_per_part.is_multiple_of(plan.batch_size)
    {
        return Err(RolloutError::PartSize {
            out: out.to_owned(),
            rollouts_per_part: plan.rollouts_per_part,
            batch_size: plan.batch_size,
        });
    }
    if out.exists() {
        if !resume {
            return Err(RolloutError::Exists {
                out: out.to_owned(),
            });
        }
        let summary = already_complete(plan, out)?;
        // Killed after the merged store was renamed into place, before its parts were removed.
        let dir = parts_dir(out);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        return Ok(summary);
    }
    let dir = parts_dir(out);
    let plan_path = dir.join("plan.json");
    // A parts folder without its plan was killed before it had written any part.
    if dir.exists() && plan_path.is_file() {
        if !resume {
            return Err(RolloutError::Interrupted {
                out: out.to_owned(),
                parts: dir,
            });
        }
        let text = std::fs::read_to_string(&plan_path).map_err(io(&plan_path))?;
        let previous: RolloutPlan = serde_json::from_str(&text).map_err(plan_error(&plan_path))?;
        if let Some(why) = previous.meta.incompatibility(&plan.meta) {
            return Err(RolloutError::Incompatible {
                out: out.to_owned(),
                why: Box::new(why),
            });
        }
        if previous != *plan {
            return Err(RolloutError::PlanDiffers {
                out: out.to_owned(),
            });
        }
    } else {
        // The store's folder must exist; only the parts folder beside it is made.
        recontrol_io::existing_folder(out)?;
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let json = serde_json::to_string(plan).map_err(plan_error(&plan_path))?;
        write_atomic(&plan_path, json.as_bytes())?;
    }

    let total = plan.prompts.len();
    let parts: Vec<&[PlannedPrompt]> = plan.prompts.chunks(plan.rollouts_per_part).collect();
    let (mut reused, mut written) = (0, 0);
    for (k, part) in parts.iter().enumerate() {
        let path = part_path(&dir, k);
        let first = k * plan.rollouts_per_part;
        if path.is_file() {
            match Store::open(&path) {
                Ok(s) if s.len() == part.len() => {
                    reused += 1;
                    progress(first + part.len(), total);
                    continue;
                }
                // A part is renamed into place only when complete; anything else is redone.
                _ => std::fs::remove_file(&path).map_err(io(&path))?,
            }
        }
        let temp = dir.join(format!("part-{k:06}.h5.tmp"));
        let mut writer = StoreWriter::create(&temp, &plan.meta)?;
        let order = part_order(plan, part, source, out)?;
        // Rollouts made ahead of the next one to write (generated out of order), by position.
        let mut pending: Vec<Option<Rollout>> = (0..part.len()).map(|_| None).collect();
        let (mut next, mut made) = (0, 0);
        for batch in order.chunks(plan.batch_size) {
            let prompts: Vec<PlannedPrompt> = batch.iter().map(|&i| part[i].clone()).collect();
            let rows: Vec<u64> = batch.iter().map(|&i| (first + i) as u64).collect();
            let rollouts = source
                .generate(&prompts, &rows)
                .map_err(RolloutError::Source)?;
            if rollouts.len() != batch.len() {
                return Err(RolloutError::SourceCount {
                    out: out.to_owned(),
                    rollouts: rollouts.len(),
                    prompts: batch.len(),
                });
            }
            for (&i, r) in batch.iter().zip(rollouts) {
                pending[i] = Some(r);
            }
            let mut ready = Vec::new();
            while let Some(r) = pending.get_mut(next).and_then(Option::take) {
                ready.push(r);
                next += 1;
            }
            writer.append(&ready)?;
            made += batch.len();
            progress(first + made, total);
        }
        writer.finish()?;
        std::fs::rename(&temp, &path).map_err(io(&path))?;
        written += 1;
    }

    let part_paths: Vec<PathBuf> = (0..parts.len()).map(|k| part_path(&dir, k)).collect();
    let refs: Vec<&Path> = part_paths.iter().map(PathBuf::as_path).collect();
    let rollouts = if refs.is_empty() {
        let writer = StoreWriter::create(&store::temp_path(out), &plan.meta)?;
        writer.finish()?;
        std::fs::rename(store::temp_path(out), out).map_err(|error| StoreError::Rename {
            path: out.to_owned(),
            temp: store::temp_path(out),
            error,
        })?;
        0
    } else {
        store::merge(&refs, out)?
    };
    std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    Ok(RolloutSummary {
        rollouts,
        parts_reused: reused,
        parts_written: written,
        already_complete: false,
    })
}

/// The order in which a part's prompts are generated: the source's when the plan sorts them
/// (checked to be a permutation), else as planned.
fn part_order(
    plan: &RolloutPlan,
    part: &[PlannedPrompt],
    source: &mut dyn RolloutSource,
    out: &Path,
) -> Result<Vec<usize>, RolloutError> {
    if !plan.sort_by_length {
        return Ok((0..part.len()).collect());
    }
    let order = source.order(part).map_err(RolloutError::Source)?;
    let mut sorted = order.clone();
    sorted.sort_unstable();
    if !sorted.iter().copied().eq(0..part.len()) {
        return Err(RolloutError::Source(
            format!(
                "{}: the rollout source's order is not a permutation of the part's {} prompts",
                out.display(),
                part.len()
            )
            .into(),
        ));
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StateDtype;
    use crate::PromptFormat;
    use ndarray::Array2;

    fn meta(hidden: usize) -> StoreMeta {
        StoreMeta {
            hidden_size: hidden,
            model: "m".into(),
            model_hash: "h".into(),
            state_dtype: StateDtype::F32,
            prompt_format: PromptFormat::Raw,
            generation: serde_json::json!({}),
            seed: 0,
            recontrol_version: "test".into(),
            dataset: "d".into(),
        }
    }

    /// Deterministic fake generator: prompt i gets 1 + i % 3 states filled with its row id.
    /// Fails once after `fail_after` batches, to simulate a crash.
    struct Fake {
        batches: usize,
        fail_after: Option<usize>,
    }

    impl RolloutSource for Fake {
        fn generate(
            &mut self,
            prompts: &[PlannedPrompt],
            rows: &[u64],
        ) -> Result<Vec<Rollout>, SourceError> {
            if self.fail_after == Some(self.batches) {
                self.fail_after = None;
                return Err("simulated crash".into());
            }
            self.batches += 1;
            Ok(prompts
                .iter()
                .zip(rows)
                .map(|(p, &row)| {
                    let row = row as usize;
                    let t = 1 + row % 3;
                    Rollout {
                        prompt_index: p.prompt_index,
                        prompt: p.text.clone(),
                        response: format!("r{row}"),
                        tokens: (0..t as i64).collect(),
                        states: Array2::from_elem((t, 2), row as f32),
                        reward: f32::NAN,
                    }
                })
                .collect())
        }

        /// Last planned first: every batch of a sorted part holds other prompts.
        fn order(&mut self, prompts: &[PlannedPrompt]) -> Result<Vec<usize>, SourceError> {
            Ok((0..prompts.len()).rev().collect())
        }
    }

    fn plan(n: usize) -> RolloutPlan {
        RolloutPlan {
            meta: meta(2),
            prompts: (0..n)
                .map(|i| PlannedPrompt {
                    prompt_index: i as i64 * 10,
                    text: format!("p{i}"),
                })
                .collect(),
            batch_size: 2,
            rollouts_per_part: 4,
            sort_by_length: false,
        }
    }

    fn contents(path: &Path) -> Vec<(i64, String, Vec<i64>, Vec<f32>)> {
        let s = Store::open(path).expect("open");
        (0..s.len())
            .map(|i| {
                let r = s.rollout(i).expect("rollout");
                (
                    r.prompt_index,
                    r.response,
                    r.tokens,
                    r.states.iter().copied().collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_failed_run_resumes_to_the_uninterrupted_result() -> Result<(), RolloutError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let clean = dir.path().join("clean.h5");
        run(
            &plan(11),
            &clean,
            false,
            &mut Fake {
                batches: 0,
                fail_after: None,
            },
            &mut |_, _| {},
        )?;

        let out = dir.path().join("resumed.h5");
        let mut fake = Fake {
            batches: 0,
            fail_after: Some(3),
        };
        let err = run(&plan(11), &out, false, &mut fake, &mut |_, _| {}).expect_err("crash");
        assert!(err.to_string().contains("simulated crash"));
        assert!(!out.exists());
        // Without --resume the leftovers are not silently reused or deleted.
        let err =
            run(&plan(11), &out, false, &mut fake, &mut |_, _| {}).expect_err("needs --resume");
        assert!(err.to_string().contains("pass --resume"), "{err}");
        // Another model cannot continue the run.
        let mut other = plan(11);
        other.meta.model_hash = "other".into();
        let err = run(&other, &out, true, &mut fake, &mut |_, _| {}).expect_err("other model");
        assert!(err.to_string().contains("cannot resume: model"), "{err}");
        let summary = run(&plan(11), &out, true, &mut fake, &mut |_, _| {})?;
        assert_eq!(summary.parts_reused, 1);
        assert_eq!(summary.parts_written, 2);
        assert_eq!(summary.rollouts, 11);
        assert_eq!(contents(&out), contents(&clean));
        assert!(!parts_dir(&out).exists());
        // Resuming a finished job (a requeued array task) does nothing and succeeds ...
        let before = std::fs::read(&out).expect("store bytes");
        let again = run(&plan(11), &out, true, &mut fake, &mut |_, _| {})?;
        assert!(again.already_complete);
        assert_eq!((again.rollouts, again.parts_written), (11, 0));
        assert_eq!(std::fs::read(&out).expect("store bytes"), before);
        // ... unless the finished store is another plan's.
        let err = run(&plan(10), &out, true, &mut fake, &mut |_, _| {}).expect_err("other plan");
        assert!(
            err.to_string()
                .contains("prompts or generation settings differ"),
            "{err}"
        );
        let err = run(&other, &out, true, &mut fake, &mut |_, _| {}).expect_err("other model");
        assert!(err.to_string().contains("cannot resume: model"), "{err}");
        Ok(())
    }

    #[test]
    fn a_sorted_part_writes_the_planned_order() -> Result<(), RolloutError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let new = || Fake {
            batches: 0,
            fail_after: None,
        };
        let planned = dir.path().join("planned.h5");
        run(&plan(11), &planned, false, &mut new(), &mut |_, _| {})?;
        let sorted_plan = RolloutPlan {
            sort_by_length: true,
            ..plan(11)
        };
        let sorted = dir.path().join("sorted.h5");
        let mut seen = Vec::new();
        run(&sorted_plan, &sorted, false, &mut new(), &mut |done, _| {
            seen.push(done)
        })?;
        assert_eq!(contents(&sorted), contents(&planned));
        assert_eq!(seen, [2, 4, 6, 8, 10, 11]);
        // Killed in the second part: the resume gives the same store.
        let resumed = dir.path().join("resumed.h5");
        let mut fake = Fake {
            batches: 0,
            fail_after: Some(3),
        };
        run(&sorted_plan, &resumed, false, &mut fake, &mut |_, _| {}).expect_err("crash");
        run(&sorted_plan, &resumed, true, &mut fake, &mut |_, _| {})?;
        assert_eq!(contents(&resumed), contents(&planned));

        /// An order that repeats a prompt.
        struct Bad(Fake);
        impl RolloutSource for Bad {
            fn generate(
                &mut self,
                prompts: &[PlannedPrompt],
                rows: &[u64],
            ) -> Result<Vec<Rollout>, SourceError> {
                self.0.generate(prompts, rows)
            }
            fn order(&mut self, prompts: &[PlannedPrompt]) -> Result<Vec<usize>, SourceError> {
                Ok(vec![0; prompts.len()])
            }
        }
        let bad = dir.path().join("bad.h5");
        let err = run(&sorted_plan, &bad, false, &mut Bad(new()), &mut |_, _| {})
            .expect_err("not a permutation");
        assert!(err.to_string().contains("not a permutation"), "{err}");
        Ok(())
    }

    #[test]
    fn kills_at_the_edges_of_a_run_are_resumed() -> Result<(), RolloutError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fake = Fake {
            batches: 0,
            fail_after: None,
        };
        let clean = dir.path().join("clean.h5");
        run(&plan(11), &clean, false, &mut fake, &mut |_, _| {})?;
        // Killed after the parts folder was made, before its plan was written.
        let out = dir.path().join("early.h5");
        std::fs::create_dir(parts_dir(&out)).expect("mkdir");
        run(&plan(11), &out, true, &mut fake, &mut |_, _| {})?;
        assert_eq!(contents(&out), contents(&clean));
        assert!(!parts_dir(&out).exists());
        // Killed after the merged store was renamed into place, before the parts were removed:
        // the resume is a no-op that removes them.
        std::fs::create_dir(parts_dir(&out)).expect("mkdir");
        std::fs::write(parts_dir(&out).join("part-000000.h5"), b"").expect("write");
        let before = std::fs::read(&out).expect("store bytes");
        let again = run(&plan(11), &out, true, &mut fake, &mut |_, _| {})?;
        assert!(again.already_complete);
        assert!(!parts_dir(&out).exists());
        assert_eq!(std::fs::read(&out).expect("store bytes"), before);
        Ok(())
    }
}
