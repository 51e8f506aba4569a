#!/usr/bin/env python3
"""Controlled decoding speed: `recontrol generate` plain and with `--value` (gradient backends
`onnx` and `torch`) against RE-Control's reference algorithm in HF transformers (plain and
controlled), in the same run, on the same random Llama and the same random value MLP d->d->1.

The reference loop (as the authors' code): at every step the model runs the new token with the
KV cache, the final post-norm state of the newest position is cloned and moved by `steps`
iterations of SGD(lr=alpha) on -V(h).sum(), and lm_head gives the logits; greedy; the
batch is left padded. Every side generates exactly --max-new-tokens per prompt (eos ignored).

With `--model DIR` (e.g. models/smollm2-135m-instruct) the LM is that model, the prompts are
eight questions in its chat template, and the value MLP is random of the model's hidden size.
`--repeats R` alternates the five measurements R times per batch size and prints medians.

Usage (from the repo root, after `cargo build --release -p recontrol-cli`):

    .venv/bin/python scripts/bench_control.py                   # CPU: 8 layers, hidden 512, f32
    .venv/bin/python scripts/bench_control.py --model models/smollm2-135m-instruct --repeats 3 \\
        --max-new-tokens 48                                     # the real default model
    python3 scripts/bench_control.py --device cuda --dtype bfloat16 --layers 22 --hidden 2048 \\
        --intermediate 5632 --backends torch                    # a 1B-class Llama on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Human: How do I make a good cup of coffee at home?\n\nAssistant:",
    "Human: What should I pack for a weekend hiking trip?\n\nAssistant:",
    "Human: Can you explain how vaccines work?\n\nAssistant:",
    "Human: Give me three ideas for a birthday party.\n\nAssistant:",
    "Human: Why is the sky blue?\n\nAssistant:",
    "Human: How can I improve my sleep?\n\nAssistant:",
    "Human: What is a good way to learn a new language?\n\nAssistant:",
    "Human: How do I write a cover letter?\n\nAssistant:",
]


def make_model(path: Path, args) -> None:
    """A random Llama with the bench tokenizer of scripts/bench_generate.py's kind: the
    fixture tokenizer (vocab 512) is too small, so a byte-level BPE is trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(path)
    fast.save_pretrained(path)


def make_value(path: Path, d: int) -> dict:
    g = torch.Generator().manual_seed(1)
    b = 1.0 / d ** 0.5
    w = {"layers.0.weight": (torch.rand(d, d, generator=g) * 2 - 1) * b,
         "layers.0.bias": (torch.rand(d, generator=g) * 2 - 1) * b,
         "layers.1.weight": (torch.rand(1, d, generator=g) * 2 - 1) * b,
         "layers.1.bias": torch.zeros(1)}
    path.mkdir(parents=True)
    save_file(w, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "input_dim": d, "hidden_dims": [d], "activation": "relu", "reward_mean": 0.0, "reward_std": 1.0,
        "lm_hidden_size": d, "lm_identity": "sha256:bench", "training": {}, "seed": 1,
        "git_revision": "bench", "recontrol_version": "bench"}))
    return w


def reference(model, tok, value, prompts, args, steps: int) -> float:
    """Tokens/s of the reference loop for one batch."""
    device = next(model.parameters()).device
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    ids, mask = enc.input_ids, enc.attention_mask
    past, step_input = None, ids
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for t in range(args.max_new_tokens):
        with torch.no_grad():
            o = model(input_ids=step_input, attention_mask=mask, position_ids=position, past_key_values=past,
                      use_cache=True, output_hidden_states=True)
        past = o.past_key_values
        h = o.hidden_states[-1][:, -1, :].detach().float().clone()
        if steps > 0:
            h.requires_grad_(True)
            opt = torch.optim.SGD([h], lr=args.alpha)
            for _ in range(steps):
                opt.zero_grad()
                (-value(h).sum()).backward()
                opt.step()
        with torch.no_grad():
            token = model.lm_head(h.detach().to(model.dtype)).argmax(-1, keepdim=True)
        step_input = token
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        position = position[:, -1:] + 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(prompts) * args.max_new_tokens / (time.perf_counter() - start)


def ours(args, model: Path, prompts: list[str], tmp: Path, batch: int, extra: list[str]) -> float:
    """Tokens/s of `recontrol generate` on one batch, timed after a first (warm-up) batch of
    the same prompts: the per-batch `seconds` of the output records exclude model loading and
    the first call's device initialisation, as the reference's warm-up run does."""
    pf = tmp / "prompts.jsonl"
    pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts + prompts))
    out = tmp / "out.jsonl"
    cmd = [str(args.recontrol), "generate", "--model", str(model), "--prompts", str(pf),
           "--batch-size", str(batch), "--max-new-tokens", str(args.max_new_tokens), "--ignore-eos",
           "--device", "cuda:0" if args.device == "cuda" else "cpu",
           "--dtype", {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[args.dtype], "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\n{done.stderr}")
    records = [json.loads(line) for line in out.read_text().splitlines()][batch:]
    return sum(r["num_tokens"] for r in records) / records[0]["seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recontrol", type=Path, default=REPO_ROOT / "target" / "release" / "recontrol")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--backends", nargs="+", default=["onnx", "torch"], choices=["onnx", "torch"])
    ap.add_argument("--model", type=Path, help="a model directory instead of the random Llama")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.recontrol.is_file():
        print(f"{args.recontrol} not found: run `cargo build --release -p recontrol-cli` first", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model_dir = args.model.resolve()
            args.hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
        else:
            model_dir = tmp / "model"
            make_model(model_dir, args)
        w = make_value(tmp / "value", args.hidden)
        subprocess.run([str(args.recontrol), "export", "--value", str(tmp / "value"), "--out", str(tmp / "onnx"),
                        "--steps", str(args.steps), "--alpha", str(args.alpha)], check=True, stdout=subprocess.DEVNULL)
        device = torch.device(args.device)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
        tok = PreTrainedTokenizerFast.from_pretrained(model_dir, padding_side="left")
        prompt_pool = PROMPTS
        if args.model:
            questions = [p.split("Human: ")[1].split("\n\nAssistant:")[0] for p in PROMPTS]
            prompt_pool = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                   add_generation_prompt=True) for q in questions]
        wd = {k: v.to(device) for k, v in w.items()}

        def value(h):
            return F.linear(F.relu(F.linear(h, wd["layers.0.weight"], wd["layers.0.bias"])),
                            wd["layers.1.weight"], wd["layers.1.bias"]).squeeze(-1)

        control = ["--alpha", str(args.alpha), "--steps", str(args.steps), "--allow-foreign-value"]
        for batch in args.batches:
            prompts = (prompt_pool * ((batch + len(prompt_pool) - 1) // len(prompt_pool)))[:batch]
            reference(model, tok, value, prompts, args, 0)  # warm-up
            runs: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                runs.setdefault("reference_plain", []).append(reference(model, tok, value, prompts, args, 0))
                runs.setdefault("reference_controlled", []).append(
                    reference(model, tok, value, prompts, args, args.steps))
                runs.setdefault("recontrol_plain", []).append(ours(args, model_dir, prompts, tmp, batch, []))
                for b in args.backends:
                    value_path = tmp / ("onnx" if b == "onnx" else "value")
                    runs.setdefault(f"recontrol_{b}", []).append(
                        ours(args, model_dir, prompts, tmp, batch,
                             ["--value", str(value_path), "--grad-backend", b, *control]))
            row = {"batch": batch, **{k: statistics.median(v) for k, v in runs.items()}, "runs": runs}
            rows.append(row)
    lm = f"{args.model}" if args.model else f"random Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}"
    print(f"tokens/s (median of {args.repeats}), {lm}, {args.dtype}, "
          f"{args.device}; value MLP {args.hidden}->{args.hidden}->1, {args.steps} steps; {args.max_new_tokens} new "
          f"tokens per prompt; torch {torch.__version__}, {torch.get_num_threads()} threads")
    cols = ["reference_plain", "reference_controlled", "recontrol_plain"] + [f"recontrol_{b}" for b in args.backends]
    print(f"{'batch':>5} " + " ".join(f"{c:>22}" for c in cols))
    for r in rows:
        print(f"{r['batch']:>5} " + " ".join(f"{r[c]:>22.1f}" for c in cols))
    for r in rows:
        best = max(r[f"recontrol_{b}"] for b in args.backends)
        print(f"batch {r['batch']}: overhead reference {r['reference_plain'] / r['reference_controlled']:.2f}x, "
              + ", ".join(f"recontrol {b} {r['recontrol_plain'] / r[f'recontrol_{b}']:.2f}x" for b in args.backends)
              + f"; best controlled recontrol / reference plain = {best / r['reference_plain']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
