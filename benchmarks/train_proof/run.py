"""The GPU proof of `vramfit train` (issue 5): full, LoRA and QLoRA runs of a ~1B and a ~7B model
(random init, 50 steps each) against their predictions, and the OOM fall-back triggered for real
under an enforced budget.  Everything it measured goes under --out:

    python3 -m benchmarks.train_proof.run --out "$OUT"                               # all runs
    python3 -m benchmarks.train_proof.run --out "$OUT" --runs 1b-oom-fallback 7b-full 7b-qlora --skip-done
    python3 -m benchmarks.train_proof.run --print-design                             # the OOM run's numbers
    python3 -m benchmarks.train_proof.run --out /tmp/tp --tiny                       # CPU dry run: tiny Llama

Each run is its own `vramfit train` process (so nvidia-smi's per-process figure is that run's
alone), with a per-run timeout inside one wall budget; the cheap runs come first.  After every run
its summary line is appended to OUT/train_proof.jsonl and OUT/train_proof.tgz is rewritten (run
reports, memory timelines and plots, logs; never weights), so a run that dies or a timeout loses
nothing done before it.  Resuming per run: --skip-done skips each run OUT/train_proof.jsonl already
has as completed (copy an earlier command's train_proof.jsonl into OUT first).
`python -m benchmarks.train_proof.report OUT [OUT2 ...]` merges them into the results.

Data.  The accuracy runs fix the method, the data and the effective batch (8 for ~1B, 4 for ~7B);
the planner chooses precision, optimizer, checkpointing and micro-batch for the probed GPU, as
`vramfit train` does for a user.  The rows' token lengths are log-normal (median ~180, sigma 0.8,
a long tail as in instruction data), --max-seq-len 512, so ~9% of the rows are truncated to 512:
the prediction's shape (the longest row, 512) is a micro-batch holding one of them, which has a
~1 - 0.91^4 = 31% chance per micro-batch of 4 (7B; 1B: 53% at 8); so the peak shape is reached in
the first steps and missed by all 50 with a chance below 1e-8 (the old data: 3% long rows).

OOM fall-back.  Its fixed setup (LoRA bf16-true, adamw_torch, micro-batch 16, no checkpointing,
seq 512) and the enforced `--gpu` budget are derived from the current memory model (trl's fused
loss, as `vramfit train` predicts): the smallest whole GiB budget whose allocator cap holds the
fall-back's first rung (micro-batch 8 x 2) with 20% to spare while the fixed setup's predicted
allocated peak exceeds the cap by at least 20%.  Its data are all long rows (every row is truncated
to 512), so step 1 already has the planned shape and runs out of memory inside its step; the
fall-back re-plans and restarts (no checkpoint yet).  In --tiny mode that OOM is injected at the
first batch wider than 500 tokens (step 1), since a CPU has no allocator to exhaust.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROWS, DATA_SEED = 2000, 1234
MAX_SEQ_LEN = 512  # the long rows are longer and truncated to it: max = p99 = 512
LENGTH_MEDIAN, LENGTH_SIGMA, LENGTH_MIN, LENGTH_MAX = 180, 0.8, 24, 900  # tokens per row, log-normal
MIN_LONG_FRACTION = 0.07  # at least this share of rows reaches MAX_SEQ_LEN (checked)
OOM_ROWS = 400  # the OOM run's data: every row longer than MAX_SEQ_LEN
OOM_FIXED = {"method": "lora", "precision": "bf16-true", "optim": "adamw_torch", "micro_batch": 16, "grad_accum": 1,
             "grad_ckpt": False}
OOM_MODEL = "llama-3.2-1b"
OOM_MARGIN = 0.2  # the fixed setup over the cap, and the fall-back's first rung under it, by at least this
WEIGHTS = ("model", "adapter", "checkpoints", "random-init")
KEEP = ("run_report.json", "run_setup.json", "memory_timeline.jsonl", "memory_timeline.png", "run.log")

# (name, model, extra args, per-run cap in seconds), cheapest first
OOM_ARGS = ["--method", "lora", "--precision", "bf16-true", "--optim", "adamw_torch", "--micro-batch", "16",
            "--grad-accum", "1", "--no-grad-ckpt", "--enforce-budget", "--no-fit-check", "--save-steps", "1",
            "--max-steps", "20"]  # + --gpu from oom_design()
# (name, model, extra args, per-run cap in seconds), cheapest first.  H100 2026-11-23: start-up of a
# run ~7 s (1B) to ~26 s (7B), 1B steps ~0.5 s, 7B LoRA ~0.7 s, 7B full ~0.55 s; 7B full also
# writes its 14 GB model at the end; 7B QLoRA writes a 14 GB random checkpoint, then quantizes it.
# The runs predict with --simulate-allocator (25 steps of the data's own batch lengths replayed
# through the allocator model: 10 s for 1B and 31 s for 7B on the 2-core CPU machine); the report also
# recomputes the fast model's prediction ("now").
SIM = ["--simulate-allocator"]
GPU_RUNS = [
    ("1b-lora", "llama-3.2-1b", ["--method", "lora", "--effective-batch", "8", *SIM], 110),
    ("1b-full", "llama-3.2-1b", ["--method", "full", "--effective-batch", "8", *SIM], 110),
    ("1b-qlora", "llama-3.2-1b", ["--method", "qlora", "--effective-batch", "8", *SIM], 120),
    ("1b-oom-fallback", OOM_MODEL, OOM_ARGS, 120),
    ("7b-lora", "mistral-7b-v0.1", ["--method", "lora", "--effective-batch", "4", *SIM], 180),
    ("7b-full", "mistral-7b-v0.1", ["--method", "full", "--effective-batch", "4", *SIM], 260),
    ("7b-qlora", "mistral-7b-v0.1", ["--method", "qlora", "--effective-batch", "4", *SIM], 300),
    # vramfit train's allocator is expandable segments unless PYTORCH_CUDA_ALLOC_CONF says otherwise
    # (since 2026-11-23); these pin the default allocator for the comparison (1b-lora and 7b-lora
    # of 2026-11-23's first call ran with it, before that change)
    ("1b-lora-default-allocator", "llama-3.2-1b", ["--method", "lora", "--effective-batch", "8", "--allocator",
                                                   "default"], 90),
    ("7b-lora-default-allocator", "mistral-7b-v0.1", ["--method", "lora", "--effective-batch", "4", "--allocator",
                                                      "default"], 120),
]
TINY_FIXED = ["--precision", "32-true", "--optim", "adamw_torch", "--micro-batch", "4", "--grad-accum", "1",
              "--no-grad-ckpt"]
TINY_RUNS = [
    ("tiny-lora", "TINY", ["--method", "lora", *TINY_FIXED, "--max-steps", "3"], 120),
    ("tiny-full", "TINY", ["--method", "full", *TINY_FIXED, "--max-steps", "3"], 120),
    ("tiny-qlora", "TINY", ["--method", "qlora", *TINY_FIXED, "--precision", "bf16-true", "--max-steps", "3"], 120),  # refused on CPU
    ("tiny-oom-fallback", "TINY",
     ["--method", "lora", "--precision", "32-true", "--optim", "adamw_torch", "--micro-batch", "16", "--grad-accum",
      "1", "--no-grad-ckpt", "--save-steps", "1", "--max-steps", "6"], 300),
]


# --------------------------------------------------------------------------- inputs


def _rows(rng, lengths: list, words) -> list:
    """Alpaca rows of about `lengths` tokens each (~40 go to the prompt template and <eos>)."""
    rows = []
    for n in lengths:
        ws = [rng.choice(words) for _ in range(max(8, n - 40))]
        k = max(4, min(40, len(ws) // 4))
        rows.append({"instruction": " ".join(ws[:k]), "input": "", "output": " ".join(ws[k:])})
    return rows


def _measure(path: Path, tok) -> tuple[dict, list]:
    from vramfit.run.data import prepare, token_lengths

    d = prepare(str(path), tok, max_seq_len=MAX_SEQ_LEN, val_split=0)
    return vars(d.lengths) | {"seq_len": d.seq_len}, token_lengths(d.train.rows, d.train.format, tok)


def build_inputs(work: Path) -> dict:
    """The tokenizer directory (tests/tiny_lm's word-level tokenizer) and two Alpaca JSONL files, fixed
    seed: the accuracy runs' ROWS rows of log-normal length (median LENGTH_MEDIAN tokens), and the OOM
    run's OOM_ROWS rows, all longer than MAX_SEQ_LEN."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tiny_lm import WORDS, llama_config, make_tokenizer

    tok_dir, data, oom = work / "tokenizer", work / "alpaca.jsonl", work / "oom.jsonl"
    tok = make_tokenizer()
    tok.save_pretrained(tok_dir)
    rng = random.Random(DATA_SEED)
    lengths = [min(LENGTH_MAX, max(LENGTH_MIN, round(rng.lognormvariate(math.log(LENGTH_MEDIAN), LENGTH_SIGMA))))
               for _ in range(ROWS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(rng, lengths, WORDS)))
    oom.write_text("".join(json.dumps(r) + "\n" for r in
                           _rows(rng, [rng.randint(MAX_SEQ_LEN + 60, MAX_SEQ_LEN + 160) for _ in range(OOM_ROWS)],
                                 WORDS)))
    stats, each = _measure(data, tok)
    oom_stats, oom_each = _measure(oom, tok)
    long_rows = sum(1 for n in each if n >= MAX_SEQ_LEN)
    info = {"rows": ROWS, "seed": DATA_SEED, "lengths": f"log-normal, median {LENGTH_MEDIAN}, sigma {LENGTH_SIGMA}",
            "token_lengths": stats, "long_rows": long_rows, "long_fraction": round(long_rows / ROWS, 4),
            "seq_len": stats["seq_len"],
            "oom_data": {"rows": OOM_ROWS, "token_lengths": oom_stats,
                         "shortest": min(oom_each), "seq_len": oom_stats["seq_len"]}}
    if (stats["seq_len"] != MAX_SEQ_LEN or long_rows / ROWS < MIN_LONG_FRACTION or min(oom_each) <= MAX_SEQ_LEN
            or oom_stats["seq_len"] != MAX_SEQ_LEN):
        raise SystemExit(f"the data is not as designed: {info}")
    tiny = work / "tiny-config"
    llama_config(tok).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    return {"tokenizer": str(tok_dir), "data": str(data), "oom_data": str(oom), "tiny": str(tiny),
            "data_info": info}


def oom_design(constants=None) -> dict:
    """The OOM run's --gpu from the current memory model: the smallest whole GiB whose allocator cap
    (--headroom 5%, less the CUDA context) holds the fall-back's first rung with OOM_MARGIN to spare,
    checked against the fixed setup's predicted allocated peak exceeding the cap by OOM_MARGIN."""
    from vramfit.memory.setup import Setup
    from vramfit.run.fallback import allocator_cap_bytes, fallback_ladder
    from vramfit.run.model import resolve_model
    from vramfit.run.predict import predict

    spec = resolve_model(OOM_MODEL, "random").spec
    fixed = Setup(**OOM_FIXED, seq_len=MAX_SEQ_LEN, loss="fused")
    rung = fallback_ladder(fixed)[0]
    p_fixed, p_rung = predict(spec, fixed, constants), predict(spec, rung, constants)
    for gib in range(4, 80):
        cap = allocator_cap_bytes(f"{gib}GiB", "5%", constants)
        if p_rung["peak_reserved_bytes"] <= (1 - OOM_MARGIN) * cap:
            break
    over = p_fixed["peak_allocated_bytes"] / cap - 1
    if over < OOM_MARGIN:
        raise SystemExit(f"no budget makes the fixed setup clearly exceed the cap: {gib} GiB, over by {over:.1%}")
    g = 2**30
    return {"gpu": f"{gib}GiB", "allocator_cap_gib": round(cap / g, 3),
            "fixed": {"setup": "LoRA bf16-true adamw_torch 16x1 no-ckpt seq 512 (fused loss)",
                      "predicted_allocated_gib": round(p_fixed["peak_allocated_bytes"] / g, 3),
                      "predicted_reserved_gib": round(p_fixed["peak_reserved_bytes"] / g, 3),
                      "over_cap": round(over, 3)},
            "fallback_first_rung": {"setup": f"micro-batch {rung.micro_batch} x {rung.grad_accum}, ckpt {rung.grad_ckpt}",
                                    "predicted_allocated_gib": round(p_rung["peak_allocated_bytes"] / g, 3),
                                    "predicted_reserved_gib": round(p_rung["peak_reserved_bytes"] / g, 3),
                                    "reserved_share_of_cap": round(p_rung["peak_reserved_bytes"] / cap, 3)}}


def environment() -> dict:
    """GPU, driver, CUDA and package versions, read in child processes (no CUDA context here)."""
    env = {"host_cpus": os.cpu_count()}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        env["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    code = ("import json, torch; from vramfit.run.outputs import versions; "
            "print(json.dumps({'versions': versions(), 'torch_cuda': torch.version.cuda, 'python': "
            "__import__('sys').version.split()[0]}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    try:
        env.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        env["versions_error"] = (r.stderr or r.stdout)[-500:]
    return env


# --------------------------------------------------------------------------- one run


def command(name: str, model: str, extra: list, inputs: dict, out: Path, tiny: bool) -> list:
    oom_run = name.endswith("oom-fallback")
    args = ["train", inputs["tiny"] if model == "TINY" else model, inputs["oom_data" if oom_run else "data"],
            "--init", "random",
            "--tokenizer", inputs["tokenizer"], "--out", str(out), "--max-seq-len", str(MAX_SEQ_LEN),
            "--val-split", "0", "--save-steps", "0", "--max-steps", "50", "--seed", "42"]
    args += extra  # later options win (typer keeps the last), so a run may override the defaults
    if oom_run and not tiny:
        args += ["--gpu", inputs["oom_design"]["gpu"]]
    if oom_run and tiny:  # injected at the first batch of the planned shape (step 1: every row is long)
        return [sys.executable, "-m", "benchmarks.train_proof.inject", "--oom-above", str(MAX_SEQ_LEN - 12), "--",
                *args]
    return [sys.executable, "-c", "from vramfit.cli import main; main()", *args]


def run_one(name: str, cmd: list, out: Path, timeout: float) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(p.pid, signal.SIGTERM)
            try:
                rc = p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc = p.wait()
    wall = time.perf_counter() - t0
    if out.is_dir():
        shutil.copy(log, out / "run.log")
        for w in WEIGHTS:
            shutil.rmtree(out / w, ignore_errors=True)
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(wall, 1), "log": log}


def timeline_facts(path: Path) -> dict:
    """Peaks of the last setup and tokens/s between its first and last logged step, from the timeline."""
    from benchmarks.jsonl import records

    if not path.is_file():
        return {}
    recs = records(path)
    setups = [i for i, r in enumerate(recs) if r.get("kind") == "event" and r.get("message") == "setup"]
    last = recs[setups[-1]:] if setups else recs
    peaks = {}
    for k in ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes"):
        vals = [r[k] for r in last if isinstance(r.get(k), int)]
        peaks[k] = max(vals) if vals else None
    logs = [r for r in last if r.get("kind") == "log" and isinstance(r.get("num_input_tokens_seen"), (int, float))]
    rate = None
    if len(logs) >= 2 and logs[-1]["t"] > logs[0]["t"]:
        rate = (logs[-1]["num_input_tokens_seen"] - logs[0]["num_input_tokens_seen"]) / (logs[-1]["t"] - logs[0]["t"])
    steps = [r["step"] for r in recs if r.get("kind") == "step_end"]
    return {"timeline_peaks": peaks, "tokens_per_s": round(rate, 1) if rate else None,
            "timeline_last_step": max(steps) if steps else None}


def summary_line(name: str, model: str, out: Path, res: dict, env: dict) -> dict:
    rep_path = out / "run_report.json"
    rep = json.loads(rep_path.read_text()) if rep_path.is_file() else None
    facts = timeline_facts(out / "memory_timeline.jsonl")
    line = {"run": name, "model": model, "rc": res["rc"], "timed_out": res["timed_out"], "wall_s": res["wall_s"],
            **facts}
    if rep is None:
        tail = res["log"].read_text()[-1500:] if res["log"].is_file() else ""
        line.update(status="timeout" if res["timed_out"] else "error", error_tail=tail)
    else:
        m = rep["measured"]
        line.update(status=rep["status"], steps=rep["steps"], max_steps=rep["max_steps"], setup=rep["setup"],
                    initial_setup=rep["initial_setup"], predicted=rep["predicted"], measured=m["measured"],
                    relative_error=m["relative_error"], device_bytes_source=m.get("device_bytes_source"),
                    capacity_bytes=m.get("capacity_bytes"), allocator_limit_bytes=m.get("allocator_limit_bytes"),
                    enforced_budget=rep.get("enforced_budget"), seq_len=rep["data"]["seq_len"],
                    attempts=[{"setup": a["setup"], "outcome": a["outcome"], "last_step": a["last_step"],
                               "predicted": {k: a["predicted"][k] for k in
                                             ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes")},
                               "measured": a["measured"]} for a in rep["attempts"]],
                    fallbacks=rep["fallbacks"], train_seconds=rep["train_seconds"], tokens_seen=rep["tokens_seen"],
                    final_loss=rep["final_loss"], versions=rep["versions"])
    line["environment"] = {k: env.get(k) for k in ("nvidia_smi", "torch_cuda", "python")}
    return line


def pack(out: Path, work: Path, names: list, extra: list) -> None:
    """OUT/train_proof.tgz: each run's KEEP files and logs, plus `extra` files; written atomically."""
    tmp = out / "train_proof.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in names:
            d = work / "runs" / name
            for f in KEEP:
                if (d / f).is_file():
                    tar.add(d / f, arcname=f"train_proof/{name}/{f}")
            log = work / "runs" / f"{name}.log"
            if not (d / "run.log").is_file() and log.is_file():
                tar.add(log, arcname=f"train_proof/{name}/run.log")
        for f in extra:
            if Path(f).is_file():
                tar.add(f, arcname=f"train_proof/{Path(f).name}")
    tmp.replace(out / "train_proof.tgz")


# --------------------------------------------------------------------------- the driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results: train_proof.jsonl, train_proof.tgz, driver.log")
    ap.add_argument("--work", default=None, help="run directories (weights deleted after each run) "
                    "[default: a new folder in $TMPDIR]")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: a tiny random Llama, 3 steps, OOM injected")
    ap.add_argument("--budget-s", type=float, default=400.0, help="wall budget for everything (seconds)")
    ap.add_argument("--only", default=None, help="comma list of run names to do (default: all)")
    ap.add_argument("--runs", nargs="+", help="run names to do, in the listed order of GPU_RUNS (default: all)")
    ap.add_argument("--skip-done", action="store_true",
                    help="skip the runs OUT/train_proof.jsonl already has as completed")
    ap.add_argument("--print-design", action="store_true", help="print the OOM run's budget and predictions, run nothing")
    a = ap.parse_args(argv)
    if a.print_design:
        print(json.dumps(oom_design(), indent=1))
        return 0
    if not a.out:
        ap.error("--out is required")
    t_start = time.perf_counter()
    deadline = t_start + a.budget_s
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(os.environ.get("TMPDIR", "/tmp")) / f"vramfit-train-proof-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    dlog = (out / "driver.log").open("a")

    def say(msg: str) -> None:
        line = f"[{time.perf_counter() - t_start:6.1f}s] {msg}"
        print(line, flush=True)
        dlog.write(line + "\n")
        dlog.flush()

    inputs = build_inputs(work)
    say(f"data: {json.dumps(inputs['data_info'])}")
    if not a.tiny:
        inputs["oom_design"] = oom_design()
        say(f"OOM run design (current memory model): {json.dumps(inputs['oom_design'])}")
    env = environment()
    env["data"] = inputs["data_info"]
    env["mode"] = "tiny (CPU dry run)" if a.tiny else "gpu"
    env["oom_design"] = inputs.get("oom_design")
    (work / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    say(f"environment: {json.dumps(env)}")
    runs = TINY_RUNS if a.tiny else GPU_RUNS
    keep = set(a.runs or []) | set(a.only.split(",") if a.only else [])
    if keep:
        unknown = keep - {r[0] for r in runs}
        if unknown:
            raise SystemExit(f"unknown runs {sorted(unknown)}; there are {[r[0] for r in runs]}")
        runs = [r for r in runs if r[0] in keep]
    summary = out / "train_proof.jsonl"
    if a.skip_done and summary.is_file():
        from benchmarks.jsonl import records

        completed = {r["run"] for r in records(summary) if r.get("status") == "completed"}
        for name in [r[0] for r in runs if r[0] in completed]:
            say(f"{name}: completed before, skipped (--skip-done)")
        runs = [r for r in runs if r[0] not in completed]
    done = []
    for name, model, extra, cap in runs:
        left = deadline - time.perf_counter() - 10  # packing the last results
        if left < 20:
            say(f"{name}: skipped, {left:.0f} s left of the budget")
            line = {"run": name, "model": model, "status": "skipped (out of time)"}
        else:
            rdir = work / "runs" / name
            cmd = command(name, model, extra, inputs, rdir, a.tiny)
            free = shutil.disk_usage(work).free
            say(f"{name}: start (timeout {min(cap, left):.0f} s, disk free {free / 2**30:.1f} GiB)")
            res = run_one(name, cmd, rdir, min(cap, left))
            line = summary_line(name, model, rdir, res, env)
            oom_run = name.endswith("oom-fallback")
            line["data"] = {"file": Path(inputs["oom_data" if oom_run else "data"]).name,
                            **({"rows": OOM_ROWS, "all_longer_than_max_seq_len": True} if oom_run else
                               {k: inputs["data_info"][k] for k in ("rows", "lengths", "long_fraction")})}
            if oom_run and inputs.get("oom_design"):
                line["oom_design"] = inputs["oom_design"]
            done.append(name)
            err = (line.get("relative_error") or {}).get("device_bytes")
            say(f"{name}: {line['status']} rc={res['rc']} {res['wall_s']} s, steps {line.get('steps')}, "
                f"device error {err}, fallbacks {len(line.get('fallbacks') or [])}, tokens/s {line.get('tokens_per_s')}")
        with summary.open("a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        pack(out, work, done, [str(work / "environment.json"), str(summary), str(out / "driver.log")] +
             ([str(work / "tiny-config" / "config.json")] if a.tiny else []))
    say(f"done in {time.perf_counter() - t_start:.0f} s")
    dlog.close()
    pack(out, work, done, [str(work / "environment.json"), str(summary), str(out / "driver.log")] +
         ([str(work / "tiny-config" / "config.json")] if a.tiny else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
