#!/usr/bin/env python3
"""Microseconds per controller step: `controller.onnx` (from `recontrol export`) on ONNX Runtime
against the same loop in libtorch autograd (PyTorch: `steps` iterations of SGD(lr=alpha) on
-V(h).sum(), RE-Control's reference update), in the same run, on the same weights.

The value net is the paper's shape, hidden d -> d -> 1 with ReLU (random weights; speed does not
depend on them). Each side runs the whole `steps`-step edit for a batch; the figure is the median
time of one edit divided by `steps`. Outputs are checked to agree before timing.

Usage (from the repo root, after `cargo build --release -p recontrol-cli`):

    .venv/bin/python scripts/bench_controller.py [--d 4096] [--steps 30] [--batches 1 16]
        [--repeats 20] [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_value_dir(path: Path, d: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / d ** 0.5
    weights = {
        "layers.0.weight": (torch.rand(d, d, generator=g) * 2 - 1) * bound,
        "layers.0.bias": (torch.rand(d, generator=g) * 2 - 1) * bound,
        "layers.1.weight": (torch.rand(1, d, generator=g) * 2 - 1) * bound,
        "layers.1.bias": (torch.rand(1, generator=g) * 2 - 1) * bound,
    }
    path.mkdir(parents=True)
    save_file(weights, str(path / "model.safetensors"))
    config = {"input_dim": d, "hidden_dims": [d], "activation": "relu", "reward_mean": 0.0,
              "reward_std": 1.0, "lm_hidden_size": d, "lm_identity": "sha256:bench", "training": {},
              "seed": seed, "git_revision": "bench", "recontrol_version": "bench"}
    (path / "config.json").write_text(json.dumps(config))
    return weights


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recontrol", type=Path, default=REPO_ROOT / "target" / "release" / "recontrol")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.recontrol.is_file():
        print(f"{args.recontrol} not found: run `cargo build --release -p recontrol-cli` first", file=sys.stderr)
        return 2
    providers = ["CPUExecutionProvider"]
    if args.device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print("this onnxruntime has no CUDAExecutionProvider", file=sys.stderr)
            return 2
        providers = ["CUDAExecutionProvider"]
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = write_value_dir(tmp / "value", args.d, 0)
        subprocess.run([str(args.recontrol), "export", "--value", str(tmp / "value"), "--out", str(tmp / "onnx"),
                        "--steps", str(args.steps), "--alpha", str(args.alpha)], check=True, stdout=subprocess.DEVNULL)
        session = ort.InferenceSession(str(tmp / "onnx" / "controller.onnx"), providers=providers)
        w = {k: v.to(device) for k, v in weights.items()}

        def value(h):
            return F.linear(F.relu(F.linear(h, w["layers.0.weight"], w["layers.0.bias"])),
                            w["layers.1.weight"], w["layers.1.bias"]).squeeze(-1)

        def torch_edit(h0):
            h = h0.clone().requires_grad_(True)
            opt = torch.optim.SGD([h], lr=args.alpha)
            for _ in range(args.steps):
                opt.zero_grad()
                (-value(h).sum()).backward()
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return h.detach()

        alpha = np.array(args.alpha, dtype=np.float32)
        for batch in args.batches:
            hidden = np.random.default_rng(batch).standard_normal((batch, args.d)).astype(np.float32)
            h0 = torch.from_numpy(hidden).to(device)
            edited = session.run(["edited_hidden"], {"hidden": hidden, "alpha": alpha})[0]
            want = torch_edit(h0).cpu().numpy()
            rel = float(np.abs(edited - want).max() / np.abs(want).max())
            assert rel < 1e-4, f"batch {batch}: ONNX and PyTorch edits differ by rel {rel}"
            t_onnx = median_seconds(lambda: session.run(["edited_hidden"], {"hidden": hidden, "alpha": alpha}),
                                    args.repeats)
            t_torch = median_seconds(lambda: torch_edit(h0), args.repeats)
            rows.append({"batch": batch, "onnx_us_per_step": t_onnx / args.steps * 1e6,
                         "torch_us_per_step": t_torch / args.steps * 1e6, "rel_diff": rel})
    print(f"controller step, value MLP {args.d} -> {args.d} -> 1 (ReLU), {args.steps} steps, alpha {args.alpha}, "
          f"{args.device} (torch {torch.__version__}, {torch.get_num_threads()} threads; onnxruntime {ort.__version__})")
    print(f"{'batch':>5} {'controller.onnx (us/step)':>26} {'libtorch autograd (us/step)':>28} {'ratio':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['onnx_us_per_step']:>26.0f} {r['torch_us_per_step']:>28.0f} "
              f"{r['torch_us_per_step'] / r['onnx_us_per_step']:>7.2f}")
    print("ratio = libtorch time / ONNX Runtime time (above 1: the exported graph is faster)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
