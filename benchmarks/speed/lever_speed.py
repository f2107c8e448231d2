"""The memory levers' speed, measured: tokens/s of each lever run over its baseline twin's -> the small
JSON the planner's cost model reads (profiles/lever_speed.json, via vramfit.planner.levers).

Input: the GPU harness's JSON lines (benchmarks/results/*levers*.jsonl by default, less the memory-history
re-runs, which torch's recording slows): rows with a
`case` (benchmarks/accuracy/cases.py: the levers `liger`, `packing` (+ `example_len`),
`activation_offloading` are keys only when on), `status` "ok" and `tokens_per_second`.  A lever run's
twin is the run of the same case without the lever on the same GPU (or the row its `baseline_id`
names).  Per lever: the median ratio over its twins, their range and count, and the median per loss
(trl's SFTTrainer keeps its own fused loss, so liger's fused cross-entropy only runs under the model's
own loss: the planner takes liger's factor for the setup's loss only, and says "not measured" where
no twin was measured under it).  A lever with no twin is left out: the planner then says "speed not measured".

    python3 -m benchmarks.speed.lever_speed [FILES...] [--out profiles/lever_speed.json] [--check]

--check prints what would be written and writes nothing.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from vramfit.planner.levers import SPEED_FILE

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GLOB = "benchmarks/results/*levers*.jsonl"


def build(files: list) -> dict:
    from benchmarks.jsonl import records
    from vramfit.planner.levers import derive_lever_speeds, lever_twins

    rows = [r for f in files for r in records(f)]
    names = ", ".join(Path(f).name for f in files)
    levers = derive_lever_speeds(rows, source=names)
    gpus = sorted({(twin.get("environment") or {}).get("gpu_name") or "?" for _, _, twin in lever_twins(rows)})
    return {"about": "tokens/s of each memory lever over its baseline twin (the same case without it), median "
                     "over the twins measured; written by benchmarks/speed/lever_speed.py, read by "
                     "vramfit.planner.levers",
            "files": [str(Path(f).relative_to(REPO)) if Path(f).resolve().is_relative_to(REPO) else str(f)
                      for f in files],
            "gpus": gpus, "rows": len(rows), "levers": levers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help=f"harness JSON lines [default: {DEFAULT_GLOB}]")
    ap.add_argument("--out", default=str(SPEED_FILE))
    ap.add_argument("--check", action="store_true", help="print, write nothing")
    args = ap.parse_args(argv)
    # torch's memory history slows a run: its files (levers-history) are no speed measurement
    files = args.files or sorted(f for f in glob.glob(str(REPO / DEFAULT_GLOB)) if "history" not in Path(f).name)
    if not files:
        print(f"no results: nothing matches {DEFAULT_GLOB}; the planner keeps 'speed not measured'", file=sys.stderr)
        return 1
    data = build(files)
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    for lever, d in sorted(data["levers"].items()):
        print(f"{lever}: {d['ratio']:.3f}x over {d['cases']} twins ({d['low']:.3f}-{d['high']:.3f}); by loss "
              f"{d['by_loss']}")
    missing = {"liger", "packing", "activation_offloading"} - set(data["levers"])
    if missing:
        print(f"no twins for {', '.join(sorted(missing))}: speed not measured", file=sys.stderr)
    if args.check:
        print(text)
        return 0
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
