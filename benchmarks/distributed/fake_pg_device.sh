#!/usr/bin/env bash
# The fake-process-group grid on ONE lent GPU (the device tool's `run`), results in $OUT.
# Carry .whl (../shared/device/wheels.sh: bitsandbytes, trl, datasets) and, for the ZeRO cases,
# .dswhl (deepspeed 0.19.8 built here as a pure-Python wheel with DS_BUILD_OPS=0, from PyPI's
# sdist, plus hjson and pydantic, which the GPU image lacks).
#   bash benchmarks/distributed/fake_pg_device.sh            # issue21 grid (~430 s) then zero (~80 s)
set -uo pipefail
source "$(dirname "$0")/../device_env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -m benchmarks.distributed.fake_pg --grid issue21 --out "$OUT/fake-pg.jsonl" --jobs "${JOBS:-8}" \
  --max-seconds "${MAIN_START_S:-400}" --hard-seconds "${MAIN_HARD_S:-470}" 2>&1 | grep -v "_token_id must be" | tee "$OUT/fake-pg.log"
if [ -d .dswhl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .dswhl/*.whl; then
  PYTHONPATH=$PYTHONPATH:/tmp/ds DS_BUILD_OPS=0 python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -2
  PYTHONPATH=$PYTHONPATH:/tmp/ds python3 -m benchmarks.distributed.fake_pg --grid zero --out "$OUT/fake-pg-zero.jsonl" \
    --jobs 4 --max-seconds 10 --hard-seconds "${ZERO_HARD_S:-75}" 2>&1 | grep -v "_token_id must be" | tee "$OUT/fake-pg-zero.log"
fi
