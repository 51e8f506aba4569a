//! The Bradley-Terry preference loss, written once for training and evaluation alike.

use tch::{Kind, Tensor};

/// `mean(-log sigmoid(r_chosen - r_rejected))`, computed as `mean(softplus(r_rejected -
/// r_chosen))`, which stays finite for any margin.
pub fn bradley_terry_loss(chosen: &Tensor, rejected: &Tensor) -> Result<Tensor, tch::TchError> {
    rejected.f_sub(chosen)?.f_softplus()?.f_mean(Kind::Double)
}

/// Share of pairs whose chosen reward is higher (ties count half) and the mean margin.
pub fn accuracy_and_margin(chosen: &[f32], rejected: &[f32]) -> (f64, f64) {
    let n = chosen.len().max(1) as f64;
    let margin: f64 = chosen
        .iter()
        .zip(rejected)
        .map(|(c, r)| f64::from(c - r))
        .sum();
    (
        recontrol_data::metrics::win_rate(chosen, rejected),
        margin / n,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use recontrol_tests::repo_root;

    /// Golden values from PyTorch (`tests/fixtures/reward/make_reward_fixtures.py`):
    /// `-F.logsigmoid(c - r).mean()` and its gradients, including margins of +-60.
    #[test]
    fn matches_pytorch_loss_and_gradients() -> Result<(), tch::TchError> {
        let path = repo_root().join("tests/fixtures/generated/reward/bt_golden.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fixtures.sh)", path.display()));
        let golden: serde_json::Value = serde_json::from_str(&text).expect("json");
        let vec = |k: &str| -> Vec<f64> { serde_json::from_value(golden[k].clone()).expect(k) };
        let chosen = Tensor::from_slice(&vec("chosen")).set_requires_grad(true);
        let rejected = Tensor::from_slice(&vec("rejected")).set_requires_grad(true);
        let loss = bradley_terry_loss(&chosen, &rejected)?;
        loss.f_backward()?;
        let want = golden["loss"].as_f64().expect("loss");
        assert!(
            (loss.f_double_value(&[])? - want).abs() < 1e-12,
            "{loss} vs {want}"
        );
        for (t, key) in [(&chosen, "grad_chosen"), (&rejected, "grad_rejected")] {
            let got = Vec::<f64>::try_from(t.grad())?;
            for (g, w) in got.iter().zip(vec(key)) {
                assert!((g - w).abs() < 1e-12, "{key}: {g} vs {w}");
            }
        }
        let c: Vec<f32> = vec("chosen").iter().map(|&x| x as f32).collect();
        let r: Vec<f32> = vec("rejected").iter().map(|&x| x as f32).collect();
        let (acc, margin) = accuracy_and_margin(&c, &r);
        // PyTorch's mean(c > r) counts a tie as wrong; ours counts it half (one tie: 1.5, 1.5).
        let ties = c.iter().zip(&r).filter(|(a, b)| a == b).count() as f64;
        assert_eq!(ties, 1.0);
        let want = golden["accuracy"].as_f64().expect("accuracy") + 0.5 * ties / c.len() as f64;
        assert!((acc - want).abs() < 1e-9, "{acc} vs {want}");
        assert!((margin - golden["mean_margin"].as_f64().expect("margin")).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn hand_computed_cases() -> Result<(), tch::TchError> {
        let loss = |c: f64, r: f64| -> Result<f64, tch::TchError> {
            bradley_terry_loss(&Tensor::from_slice(&[c]), &Tensor::from_slice(&[r]))?
                .f_double_value(&[])
        };
        assert!((loss(0.0, 0.0)? - std::f64::consts::LN_2).abs() < 1e-12);
        assert!((loss(1.0, 0.0)? - (1.0 + (-1f64).exp()).ln()).abs() < 1e-12);
        assert!(
            (loss(-100.0, 100.0)? - 200.0).abs() < 1e-9,
            "finite for large margins"
        );
        assert!(loss(100.0, -100.0)? < 1e-80);
        Ok(())
    }
}
