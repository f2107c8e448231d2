#!/usr/bin/env bash
# Issue 20's levers on a lent GPU machine (the device tool's `run`), in ONE call of at most 600 s:
#   bash benchmarks/accuracy/device_levers.sh                    # carry: [".whl"]
#   GRID=levers_fused HISTORY_MIN_S=9999 bash benchmarks/accuracy/device_levers.sh   # another grid, no histories
# .whl comes from ../shared/device/wheels.sh: the default set (bitsandbytes, trl, datasets, dill,
# multiprocess) plus `../shared/device/wheels.sh liger-kernel==0.8.5` (pure Python; triton comes
# with the image's torch).
# 1. the `levers` grid (grids.py: liger-kernel, trl packing, trl activation offloading, each next
#    to its baseline twin), capped so that everything ends by END_S (default 555 s) after the start;
# 2. with the time left (>= HISTORY_MIN_S), `levers_history`: one lever case per lever re-run with
#    torch's memory history (VRAMFIT_MEMORY_HISTORY), into levers-history.jsonl;
# 3. $OUT (flat, 7 files): levers.jsonl, levers.log, levers-history.jsonl, memory-history.tgz,
#    logs.tgz, pip.txt, gpu.txt.
# Rerun with the same $OUT file to go on: the harness skips the cases already in it (--skip-done).
set -uo pipefail
START=$(date +%s)
END_S=${END_S:-555}
HISTORY_MIN_S=${HISTORY_MIN_S:-75}
CASE_TIMEOUT_S=${CASE_TIMEOUT_S:-150}
left() { echo $(( END_S - ($(date +%s) - START) )); }

source benchmarks/device_env.sh   # $OUT, .whl into /tmp/site, PYTHONPATH, PYTHONUNBUFFERED
{
  echo "# pip list (image + carried wheels), $(date -u +%FT%TZ)"
  python3 -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|peft|accelerate|bitsandbytes|trl|datasets|liger.kernel|nvidia-ml-py|tokenizers|huggingface.hub|safetensors|pyarrow) "
} > "$OUT/pip.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" "$OUT/pip.txt"

budget=$(( $(left) - 10 ))
echo "levers: ${budget} s cap" | tee -a "$OUT/levers.log"
timeout "$budget" python3 -m benchmarks.accuracy.harness --grid "${GRID:-levers}" --out "$OUT/levers.jsonl" \
  --skip-done --timeout "$CASE_TIMEOUT_S" 2>&1 | tee -a "$OUT/levers.log"
echo "levers: $(( $(date +%s) - START )) s since start" | tee -a "$OUT/levers.log"

budget=$(( $(left) - 10 ))
if [ "$budget" -ge "$HISTORY_MIN_S" ]; then
  echo "levers_history: ${budget} s cap" | tee -a "$OUT/levers.log"
  VRAMFIT_MEMORY_HISTORY=/tmp/vramfit-levers-history timeout "$budget" python3 -m benchmarks.accuracy.harness \
    --grid levers_history --out "$OUT/levers-history.jsonl" --skip-done --timeout "$CASE_TIMEOUT_S" \
    2>&1 | tee -a "$OUT/levers.log"
else
  echo "levers_history: skipped, ${budget} s left" | tee -a "$OUT/levers.log"
fi
[ -d /tmp/vramfit-levers-history ] && tar czf "$OUT/memory-history.tgz" -C /tmp vramfit-levers-history
tar czf "$OUT/logs.tgz" -C /tmp vramfit-harness-logs 2>/dev/null
echo "done: $(( $(date +%s) - START )) s" | tee -a "$OUT/levers.log"
ls -la "$OUT"
