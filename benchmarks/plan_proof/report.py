"""The plan proof's JSON lines -> a markdown table with the three pass rates.

    python -m benchmarks.plan_proof.report FILE [FILE ...] [--md benchmarks/results/h100-2026-11-23-plan-proof.md]

Several files (the commands of one proof, or a resumed run's one file) are read as one: for each
(model, budget, role, setup) the latest trial with a result counts (a plan trial: the one with the
most steps), so a trial run again after a cut replaces the cut one.  With `--supersede` the later
files are a later proof that re-ran part of an earlier one: for each model x budget and role, the
trials of the last file that has that role replace the earlier files' (a next-larger walk that
changed, a plan that changed), and alternatives measured before the plan's own file are dropped
(tokens/s are compared within one machine and stack only).

Per model x budget: the plan's setup, its predicted device bytes (the fast model's, as recorded at run
time and recomputed with today's memory model, and the allocator replay's check of it where the
plan came from the replay planner), the measured device bytes (torch's reserved peak + what
vramfit counts outside torch, and NVML's process peak), OOM or not over how many steps, whether
the next-larger micro-batch really OOMed (or needed the headroom), the plan's tokens/s against
the fastest setup that really ran, and transformers' auto_find_batch_size on the same budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GB = 10**9
SPEED_PASS = 0.9
DEFAULT_MD = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "h100-2026-11-23-plan-proof.md"


LEAK_CLEAN = GB // 4  # a trial that starts with less than this left by earlier ones is "clean"


def ran(r: dict) -> bool:
    """A trial with a result (not one the time guard skipped, nor one cut before it reported)."""
    return r.get("kind") == "trial" and r.get("status") not in (None, "skipped_time")


def load(*paths) -> list:
    """The records; each trial gets `leak_before_bytes`: what the trials before it in the same
    worker process left allocated (the previous trial's leftover_allocated_bytes; 0 at a worker's
    start).  Before 2026-11-23's fix (vramfit.run.fallback.forget_bnb_overrides) every Trainer with a
    bitsandbytes 8-bit optimizer left its embeddings behind, up to 8.5 GB by the end of a worker."""
    from benchmarks.jsonl import records

    out = []
    for i, path in enumerate(paths):
        left: dict = {}
        for r in records(path):
            r["_file"] = i
            if r.get("kind") == "environment":
                left[r.get("model")] = 0
            elif ran(r):
                r["leak_before_bytes"] = left.get(r.get("model"), 0)
                left[r.get("model")] = r.get("leftover_allocated_bytes") or 0
            out.append(r)
    return out


def latest(ts: list, role: str) -> list:
    """The trials of `role`, one per setup: the latest with a result (plan: the most steps)."""
    best: dict = {}
    for t in ts:
        if t["role"] != role:
            continue
        key = json.dumps([t["setup"], t.get("afbs_start")], sort_keys=True)
        old = best.get(key)
        if old is None or role != "plan" or (t.get("steps_done") or 0) >= (old.get("steps_done") or 0):
            best[key] = t
    return list(best.values())


def supersede(records: list) -> list:
    """The records less the trials a later file replaces (see the module's docstring)."""
    last: dict = {}
    for r in filter(ran, records):
        k = (r["model"], r["budget"], r["role"])
        last[k] = max(last.get(k, -1), r["_file"])
    out = []
    for r in records:
        if ran(r):
            if r["_file"] < last[(r["model"], r["budget"], r["role"])]:
                continue
            if r["role"] == "alt" and r["_file"] < last.get((r["model"], r["budget"], "plan"), -1):
                continue
        out.append(r)
    return out


def recomputed_device_bytes(rec: dict) -> int | None:
    """The recorded setup's device bytes with the memory model as it is now."""
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.setup import Setup
    from vramfit.model.spec import load_spec

    try:
        spec = load_spec(rec["model"], overrides=rec.get("overrides") or None)
        fields = {k: v for k, v in rec["setup"].items() if k in Setup.__dataclass_fields__ and v is not None}
        return estimate_setup(spec, Setup(**fields))[0].device_bytes
    except Exception:  # noqa: BLE001 - a setup today's model rejects is shown as unknown
        return None


def measured_device_bytes(rec: dict, outside: int, less_leak: bool = False) -> int | None:
    r = rec.get("peak_reserved_bytes")
    if r is None:
        return None
    return r + outside - (rec.get("leak_before_bytes") or 0 if less_leak else 0)


def clean(rec: dict) -> bool:
    return (rec.get("leak_before_bytes") or 0) < LEAK_CLEAN


def gb(x) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def setup_text(s: dict) -> str:
    text = f"{s['method']} {s['precision']} {s['optim']} {s['micro_batch']}x{s['grad_accum']}"
    return text + (" ckpt" if s["grad_ckpt"] else "") + (" expandable" if s["allocator"] != "default" else "")


def cells(records: list) -> tuple[list, dict]:
    """-> (rows, rates)."""
    outside = {r["model"]: r["outside_bytes"] for r in records if r["kind"] == "environment"}
    plans = {(r["model"], r["budget"]): r for r in records if r["kind"] == "plan"}
    trials: dict = {}
    for r in records:
        if r["kind"] == "trial":
            trials.setdefault((r["model"], r["budget"]), []).append(r)
    rows, fit_ok, fit_n, all_ok, next_ok, next_n, speed_ok, speed_n = [], 0, 0, 0, 0, 0, 0, 0
    cfit_ok = cfit_n = cnext_ok = cnext_n = 0
    for key, p in plans.items():
        ts = [t for t in trials.get(key, []) if t.get("status") != "skipped_time"]
        by = lambda role, ts=ts: latest(ts, role)
        row = {"model": key[0], "budget": key[1]}
        if p["status"] != "ok":
            small = by("smallest")
            row["plan"] = "nothing fits" + (f" (smallest: {small[0]['status']})" if small else "")
            rows.append(row)
            continue
        out = outside.get(key[0], 0)
        # the plan's own setup only (a later proof's plan may differ from an earlier file's trial)
        plan = next((t for t in by("plan") if t["setup"] == p["chosen"]["setup"]), None)
        row["plan"] = setup_text(p["chosen"]["setup"])
        row["predicted"] = p["chosen"]["predicted_device_bytes"]
        row["recomputed"] = recomputed_device_bytes({**p["chosen"], "model": key[0], "overrides": p["overrides"]})
        row["replay"] = replay_device_bytes(p)
        if plan is not None:
            row.update(measured=measured_device_bytes(plan, out), nvml=plan.get("nvml_peak_bytes"),
                       status=plan["status"], steps=f"{plan.get('steps_done')}/{plan['steps_asked']}",
                       plan_tps=plan.get("tokens_per_s"), leak=plan.get("leak_before_bytes"),
                       less_leak=measured_device_bytes(plan, out, less_leak=True))
            fit_n += 1
            fit_ok += plan["status"] == "ok"
            if clean(plan):
                cfit_n += 1
                cfit_ok += plan["status"] == "ok"
            all_ok += plan["status"] == "ok" and plan.get("steps_done", 0) >= plan["steps_asked"]
        nxt = (by("next_larger") or [None])[0]
        if nxt is not None:
            used = measured_device_bytes(nxt, out)
            needs_headroom = nxt["status"] == "ok" and used is not None and used > p["usable_bytes"]
            row["next"] = f"mb {nxt['setup']['micro_batch']}: " + (
                "OOM" if nxt["status"] == "oom" else "headroom" if needs_headroom else nxt["status"])
            next_n += 1
            next_ok += nxt["status"] == "oom" or needs_headroom
            if clean(nxt):
                cnext_n += 1
                cnext_ok += nxt["status"] == "oom" or needs_headroom
            else:
                row["next"] += f" ({gb(nxt['leak_before_bytes'])} GB left before)"
        ran = [t for t in by("plan") + by("alt") if t["status"] == "ok" and t.get("tokens_per_s")]
        if plan is not None and plan.get("tokens_per_s") and ran:
            best = max(ran, key=lambda t: t["tokens_per_s"])
            row["best"] = f"{setup_text(best['setup'])}: {best['tokens_per_s']:.0f}"
            row["speed_ratio"] = plan["tokens_per_s"] / best["tokens_per_s"]
            speed_n += 1
            speed_ok += row["speed_ratio"] >= SPEED_PASS
        afbs = (by("afbs") or [None])[0]
        if afbs is not None:
            tried = afbs.get("afbs_batch_sizes_tried") or []
            row["afbs"] = (f"{afbs['status']}, batch {tried[-1] if tried else '-'} after {max(len(tried) - 1, 0)} OOMs, "
                           f"first step {afbs.get('first_good_step_seconds') or 0:.1f} s, "
                           f"{afbs.get('tokens_per_s') or 0:.0f} tok/s")
            if plan is not None and plan.get("first_good_step_seconds") is not None:
                row["afbs"] += f" (plan: {plan['first_good_step_seconds']:.1f} s)"
        rows.append(row)
    rates = {"plan ran without OOM": (fit_ok, fit_n),
             "... and all its asked steps (not cut by the time cap)": (all_ok, fit_n),
             "next-larger OOMs or needs the headroom": (next_ok, next_n),
             f"plan tokens/s >= {SPEED_PASS:.0%} of the best found": (speed_ok, speed_n),
             f"clean trials only (< {gb(LEAK_CLEAN)} GB left by earlier trials): plan ran without OOM": (cfit_ok, cfit_n),
             "clean trials only: next-larger OOMs or needs the headroom": (cnext_ok, cnext_n)}
    return rows, rates


def replay_device_bytes(plan_rec: dict) -> int | None:
    """The capped replay's device figure for the plan's chosen setup (the allocator-replay planner's
    own check of it, where it fitted), else None."""
    from vramfit.planner.recheck import fitting_check

    row = fitting_check((plan_rec.get("replay") or {}).get("checks") or [], plan_rec["chosen"]["setup"])
    return row["device_bytes"] if row else None


def error_line(rows: list) -> str:
    """Median and max |error| of the fast model's and the replay's device figure against the plans'
    measured device bytes (reserved + outside)."""
    import statistics

    parts = []
    for name, key in (("fast model (as run)", "predicted"), ("allocator replay", "replay")):
        errs = [abs(r[key] - r["measured"]) / r["measured"] for r in rows if r.get(key) and r.get("measured")]
        if errs:
            parts.append(f"{name} median {100 * statistics.median(errs):.1f}%, max {100 * max(errs):.1f}% "
                         f"({len(errs)} plans)")
    return "Plan's predicted device bytes vs measured: " + "; ".join(parts) + "." if parts else ""


def markdown(records: list, files: list | None = None) -> str:
    rows, rates = cells(records)
    env = next((r["environment"] for r in records if r["kind"] == "environment"), {})
    v = env.get("versions") or {}
    first = next((r for r in records if r["kind"] == "plan"), {})
    lines = [f"# `vramfit plan` under enforced budgets ({env.get('gpu_name') or 'CPU'})", "",
             (f"GPU {env.get('gpu_name')}, driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {v.get('torch')}, "
             f"transformers {v.get('transformers')}, peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}; "
             f"{env.get('date')}.  seq_len {first.get('seq_len')}, effective batch {first.get('effective_batch')}, "
             "random-init weights, random tokens.  Budgets are decimal GB; device bytes = torch's reserved peak "
             "+ the CUDA context and kernels vramfit counts outside it (what the enforced fraction leaves out)."
             + (f"  Each trial also held a ballast of total - budget with cuMemAlloc, so the card was the budget's "
                f"size for what the fraction does not count (NVML figures less the ballast); "
                f"{sum(1 for r in records if r['kind'] == 'trial' and r.get('ballast_bytes'))} trials."
                if any(r.get("ballast_bytes") for r in records if r["kind"] == "trial") else "")), "",
             "| pass rate | passed | of |", "|---|---|---|"]
    lines += [f"| {name} | {ok} | {n} |" for name, (ok, n) in rates.items()]
    errors = error_line(rows)
    if errors:
        lines += ["", errors]
    if files and len(files) > 1:
        lines += ["", "| file | GPU | driver | torch | transformers | peft | bitsandbytes | date | trials counted |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for i, name in enumerate(files):
            e = next((r["environment"] for r in records if r["kind"] == "environment" and r["_file"] == i), {})
            ev = e.get("versions") or {}
            n = sum(1 for r in records if ran(r) and r["_file"] == i)
            lines.append(f"| {Path(name).name} | {e.get('gpu_name')} | {e.get('driver')} | {ev.get('torch')} | "
                         f"{ev.get('transformers')} | {ev.get('peft')} | {ev.get('bitsandbytes')} | "
                         f"{e.get('date')} | {n} |")
    lines += ["", ("| model | budget | plan's setup | predicted GB (run / now / replay) | measured GB (reserved+outside / NVML) "
              "| left by earlier trials GB | measured less that GB | status, steps | next-larger | plan tok/s "
              "| best found (tok/s) | plan / best | auto_find_batch_size |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['speed_ratio']:.2f}" if "speed_ratio" in r else "-"
        lines.append(f"| {r['model']} | {r['budget']} | {r['plan']} | {gb(r.get('predicted'))} / "
                     f"{gb(r.get('recomputed'))} / {gb(r.get('replay'))} | {gb(r.get('measured'))} / {gb(r.get('nvml'))} | "
                     f"{gb(r.get('leak'))} | {gb(r.get('less_leak'))} | "
                     f"{r.get('status', '-')} {r.get('steps', '')} | {r.get('next', '-')} | "
                     f"{r['plan_tps']:.0f} | " if r.get("plan_tps") else
                     f"| {r['model']} | {r['budget']} | {r['plan']} | {gb(r.get('predicted'))} / "
                     f"{gb(r.get('recomputed'))} / {gb(r.get('replay'))} | {gb(r.get('measured'))} / {gb(r.get('nvml'))} | "
                     f"{gb(r.get('leak'))} | {gb(r.get('less_leak'))} | "
                     f"{r.get('status', '-')} {r.get('steps', '')} | {r.get('next', '-')} | - | ")
        lines[-1] += f"{r.get('best', '-')} | {ratio} | {r.get('afbs', '-')} |"
    result = {json.dumps([r["model"], r["budget"], r["role"], r["setup"]], sort_keys=True) for r in records
              if ran(r)}
    skipped = {json.dumps([r["model"], r["budget"], r["role"], r["setup"]], sort_keys=True) for r in records
               if r["kind"] == "trial" and r.get("status") == "skipped_time"} - result
    done = [r for r in records if r["kind"] == "run_done"]
    took = ", ".join(f"{d['seconds']:.0f}" for d in done)
    allowed = ", ".join(f"{d['max_seconds']:.0f}" for d in done)
    lines += ["", "\"Left by earlier trials\": what the trials before this one in the same process still held "
              "allocated when it started (the previous trial's leftover).  Until the fix of 2026-11-23 "
              "(`vramfit.run.fallback.forget_bnb_overrides`) each Trainer with a bitsandbytes 8-bit optimizer left its "
              "embeddings registered in bitsandbytes' GlobalOptimManager, so later trials in the worker started "
              "with that much less room under the cap: their OOMs say nothing about the plan, and their peaks "
              "include it (the \"less that\" column takes it out).  \"Predicted (now)\" uses the memory model of "
              "the commit that wrote this page."]
    lines += ["", f"Trials skipped by the time guard and not run later: {len(skipped)}.  "
              + (f"Commands: {len(done)}, {took} s of {allowed} s allowed." if done else
                 "The run did not finish (no run_done line).")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="+")
    ap.add_argument("--md", default=str(DEFAULT_MD), help="markdown output ('-': stdout only)")
    ap.add_argument("--supersede", action="store_true",
                    help="later files re-ran part of the earlier ones: their trials replace the earlier files'")
    a = ap.parse_args(argv)
    recs = load(*a.file)
    text = markdown(supersede(recs) if a.supersede else recs, a.file)
    print(text)
    if a.md != "-":
        Path(a.md).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
