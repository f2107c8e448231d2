"""How long `vramfit estimate --simulate-allocator` takes, and whether two replayed steps give the
peaks of three.

    python3 benchmarks/speed/simulate_speed.py [--out benchmarks/results/cpu-DATE-simulate-speed.jsonl]

1. `vramfit estimate ... --simulate-allocator --json` in a fresh process (imports included) for a few
   bundled profiles, with the replay's own time from the estimate's note.
2. For measured cases with a cached 3-step result in benchmarks/results/simulated-reserve.json: the
   2-step replay's peaks against it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
CLI_CASES = [
    ("llama-3.2-1b", ["--method", "full", "--precision", "bf16-mixed", "--seq-len", "2048", "--batch-size", "4"]),
    ("mistral-7b-v0.1", ["--method", "lora", "--seq-len", "2048", "--batch-size", "2", "--grad-ckpt"]),
    ("qwen2.5-0.5b", ["--method", "lora", "--target-modules", "all-linear", "--seq-len", "1024",
                      "--batch-size", "4"]),
    ("llama-3.1-8b", ["--method", "lora", "--seq-len", "2048", "--batch-size", "1"]),
]
STEP_CASES = ("adafactor/s512", "paged_adamw_8bit/s512", "smollm2-135m/lora", "gpt2/full",
              "qwen2.5-0.5b/full/bf16-true/adamw_bnb_8bit/s1024xb8/sdpa")


def cli_rows() -> list:
    rows = []
    for model, extra in CLI_CASES:
        cmd = [sys.executable, "-m", "vramfit", "estimate", model, *extra, "--simulate-allocator", "--json"]
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        seconds = time.perf_counter() - t
        est = json.loads(out.strip().splitlines()[-1])
        replay = next((float(m.group(1)) for n in est["notes"] if (m := re.search(r"in ([\d.]+) s", n))), None)
        rows.append({"what": "vramfit estimate --simulate-allocator, fresh process", "model": model,
                     "args": extra, "seconds": round(seconds, 2), "replay_seconds": replay,
                     "peak_reserved_bytes": est["peak_reserved_bytes"]})
    return rows


def step_rows() -> list:
    sys.path.insert(0, str(RESULTS.parents[1]))
    from benchmarks.accuracy.report import case_setup, load_records, sim_key
    from vramfit.memory.events import training_events
    from vramfit.memory.allocator import simulate
    from vramfit.memory.setup import resolve_targets
    from vramfit.model.spec import load_spec

    cached = json.loads((RESULTS / "simulated-reserve.json").read_text())
    rows, seen = [], set()
    for rec in load_records(sorted(glob.glob(str(RESULTS / "h*.jsonl")))):
        label = rec.get("label", "")
        hit = next((c for c in STEP_CASES if c in label), None)
        if rec["status"] != "ok" or hit is None or hit in seen or "sim_reserved" not in cached.get(sim_key(rec), {}):
            continue
        seen.add(hit)
        s = case_setup(rec["case"])
        spec = load_spec(rec["case"]["model"], overrides=rec["case"].get("config_overrides") or None)
        t = time.perf_counter()
        res = simulate(training_events(spec, s, resolve_targets(spec, s), steps=2)["events"],
                       expandable_segments=s.allocator == "expandable")
        three = cached[sim_key(rec)]
        rows.append({"what": "2-step replay vs the cached 3-step replay", "case": label,
                     "seconds_2_steps": round(time.perf_counter() - t, 2),
                     "reserved_2_steps": res["peak_reserved"], "reserved_3_steps": three["sim_reserved"],
                     "allocated_2_steps": res["peak_allocated"], "allocated_3_steps": three["sim_allocated"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="append the rows as JSON lines to this file")
    args = ap.parse_args()
    machine = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    rows = cli_rows() + step_rows()
    for r in rows:
        print(json.dumps(r))
    same = [r for r in rows if "reserved_2_steps" in r]
    print(f"2 steps = 3 steps (reserved and allocated) on {sum(r['reserved_2_steps'] == r['reserved_3_steps'] and r['allocated_2_steps'] == r['allocated_3_steps'] for r in same)} of {len(same)} cases")
    if args.out:
        with Path(args.out).open("a") as f:
            for r in rows:
                f.write(json.dumps({**r, **machine}) + "\n")


if __name__ == "__main__":
    main()
