//! The exported graphs against libtorch (through ONNX Runtime in Rust) and against PyTorch,
//! the ONNX checker and Python onnxruntime (through the venv), for every activation and depth.

use std::path::Path;

use recontrol_export::{
    write_export, ControllerSpec, GraphSession, OrtRuntime, Producer, ValueDir,
};
use recontrol_tests::python_json;
use recontrol_value_net::{Activation, ValueConfig, ValueMlp, ValueModel};
use tch::{Device, Kind, Tensor};

const D: usize = 12;
const BATCH: usize = 5;

fn producer() -> Producer {
    Producer {
        recontrol_version: "test".into(),
        git_revision: "test".into(),
    }
}

/// A seeded value net with a non-trivial reward normalisation, saved to `dir`.
fn value_dir(dir: &Path, activation: Activation, hidden: &[usize], seed: u64) -> ValueModel {
    let mlp = ValueMlp::new(D, hidden, activation, seed, Device::Cpu).expect("mlp");
    let model = ValueModel {
        config: ValueConfig {
            input_dim: D,
            hidden_dims: hidden.to_vec(),
            activation,
            reward_mean: 0.7,
            reward_std: 2.5,
            lm_hidden_size: D,
            lm_identity: "sha256:test".into(),
            target: None,
            training: serde_json::json!({}),
            seed,
            git_revision: "test".into(),
            recontrol_version: "test".into(),
        },
        mlp,
    };
    model.save(dir).expect("save");
    model
}

fn rel(got: &[f32], want: &Tensor) -> f64 {
    let want = Vec::<f32>::try_from(want.flatten(0, -1).to_kind(Kind::Float)).expect("floats");
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs())).max(1e-30);
    let diff = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    f64::from(diff / scale)
}

/// `steps` iterations of SGD(lr = alpha) on -V(h).sum() in libtorch autograd, projected onto
/// the edit-norm ball after each step when `bound` is set.
fn sgd(model: &ValueModel, h0: &Tensor, steps: usize, alpha: f64, bound: Option<f64>) -> Tensor {
    let mut h = h0.detach().copy();
    for _ in 0..steps {
        let x = h.detach().set_requires_grad(true);
        let loss = -model.value(&x).expect("value").sum(Kind::Float);
        loss.backward();
        h = (x.detach() - x.grad() * alpha).detach();
        if let Some(eps) = bound {
            let u = &h - h0;
            let norm = u.norm_scalaropt_dim(2, [1i64].as_slice(), true);
            let scale =
                (norm.clamp_min(f64::from(f32::MIN_POSITIVE)).reciprocal() * eps).clamp_max(1.0);
            h = h0 + u * scale;
        }
    }
    h
}

#[test]
fn onnx_runtime_matches_libtorch_forward_autograd_and_sgd() {
    let rt = OrtRuntime::load(None).expect("onnxruntime");
    let dir = tempfile::tempdir().expect("tempdir");
    tch::manual_seed(3);
    let h = Tensor::randn([BATCH as i64, D as i64], (Kind::Float, Device::Cpu));
    let hidden = Vec::<f32>::try_from(h.flatten(0, -1)).expect("floats");
    let spec = ControllerSpec {
        steps: 7,
        alpha: 0.05,
        max_edit_norm: None,
    };
    let mut worst: f64 = 0.0;
    let mut case = 0;
    for activation in [
        Activation::Relu,
        Activation::Tanh,
        Activation::Gelu,
        Activation::Silu,
    ] {
        for hidden_dims in [vec![], vec![16], vec![16, 8]] {
            case += 1;
            let vdir = dir.path().join(format!("v{case}"));
            let model = value_dir(&vdir, activation, &hidden_dims, case);
            let out = dir.path().join(format!("e{case}"));
            write_export(
                &ValueDir::read(&vdir).expect("read"),
                &out,
                &spec,
                &producer(),
            )
            .expect("export");
            let label = format!("{activation:?} {hidden_dims:?}");

            let x = h.detach().set_requires_grad(true);
            let v = model.value(&x).expect("value");
            v.sum(Kind::Float).backward();
            let grad = x.grad();

            let mut value =
                GraphSession::open(rt, &out.join("value.onnx"), Some(1)).expect("value.onnx");
            let mut value_grad = GraphSession::open(rt, &out.join("value_grad.onnx"), Some(1))
                .expect("value_grad.onnx");
            let mut controller = GraphSession::open(rt, &out.join("controller.onnx"), Some(1))
                .expect("controller.onnx");
            let v_onnx = value.value(&hidden, BATCH).expect("run");
            let (v2, g2) = value_grad.value_grad(&hidden, BATCH).expect("run");
            let c = controller.control(&hidden, BATCH, spec.alpha).expect("run");
            let edited = sgd(&model, &h, spec.steps, f64::from(spec.alpha), None);
            // The torch backend's closed form (no autograd) against the exported graphs.
            let (v_closed, g_closed) = model.value_and_grad(&h).expect("closed form");
            let fused = model
                .sgd_steps(&h, f64::from(spec.alpha), spec.steps, None)
                .expect("fused steps");
            let errors = [
                ("closed-form value vs value_grad.onnx", rel(&v2, &v_closed)),
                ("closed-form grad vs value_grad.onnx", rel(&g2, &g_closed)),
                (
                    "fused closed-form steps vs controller.onnx",
                    rel(&c.edited, &fused.edited),
                ),
                ("value", rel(&v_onnx, &v)),
                ("value_grad.value", rel(&v2, &v)),
                ("value_grad.grad", rel(&g2, &grad)),
                ("controller.edited", rel(&c.edited, &edited)),
                ("controller.value_before", rel(&c.value_before, &v)),
                (
                    "controller.value_after",
                    rel(&c.value_after, &model.value(&edited).expect("value")),
                ),
            ];
            for (name, e) in errors {
                assert!(
                    e < 1e-5,
                    "{label}: {name} differs from libtorch by rel {e:.2e}"
                );
                worst = worst.max(e);
            }
            // Another alpha at run time: a different edit, still libtorch's.
            let c2 = controller.control(&hidden, BATCH, 0.2).expect("run");
            let e = rel(&c2.edited, &sgd(&model, &h, spec.steps, 0.2, None));
            assert!(e < 1e-5, "{label}: alpha 0.2 differs by rel {e:.2e}");
        }
    }
    println!("max relative error against libtorch over {case} nets: {worst:.2e}");
}

#[test]
fn the_edit_norm_bound_holds_and_matches_projected_sgd() {
    let rt = OrtRuntime::load(None).expect("onnxruntime");
    let dir = tempfile::tempdir().expect("tempdir");
    let vdir = dir.path().join("v");
    let model = value_dir(&vdir, Activation::Silu, &[16], 9);
    let out = dir.path().join("e");
    let spec = ControllerSpec {
        steps: 10,
        alpha: 1.0,
        max_edit_norm: Some(0.25),
    };
    write_export(
        &ValueDir::read(&vdir).expect("read"),
        &out,
        &spec,
        &producer(),
    )
    .expect("export");
    tch::manual_seed(4);
    let h = Tensor::randn([BATCH as i64, D as i64], (Kind::Float, Device::Cpu));
    let hidden = Vec::<f32>::try_from(h.flatten(0, -1)).expect("floats");
    let mut controller =
        GraphSession::open(rt, &out.join("controller.onnx"), None).expect("controller.onnx");
    let c = controller.control(&hidden, BATCH, 1.0).expect("run");
    for (row, (e, h)) in c.edited.chunks(D).zip(hidden.chunks(D)).enumerate() {
        let norm = e
            .iter()
            .zip(h)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt();
        assert!(norm <= 0.25 * (1.0 + 1e-5), "row {row}: edit norm {norm}");
        assert!(
            norm > 0.2,
            "row {row}: the bound should be active, edit norm {norm}"
        );
    }
    let want = sgd(&model, &h, 10, 1.0, Some(0.25));
    let e = rel(&c.edited, &want);
    assert!(e < 1e-5, "projected SGD differs by rel {e:.2e}");
    assert!(
        c.value_after
            .iter()
            .zip(&c.value_before)
            .all(|(a, b)| a > b),
        "ascent raises V: {:?} -> {:?}",
        c.value_before,
        c.value_after
    );
}

#[test]
fn python_checker_onnxruntime_and_pytorch_sgd_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (activation, bound)) in [
        (Activation::Relu, None),
        (Activation::Tanh, None),
        (Activation::Gelu, Some(0.5)),
        (Activation::Silu, None),
    ]
    .into_iter()
    .enumerate()
    {
        let vdir = dir.path().join(format!("v{i}"));
        value_dir(&vdir, activation, &[16, 8], 20 + i as u64);
        let out = dir.path().join(format!("e{i}"));
        let spec = ControllerSpec {
            steps: 30,
            alpha: 0.1,
            max_edit_norm: bound,
        };
        write_export(
            &ValueDir::read(&vdir).expect("read"),
            &out,
            &spec,
            &producer(),
        )
        .expect("export");
        let report = python_json(
            "tests/fixtures/export/check_export.py",
            &[out.to_str().expect("utf-8"), vdir.to_str().expect("utf-8")],
        );
        assert_eq!(report["checker"], "ok");
        for key in [
            "value",
            "value_grad.value",
            "value_grad.grad",
            "controller.edited",
            "controller.value_before",
            "controller.value_after",
        ] {
            let e = report[key].as_f64().expect("number");
            assert!(
                e < 1e-5,
                "{activation:?}: {key} differs from PyTorch by rel {e:.2e}"
            );
        }
        assert!(report["value_gain"].as_f64().expect("number") > 0.0);
        println!("{activation:?}: {report}");
    }
}
