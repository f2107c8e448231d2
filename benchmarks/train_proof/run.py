"""The GPU proof of `vramfit train` (issue 5): full, LoRA and QLoRA runs of a ~1B and a ~7B model
(random init, 50 steps each) against their predictions, and the OOM fall-back triggered for real
under an enforced budget.  Everything it measured goes under --out:

    python3 -m benchmarks.train_proof.run --out "$OUT"                               # all runs
    python3 -m benchmarks.train_proof.run --out "$OUT" --runs 1b-oom-fallback 7b-full 7b-qlora --skip-done
    python3 -m benchmarks.train_proof.run --out "$OUT" --budget-s 540 \
        --runs 1b-oom-midrun 8b-qlora-12gb 8b-qlora-8gb 8b-qlora-8gb-forced         # issue 20 items 4-5
    python3 -m benchmarks.train_proof.run --print-design                             # the OOM runs' numbers
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

Mid-run OOM (1b-oom-midrun, issue 20 item 5: nothing lost when the plan is wrong).  The same fixed
setup on 384 rows sorted short to long and trained in that order (`--sampling sequential`, i.e.
TrainingArguments.train_sampling_strategy), 24 steps of 16 rows, a checkpoint every 5 steps: the
batches grow from ~90 to 512 tokens.  `midrun_design` picks the enforced --gpu (13 GiB with the memory
model of 2026-12-07) so that the first 8 steps are predicted at most 80% of the allocator cap, the
last third over it by at least 20%, and the fall-back's first rung (8 x 2) at 512 within 80% of it;
the OOM is predicted at step 13 (the first batch of 393 tokens), after checkpoint-10.  The driver
then checks and prints, PASS/FAIL (`midrun_checks`): one real OOM after the first checkpoint; resumed
from the last checkpoint before it; the fall-back's setup (same effective batch); 24 optimizer steps,
each step once in each attempt's timeline and in the report's loss curve; the loss continuous (the
resumed attempt logs from the checkpoint's next step, its redone steps' losses within 2% of the first
attempt's, tokens seen going on); the run's log saying "out of memory at step N ... resumed from".
The --tiny twin injects its OOM at the first batch as wide as the GPU run's predicted OOM width.

Enforced budgets at 2,048 tokens (8b-qlora-12gb, 8b-qlora-8gb, 8b-qlora-8gb-forced; issue 20 item 4):
`vramfit train llama-3.1-8b --init random --gpu 12GiB|8GiB --enforce-budget` on rows all longer than
2,048 tokens, 4 steps of 4 rows, the planner choosing (what a user gets: a card sold as 12 GB has 12
GiB); then the smallest setup forced under 8 GiB (--no-fit-check), to see its real peak or its load
OOM explained in one line.  The three share one random checkpoint (`--random-init-dir`), written by
vramfit's own code in a background process that sees no GPU while the 1B runs use it; a second
background process makes the runs' plans once, so the allocator replay's event templates are cached
(a fresh image builds them: minutes of CPU).  The driver waits for both before the first 8B run, and
records per run the peaks against the budget and the prediction, whether the run stayed within it,
the MFU of its tokens/s, and the CLI's one-line outcome when it did not run (no traceback).
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
# The mid-run OOM (issue 20 item 5): OOM_FIXED on rows sorted short to long (--sampling sequential), so
# the micro-batches grow; the first MIDRUN_SAFE_STEPS steps (two checkpoints) are short rows that fit,
# the last third are cut to MAX_SEQ_LEN and do not.  One epoch exactly (16 rows a step), so a resumed
# Trainer skips the rows done before its checkpoint, whatever micro-batch the fall-back chose.
MIDRUN_STEPS, MIDRUN_SAVE_STEPS, MIDRUN_SAFE_STEPS = 24, 5, 8
MIDRUN_PHASES = ((8, 100, 180), (8, 180, 560), (8, 560, 660))  # (steps, first, last row length) in tokens
MIDRUN_LOSS_TOLERANCE = 0.02  # a redone step's loss against the first attempt's (the same weights and rows)
# Llama-3.1-8B at 2,048 tokens under enforced 12 GiB / 8 GiB cards (issue 20 item 4): rows all longer than
# LONG_SEQ_LEN (every micro-batch has the planned shape), a few steps; the runs share one random
# checkpoint (--random-init-dir), written on the CPU while the 1B runs use the GPU
LONG_MODEL, LONG_SEQ_LEN, LONG_ROWS = "llama-3.1-8b", 2048, 48
LONG_STEPS = ["--max-steps", "4", "--effective-batch", "4", "--no-simulate-allocator"]  # the replay: minutes for 8B
MFU_ARGS = ["--method", "lora", "--precision", "bf16-amp", "--optim", "adamw_torch_fused", "--micro-batch", "4",
            "--grad-accum", "4", "--no-grad-ckpt", "--max-steps", "12", "--no-simulate-allocator"]
BF16_DENSE_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
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
    ("1b-oom-midrun", OOM_MODEL, [], 150),  # + midrun_args(design)
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
    # what a user gets with --gpu 12GiB / 8GiB --enforce-budget (the planner chooses; a card sold as
    # 12 GB has 12 GiB); then the smallest setup forced under 8 GiB (--no-fit-check) for its real peak
    # or its explained load OOM.  The driver waits for the shared random checkpoint before the first.
    # model FLOPs utilization of 7-8B LoRA at 2,048 tokens on the whole card (issue 20 item 4): the setup
    # fixed (no planner, no replay: nothing but the steps to time), plain and with Liger's kernels
    ("8b-lora-mfu", LONG_MODEL, MFU_ARGS, 150),
    ("8b-lora-mfu-liger", LONG_MODEL, [*MFU_ARGS, "--liger"], 150),
    ("8b-qlora-12gb", LONG_MODEL, ["--gpu", "12GiB", "--enforce-budget", *LONG_STEPS], 300),
    ("8b-qlora-8gb", LONG_MODEL, ["--gpu", "8GiB", "--enforce-budget", *LONG_STEPS], 240),
    # the whole 8 GiB (no headroom): the planner's QLoRA without kbit prep trained here on 2026-12-07 (7.71 GiB)
    ("8b-qlora-8gb-h0", LONG_MODEL, ["--gpu", "8GiB", "--enforce-budget", "--headroom", "0%", *LONG_STEPS], 240),
    ("8b-qlora-8gb-forced", LONG_MODEL,
     ["--gpu", "8GiB", "--enforce-budget", "--no-fit-check", "--method", "qlora", "--precision", "bf16-amp", "--optim",
      "paged_adamw_8bit", "--micro-batch", "1", "--grad-accum", "4", "--grad-ckpt", *LONG_STEPS], 180),
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
    # the OOM injected at the first batch as wide as the GPU run's predicted OOM length (midrun_design)
    ("tiny-oom-midrun", "TINY", [], 400),  # + midrun_args(design, tiny=True)
    # the 8B runs' data and options on the tiny model (LoRA: QLoRA needs CUDA, and --enforce-budget too)
    ("tiny-long", "TINY", ["--method", "lora", *TINY_FIXED, "--micro-batch", "1", "--grad-accum", "2", "--max-steps",
                           "2"], 300),
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
    midrun, midrun_info = build_midrun_data(work / "midrun.jsonl", rng, tok, WORDS)
    long, long_info = build_long_data(work / "long.jsonl", rng, tok, WORDS)
    info["midrun_data"], info["long_data"] = midrun_info, long_info
    return {"tokenizer": str(tok_dir), "data": str(data), "oom_data": str(oom), "tiny": str(tiny),
            "midrun_data": str(midrun), "long_data": str(long), "midrun_lengths": midrun_info.pop("lengths"),
            "data_info": info}


def build_midrun_data(path: Path, rng, tok, words) -> tuple[Path, dict]:
    """MIDRUN_STEPS x 16 Alpaca rows whose lengths grow over MIDRUN_PHASES, written in the order of
    their measured token lengths (short to long; the last phase's rows are all cut to MAX_SEQ_LEN)."""
    lengths = []
    for steps, a, b in MIDRUN_PHASES:
        lengths += sorted(rng.randint(a, b) for _ in range(steps * 16))
    rows = _rows(rng, lengths, words)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, each = _measure(path, tok)
    order = sorted(range(len(rows)), key=lambda i: each[i])
    path.write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    stats, each = _measure(path, tok)
    cut = [min(n, MAX_SEQ_LEN) for n in each]
    if (len(rows) != MIDRUN_STEPS * 16 or cut != sorted(cut) or stats["seq_len"] != MAX_SEQ_LEN
            or cut[-16 * MIDRUN_PHASES[-1][0]] < MAX_SEQ_LEN):
        raise SystemExit(f"the mid-run OOM data is not as designed: {stats}")
    steps = [max(cut[16 * i:16 * (i + 1)]) for i in range(MIDRUN_STEPS)]
    return path, {"rows": len(rows), "order": "sorted by token length, short to long", "token_lengths": stats,
                  "batch_max_per_step": steps, "lengths": cut}


def build_long_data(path: Path, rng, tok, words) -> tuple[Path, dict]:
    """LONG_ROWS Alpaca rows all longer than LONG_SEQ_LEN (cut to it: every micro-batch is 2,048 wide)."""
    rows = _rows(rng, [rng.randint(LONG_SEQ_LEN + 60, LONG_SEQ_LEN + 200) for _ in range(LONG_ROWS)], words)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from vramfit.run.data import prepare, token_lengths

    d = prepare(str(path), tok, max_seq_len=LONG_SEQ_LEN, val_split=0)
    each = token_lengths(d.train.rows, d.train.format, tok)
    if min(each) <= LONG_SEQ_LEN or d.seq_len != LONG_SEQ_LEN:
        raise SystemExit(f"the long-row data is not as designed: shortest {min(each)}, seq_len {d.seq_len}")
    return path, {"rows": LONG_ROWS, "shortest": min(each), "seq_len": d.seq_len}


def midrun_design(lengths: list, constants=None) -> dict:
    """The mid-run OOM run's --gpu from the current memory model, for rows of `lengths` (cut, in the
    trained order): the smallest whole GiB whose allocator cap holds the fall-back's first rung at
    MAX_SEQ_LEN with OOM_MARGIN to spare and OOM_FIXED on the first MIDRUN_SAFE_STEPS steps' rows likewise,
    while OOM_FIXED at MAX_SEQ_LEN exceeds the cap by OOM_MARGIN.  Also the step the OOM is predicted in
    (the first whose widest row takes OOM_FIXED's predicted allocated peak past the cap), the checkpoint
    it should resume from, and the batch width the --tiny run injects its OOM at."""
    from vramfit.memory.setup import Setup
    from vramfit.run.fallback import allocator_cap_bytes, fallback_ladder
    from vramfit.run.model import resolve_model
    from vramfit.run.predict import predict

    spec = resolve_model(OOM_MODEL, "random").spec
    at = lambda n: Setup(**OOM_FIXED, seq_len=n, loss="fused", padded=True)  # noqa: E731
    steps = [max(lengths[16 * i:16 * (i + 1)]) for i in range(MIDRUN_STEPS)]
    safe = max(steps[:MIDRUN_SAFE_STEPS])
    rung = fallback_ladder(at(MAX_SEQ_LEN))[0]
    p_long, p_safe, p_rung = predict(spec, at(MAX_SEQ_LEN), constants), predict(spec, at(safe), constants), \
        predict(spec, rung, constants)
    for gib in range(4, 80):
        cap = allocator_cap_bytes(f"{gib}GiB", "5%", constants)
        if max(p_rung["peak_reserved_bytes"], p_safe["peak_reserved_bytes"]) <= (1 - OOM_MARGIN) * cap:
            break
    over = p_long["peak_allocated_bytes"] / cap - 1
    if over < OOM_MARGIN:
        raise SystemExit(f"no budget makes the long rows clearly exceed the cap: {gib} GiB, over by {over:.1%}")
    widths = sorted(set(steps))
    need = {n: predict(spec, at(n), constants)["peak_allocated_bytes"] for n in widths}
    oom_width = min(n for n in widths if need[n] > cap)
    oom_step = 1 + min(i for i, n in enumerate(steps) if n >= oom_width)
    g = 2**30
    return {"gpu": f"{gib}GiB", "allocator_cap_gib": round(cap / g, 3), "steps": MIDRUN_STEPS,
            "save_steps": MIDRUN_SAVE_STEPS, "batch_max_per_step": steps,
            "fixed": {"setup": "LoRA bf16-true adamw_torch 16x1 no-ckpt (fused loss, padded)",
                      "predicted_allocated_gib_by_width": {n: round(need[n] / g, 3) for n in widths},
                      "safe_steps": MIDRUN_SAFE_STEPS, "safe_width": safe,
                      "safe_reserved_share_of_cap": round(p_safe["peak_reserved_bytes"] / cap, 3),
                      "long_over_cap": round(over, 3)},
            "fallback_first_rung": {"setup": f"micro-batch {rung.micro_batch} x {rung.grad_accum}, ckpt "
                                             f"{rung.grad_ckpt}",
                                    "predicted_reserved_gib": round(p_rung["peak_reserved_bytes"] / g, 3),
                                    "reserved_share_of_cap": round(p_rung["peak_reserved_bytes"] / cap, 3)},
            "predicted_oom_width": oom_width, "predicted_oom_step": oom_step,
            "predicted_resume_checkpoint": (oom_step - 1) // MIDRUN_SAVE_STEPS * MIDRUN_SAVE_STEPS}


def midrun_args(design: dict, tiny: bool) -> list:
    """The mid-run OOM run's options: OOM_FIXED (32-true on a CPU), the data's order kept, checkpoints
    every MIDRUN_SAVE_STEPS; on a GPU the budget enforced."""
    args = ["--method", "lora", "--precision", "32-true" if tiny else "bf16-true", "--optim", "adamw_torch",
            "--micro-batch", "16", "--grad-accum", "1", "--no-grad-ckpt", "--sampling", "sequential",
            "--save-steps", str(MIDRUN_SAVE_STEPS), "--max-steps", str(MIDRUN_STEPS), "--no-fit-check"]
    return args if tiny else [*args, "--gpu", design["gpu"], "--enforce-budget"]


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


def data_key(name: str) -> str:
    """Which of build_inputs' data files a run trains on."""
    if name.endswith("oom-fallback"):
        return "oom_data"
    if name.endswith("oom-midrun"):
        return "midrun_data"
    if name.startswith("8b-") or name == "tiny-long":
        return "long_data"
    return "data"


def command(name: str, model: str, extra: list, inputs: dict, out: Path, tiny: bool) -> list:
    oom_run = name.endswith("oom-fallback")
    midrun = name.endswith("oom-midrun")
    key = data_key(name)
    args = ["train", inputs["tiny"] if model == "TINY" else model, inputs[key],
            "--init", "random",
            "--tokenizer", inputs["tokenizer"], "--out", str(out), "--max-seq-len", str(MAX_SEQ_LEN),
            "--val-split", "0", "--save-steps", "0", "--max-steps", "50", "--seed", "42"]
    if key == "long_data":
        args += ["--max-seq-len", str(LONG_SEQ_LEN)]
        if inputs.get("random_init_dir"):
            args += ["--random-init-dir", inputs["random_init_dir"]]
    if midrun:
        args += midrun_args(inputs["midrun_design"], tiny)
    args += extra  # later options win (typer keeps the last), so a run may override the defaults
    if oom_run and not tiny:
        args += ["--gpu", inputs["oom_design"]["gpu"]]
    if oom_run and tiny:  # injected at the first batch of the planned shape (step 1: every row is long)
        return [sys.executable, "-m", "benchmarks.train_proof.inject", "--oom-above", str(MAX_SEQ_LEN - 12), "--",
                *args]
    if midrun and tiny:  # injected at the first batch as wide as the GPU run is predicted to run out at
        return [sys.executable, "-m", "benchmarks.train_proof.inject", "--oom-above",
                str(inputs["midrun_design"]["predicted_oom_width"] - 1), "--", *args]
    return [sys.executable, "-c", "from vramfit.cli import main; main()", *args]


def write_random_init(model: str, target: str, seed: int = 42) -> dict:
    """The random bf16 checkpoint `vramfit train MODEL --init random --random-init-dir TARGET` loads
    for QLoRA, written by vramfit's own code path (run in a process that sees no GPU)."""
    from vramfit.run.model import _random_checkpoint, resolve_model

    t0 = time.perf_counter()
    _random_checkpoint(resolve_model(model, "random"), seed, Path(target).parent, shared=target)
    files = [f for f in Path(target).iterdir() if f.is_file()]
    return {"model": model, "dir": target, "seconds": round(time.perf_counter() - t0, 1),
            "bytes": sum(f.stat().st_size for f in files), "files": len(files)}


def warm_plans(model: str, budgets: list, data: str, tokenizer: str) -> dict:
    """The plans the long-row runs will make (`choose_setup` as `vramfit train` calls it: seq 2,048,
    unpadded rows, the effective batch of LONG_STEPS), made once so that their allocator-replay event
    templates are cached (~/.cache/vramfit; keyed by the transformers and peft versions, so a fresh
    GPU image builds them: minutes of CPU) before the runs start."""
    from vramfit.errors import VramfitError
    from vramfit.run.data import prepare
    from vramfit.run.model import load_tokenizer, resolve_model
    from vramfit.run.train import choose_setup

    source = resolve_model(model, "random")
    d = prepare(data, load_tokenizer(source, tokenizer), max_seq_len=LONG_SEQ_LEN, val_split=0)
    out = {}
    for gpu in budgets:
        t0 = time.perf_counter()
        try:
            s, _ = choose_setup(source.spec, {}, d.seq_len, gpu, "5%",
                                int(LONG_STEPS[LONG_STEPS.index("--effective-batch") + 1]), padded=False)
            got = s.micro_batch
        except VramfitError as exc:
            got = str(exc)[:200]
        out[gpu] = {"seconds": round(time.perf_counter() - t0, 1), "micro_batch_or_error": got}
    return out


def start_background(code: str, log: Path) -> subprocess.Popen:
    """`python -c code` in the background, with no GPU visible (CUDA_VISIBLE_DEVICES empty)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    f = log.open("w")
    return subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def start_random_init(model: str, target: str, log: Path) -> subprocess.Popen:
    """write_random_init in the background, with no GPU visible."""
    return start_background(f"import json, torch; from benchmarks.train_proof.run import write_random_init; "
                            f"r = write_random_init({model!r}, {target!r}); "
                            f"r['cuda_available'] = torch.cuda.is_available(); print('RESULT ' + json.dumps(r))", log)


def start_warm_plans(model: str, budgets: list, data: str, tokenizer: str, log: Path) -> subprocess.Popen:
    return start_background(f"import json; from benchmarks.train_proof.run import warm_plans; "
                            f"print('RESULT ' + json.dumps(warm_plans({model!r}, {budgets!r}, {data!r}, "
                            f"{tokenizer!r})))", log)


def finish_background(p: subprocess.Popen, log: Path, timeout: float) -> dict:
    """Wait for a background process (killed at `timeout`) -> its RESULT line, or why there is none."""
    try:
        p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    text = log.read_text() if log.is_file() else ""
    got = [x for x in text.splitlines() if x.startswith("RESULT ")]
    return json.loads(got[-1][7:]) if got else {"error": text[-800:], "rc": p.returncode}


def run_one(name: str, cmd: list, out: Path, timeout: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # an earlier command's attempt (--work reused): vramfit wants it new
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


def attempts_of(path: Path) -> list:
    """The memory timeline cut at its "setup" events: per trainer attempt, its step_end steps and its
    logged (step, loss, tokens seen)."""
    from benchmarks.jsonl import records

    out = []
    for r in records(path) if path.is_file() else []:
        if r.get("kind") == "event" and r.get("message") == "setup":
            out.append({"steps": [], "logs": []})
        elif out and r.get("kind") == "step_end":
            out[-1]["steps"].append(r["step"])
        elif out and r.get("kind") == "log" and isinstance(r.get("loss"), (int, float)):
            out[-1]["logs"].append((r["step"], r["loss"], r.get("num_input_tokens_seen")))
    return out


def check(name: str, ok: bool, detail: str) -> dict:
    return {"check": name, "ok": bool(ok), "detail": detail}


def midrun_checks(out: Path, rep: dict | None, tiny: bool, design: dict | None) -> list:
    """Issue 20 item 5, checked from the run's report, timeline and log: one real (GPU) or injected
    (--tiny) OOM after the first checkpoint, the fall-back's setup, resumed from the last checkpoint
    before it, the planned number of optimizer steps counted once, a continuous loss curve, and the
    report saying so."""
    if rep is None:
        return [check("run report", False, "no run_report.json: the run did not finish")]
    save, steps = MIDRUN_SAVE_STEPS, rep["max_steps"]
    fbs = rep.get("fallbacks") or []
    res = [check("completed, steps counted once",
                 rep["status"] == "completed" and rep["steps"] == steps == MIDRUN_STEPS,
                 f"status {rep['status']}, {rep['steps']} of {steps} optimizer steps (planned {MIDRUN_STEPS})")]
    if len(fbs) != 1:
        return res + [check("one OOM and fall-back", False, f"{len(fbs)} fall-backs: {fbs}")]
    f = fbs[0]
    injected = "injected" in (f.get("error") or "")
    real = "out of memory" in (f.get("error") or "").lower() and (injected if tiny else not injected)
    predicted = (f", predicted step {design['predicted_oom_step']} (width {design['predicted_oom_width']})"
                 if design else "")
    res.append(check("OOM after the first checkpoint", real and f["step"] > save,
                     f"step {f['step']}{predicted}; {'injected' if injected else 'real'}: {f.get('error', '')[:120]}"))
    c = int(str(f.get("resumed_from") or "-0").rsplit("-", 1)[1] or 0)
    last = (f["step"] - 1) // save * save
    res.append(check("resumed from the last checkpoint before the OOM", c == last >= save,
                     f"resumed from {f.get('resumed_from')} (expected checkpoint-{last})"))
    b, a = f["setup_before"], f["setup_after"]
    res.append(check("fall-back setup: same effective batch, smaller micro-batch",
                     a["micro_batch"] * a["grad_accum"] == b["micro_batch"] * b["grad_accum"] and
                     a["micro_batch"] < b["micro_batch"],
                     f"{b['micro_batch']}x{b['grad_accum']} ckpt {b['grad_ckpt']} -> {a['micro_batch']}x"
                     f"{a['grad_accum']} ckpt {a['grad_ckpt']}"))
    att = attempts_of(out / "memory_timeline.jsonl")
    if len(att) != 2:
        return res + [check("two attempts in the timeline", False, f"{len(att)} attempts")]
    s1, s2 = att[0]["steps"], att[1]["steps"]
    merged = [x["step"] for x in rep.get("losses") or []]
    res.append(check("each step once, in order", s1 == list(range(1, f["step"])) and
                     s2 == list(range(c + 1, steps + 1)) and merged == list(range(1, steps + 1)),
                     f"attempt 1 steps {s1[:1]}..{s1[-1:]}, attempt 2 steps {s2[:1]}..{s2[-1:]}; the report's "
                     f"loss curve has {len(merged)} steps"))
    l1 = {s: (loss, tok) for s, loss, tok in att[0]["logs"]}
    l2 = [(s, loss, tok) for s, loss, tok in att[1]["logs"]]
    no_reset = bool(l2) and l2[0][0] == c + 1 and all(x[0] < y[0] for x, y in zip(l2, l2[1:]))
    redone = [(s, l1[s][0], loss) for s, loss, _ in l2 if s in l1]
    if redone:
        worst = max(abs(b2 / b1 - 1) for _, b1, b2 in redone)
        same = worst <= MIDRUN_LOSS_TOLERANCE
        how = (f"redone steps {[s for s, _, _ in redone]}: losses {[(round(x, 4), round(y, 4)) for _, x, y in redone]}"
               f" (first attempt, resumed), worst {worst:.2%} (<= {MIDRUN_LOSS_TOLERANCE:.0%})")
    else:
        before, after = l1.get(c, (None,))[0], l2[0][1] if l2 else None
        same = before is not None and after is not None and abs(after / before - 1) <= 0.1
        how = f"no redone step; loss at step {c} {before}, at step {c + 1} {after} (within 10%)"
    tok_ok = True
    if l2 and l1.get(c, (None, None))[1] is not None and l2[0][2] is not None:
        tok_ok = l2[0][2] > l1[c][1]
        how += f"; tokens seen at step {c} {l1[c][1]}, at {c + 1} {l2[0][2]}"
    res.append(check("loss curve continuous (no reset)", no_reset and same and tok_ok,
                     f"the resumed attempt logs from step {l2[0][0] if l2 else None} (expected {c + 1}); " + how))
    log = (out / "run.log").read_text() if (out / "run.log").is_file() else ""
    said = [x for x in log.splitlines() if x.startswith(f"out of memory at step {f['step']}")]
    res.append(check("the report says what happened", bool(said) and "resumed from" in said[0] and
                     f"run completed: {steps} of {steps} steps" in log, said[0][:300] if said else "no fall-back line"))
    return res


def budget_facts(rep: dict | None, env: dict, log: str = "", tokens_per_s: float | None = None) -> dict:
    """An enforced-budget run: its peaks against the budget and the prediction; the model-FLOPs
    utilization vramfit train reported (its run report's `throughput`), or for an older report one computed
    here from its tokens/s (6 N + attention per token, on the GPU's dense bf16 peak)."""
    from vramfit.run.fallback import usable_bytes

    if rep is None or not rep.get("enforced_budget"):
        said = [x for x in log.splitlines() if x.startswith("vramfit:")]
        return {"budget_outcome": said[-1][:400] if said else None, "traceback_in_log": "Traceback" in log}
    e, m, p = rep["enforced_budget"], rep["measured"]["measured"] or {}, rep["predicted"]
    usable = usable_bytes(e["gpu"], e["headroom"])
    g = 2**30
    facts = {"budget": e["gpu"], "usable_gib": round(usable / g, 3),
             "allocator_cap_gib": round(e["allocator_cap_bytes"] / g, 3),
             "peaks_gib": {k: {"measured": round(m[k] / g, 3) if m.get(k) else None, "predicted": round(p[k] / g, 3)}
                           for k in ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes")},
             "device_bytes_source": rep["measured"].get("device_bytes_source"), "traceback_in_log": "Traceback" in log,
             "within_budget": bool(m.get("device_bytes")) and m["device_bytes"] <= usable and
             rep["status"] == "completed"}
    own = rep.get("throughput") or {}
    if own.get("mfu") is not None:  # vramfit train's own figure (run/outputs.throughput: 4 N for LoRA / QLoRA)
        facts["mfu"] = {k: own.get(k) for k in ("tokens_per_s", "model_flops_per_token", "peak_flops", "mfu", "steps")}
        facts["mfu"]["note"] = "vramfit train's run report (throughput): the steps' clock from step 2"
        return facts
    spec = None  # an older report: computed here at 6 N
    try:
        from vramfit.run.model import resolve_model

        spec = resolve_model(rep["model"], "random").spec
    except Exception:  # noqa: BLE001 - the tiny model: no MFU
        pass
    name = str(env.get("nvidia_smi") or "")
    peak = next((v for k, v in BF16_DENSE_PEAK.items() if k in name), None)
    tps = tokens_per_s
    if spec is not None and peak and tps:
        dense = spec.params_total - spec.params_by_role.get("embeddings", 0)
        flops = 6 * dense + 6 * spec.num_layers * spec.hidden_size * rep["setup"]["seq_len"]
        facts["mfu"] = {"tokens_per_s": round(tps, 1), "flops_per_token": flops, "peak_flops": peak,
                        "mfu": round(tps * flops / peak, 4),
                        "note": "tokens/s between the first and last logged step (the timeline's); 6 N + "
                                "6 layers x hidden x seq per token, no recomputation counted"}
    return facts


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
                    final_loss=rep["final_loss"], versions=rep["versions"], throughput=rep.get("throughput"))
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
    ap.add_argument("--print-design", action="store_true",
                    help="print the OOM runs' budgets and predictions, run nothing")
    a = ap.parse_args(argv)
    if a.print_design:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            lengths = build_inputs(Path(tmp))["midrun_lengths"]
        print(json.dumps({"1b-oom-fallback": oom_design(), "1b-oom-midrun": midrun_design(lengths)}, indent=1))
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
    inputs["midrun_design"] = midrun_design(inputs["midrun_lengths"])
    say(f"mid-run OOM design (current memory model): {json.dumps(inputs['midrun_design'])}")
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
    background = {}  # the long-row runs' shared random checkpoint and plans, made on the CPU meanwhile
    if any(data_key(r[0]) == "long_data" for r in runs):
        src = inputs["tiny"] if a.tiny else LONG_MODEL
        inputs["random_init_dir"] = str(work / f"random-init-{Path(src).name}")
        say(f"random checkpoint of {src}: writing it in the background (no GPU visible) to {inputs['random_init_dir']}")
        background["random_init"] = start_random_init(src, inputs["random_init_dir"], out / "random_init.log")
        budgets = sorted({r[2][r[2].index("--gpu") + 1] for r in runs if data_key(r[0]) == "long_data" and
                          "--gpu" in r[2] and "--no-fit-check" not in r[2]}) or (["12GiB"] if a.tiny else [])
        if budgets:
            say(f"plans of {src} for {budgets}: made in the background (allocator-replay templates cached)")
            background["warm_plans"] = start_warm_plans(src, budgets, inputs["long_data"], inputs["tokenizer"],
                                                        out / "warm_plans.log")
    random_init = None  # what the background work did
    done = []
    for name, model, extra, cap in runs:
        needs_background = "lora" not in extra  # LoRA builds its random model on the GPU: no checkpoint
        if data_key(name) == "long_data" and background and random_init is None and needs_background:
            wait = max(1.0, deadline - time.perf_counter() - 30)
            say(f"{name}: waiting for the background work (up to {wait:.0f} s)")
            t_wait = time.perf_counter()
            random_init = {k: finish_background(p, out / f"{k}.log", deadline - time.perf_counter() - 30)
                           for k, p in background.items()}
            random_init["waited_s"] = round(time.perf_counter() - t_wait, 1)
            say(f"background work: {json.dumps(random_init)}")

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
            key = data_key(name)
            info = inputs["data_info"]
            line["data"] = {"file": Path(inputs[key]).name,
                            **({"rows": OOM_ROWS, "all_longer_than_max_seq_len": True} if oom_run else
                               {k: info["midrun_data"][k] for k in ("rows", "order", "batch_max_per_step")}
                               if key == "midrun_data" else
                               {**info["long_data"], "all_longer_than_max_seq_len": True} if key == "long_data" else
                               {k: info[k] for k in ("rows", "lengths", "long_fraction")})}
            if oom_run and inputs.get("oom_design"):
                line["oom_design"] = inputs["oom_design"]
            rep_path = rdir / "run_report.json"
            rep = json.loads(rep_path.read_text()) if rep_path.is_file() else None
            if key == "midrun_data":
                line["midrun_design"] = inputs["midrun_design"]
                line["checks"] = midrun_checks(rdir, rep, a.tiny, inputs["midrun_design"])
            if key == "long_data":
                log_text = res["log"].read_text() if res["log"].is_file() else ""
                line["budget"] = budget_facts(rep, env, log_text, line.get("tokens_per_s"))
                line["background"] = random_init
            done.append(name)
            err = (line.get("relative_error") or {}).get("device_bytes")
            say(f"{name}: {line['status']} rc={res['rc']} {res['wall_s']} s, steps {line.get('steps')}, "
                f"device error {err}, fallbacks {len(line.get('fallbacks') or [])}, tokens/s {line.get('tokens_per_s')}")
            for c in line.get("checks") or []:
                say(f"  {'PASS' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}")
            if line.get("budget"):
                say(f"  budget: {json.dumps(line['budget'])}")
        with summary.open("a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        pack(out, work, done, [str(work / "environment.json"), str(summary), str(out / "driver.log"),
                              str(out / "random_init.log"), str(out / "warm_plans.log")] +
             ([str(work / "tiny-config" / "config.json")] if a.tiny else []))
    for p in background.values():  # no long-row run got to wait for it
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    say(f"done in {time.perf_counter() - t_start:.0f} s")
    dlog.close()
    pack(out, work, done, [str(work / "environment.json"), str(summary), str(out / "driver.log"),
                              str(out / "random_init.log"), str(out / "warm_plans.log")] +
         ([str(work / "tiny-config" / "config.json")] if a.tiny else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
