#!/usr/bin/env bash
# benchmarks/speed/lever_proof.py on a lent GPU machine (the device tool's `run`, carry [".whl"]; liger-kernel's
# wheel in .whl when the planner may pick Liger's kernels): results in $OUT (lever_proof.jsonl, runs.tgz, log).
# Arguments go on to lever_proof.py ("$@", after --out and --budget-s; a --budget-s there wins).  Llama-3.1-8B:
#   BUDGET_S=540 bash benchmarks/speed/lever_proof_device.sh --models llama-3.1-8b --budgets 24 --steps 30
#   (12 GiB: QLoRA, its random checkpoint takes ~320 s on the CPU: two calls on the same warm machine)
#   BUDGET_S=540 bash benchmarks/speed/lever_proof_device.sh --models llama-3.1-8b --budgets 12 --prepare-only
#   BUDGET_S=540 bash benchmarks/speed/lever_proof_device.sh --models llama-3.1-8b --budgets 12 --steps 12 --warmup 2
set -uo pipefail
source "$(dirname "$0")/../device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m benchmarks.speed.lever_proof --out /tmp/lever-proof --budget-s "${BUDGET_S:-520}" "$@" 2>&1 | tee "$OUT/lever_proof.log"
cp /tmp/lever-proof/lever_proof.jsonl "$OUT/" 2>/dev/null
tar czf "$OUT/runs.tgz" -C /tmp/lever-proof runs 2>/dev/null
ls -la "$OUT"
