//! The Bellman loss of the value function, written once and used by training and evaluation.
//!
//! With no intermediate reward and gamma = 1, V(s_t) = V(s_{t+1}) for non-terminal t and
//! V(s_{T-1}) = r at the last state of a rollout. The reference code regressed the reward at
//! the first step (an argmax over the mask) and let gradients flow into the bootstrap target;
//! here the terminal flag comes from the store's rollout offsets (the last row of each rollout)
//! and the target is detached (semi-gradient TD). TD(lambda) and Monte-Carlo targets are
//! options ([`Target`], defined with the value directory's config that records it); every
//! target goes through the same [`bellman_loss`].

pub use recontrol_export::value_dir::Target;
use tch::Tensor;

/// `mean((V(s_t) - stop_gradient(target_t))^2)` over a minibatch: the one regression every
/// target choice goes through. `v`, `target`: `[batch]`.
pub fn bellman_loss(v: &Tensor, target: &Tensor) -> Result<Tensor, tch::TchError> {
    v.f_sub(&target.f_detach()?)?.f_square()?.f_mean(v.kind())
}

/// The TD(0) target: `r` at terminal states, `V(s_{t+1})` elsewhere ([`bellman_loss`] stops
/// its gradient). `v_next`, `reward`: `[batch]`; `is_terminal`: `[batch]` bool.
pub fn td0_target(
    v_next: &Tensor,
    is_terminal: &Tensor,
    reward: &Tensor,
) -> Result<Tensor, tch::TchError> {
    reward.f_where_self(is_terminal, v_next)
}

/// The lambda-returns of one rollout from its values `V(s_0..s_{T-1})` and reward `r`:
/// `G_{T-1} = r`, `G_t = (1 - lambda) V(s_{t+1}) + lambda G_{t+1}` (gamma = 1, reward only
/// at the end), computed backwards in one pass.
pub fn lambda_returns(values: &[f64], reward: f64, lambda: f64) -> Vec<f64> {
    let mut out = vec![0.0; values.len()];
    let mut g = reward;
    for t in (0..values.len()).rev() {
        if t + 1 < values.len() {
            g = (1.0 - lambda) * values[t + 1] + lambda * g;
        }
        out[t] = g;
    }
    out
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
            let target = match target {
                Target::Td0 => {
                    let v_next = mlp.forward_raw(&g["s_next"])?;
                    td0_target(&v_next, &g["terminal"].f_to_kind(Kind::Bool)?, &g["reward"])?
                }
                _ => g["reward"].shallow_clone(),
            };
            let loss = bellman_loss(&v, &target)?;
            loss.f_backward()?;
            check_loss_and_grads(&g, &mlp, &loss, key)?;
        }
        Ok(())
    }

    fn check_loss_and_grads(
        g: &std::collections::HashMap<String, Tensor>,
        mlp: &ValueMlp,
        loss: &Tensor,
        key: &str,
    ) -> Result<(), tch::TchError> {
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
        Ok(())
    }

    /// The backward recursion equals PyTorch's forward view (weighted n-step returns), and
    /// the loss on those returns has PyTorch's gradients.
    #[test]
    fn lambda_returns_match_the_forward_view() -> Result<(), tch::TchError> {
        let g = golden();
        let mlp = ValueMlp::from_named(&g, Activation::Relu, true).expect("mlp");
        let v = mlp.forward_raw(&g["lambda.states"])?;
        let values = Vec::<f64>::try_from(&v)?;
        let lambda = g["lambda.lambda"].f_double_value(&[0])?;
        let returns = lambda_returns(&values, g["lambda.reward"].f_double_value(&[0])?, lambda);
        let want = Vec::<f64>::try_from(&g["lambda.returns"])?;
        for (a, b) in returns.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{returns:?} vs {want:?}");
        }
        let loss = bellman_loss(&v, &Tensor::from_slice(&returns))?;
        loss.f_backward()?;
        check_loss_and_grads(&g, &mlp, &loss, "lambda")?;
        // The two ends: lambda 0 bootstraps from the next value, lambda 1 is the reward.
        assert_eq!(
            lambda_returns(&[1.0, 2.0, 3.0], 9.0, 0.0),
            vec![2.0, 3.0, 9.0]
        );
        assert_eq!(lambda_returns(&[1.0, 2.0, 3.0], 9.0, 1.0), vec![9.0; 3]);
        assert!(Target::Lambda(1.5).check().is_err());
        Ok(())
    }

    /// Three training steps (TD(0) loss, AdamW with decay on matrices) land on PyTorch's
    /// weights: the optimizer and the loss together, against `torch.optim.AdamW`.
    #[test]
    fn adamw_steps_match_pytorch() -> Result<(), tch::TchError> {
        let g = golden();
        let mlp = ValueMlp::from_named(&g, Activation::Relu, true).expect("mlp");
        let config = recontrol_train::AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = recontrol_train::AdamW::new(mlp.named_params(), config).expect("adamw");
        let terminal = g["terminal"].f_to_kind(Kind::Bool)?;
        for _ in 0..3 {
            opt.zero_grad();
            let v_next = tch::no_grad(|| mlp.forward_raw(&g["s_next"]))?;
            let target = td0_target(&v_next, &terminal, &g["reward"])?;
            bellman_loss(&mlp.forward_raw(&g["s"])?, &target)?.f_backward()?;
            opt.step(0.05).expect("step");
        }
        for (name, param) in mlp.named_params() {
            let diff = (param - &g[&format!("adamw.{name}")])
                .abs()
                .max()
                .f_double_value(&[])?;
            assert!(diff < 1e-12, "{name} differs from PyTorch's by {diff}");
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
        let loss = bellman_loss(&v, &td0_target(&v_next, &terminal, &reward)?)?;
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
