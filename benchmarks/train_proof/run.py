"""The GPU proof of `vramfit train` (issue 5): full, LoRA and QLoRA runs of a ~1B and a ~7B model
(random init, 50 steps each) against their predictions, and the OOM fall-back triggered for real
under an enforced budget.  One command on the GPU machine, everything it measured under --out:

    python3 -m benchmarks.train_proof.run --out "$OUT"            # H100: ~5-6 min, --budget-s caps it
    python3 -m benchmarks.train_proof.run --out /tmp/tp --tiny    # CPU dry run: tiny Llama, 3 steps

Each run is its own `vramfit train` process (so nvidia-smi's per-process figure is that run's
alone), with a per-run timeout inside one wall budget; the cheap runs come first.  After every run
its summary line is appended to OUT/train_proof.jsonl and OUT/train_proof.tgz is rewritten (run
reports, memory timelines and plots, logs; never weights), so a run that dies or a timeout loses
nothing done before it.  `python -m benchmarks.train_proof.report OUT` turns them into the results.

The accuracy runs fix the method, the data (so seq_len = the longest row, 512) and the effective
batch (8 for ~1B, 4 for ~7B); the planner chooses precision, optimizer, checkpointing and
micro-batch for the probed GPU, as `vramfit train` does for a user.  The OOM run fixes a setup that
cannot fit an emulated 24 GiB card (`--gpu 24GiB --enforce-budget --no-fit-check`: LoRA, micro-batch
16, no checkpointing): batches of the short rows (<= 320 tokens) fit, the first batch holding a
512-token row runs out of memory inside its step; the fall-back re-plans and resumes from the last
per-step checkpoint.  In --tiny mode that OOM is injected at the same batch (the same data, seed
and micro-batch give the same order), since a CPU has no allocator to exhaust.
"""

from __future__ import annotations

import argparse
import json
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
SHORT_MAX = 320  # every other row has at most this many tokens (the OOM run's batches that fit)
LONG_FRACTION = 0.03
OOM_GPU = "24GiB"  # the emulated card of the OOM run
WEIGHTS = ("model", "adapter", "checkpoints", "random-init")
KEEP = ("run_report.json", "run_setup.json", "memory_timeline.jsonl", "memory_timeline.png", "run.log")

# (name, model, extra args, per-run cap in seconds), cheapest first
GPU_RUNS = [
    ("1b-lora", "llama-3.2-1b", ["--method", "lora", "--effective-batch", "8"], 75),
    ("1b-full", "llama-3.2-1b", ["--method", "full", "--effective-batch", "8"], 75),
    ("1b-qlora", "llama-3.2-1b", ["--method", "qlora", "--effective-batch", "8"], 90),
    ("1b-oom-fallback", "llama-3.2-1b",
     ["--method", "lora", "--precision", "bf16-true", "--optim", "adamw_torch", "--micro-batch", "16",
      "--grad-accum", "1", "--no-grad-ckpt", "--gpu", OOM_GPU, "--enforce-budget", "--no-fit-check",
      "--save-steps", "1", "--max-steps", "20"], 90),
    ("7b-lora", "mistral-7b-v0.1", ["--method", "lora", "--effective-batch", "4"], 100),
    ("7b-full", "mistral-7b-v0.1", ["--method", "full", "--effective-batch", "4"], 130),
    ("7b-qlora", "mistral-7b-v0.1", ["--method", "qlora", "--effective-batch", "4"], 400),
]
TINY_FIXED = ["--precision", "32-true", "--optim", "adamw_torch", "--micro-batch", "4", "--grad-accum", "1",
              "--no-grad-ckpt"]
TINY_RUNS = [
    ("tiny-lora", "TINY", ["--method", "lora", *TINY_FIXED, "--max-steps", "3"], 120),
    ("tiny-full", "TINY", ["--method", "full", *TINY_FIXED, "--max-steps", "3"], 120),
    ("tiny-qlora", "TINY", ["--method", "qlora", *TINY_FIXED, "--precision", "bf16-true", "--max-steps", "3"], 120),  # refused on CPU
    ("tiny-oom-fallback", "TINY",
     ["--method", "lora", "--precision", "32-true", "--optim", "adamw_torch", "--micro-batch", "16", "--grad-accum",
      "1", "--no-grad-ckpt", "--save-steps", "1", "--max-steps", "20"], 300),
]


# --------------------------------------------------------------------------- inputs


def build_inputs(work: Path) -> dict:
    """The tokenizer directory (tests/tiny_lm's word-level tokenizer) and the Alpaca JSONL data:
    ROWS rows, 97% of 48-320 tokens, 3% over 512 (truncated to it), a fixed seed."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tiny_lm import WORDS, llama_config, make_tokenizer

    from vramfit.data import prepare, token_lengths

    tok_dir, data = work / "tokenizer", work / "alpaca.jsonl"
    tok = make_tokenizer()
    tok.save_pretrained(tok_dir)
    rng = random.Random(DATA_SEED)
    # ~40 tokens go to the Alpaca prompt and <eos>; the lengths are measured below
    rows = []
    for _ in range(ROWS):
        n = rng.randint(600, 700) if rng.random() < LONG_FRACTION else rng.randint(48, SHORT_MAX)
        words = [rng.choice(WORDS) for _ in range(n - 40)]
        k = max(4, min(40, len(words) // 4))
        rows.append({"instruction": " ".join(words[:k]), "input": "", "output": " ".join(words[k:])})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = prepare(str(data), tok, max_seq_len=MAX_SEQ_LEN, val_split=0)
    lengths = vars(d.lengths)

    each = token_lengths(d.train.rows, d.train.format, tok)
    short = [n for n in each if n <= MAX_SEQ_LEN]
    info = {"rows": ROWS, "seed": DATA_SEED, "token_lengths": lengths, "short_max": max(short),
            "long_rows": sum(1 for n in each if n > MAX_SEQ_LEN), "seq_len": d.seq_len}
    if max(short) > SHORT_MAX or d.seq_len != MAX_SEQ_LEN:
        raise SystemExit(f"the data is not as designed: {info}")
    tiny = work / "tiny-config"
    llama_config(tok).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    return {"tokenizer": str(tok_dir), "data": str(data), "tiny": str(tiny), "data_info": info}


def environment() -> dict:
    """GPU, driver, CUDA and package versions, read in child processes (no CUDA context here)."""
    env = {"host_cpus": os.cpu_count()}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        env["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    code = ("import json, torch; from vramfit.train import versions; "
            "print(json.dumps({'versions': versions(), 'torch_cuda': torch.version.cuda, 'python': "
            "__import__('sys').version.split()[0]}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    try:
        env.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        env["versions_error"] = (r.stderr or r.stdout)[-500:]
    return env


# --------------------------------------------------------------------------- one run


def command(model: str, extra: list, inputs: dict, out: Path, tiny: bool) -> list:
    args = ["train", inputs["tiny"] if model == "TINY" else model, inputs["data"], "--init", "random",
            "--tokenizer", inputs["tokenizer"], "--out", str(out), "--max-seq-len", str(MAX_SEQ_LEN),
            "--val-split", "0", "--save-steps", "0", "--max-steps", "50", "--seed", "42"]
    args += extra  # later options win (typer keeps the last), so a run may override the defaults
    if tiny and "--save-steps" in extra and "1" in extra:  # the OOM run: injected at the first long batch
        return [sys.executable, "-m", "benchmarks.train_proof.inject", "--oom-above", str(SHORT_MAX), "--", *args]
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
    if not path.is_file():
        return {}
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass  # a line cut by a kill
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
    ap.add_argument("--out", required=True, help="results: train_proof.jsonl, train_proof.tgz, driver.log")
    ap.add_argument("--work", default=None, help="run directories (weights deleted after each run) "
                    "[default: a new folder in $TMPDIR]")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: a tiny random Llama, 3 steps, OOM injected")
    ap.add_argument("--budget-s", type=float, default=400.0, help="wall budget for everything (seconds)")
    ap.add_argument("--only", default=None, help="comma list of run names to do (default: all)")
    a = ap.parse_args(argv)
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
    env = environment()
    env["data"] = inputs["data_info"]
    env["mode"] = "tiny (CPU dry run)" if a.tiny else "gpu"
    (work / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    say(f"environment: {json.dumps(env)}")
    runs = TINY_RUNS if a.tiny else GPU_RUNS
    if a.only:
        keep = set(a.only.split(","))
        runs = [r for r in runs if r[0] in keep]
    summary = out / "train_proof.jsonl"
    done = []
    for name, model, extra, cap in runs:
        left = deadline - time.perf_counter() - 10  # packing the last results
        if left < 20:
            say(f"{name}: skipped, {left:.0f} s left of the budget")
            line = {"run": name, "model": model, "status": "skipped (out of time)"}
        else:
            rdir = work / "runs" / name
            cmd = command(model, extra, inputs, rdir, a.tiny)
            free = shutil.disk_usage(work).free
            say(f"{name}: start (timeout {min(cap, left):.0f} s, disk free {free / 2**30:.1f} GiB)")
            res = run_one(name, cmd, rdir, min(cap, left))
            line = summary_line(name, model, rdir, res, env)
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
