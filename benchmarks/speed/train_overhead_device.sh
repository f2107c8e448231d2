#!/usr/bin/env bash
# vramfit train's own overhead on the GPU machine (issue 20, item 3): Llama-3.2-1B LoRA through
# `vramfit train` and through a plain SFTTrainer script, 2 pairs in alternating order, then a 7B model's
# pairs while the budget lasts, then the tracker's per-reading micro-benchmark
# (benchmarks/speed/train_overhead.py says what is measured and how).  One call of the device tool's
# `run` (timeout_s 600), carry [".whl"] (../shared/device/wheels.sh: trl, datasets, dill, multiprocess):
#   bash benchmarks/speed/train_overhead_device.sh
#   MODELS="llama-3.2-1b" BUDGET_S=300 bash benchmarks/speed/train_overhead_device.sh
#   MODELS="llama-3.1-8b" bash benchmarks/speed/train_overhead_device.sh
#   OUT=/tmp/to ARGS="--tiny --repeats 1" bash benchmarks/speed/train_overhead_device.sh   # CPU dry run
# Back in $OUT (3 files): train_overhead.jsonl (the results), train_overhead.log, train_overhead_runs.tgz
# (per run: the step clock's record, the log, the profile tables; vramfit's run report and timeline).
# Commit the JSONL as benchmarks/results/<gpu>-<date>-train-overhead.jsonl.
set -uo pipefail
source "$(dirname "$0")/../device_env.sh"
BUDGET_S=${BUDGET_S:-530}   # the driver's whole wall, within the call's 600 s (wheels and packing outside it)
MODELS=${MODELS:-"llama-3.2-1b mistral-7b-v0.1"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
W="$OUT/work"
# shellcheck disable=SC2086
python3 -m benchmarks.speed.train_overhead --out "$W" --models $MODELS --budget-s "$BUDGET_S" ${ARGS:-} 2>&1 \
  | grep --line-buffered -v -e Warning -e warnings.warn -e USDT | tee "$OUT/train_overhead.log"
rc=${PIPESTATUS[0]}
cp "$W/train_overhead.jsonl" "$OUT/" 2>/dev/null
tar czf "$OUT/train_overhead_runs.tgz" -C "$W" runs tracker_bench.log 2>/dev/null
rm -rf "$W"
exit "$rc"
