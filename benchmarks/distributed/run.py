"""The multi-GPU proof driver: every case of the grid through `accelerate launch` with vramfit's
generated config, one JSON line per case (per-rank measured peaks, the prediction, environment).

    python -m benchmarks.distributed.run --out $OUT/dist.jsonl [--cases a,b] [--skip-done]
    python -m benchmarks.distributed.run --dry-run --out /tmp/dry.jsonl      # CPU: the same path

On a GPU machine each case is `accelerate launch --config_file <vramfit's YAML> --num_processes 2
-m benchmarks.distributed.case`.  --dry-run (no GPU needed) runs the DRY grid: DDP cases train
for real as 2 CPU processes over gloo (torch.distributed.run: accelerate's --cpu spawns several
processes only through mpirun), the other strategies write their configs, load them with
accelerate's own class and are recorded as "dry: config only".  Cases whose engine is not
importable (deepspeed) are recorded as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.distributed import cases as grid

CASE_TIMEOUT_S = 240


def predicted(case: dict) -> dict:
    from vramfit.memory.distributed import estimate_distributed
    from vramfit.model.spec import load_spec

    s = setup_of(case)
    est = estimate_distributed(load_spec(case["model"]), s, case["strategy"], case["gpus"])
    return est.to_json()


def setup_of(case: dict):
    from vramfit.memory.setup import make_setup

    lora = {} if case["method"] == "full" else {"lora_r": case["lora_r"], "target_modules": case["target_modules"]}
    return make_setup(method=case["method"], precision=case["precision"], optim=case["optim"], seq_len=case["seq_len"],
                      micro_batch=case["micro_batch"], grad_accum=case["grad_accum"], grad_ckpt=case["grad_ckpt"],
                      **lora)


def errors(measured: dict, per_gpu: dict) -> dict:
    out = {}
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes"):
        m, p = measured.get(key), per_gpu.get(key)
        out[key] = round((p - m) / m, 4) if m and p is not None else None
    return out


def run_case(case: dict, dry: bool, work: Path) -> dict:
    from accelerate.commands.config.config_args import ClusterConfig

    from vramfit.memory.distributed import get_strategy
    from vramfit.run.launch import write_configs

    st = get_strategy(case["strategy"])
    rec = {"name": case["name"], "case": case, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        rec["predicted"] = predicted(case)
    except Exception as exc:  # noqa: BLE001 - the model refuses the combination: that is the record
        rec.update(status="refused", error=str(exc))
        return rec
    d = work / case["name"]
    d.mkdir(parents=True, exist_ok=True)
    config = write_configs(d, case["strategy"], case["gpus"], setup_of(case), cpu=dry)
    rec["accelerate_config"] = config.read_text()
    ClusterConfig.from_yaml_file(str(config))  # accelerate reads what we wrote
    if st.package == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        rec.update(status="skipped", error="deepspeed is not importable here")
        return rec
    if dry and st.engine != "ddp":  # no FSDP on CPU processes: check what accelerate would set up
        from vramfit.run.launch import launch_env

        rec.update(status="dry: config only", launch_env=launch_env(config))
        return rec
    case_json = d / "case.json"
    case_json.write_text(json.dumps({**case, "cpu": dry}))
    if dry:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(case["gpus"]),
               "-m", "benchmarks.distributed.case", str(case_json), str(d)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               str(case["gpus"]), "-m", "benchmarks.distributed.case", str(case_json), str(d)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, check=False,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc.stdout or "")[-2000:]
    rec["seconds"] = round(time.perf_counter() - t, 1)
    ranks = []
    for r in range(case["gpus"]):
        f = d / f"rank{r}.json"
        ranks.append(json.loads(f.read_text()) if f.is_file() else {"rank": r, "status": "missing"})
    per_gpu = rec["predicted"]["per_gpu"]
    for x in ranks:
        x.pop("case", None)
        x["relative_error"] = errors(x, per_gpu) if x.get("status") == "ok" else None
    rec["ranks"] = ranks
    statuses = {x.get("status") for x in ranks}
    rec["status"] = "ok" if statuses == {"ok"} else ("oom" if "oom" in statuses else "error")
    if rec["status"] != "ok":
        rec.update(returncode=rc, log_tail=tail)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=None, help="comma list of case names (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: the DRY grid, DDP trained over gloo")
    ap.add_argument("--skip-done", action="store_true", help="skip cases already in --out with status ok/skipped")
    args = ap.parse_args(argv)
    todo = grid.DRY if args.dry_run else grid.GRID
    if args.cases:
        wanted = set(args.cases.split(","))
        todo = [c for c in todo if c["name"] in wanted]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.skip_done and out.is_file():
        done = {json.loads(x)["name"] for x in out.read_text().splitlines()
                if json.loads(x).get("status") in ("ok", "skipped")}
    work = Path(tempfile.mkdtemp(prefix="vramfit-dist-"))
    failed = 0
    for case in todo:
        if case["name"] in done:
            continue
        rec = run_case(case, args.dry_run, work)
        failed += rec["status"] not in ("ok", "skipped", "dry: config only")
        with out.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        errs = [x.get("relative_error") for x in rec.get("ranks", [])]
        print(f"{case['name']}: {rec['status']} {rec.get('seconds', '')} {errs if any(errs) else ''}"
              f"{rec.get('error', '')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
