//! The seam where RE-Control acts: a hook on the final post-norm hidden state of the newest
//! position, called at every decoding step before the logits are computed.

use tch::Tensor;

/// What a hook is told about the step it is called at.
#[derive(Debug, Clone, Copy)]
pub struct HookContext<'a> {
    /// 0 at the last prompt token (prefill), then one per generated token.
    pub step: usize,
    /// Batch rows the states belong to, in order (finished rows are left out).
    pub rows: &'a [usize],
}

/// Errors a hook may return; the generator wraps them in [`crate::Error::Hook`].
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Observes or replaces final hidden states during generation.
///
/// `apply` receives the post-norm states `[rows, hidden]` of the rows still generating and
/// returns the states the logits are computed from, of the same shape. Rollout recording returns
/// its input unchanged; the controller returns edited states. The KV cache is not affected.
pub trait HiddenStateHook {
    /// Called once per decoding step.
    fn apply(&mut self, ctx: &HookContext<'_>, hidden: Tensor) -> Result<Tensor, HookError>;
}

/// The hook that leaves states alone (plain generation).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHook;

impl HiddenStateHook for NoHook {
    fn apply(&mut self, _ctx: &HookContext<'_>, hidden: Tensor) -> Result<Tensor, HookError> {
        Ok(hidden)
    }
}

/// Records the states a generation goes through, per batch row, as float32 on the host: the
/// observing hook of rollout collection. Row `r`'s `t`-th state is the one that produced its
/// token `t + 1` (the first is the last prompt position's).
#[derive(Debug, Default)]
pub struct StateRecorder {
    /// Per row: its states, `hidden` floats each, concatenated.
    rows: Vec<Vec<f32>>,
    hidden: usize,
}

impl StateRecorder {
    /// A recorder for a batch of `batch` rows.
    pub fn new(batch: usize) -> Self {
        Self {
            rows: vec![Vec::new(); batch],
            hidden: 0,
        }
    }

    /// Width of each state (0 before the first step).
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The recorded states of each row, `steps * hidden` floats.
    pub fn into_rows(self) -> Vec<Vec<f32>> {
        self.rows
    }
}

impl HiddenStateHook for StateRecorder {
    fn apply(&mut self, ctx: &HookContext<'_>, hidden: Tensor) -> Result<Tensor, HookError> {
        let size = hidden.size();
        let width = size.get(1).copied().unwrap_or(0) as usize;
        self.hidden = width;
        let host = hidden
            .f_to_kind(tch::Kind::Float)?
            .f_to_device(tch::Device::Cpu)?
            .f_contiguous()?;
        let flat = Vec::<f32>::try_from(host.f_flatten(0, -1)?)?;
        let batch = self.rows.len();
        for (i, &row) in ctx.rows.iter().enumerate() {
            let slot = self
                .rows
                .get_mut(row)
                .ok_or_else(|| format!("row {row} outside a recorder of {batch} rows"))?;
            slot.extend_from_slice(&flat[i * width..(i + 1) * width]);
        }
        Ok(hidden)
    }
}
