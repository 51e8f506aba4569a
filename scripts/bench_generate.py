#!/usr/bin/env python3
"""Benchmark plain greedy generation throughput: recontrol vs Hugging Face `generate()`.

Both sides run the same model on CPU in the same invocation, with torch's default thread
count: a random Llama (8 layers, hidden 512, vocab 32000, float32), or with `--model DIR`
a real model directory (e.g. models/smollm2-135m-instruct, imported by `recontrol lm
import-gguf`), whose prompts are then the same questions rendered with its chat template.

Usage (from the repo root)::

    .venv/bin/python scripts/bench_generate.py [--recontrol target/release/recontrol] \\
        [--model DIR] [--new-tokens 64] [--batch-sizes 1 8] [--dtypes f32 bf16] [--repeats 3] \\
        [--json FILE] [--hf-only] [--variant NAME=VALUE ...]

* HF: one warm-up, then `repeats` timed calls of
  `model.generate(..., max_new_tokens=N, eos_token_id=None, do_sample=False)`
  (generation continues past </s>, exactly what recontrol's --ignore-eos does)
  (left padding); tokens/s = b*N / seconds; median over repeats.
* recontrol: `repeats` runs of
  `recontrol generate --model DIR --prompts FILE --batch-size b --max-new-tokens N
  --ignore-eos --out OUT.jsonl`; tokens/s = sum(num_tokens) / (sum of the per-batch
  `seconds`, model loading excluded); median over repeats.
* The two sides alternate (HF, recontrol, HF, ...) so a slow spell hits both.
* `--variant NAME=VALUE` (repeatable) also times recontrol with that environment setting
  (e.g. `RECONTROL_F32_TILES=0`: MKL's float32 products instead of the tiles), in the same
  alternation, and prints its tokens/s and its ratio to the default recontrol: how a CPU's
  choice of kernels is measured.
* The weight-streaming floor, in the same run: one pass of `x @ W^T` over every matrix the
  model multiplies by per token (all linear maps and the LM head; not the embedding lookup),
  for `x` of `b` rows in the run's dtype, timed in torch (median of 20 passes after 3
  warm-ups); floor tokens/s = b / that time. recontrol's fraction of it is printed. Where
  torch's products are slow (MKL runs generic code on AMD's CPUs) that floor is low, so a
  second one is printed too: the read floor, one `sum()` of every such matrix (each byte
  read once, at what torch's reductions get from memory), tokens/s = b / that time.
* With both dtypes: recontrol's bf16 / f32 speed in `repeats` alternating pairs of runs
  (f32, bf16, f32, ...), the median of the pairs' ratios: the dtypes' blocks run minutes apart
  and a machine's speed drifts between them.
* Also checks that recontrol's greedy tokens for batch size 1 equal HF's (f32), and reports
  how many of recontrol's bf16 greedy tokens equal its f32 ones (the common prefix per prompt),
  and for scale, at the largest batch, recontrol bf16 against HF bf16, HF bf16 against HF
  f32, and recontrol f32 against HF f32.

The model is cached in target/bench-model (when target/ exists) and rebuilt only
when the settings change; otherwise it goes to a temporary directory.
Exit status: 0 ok, 1 recontrol failed, 2 recontrol binary missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig
from transformers.utils import logging as hf_logging

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_SCRIPT = REPO_ROOT / "tests" / "fixtures" / "lm" / "make_fixtures.py"
TOKENIZER_SRC = REPO_ROOT / "tests" / "fixtures" / "generated" / "lm" / "llama-mha"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
CACHE_DIR = REPO_ROOT / "target" / "bench-model"

BOS_ID, EOS_ID, PAD_ID = 1, 2, 3
SEED = 0
# Everything that determines the model's weights; a cached model is reused only if
# its bench_settings.json holds exactly this (plus the tokenizer's hash).
MODEL_SETTINGS = {
    "num_hidden_layers": 8,
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 1376,
    "vocab_size": 32000,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "seed": SEED,
    "init": "scaled-normal-v1",  # bump when randomize_() changes
}

# Eight distinct HH-style prompts of similar length (22-27 tokens with the fixture tokenizer).
PROMPTS = [
    "\n\nHuman: What is the best way to learn to cook?\n\nAssistant:",
    "\n\nHuman: How do I prepare for an interview?\n\nAssistant:",
    "\n\nHuman: Why is the sky blue during the day?\n\nAssistant:",
    "\n\nHuman: How can I help my dog stop barking?\n\nAssistant:",
    "\n\nHuman: What should I pack for a trip to Spain?\n\nAssistant:",
    "\n\nHuman: How do I start running if I am tired?\n\nAssistant:",
    "\n\nHuman: What are some good books to read in winter?\n\nAssistant:",
    "\n\nHuman: Is it safe to swim right after eating?\n\nAssistant:",
]


# --------------------------------------------------------------------------- model


def tokenizer_hash() -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        h.update((TOKENIZER_SRC / name).read_bytes())
    return h.hexdigest()[:16]


def ensure_tokenizer() -> None:
    """Run the fixture script if its llama-mha tokenizer is missing."""
    if all((TOKENIZER_SRC / f).exists() for f in TOKENIZER_FILES):
        return
    print(f"tokenizer fixture missing; running {FIXTURE_SCRIPT.relative_to(REPO_ROOT)}")
    subprocess.run([sys.executable, str(FIXTURE_SCRIPT)], check=True, cwd=REPO_ROOT)


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Seeded weights with peaked output distributions (robust greedy argmax).

    Linear weights ~ N(0, 1/fan_in) keep activations O(1) through the layers;
    the lm_head is scaled so logits have std ~2 (top-1/top-2 gaps far above
    float32 round-off).  Norm weights are 1 + 0.1*N(0, 1).
    """
    torch.manual_seed(SEED)
    hidden = MODEL_SETTINGS["hidden_size"]
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif "embed_tokens" in name:
            p.copy_(torch.randn_like(p))
        elif "lm_head" in name:
            p.copy_(2.0 / hidden**0.5 * torch.randn_like(p))
        elif p.dim() == 2:
            p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
        else:
            raise ValueError(f"unexpected parameter {name}")


def build_model(dest: Path, settings: dict) -> None:
    """Create the random model + tokenizer in `dest` (written to a temp dir, then renamed)."""
    s = MODEL_SETTINGS
    config = LlamaConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        max_position_embeddings=s["max_position_embeddings"],
        rms_norm_eps=s["rms_norm_eps"],
        tie_word_embeddings=s["tie_word_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]},
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            shutil.copy2(TOKENIZER_SRC / f, tmp / f)
        (tmp / "bench_settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_dir(scratch: Path) -> Path:
    """The bench model dir: cached under target/ when possible, else in `scratch`."""
    ensure_tokenizer()
    settings = {**MODEL_SETTINGS, "tokenizer_sha256": tokenizer_hash()}
    use_cache = CACHE_DIR.parent.is_dir()
    dest = CACHE_DIR if use_cache else scratch / "bench-model"
    stamp = dest / "bench_settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        print(f"model: reusing {dest}")
        return dest
    t0 = time.perf_counter()
    build_model(dest, settings)
    print(f"model: built {dest} in {time.perf_counter() - t0:.1f}s")
    return dest


# --------------------------------------------------------------------------- HF side


@torch.no_grad()
def hf_generate(model, tokenizer, prompts, n, **kw) -> torch.Tensor:
    """Greedy left-padded generation; returns the new tokens [b, n]."""
    enc = tokenizer(prompts, add_special_tokens=True, padding=True, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else PAD_ID
    out = model.generate(
        **enc, max_new_tokens=n, do_sample=False, pad_token_id=pad, **kw
    )
    return out[:, enc["input_ids"].shape[1]:]


def chat_prompts(tokenizer) -> list[str]:
    """The questions of PROMPTS as user messages in the tokenizer's chat template."""
    questions = [p.split("Human: ")[1].split("\n\nAssistant:")[0] for p in PROMPTS]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                      add_generation_prompt=True)
        for q in questions
    ]


def hf_rate(model, tokenizer, prompts, b: int, n: int) -> float:
    """Tokens/s of one HF generate call on the first `b` prompts."""
    t0 = time.perf_counter()
    new = hf_generate(model, tokenizer, prompts[:b], n, eos_token_id=None)
    dt = time.perf_counter() - t0
    assert new.shape == (b, n), new.shape
    return b * n / dt


@torch.no_grad()
def weight_floor(model, b: int, dtype: torch.dtype, read_only: bool = False) -> float:
    """Tokens/s of one bare pass of `x @ W^T` (x: b rows) over every matrix multiplied per
    token: the model's linear layers and its LM head (tied or not), in `dtype`; with
    `read_only`, of one `sum()` of each instead (the read floor)."""
    weights = [m.weight.detach().to(dtype).contiguous()
               for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(b, w.shape[1], dtype=dtype) for w in weights}

    def one_pass():
        for w in weights:
            if read_only:
                w.sum()
            else:
                torch.nn.functional.linear(xs[w.shape[1]], w)

    for _ in range(3):
        one_pass()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t0)
    return b / statistics.median(times)


# --------------------------------------------------------------------------- recontrol side


def run_recontrol(binary: Path, model: Path, prompts_file: Path, out_file: Path,
                  b: int, n: int, dtype: str = "f32", env: dict | None = None) -> list[dict]:
    cmd = [
        str(binary), "generate",
        "--model", str(model),
        "--prompts", str(prompts_file),
        "--batch-size", str(b),
        "--max-new-tokens", str(n),
        "--dtype", dtype,
        "--ignore-eos",
        "--out", str(out_file),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        print(f"recontrol failed (exit {proc.returncode}): {' '.join(cmd)}", file=sys.stderr)
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        sys.exit(1)
    with open(out_file, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def recontrol_rate(rows: list[dict], b: int) -> float:
    """tokens/s of one run: rows come in consecutive batches of `b`, each carrying its
    batch's generation wall time in `seconds`."""
    tokens = sum(r["num_tokens"] for r in rows)
    seconds = sum(rows[i]["seconds"] for i in range(0, len(rows), b))
    return tokens / seconds


def recontrol_run(binary, model, prompts, work: Path, b: int, n: int, dtype: str, r: int,
                  env: dict | None = None):
    """Tokens/s of one recontrol run on the first `b` prompts (with `env` added to the
    environment), and its rows."""
    prompts_file = work / f"prompts_b{b}.jsonl"
    with open(prompts_file, "w", encoding="utf-8") as f:
        for p in prompts[:b]:
            f.write(json.dumps({"prompt": p}) + "\n")
    rows = run_recontrol(binary, model, prompts_file, work / f"out_{dtype}_b{b}_{r}.jsonl", b, n, dtype,
                         env)
    assert len(rows) == b, f"expected {b} rows, got {len(rows)}"
    assert all(row["num_tokens"] == n for row in rows), [row["num_tokens"] for row in rows]
    return recontrol_rate(rows, b), rows


def common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recontrol", type=Path, default=REPO_ROOT / "target" / "release" / "recontrol")
    ap.add_argument("--model", type=Path, help="a model directory instead of the random Llama")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", choices=["f32", "bf16"], default=["f32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results table as JSON here")
    ap.add_argument("--hf-only", action="store_true", help="skip recontrol (test the HF half)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE",
                    help="also time recontrol with this environment setting (repeatable)")
    args = ap.parse_args()
    variants = []
    for v in args.variant:
        name, eq, value = v.partition("=")
        if not eq or not name:
            ap.error(f"--variant: expected NAME=VALUE, got {v!r}")
        variants.append((v, {name: value}))
    for b in args.batch_sizes:
        if not 1 <= b <= len(PROMPTS):
            ap.error(f"batch sizes must be in 1..{len(PROMPTS)}")

    binary = args.recontrol if args.recontrol.is_absolute() else Path.cwd() / args.recontrol
    if not args.hf_only and not binary.is_file():
        print(f"error: recontrol binary not found at {binary}\n"
              f"build it first (cargo build --release -p recontrol-cli) or pass --recontrol PATH "
              f"(or --hf-only)", file=sys.stderr)
        return 2

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    n = args.new_tokens
    threads = torch.get_num_threads()  # torch's default; recontrol uses the same
    print(f"torch {torch.__version__}, threads {threads}, new tokens {n}, repeats {args.repeats}")
    torch_dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as scratch:
        work = Path(scratch)
        mdir = args.model.resolve() if args.model else model_dir(work)
        tokenizer = AutoTokenizer.from_pretrained(mdir, padding_side="left")
        prompts = None
        print(f"model: {mdir}")

        results = []
        tokens_by_dtype: dict[str, list[list[int]]] = {}
        hf_tokens_by_dtype: dict[str, list[list[int]]] = {}
        for dtype in args.dtypes:
            model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch_dtypes[dtype]).eval()
            if prompts is None:
                prompts = chat_prompts(tokenizer) if args.model else PROMPTS
                lens = [len(tokenizer(p)["input_ids"]) for p in prompts]
                print(f"prompt lengths (tokens incl. special tokens): {lens}")
            for b in args.batch_sizes:
                floor = weight_floor(model, b, torch_dtypes[dtype])
                read_floor = weight_floor(model, b, torch_dtypes[dtype], read_only=True)
                hf_generate(model, tokenizer, prompts[:b], n, eos_token_id=None)  # warm-up
                hf_rates, rc_rates, rc_rows = [], [], None
                variant_rates = {label: [] for label, _ in variants}
                for r in range(args.repeats):
                    hf_rates.append(hf_rate(model, tokenizer, prompts, b, n))
                    if not args.hf_only:
                        rate, rc_rows = recontrol_run(binary, mdir, prompts, work, b, n, dtype, r)
                        rc_rates.append(rate)
                        for label, env in variants:
                            rate, _ = recontrol_run(binary, mdir, prompts, work, b, n, dtype, r, env)
                            variant_rates[label].append(rate)
                hf = statistics.median(hf_rates)
                rc = statistics.median(rc_rates) if rc_rates else None
                results.append({"dtype": dtype, "batch": b, "hf_tok_s": hf, "recontrol_tok_s": rc,
                                "ratio": rc / hf if rc is not None else None,
                                "floor_tok_s": floor,
                                "floor_fraction": rc / floor if rc is not None else None,
                                "read_floor_tok_s": read_floor,
                                "read_floor_fraction": rc / read_floor if rc is not None else None,
                                "hf_runs": hf_rates, "recontrol_runs": rc_rates,
                                "variants": {label: {"tok_s": statistics.median(rates), "runs": rates}
                                             for label, rates in variant_rates.items() if rates}})
                print(f"  {dtype} batch {b}: HF {hf:.1f} tok/s"
                      + (f", recontrol {rc:.1f} tok/s" if rc is not None else "")
                      + f", weight-streaming floor {floor:.1f} tok/s, read floor {read_floor:.1f}")
                for label, v in results[-1]["variants"].items():
                    print(f"    recontrol with {label}: {v['tok_s']:.1f} tok/s "
                          f"(default / this: {rc / v['tok_s']:.2f}x)")
                if rc_rows is not None and b == max(args.batch_sizes):
                    tokens_by_dtype[dtype] = [list(row["tokens"]) for row in rc_rows]
                    hf_tokens_by_dtype[dtype] = hf_generate(
                        model, tokenizer, prompts[:b], n, eos_token_id=None).tolist()

                if b == 1 and dtype == "f32" and rc_rows is not None:
                    # Reference greedy tokens for prompt 0 (both sides continue past </s>).
                    ours = list(rc_rows[0]["tokens"])
                    cont = hf_generate(model, tokenizer, prompts[:1], n, eos_token_id=None)[0].tolist()
                    match = ours == cont
                    results[-1]["tokens_match_hf"] = match
                    print(f"  batch 1 greedy tokens match HF: {'yes' if match else 'NO'}")
                    if not match:
                        print(f"    recontrol: {ours}\n    HF:        {cont}")
            del model

        # bf16 against f32 in alternating pairs of recontrol runs (f32, bf16, f32, ...): the
        # two dtypes' blocks above run minutes apart, and this machine's speed drifts between
        # them (HF's own bf16 rate moved by 25% from one such block to the next).
        paired: dict[int, list[float]] = {}
        if not args.hf_only and "f32" in args.dtypes and "bf16" in args.dtypes:
            for b in args.batch_sizes:
                paired[b] = []
                for r in range(args.repeats):
                    f32_rate, _ = recontrol_run(binary, mdir, prompts, work, b, n, "f32", r)
                    bf16_rate, _ = recontrol_run(binary, mdir, prompts, work, b, n, "bf16", r)
                    paired[b].append(bf16_rate / f32_rate)

    agreement = None
    if "f32" in tokens_by_dtype and "bf16" in tokens_by_dtype:
        f32, bf16 = tokens_by_dtype["f32"], tokens_by_dtype["bf16"]
        prefixes = [common_prefix(a, b) for a, b in zip(f32, bf16)]
        agreement = {"prompts": len(prefixes), "identical": sum(p == n for p in prefixes),
                     "common_prefix": prefixes, "mean_common_prefix": statistics.mean(prefixes)}
        print(f"\nrecontrol bf16 vs f32 greedy tokens (batch {max(args.batch_sizes)}): "
              f"{agreement['identical']} of {len(prefixes)} prompts identical over {n} tokens; "
              f"common prefix per prompt {prefixes} (mean {agreement['mean_common_prefix']:.1f})")
        # For scale: two bf16 implementations (HF's and recontrol's) and HF's own bf16 against
        # its f32, on the same batch.
        for label, xs, ys in [
            ("recontrol bf16 vs HF bf16", bf16, hf_tokens_by_dtype.get("bf16")),
            ("HF bf16 vs HF f32", hf_tokens_by_dtype.get("bf16"), hf_tokens_by_dtype.get("f32")),
            ("recontrol f32 vs HF f32", f32, hf_tokens_by_dtype.get("f32")),
        ]:
            if xs is None or ys is None:
                continue
            ps = [common_prefix(a, b) for a, b in zip(xs, ys)]
            agreement[label] = ps
            print(f"{label}: {sum(p == n for p in ps)} of {len(ps)} identical; common prefix "
                  f"{ps} (mean {statistics.mean(ps):.1f})")

    # Table.
    print()
    print(f"{'dtype':>5}  {'batch':>5}  {'HF tok/s':>10}  {'recontrol tok/s':>15}  {'ratio':>6}  "
          f"{'floor tok/s':>11}  {'of floor':>8}  {'read floor':>10}  {'of read':>7}")
    for r in results:
        rc = f"{r['recontrol_tok_s']:.1f}" if r["recontrol_tok_s"] is not None else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        frac = f"{100 * r['floor_fraction']:.0f}%" if r["floor_fraction"] is not None else "-"
        read = (f"{100 * r['read_floor_fraction']:.0f}%"
                if r["read_floor_fraction"] is not None else "-")
        print(f"{r['dtype']:>5}  {r['batch']:>5}  {r['hf_tok_s']:>10.1f}  {rc:>15}  {ratio:>6}  "
              f"{r['floor_tok_s']:>11.1f}  {frac:>8}  {r['read_floor_tok_s']:>10.1f}  {read:>7}")
    for r in results:
        for label, v in r["variants"].items():
            print(f"{r['dtype']:>5}  {r['batch']:>5}  recontrol with {label}: {v['tok_s']:.1f} tok/s; "
                  f"default / this {r['recontrol_tok_s'] / v['tok_s']:.2f}x, "
                  f"this / HF {v['tok_s'] / r['hf_tok_s']:.2f}x")
    by = {(r["dtype"], r["batch"]): r["recontrol_tok_s"] for r in results}
    for b in args.batch_sizes:
        if by.get(("f32", b)) and by.get(("bf16", b)):
            print(f"recontrol bf16 / f32 at batch {b}: {by[('bf16', b)] / by[('f32', b)]:.2f}x "
                  f"(medians of the blocks above)")
    for b, ratios in paired.items():
        print(f"recontrol bf16 / f32 at batch {b}, alternating pairs: median "
              f"{statistics.median(ratios):.2f}x (pairs: "
              + ", ".join(f"{x:.2f}" for x in ratios) + ")")
    if args.json:
        report = {
            "new_tokens": n,
            "repeats": args.repeats,
            "threads": threads,
            "torch": torch.__version__,
            "model": str(args.model) if args.model else MODEL_SETTINGS,
            "results": results,
            "bf16_vs_f32_tokens": agreement,
            "bf16_over_f32_paired": {str(b): ratios for b, ratios in paired.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
