#!/usr/bin/env python3
"""Value-net training throughput and memory: `recontrol value train` against a PyTorch loop
on the same store in the same run, and recontrol's peak RSS on a store 4x larger.

Both sides train the same MLP (hidden -> width -> 1, ReLU) with Adam, the TD(0) Bellman loss
(detached target) and the same batch size, streaming transitions from the HDF5 store in
blocks (PyTorch reads them with h5py), one epoch each; throughput is transitions per second of
training, excluding start-up.

Usage (from the repo root, after `cargo build --release -p recontrol-cli`):

    .venv/bin/python scripts/bench_value.py [--hidden 1024] [--rollouts 400] [--width 1024]
        [--batch-size 512] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_store(path: Path, rollouts: int, hidden: int, seed: int) -> int:
    """A labelled store in recontrol's documented layout (format version 1); rollouts of 30-90
    states. Returns the number of states."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(30, 91, size=rollouts)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    string = h5py.string_dtype("utf-8")
    meta = {
        "hidden_size": hidden, "model": "bench", "model_hash": "sha256:bench", "state_dtype": "f32",
        "prompt_format": "raw", "generation": {}, "seed": seed, "recontrol_version": "bench",
        "dataset": "bench",
    }
    with h5py.File(path, "w") as f:
        states = f.create_dataset("states", shape=(total, hidden), dtype="f4",
                                  chunks=(max(1, min(256, (1 << 20) // (hidden * 4))), hidden),
                                  shuffle=True, compression="gzip", compression_opts=1,
                                  maxshape=(None, hidden))
        block = 4096
        for start in range(0, total, block):
            end = min(total, start + block)
            states[start:end] = rng.standard_normal((end - start, hidden), dtype=np.float32)
        f.create_dataset("rollout_offsets", data=offsets, maxshape=(None,), chunks=True)
        f.create_dataset("token_offsets", data=offsets, maxshape=(None,), chunks=True)
        f.create_dataset("response_tokens", data=np.zeros(total, np.int64), maxshape=(None,), chunks=True)
        f.create_dataset("prompt_index", data=np.arange(rollouts, dtype=np.int64), maxshape=(None,), chunks=True)
        f.create_dataset("prompt", data=["p"] * rollouts, dtype=string, maxshape=(None,), chunks=True)
        f.create_dataset("response", data=["r"] * rollouts, dtype=string, maxshape=(None,), chunks=True)
        f.create_dataset("reward", data=rng.standard_normal(rollouts).astype(np.float32), maxshape=(None,), chunks=True)
        f.attrs["format_version"] = np.int64(1)
        f.attrs["hidden_size"] = np.int64(hidden)
        for key in ["model", "model_hash", "state_dtype", "prompt_format", "recontrol_version", "dataset"]:
            f.attrs[key] = meta[key]
        f.attrs["generation"] = "{}"
        f.attrs["seed"] = np.uint64(seed)
        f.attrs["meta"] = json.dumps(meta)
    return total


def recontrol_train(binary: Path, store: Path, out: Path, args) -> dict:
    cmd = ["/usr/bin/time", "-v", str(binary), "value", "train", "--rollouts", str(store),
           "--out", str(out), "--epochs", "1", "--hidden", str(args.width),
           "--batch-size", str(args.batch_size), "--val-fraction", "0.1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        sys.exit(1)
    rate = re.search(r"epoch 1: .* ([\d.]+) transitions/s", done.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return {"transitions_per_s": float(rate.group(1)), "peak_rss_mib": int(rss.group(1)) / 1024}


def torch_train(store: Path, args) -> float:
    """One epoch of the same training in PyTorch, streaming blocks from h5py."""
    torch.manual_seed(0)
    with h5py.File(store, "r") as f:
        hidden = int(f.attrs["hidden_size"])
        offsets = f["rollout_offsets"][:]
        rewards = f["reward"][:]
        mean, std = float(rewards.mean()), float(rewards.std() or 1.0)
        total = int(offsets[-1])
        rollout_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        terminal = np.zeros(total, bool)
        terminal[offsets[1:] - 1] = True
        mlp = torch.nn.Sequential(torch.nn.Linear(hidden, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 1))
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
        states = f["states"]
        block, buffer_blocks = 1024, 8
        blocks = np.random.default_rng(0).permutation((total + block - 1) // block)
        seen, t0 = 0, time.perf_counter()
        for i in range(0, len(blocks), buffer_blocks):
            rows, cur, nxt = [], [], []
            for b in blocks[i:i + buffer_blocks]:
                start, end = int(b) * block, min(total, (int(b) + 1) * block)
                chunk = states[start:min(total, end + 1)]  # one extra row: the next state
                n = end - start
                nxt_block = chunk[1:n + 1]
                if len(nxt_block) < n:  # the store's last row has no successor
                    nxt_block = np.vstack([nxt_block, np.zeros((n - len(nxt_block), hidden), np.float32)])
                rows.append(np.arange(start, end))
                cur.append(chunk[:n])
                nxt.append(nxt_block)
            idx, s, s_next = np.concatenate(rows), np.concatenate(cur), np.concatenate(nxt)
            perm = np.random.default_rng(i).permutation(len(idx))
            for j in range(0, len(idx), args.batch_size):
                k = perm[j:j + args.batch_size]
                x, xn = torch.from_numpy(s[k]), torch.from_numpy(s_next[k])
                term = torch.from_numpy(terminal[idx[k]])
                r = torch.from_numpy(((rewards[rollout_of[idx[k]]] - mean) / std).astype(np.float32))
                v = mlp(x).squeeze(-1)
                with torch.no_grad():
                    v_next = mlp(xn).squeeze(-1)
                loss = ((v - torch.where(term, r, v_next)) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen += len(k)
        return seen / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recontrol", type=Path, default=REPO_ROOT / "target" / "release" / "recontrol")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--rollouts", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.recontrol.is_file():
        print(f"{args.recontrol} not found: run `cargo build --release -p recontrol-cli` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = tmp / "1x.h5", tmp / "4x.h5"
        n1 = write_store(small, args.rollouts, args.hidden, 1)
        n4 = write_store(large, 4 * args.rollouts, args.hidden, 2)
        # Alternate the two sides; the median of --repeats runs each.
        runs, torch_runs = [], []
        for k in range(args.repeats):
            runs.append(recontrol_train(args.recontrol, small, tmp / f"v1-{k}", args))
            torch_runs.append(torch_train(small, args))
        ours = sorted(runs, key=lambda r: r["transitions_per_s"])[len(runs) // 2]
        ours["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
        theirs = sorted(torch_runs)[len(torch_runs) // 2]
        ours4 = recontrol_train(args.recontrol, large, tmp / "v4", args)
    torch_threads = torch.get_num_threads()
    print(f"value MLP {args.hidden} -> {args.width} -> 1, batch {args.batch_size}, TD(0), one epoch, "
          f"CPU ({torch_threads} threads)")
    print(f"1x store: {n1} states ({n1 * args.hidden * 4 / 2**20:.0f} MiB raw); 4x store: {n4} states")
    print(f"{'':24} {'transitions/s':>14}")
    print(f"{'recontrol value train':24} {ours['transitions_per_s']:>14.0f}")
    print(f"{'PyTorch loop':24} {theirs:>14.0f}")
    print(f"ratio recontrol/PyTorch: {ours['transitions_per_s'] / theirs:.2f} "
          f"(medians of {args.repeats} alternating runs; 4x store: {ours4['transitions_per_s']:.0f}/s)")
    print(f"peak RSS: 1x {ours['peak_rss_mib']:.0f} MiB, 4x {ours4['peak_rss_mib']:.0f} MiB "
          f"(ratio {ours4['peak_rss_mib'] / ours['peak_rss_mib']:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"states_1x": n1, "states_4x": n4, "recontrol": ours,
                                         "pytorch_transitions_per_s": theirs, "recontrol_4x": ours4}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
