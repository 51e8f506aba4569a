#!/usr/bin/env bash
# Wall time of `recontrol rollout` as one process against the same rollouts as a Slurm job array
# of TASKS shards plus its merge job (`recontrol slurm submit rollout`), on the same machine, in
# the same run; prints both, the states/s of each and their ratio.
#
#   scripts/bench_slurm.sh            (MODEL, LIMIT, TOKENS, TASKS override the defaults)
#
# Uses the cluster at $SLURM_CONF, or starts a one-node one (scripts/slurm-local.sh) and stops it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
model="${MODEL:-models/smollm2-135m-instruct}"
limit="${LIMIT:-64}"
tokens="${TOKENS:-32}"
tasks="${TASKS:-4}"
cargo build --release --locked -p recontrol-cli >&2
bin="$root/target/release/recontrol"
if [ -z "${SLURM_CONF:-}" ]; then
    cluster="$root/target/slurm-bench"
    eval "$(scripts/slurm-local.sh start "$cluster")"
    trap 'scripts/slurm-local.sh stop "$cluster"' EXIT
fi
work="$(mktemp -d "$root/target/bench-slurm.XXXXXX")"
args=(--model "$model" --dataset data/bundled/hh-rlhf/harmless-base/test.jsonl.gz --split train
    --limit "$limit" --max-new-tokens "$tokens" --batch-size 8 --ignore-eos)
now() { date +%s.%N; }

t0="$(now)"
"$bin" rollout "${args[@]}" --out "$work/one.h5" 2>/dev/null
t1="$(now)"
submitted="$("$bin" slurm submit rollout --tasks "$tasks" --out "$work/array.h5" -- "${args[@]}")"
merge="$(echo "$submitted" | sed -n 's/.*merge job \([0-9]*\).*/\1/p')"
while [ -n "$(squeue -h -j "$merge" 2>/dev/null)" ]; do sleep 0.2; done
t2="$(now)"
[ -f "$work/array.h5" ] || { echo "the merge job wrote nothing; logs in $work/array.h5.slurm/logs" >&2; exit 1; }
states=$((limit * tokens))
python3 - "$t0" "$t1" "$t2" "$states" "$tasks" "$(nproc)" <<'EOF'
import sys
t0, t1, t2, states, tasks, cpus = map(float, sys.argv[1:])
one, array = t1 - t0, t2 - t1
print(f"rollout, one process:            {one:7.1f} s  {states / one:7.0f} states/s")
print(f"{int(tasks)}-task array + merge ({int(cpus)} CPUs): {array:7.1f} s  {states / array:7.0f} states/s")
print(f"array / one process: {array / one:.2f}x the wall time")
EOF
rm -rf "$work"
