"""The GPU proof of `vramfit plan` under enforced budgets (issue 4), in passes and shards that resume.

    python -m benchmarks.plan_proof.run --print-schedule                      # the commands, estimated
    python -m benchmarks.plan_proof.run --out $OUT/pp.jsonl --passes 1 --max-seconds 520
    python -m benchmarks.plan_proof.run --out $OUT/pp.jsonl --passes 2 3 4 --skip-done --max-seconds 520
    python -m benchmarks.plan_proof.run --device cpu --tiny --out /tmp/pp.jsonl   # the same code path on CPU
    # the allocator-replay planner: plans precomputed on a CPU machine, shipped to the GPU one
    python -m benchmarks.plan_proof.run --precompute-plans --simulate-allocator --out-plans plans.json
    python -m benchmarks.plan_proof.run --simulate-allocator --plans-cache plans.json --out $OUT/pp.jsonl ...

For each model (one process per model, reused across its budgets and trials) and each budget
(8, 12, 16, 24, 40 GB, decimal as `--gpu 8GB`):

- plan: `vramfit.plan(spec, gpu=Device)` where the Device has the budget as its memory and the
  H100 SXM's throughput (the plain size form `8GB` borrows an RTX 4090's, which would rank setups
  for another card; its choice is recorded too);
- the budget is enforced with `torch.cuda.set_per_process_memory_fraction((budget - outside) /
  total)`, outside = what vramfit counts outside torch's allocator (CUDA context + kernels,
  vramfit/constants.py), so the allocator may reserve what the budget leaves for it; and (since
  2026-11-23 evening; `--no-ballast` for the old way) by a ballast of total - budget held with the
  driver's cuMemAlloc for the trial, so the card really is the budget's size: what the fraction
  does not count (the CUDA context's real size, the paged optimizers' managed memory, which pages
  to host where it does not fit) meets the same wall as on a card of that size.  NVML's process
  figure counts the ballast: the records subtract it;
- trials, each building the model as a launcher would from the plan's own objects
  (`model_kwargs`, `lora_config`, `bnb_config`, `training_arguments`; QLoRA: from_pretrained of
  a random bf16 checkpoint written once per model and kept, under a fixed path, for every budget,
  pass and later command on the same machine; prepare_model_for_kbit_training) and training on
  random tokens with transformers' Trainer, in passes (cheapest and most required first):
    1 plan         the chosen setup, --steps (20) optimizer steps
    2 next_larger  the chosen setup at the first larger micro-batch the memory model rejects (a
                   divisor of the effective batch, or beyond it at accumulation 1), 3 steps: does it
                   really OOM (or need the headroom)?
    3 alt          a few other fitting setups (the next fastest predicted that differs in method,
                   precision, micro-batch or checkpointing, and the best of each other method
                   predicted at least --alt-min-ratio of the plan's speed), --alt-steps steps: the
                   fastest setup that really fits, found by trying
    4 afbs         transformers' auto_find_batch_size from batch --afbs-start, same method as the
                   plan, on a small subset (--afbs-models x --afbs-budgets)
    5 smallest     (--confirm-nothing-fits) where nothing fits: does the smallest setup really OOM?

Cost (H100, 2026-11-23): the steps are bound by the host's kernel launches, ~18 ms per decoder
layer and micro-batch with LoRA or full fine-tuning and ~28 ms with QLoRA, whatever the tokens; so
the effective batch is 4 here (the issue does not fix it; 16 made pass 1 alone ~21 minutes and 8
all passes ~26) and the sequence stays 512 (a shorter one saves little time: the same tokens per
micro-batch cost the same launches).  So that every plan still has a rejected micro-batch to try,
pass 2 goes beyond the effective batch where its divisors all fit: the smallest micro-batch the
memory model rejects for the chosen setup at accumulation 1.
`--print-schedule` estimates each model's and pass's seconds from those rates.

The Trainer is kept for every trial: a minimal loop would have to re-create what it does to the
memory (autocast for bf16-mixed, the bitsandbytes/paged optimizers, checkpointing's wiring, the
optimizer states created at the first step) and auto_find_batch_size needs it anyway, while its own
cost measured today is ~1 s per trial (build + Trainer) against 20 steps of 0.3-8 s.

Resuming: every result is one JSON line, flushed and fsynced at once; `--skip-done` reads --out
and skips each trial already there with a result (ok, oom or error; a plan trial cut before its
steps is run again), and each model whose trials are all done is not started at all.  Each trial
checks the time left against its estimate, so a timeout loses only the least important work.
`python -m benchmarks.plan_proof.report FILE` turns the lines into the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

MODELS = ("qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-1.5b", "qwen2.5-3b", "llama-3.1-8b", "qwen2.5-14b")
BUDGETS = ("8GB", "12GB", "16GB", "24GB", "40GB")
AFBS_MODELS = ("qwen2.5-1.5b", "llama-3.1-8b")
AFBS_BUDGETS = ("24GB",)
EFFECTIVE_BATCH = 4
PASSES = {1: "plan", 2: "next_larger", 3: "alt", 4: "afbs", 5: "smallest"}
# measured on the H100 machine, 2026-11-23 (plan-proof and train-proof logs): seconds per decoder
# layer and micro-batch (host-bound), start-up and QLoRA checkpoint writes
LAUNCH_S_PER_LAYER = {"qlora": 0.028, "lora": 0.018, "full": 0.018}
NO_CKPT_FACTOR = 0.7
MFU = 0.35
H100_BF16_FLOPS = 989e12
PROCESS_START_S = 25.0
CHECKPOINT_BYTES_PER_S = 0.65e9
CKPT_ROOT = "vramfit_plan_proof"
SEQ_LEN = 512
THROUGHPUT_PROFILE = "h100-sxm"
SEED = 1234
# --tiny (CPU): the same models shrunk, budgets just above the CUDA context the planner reserves,
# so that micro-batches are rejected and nothing fits at the smallest.
TINY_OVERRIDES = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 256,
                  "head_dim": 16}
TINY_MODELS = ("qwen2.5-0.5b", "llama-3.2-1b")
TINY_BUDGETS = ("0.99GB", "1.02GB", "1.2GB")
TINY_SEQ_LEN = 256


def emit(path: str, record: dict) -> None:
    """Append one JSON line and make it durable now: a killed run keeps everything written."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- planning (no torch)


def plan_device(budget: str):
    """A Device with `budget` as its memory and the H100's throughput."""
    from vramfit.planner.gpu import load_profiles, size_device

    d = size_device(budget)
    h = load_profiles()[THROUGHPUT_PROFILE]
    return dataclasses.replace(d, name=f"{budget} of an {h.name}", bf16_tflops=h.bf16_tflops,
                               fp16_tflops=h.fp16_tflops, bandwidth_bytes_per_s=h.bandwidth_bytes_per_s,
                               compute_capability=h.compute_capability, throughput_from=h.key, note="")


def setup_json(s) -> dict:
    from vramfit.planner.result import setup_json as _setup_json

    return _setup_json(s)


def candidate_json(c) -> dict:
    return {"setup": setup_json(c.setup), "predicted_device_bytes": c.device_bytes,
            "predicted_allocated_bytes": c.peak_allocated_bytes, "predicted_reserved_bytes": c.peak_reserved_bytes,
            "predicted_tokens_per_s": round(c.tokens_per_s, 1), "predicted_fits": c.fits}


def next_larger(plan, ev, limit: int = 1024, spec=None):
    """The first micro-batch above the chosen one that the memory model rejects, as a Candidate:
    among the effective batch's divisors (what the search had, accumulation adjusted), else beyond
    the effective batch at accumulation 1 (the smallest rejected, by bisection: the memory model's
    own boundary for this setup).  None where even `limit` fits.  `spec` given: the boundary of the
    allocator-replay planner (vramfit/recheck.py: the capped replay's verdict) instead."""
    from vramfit.planner.recheck import next_larger as boundary
    from vramfit.planner.recheck import replay_verdict

    if spec is None:
        fits = lambda c: c.fits  # noqa: E731
    else:
        fits = lambda c: replay_verdict(spec, ev, c.setup, plan.usable_bytes)[0]  # noqa: E731
    return boundary(ev, plan.chosen.setup, plan.device, plan.usable_bytes, fits, limit)


# --------------------------------------------------------------------------- one trial (torch)


class Trials:
    """Everything one model's process needs: spec, config, checkpoint, the output file."""

    def __init__(self, args, model: str, deadline: float):
        import torch

        self.torch, self.args, self.model, self.deadline = torch, args, model, deadline
        self.cuda = args.device == "cuda"
        self.overrides = dict(TINY_OVERRIDES) if args.tiny else {}
        from vramfit.model.spec import load_spec, resolve_config_dict

        self.spec = load_spec(model, overrides=self.overrides)
        self.config_data = {**resolve_config_dict(model)[1], **self.overrides}
        self.checkpoint = None
        self.scratch = None
        from vramfit.memory.constants import DEFAULT

        self.outside = DEFAULT.cuda_context_bytes + DEFAULT.kernel_growth_bytes
        self.total = torch.cuda.get_device_properties(0).total_memory if self.cuda else None
        self._cu = self._ballast = None

    def base(self, **kw) -> dict:
        return {"model": self.model, "overrides": self.overrides, "seq_len": self.args.seq_len,
                "effective_batch": self.args.effective_batch, **kw}

    def time_left(self) -> float:
        return self.deadline - time.time()

    # -- budget enforcement
    def enforce(self, budget_bytes: int | None) -> float | None:
        if not self.cuda:
            return None
        fraction = 1.0 if budget_bytes is None else (budget_bytes - self.outside) / self.total
        self.torch.cuda.set_per_process_memory_fraction(fraction, 0)
        return fraction

    # -- the GPU made as small as the budget
    def hold_ballast(self, budget_bytes: int | None) -> int:
        """Hold total - budget of the GPU with the driver's cuMemAlloc, outside torch's allocator, so
        the process finds a card of the budget's size: the fraction caps torch's allocator, the
        ballast also bounds what it does not count (the paged optimizers' managed memory, which
        must page to host where it does not fit, and everything outside torch)."""
        self.release_ballast()
        if not self.cuda or budget_bytes is None or self.args.no_ballast:
            return 0
        import ctypes

        if self._cu is None:
            self._cu = ctypes.CDLL("libcuda.so.1")
        self.torch.cuda.synchronize()  # the primary context is current on this thread
        size = self.total - budget_bytes
        if size <= 0:
            return 0
        ptr = ctypes.c_uint64()
        rc = self._cu.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size))
        if rc != 0:
            raise RuntimeError(f"cuMemAlloc_v2 of the {size} B ballast failed: CUresult {rc}")
        self._ballast = ptr
        return size

    def release_ballast(self) -> None:
        if self._ballast is not None:
            self._cu.cuMemFree_v2(self._ballast)
            self._ballast = None

    # -- the QLoRA checkpoint
    def qlora_checkpoint(self) -> str:
        """A random bf16 checkpoint of the model, written once under a fixed path (RAM disk where it
        has room) and kept: every budget, pass and later command on this machine reuses it."""
        if self.checkpoint:
            return self.checkpoint
        import torch
        from transformers import AutoModelForCausalLM

        from vramfit.model.spec import config_from_dict

        t = time.perf_counter()
        tag = f"{self.model}-{'tiny' if self.args.tiny else 'full'}-seed{SEED}"
        for root in ("/dev/shm", tempfile.gettempdir()):
            where = Path(root) / CKPT_ROOT / tag
            if (where / "complete").is_file():
                self.checkpoint = str(where)
                emit(self.args.out, self.base(kind="checkpoint", where=str(where), reused=True, seconds=0.0))
                return self.checkpoint
        need = 2.3 * self.spec.params_total * 2
        shm = Path("/dev/shm")
        root = shm if shm.is_dir() and shutil.disk_usage(shm).free > need else Path(tempfile.gettempdir())
        where = root / CKPT_ROOT / tag
        shutil.rmtree(where, ignore_errors=True)  # a half-written one
        where.mkdir(parents=True)
        self.enforce(None)
        torch.manual_seed(SEED)
        with torch.device("cuda" if self.cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(config_from_dict(self.config_data, self.model),
                                                     dtype=torch.bfloat16)
        model.save_pretrained(where, max_shard_size="5GB")
        del model
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        (where / "complete").write_text("")
        self.checkpoint = str(where)
        emit(self.args.out, self.base(kind="checkpoint", where=str(where), reused=False,
                                      seconds=time.perf_counter() - t))
        return self.checkpoint

    def cleanup(self) -> None:
        if self.checkpoint and self.args.drop_checkpoints:
            shutil.rmtree(self.checkpoint, ignore_errors=True)

    # -- building the model as the launcher would, from the plan's objects
    def build(self, p):
        import torch
        from transformers import AutoModelForCausalLM

        from vramfit.model.spec import config_from_dict

        s = p.chosen.setup
        kw = p.model_kwargs()
        if s.method == "qlora":
            from peft import prepare_model_for_kbit_training

            path = self.qlora_checkpoint()
            model = AutoModelForCausalLM.from_pretrained(
                path, **kw, device_map={"": torch.cuda.current_device() if self.cuda else "cpu"})
            model.config.use_cache = False
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.grad_ckpt,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            torch.manual_seed(SEED)
            with torch.device("cuda" if self.cuda else "cpu"):
                model = AutoModelForCausalLM.from_config(config_from_dict(self.config_data, self.model),
                                                         dtype=kw["dtype"], attn_implementation=kw["attn_implementation"])
            model.config.use_cache = False
        lora = p.lora_config()
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora)
        return model

    def run(self, p, role: str, budget: str, steps: int, cap_s: float, min_steps: int, afbs_start: int = 0,
            estimate_s: float = 0.0, **extra) -> dict:
        """Train p's chosen setup under the budget; one JSON line.  Never raises."""
        import torch
        import transformers

        from benchmarks.accuracy import probe, train_case
        from vramfit.planner.gpu import parse_size
        from vramfit.run.fallback import free_memory

        s = p.chosen.setup
        budget_bytes = parse_size(budget)
        rec = self.base(kind="trial", role=role, budget=budget, budget_bytes=budget_bytes,
                        usable_bytes=p.usable_bytes, steps_asked=steps, cap_s=cap_s, afbs_start=afbs_start or None,
                        estimate_s=round(estimate_s, 1),
                        **candidate_json(p.chosen), **extra)
        rec["paged_optimizer"] = s.optim.startswith("paged")  # managed memory: outside the fraction
        if self.time_left() < min(cap_s, estimate_s or cap_s) + 5:
            emit(self.args.out, dict(rec, status="skipped_time", time_left_s=round(self.time_left(), 1)))
            return rec
        trainer = model = None
        clock = StepClock(torch, self.cuda, cap_s, min_steps, self.deadline - 2)
        if s.method == "qlora":
            self.qlora_checkpoint()  # written unenforced, before this trial's budget and peaks
        started = time.perf_counter()
        if self.cuda:
            torch.cuda.memory._set_allocator_settings(
                f"expandable_segments:{'True' if s.allocator == 'expandable' else 'False'}")
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            rec["ballast_bytes"] = self.hold_ballast(budget_bytes)
        except (OSError, RuntimeError) as exc:  # no libcuda, or the driver refused: fraction only
            rec["ballast_bytes"], rec["ballast_error"] = 0, str(exc)
        rec["enforced_fraction"] = self.enforce(budget_bytes)
        rec["allocator_limit_bytes"] = int(rec["enforced_fraction"] * self.total) if self.cuda else None
        sampler = start_sampler(probe) if self.cuda else None
        tries: list = []
        try:
            model = self.build(p)
            rec["build_seconds"] = time.perf_counter() - started
            mb = afbs_start or s.micro_batch
            ga = 1 if afbs_start else s.grad_accum
            data = train_case.random_tokens_dataset(torch, steps * mb * ga, s.seq_len, self.spec.vocab_size)
            out_dir = tempfile.mkdtemp(prefix="pp_trainer_")
            over = {"max_steps": steps, "report_to": [], "save_strategy": "no", "logging_strategy": "no",
                    "eval_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0, "seed": SEED,
                    "use_cpu": not self.cuda, "learning_rate": 1e-5}
            if s.grad_ckpt:
                over["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
            if afbs_start:
                over.update(per_device_train_batch_size=afbs_start, gradient_accumulation_steps=1,
                            auto_find_batch_size=True)
            args = p.training_arguments(out_dir, **over)
            trainer = counting_trainer(transformers, tries)(model=model, args=args, train_dataset=data,
                                                            callbacks=[clock])
            clock.train_called = time.perf_counter()
            trainer.train()
            rec["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - an OOM is a result; anything else is recorded
            oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
            rec["status"] = "oom" if oom else "error"
            rec["error"] = str(exc)[:500] if oom else traceback.format_exc()[-2500:]
            rec["oom_step"] = len(clock.seconds) if oom else None
        finally:
            rows = (tries[-1] if tries else afbs_start) if afbs_start else s.micro_batch * s.grad_accum
            rec.update(clock.summary(s.seq_len * rows))
            if afbs_start:
                rec["afbs_batch_sizes_tried"] = tries
            if self.cuda:
                torch.cuda.synchronize()
                rec["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
                rec["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
                rec["reserved_end_bytes"] = torch.cuda.memory_reserved()
            if sampler:
                rec.update(sampler.stop())
                rec["nvml_process_end_bytes"] = sampler.process_bytes()
                if rec.get("nvml_source") == "process" and rec.get("ballast_bytes"):
                    # NVML counts the ballast as this process's; its figure less the ballast
                    rec["nvml_peak_bytes"] -= rec["ballast_bytes"]
                    rec["nvml_process_end_bytes"] = (rec["nvml_process_end_bytes"] or 0) - rec["ballast_bytes"]
            free_memory(trainer)
            trainer = model = None
            gc.collect()
            self.release_ballast()
            if self.cuda:
                torch.cuda.empty_cache()
                rec["leftover_allocated_bytes"] = torch.cuda.memory_allocated()
            rec["seconds"] = time.perf_counter() - started
            emit(self.args.out, rec)
        return rec


def start_sampler(probe):
    """NVML's process figure every 20 ms (the default 5 ms thread competes with the launches)."""
    try:
        return probe.NvmlSampler(interval_s=0.02).start()
    except Exception:  # noqa: BLE001 - no NVML
        return None


def counting_trainer(transformers, tries: list):
    """Trainer that notes each batch size auto_find_batch_size tries (one inner loop per try)."""

    class CountingTrainer(transformers.Trainer):
        def _inner_training_loop(self, batch_size=None, *args, **kwargs):
            tries.append(batch_size)
            return super()._inner_training_loop(batch_size, *args, **kwargs)

    return CountingTrainer


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class StepClock(_callback_base()):
    """Seconds per optimizer step (synchronised); stops the run past its time cap."""

    def __init__(self, torch, cuda: bool, cap_s: float, min_steps: int, deadline: float):
        self.torch, self.cuda, self.cap_s, self.min_steps, self.deadline = torch, cuda, cap_s, min_steps, deadline
        self.seconds: list = []
        self.train_called = None
        self.first_step_end = None
        self._t0 = self._first_begin = None

    def _now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):  # each auto_find_batch_size attempt
        self.seconds, self._first_begin, self.first_step_end = [], None, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = self._now()
        self._first_begin = self._first_begin or self._t0

    def on_step_end(self, args, state, control, **kwargs):
        t = self._now()
        self.seconds.append(t - self._t0)
        self.first_step_end = self.first_step_end or t
        over = t - self._first_begin > self.cap_s or time.time() > self.deadline
        if len(self.seconds) >= self.min_steps and over:
            control.should_training_stop = True

    def summary(self, tokens_per_step: int) -> dict:
        """Tokens/s over the steps after the first (warm-up: kernels, optimizer states)."""
        later = self.seconds[1:]
        return {"steps_done": len(self.seconds), "step_seconds": [round(x, 4) for x in self.seconds],
                "tokens_per_step": tokens_per_step,
                "tokens_per_s": tokens_per_step * len(later) / sum(later) if later else None,
                "first_good_step_seconds": (self.first_step_end - self.train_called)
                if self.first_step_end and self.train_called else None}


# --------------------------------------------------------------------------- the schedule (no torch)


def step_seconds(spec, s) -> float:
    """One optimizer step's seconds: the host's launches or the GPU's FLOPs, whichever is longer."""
    launch = s.grad_accum * spec.num_layers * LAUNCH_S_PER_LAYER[s.method] * (1 if s.grad_ckpt else NO_CKPT_FACTOR)
    flops = s.micro_batch * s.grad_accum * s.seq_len * (8 if s.grad_ckpt else 6) * spec.params_total
    return max(launch, flops / (MFU * H100_BF16_FLOPS))


def trial_seconds(spec, s, steps: int, afbs_start: int = 0) -> float:
    """Build (QLoRA: loading and quantizing), the first step twice (warm-up), the steps, tear-down;
    auto_find_batch_size: plus one failed micro-step per halving."""
    build = 2.0 + (spec.params_total * 2 / 1.4e9 if s.method == "qlora" else spec.params_total / 8e9)
    t = build + (steps + 1) * step_seconds(spec, s)
    if afbs_start:
        halvings = max(0, (afbs_start // max(s.micro_batch, 1)).bit_length() - 1)
        t += halvings * (2.0 + spec.num_layers * LAUNCH_S_PER_LAYER[s.method])
    return t


def trial_key(model: str, overrides: dict, seq_len: int, effective_batch: int, budget: str, role: str,
              setup: dict, afbs_start=None) -> str:
    return json.dumps([model, overrides or {}, seq_len, effective_batch, budget, role, setup, afbs_start or None],
                      sort_keys=True)


def record_key(r: dict) -> str:
    return trial_key(r["model"], r.get("overrides"), r["seq_len"], r["effective_batch"], r["budget"], r["role"],
                     r["setup"], r.get("afbs_start"))


def load_done(path: str) -> tuple[set, set]:
    """(trial keys with a result, (model, seq_len, effective_batch, budget) with a plan line) in `path`."""
    from benchmarks.jsonl import records

    trials, plans = set(), set()
    for r in records(path):
        if r.get("kind") == "plan":
            plans.add((r["model"], r["seq_len"], r["effective_batch"], r["budget"]))
        if r.get("kind") != "trial" or r.get("status") not in ("ok", "oom", "error"):
            continue
        if r["role"] == "plan" and r["status"] == "ok" and (r.get("steps_done") or 0) < r["steps_asked"]:
            continue  # cut by its time cap: run it again
        trials.add(record_key(r))
    return trials, plans


def distinct(s) -> tuple:
    return (s.method, s.precision, s.micro_batch, s.grad_ckpt, s.attn)


def alternatives(plan, top: int, min_ratio: float) -> list:
    """Fitting candidates worth trying besides the chosen one: the next `top` by predicted speed that
    differ from the chosen and each other in more than the optimizer or allocator, and the fastest of
    each other method when predicted at least `min_ratio` of the chosen's speed."""
    chosen = plan.chosen
    seen = {distinct(chosen.setup)}
    out = []
    for c in plan.candidates[1:]:
        if len(out) >= top:
            break
        if distinct(c.setup) not in seen:
            seen.add(distinct(c.setup))
            out.append(c)
    for method in ("full", "lora", "qlora"):
        best = next((c for c in plan.candidates if c.setup.method == method), None)
        if (method != chosen.setup.method and best is not None and distinct(best.setup) not in seen
                and best.tokens_per_s >= min_ratio * chosen.tokens_per_s):
            seen.add(distinct(best.setup))
            out.append(best)
    return out


def plan_key(model: str, overrides: dict, seq_len: int, effective_batch: int, budget: str) -> str:
    return json.dumps([model, overrides or {}, seq_len, effective_batch, budget], sort_keys=True)


def precomputed_entry(p, nl, seconds: float) -> dict:
    """What the GPU run needs of a replay-aware plan: the chosen setup, the ranking below it, the
    next-larger micro-batch, and what the replay checked."""
    return {"chosen": setup_json(p.chosen.setup), "candidates": [setup_json(c.setup) for c in p.candidates[:12]],
            "next_larger": setup_json(nl.setup) if nl is not None else None, "replay": p.replay,
            "notes": list(p.notes), "seconds": round(seconds, 2)}


def load_plans_cache(path: str) -> dict:
    with open(path) as f:
        return json.load(f)["plans"]


def _setup(d: dict):
    from vramfit.memory.setup import Setup

    return Setup(**{k: v for k, v in d.items() if k in Setup.__dataclass_fields__ and v is not None})


def from_cache(p, entry: dict, ev) -> tuple:
    """The fast plan `p` turned into the precomputed replay-aware one: (plan, next-larger Candidate)."""
    cands = [ev.candidate(_setup(d), p.device, p.usable_bytes) for d in entry["candidates"]]
    cands = [dataclasses.replace(c, fits=True) for c in cands]
    nl = ev.candidate(_setup(entry["next_larger"]), p.device, p.usable_bytes) if entry["next_larger"] else None
    from vramfit.planner.recheck import with_replay_peaks

    cands[0] = with_replay_peaks(cands[0], entry["replay"]["checks"])
    p = dataclasses.replace(p, chosen=cands[0], candidates=tuple(cands), replay=entry["replay"],
                            notes=tuple(entry["notes"]))
    return p, nl


def precompute_plans(args) -> int:
    """--precompute-plans: every model's and budget's replay-aware plan and next-larger micro-batch
    into --out-plans (JSON), for a GPU run's --plans-cache: the replays cost CPU seconds, not GPU."""
    started = time.time()
    plans, seconds = {}, {}
    for model in args.models:
        t = time.time()
        w = Work(args, model)
        plans.update(w.cached_plans)
        seconds[model] = round(time.time() - t, 1)
        print(f"[plan_proof] {model}: {len(w.cached_plans)} plans in {seconds[model]:.0f} s", flush=True)
    out = {"planner": "replay" if args.simulate_allocator else "fast", "models": args.models,
           "budgets": args.budgets, "seq_len": args.seq_len, "effective_batch": args.effective_batch,
           "tiny": args.tiny, "seconds": round(time.time() - started, 1), "seconds_per_model": seconds,
           "plans": plans}
    Path(args.out_plans).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out_plans, "w") as f:
        json.dump(out, f, indent=1)
    print(f"[plan_proof] {len(plans)} plans -> {args.out_plans} in {out['seconds']:.0f} s")
    return 0


class Work:
    """One model's plans and its trials in pass order, each with its estimated seconds (torch-free:
    the parent prints and splits the schedule, the worker runs it)."""

    def __init__(self, args, model: str):
        import vramfit
        from vramfit.errors import VramfitError
        from vramfit.planner.search import Evaluator
        from vramfit.model.spec import load_spec

        self.model = model
        self.overrides = dict(TINY_OVERRIDES) if args.tiny else {}
        self.spec = load_spec(model, overrides=self.overrides)
        self.plans, self.plan_records, self.trials, self.next_larger = {}, [], [], {}
        self.planner = "replay" if args.simulate_allocator else "fast"
        self.cached_plans: dict = {}  # plan key -> what --out-plans wrote (see precomputed_entry)
        cache = load_plans_cache(args.plans_cache) if args.plans_cache else {}
        ev = Evaluator(self.spec)
        for budget in args.budgets:
            t = time.perf_counter()
            device = plan_device(budget)
            rec = {"model": model, "overrides": self.overrides, "seq_len": args.seq_len,
                   "effective_batch": args.effective_batch, "kind": "plan", "budget": budget,
                   "plan_device": dataclasses.asdict(device), "planner": self.planner}
            key = plan_key(model, self.overrides, args.seq_len, args.effective_batch, budget)
            try:
                p = vramfit.plan(self.spec, gpu=device, seq_len=args.seq_len, effective_batch=args.effective_batch,
                                 simulate_allocator=args.simulate_allocator and key not in cache)
            except VramfitError as exc:
                p = None
                rec.update(status="nothing_fits", message=str(exc))
            if p is not None and args.simulate_allocator and key in cache:
                p, nl = from_cache(p, cache[key], ev)
                rec["plans_cache"] = args.plans_cache
            elif p is not None:
                nl = next_larger(p, ev, spec=self.spec if args.simulate_allocator else None)
            rec["plan_seconds"] = time.perf_counter() - t
            if p is not None:
                self.plans[budget] = p
                self.next_larger[budget] = nl
                self.cached_plans[key] = precomputed_entry(p, nl, rec["plan_seconds"])
                rec["replay"] = p.replay
                rec.update(status="ok", chosen=candidate_json(p.chosen), usable_bytes=p.usable_bytes,
                           headroom_bytes=p.headroom_bytes, fitting=len(p.candidates),
                           top=[candidate_json(c) for c in p.candidates[:8]],
                           next_larger=candidate_json(nl) if nl else None)
            try:  # what the plain size form (RTX 4090 throughput) would choose
                plain = vramfit.plan(self.spec, gpu=budget, seq_len=args.seq_len, effective_batch=args.effective_batch)
                rec["plain_size_chosen"] = setup_json(plain.setup)
            except VramfitError:
                rec["plain_size_chosen"] = None
            self.plan_records.append(rec)

        def add(pass_no, p, budget, steps, cap, min_steps, afbs_start=0):
            est = trial_seconds(self.spec, p.chosen.setup, steps, afbs_start)
            self.trials.append({"pass": pass_no, "role": PASSES[pass_no], "plan": p, "budget": budget,
                                "planner": self.planner,
                                "steps": steps, "cap": cap, "min_steps": min_steps, "afbs_start": afbs_start,
                                "estimate": est,
                                "key": trial_key(model, self.overrides, args.seq_len, args.effective_batch, budget,
                                                 PASSES[pass_no], setup_json(p.chosen.setup), afbs_start)})

        for budget, p in self.plans.items():
            add(1, p, budget, args.steps, args.plan_cap_s, 3)
        for budget, p in self.plans.items():
            c = self.next_larger[budget]
            if c is not None:
                add(2, dataclasses.replace(p, chosen=c), budget, 3, args.other_cap_s, 2)
        for budget, p in self.plans.items():
            for c in alternatives(p, args.alts, args.alt_min_ratio):
                add(3, dataclasses.replace(p, chosen=c), budget, args.alt_steps, args.other_cap_s, 3)
        if model in args.afbs_models:
            for budget in args.afbs_budgets:
                if budget in self.plans:
                    add(4, self.plans[budget], budget, args.alt_steps, args.other_cap_s * 3, 3,
                        afbs_start=args.afbs_start)
        if args.confirm_nothing_fits:
            from vramfit.planner.search import search
            from vramfit.planner.space import make_space

            for budget in args.budgets:
                if budget not in self.plans and self.spec.params_total:
                    try:
                        device = plan_device(budget)
                        space = make_space(self.spec, device, seq_len=args.seq_len,
                                           effective_batch=args.effective_batch)
                        res = search(self.spec, device, space, details=False)
                    except VramfitError:
                        continue
                    add(5, dataclasses.replace(res, chosen=res.closest), budget, 2, args.other_cap_s, 2)

    def pending(self, args, done: set) -> list:
        return [t for t in self.trials if t["pass"] in args.passes and t["key"] not in done]

    def seconds(self, args, done: set) -> float:
        """Estimated seconds of this model's process for what is pending (0: nothing to start)."""
        todo = self.pending(args, done)
        if not todo:
            return 0.0
        ckpt = any(t["plan"].chosen.setup.method == "qlora" for t in todo)
        return (PROCESS_START_S + sum(t["estimate"] for t in todo)
                + (self.spec.params_total * 2 / CHECKPOINT_BYTES_PER_S if ckpt else 0.0))


def print_schedule(args, works: dict, done: set) -> float:
    total = 0.0
    print(f"[plan_proof] schedule: passes {args.passes}, seq_len {args.seq_len}, effective batch "
          f"{args.effective_batch}, {args.steps} plan steps; estimated from the H100 rates of 2026-11-23")
    for model, w in works.items():
        todo = w.pending(args, done)
        per = {}
        for t in todo:
            per[t["pass"]] = per.get(t["pass"], 0.0) + t["estimate"]
        sec = w.seconds(args, done)
        total += sec
        passes = ", ".join(f"pass {k} ({PASSES[k]}): {len([t for t in todo if t['pass'] == k])} trials "
                           f"{v:.0f} s" for k, v in sorted(per.items()))
        print(f"  {model:14s} {sec:6.0f} s  {passes or 'nothing pending'}")
        for t in todo:
            s = t["plan"].chosen.setup
            print(f"      {t['budget']:>5s} {t['role']:11s} {s.method} {s.precision} {s.optim} "
                  f"{s.micro_batch}x{s.grad_accum}{' ckpt' if s.grad_ckpt else ''}"
                  f"{' afbs from ' + str(t['afbs_start']) if t['afbs_start'] else ''}: {t['estimate']:.0f} s")
    print(f"[plan_proof] total {total:.0f} s (--max-seconds {args.max_seconds:.0f})")
    need = {m: w.seconds(args, done) for m, w in works.items()}
    n = max(1, math.ceil(total / args.max_seconds))
    groups = [[] for _ in range(n)]
    for m in sorted(need, key=need.get, reverse=True):  # largest first, into the lightest command
        min(groups, key=lambda g: sum(need[x] for x in g)).append(m)
    for g in groups:
        order = [m for m in args.models if m in g]
        print(f"[plan_proof] a command: --models {' '.join(order)}  ({sum(need[m] for m in g):.0f} s)")
    return total


# --------------------------------------------------------------------------- one model's process


def environment(torch) -> dict:
    from benchmarks.accuracy import probe

    sampler = probe.start_sampler() if torch.cuda.is_available() else None
    env = probe.environment(torch, sampler)
    if sampler:
        sampler.stop()
    return env


def model_main(args) -> None:
    """One model: its pending trials, passes in order, in one process."""
    import torch

    model = args.worker
    from benchmarks.train_proof.profile import install_from_env

    install_from_env()  # VRAMFIT_PROFILE_DIR: where the steps' time goes (benchmarks/train_proof/profile.py)
    if args.device == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the context, before anything is measured
    env = environment(torch)
    tr = Trials(args, model, args.deadline)
    emit(args.out, tr.base(kind="environment", environment=env, outside_bytes=tr.outside, device=args.device,
                           argv=sys.argv[1:]))
    w = Work(args, model)
    done, planned = load_done(args.out) if args.skip_done else (set(), set())
    for rec in w.plan_records:
        if (model, args.seq_len, args.effective_batch, rec["budget"]) not in planned:
            emit(args.out, rec)
    try:
        for t in w.pending(args, done):
            tr.run(t["plan"], t["role"], t["budget"], t["steps"], t["cap"], t["min_steps"],
                   afbs_start=t["afbs_start"], estimate_s=t["estimate"], pass_no=t["pass"], planner=t["planner"])
    finally:
        tr.cleanup()


# --------------------------------------------------------------------------- the parent


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON lines file (appended)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="shrunk models and budgets: the logic on CPU")
    ap.add_argument("--models", nargs="+", help="a shard of the models")
    ap.add_argument("--budgets", nargs="+")
    ap.add_argument("--passes", nargs="+", type=int, default=[1, 2, 3, 4],
                    help="1 plan, 2 next_larger, 3 alt, 4 afbs, 5 smallest (5 also needs --confirm-nothing-fits)")
    ap.add_argument("--skip-done", action="store_true", help="skip the trials --out already has a result for")
    ap.add_argument("--print-schedule", action="store_true", help="print the trials and estimated seconds, run nothing")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--effective-batch", type=int, default=EFFECTIVE_BATCH)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of the plan's setup")
    ap.add_argument("--alt-steps", type=int, default=3)
    ap.add_argument("--alts", type=int, default=1, help="next-fastest distinct fitting setups tried")
    ap.add_argument("--alt-min-ratio", type=float, default=0.8,
                    help="another method's best is tried when predicted at least this share of the plan's speed")
    ap.add_argument("--plan-cap-s", type=float, default=240.0, help="time cap of one plan trial (>= 3 steps)")
    ap.add_argument("--other-cap-s", type=float, default=25.0, help="time cap of the other trials")
    ap.add_argument("--afbs-models", nargs="*")
    ap.add_argument("--afbs-budgets", nargs="*")
    ap.add_argument("--afbs-start", type=int, default=64)
    ap.add_argument("--confirm-nothing-fits", action="store_true")
    ap.add_argument("--no-ballast", action="store_true",
                    help="enforce the budget with the allocator fraction only (before 2026-11-23 evening)")
    ap.add_argument("--drop-checkpoints", action="store_true", help="delete the QLoRA checkpoints at the end")
    ap.add_argument("--max-seconds", type=float, default=520.0, help="global time guard, start-up included")
    ap.add_argument("--simulate-allocator", action="store_true",
                    help="plan with the allocator-replay recheck (vramfit plan --simulate-allocator); next_larger "
                         "is the first larger micro-batch that planner rejects")
    ap.add_argument("--plans-cache", help="replay-aware plans precomputed by --precompute-plans (JSON): no replays here")
    ap.add_argument("--precompute-plans", action="store_true",
                    help="write the plans (with --simulate-allocator: replay-aware) to --out-plans and exit")
    ap.add_argument("--out-plans", help="with --precompute-plans: the JSON file written")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.precompute_plans and not a.out_plans:
        ap.error("--precompute-plans needs --out-plans")
    if not a.out and not a.print_schedule and not a.precompute_plans:
        ap.error("--out is required (unless --print-schedule or --precompute-plans)")
    a.models = a.models or list(TINY_MODELS if a.tiny else MODELS)
    a.budgets = a.budgets or list(TINY_BUDGETS if a.tiny else BUDGETS)
    a.seq_len = a.seq_len or (TINY_SEQ_LEN if a.tiny else SEQ_LEN)
    a.afbs_models = a.afbs_models if a.afbs_models is not None else list(TINY_MODELS[:1] if a.tiny else AFBS_MODELS)
    a.afbs_budgets = a.afbs_budgets if a.afbs_budgets is not None else list(TINY_BUDGETS[2:] if a.tiny else AFBS_BUDGETS)
    if 5 in a.passes:
        a.confirm_nothing_fits = True
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        model_main(args)
        return 0
    if args.precompute_plans:
        return precompute_plans(args)
    start = time.time()
    end = start + args.max_seconds
    done = load_done(args.out)[0] if args.skip_done and args.out else set()
    works = {m: Work(args, m) for m in args.models}
    need = {m: w.seconds(args, done) for m, w in works.items()}
    if args.print_schedule:
        print_schedule(args, works, done)
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print_schedule(args, works, done)
    for i, model in enumerate(args.models):
        if need[model] <= 0:
            print(f"[plan_proof] {model}: nothing pending", flush=True)
            continue
        rest = sum(need[m] for m in args.models[i:])
        # each model gets its estimate's share of the time left; what an earlier one saved passes on
        deadline = time.time() + (end - time.time()) * need[model] / rest
        cmd = [sys.executable, "-m", "benchmarks.plan_proof.run", *(argv if argv is not None else sys.argv[1:]),
               "--worker", model, "--deadline", str(deadline)]
        t = time.time()
        print(f"[plan_proof] {model}: {deadline - t:.0f} s (estimated {need[model]:.0f} s)", flush=True)
        try:
            rc = subprocess.run(cmd, check=False, timeout=max(deadline - t + 20, 1)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        emit(args.out, {"kind": "model_done", "model": model, "rc": rc, "seconds": time.time() - t,
                        "share_s": deadline - t, "estimate_s": need[model], "passes": args.passes})
    emit(args.out, {"kind": "run_done", "seconds": time.time() - start, "max_seconds": args.max_seconds,
                    "passes": args.passes, "models": args.models})
    return 0


if __name__ == "__main__":
    sys.exit(main())
