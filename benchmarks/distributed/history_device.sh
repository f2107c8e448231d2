#!/usr/bin/env bash
# Memory histories of the worst fake-group runs on ONE lent GPU (the device tool's `run`; at most ~400 s after the wheels install):
# the four DeepSpeed ZeRO runs and two FSDP runs (fake_pg.HISTORY), each process recording torch's CUDA
# memory history (benchmarks/distributed/history.py) -> $OUT/hist/<case>.events.json.gz, the result
# lines in $OUT/history.jsonl (8 files back: the device tool's limit).  carry: .whl, .dswhl.
#   bash benchmarks/distributed/history_device.sh
#   GRID=history-lora bash benchmarks/distributed/history_device.sh   # the FSDP2 LoRA cases (fake_pg.HISTORY_LORA)
#   GRID=history-ddp bash benchmarks/distributed/history_device.sh    # DDP full fine-tuning (fake_pg.HISTORY_DDP)
#   GRID=history-fsdp-full bash benchmarks/distributed/history_device.sh   # FSDP2 full fine-tuning (fake_pg.HISTORY_FSDP_FULL)
#   GRID=history-qlora bash benchmarks/distributed/history_device.sh   # FSDP QLoRA / LoRA N = 8 (fake_pg.HISTORY_QLORA)
# .whl too big to carry: carry build/device-whl (the slimmed set) and .dswhl, and begin with
#   rm -rf .whl && mkdir .whl && cp build/device-whl/*.whl .whl/
# Here: python -m benchmarks.distributed.history FILES...   (what is live at each step's peak, by frame)
set -uo pipefail
source "$(dirname "$0")/../device_env.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .dswhl/*.whl || exit 1
export PYTHONPATH=$PYTHONPATH:/tmp/ds DS_BUILD_OPS=0 VRAMFIT_MEMORY_HISTORY=$OUT/hist
python3 -m benchmarks.distributed.fake_pg --grid ${GRID:-history} --out "$OUT/history.jsonl" --jobs "${JOBS:-3}" --scratch /tmp/fakepg-ckpt \
  --max-seconds "${START_S:-240}" --hard-seconds "${HARD_S:-320}" 2>&1 | grep -v "_token_id must be" | tee "$OUT/history.log"
# a case that failed while Python frames were gathered (checkpointed backward on the autograd thread):
# once more without frames, while time is left
VRAMFIT_MEMORY_HISTORY_STACKS=none python3 -m benchmarks.distributed.fake_pg --grid ${GRID:-history} --out "$OUT/history.jsonl" \
  --skip-done --scratch /tmp/fakepg-ckpt --jobs 3 --max-seconds "${RETRY_START_S:-30}" --hard-seconds "${RETRY_HARD_S:-60}" 2>&1 \
  | grep -v "_token_id must be" | tee -a "$OUT/history.log"
ls -la "$OUT/hist"
