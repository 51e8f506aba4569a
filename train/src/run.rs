//! How a training call runs ([`RunControl`]) and the resumable epoch loop that reward and value
//! training share ([`EpochLoop`]). Pretraining's step loop uses the same [`RunControl`]: its
//! checkpoint, its resume check and its cap.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::checkpoint::{self, Tensors};
use crate::optim::AdamW;
use crate::{Error, Result};

/// How a training call runs: where its checkpoint lives, whether to continue an interrupted
/// run from it, and an optional cap on the epochs (epoch loops) or steps (pretraining) of this
/// call, for time-boxed jobs that resume later.
#[derive(Debug, Clone, Copy)]
pub struct RunControl<'a> {
    pub checkpoint: &'a Path,
    pub resume: bool,
    pub max_this_run: Option<usize>,
}

impl RunControl<'_> {
    /// Where this call stops when it starts at `start` of `total`: `total`, or sooner by the cap.
    pub fn end(&self, start: usize, total: usize) -> usize {
        self.max_this_run
            .map_or(total, |m| start.saturating_add(m).min(total))
    }

    /// The saved state and tensors of the interrupted run to continue: `None` unless resuming
    /// and the checkpoint exists. A checkpoint whose state `same_settings` rejects was made with
    /// other settings and is refused.
    pub fn resume_point<S: DeserializeOwned>(
        &self,
        same_settings: impl FnOnce(&S) -> bool,
    ) -> Result<Option<(S, Tensors)>> {
        if !(self.resume && self.checkpoint.is_file()) {
            return Ok(None);
        }
        let (state, tensors) = checkpoint::load(self.checkpoint)?;
        if !same_settings(&state) {
            return Err(Error::OtherSettings {
                checkpoint: self.checkpoint.to_owned(),
            });
        }
        Ok(Some((state, tensors)))
    }

    /// Saves `state`, the optimizer and `extra` tensors to the checkpoint.
    pub fn save<S: Serialize + ?Sized>(
        &self,
        state: &S,
        opt: &AdamW,
        extra: &[(String, Tensor)],
    ) -> Result<()> {
        checkpoint::save(self.checkpoint, state, opt, extra)
    }

    /// The saved tensor `name`.
    pub fn tensor<'t>(&self, tensors: &'t Tensors, name: &str) -> Result<&'t Tensor> {
        tensors.get(name).ok_or_else(|| Error::MissingTensor {
            checkpoint: self.checkpoint.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Copies the saved parameters into `opt`'s (by name; shapes must agree) and restores its
    /// moments after `adam_steps` updates.
    pub fn restore(&self, opt: &mut AdamW, tensors: &Tensors, adam_steps: i64) -> Result<()> {
        {
            let _guard = tch::no_grad_guard();
            for (name, p) in opt.params() {
                let saved = self.tensor(tensors, name)?;
                if saved.size() != p.size() {
                    return Err(Error::TensorShape {
                        checkpoint: self.checkpoint.to_owned(),
                        name: name.clone(),
                        expected: p.size(),
                        found: saved.size(),
                    });
                }
                p.shallow_clone().f_copy_(saved)?;
            }
        }
        opt.load_state(tensors, adam_steps)
    }
}

/// What an epoch tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Training has ended before its last epoch (early stopping).
    Stop,
}

/// The JSON state an epoch loop keeps in its checkpoint: its progress, the run's settings `K`
/// (a resume must match them) and the trainer's own record `R` (history, best epoch), the last
/// two flattened into the same object.
#[derive(Debug, Serialize, Deserialize)]
struct EpochState<K, R> {
    epochs_done: usize,
    /// Optimizer updates taken (AdamW's bias correction depends on it).
    adam_steps: i64,
    stopped: bool,
    #[serde(flatten)]
    settings: K,
    #[serde(flatten)]
    record: R,
}

/// A resumable loop over the epochs of a training run: it continues an interrupted run from
/// its checkpoint (made with the same settings `K`, else refused), runs this call's epochs,
/// writes a checkpoint after each, and stops at the last epoch, at the cap of the
/// [`RunControl`] or when an epoch says [`Flow::Stop`]. `R` is what the trainer records as it
/// goes; it is saved and restored with the checkpoint.
#[derive(Debug)]
pub struct EpochLoop<'a, K, R> {
    run: RunControl<'a>,
    epochs: usize,
    state: EpochState<K, R>,
}

/// Where an [`EpochLoop`] call ended.
#[derive(Debug)]
pub struct Finished<R> {
    pub record: R,
    pub epochs_done: usize,
    /// Whether training has ended (every epoch, or stopped early) rather than been capped.
    pub complete: bool,
}

impl<'a, K, R> EpochLoop<'a, K, R>
where
    K: Serialize + DeserializeOwned + PartialEq,
    R: Serialize + DeserializeOwned,
{
    /// A loop of `epochs` epochs with `settings`. Fresh, it starts from `opt` as it is and from
    /// `record`. Resuming (the run asks to and its checkpoint exists), it continues from the
    /// checkpoint, which must have been made with the same settings: `opt`'s parameters (by
    /// name) and moments are restored, and the record is the saved one. The checkpoint's
    /// tensors come back too, for whatever else the trainer saved beside the optimizer.
    pub fn resume_or_start(
        run: RunControl<'a>,
        epochs: usize,
        settings: K,
        record: R,
        opt: &mut AdamW,
    ) -> Result<(Self, Option<Tensors>)> {
        let resumed = run.resume_point(|saved: &EpochState<K, R>| saved.settings == settings)?;
        let Some((state, tensors)) = resumed else {
            let state = EpochState {
                epochs_done: 0,
                adam_steps: opt.steps(),
                stopped: false,
                settings,
                record,
            };
            return Ok((Self { run, epochs, state }, None));
        };
        run.restore(opt, &tensors, state.adam_steps)?;
        Ok((Self { run, epochs, state }, Some(tensors)))
    }

    /// Epochs done so far (before this call's, until [`run`](Self::run)).
    pub fn epochs_done(&self) -> usize {
        self.state.epochs_done
    }

    /// The trainer's record.
    pub fn record(&self) -> &R {
        &self.state.record
    }

    /// The trainer's record, to complete after a resume.
    pub fn record_mut(&mut self) -> &mut R {
        &mut self.state.record
    }

    /// Runs this call's epochs: `epoch(index, opt, record)` trains and evaluates epoch `index`
    /// (from 0) and updates the record; then a checkpoint is written with the optimizer and
    /// `extra(record)` tensors.
    pub fn run<E: From<Error>>(
        mut self,
        opt: &mut AdamW,
        epoch: &mut dyn FnMut(usize, &mut AdamW, &mut R) -> Result<Flow, E>,
        extra: &dyn Fn(&R) -> Vec<(String, Tensor)>,
    ) -> Result<Finished<R>, E> {
        let end = self.run.end(self.state.epochs_done, self.epochs);
        while self.state.epochs_done < end && !self.state.stopped {
            let flow = epoch(self.state.epochs_done, opt, &mut self.state.record)?;
            self.state.epochs_done += 1;
            self.state.stopped = flow == Flow::Stop;
            self.state.adam_steps = opt.steps();
            self.run
                .save(&self.state, opt, &extra(&self.state.record))?;
        }
        Ok(Finished {
            complete: self.state.stopped || self.state.epochs_done >= self.epochs,
            epochs_done: self.state.epochs_done,
            record: self.state.record,
        })
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;
    use crate::optim::AdamWConfig;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Settings {
        lr: f64,
        seed: u64,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    struct Record {
        losses: Vec<f64>,
    }

    /// Fits w to (1, 2, 3) by least squares, four minibatch steps per epoch; stops early once
    /// the loss is below `stop_below`.
    fn train(
        run: RunControl<'_>,
        settings: Settings,
        stop_below: f64,
    ) -> Result<(Tensor, Finished<Record>)> {
        let w = Tensor::f_zeros([3], (Kind::Float, Device::Cpu))?.set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("w".into(), w.shallow_clone())],
            AdamWConfig::default(),
        )?;
        let lr = settings.lr;
        let (epochs, _) =
            EpochLoop::resume_or_start(run, 6, settings, Record::default(), &mut opt)?;
        let target = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let finished = epochs.run(
            &mut opt,
            &mut |_, opt, record| {
                let mut loss = 0.0;
                for _ in 0..4 {
                    let l = (&w - &target).f_square()?.f_sum(Kind::Float)?;
                    opt.zero_grad();
                    l.f_backward()?;
                    opt.step(lr)?;
                    loss = l.f_double_value(&[])?;
                }
                record.losses.push(loss);
                Ok::<_, Error>(if loss < stop_below {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            },
            &|_| Vec::new(),
        )?;
        Ok((w.detach(), finished))
    }

    fn control(checkpoint: &Path, resume: bool, cap: Option<usize>) -> RunControl<'_> {
        RunControl {
            checkpoint,
            resume,
            max_this_run: cap,
        }
    }

    #[test]
    fn a_resumed_loop_ends_where_the_uninterrupted_one_does() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = || Settings { lr: 0.1, seed: 0 };
        let (a, whole) = train(control(&dir.path().join("a"), false, None), settings(), 0.0)?;
        assert!(whole.complete && whole.epochs_done == 6);

        let b_path = dir.path().join("b");
        let (_, part) = train(control(&b_path, true, Some(2)), settings(), 0.0)?;
        assert!(!part.complete && part.epochs_done == 2 && part.record.losses.len() == 2);
        let (_, part) = train(control(&b_path, true, Some(3)), settings(), 0.0)?;
        assert!(!part.complete && part.epochs_done == 5);
        let (b, rest) = train(control(&b_path, true, None), settings(), 0.0)?;
        assert!(rest.complete && rest.epochs_done == 6);
        assert!(b.equal(&a), "{b} vs {a}");
        assert_eq!(rest.record.losses, whole.record.losses);

        // Without --resume the checkpoint is ignored; with other settings it is refused.
        let (fresh, _) = train(control(&b_path, false, Some(1)), settings(), 0.0)?;
        assert!(!fresh.equal(&a));
        let err = train(
            control(&b_path, true, None),
            Settings { lr: 0.1, seed: 1 },
            0.0,
        )
        .expect_err("other settings");
        assert_eq!(
            err.to_string(),
            format!(
                "{} was made with other settings; resume with the same flags, or remove it",
                b_path.display()
            )
        );
        Ok(())
    }

    #[test]
    fn an_early_stop_ends_the_run_and_survives_a_resume() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c");
        let settings = || Settings { lr: 0.1, seed: 0 };
        let (_, stopped) = train(control(&path, true, None), settings(), f64::INFINITY)?;
        assert!(stopped.complete && stopped.epochs_done == 1);
        // Resuming a stopped run trains nothing more.
        let (_, again) = train(control(&path, true, None), settings(), f64::INFINITY)?;
        assert!(again.complete && again.epochs_done == 1 && again.record.losses.len() == 1);
        Ok(())
    }

    #[test]
    fn the_cap_counts_from_where_the_call_starts() {
        let run = control(Path::new("x"), true, Some(3));
        assert_eq!(run.end(0, 10), 3);
        assert_eq!(run.end(8, 10), 10);
        assert_eq!(control(Path::new("x"), true, None).end(4, 10), 10);
    }
}
