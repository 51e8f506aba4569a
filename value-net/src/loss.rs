//! The Bellman loss of the value function, written once and used by training and evaluation.
//!
//! With no intermediate reward and gamma = 1, V(s_t) = V(s_{t+1}) for non-terminal t and
//! V(s_{T-1}) = r at the last state of a rollout. The reference code regressed the reward at
//! the first step (an argmax over the mask) and let gradients flow into the bootstrap target;
//! here the terminal flag comes from the store's rollout offsets (the last row of each rollout)
//! and the target is detached (semi-gradient TD).

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// What a non-terminal state regresses to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// TD(0): the stop-gradient value of the next state (the paper's Bellman equation).
    #[default]
    Td0,
    /// Monte-Carlo: the rollout's final reward (gamma = 1, no intermediate rewards).
    Mc,
}

/// `mean((V(s_t) - target_t)^2)` over a minibatch of transitions, `target_t = r` at terminal
/// states and `stop_gradient(V(s_{t+1}))` (TD(0)) or `r` (Monte-Carlo) elsewhere.
/// `v`, `v_next`, `reward`: `[batch]`; `is_terminal`: `[batch]` bool.
pub fn bellman_loss(
    v: &Tensor,
    v_next: &Tensor,
    is_terminal: &Tensor,
    reward: &Tensor,
    target: Target,
) -> Result<Tensor, tch::TchError> {
    let target = match target {
        Target::Td0 => reward.f_where_self(is_terminal, &v_next.f_detach()?)?,
        Target::Mc => reward.shallow_clone(),
    };
    v.f_sub(&target)?.f_square()?.f_mean(v.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden;
    use crate::mlp::{Activation, ValueMlp};
    use tch::Kind;

    /// The loss and its gradients with respect to every weight equal PyTorch's, for TD(0) with
    /// a detached target and for Monte-Carlo targets. Removing the detach, or moving the
    /// terminal flag, changes the gradients and fails this test (checked below).
    #[test]
    fn loss_and_gradients_match_pytorch() -> Result<(), tch::TchError> {
        let g = golden();
        for (target, key) in [(Target::Td0, "td0"), (Target::Mc, "mc")] {
            let mlp = ValueMlp::from_named(&g, Activation::Relu, true).expect("mlp");
            let v = mlp.forward_raw(&g["s"])?;
            let v_next = mlp.forward_raw(&g["s_next"])?;
            let terminal = g["terminal"].f_to_kind(Kind::Bool)?;
            let loss = bellman_loss(&v, &v_next, &terminal, &g["reward"], target)?;
            loss.f_backward()?;
            let want = g[&format!("loss.{key}")].f_double_value(&[0])?;
            assert!(
                (loss.f_double_value(&[])? - want).abs() < 1e-12,
                "{key}: {loss} vs {want}"
            );
            for (name, param) in mlp.named_params() {
                let diff = (param.grad() - &g[&format!("grad.{key}.{name}")])
                    .abs()
                    .max()
                    .f_double_value(&[])?;
                assert!(diff < 1e-12, "{key}: gradient of {name} differs by {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn the_target_is_detached_and_terminal_states_regress_the_reward() -> Result<(), tch::TchError>
    {
        let v = Tensor::from_slice(&[1.0f64, 2.0, 3.0]).set_requires_grad(true);
        let v_next = Tensor::from_slice(&[5.0f64, 7.0, 11.0]).set_requires_grad(true);
        let terminal = Tensor::from_slice(&[false, false, true]);
        let reward = Tensor::from_slice(&[100.0f64, 100.0, -1.0]);
        let loss = bellman_loss(&v, &v_next, &terminal, &reward, Target::Td0)?;
        // ((1-5)^2 + (2-7)^2 + (3-(-1))^2) / 3
        assert!((loss.f_double_value(&[])? - (16.0 + 25.0 + 16.0) / 3.0).abs() < 1e-12);
        loss.f_backward()?;
        assert!(
            !v_next.grad().defined()
                || v_next.grad().abs().sum(Kind::Double).f_double_value(&[])? == 0.0
        );
        let gv = Vec::<f64>::try_from(v.grad())?;
        let want = [
            2.0 * (1.0 - 5.0) / 3.0,
            2.0 * (2.0 - 7.0) / 3.0,
            2.0 * 4.0 / 3.0,
        ];
        for (g, w) in gv.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{gv:?} vs {want:?}");
        }
        Ok(())
    }
}
