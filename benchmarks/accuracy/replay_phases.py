"""Per-phase allocated peaks: the allocator replay against a measured run and the fast model.

    python -m benchmarks.accuracy.replay_phases LABEL-PREFIX

Finds the first measured ok run whose label starts with LABEL-PREFIX (benchmarks/results/h*.jsonl),
replays two steps of it (vramfit.memory.events) and prints the live bytes' peak of each phase, next
to the measured per-phase peaks and the fast model's forward / backward / optimizer phases.
"""

from __future__ import annotations

import argparse
import glob

from benchmarks.accuracy.report import RESULTS, case_setup, load_records, predict

MiB = 1 << 20


def phase_peaks(events: list, marks: dict) -> dict:
    """The peak of live allocated bytes in each phase named by `marks` (event index -> phase start)."""
    starts = sorted((i, name) for name, i in marks.items())
    live, cur, peaks, k, name = {}, 0, {}, 0, "load"
    for i, ev in enumerate(events):
        while k < len(starts) and starts[k][0] <= i:
            name = starts[k][1]
            k += 1
        if ev[0] == "a":
            live[ev[1]] = ev[2]
            cur += ev[2]
        elif ev[0] == "f":
            cur -= live.pop(ev[1])
        peaks[name] = max(peaks.get(name, 0), cur)
    return peaks


def main(argv=None) -> None:
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import resolve_targets
    from vramfit.model.spec import load_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("label", help="the start of a measured case's label")
    args = ap.parse_args(argv)
    recs = [r for r in load_records(sorted(glob.glob(str(RESULTS / "h*.jsonl"))))
            if r["status"] == "ok" and r["label"].startswith(args.label)]
    if not recs:
        raise SystemExit(f"no measured ok run starts with {args.label!r}")
    rec, case = recs[0], recs[0]["case"]
    s = case_setup(case)
    spec = load_spec(case["model"], overrides=case.get("config_overrides") or None)
    _, bd = predict(case)
    ev = training_events(spec, s, resolve_targets(spec, s), steps=2)
    print(rec["label"])
    print("fast model (MiB):", {k: v // MiB for k, v in bd.phases.items()})
    print("replay (MiB):    ", {k: v // MiB for k, v in phase_peaks(ev["events"], ev["marks"]).items()})
    for i, step in enumerate(rec["steps"][:2]):
        print(f"measured step {i} (MiB):", {k: d["peak_allocated_bytes"] // MiB for k, d in step["phases"].items()})


if __name__ == "__main__":
    main()
