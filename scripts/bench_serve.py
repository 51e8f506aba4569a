#!/usr/bin/env python3
"""Load benchmark of `recontrol serve` (loopback only, bounded in time) against the `generate`
command's batch throughput on the same prompts, in the same run.

Usage (from the repo root, after scripts/demo.sh or `recontrol lm import-gguf`)::

    .venv/bin/python scripts/bench_serve.py [--recontrol target/release/recontrol] \\
        [--model models/smollm2-135m-instruct] [--value runs/demo/onnx] \\
        [--prompts 32] [--new-tokens 48] [--concurrency 1 8 32] [--json FILE]

* Prompts: `--prompts` everyday questions, each a user message in the model's chat template
  (the same for both sides), greedy, `--new-tokens` at most (eos ends a response early on both
  sides alike).
* Value head: `--value` (default: the demo's export runs/demo/onnx, with its controller's alpha
  and steps, ONNX backend); without one, a random 576 -> 576 -> 1 tanh value directory is written
  and run with the torch backend (30 steps, alpha 0.5).
* Server: `recontrol serve --max-batch max(concurrency)`, driven by the official `openai` async
  client with `c` requests in flight at a time, every prompt once, plain then controlled
  (`extra_body={"control": ...}`); throughput = completion tokens / wall seconds of the run;
  latency = each request's seconds (p50, p99).
* generate: `recontrol generate --chat --batch-size c` on the same prompts, plain and with
  `--value`; throughput = sum(num_tokens) / sum(batch seconds) (model loading excluded).
* Efficiency = server tok/s / generate tok/s at c = batch size. The server's text equals
  generate's for every prompt at c = 1 (checked, not timed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

TOPICS = ["cook rice", "learn to swim", "write a cover letter", "keep a plant alive",
          "save money each month", "start running", "sleep better", "learn a language",
          "prepare for an exam", "clean a laptop keyboard", "train a puppy", "make tea",
          "plan a road trip", "fix a flat bike tyre", "paint a room", "brew coffee"]
FORMS = ["How do I {}?", "What is the easiest way to {}?"]


def prompts(n: int) -> list[str]:
    all_ = [f.format(t) for f in FORMS for t in TOPICS]
    return (all_ * (n // len(all_) + 1))[:n]


def random_value_dir(path: Path, hidden: int) -> None:
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    w0 = torch.randn(hidden, hidden, generator=g) / hidden ** 0.5
    w1 = torch.randn(1, hidden, generator=g) / hidden ** 0.5
    save_file({"layers.0.weight": w0, "layers.0.bias": torch.zeros(hidden),
               "layers.1.weight": w1, "layers.1.bias": torch.zeros(1)}, str(path / "model.safetensors"))
    config = {"input_dim": hidden, "hidden_dims": [hidden], "activation": "tanh", "reward_mean": 0.0,
              "reward_std": 1.0, "lm_hidden_size": hidden, "lm_identity": "bench-random", "target": None,
              "training": {}, "seed": 0, "git_revision": "bench", "recontrol_version": "bench"}
    (path / "config.json").write_text(json.dumps(config))


def generate_rate(args, prompts_file: Path, batch: int, control: list[str], out: Path) -> tuple[float, list[str]]:
    cmd = [args.recontrol, "generate", "--model", args.model, "--prompts", str(prompts_file), "--chat",
           "--batch-size", str(batch), "--max-new-tokens", str(args.new_tokens), "--out", str(out)] + control
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tokens = sum(r["num_tokens"] for r in records)
    seconds = sum({r["batch"]: r["seconds"] for r in records}.values())
    return tokens / seconds, [r["response"] for r in records]


async def serve_run(address, model: str, questions: list[str], concurrency: int, max_tokens: int, control):
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"{address}/v1", api_key="none", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    latencies, tokens, texts = [], 0, [None] * len(questions)

    async def one(i, q):
        nonlocal tokens
        async with sem:
            start = time.perf_counter()
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens,
                temperature=0, extra_body={"control": control} if control else None)
            latencies.append(time.perf_counter() - start)
            tokens += r.usage.completion_tokens
            texts[i] = r.choices[0].message.content

    start = time.perf_counter()
    await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))
    wall = time.perf_counter() - start
    await client.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    return tokens / wall, statistics.median(latencies), p99, texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recontrol", default=str(REPO_ROOT / "target" / "release" / "recontrol"))
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--value", default=None)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not Path(args.recontrol).is_file():
        print(f"{args.recontrol}: not built (cargo build --release)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    questions = prompts(args.prompts)
    prompts_file = work / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    value = args.value
    if value is None and (REPO_ROOT / "runs" / "demo" / "onnx" / "manifest.json").is_file():
        value = str(REPO_ROOT / "runs" / "demo" / "onnx")
    if value is not None and (Path(value) / "manifest.json").is_file():
        manifest = json.loads((Path(value) / "manifest.json").read_text())
        alpha, steps = manifest["controller"]["alpha"], manifest["controller"]["steps"]
        backend, foreign = "onnx", []
    else:
        hidden = json.loads((Path(args.model) / "config.json").read_text())["hidden_size"]
        if value is None:
            value = str(work / "value")
            random_value_dir(Path(value), hidden)
        alpha, steps, backend, foreign = 0.5, 30, "torch", ["--allow-foreign-value"]
    control_flags = ["--value", value, "--alpha", str(alpha), "--steps", str(steps),
                     "--grad-backend", backend] + foreign
    control = {"value": "v", "alpha": alpha, "steps": steps}
    print(f"model {args.model}; value head {value} ({backend}, alpha {alpha}, {steps} steps); "
          f"{len(questions)} prompts, {args.new_tokens} new tokens, greedy", flush=True)

    server = subprocess.Popen(
        [args.recontrol, "serve", "--model", args.model, "--value", f"v={value}", "--grad-backend", backend,
         "--port", "0", "--max-batch", str(max(args.concurrency)), "--served-model-name", "bench"] + foreign,
        stderr=subprocess.PIPE, text=True)
    address = None
    for line in server.stderr:
        if "listening on " in line:
            address = line.split("listening on ")[1].split()[0]
            break
    if address is None:
        print("the server did not start", file=sys.stderr)
        return 1
    rows = []
    try:
        for mode, ctl, flags in [("plain", None, []), ("controlled", control, control_flags)]:
            for c in args.concurrency:
                rate, p50, p99, texts = asyncio.run(
                    serve_run(address, "bench", questions, c, args.new_tokens, ctl))
                g_rate, g_texts = generate_rate(args, prompts_file, c, flags, work / f"{mode}-{c}.jsonl")
                same = sum(a == b for a, b in zip(texts, g_texts))
                row = {"mode": mode, "concurrency": c, "server_tok_s": rate, "p50_s": p50, "p99_s": p99,
                       "generate_tok_s": g_rate, "efficiency": rate / g_rate,
                       "same_text": same, "prompts": len(questions)}
                rows.append(row)
                print(f"{mode:10s} c={c:<3d} server {rate:7.1f} tok/s  p50 {p50:6.2f} s  p99 {p99:6.2f} s | "
                      f"generate --batch-size {c:<3d} {g_rate:7.1f} tok/s | efficiency {rate / g_rate:4.2f}x "
                      f"| same text {same}/{len(questions)}", flush=True)
                if c == 1 and same != len(questions):
                    print(f"FAIL: at c=1 the server's text differs from generate's for "
                          f"{len(questions) - same} prompts", file=sys.stderr)
                    return 1
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
