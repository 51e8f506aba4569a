//! The decoding engine: one thread that owns the model and the value heads and decodes every
//! request's rows together, continuously batched at step granularity.
//!
//! Each step: rows that arrived are prefilled together and joined to the batch (their caches
//! right-aligned, the padding masked out, as a left-padded prompt batch); the final hidden
//! states of the rows that steer are edited, grouped by value head and settings; every row's
//! token is chosen (greedy or from its own seeded stream); rows that finished or whose client
//! went away leave; the rest feed their token. A row's tokens do not depend on what else is in
//! the batch (up to floating-point summation order).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use recontrol_controller::{ControlConfig, Controller, GradientBackend, UpdateRule};
use recontrol_lm::sampling::{Sampler, Sampling};
use recontrol_lm::{CausalLm, FinishReason, GenerationConfig, KvCache, Positions, PromptBatch};
use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::{Metrics, Mode, ModeLabels};

/// A value head the engine steers with.
pub struct Head {
    pub name: String,
    pub backend: Box<dyn GradientBackend>,
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Head")
            .field("name", &self.name)
            .field("backend", &self.backend.describe())
            .finish()
    }
}

/// How one row steers: a head (index into the engine's heads) and the update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowControl {
    pub head: usize,
    pub alpha: f64,
    pub steps: usize,
    pub max_edit_norm: Option<f64>,
}

impl RowControl {
    fn config(&self) -> ControlConfig {
        ControlConfig {
            alpha: self.alpha,
            steps: self.steps,
            rule: UpdateRule::Sgd,
            clip_grad_norm: None,
            max_edit_norm: self.max_edit_norm,
        }
    }

    /// Rows with equal keys are edited together.
    fn key(&self) -> GroupKey {
        (
            self.head,
            self.alpha.to_bits(),
            self.steps,
            self.max_edit_norm.map(f64::to_bits),
        )
    }
}

/// Head, alpha bits, steps and edit-bound bits: rows edited together.
type GroupKey = (usize, u64, usize, Option<u64>);

/// One row to decode: a prompt's choice.
#[derive(Debug)]
pub struct RowJob {
    pub prompt: Vec<i64>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// The row's random stream of the sampling seed.
    pub stream: u64,
    pub control: Option<RowControl>,
    /// Send each token's edit norm and values.
    pub trace: bool,
    /// When the request arrived (latency metrics).
    pub arrived: Instant,
    /// Set by the request when it needs no more tokens (a stop sequence was hit): the row leaves
    /// at the next step.
    pub cancel: Arc<AtomicBool>,
    pub events: UnboundedSender<RowEvent>,
}

/// What a row's edit did to one token's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceStep {
    pub edit_norm: f64,
    pub value_before: f64,
    pub value_after: f64,
}

/// What the engine tells a row's request.
#[derive(Debug, Clone, PartialEq)]
pub enum RowEvent {
    Token { id: i64, trace: Option<TraceStep> },
    Finished(FinishReason),
    Failed(String),
}

/// State shared with the HTTP side.
#[derive(Debug, Default)]
pub struct Shared {
    pub metrics: Metrics,
    /// Rows sent to the engine and not admitted yet.
    pub queued: std::sync::atomic::AtomicUsize,
    /// Set on shutdown after the grace period: every row is failed and the engine stops.
    pub cancel: AtomicBool,
}

/// A row in the batch.
#[derive(Debug)]
struct Row {
    job: RowJob,
    sampler: Sampler,
    /// Position of the token fed next.
    position: i64,
    generated: usize,
    /// Leading cache columns that are padding for this row.
    pad: usize,
}

/// The batch being decoded: rows, their cache and mask, and the final states whose tokens are
/// chosen next.
struct Batch {
    rows: Vec<Row>,
    cache: KvCache,
    /// `[rows, cache.len()]`, true at real positions.
    key_mask: Tensor,
    /// `[rows, hidden]`.
    hidden: Tensor,
}

/// The engine; [`Engine::run`] decodes until the job channel closes or `cancel` is set.
pub struct Engine {
    model: CausalLm,
    heads: Vec<Head>,
    eos_token_ids: Vec<i64>,
    pad_token_id: i64,
    max_batch: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("heads", &self.heads)
            .field("max_batch", &self.max_batch)
            .finish()
    }
}

type EngineResult<T> = std::result::Result<T, String>;

fn torch(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Engine {
    pub fn new(
        model: CausalLm,
        heads: Vec<Head>,
        eos_token_ids: Vec<i64>,
        pad_token_id: i64,
        max_batch: usize,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            model,
            heads,
            eos_token_ids,
            pad_token_id,
            max_batch: max_batch.max(1),
            shared,
        }
    }

    /// Decodes jobs from `jobs` until the channel closes (every sender dropped) or cancel is
    /// set. A failed step fails the rows in it and the engine goes on.
    pub fn run(mut self, jobs: Receiver<RowJob>) {
        let _guard = tch::no_grad_guard();
        let mut batch: Option<Batch> = None;
        let mut waiting: Vec<RowJob> = Vec::new();
        let mut open = true;
        loop {
            if self.shared.cancel.load(Ordering::SeqCst) {
                self.fail_all(
                    batch.take(),
                    &mut waiting,
                    &jobs,
                    "the server is shutting down",
                );
                return;
            }
            let active = batch.as_ref().map_or(0, |b| b.rows.len());
            if active == 0 && waiting.is_empty() {
                if !open {
                    return;
                }
                // Idle: wait for work, waking to notice a cancel.
                match jobs.recv_timeout(Duration::from_millis(100)) {
                    Ok(job) => waiting.push(job),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while active + waiting.len() < self.max_batch && open {
                match jobs.try_recv() {
                    Ok(job) => waiting.push(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            let started = Instant::now();
            let room = self.max_batch - active;
            let admitted: Vec<RowJob> = waiting.drain(..room.min(waiting.len())).collect();
            self.shared
                .queued
                .fetch_sub(admitted.len(), Ordering::SeqCst);
            let result = self.step(&mut batch, admitted);
            if let Err(message) = result {
                // The batch is in an unknown state: fail its rows, keep serving.
                if let Some(b) = batch.take() {
                    for row in b.rows {
                        let _ = row.job.events.send(RowEvent::Failed(message.clone()));
                    }
                }
            }
            let rows = batch.as_ref().map_or(0, |b| b.rows.len());
            let m = &self.shared.metrics;
            m.active_rows.set(rows as i64);
            m.queue_depth
                .set(self.shared.queued.load(Ordering::SeqCst) as i64);
            m.step_seconds.observe(started.elapsed().as_secs_f64());
        }
    }

    fn fail_all(
        &self,
        batch: Option<Batch>,
        waiting: &mut Vec<RowJob>,
        jobs: &Receiver<RowJob>,
        message: &str,
    ) {
        let rows = batch
            .into_iter()
            .flat_map(|b| b.rows.into_iter().map(|r| r.job));
        let queued: Vec<RowJob> = waiting.drain(..).chain(jobs.try_iter()).collect();
        for job in rows.chain(queued) {
            let _ = job.events.send(RowEvent::Failed(message.to_owned()));
        }
    }

    /// One decoding step with `admitted` joining first.
    fn step(&mut self, batch: &mut Option<Batch>, admitted: Vec<RowJob>) -> EngineResult<()> {
        // A client that left while queued never costs a prefill.
        let admitted: Vec<RowJob> = admitted
            .into_iter()
            .filter(|j| !j.events.is_closed() && !j.cancel.load(Ordering::SeqCst))
            .collect();
        if !admitted.is_empty() {
            match self.prefill(&admitted) {
                Ok(parts) => {
                    let joined = self.admit(admitted, parts);
                    *batch = Some(match batch.take() {
                        Some(b) => join(b, joined)?,
                        None => joined,
                    });
                }
                // Only the new rows fail; the batch goes on.
                Err(message) => {
                    for job in admitted {
                        let _ = job.events.send(RowEvent::Failed(message.clone()));
                    }
                }
            }
        }
        let Some(b) = batch.as_mut() else {
            return Ok(());
        };
        self.shared.metrics.batch_size.observe(b.rows.len() as f64);
        let traces = self.edit(b)?;
        let next = self.choose(b)?;
        let mut keep = Vec::with_capacity(b.rows.len());
        for (i, row) in b.rows.iter_mut().enumerate() {
            let token = next[i];
            if row.generated == 0 {
                self.shared
                    .metrics
                    .first_token_seconds
                    .observe(row.job.arrived.elapsed().as_secs_f64());
            }
            row.generated += 1;
            let mode = if row.job.control.is_some() {
                Mode::Controlled
            } else {
                Mode::Plain
            };
            self.shared
                .metrics
                .generated_tokens
                .get_or_create(&ModeLabels { mode })
                .inc();
            let trace = traces[i].filter(|_| row.job.trace);
            let sent = row
                .job
                .events
                .send(RowEvent::Token { id: token, trace })
                .is_ok();
            let finished = if self.eos_token_ids.contains(&token) {
                Some(FinishReason::Eos)
            } else if row.generated >= row.job.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = finished {
                let _ = row.job.events.send(RowEvent::Finished(reason));
                self.shared
                    .metrics
                    .request_seconds
                    .get_or_create(&ModeLabels { mode })
                    .observe(row.job.arrived.elapsed().as_secs_f64());
            }
            let cancelled = row.job.cancel.load(Ordering::SeqCst);
            keep.push(sent && finished.is_none() && !cancelled);
        }
        if keep.iter().all(|&k| !k) {
            *batch = None;
            return Ok(());
        }
        if keep.iter().any(|&k| !k) {
            retain(b, &keep)?;
        }
        let fed: Vec<i64> = next
            .iter()
            .zip(&keep)
            .filter(|(_, &k)| k)
            .map(|(&t, _)| t)
            .collect();
        self.feed(b, &fed)?;
        trim_front(b)?;
        Ok(())
    }

    /// Prefills `jobs` together (left-padded): their cache, key mask and final states.
    fn prefill(&self, jobs: &[RowJob]) -> EngineResult<(KvCache, Tensor, Tensor)> {
        let prompts: Vec<Vec<i64>> = jobs.iter().map(|j| j.prompt.clone()).collect();
        let max_tokens = jobs.iter().map(|j| j.max_tokens).max().unwrap_or(1);
        let config = GenerationConfig {
            max_new_tokens: max_tokens,
            sampling: Sampling::Greedy,
            eos_token_ids: self.eos_token_ids.clone(),
            pad_token_id: self.pad_token_id,
            first_row: 0,
            row_streams: None,
        };
        let prompt_batch = PromptBatch::new(&self.model, &prompts, &config).map_err(torch)?;
        let mut cache = self.model.new_cache(prompt_batch.width + max_tokens);
        let hidden = self
            .model
            .forward_hidden(&prompt_batch.input(), &mut cache, Positions::Last)
            .map_err(torch)?;
        let key_mask = match &prompt_batch.key_mask {
            Some(mask) => mask.shallow_clone(),
            None => Tensor::f_ones(
                [jobs.len() as i64, prompt_batch.width as i64],
                (Kind::Bool, self.model.device()),
            )
            .map_err(torch)?,
        };
        Ok((cache, key_mask, hidden))
    }

    /// The prefilled `jobs` as a batch of their own.
    fn admit(
        &self,
        jobs: Vec<RowJob>,
        (cache, key_mask, hidden): (KvCache, Tensor, Tensor),
    ) -> Batch {
        let width = cache.len();
        let rows = jobs
            .into_iter()
            .map(|job| {
                self.shared
                    .metrics
                    .prompt_tokens
                    .inc_by(job.prompt.len() as u64);
                Row {
                    sampler: Sampler::new(job.sampling.clone(), job.stream),
                    position: job.prompt.len() as i64,
                    generated: 0,
                    pad: width - job.prompt.len(),
                    job,
                }
            })
            .collect();
        Batch {
            rows,
            cache,
            key_mask,
            hidden,
        }
    }

    /// Edits the states of the rows that steer, grouped by head and settings; each row's trace.
    fn edit(&mut self, b: &mut Batch) -> EngineResult<Vec<Option<TraceStep>>> {
        let mut traces = vec![None; b.rows.len()];
        let mut groups: BTreeMap<GroupKey, (RowControl, Vec<i64>)> = BTreeMap::new();
        for (i, row) in b.rows.iter().enumerate() {
            if let Some(c) = row.job.control {
                groups
                    .entry(c.key())
                    .or_insert((c, Vec::new()))
                    .1
                    .push(i as i64);
            }
        }
        for (control, rows) in groups.into_values() {
            let index = Tensor::from_slice(&rows)
                .f_to_device(b.hidden.device())
                .map_err(torch)?;
            let h = b.hidden.f_index_select(0, &index).map_err(torch)?;
            let head = &mut self.heads[control.head];
            let mut controller =
                Controller::new(&mut *head.backend, control.config()).map_err(torch)?;
            let (edited, before, after) = controller.edit(&h).map_err(torch)?;
            let host = |t: &Tensor| -> EngineResult<Vec<f64>> {
                Vec::<f64>::try_from(
                    t.f_to_kind(Kind::Double)
                        .and_then(|t| t.f_to_device(Device::Cpu))
                        .and_then(|t| t.f_flatten(0, -1))
                        .map_err(torch)?,
                )
                .map_err(torch)
            };
            let norms = host(
                &edited
                    .f_to_kind(Kind::Float)
                    .and_then(|e| e.f_sub(&h.f_to_kind(Kind::Float)?))
                    .and_then(|d| d.f_norm_scalaropt_dim(2, [1i64].as_slice(), false))
                    .map_err(torch)?,
            )?;
            let (before, after) = (host(&before)?, host(&after)?);
            for (k, &row) in rows.iter().enumerate() {
                traces[row as usize] = Some(TraceStep {
                    edit_norm: norms[k],
                    value_before: before[k],
                    value_after: after[k],
                });
            }
            b.hidden = b
                .hidden
                .f_index_copy(
                    0,
                    &index,
                    &edited.f_to_kind(b.hidden.kind()).map_err(torch)?,
                )
                .map_err(torch)?;
        }
        Ok(traces)
    }

    /// Every row's next token: greedy rows take the argmax, sampling rows draw from their
    /// stream, as `recontrol generate` does.
    fn choose(&self, b: &mut Batch) -> EngineResult<Vec<i64>> {
        let logits = self.model.logits(&b.hidden).map_err(torch)?; // [rows, vocab]
        let mut next = recontrol_lm::sampling::greedy_tokens(&logits).map_err(torch)?;
        let sampled: Vec<usize> = (0..b.rows.len())
            .filter(|&i| b.rows[i].sampler.sampling() != &Sampling::Greedy)
            .collect();
        if !sampled.is_empty() {
            let index: Vec<i64> = sampled.iter().map(|&i| i as i64).collect();
            let index = Tensor::from_slice(&index)
                .f_to_device(logits.device())
                .map_err(torch)?;
            let picked = logits
                .f_index_select(0, &index)
                .and_then(|t| t.f_to_kind(Kind::Float))
                .and_then(|t| t.f_to_device(Device::Cpu))
                .map_err(torch)?;
            let vocab = picked.size()[1] as usize;
            let flat =
                Vec::<f32>::try_from(picked.f_flatten(0, -1).map_err(torch)?).map_err(torch)?;
            for (k, &i) in sampled.iter().enumerate() {
                next[i] = b.rows[i].sampler.choose(&flat[k * vocab..(k + 1) * vocab]) as i64;
            }
        }
        Ok(next)
    }

    /// Feeds each row's token at its next position; the new final states replace `hidden`.
    fn feed(&self, b: &mut Batch, tokens: &[i64]) -> EngineResult<()> {
        let rows = b.rows.len() as i64;
        let device = self.model.device();
        let positions: Vec<i64> = b.rows.iter().map(|r| r.position).collect();
        let ones = Tensor::f_ones([rows, 1], (Kind::Bool, device)).map_err(torch)?;
        b.key_mask = Tensor::f_cat(&[&b.key_mask, &ones], 1).map_err(torch)?;
        let input_ids = Tensor::from_slice(tokens)
            .f_view([rows, 1])
            .and_then(|t| t.f_to_device(device))
            .map_err(torch)?;
        let position_ids = Tensor::from_slice(&positions)
            .f_view([rows, 1])
            .and_then(|t| t.f_to_device(device))
            .map_err(torch)?;
        let input = recontrol_lm::StepInput {
            input_ids: &input_ids,
            position_ids: &position_ids,
            key_mask: Some(&b.key_mask),
        };
        b.hidden = self
            .model
            .forward_hidden(&input, &mut b.cache, Positions::Last)
            .map_err(torch)?;
        for row in &mut b.rows {
            row.position += 1;
        }
        Ok(())
    }
}

/// `a`'s rows then `b`'s, their caches and masks right-aligned to the longer.
fn join(mut a: Batch, b: Batch) -> EngineResult<Batch> {
    let (la, lb) = (a.cache.len(), b.cache.len());
    let len = la.max(lb);
    let cache = KvCache::join_rows(&[&a.cache, &b.cache]).map_err(torch)?;
    let pad_mask = |mask: &Tensor, by: usize| -> EngineResult<Tensor> {
        if by == 0 {
            return Ok(mask.shallow_clone());
        }
        let rows = mask.size()[0];
        let pad = Tensor::f_zeros([rows, by as i64], (Kind::Bool, mask.device())).map_err(torch)?;
        Tensor::f_cat(&[&pad, mask], 1).map_err(torch)
    };
    let key_mask = Tensor::f_cat(
        &[
            pad_mask(&a.key_mask, len - la)?,
            pad_mask(&b.key_mask, len - lb)?,
        ],
        0,
    )
    .map_err(torch)?;
    let hidden = Tensor::f_cat(&[&a.hidden, &b.hidden], 0).map_err(torch)?;
    for row in &mut a.rows {
        row.pad += len - la;
    }
    let mut rows = a.rows;
    rows.extend(b.rows.into_iter().map(|mut r| {
        r.pad += len - lb;
        r
    }));
    Ok(Batch {
        rows,
        cache,
        key_mask,
        hidden,
    })
}

/// Keeps the rows where `keep` is true.
fn retain(b: &mut Batch, keep: &[bool]) -> EngineResult<()> {
    let index: Vec<i64> = (0..keep.len() as i64)
        .filter(|&i| keep[i as usize])
        .collect();
    let index = Tensor::from_slice(&index)
        .f_to_device(b.hidden.device())
        .map_err(torch)?;
    b.cache = b.cache.select_rows(&index).map_err(torch)?;
    b.key_mask = b.key_mask.f_index_select(0, &index).map_err(torch)?;
    b.hidden = b.hidden.f_index_select(0, &index).map_err(torch)?;
    let mut flags = keep.iter();
    b.rows.retain(|_| *flags.next().unwrap_or(&false));
    Ok(())
}

/// Drops cache columns that are padding for every row, once they are worth a copy.
fn trim_front(b: &mut Batch) -> EngineResult<()> {
    let Some(common) = b.rows.iter().map(|r| r.pad).min() else {
        return Ok(());
    };
    if common == 0 || (common < 64 && common * 4 < b.cache.len()) {
        return Ok(());
    }
    b.cache.drop_front(common).map_err(torch)?;
    let len = b.key_mask.size()[1];
    b.key_mask = b
        .key_mask
        .f_narrow(1, common as i64, len - common as i64)
        .map_err(torch)?;
    for row in &mut b.rows {
        row.pad -= common;
    }
    Ok(())
}
