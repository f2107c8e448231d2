"""Offline check of the capped allocator replay against plan proof 3 (H100, enforced budgets).

    python -m benchmarks.plan_proof.cap_check [FILES...] [--out benchmarks/results/cpu-2026-12-05-cap-check.txt]

For each plan, next_larger and alt trial: the measured status (ok / oom; a next-larger that ran
but "needs the headroom", as report.py defines it: measured device bytes above the plan's usable
bytes) against two verdicts:
- fast: the memory model's device bytes <= usable (what the planner decides with);
- replay: two steps replayed through the allocator model capped as run.py capped the GPU
  (`enforce`: fraction (budget - outside) / total, so the allocator may reserve budget - outside),
  with what earlier trials of the same worker left allocated (report.load's leak_before_bytes)
  allocated from the start.  The replay's verdict: OOM under the cap, or (next_larger) needs the
  headroom (capped reserved + outside > usable), else fits.
A verdict agrees when it says "rejected" (OOM or needs the headroom) for a next_larger trial that
OOMed or needed the headroom, and "runs" for a plan or alt trial that ran (and the converse).
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_FILES = tuple(f"benchmarks/results/h100-2026-11-23-plan-proof-3{x}.jsonl" for x in "abc")
DEFAULT_OUT = "benchmarks/results/cpu-2026-12-05-cap-check.txt"
ROLES = ("plan", "next_larger", "alt")


def measured(t: dict, usable: int, outside: int) -> str:
    if t["status"] == "oom":
        return "oom"
    used = (t.get("peak_reserved_bytes") or 0) + outside
    return "headroom" if t["role"] == "next_larger" and used > usable else "ok"


def check(t: dict, plan: dict, outside: int, specs: dict) -> dict:
    from vramfit.memory.kernels import Unsupported
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.replay import capped_replay
    from vramfit.planner.gpu import parse_size
    from vramfit.memory.setup import Setup
    from vramfit.model.spec import load_spec

    key = (t["model"], repr(t.get("overrides") or {}))
    spec = specs.get(key) or specs.setdefault(key, load_spec(t["model"], overrides=t.get("overrides") or None))
    setup = Setup(**{k: v for k, v in t["setup"].items() if k in Setup.__dataclass_fields__ and v is not None})
    usable = plan["usable_bytes"]
    bd, targets = estimate_setup(spec, setup)
    limit = parse_size(t["budget"]) - outside  # run.py's enforce: fraction x total
    row = {"model": t["model"], "budget": t["budget"], "role": t["role"], "mb": f"{setup.micro_batch}x{setup.grad_accum}",
           "setup": f"{setup.method} {setup.optim}{' ckpt' if setup.grad_ckpt else ''}",
           "measured": measured(t, usable, outside), "fast_device": bd.device_bytes,
           "fast": "fits" if bd.device_bytes <= usable else "rejected",
           "measured_reserved": t.get("peak_reserved_bytes"), "leak": t.get("leak_before_bytes") or 0}
    started = time.perf_counter()
    try:
        r = capped_replay(spec, setup, targets, limit, initial_allocated=row["leak"])
    except Unsupported as exc:
        row.update(replay="unsupported", replay_note=str(exc), seconds=time.perf_counter() - started)
        return row
    row["seconds"] = time.perf_counter() - started
    row.update(replay_reserved=r["peak_reserved_bytes"], retries=r["num_alloc_retries"], oom=r["oom"])
    if r["oom"]:
        row["replay"] = "oom"
    elif t["role"] == "next_larger" and r["device_bytes"] > usable:
        row["replay"] = "headroom"
    else:
        row["replay"] = "fits"
    return row


def agrees(row: dict, verdict: str) -> bool:
    rejected_measured = row["measured"] in ("oom", "headroom")
    return (verdict in ("oom", "headroom", "rejected")) == rejected_measured


def main(argv=None) -> int:
    from benchmarks.plan_proof.report import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", default=list(DEFAULT_FILES))
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--title", default="plan proof 3 (H100, 2026-11-23)", help="what the files are, for the header")
    args = ap.parse_args(argv)
    records = load(*args.files)
    outside = {r["model"]: r["outside_bytes"] for r in records if r["kind"] == "environment"}
    plans = {(r["model"], r["budget"]): r for r in records if r["kind"] == "plan" and r.get("status") == "ok"}
    latest: dict = {}  # one trial per (model, budget, role, setup): the latest with a result
    for r in records:
        if r["kind"] == "trial" and r.get("role") in ROLES and r.get("status") in ("ok", "oom"):
            latest[(r["model"], r["budget"], r["role"], repr(sorted(r["setup"].items())))] = r
    specs: dict = {}
    rows = []
    started = time.perf_counter()
    for t in latest.values():
        p = plans.get((t["model"], t["budget"]))
        if p is None:
            continue
        rows.append(check(t, p, outside[t["model"]], specs))
        print(_line(rows[-1]), flush=True)
    text = _report(rows, time.perf_counter() - started, args.title)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def _line(r: dict) -> str:
    mark = lambda v: "+" if agrees(r, v) else "x"  # noqa: E731
    return (f"{r['model']:13s} {r['budget']:>5s} {r['role']:11s} {r['setup']:32s} {r['mb']:>5s} "
            f"measured {r['measured']:8s} (res {_gb(r['measured_reserved'])}) | fast {r['fast']:8s}{mark(r['fast'])} "
            f"({_gb(r['fast_device'])}) | replay {r['replay']:8s}{mark(r['replay'])} "
            f"(res {_gb(r.get('replay_reserved'))}, {r.get('retries', '-')} retries, {r['seconds']:.1f} s)")


def _report(rows: list, seconds: float, title: str) -> str:
    import transformers

    out = [f"Capped allocator replay vs the fast model on {title}, replayed on CPU with transformers "
           f"{transformers.__version__}",
           "(python -m benchmarks.plan_proof.cap_check; decimal GB; res = peak reserved; + agrees with the",
           " measured status, x does not; next_larger: OOM or needs the headroom counts as rejected)", ""]
    out += [_line(r) for r in sorted(rows, key=lambda r: (ROLES.index(r["role"]), r["model"], float(r["budget"][:-2])))]
    out.append("")
    out.append(f"{'role':12s} {'trials':>6s} {'fast agrees':>12s} {'replay agrees':>14s} {'replay s/check':>15s}")
    for role in ROLES + ("all",):
        rs = [r for r in rows if role in (r["role"], "all")]
        if not rs:
            continue
        f = sum(agrees(r, r["fast"]) for r in rs)
        s = sum(agrees(r, r["replay"]) for r in rs)
        sec = sum(r["seconds"] for r in rs) / len(rs)
        out.append(f"{role:12s} {len(rs):6d} {f:>8d}/{len(rs):<3d} {s:>10d}/{len(rs):<3d} {sec:14.1f}")
    out.append(f"\n{len(rows)} checks in {seconds:.0f} s (replay seconds per check include building the events; "
               "repeats of a setup are cached)")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
