#!/usr/bin/env bash
# Checks the CUDA path on a GPU machine that has python3 with torch (and onnxruntime) but no
# Rust toolchain: binaries are built elsewhere (scripts/gpu_prepare.sh) and copied to
# target/gpu/ with the generated fixtures and a small labelled store.
#
#   scripts/gpu_check.sh [OUT_DIR]
#
# Runs: `recontrol env`; the LM parity tests on cuda:0 (hidden states and logits against HF's
# within 1e-4, greedy tokens identical, batched and alone); greedy generation on cuda:0 equal
# to cpu; rollout on cuda:0 (states against the CPU store); value training on cuda:0; and
# scripts/bench_control.py with a 1B-class bf16 Llama on cuda:0; scripts/bench_controller.py on
# cuda when onnxruntime has the CUDA provider.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/target/gpu-out}"
mkdir -p "$out"
bin="$root/target/gpu"
torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ort_lib="$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])' 2>/dev/null)"
[ -n "$ort_lib" ] && export ORT_DYLIB_PATH="$ort_lib"
export RECONTROL_REPO_ROOT="$root"
status=0
step() { printf '\n== %s\n' "$*"; }
run() { "$@" || { echo "FAILED: $*"; status=1; }; }

step "python packages"
python3 -c 'import importlib.util as u; print({m: bool(u.find_spec(m)) for m in ["torch", "onnxruntime", "transformers", "safetensors", "h5py", "numpy"]})'
python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())' || true
nvidia-smi --query-gpu=name,memory.total --format=csv || true

step "recontrol env"
run "$bin/recontrol" env

step "LM parity on cuda:0"
# Test binaries are not linked with --no-as-needed like the recontrol binary (cli/build.rs):
# preload libtorch_cuda so that libtorch sees the GPU.
RECONTROL_TEST_DEVICE=cuda:0 LD_PRELOAD="$torch_lib/libtorch_cuda.so" run "$bin/lm_parity" --test-threads 1 --nocapture

step "greedy generation: cuda:0 against cpu"
fixtures="$root/tests/fixtures/generated/lm"
printf '%s\n' '{"prompt": "Human: How do I bake bread?\n\nAssistant:"}' \
    '{"prompt": "Human: What is the capital of France?\n\nAssistant:"}' >"$out/prompts.jsonl"
for m in llama-mha llama3-gqa mistral qwen2; do
    for dev in cpu cuda:0; do
        run "$bin/recontrol" generate --model "$fixtures/$m" --prompts "$out/prompts.jsonl" \
            --max-new-tokens 24 --device "$dev" --out "$out/gen-$m-${dev%%:*}.jsonl" 2>/dev/null
    done
    python3 - "$out/gen-$m-cpu.jsonl" "$out/gen-$m-cuda.jsonl" "$m" <<'PY' || status=1
import json, sys
a = [json.loads(l)["response"] for l in open(sys.argv[1])]
b = [json.loads(l)["response"] for l in open(sys.argv[2])]
print(f"{sys.argv[3]}: cpu and cuda:0 responses {'identical' if a == b else 'DIFFER'}")
sys.exit(0 if a == b else 1)
PY
done

step "rollout on cuda:0 against the cpu store"
run "$bin/recontrol" rollout --model "$fixtures/llama-mha" --dataset "$root/data/bundled/hh-rlhf/harmless-base/test.jsonl.gz" \
    --limit 16 --max-new-tokens 12 --batch-size 8 --device cuda:0 --out "$out/cuda.h5"
python3 - "$root/target/gpu/cpu.h5" "$out/cuda.h5" <<'PY' || status=1
import sys, h5py, numpy as np
a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
same = np.array_equal(a["response_tokens"][:], b["response_tokens"][:])
sa, sb = a["states"][:].astype(np.float64), b["states"][:].astype(np.float64)
d = float(np.abs(sa - sb).max() / np.abs(sa).max()) if same else float("nan")
print(f"tokens identical: {same}; states {a['states'].dtype}, max |cuda - cpu| / max |cpu| = {d:.2e}")
sys.exit(0 if same and d < 1e-3 else 1)
PY

step "controlled generation on cuda:0 (torch backend; onnx backend on the CPU) against cpu"
for m in llama-mha qwen2; do
    run "$bin/recontrol" export --value "$root/target/gpu/value-$m" --out "$out/export-$m" --steps 8 --alpha 0.3 >/dev/null
    for cfg in "cpu torch" "cuda:0 torch" "cuda:0 onnx"; do
        set -- $cfg
        run "$bin/recontrol" generate --model "$fixtures/$m" --prompts "$out/prompts.jsonl" --max-new-tokens 24 \
            --device "$1" --value "$out/export-$m" --grad-backend "$2" --alpha 0.3 --steps 8 --allow-foreign-value \
            --out "$out/ctl-$m-${1%%:*}-$2.jsonl" 2>/dev/null
    done
    python3 - "$out" "$m" <<'PY' || status=1
import json, sys
out, m = sys.argv[1], sys.argv[2]
read = lambda k: [json.loads(l)["tokens"] for l in open(f"{out}/ctl-{m}-{k}.jsonl")]
a, b, c = read("cpu-torch"), read("cuda-torch"), read("cuda-onnx")
print(f"{m}: controlled tokens cpu/torch == cuda/torch: {a == b}; cuda/onnx: {a == c}")
sys.exit(0 if a == b == c else 1)
PY
done

step "value training on cuda:0"
run "$bin/recontrol" value train --rollouts "$root/target/gpu/labelled.h5" --out "$out/value" \
    --epochs 5 --hidden 64 --batch-size 64 --device cuda:0 --logdir "$out/logs"

step "controlled decoding benchmark on cuda: 1B-class random Llama, bf16"
run python3 "$root/scripts/bench_control.py" --recontrol "$bin/recontrol" --device cuda --dtype bfloat16 \
    --layers 22 --hidden 2048 --intermediate 5632 --batches 1 8 --json "$out/bench_control_cuda.json"

step "controller benchmark on cuda"
if python3 -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
    run python3 "$root/scripts/bench_controller.py" --recontrol "$bin/recontrol" --device cuda --repeats 20
else
    echo "onnxruntime here has no CUDAExecutionProvider: skipped"
fi
exit $status
