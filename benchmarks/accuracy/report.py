"""Predicted vs measured: `python -m benchmarks.accuracy.report [RESULTS.jsonl ...]`.

For every measured case the current memory model predicts the three peaks; the report prints
median / p90 / max relative error per peak, overall and per method and architecture, the share
of dangerous under-predictions (> 2% below the measurement), whether every OOM was predicted not
to fit, and writes a markdown table and a scatter plot next to the results.

`--phases`: the phases outside the steps (load, the Trainer's set-up, and where the case ran them
evaluation, a checkpoint save, the adapter's reload, the final save) against their allocator replay,
under the installed transformers (PYTHONPATH=<a transformers 5.17 install> for the 5.17 runs).

Relative error = (predicted - measured) / measured: negative means under-predicted.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import statistics
from pathlib import Path

from vramfit.memory.estimate import estimate_setup
from vramfit.memory.constants import DEFAULT, Constants
from vramfit.memory.setup import Setup, validate
from vramfit.model.spec import load_spec

RESULTS = Path(__file__).resolve().parent.parent / "results"
PEAKS = (("allocated", "peak_allocated_bytes"), ("reserved", "peak_reserved_bytes"), ("device", "device_bytes"))


def case_setup(case: dict) -> Setup:
    targets = case.get("target_modules")
    if isinstance(targets, list):
        targets = ",".join(targets)
    s = Setup(method=case["method"], precision=case["precision"], optim=case["optim"],
              lora_r=case.get("lora_r") or 16, lora_alpha=case.get("lora_alpha"),
              lora_dropout=case.get("lora_dropout") if case.get("lora_dropout") is not None else 0.05,
              target_modules=targets, seq_len=case["seq_len"], micro_batch=case["micro_batch"],
              grad_ckpt=bool(case.get("grad_ckpt")), attn=case.get("attn", "sdpa"),
              allocator=case.get("allocator", "default"), loss=case.get("loss", "logits"),
              liger=bool(case.get("liger")), packing=bool(case.get("packing")),
              activation_offloading=bool(case.get("activation_offloading")),
              # QLoRA under trl's fused head: the harness casts the adapters to bf16 as SFTTrainer does
              # since 2026-12-07 (its cases say so); the runs before kept peft's fp32 adapters
              trl_adapter_cast=bool(case.get("trl_adapter_cast")), kbit_prep=case.get("kbit_prep", True),
              extras={"example_len": case["example_len"]} if case.get("packing") else {})
    validate(s)
    return s


def predict(case: dict, constants: Constants = DEFAULT, calibration: dict | None = None):
    spec = load_spec(case["model"], overrides=case.get("config_overrides") or None)
    if calibration is not None:
        constants = calibrated_constants(calibration, spec, constants)
    bd, _ = estimate_setup(spec, case_setup(case), constants)
    return spec, bd


def calibrated_constants(calibration: dict, spec, base: Constants = DEFAULT) -> Constants:
    """The constants a `vramfit calibrate` JSON gives for `spec` (as calibrate.load_local_constants)."""
    fields = {k: v for k, v in calibration.get("constants", {}).items() if k in Constants.__dataclass_fields__}
    scale = calibration.get("activation_scale", {}).get(spec.config_hash)
    if scale:
        fields["activation_scale"] = scale
    return base.with_(**fields)


def unused_reserved(rec: dict) -> int:
    """What a harness run held reserved and unused when it loaded (its CUDA-context probe's segment,
    torch.empty(1) then freed): transformers' load warm-up subtracts it (training_events(unused_reserved=))."""
    init = rec.get("after_cuda_init") or {}
    return max(0, (init.get("reserved_bytes") or 0) - (init.get("allocated_bytes") or 0))


def measured(rec: dict) -> dict:
    return {"allocated": rec.get("peak_allocated_bytes"), "reserved": rec.get("peak_reserved_bytes"),
            "device": rec.get("nvml_peak_bytes")}


def load_records(paths) -> list[dict]:
    """The harness's training runs in `paths` (other JSON lines, such as the proofs' and the speed
    benchmarks', are skipped).  A case measured again on the same GPU kind (the memory-history
    reruns) counts once: the first in path order that measured something (ok or oom); a harness
    error (the run never got to train) counts only where no rerun of the case measured it."""
    out, seen = [], {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                case = rec.get("case")
                if not isinstance(case, dict) or case.get("kind", "train") != "train":
                    continue
                key = (rec.get("id"), (rec.get("environment") or {}).get("gpu_name"))
                if rec.get("id") and key in seen:
                    k = seen[key]
                    if out[k]["status"] == "error" and rec["status"] != "error":
                        out[k] = rec
                    continue
                seen[key] = len(out)
                out.append(rec)
    return out


SIMULATED = RESULTS / "simulated-reserve.json"


def sim_key(rec: dict) -> str:
    env = rec.get("environment", {})
    return f"{rec['label']}|{env.get('gpu_name', '?')}|{env.get('date', '')}"


def _dtype_amp(precision: str) -> str:
    """The recipe's two axes: from_pretrained(dtype=...), TrainingArguments(bf16= / fp16=)."""
    from vramfit.memory.setup import AMPS, PRECISIONS

    dtype, amp = PRECISIONS.get(precision, (precision, None))
    return f"({dtype}, {next(k for k, v in AMPS.items() if v == amp)})"


def rows(records, constants: Constants = DEFAULT, calibration: dict | None = None,
         simulated: dict | None = None) -> list[dict]:
    """`simulated`: benchmarks.accuracy.simulate_reserve's results; where a case has one, its three
    peaks are the allocator simulation's (what `vramfit estimate --simulate-allocator` gives)."""
    out = []
    for rec in records:
        case = rec["case"]
        if rec["status"] not in ("ok", "oom"):
            continue
        try:
            spec, bd = predict(case, constants, calibration)
        except Exception as exc:  # noqa: BLE001 - a model the estimator cannot trace yet: listed, not hidden
            print(f"no prediction for {rec['label']}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        row = {"label": rec["label"], "status": rec["status"], "method": case["method"],
               "gpu": rec.get("environment", {}).get("gpu_name", "?"),
               "arch": spec.model_type, "model": case["model"], "predicted_phase": bd.peak_phase,
               "dtype_amp": _dtype_amp(case["precision"]),
               "lever": "+".join(k for k in ("liger", "packing", "activation_offloading") if case.get(k)) or "none",
               "loss": case.get("loss", "logits"),
               "gpu_total": rec.get("environment", {}).get("gpu_total_bytes"),
               "memory_fraction": case.get("memory_fraction")}
        meas = measured(rec)
        pred = {"allocated": bd.peak_allocated_bytes, "reserved": bd.peak_reserved_bytes, "device": bd.device_bytes}
        sim = (simulated or {}).get(sim_key(rec), {})
        row["source"] = "fitted reserve"
        # as `vramfit estimate --simulate-allocator` does
        if simulated is not None and "sim_reserved" in sim:
            outside = bd.device_bytes - bd.peak_reserved_bytes
            pred = {"allocated": sim["sim_allocated"], "reserved": sim["sim_reserved"],
                    "device": sim["sim_reserved"] + outside}
            row["source"] = "simulated allocator"
            row["replay_transformers"] = sim.get("replay_transformers")
        row["run_transformers"] = rec.get("environment", {}).get("versions", {}).get("transformers")
        for k in ("allocated", "reserved", "device"):
            row[f"pred_{k}"] = pred[k]
            row[f"meas_{k}"] = meas[k]
            row[f"err_{k}"] = (pred[k] - meas[k]) / meas[k] if rec["status"] == "ok" and meas[k] else None
        out.append(row)
    return out


def _pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))
    return xs[i]


def summarize(rs, key: str) -> dict:
    errs = [r[f"err_{key}"] for r in rs if r[f"err_{key}"] is not None]
    if not errs:
        return {"n": 0}
    a = [abs(e) for e in errs]
    return {"n": len(errs), "median": statistics.median(a), "p90": _pct(a, 0.9), "max": max(a),
            "under2": sum(e < -0.02 for e in errs) / len(errs), "bias": statistics.median(errs)}


def oom_check(rs) -> tuple[int, int]:
    """(OOM cases, of which predicted not to fit on the budget they ran under)."""
    n = ok = 0
    for r in rs:
        if r["status"] != "oom":
            continue
        n += 1
        budget = r["gpu_total"] * (r["memory_fraction"] or 1.0) if r["gpu_total"] else None
        if budget and r["pred_device"] > budget:
            ok += 1
    return n, ok


def markdown(rs) -> str:
    lines = ["| group | n | peak | median | p90 | max | under >2% |", "|---|---|---|---|---|---|---|"]
    from benchmarks.accuracy.fit_reserve import FIT_ARCHS

    groups = [("all", rs), ("reserve-fit archs", [r for r in rs if r["arch"] in FIT_ARCHS]),
              ("held-out archs", [r for r in rs if r["arch"] not in FIT_ARCHS])]
    groups += [(f"gpu={g}", [r for r in rs if r["gpu"] == g]) for g in sorted({r["gpu"] for r in rs})]
    if len({r["source"] for r in rs}) > 1:
        groups += [(s, [r for r in rs if r["source"] == s]) for s in sorted({r["source"] for r in rs})]
    groups += [(f"method={m}", [r for r in rs if r["method"] == m]) for m in ("full", "lora", "qlora")]
    groups += [(f"(dtype, amp)={d}", [r for r in rs if r["dtype_amp"] == d]) for d in sorted({r["dtype_amp"] for r in rs})]
    groups += [(f"arch={a}", [r for r in rs if r["arch"] == a]) for a in sorted({r["arch"] for r in rs})]
    if len({r.get("lever", "none") for r in rs}) > 1:  # issue 20's memory levers, each beside its baselines
        groups += [(f"lever={v}", [r for r in rs if r.get("lever") == v]) for v in sorted({r["lever"] for r in rs})]
        groups += [(f"lever={v}, loss={l}", [r for r in rs if (r.get("lever"), r.get("loss")) == (v, l)])
                   for v in sorted({r["lever"] for r in rs}) for l in ("logits", "fused")]
    for name, g in groups:
        for label, _ in PEAKS:
            s = summarize(g, label)
            if s["n"]:
                lines.append(f"| {name} | {s['n']} | {label} | {100 * s['median']:.2f}% | {100 * s['p90']:.2f}% | "
                             f"{100 * s['max']:.2f}% | {100 * s['under2']:.1f}% |")
    n, ok = oom_check(rs)
    lines.append("")
    lines.append(f"OOM cases predicted not to fit: {ok} of {n}")
    return "\n".join(lines)


def case_table(rs) -> str:
    lines = ["| case | status | phase | alloc pred/meas MiB | reserved pred/meas MiB | device pred/meas MiB | device err |",
             "|---|---|---|---|---|---|---|"]
    for r in rs:
        e = r["err_device"]
        lines.append(f"| {r['label']} | {r['status']} | {r['predicted_phase']} | {r['pred_allocated'] >> 20} / "
                     f"{(r['meas_allocated'] or 0) >> 20} | {r['pred_reserved'] >> 20} / {(r['meas_reserved'] or 0) >> 20} | "
                     f"{r['pred_device'] >> 20} / {(r['meas_device'] or 0) >> 20} | "
                     f"{'' if e is None else f'{100 * e:+.2f}%'} |")
    return "\n".join(lines)


def before_after(records, calibration: dict) -> str:
    """Device-peak accuracy on the calibration's GPU with the bundled constants and with its own."""
    gpu = calibration["key"].split("_")[0].replace("-", " ")
    mine = [r for r in records if r.get("environment", {}).get("gpu_name") == gpu]
    lines = [f"Cases measured on {gpu}: {len(mine)}; calibration {calibration['key']} ({calibration.get('date')})",
             "", "| constants | n | peak | median | p90 | max | under >2% |", "|---|---|---|---|---|---|---|"]
    for name, cal in (("bundled", None), ("calibrated", calibration)):
        rs = rows(mine, DEFAULT, cal)
        for label in ("allocated", "reserved", "device"):
            s = summarize(rs, label)
            if s["n"]:
                lines.append(f"| {name} | {s['n']} | {label} | {100 * s['median']:.2f}% | {100 * s['p90']:.2f}% | "
                             f"{100 * s['max']:.2f}% | {100 * s['under2']:.1f}% |")
    return "\n".join(lines)


def scatter(rs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    colors = {"full": "tab:red", "lora": "tab:blue", "qlora": "tab:green"}
    for ax, (label, _) in zip(axes, PEAKS):
        for m, c in colors.items():
            pts = [(r[f"meas_{label}"] / 2**30, r[f"pred_{label}"] / 2**30) for r in rs
                   if r["method"] == m and r["status"] == "ok" and r[f"meas_{label}"]]
            if pts:
                ax.scatter(*zip(*pts), s=14, c=c, label=m, alpha=0.8)
        lo = min([r[f"pred_{label}"] for r in rs] + [1 << 28]) / 2**30
        hi = max([r[f"pred_{label}"] for r in rs] + [1 << 30]) / 2**30
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {label} (GiB)")
        ax.set_ylabel(f"predicted {label} (GiB)")
        ax.set_title(f"peak {label}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- phases outside the steps

# measured phase (train_case.py's phases_outside_steps) -> the replayed phase it is compared with
MEASURED_PHASES = (("load", "load"), ("setup", "setup"), ("eval", "eval"), ("save", "save"),
                   ("load_best", "load_best"), ("save_model", "save"))


def _replay_run_phases(rec: dict) -> dict:
    """One measured run's phases replayed (in a fresh process: the model is built on the meta device):
    the load alone (steps=0) unless the run measured evaluation or saving, then two steps and the
    post-training stream (vramfit.memory.events.training_events, after=True)."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    import transformers

    from vramfit.memory.events import training_events
    from vramfit.memory.replay import replay_phases
    from vramfit.memory.setup import resolve_targets

    case = rec["case"]
    out = {"label": rec["label"], "method": case["method"], "replay_transformers": transformers.__version__}
    try:
        s = case_setup(case)
        spec = load_spec(case["model"], overrides=case.get("config_overrides") or None)
        outside = rec.get("phases_outside_steps") or {}
        post = "eval" in outside or "save" in outside
        ev = training_events(spec, s, resolve_targets(spec, s), steps=2 if post else 0, after=post,
                             eval_batch=case.get("eval_batch"), unused_reserved=unused_reserved(rec))
        parts = [(ev["events"], ev["marks"])] + ([(ev["after"]["events"], ev["after"]["marks"])] if post else [])
        res = replay_phases(parts, expandable=case.get("allocator") == "expandable")
    except Exception as exc:  # noqa: BLE001 - listed, not hidden
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return out
    out["phases"] = res["phases"]
    return out


def phase_rows(records, jobs: int = 1) -> list[dict]:
    """Measured against replayed peaks of the phases outside the training steps (loading, the Trainer's
    set-up, evaluation, saving): one row per run and phase, the errors relative to the measured figure."""
    import multiprocessing as mp

    recs = [r for r in records if r["status"] == "ok" and r.get("phases_outside_steps")]
    with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        replayed = pool.map(_replay_run_phases, recs, chunksize=1)
    out = []
    for rec, rep in zip(recs, replayed):
        if "error" in rep:
            print(f"no replay for {rec['label']}: {rep['error']}")
            continue
        for meas_name, sim_name in MEASURED_PHASES:
            m, p = rec["phases_outside_steps"].get(meas_name), rep["phases"].get(sim_name)
            if not m or not p or m.get("peak_allocated_bytes") is None:
                continue
            row = {"label": rec["label"], "method": rec["case"]["method"], "phase": meas_name,
                   "replay_transformers": rep["replay_transformers"],
                   "run_transformers": rec.get("environment", {}).get("versions", {}).get("transformers")}
            for k, mk, pk in (("allocated", "peak_allocated_bytes", "peak_allocated"),
                              ("reserved", "peak_reserved_bytes", "peak_reserved"),
                              ("allocated_end", "allocated_end_bytes", "allocated_end"),
                              ("reserved_end", "reserved_end_bytes", "reserved_end")):
                row[f"meas_{k}"], row[f"pred_{k}"] = m.get(mk), p.get(pk)
                row[f"err_{k}"] = (p[pk] - m[mk]) / m[mk] if m.get(mk) and p.get(pk) is not None else None
            out.append(row)
    return out


def phases_markdown(rows_) -> str:
    keys = ("allocated", "reserved", "allocated_end", "reserved_end")
    lines = ["| phase | runs | figure | median | p90 | max | under >2% | bias |", "|---|---|---|---|---|---|---|---|"]
    for phase, _ in MEASURED_PHASES:
        for method in ("all", "full", "lora", "qlora"):
            g = [r for r in rows_ if r["phase"] == phase and method in ("all", r["method"])]
            for k in keys:
                s = summarize(g, k)
                if s["n"]:
                    lines.append(f"| {phase} {method} | {s['n']} | {k} | {100 * s['median']:.2f}% | "
                                 f"{100 * s['p90']:.2f}% | {100 * s['max']:.2f}% | {100 * s['under2']:.1f}% | "
                                 f"{100 * s['bias']:+.2f}% |")
    lines += ["", "| run | phase | allocated pred/meas MiB | reserved pred/meas MiB | end allocated / reserved "
                  "pred/meas MiB |", "|---|---|---|---|---|"]
    for r in rows_:
        lines.append(f"| {r['label']} | {r['phase']} | {(r['pred_allocated'] or 0) >> 20} / "
                     f"{r['meas_allocated'] >> 20} | "
                     f"{(r['pred_reserved'] or 0) >> 20} / {r['meas_reserved'] >> 20} | "
                     f"{(r['pred_allocated_end'] or 0) >> 20} / {(r['meas_allocated_end'] or 0) >> 20}, "
                     f"{(r['pred_reserved_end'] or 0) >> 20} / {(r['meas_reserved_end'] or 0) >> 20} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*", help="JSONL files (default: benchmarks/results/*.jsonl)")
    ap.add_argument("--out", default=None, help="basename for the .md and .png (default: next to the first file)")
    ap.add_argument("--cases", action="store_true", help="print every case")
    ap.add_argument("--simulated", action="store_true",
                    help=f"peaks from the allocator simulation where {SIMULATED.name} has the case")
    ap.add_argument("--simulated-from", default=str(SIMULATED), help="the simulate_reserve results --simulated reads")
    ap.add_argument("--phases", action="store_true", help="the phases outside the steps (load, set-up, "
                    "evaluation, saving) measured against their replay (under the installed transformers: give "
                    "the runs of one version, e.g. PYTHONPATH=<a transformers 5.17 install>), and stop")
    ap.add_argument("--jobs", type=int, default=1, help="processes for --phases")
    ap.add_argument("--calibration", help="a `vramfit calibrate` JSON: report the cases measured on its GPU "
                                          "before and after applying it, and stop")
    args = ap.parse_args(argv)
    paths = args.results or sorted(glob.glob(str(RESULTS / "*.jsonl")))
    if args.phases:
        import transformers

        recs = [r for r in load_records(paths)
                if r.get("environment", {}).get("versions", {}).get("transformers") == transformers.__version__]
        print(phases_markdown(phase_rows(recs, args.jobs)))
        return
    if args.calibration:
        print(before_after(load_records(paths), json.loads(Path(args.calibration).read_text())))
        return
    simulated = json.loads(Path(args.simulated_from).read_text()) if args.simulated else None
    rs = rows(load_records(paths), simulated=simulated)
    md = markdown(rs)
    print(md)
    if args.cases:
        print()
        print(case_table(rs))
    out = Path(args.out) if args.out else RESULTS / "accuracy"
    versions = collections.Counter((r["run_transformers"], r["replay_transformers"]) for r in rs
                                   if r.get("replay_transformers"))
    replays = ("\n\nReplays (transformers of the run -> of the replay, runs): "
               + ", ".join(f"{a} -> {b}: {n}" for (a, b), n in sorted(versions.items()))) if versions else ""
    out.with_name(out.name + "-report.md").write_text(
        f"# Predicted vs measured\n\nSources: {', '.join(Path(p).name for p in paths)}{replays}\n\n{md}\n\n"
        f"{case_table(rs)}\n")
    scatter(rs, out.with_name(out.name + "-scatter.png"))


if __name__ == "__main__":
    main()
