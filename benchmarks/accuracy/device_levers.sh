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
#   MODE=offload END_S=480 bash benchmarks/accuracy/device_levers.sh  # the copy stream (2026-12-07h), below
# Rerun with the same $OUT file to go on: the harness skips the cases already in it (--skip-done).
set -uo pipefail
START=$(date +%s)
END_S=${END_S:-555}
HISTORY_MIN_S=${HISTORY_MIN_S:-75}
CASE_TIMEOUT_S=${CASE_TIMEOUT_S:-150}
left() { echo $(( END_S - ($(date +%s) - START) )); }

source benchmarks/device_env.sh   # $OUT, .whl into /tmp/site, PYTHONPATH, PYTHONUNBUFFERED
if [ "${MODE:-}" = "offload" ]; then
  # MODE=offload (2026-12-07h, activation offloading's copy stream): in one call,
  # 1. `levers_offload_history` with torch's memory history, each block's stream kept: a sitecustomize
  #    (only on this command's PYTHONPATH) wraps memory_history.dump to write <id>-streams.json.gz too
  #    (every trace entry: action, address, size, stream, time, frame; the segments at the end);
  # 2. a probe of what the process holds on the device outside the caching allocator (NVML minus
  #    reserved) as offloading's pieces come in: a side stream, an event, pinned host blocks of
  #    growing size, copies on the side stream -> offload-nvml-probe.json;
  # 3. with the time left, the `levers_offload` grid -> levers-offload.jsonl.
  mkdir -p /tmp/h7site
  cat > /tmp/h7site/sitecustomize.py <<'PYEOF'
import os
if os.environ.get("VRAMFIT_HISTORY_STREAMS"):
    try:
        from benchmarks.accuracy import memory_history as _mh

        _orig_dump = _mh.dump

        def dump(torch, directory, case):
            import gzip
            import json
            from pathlib import Path

            from benchmarks.accuracy.cases import case_id

            snap = torch.cuda.memory._snapshot()
            trace = [[e.get("action"), e.get("addr"), e.get("size"), e.get("stream"), e.get("time_us"),
                      _mh._frame(e.get("frames")) if e.get("action") == "alloc" else None]
                     for e in (snap.get("device_traces") or [[]])[0]]
            segs = [{"address": s["address"], "total_size": s["total_size"], "stream": s["stream"],
                     "segment_type": s.get("segment_type"), "allocated_size": s.get("allocated_size"),
                     "blocks": [[b["size"], b["state"]] for b in s["blocks"]]} for s in snap["segments"]]
            path = Path(directory) / f"{case_id(case)}-streams.json.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt") as f:
                json.dump({"case": case, "trace": trace, "segments": segs}, f)
            return _orig_dump(torch, directory, case)

        _mh.dump = dump
    except Exception as exc:  # noqa: BLE001
        print("sitecustomize: no stream-aware dump:", exc)
PYEOF
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
  python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|bitsandbytes|trl|liger.kernel|nvidia-ml-py) " > "$OUT/pip.txt"
  cat "$OUT/gpu.txt" "$OUT/pip.txt"
  VRAMFIT_HISTORY_STREAMS=1 VRAMFIT_MEMORY_HISTORY=/tmp/vramfit-offload-history PYTHONPATH=/tmp/h7site:$PYTHONPATH \
    timeout $(( $(left) - 20 )) python3 -m benchmarks.accuracy.harness --grid levers_offload_history \
    --out "$OUT/offload-history.jsonl" --skip-done --timeout "$CASE_TIMEOUT_S" 2>&1 | tail -5
  [ -d /tmp/vramfit-offload-history ] && tar czf "$OUT/offload-memory-history.tgz" -C /tmp vramfit-offload-history
  echo "history: $(( $(date +%s) - START )) s since start"
  timeout 60 python3 - > "$OUT/offload-nvml-probe.json" <<'PYEOF'
import json, os
import pynvml, torch
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
def proc():
    return next((p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == os.getpid()), None)
rows = []
def mark(name):
    torch.cuda.synchronize()
    used, res = proc(), torch.cuda.memory_reserved()
    rows.append({"step": name, "nvml_process_bytes": used, "reserved_bytes": res,
                 "outside_allocator_MiB": None if used is None else (used - res) / 2**20})
MiB = 1 << 20
torch.empty(1, device="cuda"); mark("cuda init")
x = torch.ones(256 * MiB, dtype=torch.uint8, device="cuda"); y = x + 1; mark("256 MiB tensors, an elementwise kernel")
s1 = torch.cuda.Stream(); mark("torch.cuda.Stream()")
ev = s1.record_event(); mark("an event on it")
a = torch.empty(1 * MiB, dtype=torch.uint8, pin_memory=True); mark("pinned 1 MiB")
b = torch.empty(256 * MiB, dtype=torch.uint8, pin_memory=True); mark("pinned 256 MiB")
with torch.cuda.stream(s1):
    b.copy_(x, non_blocking=True)
mark("GPU->pinned copy on the side stream")
with torch.cuda.stream(s1):
    z = b.to("cuda", non_blocking=True)
torch.cuda.current_stream().wait_stream(s1); z.record_stream(torch.cuda.current_stream()); mark("pinned->GPU copy on it")
c = torch.empty(2048 * MiB, dtype=torch.uint8, pin_memory=True); mark("pinned 2 GiB more")
d = [torch.empty(64 * MiB, dtype=torch.uint8, pin_memory=True) for _ in range(64)]; mark("pinned 64 x 64 MiB more")
e = torch.empty(4096 * MiB, dtype=torch.uint8, pin_memory=True); mark("pinned 4 GiB more")
del z; torch.cuda.empty_cache(); mark("empty_cache")
g = torch.empty(1024 * MiB, dtype=torch.uint8, device="cuda"); del g; torch.cuda.empty_cache(); mark("1 GiB cudaMalloc'd, freed")
g = torch.empty(1024 * MiB, dtype=torch.uint8, device="cuda"); mark("1 GiB again")
s2 = [torch.cuda.Stream() for _ in range(4)]; mark("4 more streams")
for st in s2:
    with torch.cuda.stream(st):
        w = torch.empty(4 * MiB, dtype=torch.uint8, device="cuda"); w += 1
mark("a kernel on each")
print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "rows": rows}, indent=1))
PYEOF
  echo "probe: $(( $(date +%s) - START )) s since start"; cat "$OUT/offload-nvml-probe.json" | grep -E "step|outside"
  budget=$(( $(left) - 15 ))
  if [ "$budget" -ge 30 ]; then
    timeout "$budget" python3 -m benchmarks.accuracy.harness --grid levers_offload --out "$OUT/levers-offload.jsonl" \
      --skip-done --timeout "$CASE_TIMEOUT_S" 2>&1 | tail -12
  fi
  tar czf "$OUT/logs.tgz" -C /tmp vramfit-harness-logs 2>/dev/null
  echo "done: $(( $(date +%s) - START )) s"; ls -la "$OUT"
  exit 0
fi
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
