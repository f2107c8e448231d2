"""Refit the planner's cost model with the plan proof's measured tokens/s, and check the ranking.

    python -m benchmarks.plan_proof.fit_cost PLAN_PROOF.jsonl [...] [--json OUT]

Samples: every trial that trained (status ok, tokens/s of the steps after the first) in the plan
proof's JSON lines (H100, random tokens, Trainer), plus the accuracy harness runs of
benchmarks/results (`benchmarks.accuracy.fit_cost.samples`: larger micro-batches, mostly on an
H200).  Declared split, so the fit is reported on runs it did not see:
- fitted on: the plan proof's Qwen2.5 models and the harness runs whose case id is even;
- held out: the plan proof's Llama models and the harness runs whose case id is odd.

Then, for each (model, budget) of the plan proof: the setups that really ran there (the plan's and
the alternatives), ranked by the cost model before and after the refit; "top is fastest" when the
setup the model ranks first among them is within 10% of the fastest measured.  This is the
planner's choice restricted to what was measured, not a new proof: a plan the refit would change
to an unmeasured setup needs the GPU again (the rows say which).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import statistics

from benchmarks.accuracy.fit_cost import errors
from benchmarks.accuracy.fit_cost import samples as harness_samples
from benchmarks.accuracy.report import RESULTS
from benchmarks.jsonl import records
from vramfit.planner.gpu import resolve_gpu
from vramfit.planner.cost import DEFAULT_COST, fit_cost_model, seconds_per_token
from vramfit.memory.setup import make_setup, resolve_targets
from vramfit.model.spec import load_spec

SETUP_KEYS = ("method", "precision", "optim", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "seq_len",
              "micro_batch", "grad_accum", "grad_ckpt", "attn", "allocator")


def harness_files() -> list:
    """The accuracy harness's result files (not the proofs' or the speed benchmarks')."""
    return [p for p in sorted(glob.glob(str(RESULTS / "*.jsonl")))
            if not any(k in p for k in ("plan-proof", "train-proof", "speed", "cpu-"))]


def trial_rows(paths) -> list:
    """(id, spec, setup, device, tokens/s, record) of each plan-proof trial that trained."""
    device = resolve_gpu("h100")
    out = []
    for path in paths:
        for r in records(path):
            if r.get("kind") != "trial" or r.get("status") != "ok" or not r.get("tokens_per_s") or r["role"] == "afbs":
                continue
            spec = load_spec(r["model"], overrides=r.get("overrides") or None)
            s = make_setup(**{k: v for k, v in r["setup"].items() if k in SETUP_KEYS and v is not None})
            out.append((f"{r['model']}/{r['budget']}/{r['role']}", spec, s, device, r["tokens_per_s"], r))
    return out


def summary(errs) -> str:
    a = sorted(abs(e) for e in errs)
    return (f"n {len(a)}, median |error| {statistics.median(a):.0%}, p90 {a[int(0.9 * (len(a) - 1))]:.0%}, "
            f"max {a[-1]:.0%}") if a else "n 0"


def ranking(rows, cost) -> list:
    """Per (model, budget): the measured setups ranked by `cost`; is the top one the fastest?"""
    groups = collections.defaultdict(list)
    for _, spec, s, d, tps, r in rows:
        if r["role"] in ("plan", "alt"):
            groups[(r["model"], r["budget"])].append((spec, s, d, tps))
    out = []
    for (model, budget), cands in groups.items():
        if len(cands) < 2:
            continue
        best = max(t for *_, t in cands)
        top = min(cands, key=lambda c: seconds_per_token(c[0], c[1], c[2], resolve_targets(c[0], c[1]), cost))
        out.append({"model": model, "budget": budget, "candidates": len(cands), "best_tokens_per_s": round(best),
                    "top_tokens_per_s": round(top[3]), "ratio": round(top[3] / best, 3)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="plan proof JSON lines")
    ap.add_argument("--json", help="write the fitted constants and the tables here")
    a = ap.parse_args(argv)
    trials = trial_rows(a.files)
    harness = [(i, spec, s, d, tps, None) for i, spec, s, d, tps in
               harness_samples(harness_files())]
    fit = [r for r in trials if r[0].startswith("qwen")] + [r for r in harness if int(r[0], 16) % 2 == 0]
    held = [r for r in trials if not r[0].startswith("qwen")] + [r for r in harness if int(r[0], 16) % 2 == 1]
    cost = fit_cost_model([(spec, s, d, tps) for _, spec, s, d, tps, _ in fit])
    print(f"fitted: mfu_max={cost.mfu_max:.3f} layer_overhead_s={cost.layer_overhead_s * 1e6:.0f}us "
          f"adapter_overhead_s={cost.adapter_overhead_s * 1e6:.0f}us "
          f"dequant_bytes_per_param={cost.dequant_bytes_per_param:.1f} ({cost.source})")
    result = {"fitted": dataclasses.asdict(cost), "errors": {}, "ranking": {}}
    for name, part in (("fit: plan-proof Qwen + harness even ids", fit),
                       ("held out: plan-proof Llama + harness odd ids", held),
                       ("plan proof, all", trials), ("harness, all", harness)):
        before, after = summary(errors(part, DEFAULT_COST)), summary(errors(part, cost))
        result["errors"][name] = {"before": before, "after": after}
        print(f"tokens/s {name}: before {before}; after {after}")
    for name, c in (("before", DEFAULT_COST), ("after", cost)):
        rows = ranking(trials, c)
        ok = sum(r["ratio"] >= 0.9 for r in rows)
        result["ranking"][name] = rows
        print(f"ranking {name}: the top-ranked measured setup is within 10% of the fastest in {ok} of {len(rows)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
