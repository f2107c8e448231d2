"""The point of the levers (issue 20, item 4): under an enforced budget, `vramfit train`'s planned run
against a plain padded trl `SFTTrainer` at the largest micro-batch that fits the same budget.

    python -m benchmarks.speed.lever_proof --out DIR                  # Llama-3.2-1B LoRA at 12 and 24 GiB
    python -m benchmarks.speed.lever_proof --out DIR --models llama-3.1-8b --budgets 24   # one budget
    python -m benchmarks.speed.lever_proof --out DIR --models llama-3.1-8b --budgets 12 --prepare-only
    python -m benchmarks.speed.lever_proof --out DIR --tiny           # CPU: a tiny Llama, a few steps
    BUDGET_S=540 bash benchmarks/speed/lever_proof_device.sh --models llama-3.1-8b --budgets 24   # the GPU machine

Both sides train LoRA r=16 on q_proj,v_proj (alpha 32, dropout 0.05) of the same random-init model on the
same Alpaca-like rows (log-normal token lengths, median ~160, sigma 0.7, cut at --max-seq-len 2048: what
instruction data looks like), each in its own process, timed by the same step clock
(benchmarks/speed/train_overhead.py: real, non-padding tokens per second over steps warmup+1..steps).
The method (LoRA on bf16 weights, or QLoRA where those cannot fit the budget: Llama-3.1-8B's 16 GB at
12 GiB) is the plain script's choice below, and `vramfit train` gets the same `--method`.

(a) `vramfit train MODEL DATA --gpu B --enforce-budget --method lora|qlora ...`: the planner picks precision,
    optimizer, checkpointing, micro-batch x accumulation and the levers (packing, Liger's kernels, ...)
    for the budget, as it does for a user; its process is capped at the budget's allocator limit.
    For a model profile (not --tiny) it gets `--random-init-dir DIR/inputs/<model>-random-init`: a QLoRA
    run writes its random bf16 checkpoint there once (on the CPU, ~5 minutes for an 8B model, before the
    trainer starts: outside the timed window) and the plain side loads the same one.
(b) the plain script: `SFTTrainer` with `packing=False` (batches padded to their longest row), bf16=True,
    adamw_torch_fused, no checkpointing (with it only if nothing fits without), at the largest
    micro-batch whose predicted device peak (vramfit's fast model of the padded setup at --max-seq-len,
    the data's longest row, as vramfit train predicts) is within the whole budget -- no headroom kept, the baseline's
    benefit -- and its process capped at budget - CUDA context; if it still runs out of memory the
    micro-batch is halved and the run repeated (recorded).  Where nothing of that fits (LoRA's bf16
    weights alone are over the budget), its fallback is the standard QLoRA recipe, chosen the same way
    (without, then with checkpointing): from_pretrained of the random bf16 checkpoint above with
    BitsAndBytesConfig(load_in_4bit, nf4, double quantization, bf16 compute), dtype bf16, sdpa,
    device_map {"": 0}; peft's prepare_model_for_kbit_training; paged_adamw_8bit; bf16=True; padded.  If
    the checkpoint is not there yet the plain process writes it first, exactly as vramfit train would
    (train_overhead.random_checkpoint), before its trainer exists: outside the timed window.
    `--prepare-only` writes it (and the inputs) and stops: for a device call too short for both the
    write and the two runs.

Output: DIR/lever_proof.jsonl (environment, inputs, per run, per budget the ratio a/b against the 2x
target) and DIR/runs/<name>/ (clock, log, vramfit's run report and timeline).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.speed import train_overhead as to

RESULT_NAME = "lever_proof.jsonl"
TARGET = 2.0
GiB = 1 << 30
MODELS = {"llama-3.2-1b": dict(max_seq_len=2048, median=160, sigma=0.7, rows=4000, budgets=(12, 24)),
          "llama-3.1-8b": dict(max_seq_len=2048, median=160, sigma=0.7, rows=4000, budgets=(24, 12))}
TINY = dict(max_seq_len=96, median=30, sigma=0.7, rows=300, budgets=(None,))
PLAIN = dict(dtype="bfloat16", bf16=True, optim="adamw_torch_fused", precision="bf16-amp")
# the plain script's fallback where LoRA's bf16 weights cannot fit: the standard QLoRA recipe
PLAIN_QLORA = dict(dtype="bfloat16", bf16=True, optim="paged_adamw_8bit", precision="bf16-amp")
RECIPES = {"lora": PLAIN, "qlora": PLAIN_QLORA}
MICRO_BATCHES = (64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1)


def plain_micro_batch(model: str, budget_bytes: int, max_seq_len: int) -> tuple[int, bool, str, dict]:
    """The largest micro-batch (and checkpointing) of the plain padded recipe whose predicted device
    peak fits `budget_bytes`, from vramfit's fast model (a scan of up to 24 setups; each new shape of
    the replay would build its template); a run that still runs out of memory is halved and repeated.
    LoRA on bf16 weights (PLAIN) first; where none of its setups fits, the same scan of the QLoRA
    recipe (PLAIN_QLORA: NF4 + prepare_model_for_kbit_training, paged_adamw_8bit).
    -> (micro-batch, checkpointing, method "lora" | "qlora", why: the record of the choice)."""
    from vramfit.api import estimate

    for method, recipe in RECIPES.items():
        extra = {"kbit_prep": True} if method == "qlora" else {}
        for ckpt in (False, True):
            for mb in MICRO_BATCHES:
                e = estimate(model, method=method, precision=recipe["precision"], optim=recipe["optim"], lora_r=16,
                             lora_alpha=32, target_modules="q_proj,v_proj", seq_len=max_seq_len, micro_batch=mb,
                             grad_ckpt=ckpt, loss="fused", padded=True, allocator="expandable", replay=False,
                             **extra)
                device = e.device_bytes
                if device <= budget_bytes:
                    return mb, ckpt, method, {"predicted_device_bytes": int(device), "micro_batch": mb,
                                              "grad_ckpt": ckpt, "method": method, "optim": recipe["optim"]}
    return 1, True, "qlora", {"predicted_device_bytes": None, "micro_batch": 1, "grad_ckpt": True, "method": "qlora",
                              "optim": PLAIN_QLORA["optim"], "note": "nothing fits"}


def random_init_dir(out: Path, model: str) -> Path:
    """Where both sides' QLoRA random checkpoint of `model` lives (shared by every run of this --out)."""
    return (out / "inputs" / f"{Path(model).name}-random-init").resolve()


def vramfit_cmd(model: str, inputs: dict, m: dict, out: Path, max_steps: int, budget: int | None,
                method: str = "lora", init_dir: Path | None = None) -> list:
    """(a)'s command line: `method` is the plain side's (LoRA, or QLoRA where bf16 weights cannot fit);
    `init_dir`: --random-init-dir (QLoRA's random checkpoint, shared with the plain side)."""
    cmd = ["train", model, inputs["alpaca"], "--init", "random", "--tokenizer", inputs["tokenizer"], "--out", str(out),
           "--max-seq-len", str(m["max_seq_len"]), "--val-split", "0", "--save-steps", "0",
           "--max-steps", str(max_steps), "--seed", str(to.SEED), "--method", method, "--lora-r", "16",
           "--lora-alpha", "32", "--lora-dropout", "0.05", "--target-modules", "q_proj,v_proj"]
    if init_dir is not None:
        cmd += ["--random-init-dir", str(init_dir)]
    if budget is not None:
        cmd += ["--gpu", f"{budget}GiB", "--enforce-budget"]
    else:  # the CPU check: the setup fixed (no GPU to plan for)
        cmd += ["--gpu", "24GiB", "--precision", "32-true", "--optim", "adamw_torch", "--micro-batch", "4",
                "--grad-accum", "1"]
    return cmd


def one(side: str, model: str, inputs: dict, m: dict, out: Path, a, budget: int | None, mb: int, ckpt: bool,
        timeout: float, attempt: int = 0, method: str = "lora") -> dict:
    name = f"{Path(model).name}-{budget}gib-{side}" + (f"-{attempt}" if attempt else "")
    rdir = out / "runs" / name
    rdir.mkdir(parents=True, exist_ok=True)
    clock = {"path": str(rdir / "clock.json"), "warmup": a.warmup, "steps": a.steps, "profile_steps": 0}
    me = [sys.executable, "-m", "benchmarks.speed.train_overhead", "--child", side, json.dumps(clock), "--"]
    init_dir = None if a.tiny else random_init_dir(out, model)
    recipe = to.CPU_RECIPE if a.tiny else RECIPES[method]
    if side == "vramfit":
        cmd = me + vramfit_cmd(inputs["model_arg"], inputs, m, rdir / "vramfit-out", a.steps, budget, method, init_dir)
    else:
        from vramfit.memory.constants import DEFAULT

        spec = {"tokenizer": inputs["tokenizer"], "data": inputs["plain_data"], "config": inputs["config"],
                "model": inputs["model_arg"], "method": method,
                "random_init_dir": None if init_dir is None else str(init_dir),
                "seed": to.SEED, "dtype": recipe["dtype"], "output_dir": str(rdir / "plain-out"),
                "max_steps": a.steps, "micro_batch": mb, "grad_ckpt": ckpt, "bf16": recipe["bf16"],
                "optim": recipe["optim"], "max_seq_len": m["max_seq_len"], "lora": to.LORA,
                "memory_limit_bytes": None if budget is None else budget * GiB - DEFAULT.cuda_context_bytes}
        cmd = me + [json.dumps(spec)]
    rc, wall = to.run_child(cmd, rdir / "run.log", timeout, to.TINY_ENV if a.tiny else None)
    rec = {"kind": "run", "name": name, "model": model, "side": side, "budget_gib": budget, "rc": rc,
           "wall_s": round(wall, 1), "micro_batch": mb if side == "plain" else None,
           "grad_ckpt": ckpt if side == "plain" else None, "method": method,
           "optim": recipe["optim"] if side == "plain" else None}
    cl = json.loads(Path(clock["path"]).read_text()) if Path(clock["path"]).is_file() else None
    rec["status"] = "completed" if rc == 0 and cl and cl.get("last_step") == a.steps else "failed"
    log = (rdir / "run.log").read_text()
    rec["oom"] = "out of memory" in log.lower()
    if rec["status"] != "completed":
        rec["log_tail"] = log[-1500:]
    if cl:
        rec.update(to.window_rate([(e["step"], e["t"], e["tokens_seen"]) for e in cl["step_ends"]]))
        rec.pop("tokens_per_step", None)
        rec["peak_allocated_bytes"] = cl.get("peak_allocated_bytes")
        args = cl.get("args") or {}
        rec["config"] = {k: args.get(k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                   "gradient_checkpointing", "activation_checkpointing", "bf16",
                                                   "optim", "packing", "padding_free", "use_liger_kernel",
                                                   "activation_offloading", "max_length")}
    rep = rdir / "vramfit-out" / "run_report.json"
    if rep.is_file():
        r = json.loads(rep.read_text())
        rec["vramfit_report"] = {"status": r.get("status"), "setup": r.get("setup"), "measured": r.get("measured"),
                                 "enforced_budget": r.get("enforced_budget")}
        setup = r.get("setup") if isinstance(r.get("setup"), dict) else {}
        rec["method"] = setup.get("method") or method  # what vramfit ran (its report's), else what it was given
        rec["optim"] = setup.get("optim")
    for w in ("vramfit-out/adapter", "vramfit-out/checkpoints", "vramfit-out/model", "plain-out"):
        to.shutil.rmtree(rdir / w, ignore_errors=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["llama-3.2-1b"], help="of: " + ", ".join(MODELS))
    ap.add_argument("--budgets", type=int, nargs="+", default=None,
                    help="GiB, in this order, instead of each model's own (llama-3.2-1b: 12 24; llama-3.1-8b: 24 12)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the inputs and, where the plain side falls back to QLoRA, the random checkpoint "
                         "(on the CPU), then stop: the runs of a later call with the same --out reuse it")
    ap.add_argument("--steps", type=int, default=None, help="last timed step (default 40; --tiny 8)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; --tiny 2)")
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    a.steps = a.steps or (8 if a.tiny else 40)
    a.warmup = a.warmup if a.warmup is not None else (2 if a.tiny else 5)
    unknown = [m for m in a.models if m not in MODELS]
    if unknown and not a.tiny:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    t0 = time.perf_counter()
    deadline = t0 + a.budget_s
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    result = out / RESULT_NAME

    def say(msg):
        print(f"[lever_proof {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    env = to.environment()
    env.update(kind="environment", argv=sys.argv[1:] if argv is None else list(argv), steps=a.steps, warmup=a.warmup,
               target=TARGET)
    to.append(result, env)
    failed = False
    for model in (["tiny"] if a.tiny else a.models):
        m = TINY if model == "tiny" else MODELS[model]
        inputs = to.build_inputs(out / "inputs", model, m, model == "tiny")
        to.append(result, {"kind": "inputs", "model": model, **inputs["data_info"]})
        say(f"{model}: data {inputs['data_info']['token_lengths']}")
        budgets = m["budgets"] if a.tiny or not a.budgets else tuple(a.budgets)
        for budget in budgets:
            if budget is None:
                mb, ckpt, method, why = 4, False, "lora", {"note": "CPU check: micro-batch fixed", "method": "lora",
                                                           "optim": to.CPU_RECIPE["optim"]}
            else:
                longest = min(m["max_seq_len"], inputs["data_info"]["token_lengths"]["max"])  # vramfit's too
                mb, ckpt, method, why = plain_micro_batch(model, budget * GiB, longest)
                why["seq_len"] = longest
            to.append(result, {"kind": "plain_choice", "model": model, "budget_gib": budget, **why})
            say(f"{model} @ {budget} GiB: plain padded SFTTrainer, {method}, at micro-batch {mb}, checkpointing {ckpt}")
            if a.prepare_only:
                if method == "qlora" and not a.tiny:
                    init_dir = random_init_dir(out, model)
                    t = time.perf_counter()
                    to.random_checkpoint(inputs["model_arg"], to.SEED, init_dir)
                    rec = {"kind": "random_init", "model": model, "path": str(init_dir),
                           "seconds": round(time.perf_counter() - t, 1)}
                    to.append(result, rec)
                    say(f"{model}: random checkpoint {init_dir} ready in {rec['seconds']} s")
                continue
            runs = {}
            for side in ("vramfit", "plain"):
                attempt = 0
                while True:
                    left = deadline - time.perf_counter() - 5
                    if left < 30:
                        break
                    rec = one(side, model, inputs, m, out, a, budget, mb, ckpt, left, attempt, method)
                    to.append(result, rec)
                    say(f"{rec['name']}: {rec['status']} in {rec['wall_s']} s, {rec.get('tokens_per_s')} tokens/s"
                        f"{' (OOM)' if rec['oom'] else ''}")
                    runs[side] = rec
                    if side == "plain" and rec["status"] != "completed" and rec["oom"] and mb > 1:
                        mb, attempt = mb // 2, attempt + 1  # it did not fit after all: halve, again
                        continue
                    break
            v, p = runs.get("vramfit", {}), runs.get("plain", {})
            ratio = (v["tokens_per_s"] / p["tokens_per_s"]) if v.get("tokens_per_s") and p.get("tokens_per_s") else None
            cmp = {"kind": "comparison", "model": model, "budget_gib": budget, "vramfit_tokens_per_s": v.get("tokens_per_s"),
                   "plain_tokens_per_s": p.get("tokens_per_s"), "ratio": round(ratio, 3) if ratio else None,
                   "target": TARGET, "met": bool(ratio and ratio >= TARGET),
                   "vramfit_setup": (v.get("vramfit_report") or {}).get("setup"), "plain_micro_batch": mb,
                   "plain_grad_ckpt": ckpt, "plain_method": method, "plain_optim": p.get("optim")}
            to.append(result, cmp)
            say(f"{model} @ {budget} GiB: ratio {cmp['ratio']} (target {TARGET}x)")
            failed |= ratio is None
    say(f"done: {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
