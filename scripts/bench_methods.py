#!/usr/bin/env python3
"""Decoding speed of test-time alignment methods in `recontrol generate`, against plain greedy.

One model (default models/smollm2-135m-instruct), CPU, float32, 2 threads, the same prompts
for every method: the questions of the first eight single-turn dialogues of the bundled
HH-RLHF harmless-base test set, rendered with the model's chat template (`--chat`; a model
without a chat template gets the HH format "\\n\\nHuman: ...\\n\\nAssistant:" instead).
Every method generates exactly --new-tokens tokens per prompt (`--ignore-eos`), greedy except
best-of-N. The methods and their flags:

    plain      (none)
    steer      --steer VECTOR --steer-scale 4                static representation editing
    recontrol  --value EXPORT --alpha 0.5 --steps 30         RE-Control (ONNX gradient backend)
    best-of-n  --best-of 4 --reward RM --temperature 0.7 --seed 0
    args       --args RM --args-k 10 --args-weight 1.0       ARGS greedy (Khanov et al. 2024)
    cd         --value-guided VALUE --cd-k 10 --cd-weight 1.0
                                                             value-guided decoding (Mudgal et al. 2024)

The artifacts are random (speed does not depend on what the weights say) and are made once in
target/bench-methods/ (rebuilt when missing or when their settings or the model change; the
export also after each rebuild of the binary):
* a value directory (MLP hidden -> 256 -> 1, relu, seeded; its lm_identity is the model's, so
  no --allow-foreign-value is needed) and its `recontrol export --steps 30 --alpha 0.5`;
* a reward model sharing the model: its config as LlamaForSequenceClassification with one
  label, its weights hard-linked (else copied) beside a seeded random `score.weight`
  [1, hidden], its tokenizer files; checked to load in transformers'
  AutoModelForSequenceClassification and to score like the LM's last hidden state times the head;
* a seeded random unit steering vector ("vector", [hidden], float32) with the provenance
  metadata `recontrol steer fit` writes (naming the model, so `--steer` accepts it).

tokens/s is measured as in bench_generate.py: sum of the records' num_tokens over the sum of
the per-batch `seconds` (model loading excluded); median over --repeats runs. Each run first
decodes the same batch once untimed (its records are dropped), so that first-call costs (ONNX
Runtime session, allocator, libtorch's first kernels) are not charged to a one-prompt batch;
--no-warmup times the first batch, as bench_generate.py does. Best-of-N records count the
returned response's tokens; "all samples" also counts the N-1 discarded ones (N x tokens/s,
exact with --ignore-eos). The slowdown is plain's tokens/s over the method's at the same batch
size; the paper's A100 slowdowns (RE-Control 1.42x, ARGS 79x, CD-prefix 54x) are shown for
reference.

Threads: OMP_NUM_THREADS, MKL_NUM_THREADS and RAYON_NUM_THREADS are set to --threads (2), and
`--threads N` is passed to `recontrol generate` when its --help lists that flag. ONNX Runtime
(RE-Control) is found through ORT_DYLIB_PATH, set to the project venv's libonnxruntime.so*
unless already set.

Usage (from the repo root, after `cargo build --release -p recontrol-cli`)::

    .venv/bin/python scripts/bench_methods.py [--recontrol target/release/recontrol] \\
        [--model DIR] [--methods plain recontrol ...] [--batch-sizes 1 8] [--new-tokens 32] \\
        [--repeats 1] [--threads 2] [--no-warmup] [--json FILE] [--dry-run]

--dry-run prepares the artifacts (not the export, when the binary is missing) and prints the
commands instead of running them. Exit status: 0 ok, 1 a run failed, 2 recontrol binary missing.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import recontrol_rate  # noqa: E402  (the tokens/s of one run, written once)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "smollm2-135m-instruct"
CACHE_DIR = REPO_ROOT / "target" / "bench-methods"
HH_TEST = REPO_ROOT / "data" / "bundled" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
NUM_PROMPTS = 8
SEED = 0

VALUE_HIDDEN_DIMS = [256]  # the demo's value head on SmolLM2
VALUE_ACTIVATION = "relu"
EXPORT_STEPS, EXPORT_ALPHA = 30, 0.5
STEER_SCALE = 4
BEST_OF = 4

# Method name -> its flags, given the artifacts; the order of the table.
METHODS = {
    "plain": lambda a: [],
    "steer": lambda a: ["--steer", str(a["vector"]), "--steer-scale", str(STEER_SCALE)],
    "recontrol": lambda a: ["--value", str(a["export"]), "--alpha", str(EXPORT_ALPHA),
                            "--steps", str(EXPORT_STEPS)],
    "best-of-n": lambda a: ["--best-of", str(BEST_OF), "--reward", str(a["reward"]),
                            "--temperature", "0.7", "--seed", "0"],
    "args": lambda a: ["--args", str(a["reward"]), "--args-k", "10", "--args-weight", "1.0"],
    "cd": lambda a: ["--value-guided", str(a["value"]), "--cd-k", "10", "--cd-weight", "1.0"],
}
# Which artifacts each method needs.
NEEDS = {"plain": [], "steer": ["vector"], "recontrol": ["value", "export"],
         "best-of-n": ["reward"], "args": ["reward"], "cd": ["value"]}
# Slowdowns vs plain decoding reported by the RE-Control paper (Vicuna-7B, A100).
PAPER_SLOWDOWN = {"recontrol": 1.42, "args": 79.0, "cd": 54.0}


# --------------------------------------------------------------------------- prompts


def hh_questions(n: int) -> list[str]:
    """The human turns of the first `n` single-turn dialogues of the HH-RLHF test file."""
    out = []
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        for line in f:
            dialogue = json.loads(line)["chosen"]
            if dialogue.count("\n\nHuman:") != 1:
                continue
            human = dialogue.split("\n\nAssistant:")[0]
            out.append(human.removeprefix("\n\nHuman:").strip())
            if len(out) == n:
                return out
    raise SystemExit(f"{HH_TEST}: fewer than {n} single-turn dialogues")


def has_chat_template(model: Path) -> bool:
    config = model / "tokenizer_config.json"
    return (model / "chat_template.jinja").is_file() or (
        config.is_file() and "chat_template" in json.loads(config.read_text())
    )


# --------------------------------------------------------------------------- artifacts


def model_identity(model: Path) -> str:
    """recontrol_lm::model_identity in Python (lm/src/lib.rs): sha256 over config.json,
    tokenizer.json and, per checkpoint file, its size, head (8 + 64 KiB), whole safetensors
    header when longer, and last 64 KiB; each piece prefixed with its length (u64 LE)."""
    edge = 64 * 1024
    h = hashlib.sha256()

    def add(b: bytes) -> None:
        h.update(struct.pack("<Q", len(b)))
        h.update(b)

    for name in ["config.json", "tokenizer.json"]:
        add((model / name).read_bytes())
    for path in checkpoint_files(model):
        size = path.stat().st_size
        add(struct.pack("<Q", size))
        with open(path, "rb") as f:
            head = f.read(min(size, 8 + edge))
            add(head)
            header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
            if 8 + header_len > len(head) and 8 + header_len <= size:
                f.seek(8)
                add(f.read(header_len))
            tail_start = max(size - edge, 0)
            f.seek(tail_start)
            add(f.read(size - tail_start))
    return "sha256:" + h.hexdigest()


def checkpoint_files(model: Path) -> list[Path]:
    """The model's safetensors files, in recontrol's order (sorted shard names)."""
    index = model / "model.safetensors.index.json"
    if index.is_file():
        return [model / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [model / "model.safetensors"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached(dest: Path, settings: dict, build) -> Path:
    """`dest`, rebuilt by `build(tmp)` into a temporary sibling (then renamed) unless its
    bench_settings.json holds exactly `settings`."""
    stamp = dest / "bench_settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        print(f"  {dest.name}: reusing {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    t0 = time.perf_counter()
    try:
        build(tmp)
        (tmp / "bench_settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"  {dest.name}: built {dest} in {time.perf_counter() - t0:.1f}s")
    return dest


def build_value(out: Path, hidden: int, identity: str) -> None:
    """A seeded random value directory (nn.Linear's default uniform init), reward units 0/1."""
    g = torch.Generator().manual_seed(SEED)
    dims = [hidden, *VALUE_HIDDEN_DIMS, 1]
    tensors = {}
    for i, (fan_in, fan_out) in enumerate(zip(dims, dims[1:])):
        bound = 1.0 / fan_in**0.5
        tensors[f"layers.{i}.weight"] = (torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound
        tensors[f"layers.{i}.bias"] = (torch.rand(fan_out, generator=g) * 2 - 1) * bound
    save_file(tensors, str(out / "model.safetensors"))
    config = {
        "input_dim": hidden, "hidden_dims": VALUE_HIDDEN_DIMS, "activation": VALUE_ACTIVATION,
        "reward_mean": 0.0, "reward_std": 1.0, "lm_hidden_size": hidden, "lm_identity": identity,
        "target": "td0", "training": {"bench_methods": "random weights, not trained"},
        "seed": SEED, "git_revision": "bench", "recontrol_version": "bench",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_export(out: Path, binary: Path, value: Path) -> None:
    cmd = export_command(binary, value, out / "export")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        fail(cmd, done)
    for f in (out / "export").iterdir():
        os.rename(f, out / f.name)
    (out / "export").rmdir()


def export_command(binary: Path, value: Path, out: Path) -> list[str]:
    return [str(binary), "export", "--value", str(value), "--out", str(out),
            "--steps", str(EXPORT_STEPS), "--alpha", str(EXPORT_ALPHA)]


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build_reward(out: Path, model: Path, hidden: int) -> None:
    """The model as an HF sequence-classification reward model with a random score head.
    The backbone's checkpoint files are hard-linked (not copied) as backbone-*.safetensors and
    an index maps their tensors and score.weight (score.safetensors)."""
    config = json.loads((model / "config.json").read_text())
    generation = model / "generation_config.json"
    gen = json.loads(generation.read_text()) if generation.is_file() else {}
    pad = config.get("pad_token_id", gen.get("pad_token_id"))
    if pad is None:
        eos = config.get("eos_token_id", gen.get("eos_token_id"))
        pad = eos[0] if isinstance(eos, list) else eos
    config.update({"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "LABEL_0"},
                   "label2id": {"LABEL_0": 0}, "pad_token_id": pad})
    config.pop("num_labels", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    weight_map, total = {}, 0
    for src in checkpoint_files(model):
        name = f"backbone-{src.name}"
        link_or_copy(src, out / name)
        with safe_open(str(src), "pt") as f:
            for key in f.keys():
                weight_map[key] = name
                total += _nbytes(f.get_slice(key))
    g = torch.Generator().manual_seed(SEED + 1)
    score = torch.randn(1, hidden, generator=g) / hidden**0.5  # [1, hidden]
    save_file({"score.weight": score}, str(out / "score.safetensors"))
    weight_map["score.weight"] = "score.safetensors"
    total += score.numel() * 4
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"]:
        if (model / name).is_file():
            shutil.copy2(model / name, out / name)
    check_reward(out, model, score)


def _nbytes(tensor_slice) -> int:
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1}
    n = 1
    for d in tensor_slice.get_shape():
        n *= d
    return n * sizes.get(tensor_slice.get_dtype(), 4)


@torch.no_grad()
def check_reward(rm_dir: Path, model: Path, score: torch.Tensor) -> None:
    """The reward dir loads in transformers with every weight, and its score of a text equals
    score.weight times the causal LM's final hidden state of the last token."""
    rm, info = AutoModelForSequenceClassification.from_pretrained(
        rm_dir, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise SystemExit(f"{rm_dir}: transformers found no weights for {sorted(info['missing_keys'])}")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(rm_dir)
    ids = tok("Is it possible to download a car?", return_tensors="pt").input_ids
    got = rm.eval()(input_ids=ids).logits[0, 0]
    want = (lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1] @ score[0])
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"{rm_dir}: transformers scores {got.item()}, backbone x head gives {want.item()}")


def build_vector(out: Path, model: Path, identity: str, hidden: int) -> None:
    """A random unit vector with the provenance `recontrol steer fit` records (as if fitted on
    this model's states), which `generate --steer` checks against the model."""
    g = torch.Generator().manual_seed(SEED + 2)
    v = torch.randn(hidden, generator=g)
    meta = {"rollouts": "random (bench_methods.py)", "model": str(model), "model_identity": identity,
            "hidden_size": hidden, "quantile": 0.25, "rollouts_total": 0, "top_rollouts": 0,
            "bottom_rollouts": 0, "top_states": 0, "bottom_states": 0, "top_reward_mean": 0.0,
            "bottom_reward_mean": 0.0, "difference_norm": float(v.norm()),
            "provenance": {"seed": SEED + 2}}
    save_file({"vector": (v / v.norm()).contiguous()}, str(out / "vector.safetensors"),
              metadata={"recontrol_steer": json.dumps(meta)})


def prepare(model: Path, methods: list[str], binary: Path, have_binary: bool, version: str) -> dict:
    """The artifacts the chosen methods need, {name: path}; "export" is absent when the
    binary is (dry runs)."""
    needed = {a for m in methods for a in NEEDS[m]}
    if not needed:
        return {}
    print(f"artifacts in {CACHE_DIR}:")
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    identity = model_identity(model)
    base = {"model": str(model), "model_identity": identity, "hidden_size": hidden, "seed": SEED}
    out = {}
    if needed & {"value", "export"}:
        settings = {**base, "hidden_dims": VALUE_HIDDEN_DIMS, "activation": VALUE_ACTIVATION}
        out["value"] = cached(CACHE_DIR / "value", settings, lambda d: build_value(d, hidden, identity))
    if "export" in needed:
        settings = {"value_sha256": sha256_file(out["value"] / "model.safetensors"),
                    "value_config_sha256": sha256_file(out["value"] / "config.json"),
                    "steps": EXPORT_STEPS, "alpha": EXPORT_ALPHA, "recontrol": version,
                    # Re-export after every build (it takes a second): the exporter may have changed.
                    "binary_mtime_ns": binary.stat().st_mtime_ns if have_binary else None}
        dest = CACHE_DIR / "export"
        stamp = dest / "bench_settings.json"
        if have_binary or (stamp.is_file() and json.loads(stamp.read_text()) == settings):
            out["export"] = cached(dest, settings, lambda d: build_export(d, binary, out["value"]))
        else:
            print("  export: no binary; would run: " + shlex.join(export_command(binary, out["value"], dest)))
            out["export"] = dest
    if "reward" in needed:
        settings = {**base, "score_seed": SEED + 1, "layout": "index+backbone-links-v1"}
        out["reward"] = cached(CACHE_DIR / "reward", settings, lambda d: build_reward(d, model, hidden))
    if "vector" in needed:
        settings = {**base, "vector_seed": SEED + 2, "unit": True, "metadata": "recontrol_steer-v1"}
        steer = cached(CACHE_DIR / "steer", settings, lambda d: build_vector(d, model, identity, hidden))
        out["vector"] = steer / "vector.safetensors"
    return out


# --------------------------------------------------------------------------- runs


def fail(cmd: list[str], done: subprocess.CompletedProcess):
    print(f"command failed (exit {done.returncode}): {shlex.join(cmd)}", file=sys.stderr)
    print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
    sys.exit(1)


def generate_command(binary: Path, model: Path, prompts_file: Path, out: Path, b: int, n: int,
                     chat: bool, threads: int | None, extra: list[str]) -> list[str]:
    cmd = [str(binary), "generate", "--model", str(model), "--prompts", str(prompts_file),
           "--batch-size", str(b), "--max-new-tokens", str(n), "--ignore-eos", "--device", "cpu",
           "--out", str(out)]
    if chat:
        cmd.append("--chat")
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd + extra


def run_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"]:
        env[var] = str(threads)
    if "ORT_DYLIB_PATH" not in env:
        libs = sorted(glob.glob(str(REPO_ROOT / ".venv" / "site-packages" / "onnxruntime" / "capi"
                                    / "libonnxruntime.so*")))
        if libs:
            env["ORT_DYLIB_PATH"] = libs[0]
    return env


def has_threads_flag(binary: Path) -> bool:
    done = subprocess.run([str(binary), "generate", "--help"], capture_output=True, text=True)
    return "--threads" in done.stdout


def bench(cmd_for, env: dict, b: int, n: int, repeats: int, warmup: bool) -> tuple[float, list[dict]]:
    """Median tokens/s over `repeats` runs of `cmd_for(r)`, and the last run's timed records
    (with `warmup`, each run's first `b` records are the untimed warm-up batch)."""
    rates, rows = [], []
    for r in range(repeats):
        cmd, out = cmd_for(r)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            fail(cmd, done)
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
        counts = [row.get("num_tokens") for row in rows]
        expected = 2 * b if warmup else b
        if len(rows) != expected or any(c != n for c in counts):
            print(f"expected {expected} records of {n} tokens, got {counts}: {shlex.join(cmd)}",
                  file=sys.stderr)
            sys.exit(1)
        rows = rows[b:] if warmup else rows
        rates.append(recontrol_rate(rows, b))
    return statistics.median(rates), rows


def fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recontrol", type=Path, default=REPO_ROOT / "target" / "release" / "recontrol")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="time the first batch too (no untimed warm-up batch)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="prepare the artifacts, print the commands")
    args = ap.parse_args()
    for b in args.batch_sizes:
        if not 1 <= b <= NUM_PROMPTS:
            ap.error(f"batch sizes must be in 1..{NUM_PROMPTS}")
    if args.repeats < 1 or args.new_tokens < 1 or args.threads < 1:
        ap.error("--repeats, --new-tokens and --threads must be at least 1")
    methods = [m for m in METHODS if m in args.methods]  # table order, no duplicates

    binary = args.recontrol if args.recontrol.is_absolute() else Path.cwd() / args.recontrol
    have_binary = binary.is_file()
    if not have_binary and not args.dry_run:
        print(f"error: recontrol binary not found at {binary}\n"
              f"build it first (cargo build --release -p recontrol-cli) or pass --recontrol PATH",
              file=sys.stderr)
        return 2
    model = args.model.resolve()
    if not (model / "config.json").is_file():
        print(f"error: --model {model}: no config.json", file=sys.stderr)
        return 2

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    version = (subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.strip()
               if have_binary else "unknown")
    threads_flag = have_binary and has_threads_flag(binary)
    env = run_env(args.threads)
    n = args.new_tokens
    print(f"{version}, model {model}, threads {args.threads} "
          f"({'--threads' if threads_flag else 'environment only'}), new tokens {n}, repeats {args.repeats}, "
          f"warm-up batch {'yes' if args.warmup else 'no'}")
    print(f"ORT_DYLIB_PATH={env.get('ORT_DYLIB_PATH', '(unset)')}")

    artifacts = prepare(model, methods, binary, have_binary, version)
    chat = has_chat_template(model)
    questions = hh_questions(NUM_PROMPTS)
    prompts = questions if chat else [f"\n\nHuman: {q}\n\nAssistant:" for q in questions]
    tok = AutoTokenizer.from_pretrained(model)
    if chat:
        rendered = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                            add_generation_prompt=True) for q in questions]
        lens = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in rendered]
    else:
        lens = [len(tok(p)["input_ids"]) for p in prompts]
    print(f"prompts: {'chat template' if chat else 'HH format'}, lengths in tokens {lens}")

    env_prefix = " ".join(f"{k}={shlex.quote(env[k])}" for k in
                          ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "ORT_DYLIB_PATH"]
                          if k in env)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as scratch:
        work = Path(scratch)
        for b in args.batch_sizes:
            prompts_file = work / f"prompts_b{b}.jsonl"
            batch = prompts[:b] * (2 if args.warmup else 1)  # warm-up batch, then the timed one
            prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in batch),
                                    encoding="utf-8")
            plain_rate = None
            for m in methods:
                def cmd_for(r, m=m):
                    out = work / f"{m}_b{b}_{r}.jsonl"
                    return generate_command(binary, model, prompts_file, out, b, n, chat,
                                            args.threads if threads_flag else None,
                                            METHODS[m](artifacts)), out

                if args.dry_run:
                    print(f"[{m}, batch {b}] {env_prefix} {shlex.join(cmd_for(0)[0])}")
                    continue
                rate, _ = bench(cmd_for, env, b, n, args.repeats, args.warmup)
                if m == "plain":
                    plain_rate = rate
                row = {"method": m, "batch": b, "tok_s": rate,
                       "slowdown": plain_rate / rate if plain_rate else None,
                       "paper_slowdown": PAPER_SLOWDOWN.get(m)}
                if m == "best-of-n":
                    row["all_samples_tok_s"] = BEST_OF * rate
                results.append(row)
                print(f"  batch {b} {m}: {rate:.2f} tok/s"
                      + (f", {row['slowdown']:.2f}x plain" if row["slowdown"] else ""))
    if args.dry_run:
        return 0

    print()
    print(f"{'method':<10}  {'batch':>5}  {'tok/s':>8}  {'slowdown':>8}  {'paper (A100)':>12}  "
          f"{'all-samples tok/s':>17}")
    for r in results:
        print(f"{r['method']:<10}  {r['batch']:>5}  {r['tok_s']:>8.2f}  {fmt(r['slowdown'], '.2f', 'x'):>8}  "
              f"{fmt(r['paper_slowdown'], '.2f', 'x'):>12}  {fmt(r.get('all_samples_tok_s'), '.2f'):>17}")
    print("slowdown = plain tok/s / method tok/s at the same batch size; best-of-n tok/s counts "
          f"the returned response, all-samples counts all {BEST_OF}")
    if args.json:
        report = {
            "recontrol": version, "model": str(model), "model_identity": model_identity(model),
            "new_tokens": n, "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
            "threads_flag": threads_flag, "prompts": prompts, "chat": chat,
            "flags": {m: METHODS[m]({k: f"<{k}>" for k in NEEDS[m]}) for m in methods},
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
