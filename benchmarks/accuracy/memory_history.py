"""Real allocation streams from a GPU run, against the allocator replay.

On the GPU, a harness case run with `VRAMFIT_MEMORY_HISTORY=<dir>` records torch's memory history
(`torch.cuda.memory._record_memory_history`) and `dump` writes its allocations and frees, compactly,
to `<dir>/<case id>.json.gz` (requested size, the phase-free order, and the innermost Python frame
outside torch for each allocation):

    VRAMFIT_MEMORY_HISTORY=$OUT/hist python3 -m benchmarks.accuracy.harness --cases X.json --out $OUT/h.jsonl

Here, on the CPU, `compare` splits the reserved-peak error in two:
- the allocator model fed the *real* stream (does vramfit.memory.allocator reproduce torch's segments?), and
- the replayed stream against the real one: allocations of 1 MiB or more that one has and the
  other lacks, by size, with where the real ones came from (what the replay misses).

    python -m benchmarks.accuracy.memory_history HIST.json.gz [--case-json CASE.json]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

MiB = 1 << 20


def _frame(frames) -> str:
    """The innermost frame outside torch's own files: where the allocation was asked for."""
    for f in frames or ():
        name = f.get("filename", "")
        if "/torch/" not in name and not name.startswith("<"):
            return f"{Path(name).name}:{f.get('line')}:{f.get('name')}"
    f = (frames or [{}])[0]
    return f"{Path(f.get('filename', '?')).name}:{f.get('line')}:{f.get('name')}"


def events_from_snapshot(snapshot: dict) -> list:
    """torch's snapshot trace -> [("a", addr, size, frame) | ("f", addr) | ("e",)] in order."""
    out = []
    for entry in (snapshot.get("device_traces") or [[]])[0]:
        action = entry.get("action")
        if action == "alloc":
            out.append(("a", entry["addr"], entry["size"], _frame(entry.get("frames"))))
        elif action == "free_completed":
            out.append(("f", entry["addr"]))
        elif action == "segment_free":  # empty_cache (or an OOM retry) released a segment
            out.append(("e",))
    return out


def dump(torch, directory: str, case: dict) -> dict:
    """Write this process's history for `case`; returns where and how much (for the result line)."""
    from .cases import case_id

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = events_from_snapshot(snapshot)
    path = Path(directory) / f"{case_id(case).replace('/', '_')}.json.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"case": case, "events": events}, f)
    return {"path": str(path), "events": len(events)}


def _replayable(events: list) -> list:
    """Real events keyed by address -> the simulator's ("a", id, size) / ("f", id) / ("e",) form.
    An address is reused after its free, so each alloc gets a fresh id."""
    live, out, n = {}, [], 0
    for ev in events:
        if ev[0] == "a":
            n += 1
            live[ev[1]] = n
            out.append(("a", n, ev[2]))
        elif ev[0] == "f":
            if ev[1] in live:  # frees of blocks allocated before the recording started are skipped
                out.append(("f", live.pop(ev[1])))
        else:
            out.append(("e",))
    return out


def size_diff(real: list, replay: list, min_bytes: int = MiB) -> list:
    """Allocation sizes >= min_bytes by how many more times the real stream has them than the
    replay (negative: the replay has extra), with the real allocations' frames."""
    real_sizes = collections.Counter(ev[2] for ev in real if ev[0] == "a" and ev[2] >= min_bytes)
    sim_sizes = collections.Counter(ev[2] for ev in replay if ev[0] == "a" and ev[2] >= min_bytes)
    frames = collections.defaultdict(collections.Counter)
    for ev in real:
        if ev[0] == "a" and ev[2] >= min_bytes and len(ev) > 3:
            frames[ev[2]][ev[3]] += 1
    rows = []
    for size in set(real_sizes) | set(sim_sizes):
        d = real_sizes[size] - sim_sizes[size]
        if d:
            rows.append({"size": size, "real": real_sizes[size], "replay": sim_sizes[size], "missing": d,
                         "frames": frames[size].most_common(3)})
    return sorted(rows, key=lambda r: -abs(r["missing"]) * r["size"])


def compare(history: dict, replay_events: list | None = None, expandable: bool = False) -> dict:
    from vramfit.memory.allocator import simulate

    real = history["events"]
    out = {"real_events": len(real), "allocator_on_real_stream": simulate(_replayable(real), expandable)}
    if replay_events is not None:
        out["allocator_on_replay"] = simulate(replay_events, expandable)
        out["size_diff"] = size_diff(real, replay_events)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("history", help="a .json.gz written by dump()")
    ap.add_argument("--no-replay", action="store_true", help="only the allocator on the real stream")
    args = ap.parse_args(argv)
    with gzip.open(args.history, "rt") as f:
        history = json.load(f)
    case = history["case"]
    replay = None
    if not args.no_replay:
        from benchmarks.accuracy.report import case_setup
        from vramfit.memory.events import training_events
        from vramfit.memory.setup import resolve_targets
        from vramfit.model.spec import load_spec

        s = case_setup(case)
        spec = load_spec(case["model"], overrides=case.get("config_overrides") or None)
        replay = training_events(spec, s, resolve_targets(spec, s), steps=case.get("steps", 3))["events"]
    res = compare(history, replay, case.get("allocator") == "expandable")
    for k in ("allocator_on_real_stream", "allocator_on_replay"):
        if k in res:
            r = res[k]
            print(f"{k}: peak allocated {r['peak_allocated'] / MiB:.0f} MiB, peak reserved "
                  f"{r['peak_reserved'] / MiB:.0f} MiB, segments {r['num_device_alloc']}")
    for row in res.get("size_diff", [])[:15]:
        print(f"  {row['size'] / MiB:10.2f} MiB x {row['missing']:+d} (real {row['real']}, replay {row['replay']}) "
              f"{row['frames']}")


if __name__ == "__main__":
    main()
