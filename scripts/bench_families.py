#!/usr/bin/env python3
"""Plain greedy tokens/s of `recontrol generate` against HF `generate()` on the tiny fixture
models of the families added in issue 17 (by default falcon-7b, falcon-40b and mixtral from
tests/fixtures/generated/lm), in one run.

Per model and batch size the two sides alternate: one warm-up each, then `repeats` rounds of
(HF, recontrol); each side's figure is the median of its rounds. Greedy, 64 new tokens,
generation past </s> on both sides (HF `eos_token_id=None`, recontrol `--ignore-eos`), float32
on CPU with torch's default thread count (recontrol uses the same), left padding. recontrol's
time is the per-batch `seconds` it reports (model loading excluded); HF's is the `generate()`
call. The batch-1 tokens of both sides are also compared.

Usage (from the repo root, after `cargo build --release -p recontrol-cli`)::

    .venv/bin/python scripts/bench_families.py [--models falcon-7b mixtral] \\
        [--recontrol target/release/recontrol] [--new-tokens 64] [--batch-sizes 1 8] [--repeats 5]

Exit status: 0 ok, 1 recontrol failed, 2 binary or fixtures missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import PROMPTS, hf_generate, recontrol_rate, run_recontrol  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "generated" / "lm"


def hf_round(model, tokenizer, prompts, n) -> float:
    t0 = time.perf_counter()
    new = hf_generate(model, tokenizer, prompts, n, eos_token_id=None)
    dt = time.perf_counter() - t0
    assert new.shape == (len(prompts), n), new.shape
    return len(prompts) * n / dt


def bench(binary: Path, name: str, batch_sizes, n: int, repeats: int, work: Path) -> list[dict]:
    mdir = FIXTURES / name
    tokenizer = AutoTokenizer.from_pretrained(mdir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    results = []
    for b in batch_sizes:
        prompts = PROMPTS[:b]
        prompts_file = work / f"{name}_b{b}.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        out = work / f"{name}_b{b}.out.jsonl"
        hf_round(model, tokenizer, prompts, n)  # warm-ups
        run_recontrol(binary, mdir, prompts_file, out, b, n)
        hf_rates, rc_rates, rows = [], [], []
        for _ in range(repeats):
            hf_rates.append(hf_round(model, tokenizer, prompts, n))
            rows = run_recontrol(binary, mdir, prompts_file, out, b, n)
            assert all(r["num_tokens"] == n for r in rows), [r["num_tokens"] for r in rows]
            rc_rates.append(recontrol_rate(rows, b))
        hf, rc = statistics.median(hf_rates), statistics.median(rc_rates)
        result = {"model": name, "batch": b, "hf_tok_s": hf, "recontrol_tok_s": rc, "ratio": rc / hf}
        if b == 1:
            ours = list(rows[0]["tokens"])
            theirs = hf_generate(model, tokenizer, prompts, n, eos_token_id=None)[0].tolist()
            result["tokens_match_hf"] = ours == theirs
        results.append(result)
        print(f"  {name} batch {b}: HF {hf:.1f} tok/s, recontrol {rc:.1f} tok/s, ratio {rc / hf:.2f}"
              + (f", batch-1 tokens match HF: {result['tokens_match_hf']}" if b == 1 else ""))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["falcon-7b", "falcon-40b", "mixtral"])
    ap.add_argument("--recontrol", type=Path, default=REPO_ROOT / "target" / "release" / "recontrol")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    binary = args.recontrol if args.recontrol.is_absolute() else Path.cwd() / args.recontrol
    if not binary.is_file():
        print(f"error: recontrol binary not found at {binary}", file=sys.stderr)
        return 2
    missing = [m for m in args.models if not (FIXTURES / m / "config.json").is_file()]
    if missing:
        print(f"error: fixtures missing: {missing}; run tests/fixtures/lm/make_fixtures.py", file=sys.stderr)
        return 2
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, new tokens "
          f"{args.new_tokens}, repeats {args.repeats} (alternating, medians)")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-families-") as scratch:
        for name in args.models:
            results += bench(binary, name, args.batch_sizes, args.new_tokens, args.repeats, Path(scratch))
    print()
    print(f"{'model':<11} {'batch':>5}  {'HF tok/s':>9}  {'recontrol tok/s':>15}  {'ratio':>5}")
    for r in results:
        print(f"{r['model']:<11} {r['batch']:>5}  {r['hf_tok_s']:>9.1f}  {r['recontrol_tok_s']:>15.1f}  {r['ratio']:>5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
