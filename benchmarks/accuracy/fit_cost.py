"""Calibrate the planner's cost model on measured tokens/s: `python -m benchmarks.accuracy.fit_cost`.

Uses every measured training run (status ok, tokens/s of the steps after the first) in
benchmarks/results/*.jsonl, fits `vramfit.planner.cost.fit_cost_model` on the runs whose case id is
even (a declared half) and reports |predicted - measured| / measured tokens/s on the other half,
with the uncalibrated priors alongside.  The GPU is the one the runs name (H200 here).
"""

from __future__ import annotations

import argparse
import glob
import statistics

from benchmarks.accuracy.report import RESULTS, case_setup, load_records
from vramfit.planner.gpu import resolve_gpu
from vramfit.planner.cost import DEFAULT_COST, fit_cost_model, seconds_per_token
from vramfit.memory.setup import resolve_targets
from vramfit.model.spec import load_spec


def samples(paths) -> list:
    out = []
    for r in load_records(paths):
        tps = r.get("tokens_per_second")
        if r["status"] != "ok" or not tps:
            continue
        gpu = r.get("environment", {}).get("gpu_name", "")
        device = resolve_gpu("h200" if "H200" in gpu else "h100")
        case = r["case"]
        try:
            spec = load_spec(case["model"], overrides=case.get("config_overrides") or None)
            s = case_setup(case)
            resolve_targets(spec, s)
        except Exception:
            continue
        out.append((r["id"], spec, s, device, tps))
    return out


def paging_bytes(spec, s, record) -> int:
    """The paged optimizer states the planner counts as paging for a plan-proof trial (its budget's
    usable bytes; 0 for the harness's runs on a whole 80 GB card)."""
    usable = (record or {}).get("usable_bytes")
    if not usable or not s.optim.startswith("paged"):
        return 0
    from vramfit.memory.estimate import estimate_setup
    from vramfit.planner.cost import paging_bytes as paging

    return paging(estimate_setup(spec, s)[0], usable)


def errors(rows, cost) -> list[float]:
    """(predicted - measured) / measured tokens/s of each (id, spec, setup, device, tokens/s[, record]) row."""
    errs = []
    for _, spec, s, device, tps, *rest in rows:
        paging = paging_bytes(spec, s, rest[0] if rest else None)
        predicted = 1.0 / seconds_per_token(spec, s, device, resolve_targets(spec, s), cost, paging)
        errs.append((predicted - tps) / tps)
    return errs


def summary(errs) -> str:
    a = sorted(abs(e) for e in errs)
    p90 = a[min(len(a) - 1, int(0.9 * len(a)))]
    return f"n={len(a)} median |err| {100 * statistics.median(a):.1f}%, p90 {100 * p90:.1f}%, max {100 * a[-1]:.1f}%"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="*")
    args = ap.parse_args(argv)
    rows = samples(args.results or sorted(glob.glob(str(RESULTS / "*.jsonl"))))
    fit = [r for r in rows if int(r[0], 16) % 2 == 0]
    held = [r for r in rows if int(r[0], 16) % 2 == 1]
    cost = fit_cost_model([(spec, s, d, tps) for _, spec, s, d, tps in fit])
    print(f"fitted: mfu_max={cost.mfu_max:.3f} layer_overhead_s={cost.layer_overhead_s * 1e6:.1f}us "
          f"dequant_bytes_per_param={cost.dequant_bytes_per_param:.2f} ({cost.source})")
    for name, part in (("fit half", fit), ("held-out half", held)):
        print(f"{name}: priors {summary(errors(part, DEFAULT_COST))}; fitted {summary(errors(part, cost))}")


if __name__ == "__main__":
    main()
