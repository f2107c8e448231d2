"""Fit the allocator-reserve constants: `python -m benchmarks.accuracy.fit_reserve [RESULTS ...]`.

reserve (= peak reserved - peak allocated, measured)
    ~ const + a * fp32_logits_bytes + b * activations + c * optimizer_step_temporaries,
least squares on a declared set of architectures (FIT_ARCHS), reported on the others.  The
predicted allocation comes from the current memory model, so refit after changing it.
"""

from __future__ import annotations

import argparse
import glob

import numpy as np

from benchmarks.accuracy.report import RESULTS, case_setup, load_records, predict
from vramfit.memory.walk import optimizer_step_temp_bytes, trainable_tensors
from vramfit.memory.setup import resolve_targets

FIT_ARCHS = ("llama", "qwen2", "gpt2", "opt")
MiB = 1 << 20


def features(records):
    fit, held = ([], []), ([], [])
    for r in records:
        if r["status"] != "ok":
            continue
        try:
            spec, bd = predict(r["case"])
        except Exception:  # reported by report.py
            continue
        s = case_setup(r["case"])
        logits = s.tokens * spec.vocab_size * 4
        act = bd.components.get("activations", 0)
        temp = optimizer_step_temp_bytes(trainable_tensors(spec, s, resolve_targets(spec, s)), s, spec)
        target = fit if spec.model_type in FIT_ARCHS else held
        target[0].append([1.0, logits / MiB, act / MiB, temp / MiB])
        target[1].append((r["peak_reserved_bytes"] - r["peak_allocated_bytes"]) / MiB)
    return fit, held


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="*")
    args = ap.parse_args(argv)
    paths = args.results or sorted(glob.glob(str(RESULTS / "*.jsonl")))
    (xf, yf), (xh, yh) = features(load_records(paths))
    coef, *_ = np.linalg.lstsq(np.array(xf), np.array(yf), rcond=None)
    print(f"fit on {FIT_ARCHS}: n={len(yf)}; held out: n={len(yh)}")
    print(f"reserve_const_bytes = {coef[0]:.0f} MiB, reserve_per_logits_byte = {coef[1]:.4f}, "
          f"reserve_per_activation_byte = {coef[2]:.4f}, reserve_per_optimizer_temp_byte = {coef[3]:.4f}")
    for name, x, y in (("fit", xf, yf), ("held-out", xh, yh)):
        if not y:
            continue
        res = np.abs(np.array(x) @ coef - np.array(y))
        print(f"{name}: |reserve error| median {np.median(res):.0f} MiB, p90 {np.percentile(res, 90):.0f} MiB, "
              f"max {res.max():.0f} MiB")


if __name__ == "__main__":
    main()
