#!/usr/bin/env bash
# Run named grids on a lent GPU machine (the device tool's `run`), results and logs in $OUT.
#   bash benchmarks/accuracy/device_run.sh smoke issue2        # carry: [".whl"]
#   HARNESS_ARGS="--done-in benchmarks/results/*.jsonl" bash benchmarks/accuracy/device_run.sh full
#        # the cases of `full` no committed result has yet
# .whl comes from ../shared/device/wheels.sh (bitsandbytes, trl, datasets, ...). A `smoke` grid
# must be all ok before later grids run. GRID_TIMEOUT_S caps each grid (default 450 s) so the
# command ends inside the tool's limit; rerun with the same $OUT file and --skip-done to go on.
set -uo pipefail
OUT=${OUT:-/tmp/vramfit-out}
mkdir -p "$OUT"
python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|bitsandbytes|trl|datasets|nvidia-ml-py|tokenizers|huggingface.hub|safetensors) " > "$OUT/pip_before.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
for grid in "$@"; do
  start=$(date +%s)
  timeout "${GRID_TIMEOUT_S:-450}" python3 -m benchmarks.accuracy.harness --grid "$grid" \
    --out "$OUT/$grid.jsonl" --skip-done ${HARNESS_ARGS:-} 2>&1 | tee -a "$OUT/$grid.log"
  echo "grid $grid: $(( $(date +%s) - start )) s" | tee -a "$OUT/$grid.log"
  if [ "$grid" = smoke ]; then
    python3 -c "import json,sys; s=[json.loads(l)['status'] for l in open('$OUT/smoke.jsonl')]; print('smoke', s); sys.exit(any(x!='ok' for x in s))" || exit 3
  fi
done
tar czf "$OUT/logs.tgz" -C /tmp vramfit-harness-logs 2>/dev/null
