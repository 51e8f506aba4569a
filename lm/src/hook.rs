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
