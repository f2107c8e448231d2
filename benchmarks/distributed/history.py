"""torch's CUDA memory history of one rank's run, for the per-rank model's errors (issue 21).

With VRAMFIT_MEMORY_HISTORY=<dir> the fake-group runner (benchmarks.distributed.fake_pg) and the
multi-GPU case runner (benchmarks.distributed.case) record every allocation, free and segment of the
process (`torch.cuda.memory._record_memory_history`) and write, per case and rank:
- <dir>/<case name>.events.json.gz: the trace, compactly -- [action, address, size, stream, frame id,
  time_us] per entry (action a alloc, f free_completed, S segment_alloc, s segment_free, o oom), the
  frames table (the innermost Python frames of each allocation, outside torch's tensor plumbing), and
  the runner's marks (train begin, each step's begin and end, as unix microseconds: the trace's clock);
- <dir>/<case name>.pickle.gz: torch's own snapshot (`torch.cuda.memory._dump_snapshot`'s pickle,
  gzipped; pytorch.org/memory_viz reads it unzipped) when VRAMFIT_MEMORY_HISTORY_PICKLE=1.
VRAMFIT_MEMORY_HISTORY_STACKS=none records no Python frames.

    python -m benchmarks.distributed.history DIR/CASE.events.json.gz     # a summary of one history
    python -m benchmarks.distributed.history --streams DIR/CASE.events.json.gz   # and each stream's pool
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import sys
import time
from pathlib import Path

MAX_ENTRIES = 3_000_000
MiB = 1 << 20
# frames inside torch that say nothing of who asked (the tensor plumbing)
_PLUMBING = ("torch/_tensor.py", "torch/nn/modules/module.py", "torch/utils/_contextlib.py", "torch/_compile.py",
             "torch/_dynamo/", "torch/utils/hooks.py", "torch/autograd/graph.py", "torch/_ops.py")


def enabled() -> bool:
    return bool(os.environ.get("VRAMFIT_MEMORY_HISTORY"))


def start(torch) -> bool:
    """Start recording (after CUDA is initialised, before the model is built); True when it did."""
    if not enabled() or not torch.cuda.is_available():
        return False
    frames = os.environ.get("VRAMFIT_MEMORY_HISTORY_STACKS", "python") != "none"
    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python",
                                             context="alloc" if frames else None)
    return True


def now_us() -> int:
    """The trace's clock (torch converts its TSC timestamps to unix time)."""
    return time.time_ns() // 1000


def _short(name: str) -> str:
    parts = Path(name).parts
    return "/".join(parts[-3:]) if len(parts) > 3 else name


def _frames(frames, depth: int = 4) -> str:
    out = []
    for f in frames or ():
        name = f.get("filename", "")
        if name.startswith("<") or any(p in name for p in _PLUMBING):
            continue
        out.append(f"{_short(name)}:{f.get('line')}:{f.get('name')}")
        if len(out) >= depth:
            break
    return " < ".join(out)


def compact(snapshot: dict) -> dict:
    """The snapshot's device trace as rows [action, addr, size, stream, frame id, time_us]."""
    codes = {"alloc": "a", "free_completed": "f", "segment_alloc": "S", "segment_free": "s", "oom": "o",
             "segment_map": "S", "segment_unmap": "s"}
    table, rows = {}, []
    for entry in (snapshot.get("device_traces") or [[]])[0]:
        code = codes.get(entry.get("action"))
        if code is None:
            continue
        fid = -1
        if code in ("a", "S", "o"):
            key = _frames(entry.get("frames"))
            fid = table.setdefault(key, len(table))
        rows.append([code, entry.get("addr", 0), entry.get("size", 0), entry.get("stream", 0), fid,
                     entry.get("time_us", 0)])
    return {"events": rows, "frames": [k for k, _ in sorted(table.items(), key=lambda kv: kv[1])]}


def dump(torch, directory: str, name: str, marks: list, extra: dict | None = None) -> dict:
    """Write this process's history; stop recording.  `marks`: [(label, time_us)]."""
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
    data = compact(snapshot)
    data.update(name=name, marks=marks, **(extra or {}))
    path = out / f"{safe}.events.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(data, f)
    res = {"path": str(path), "events": len(data["events"]), "bytes": path.stat().st_size}
    if os.environ.get("VRAMFIT_MEMORY_HISTORY_PICKLE") == "1":
        pk = out / f"{safe}.pickle.gz"
        with gzip.open(pk, "wb") as f:
            pickle.dump(snapshot, f)
        res["pickle"] = str(pk)
    return res


# --------------------------------------------------------------------------- reading one (CPU)


def load(path: str) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def walk(data: dict, since_us: int = 0):
    """Yield (index, row, allocated, {stream: allocated}, reserved) over the trace from `since_us`;
    blocks allocated before it count (their frees are matched)."""
    live, alloc, by_stream, reserved = {}, 0, {}, 0
    for i, row in enumerate(data["events"]):
        code, addr, size, stream = row[0], row[1], row[2], row[3]
        if code == "a":
            live[addr] = (size, stream)
            alloc += size
            by_stream[stream] = by_stream.get(stream, 0) + size
        elif code == "f" and addr in live:
            size, stream = live.pop(addr)
            alloc -= size
            by_stream[stream] -= size
        elif code == "S":
            reserved += size
        elif code == "s":
            reserved -= size
        if row[5] >= since_us:
            yield i, row, alloc, by_stream, reserved


def summary(data: dict, top: int = 25) -> str:
    """Where the trained steps' allocated peak is, what is live then by frame, and the segments by stream."""
    marks = dict((k, v) for k, v in data.get("marks", []))
    since = marks.get("train_begin", 0)
    peak = (-1, 0, None)
    seg_peak = 0
    for i, row, alloc, by_stream, reserved in walk(data, since):
        if alloc > peak[1]:
            peak = (i, alloc, dict(by_stream))
        seg_peak = max(seg_peak, reserved)
    # live blocks at the peak
    live = {}
    for row in data["events"][:peak[0] + 1]:
        if row[0] == "a":
            live[row[1]] = row
        elif row[0] == "f":
            live.pop(row[1], None)
    by_frame = {}
    for row in live.values():
        k = data["frames"][row[4]] if row[4] >= 0 else "?"
        n, b = by_frame.get(k, (0, 0))
        by_frame[k] = (n + 1, b + row[2])
    lines = [f"{data.get('name')}: {len(data['events'])} entries; peak allocated (trace) {peak[1] / MiB:.1f} MiB at "
             f"entry {peak[0]}; by stream {({s: round(b / MiB, 1) for s, b in (peak[2] or {}).items()})}; "
             f"reserved (segments, incl. before recording: no) peak {seg_peak / MiB:.1f} MiB"]
    for k, (n, b) in sorted(by_frame.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {b / MiB:10.1f} MiB  {n:5d}  {k}")
    return "\n".join(lines)


def stream_peaks(data: dict, begin: str = "step2_begin", end: str = "step2_end") -> dict:
    """Per CUDA stream between two marks: {"allocated": (peak, {stream: bytes}), "reserved": (peak, {stream:
    reserved bytes})} at the allocated and the reserved peak; the default stream is the one numbered 0."""
    marks = dict((k, v) for k, v in data.get("marks", []))
    t0, t1 = marks.get(begin, 0), marks.get(end, 1 << 62)
    books = {"allocated": ({}, {}), "reserved": ({}, {})}  # (address -> (size, stream), stream -> bytes)
    kind = {"a": ("allocated", 1), "f": ("allocated", -1), "S": ("reserved", 1), "s": ("reserved", -1)}
    peaks = {"allocated": (0, {}), "reserved": (0, {})}
    for code, addr, size, stream, _, t in data["events"]:
        if code in kind:
            name, sign = kind[code]
            live, total = books[name]
            if sign > 0:
                live[addr] = (size, stream)
                total[stream] = total.get(stream, 0) + size
            elif addr in live:
                size, stream = live.pop(addr)
                total[stream] -= size
        if t0 <= t <= t1:  # both peaks at every event of the window (one may be flat all through it)
            for name, (_, total) in books.items():
                if sum(total.values()) > peaks[name][0]:
                    peaks[name] = (sum(total.values()), dict(total))
    return peaks


def stream_summary(data: dict, begin: str = "step2_begin", end: str = "step2_end", top: int = 12) -> str:
    """Per CUDA stream, between the marks `begin` and `end` (one trained step): what is allocated and reserved
    at the reserved peak and at the allocated peak, and the segments each stream's pool holds at the reserved
    peak, by the frame of the allocation that created the segment (count, MiB, MiB in use then).  A freed
    block serves only its own stream: this is where a per-rank replay's pools are read off (issue 21)."""
    import bisect

    marks = dict((k, v) for k, v in data.get("marks", []))
    t0, t1 = marks.get(begin, 0), marks.get(end, 1 << 62)
    live, segs, alloc, res = {}, {}, {}, {}
    peak_a = peak_r = (0, -1, None)
    for i, (code, addr, size, stream, fid, t) in enumerate(data["events"]):
        book, totals = (live, alloc) if code in ("a", "f") else (segs, res)  # blocks, or segments
        if code in ("a", "S"):
            book[addr] = (size, stream, fid)
            totals[stream] = totals.get(stream, 0) + size
        elif code in ("f", "s") and addr in book:
            size, stream, _ = book.pop(addr)
            totals[stream] -= size
        if t0 <= t <= t1:
            if sum(alloc.values()) > peak_a[0]:
                peak_a = (sum(alloc.values()), i, (dict(alloc), dict(res)))
            if sum(res.values()) > peak_r[0]:
                peak_r = (sum(res.values()), i, (dict(alloc), dict(res), dict(live), dict(segs)))
    if peak_r[2] is None:
        return f"{data.get('name')}: nothing between {begin} and {end}"
    mib = lambda d: {s: round(b / MiB, 1) for s, b in d.items()}  # noqa: E731
    lines = [f"{data.get('name')} [{begin} .. {end}]",
             f"  allocated peak {peak_a[0] / MiB:.1f} MiB at entry {peak_a[1]}: allocated by stream "
             f"{mib(peak_a[2][0])}, reserved {mib(peak_a[2][1])}",
             f"  reserved peak {peak_r[0] / MiB:.1f} MiB at entry {peak_r[1]}: allocated by stream "
             f"{mib(peak_r[2][0])}, reserved {mib(peak_r[2][1])}"]
    live_r, segs_r = peak_r[2][2], peak_r[2][3]
    starts = sorted(segs_r)
    used = {}
    for addr, (size, _, _) in live_r.items():
        k = bisect.bisect_right(starts, addr) - 1
        if k >= 0 and addr < starts[k] + segs_r[starts[k]][0]:
            used[starts[k]] = used.get(starts[k], 0) + size
    for stream in sorted({v[1] for v in segs_r.values()}):
        by = {}
        for addr, (size, st, fid) in segs_r.items():
            if st != stream:
                continue
            key = data["frames"][fid] if fid >= 0 else "?"
            n, b, u = by.get(key, (0, 0, 0))
            by[key] = (n + 1, b + size, u + used.get(addr, 0))
        lines.append(f"  stream {stream}: {sum(v[1] for v in by.values()) / MiB:.1f} MiB in "
                     f"{sum(v[0] for v in by.values())} segments")
        for key, (n, b, u) in sorted(by.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"    {b / MiB:9.1f} MiB {n:4d} segs, {u / MiB:9.1f} in use  {key[:160]}")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    streams = "--streams" in args
    for p in (a for a in args if a != "--streams"):
        data = load(p)
        print(summary(data))
        if streams:
            for k in (1, 2):
                print(stream_summary(data, f"step{k}_begin", f"step{k}_end"))
