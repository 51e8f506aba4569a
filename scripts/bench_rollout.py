#!/usr/bin/env python3
"""Rollout throughput and memory: `recontrol rollout` on the bundled HH-RLHF train split with
the benchmark Llama (8 layers, hidden 512, the model of bench_generate.py), at --limit N and
10 N in the same run. Prints states/s, bytes/state and peak RSS of each, and the RSS ratio
(memory must not grow with the run's length).

Usage (from the repo root, after `cargo build --release -p recontrol-cli`):

    .venv/bin/python scripts/bench_rollout.py [--limit 64] [--new-tokens 32] [--batch-size 16]
        [--state-dtype f32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402  (the benchmark model)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data" / "bundled" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
SUMMARY = re.compile(
    r"(\d+) rollouts, (\d+) states in ([\d.]+) s \((\d+) states/s, (\d+) bytes/state\)"
)
RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def run(binary: Path, model: Path, out: Path, limit: int, args) -> dict:
    cmd = [
        "/usr/bin/time", "-v", str(binary), "rollout", "--model", str(model),
        "--dataset", str(DATA), "--split", "train", "--limit", str(limit),
        "--max-new-tokens", str(args.new_tokens), "--batch-size", str(args.batch_size),
        "--state-dtype", args.state_dtype, "--ignore-eos", "--out", str(out),
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
        "states_per_s": int(m.group(4)),
        "bytes_per_state": int(m.group(5)),
        "peak_rss_mib": int(r.group(1)) / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recontrol", type=Path, default=REPO_ROOT / "target" / "release" / "recontrol")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--state-dtype", choices=["f32", "f16"], default="f32")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.recontrol.is_file():
        print(f"{args.recontrol} not found: run `cargo build --release -p recontrol-cli` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_generate.model_dir(Path(tmp))
        rows = [run(args.recontrol, model, Path(tmp) / f"r{n}.h5", n, args)
                for n in (args.limit, 10 * args.limit)]
    hidden = 512
    print(f"model: 8 layers, hidden {hidden}, f32 on CPU; {args.new_tokens} new tokens, "
          f"batch {args.batch_size}, states {args.state_dtype} ({hidden * (4 if args.state_dtype == 'f32' else 2)} raw bytes/state)")
    print(f"{'limit':>6} {'rollouts':>8} {'states':>7} {'states/s':>9} {'bytes/state':>11} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r['limit']:>6} {r['rollouts']:>8} {r['states']:>7} {r['states_per_s']:>9} "
              f"{r['bytes_per_state']:>11} {r['peak_rss_mib']:>12.0f}")
    ratio = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    print(f"peak RSS ratio 10x/1x: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "rss_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
