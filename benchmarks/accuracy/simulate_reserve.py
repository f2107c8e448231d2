"""Simulated caching allocator vs measured peaks: `python -m benchmarks.accuracy.simulate_reserve`.

For every measured run the event generator supports (vramfit/alloc_events.py: full, LoRA and QLoRA,
bf16-true / bf16-mixed / 32-true, AdamW foreach or fused, SGD, bitsandbytes 8-bit and paged
AdamW, sdpa or eager, checkpointing), 3 Trainer steps are replayed at full size on the meta
device and fed to the allocator model (vramfit/allocator.py) with the run's allocator setting.
Printed per case: measured vs simulated peak allocated and reserved, and the device-peak error
of the simulation next to that of vramfit's current prediction (linear reserve fit); then the
error distributions, overall and by allocator setting.  Results are cached in
benchmarks/results/simulated-reserve.json (`--fresh` recomputes); each case runs in its own
process.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import multiprocessing as mp
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
CACHE = RESULTS / "simulated-reserve.json"


def _simulate_one(rec: dict) -> dict:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    import transformers

    from benchmarks.accuracy.report import case_setup, predict, unused_reserved
    from vramfit.memory.events import training_events
    from vramfit.memory.kernels import Unsupported
    from vramfit.memory.allocator import simulate
    from vramfit.memory.setup import resolve_targets
    from vramfit.model.spec import load_spec

    case = rec["case"]
    out = {"label": rec["label"], "allocator": case.get("allocator", "default"), "method": case["method"],
           "meas_allocated": rec["peak_allocated_bytes"], "meas_reserved": rec["peak_reserved_bytes"],
           "meas_device": rec.get("nvml_peak_bytes"),
           "meas_segments": (rec.get("cuda_memory_stats") or {}).get("num_device_alloc"),
           # the replay traces the installed transformers: compare it with the run's (environment)
           "replay_transformers": transformers.__version__}
    try:
        s = case_setup(case)
        spec = load_spec(case["model"], overrides=case.get("config_overrides") or None)
        _, bd = predict(case)
        out.update(fit_allocated=bd.peak_allocated_bytes, fit_reserved=bd.peak_reserved_bytes,
                   fit_device=bd.device_bytes, context=bd.device_bytes - bd.peak_reserved_bytes)
        t = time.perf_counter()
        ev = training_events(spec, s, resolve_targets(spec, s), unused_reserved=unused_reserved(rec))
        t_gen = time.perf_counter() - t
        t = time.perf_counter()
        # a run under a cap (set_per_process_memory_fraction) is replayed under the same cap, as
        # `vramfit plan` checks a budget: the allocator releases its cache and retries at the cap
        total = rec.get("environment", {}).get("gpu_total_bytes")
        limit = case.get("memory_limit_bytes") or (
            int(case["memory_fraction"] * total) if case.get("memory_fraction") and total else None)
        streams = (ev.get("host") or {}).get("streams")
        if streams:  # activation offloading's copy stream: its own pools
            from vramfit.memory.offload import simulate_streams

            res = simulate_streams(ev["events"], streams, expandable_segments=out["allocator"] == "expandable",
                                   limit_bytes=limit)
        else:
            res = simulate(ev["events"], expandable_segments=out["allocator"] == "expandable", limit_bytes=limit)
        if limit:
            out.update(limit_bytes=limit, sim_oom=res["oom"], sim_retries=res["num_alloc_retries"])
        t_sim = time.perf_counter() - t
    except Unsupported as exc:
        out["unsupported"] = str(exc)
        return out
    except Exception as exc:  # noqa: BLE001 - listed, not hidden
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return out
    out.update(sim_allocated=res["peak_allocated"], sim_reserved=res["peak_reserved"],
               sim_segments=res["num_device_alloc"], sim_device=res["peak_reserved"] + out["context"],
               events=len(ev["events"]), seconds_generate=t_gen, seconds_simulate=t_sim)
    return out


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] if xs else float("nan")


def _dist(rows, pred, meas):
    errs = [(r[pred] - r[meas]) / r[meas] for r in rows if r.get(pred) and r.get(meas)]
    if not errs:
        return "n=0"
    a = [abs(e) for e in errs]
    return (f"n={len(errs):3d} median {100 * statistics.median(a):5.2f}%  p90 {100 * _pct(a, 0.9):5.2f}%  "
            f"max {100 * max(a):5.2f}%  under>2% {100 * sum(e < -0.02 for e in errs) / len(errs):4.1f}%  "
            f"bias {100 * statistics.median(errs):+5.2f}%")


def main(argv=None) -> None:
    from benchmarks.accuracy.report import load_records

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*")
    ap.add_argument("--fresh", action="store_true", help="recompute cached cases")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=None, help="substring of the case labels to run")
    ap.add_argument("--method", default=None, help="only the runs of this method (full, lora, qlora)")
    ap.add_argument("--cache", default=str(CACHE), help=f"results file (default {CACHE.name} next to the results)")
    ap.add_argument("--own-transformers", action="store_true",
                    help="only the runs made with the installed transformers (the replay traces the installed "
                         "one: run once per version, e.g. PYTHONPATH=<a transformers 5.17 install>)")
    args = ap.parse_args(argv)
    cache_path = Path(args.cache)
    paths = args.results or sorted(glob.glob(str(RESULTS / "*.jsonl")))
    recs = [r for r in load_records(paths) if r["status"] == "ok"]
    if args.only:
        recs = [r for r in recs if args.only in r["label"]]
    if args.method:
        recs = [r for r in recs if r["case"]["method"] == args.method]
    if args.own_transformers:
        import transformers

        recs = [r for r in recs if r.get("environment", {}).get("versions", {}).get("transformers")
                == transformers.__version__]
    cache = {} if args.fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    key = lambda r: f"{r['label']}|{r.get('environment', {}).get('gpu_name', '?')}|{r.get('environment', {}).get('date', '')}"  # noqa: E731
    # cases cached as unsupported are retried (the generator may have learned them since)
    todo = [r for r in recs if key(r) not in cache or "unsupported" in cache[key(r)]]
    if todo:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
            for r, res in zip(todo, pool.imap(_simulate_one, todo)):
                cache[key(r)] = res
                cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True))
                print("done", res["label"], res.get("error") or res.get("unsupported") or "", flush=True)
    rows = [cache[key(r)] for r in recs]
    ok = [r for r in rows if "sim_reserved" in r]
    M = 1 << 20
    print(f"{'case':78s} {'alloc meas/sim MiB':>19s} {'reserved meas/sim/fit MiB':>26s} {'dev err sim':>11s} "
          f"{'dev err fit':>11s} {'s':>5s}")
    for r in ok:
        es = (r["sim_device"] - r["meas_device"]) / r["meas_device"] if r.get("meas_device") else float("nan")
        ef = (r["fit_device"] - r["meas_device"]) / r["meas_device"] if r.get("meas_device") else float("nan")
        print(f"{r['label'][:78]:78s} {r['meas_allocated'] // M:>9d}/{r['sim_allocated'] // M:<9d} "
              f"{r['meas_reserved'] // M:>8d}/{r['sim_reserved'] // M:<7d}/{r['fit_reserved'] // M:<9d} "
              f"{100 * es:+10.2f}% {100 * ef:+10.2f}% {r['seconds_generate'] + r['seconds_simulate']:5.1f}")
    skipped = [r for r in rows if "sim_reserved" not in r]
    print(f"\n{len(ok)} cases simulated, {len(skipped)} not supported or failed:")
    for r in skipped:
        print(f"  {r['label']}: {r.get('unsupported') or r.get('error')}")
    for name, grp in (("all", ok), ("default", [r for r in ok if r["allocator"] == "default"]),
                      ("expandable", [r for r in ok if r["allocator"] == "expandable"])):
        print(f"\n[{name}]")
        for what in ("allocated", "reserved", "device"):
            print(f"  {what:9s} simulated : {_dist(grp, 'sim_' + what, 'meas_' + what)}")
            print(f"  {what:9s} linear fit: {_dist(grp, 'fit_' + what, 'meas_' + what)}")
    if ok:
        secs = [r["seconds_generate"] + r["seconds_simulate"] for r in ok]
        print(f"\nper case: median {statistics.median(secs):.1f} s, max {max(secs):.1f} s "
              f"(generation dominates; simulation median {statistics.median(r['seconds_simulate'] for r in ok):.2f} s)")


if __name__ == "__main__":
    main()
