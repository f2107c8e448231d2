"""Per-GPU error of the multi-GPU memory model against the proof's measurements.

    python -m benchmarks.distributed.report benchmarks/results/<machine>-<date>-distributed.jsonl [--md out.md]
    python -m benchmarks.distributed.report benchmarks/results/h100-2026-12-07-fake-pg.jsonl --md out.md

Lines of the fake-process-group harness (benchmarks.distributed.fake_pg: one rank of N per line)
are told apart by their flat peaks; their report has the targets' statistics (median, p90, max of
|error|, share under-predicted by more than 2%) over all runs and per strategy and N, and a row per run.

Predictions are recomputed with the current model (the recorded ones are kept in the JSONL as
they were), one row per case and rank: measured and predicted torch allocated / reserved peaks
and NVML device memory, relative error (predicted - measured) / measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.distributed.run import errors, predicted

KEYS = (("peak_allocated_bytes", "allocated"), ("peak_reserved_bytes", "reserved"), ("device_bytes", "device"))
GiB = 1 << 30


def rows(records: list) -> list:
    out = []
    for rec in records:
        if rec.get("status") != "ok":
            continue
        per_gpu = predicted(rec["case"])["per_gpu"]
        for r in rec["ranks"]:
            out.append({"name": rec["name"], "rank": r["rank"], "measured": {k: r.get(k) for k, _ in KEYS},
                        "predicted": {k: per_gpu[k] for k, _ in KEYS}, "error": errors(r, per_gpu),
                        "gpu": (r.get("environment") or {}).get("gpu_name")})
    return out


def table(rs: list) -> str:
    head = "| case | rank | " + " | ".join(f"{label} measured / predicted GiB (error)" for _, label in KEYS) + " |"
    lines = [head, "|" + "---|" * (2 + len(KEYS))]
    for r in rs:
        cells = []
        for k, _ in KEYS:
            m, p, e = r["measured"][k], r["predicted"][k], r["error"][k]
            cells.append("-" if m is None else f"{m / GiB:.2f} / {p / GiB:.2f} ({100 * e:+.1f}%)")
        lines.append(f"| {r['name']} | {r['rank']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rs: list) -> str:
    lines = ["| peak | median abs error | max abs error | under-predicted > 2% |", "|---|---|---|---|"]
    for k, label in KEYS:
        errs = [r["error"][k] for r in rs if r["error"][k] is not None]
        if not errs:
            continue
        under = sum(e < -0.02 for e in errs) / len(errs)
        lines.append(f"| {label} | {100 * statistics.median(abs(e) for e in errs):.1f}% | "
                     f"{100 * max(abs(e) for e in errs):.1f}% | {100 * under:.0f}% |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- fake-group lines


def fake_rows(records: list) -> list:
    from benchmarks.distributed.fake_pg import predicted as fake_predicted

    out = []
    for rec in records:
        if rec.get("status") != "ok" or rec.get("peak_allocated_bytes") is None:
            continue
        c = rec["case"]
        per_gpu = dict(fake_predicted(c)["per_gpu"])
        # the fake group has no NCCL communicator: compare the device figure without its constant
        per_gpu["device_bytes"] -= per_gpu.get("breakdown", {}).get("nccl_buffers", 0)
        out.append({"name": rec["name"], "case": c, "rank": c["rank"],
                    "measured": {k: rec.get(k) for k, _ in KEYS}, "predicted": {k: per_gpu[k] for k, _ in KEYS},
                    "error": errors(rec, per_gpu), "gpu": (rec.get("environment") or {}).get("gpu_name"),
                    "environment": rec.get("environment") or {}})
    return out


def _pct(xs: list, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = (len(xs) - 1) * q
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def stats(rs: list, key: str) -> dict:
    errs = [r["error"][key] for r in rs if r["error"].get(key) is not None]
    if not errs:
        return {}
    a = [abs(e) for e in errs]
    return {"n": len(errs), "median": statistics.median(a), "p90": _pct(a, 0.9), "max": max(a),
            "under2": sum(e < -0.02 for e in errs) / len(errs)}


TARGETS = {"median": 0.005, "p90": 0.02, "max": 0.04, "under2": 0.02}


def fake_summary(rs: list) -> str:
    lines = ["| peak | runs | median abs error | p90 | max | under-predicted > 2% | targets met |",
             "|---|---|---|---|---|---|---|"]
    for k, label in KEYS:
        s = stats(rs, k)
        if not s:
            continue
        met = all(s[m] <= v for m, v in TARGETS.items())
        lines.append(f"| {label} | {s['n']} | {100 * s['median']:.2f}% | {100 * s['p90']:.2f}% | {100 * s['max']:.2f}% "
                     f"| {100 * s['under2']:.0f}% ({round(s['under2'] * s['n'])}) | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def fake_by_strategy(rs: list) -> str:
    lines = ["| strategy | N | runs | allocated median / p90 / max | reserved median / p90 / max | "
             "under > 2% (alloc, res) |", "|---|---|---|---|---|---|"]
    groups = {}
    for r in rs:
        groups.setdefault((r["case"]["strategy"], r["case"]["world_size"]), []).append(r)
    for (st, n), g in sorted(groups.items()):
        a, v = stats(g, "peak_allocated_bytes"), stats(g, "peak_reserved_bytes")
        f = lambda s: f"{100 * s['median']:.2f} / {100 * s['p90']:.2f} / {100 * s['max']:.2f}%"  # noqa: E731
        lines.append(f"| {st} | {n} | {len(g)} | {f(a)} | {f(v)} | {round(a['under2'] * a['n'])}, "
                     f"{round(v['under2'] * v['n'])} |")
    return "\n".join(lines)


def fake_environment(rs: list) -> str:
    envs = {json.dumps({k: e.get(k) for k in ("gpu_name", "driver", "cuda")} | {"versions": e.get("versions")},
                       sort_keys=True) for e in (r["environment"] for r in rs)}
    return "\n".join(f"- {x}" for x in sorted(envs))


def fake_report(records: list, path: str) -> str:
    rs = fake_rows(records)
    other = [f"- {r.get('name')}: {r.get('status')}" + (f" ({str(r.get('error', ''))[:200]})" if r.get("error") else "")
             for r in records if r.get("status") != "ok"]
    header = (f"# Per-rank memory through torch's fake process group\n\n{len(rs)} runs ok of {len(records)} "
              f"({path}); each is rank r of N on one GPU, one fresh process; predicted by the current "
              f"`vramfit.memory.distributed` (error = (predicted - measured) / measured).  NCCL's own buffers are "
              f"outside the fake group: the device column compares without the model's NCCL "
              f"constant (the measurement has no NCCL communicator).\n\nEnvironment:\n{fake_environment(rs)}")
    return "\n\n".join(x for x in (
        header, "## All runs", fake_summary(rs) if rs else "no measured run", "## Per strategy and N",
        fake_by_strategy(rs) if rs else "", "## Runs", table(sorted(rs, key=lambda r: r["name"])) if rs else "",
        "## Not measured\n\n" + "\n".join(other) if other else "") if x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", help="a proof's JSONL, or the fake-group harness's")
    ap.add_argument("--md", default=None, help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    records = [json.loads(x) for x in Path(args.jsonl).read_text().splitlines() if x.strip()]
    if records and all("ranks" not in r for r in records):  # the fake-group harness
        text = fake_report(records, args.jsonl)
        print(text)
        if args.md:
            Path(args.md).write_text(text + "\n")
        return 0
    rs = rows(records)
    other = [f"- {r['name']}: {r['status']}" + (f" ({r.get('error', '')[:160]})" if r.get("error") else "")
             for r in records if r.get("status") != "ok"]
    header = (f"{len(rs)} rank measurements of {len({r['name'] for r in rs})} cases ({args.jsonl}); "
              f"GPU: {', '.join(sorted({str(r['gpu']) for r in rs})) or 'none'}")
    text = "\n\n".join(x for x in (
        header,
        summary(rs) if rs else "no measured case", table(rs) if rs else "", "\n".join(other)) if x)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
