"""Results of the `vramfit train` GPU proof (benchmarks/train_proof/run.py) -> benchmarks/results/.

    python -m benchmarks.train_proof.report OUT_DIR_OR_TGZ [MORE ...] [--name h100-2026-11-23-train-proof]

Several sources (the OUT of each command, their .tgz, or an already unpacked results folder such as
benchmarks/results/h100-2026-11-23-train-proof/) are merged in order: per run the last line with a
result counts (a later "skipped" line does not replace an earlier result).

Unpacks the run reports, memory timelines and plots into benchmarks/results/NAME/ and writes
benchmarks/results/NAME.md: per run the setup, outcome, tokens/s and fall-back events; per setup
tried, the three peaks predicted (by the run itself, and recomputed now from the recorded setup with
the current memory model) against measured, with the error (predicted - measured) / measured; and
the device figure's errors against the accuracy targets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
from pathlib import Path

from vramfit.report import fmt_bytes, setup_label_from_json

RESULTS = Path(__file__).resolve().parents[1] / "results"
PEAKS = (("peak_allocated_bytes", "allocated"), ("peak_reserved_bytes", "reserved"), ("device_bytes", "device"))
# Targets on the device figure (nvidia-smi for the process), from the project's accuracy goals.
TARGETS = {"median": 0.015, "p90": 0.03, "max": 0.06, "under_2pct_share": 0.02}


def unpack(src: Path, dest: Path) -> list:
    """OUT dir (with train_proof.tgz), the .tgz itself, or an unpacked results folder -> its files
    copied into dest (the archive's train_proof/ folder); returns its summary lines."""
    dest.mkdir(parents=True, exist_ok=True)
    tgz = src if src.is_file() else src / "train_proof.tgz"
    summary = b""
    if tgz.is_file():
        with tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                if not m.isfile() or ".." in Path(m.name).parts or not m.name.startswith("train_proof/"):
                    continue
                rel = Path(m.name).relative_to("train_proof")
                data = tar.extractfile(m).read()
                if str(rel) == "train_proof.jsonl":
                    summary = data
                    continue
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                (dest / rel).write_bytes(data)
    else:  # an unpacked folder
        for f in src.rglob("*"):
            rel = f.relative_to(src)
            if f.is_file() and str(rel) != "train_proof.jsonl" and src.resolve() != dest.resolve():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                (dest / rel).write_bytes(f.read_bytes())
    if src.is_dir() and (src / "train_proof.jsonl").is_file():  # the newest summary, if the archive is older
        summary = (src / "train_proof.jsonl").read_bytes()
    return [x for x in summary.decode().splitlines() if x.strip()]


def merged(lines: list) -> list:
    """One line per run, in first-seen order: the last with a result (not a skip)."""
    out: dict = {}
    for r in lines:
        if r["run"] in out and str(r.get("status", "")).startswith("skipped"):
            continue
        out[r["run"]] = r
    return list(out.values())


def recompute(model: str, setup: dict, bundle: Path, padded: bool = True) -> dict | None:
    """The three peaks of `setup` as the memory model predicts them now (default constants).
    `padded`: for runs recorded before Setup had the field, whether their batches were padded
    (every proof data set but the OOM run's, whose rows are all cut to the same length)."""
    from vramfit.errors import VramfitError
    from vramfit.memory.setup import Setup
    from vramfit.model.spec import spec_from_config
    from vramfit.run.model import resolve_model
    from vramfit.run.predict import predict

    try:
        spec = resolve_model(model, "random").spec
    except VramfitError:
        cfg = bundle / "config.json"  # the --tiny dry run's model
        if not cfg.is_file():
            return None
        spec = spec_from_config("tiny-llama", json.loads(cfg.read_text()))
    fields = {k: v for k, v in setup.items() if k in Setup.__dataclass_fields__}
    # runs recorded before Setup had `loss` trained with trl 1.16's SFTTrainer, whose fused LM head
    # is always on (what `vramfit train` now predicts with)
    fields.setdefault("loss", "fused")
    fields.setdefault("padded", padded)
    return predict(spec, Setup(**fields))


def err(p, m) -> float | None:
    return (p - m) / m if p and m else None


def pct(e: float | None) -> str:
    return "-" if e is None else f"{100 * e:+.1f}%"


def gib(n) -> str:
    return "-" if n is None else fmt_bytes(n).replace(" GiB", "")


def target_line(errors: list, label: str) -> str:
    if not errors:
        return f"- {label}: no finished setup with a device reading"
    a = sorted(abs(e) for e in errors)
    p90 = a[min(len(a) - 1, round(0.9 * (len(a) - 1)))]
    under = sum(1 for e in errors if e < -0.02)
    ok = (statistics.median(a) <= TARGETS["median"] and p90 <= TARGETS["p90"] and a[-1] <= TARGETS["max"]
          and under / len(errors) <= TARGETS["under_2pct_share"])
    return (f"- {label} (n = {len(errors)}): median |error| {100 * statistics.median(a):.2f}% (target <= 1.5%), "
            f"p90 {100 * p90:.2f}% (<= 3%), max {100 * a[-1]:.2f}% (<= 6%), under-predicted by more than 2%: "
            f"{under} of {len(errors)} (<= 2% of cases) -> {'within' if ok else 'NOT within'} the targets")


def build(bundle: Path, name: str) -> str:
    lines = merged([json.loads(x) for x in (bundle / "train_proof.jsonl").read_text().splitlines() if x.strip()])
    env = json.loads((bundle / "environment.json").read_text()) if (bundle / "environment.json").is_file() else {}
    v = env.get("versions") or {}
    out = [f"# `vramfit train` proof: {name}", "",
           f"Machine: {env.get('nvidia_smi', '?')} (nvidia-smi: name, driver, memory); CUDA (torch) "
           f"{env.get('torch_cuda')}, Python {env.get('python')}; "
           + ", ".join(f"{k} {v.get(k)}" for k in ("torch", "transformers", "peft", "trl", "bitsandbytes",
                                                   "accelerate", "datasets")) + ".",
           f"Mode: {env.get('mode', '?')}.  Data: {json.dumps(env.get('data'))}.",
           "Produced by `benchmarks/train_proof/run.py` (each run one `vramfit train --init random` process); "
           "this page by `python -m benchmarks.train_proof.report`.  Timelines, plots and run reports: "
           f"`benchmarks/results/{name}/`.", "",
           "## Runs", "",
           "| run | model | setup (final) | status | steps | wall s | tokens/s | fall-back events |",
           "|---|---|---|---|---|---|---|---|"]
    for r in lines:
        fb = "; ".join(f"step {f['step']}: OOM ({f['error'][:80]}) -> {setup_label_from_json(f['setup_after'])}, "
                       f"{'resumed from ' + Path(f['resumed_from']).name if f.get('resumed_from') else 'restarted'}"
                       for f in r.get("fallbacks") or []) or "-"
        setup = setup_label_from_json(r["setup"]) if r.get("setup") else "-"
        if not r.get("setup") and r.get("error_tail"):  # why it did not run: the CLI's one error line
            said = [x for x in r["error_tail"].splitlines() if x.startswith("vramfit:")]
            if said:
                setup = said[-1][:160].replace("|", "/")
            elif r.get("status") == "timeout":
                setup = f"(killed at the time limit after step {r.get('timeline_last_step', '?')}; no run report)"
        out.append(f"| {r['run']} | {r['model']} | {setup} | {r['status']} | {r.get('steps', '-')}/"
                   f"{r.get('max_steps', '-')} | {r.get('wall_s', '-')} | {r.get('tokens_per_s') or '-'} | {fb} |")
    out += ["", "## Peaks: predicted vs measured (GiB; error = (predicted - measured) / measured)", "",
            "\"run\": the prediction the run made and recorded; \"now\": recomputed from the recorded setup with "
            "the memory model of this commit.  A setup that ran out of memory has only a partial measurement.", "",
            "| run | setup | outcome | peak | predicted (run) | predicted (now) | measured | error (run) | error (now) |",
            "|---|---|---|---|---|---|---|---|---|"]
    dev_run, dev_now = [], []
    for r in lines:
        for a in r.get("attempts") or []:
            now = recompute(r["model"], a["setup"], bundle,
                            padded=not (r.get("data") or {}).get("all_longer_than_max_seq_len", False))
            for key, label in PEAKS:
                p, m = a["predicted"].get(key), (a["measured"] or {}).get(key)
                q = now[key] if now else None
                out.append(f"| {r['run']} | {setup_label_from_json(a['setup'])} | {a['outcome']} | {label} | {gib(p)} | "
                           f"{gib(q)} | {gib(m)} | {pct(err(p, m))} | {pct(err(q, m))} |")
                if key == "device_bytes" and a["outcome"] == "finished" and m:
                    dev_run.append(err(p, m))
                    if q:
                        dev_now.append(err(q, m))
    out += ["", "## Device figure against the accuracy targets (finished setups only)", "",
            target_line(dev_run, "predicted by the run"), target_line(dev_now, "recomputed now"), ""]
    data = [r for r in lines if r.get("data")]
    if data:
        out.append("Data per run: " + "; ".join(f"{r['run']}: {json.dumps(r['data'])}" for r in data) + ".")
    for r in lines:
        if r.get("oom_design"):
            out.append(f"OOM run design (memory model of the run's commit): {json.dumps(r['oom_design'])}.")
    out += checks_section(lines) + budget_section(lines)
    sources = {r.get("device_bytes_source") for r in lines if r.get("device_bytes_source")}
    if sources:
        out.append(f"Device figure source (tracker): {', '.join(sorted(sources))}.")
    enforced = [r for r in lines if r.get("enforced_budget")]
    for r in enforced:
        e = r["enforced_budget"]
        out.append(f"Enforced budget in {r['run']}: --gpu {e['gpu']} (headroom {e['headroom']}) -> allocator "
                   f"capped at {gib(e['allocator_cap_bytes'])} GiB = {e['fraction']:.4f} of "
                   f"{gib(e['device_total_bytes'])} GiB (set_per_process_memory_fraction).")
    return "\n".join(out) + "\n"


def checks_section(lines: list) -> list:
    """The mid-run OOM runs' pass/fail checks (run.py's midrun_checks: issue 20 item 5)."""
    out = []
    for r in lines:
        if "checks" not in r:
            continue
        d = r.get("midrun_design") or {}
        ok = all(c["ok"] for c in r["checks"])
        out += ["", f"## {r['run']}: nothing lost when the plan is wrong -> {'PASS' if ok else 'FAIL'}", "",
                f"Budget --gpu {d.get('gpu')} enforced (allocator cap {d.get('allocator_cap_gib')} GiB); rows sorted "
                f"short to long (--sampling sequential), batch widths per step {d.get('batch_max_per_step')}; "
                f"checkpoints every {d.get('save_steps')} steps; predicted: OOM at step {d.get('predicted_oom_step')} "
                f"(width {d.get('predicted_oom_width')}), resumed from "
                f"checkpoint-{d.get('predicted_resume_checkpoint')}.",
                ""]
        out += [f"- {'PASS' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}" for c in r["checks"]]
    return out


def budget_section(lines: list) -> list:
    """The enforced-budget runs at 2,048 tokens: outcome, peaks against the budget and the prediction,
    MFU, and how their shared random checkpoint was written."""
    runs = [r for r in lines if "budget" in r]
    if not runs:
        return []
    out = ["", "## Enforced budgets at 2,048 tokens (peaks in GiB: measured / predicted)", "",
           "| run | status | setup | budget: usable / allocator cap | allocated | reserved | device | within | MFU |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        b = r["budget"]
        if "peaks_gib" not in b:
            said = (b.get("budget_outcome") or "no budget enforced (--tiny: a CPU)").replace("|", "/")
            out.append(f"| {r['run']} | {r.get('status')} | {said[:300]} | - | - | - | - | - | - |")
            continue
        pk = b["peaks_gib"]
        cell = lambda k: f"{pk[k]['measured']} / {pk[k]['predicted']}"  # noqa: E731
        mfu = b.get("mfu", {}).get("mfu")
        label = setup_label_from_json(r["setup"]) if r.get("setup") else "-"
        out.append(f"| {r['run']} | {r.get('status')} | {label} | "
                   f"{b['budget']}: {b['usable_gib']} / {b['allocator_cap_gib']} | {cell('peak_allocated_bytes')} | "
                   f"{cell('peak_reserved_bytes')} | {cell('device_bytes')} ({b.get('device_bytes_source')}) | "
                   f"{'yes' if b.get('within_budget') else 'NO'} | {f'{100 * mfu:.1f}%' if mfu else '-'} |")
    bg = next((r["background"] for r in runs if r.get("background")), None)
    if bg:
        out += ["", f"Made before these runs, with no GPU visible (CUDA_VISIBLE_DEVICES empty): {json.dumps(bg)}."]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="+", help="the proof's OUT directories, their train_proof.tgz, or results folders")
    ap.add_argument("--name", default="h100-2026-11-23-train-proof")
    ap.add_argument("--results", default=str(RESULTS), help="where NAME/ and NAME.md go")
    a = ap.parse_args(argv)
    results = Path(a.results)
    dest = results / a.name
    lines = []
    for src in a.src:
        lines += unpack(Path(src), dest)
    (dest / "train_proof.jsonl").write_text("".join(x + "\n" for x in lines))
    bundle = dest
    md = build(bundle, a.name)
    (results / f"{a.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
