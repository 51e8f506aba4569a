#!/usr/bin/env python3
"""Rollout throughput and memory: `recontrol rollout` on the bundled HH-RLHF train split
against the reference's collector, HF `generate(output_hidden_states=True)`, in the same run.

* recontrol: `rollout --limit N` (prompts batched by length, the default) and the same with
  `--keep-prompt-order` (dataset order), then the same N prompts with `--samples-per-prompt
  10`: ten times the rollouts from prompts of the same lengths, so that the peak RSS of both
  (and their ratio, printed) shows whether memory grows with the run's length. (Memory does
  grow with the longest prompt times the batch size, the prefill's activations; a larger
  `--limit` draws longer dialogues from HH-RLHF's tail.) states/s is what the command
  reports (states written / wall time of the collection, model loading excluded), streaming
  to the HDF5 store.
* HF: the same prompts (read back from recontrol's store), in dataset order, batched as
  recontrol batches them, left-padded; `generate(max_new_tokens=T, do_sample=False,
  eos_token_id=None, output_hidden_states=True, return_dict_in_generate=True)` and the final
  post-norm state before each new token copied out per row (`hidden_states[step][-1]`), as
  the reference's collector does; kept in memory, not written (HF's time is a lower bound).
  One warm-up batch first. states/s = prompts x T / seconds.
* The runs alternate `--repeats` times (recontrol sorted, recontrol in order, HF); medians.

With `--model DIR` (e.g. models/smollm2-135m-instruct) that model; else the benchmark Llama of
bench_generate.py (8 layers, hidden 512).

Usage (from the repo root, after `cargo build --release -p recontrol-cli`):

    .venv/bin/python scripts/bench_rollout.py [--model DIR] [--limit 64] [--new-tokens 32] \\
        [--batch-size 16] [--state-dtype f32] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402  (the benchmark model)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data" / "bundled" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
SUMMARY = re.compile(
    r"(\d+) rollouts, (\d+) states in ([\d.]+) s \((\d+) states/s, (\d+) bytes/state\)"
)
RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def run(binary: Path, model: Path, out: Path, limit: int, args, extra: list[str]) -> dict:
    """One `recontrol rollout` under /usr/bin/time: its summary line and peak RSS."""
    out.unlink(missing_ok=True)
    cmd = [
        "/usr/bin/time", "-v", str(binary), "rollout", "--model", str(model),
        "--dataset", str(DATA), "--split", "train", "--limit", str(limit),
        "--max-new-tokens", str(args.new_tokens), "--batch-size", str(args.batch_size),
        "--state-dtype", args.state_dtype, "--ignore-eos", "--out", str(out), *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        sys.exit(1)
    m = SUMMARY.search(done.stderr)
    r = RSS.search(done.stderr)
    if not m or not r:
        print(done.stderr, file=sys.stderr)
        sys.exit(1)
    return {
        "limit": limit,
        "rollouts": int(m.group(1)),
        "states": int(m.group(2)),
        "seconds": float(m.group(3)),
        "states_per_s": int(m.group(2)) / float(m.group(3)),
        "bytes_per_state": int(m.group(5)),
        "peak_rss_mib": int(r.group(1)) / 1024,
    }


@torch.no_grad()
def hf_collect(model, tok, prompts: list[str], args):
    """The reference collector over `prompts` in batches: seconds, each row's states and
    tokens."""
    rows, tokens = [], []
    start = time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        enc = tok(prompts[i:i + args.batch_size], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id,
                             output_hidden_states=True, return_dict_in_generate=True)
        # hidden_states[step][-1]: the last layer's output after the final norm; the newest
        # position is the state that chose the step's token.
        steps = torch.stack([h[-1][:, -1, :] for h in out.hidden_states], dim=1)
        rows.extend(r.float().numpy().copy() for r in steps)
        tokens.extend(out.sequences[:, enc["input_ids"].shape[1]:].tolist())
    return time.perf_counter() - start, rows, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recontrol", type=Path, default=REPO_ROOT / "target" / "release" / "recontrol")
    ap.add_argument("--model", type=Path, help="a model directory instead of the benchmark Llama")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--state-dtype", choices=["f32", "f16"], default="f32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.recontrol.is_file():
        print(f"{args.recontrol} not found: run `cargo build --release -p recontrol-cli` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model.resolve() if args.model else bench_generate.model_dir(tmp)
        tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        hidden = model.config.hidden_size
        sorted_store, ordered_store = tmp / "sorted.h5", tmp / "ordered.h5"
        runs: dict[str, list[dict]] = {"sorted": [], "in_order": []}
        hf_runs: list[float] = []
        prompts = None
        for r in range(args.repeats):
            runs["sorted"].append(run(args.recontrol, model_dir, sorted_store, args.limit, args, []))
            runs["in_order"].append(run(args.recontrol, model_dir, ordered_store, args.limit, args,
                                        ["--keep-prompt-order"]))
            if prompts is None:
                with h5py.File(sorted_store, "r") as f:
                    prompts = [p.decode() for p in f["prompt"][:]]
                hf_collect(model, tok, prompts[:args.batch_size], args)  # warm-up
            seconds, hf_rows, hf_tokens = hf_collect(model, tok, prompts, args)
            hf_runs.append(len(prompts) * args.new_tokens / seconds)
        # The two collectors agree (greedy, the same prompts): tokens, and states where the
        # tokens are the same.
        with h5py.File(sorted_store, "r") as f:
            states, offsets = f["states"][:], f["token_offsets"][:]
            ours = f["response_tokens"][:]
        same = [i for i in range(len(hf_rows)) if list(ours[offsets[i]:offsets[i + 1]]) == hf_tokens[i]]
        worst = max((float(np.abs(states[offsets[i]:offsets[i + 1]] - hf_rows[i]).max()) for i in same),
                    default=float("nan"))
        long_run = run(args.recontrol, model_dir, tmp / "long.h5", args.limit, args,
                       ["--samples-per-prompt", "10"])

    med = {k: statistics.median(x["states_per_s"] for x in v) for k, v in runs.items()}
    hf = statistics.median(hf_runs)
    name = str(args.model) if args.model else "benchmark Llama (8 layers, hidden 512)"
    print(f"model: {name}, f32 on CPU, {torch.get_num_threads()} threads; {args.limit} prompts, "
          f"{args.new_tokens} new tokens, batch {args.batch_size}, states {args.state_dtype} "
          f"({hidden * (4 if args.state_dtype == 'f32' else 2)} raw bytes/state); medians of {args.repeats}")
    print(f"{'collector':<34} {'states/s':>9} {'vs HF':>6}")
    print(f"{'HF generate(output_hidden_states)':<34} {hf:>9.1f} {1.0:>6.2f}")
    print(f"{'recontrol, dataset order':<34} {med['in_order']:>9.1f} {med['in_order'] / hf:>6.2f}")
    print(f"{'recontrol, sorted by length':<34} {med['sorted']:>9.1f} {med['sorted'] / hf:>6.2f}")
    print(f"greedy tokens equal HF's for {len(same)} of {len(hf_rows)} prompts; "
          f"max |state - HF state| over those: {worst:.2e}")
    short = runs["sorted"][-1]
    print(f"{'prompts':>7} {'rollouts':>8} {'states':>7} {'states/s':>9} {'bytes/state':>11} {'peak RSS MiB':>12}")
    for x in (short, long_run):
        print(f"{x['limit']:>7} {x['rollouts']:>8} {x['states']:>7} {x['states_per_s']:>9.1f} "
              f"{x['bytes_per_state']:>11} {x['peak_rss_mib']:>12.0f}")
    ratio = long_run["peak_rss_mib"] / short["peak_rss_mib"]
    print(f"peak RSS ratio 10x/1x: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"hf_states_per_s": hf, "hf_runs": hf_runs, "recontrol": runs,
                                         "medians": med, "max_state_diff": worst, "same_tokens": len(same), "long": long_run,
                                         "rss_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
