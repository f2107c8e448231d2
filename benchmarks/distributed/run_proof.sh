#!/usr/bin/env bash
# The multi-GPU proof on a lent 2-GPU machine (the device tool's `run`, kind nvidia-h200-x2),
# results in $OUT.  Carry .whl (../shared/device/wheels.sh) as for the accuracy harness.
#   bash benchmarks/distributed/run_proof.sh                 # all cases, ~10-25 s each
#   CASES=ddp-full-1b,fsdp-full-full-1b bash benchmarks/distributed/run_proof.sh
#   DRY=1 bash benchmarks/distributed/run_proof.sh           # CPU: DDP over gloo, configs for the rest
# PROOF_TIMEOUT_S caps the whole grid (default 540 s, inside the tool's 600 s); rerun with the
# same $OUT to go on (--skip-done).
set -uo pipefail
source "$(dirname "$0")/../device_env.sh"
args=(--out "$OUT/distributed.jsonl" --skip-done)
[ -n "${CASES:-}" ] && args+=(--cases "$CASES")
if [ -n "${DRY:-}" ]; then
  args+=(--dry-run)
else
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
  nvidia-smi topo -m >> "$OUT/nvidia-smi.txt" 2>&1
fi
python3 -c "import deepspeed" 2>/dev/null && echo "deepspeed importable" || echo "deepspeed not importable: ZeRO cases are recorded as skipped"
timeout "${PROOF_TIMEOUT_S:-540}" python3 -m benchmarks.distributed.run "${args[@]}" 2>&1 | tee -a "$OUT/distributed.log"
python3 -m benchmarks.distributed.report "$OUT/distributed.jsonl" --md "$OUT/distributed-report.md" 2>&1 | tail -40
