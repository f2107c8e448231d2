#!/usr/bin/env bash
# One GPU session's measurements in three calls of the device tool's `run` (each under 600 s),
# back to back so the machine stays warm; carry [".whl"] (../shared/device/wheels.sh).
#   bash benchmarks/device_session.sh 1     # train proof: the 7B runs; plan proof: llama-3.2-1b, qwen2.5-0.5b
#   bash benchmarks/device_session.sh 2     # train proof: the 1B runs and the OOM fall-back; plan proof: qwen2.5-1.5b, -3b
#   bash benchmarks/device_session.sh 3     # plan proof: llama-3.1-8b, qwen2.5-14b
#   bash benchmarks/device_session.sh history   # QLoRA-first memory histories (benchmarks/accuracy/memory_history_cases.json;
#        HISTORY_CASES=benchmarks/accuracy/memory_history_cases_2.json: the under-predictions of the 2026-12-06 grid;
#        _3: the plan proof's capped next-larger trials and three under-predictions, _4: pythia-1b;
#        VRAMFIT_MEMORY_HISTORY_STACKS=none records no Python frames, which gpt2-medium needs)
#   bash benchmarks/device_session.sh plan4 SECONDS MODEL...   # plan proof 4: the allocator-replay planner's
#        plans (precomputed on CPU: benchmarks/results/cpu-2026-12-05-plan-proof-replay-plans.json), one shard;
#        passes 1-3 (plan, next-larger, alternatives): the auto_find_batch_size comparison is plan proof 3's;
#        PASSES="2" / BUDGETS="12GB" (environment) narrow it to some passes or budgets; PLANS_CACHE another
#        plans file (plan proof 5: cpu-2026-12-06-plan-proof-replay-plans-tf517.json, planned under the GPU's
#        transformers 5.17, three plans changed: PASSES="1 2 3" BUDGETS=12GB qwen2.5-0.5b, PASSES=2
#        BUDGETS=12GB llama-3.2-1b, PASSES=2 BUDGETS=40GB llama-3.1-8b)
# Results land in $OUT (the device tool copies them back); the plan proof's shards each write
# their own plan_proof.jsonl: report them together with `python -m benchmarks.plan_proof.report`.
# Timings measured on the H100 on 2026-11-23: memory histories ~20 s a case, the train-proof runs
# 50-90 s each (plus the --simulate-allocator replay: 10 s for 1B and 31 s for 7B on the 2-core CPU machine),
# the plan proof shards 270-320 s of driver time each (the time guard skips what does not fit).
set -uo pipefail
case "${1:-}" in 1|2|3|history|plan4) ;; *) echo "usage: bash benchmarks/device_session.sh 1|2|3|history|plan4 SECONDS MODEL..." >&2; exit 2 ;; esac
source "$(dirname "$0")/device_env.sh"
quiet() { grep -v -e 'Loading weights' -e 'Writing model shards' -e Warning -e warnings.warn \
            -e _set_allocator_settings -e train_runtime -e USDT; }
plan_shard() {
  python3 -m benchmarks.plan_proof.run --out "$OUT/plan_proof.jsonl" --skip-done --drop-checkpoints \
    --max-seconds "$1" --models "${@:2}" 2>&1 | quiet > "$OUT/plan_proof.log"
  tail -5 "$OUT/plan_proof.log"
}
train_proof() {
  python3 -m benchmarks.train_proof.run --out "$OUT/tp" --budget-s "$1" --runs "${@:2}" 2>&1 | quiet | tail -12
}
case "${1:-}" in
  1)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    train_proof 330 7b-lora 7b-full 7b-qlora
    plan_shard 200 llama-3.2-1b qwen2.5-0.5b
    ;;
  2)
    train_proof 250 1b-lora 1b-full 1b-qlora 1b-oom-fallback
    plan_shard 300 qwen2.5-1.5b qwen2.5-3b
    ;;
  3) plan_shard 540 llama-3.1-8b qwen2.5-14b ;;
  plan4)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -m benchmarks.plan_proof.run --out "$OUT/plan_proof.jsonl" --skip-done --drop-checkpoints \
      --simulate-allocator --plans-cache "${PLANS_CACHE:-benchmarks/results/cpu-2026-12-05-plan-proof-replay-plans.json}" \
      --passes ${PASSES:-1 2 3} ${BUDGETS:+--budgets $BUDGETS} --max-seconds "$2" --models "${@:3}" 2>&1 | quiet > "$OUT/plan_proof.log"
    tail -8 "$OUT/plan_proof.log"
    ;;
  history)
    VRAMFIT_MEMORY_HISTORY=/tmp/hist timeout 180 python3 -m benchmarks.accuracy.harness \
      --cases "${HISTORY_CASES:-benchmarks/accuracy/memory_history_cases.json}" --out "$OUT/memory_history.jsonl" 2>&1 | tail -8
    tar czf "$OUT/memory_history.tgz" -C /tmp hist
    ;;
esac
