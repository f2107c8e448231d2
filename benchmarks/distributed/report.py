"""Per-GPU error of the multi-GPU memory model against the proof's measurements.

    python -m benchmarks.distributed.report benchmarks/results/<machine>-<date>-distributed.jsonl [--md out.md]

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl")
    ap.add_argument("--md", default=None, help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    records = [json.loads(x) for x in Path(args.jsonl).read_text().splitlines() if x.strip()]
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
