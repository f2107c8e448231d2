"""The GPU proof of `vramfit plan` under enforced budgets (issue 4), in one command.

    python -m benchmarks.plan_proof.run --out $OUT/plan_proof.jsonl --max-seconds 480
    python -m benchmarks.plan_proof.run --device cpu --tiny --out /tmp/pp.jsonl     # the same code path on CPU

For each model (one fresh process per model, so each starts with a clean CUDA context and no
import is repeated within it) and each budget (8, 12, 16, 24, 40 GB, decimal as `--gpu 8GB`):

- plan: `vramfit.plan(spec, gpu=Device)` where the Device has the budget as its memory and the
  H100 SXM's throughput (the plain size form `8GB` borrows an RTX 4090's, which would rank setups
  for another card; its choice is recorded too);
- the budget is enforced with `torch.cuda.set_per_process_memory_fraction((budget - outside) /
  total)`, outside = what vramfit counts outside torch's allocator (CUDA context + kernels,
  vramfit/constants.py), so the allocator may reserve what the budget leaves for it;
- trials, each building the model as a launcher would from the plan's own objects
  (`model_kwargs`, `lora_config`, `bnb_config`, `training_arguments`; QLoRA: from_pretrained of
  a random bf16 checkpoint written once per model, prepare_model_for_kbit_training) and training
  on random tokens with transformers' Trainer:
    plan         the chosen setup, --steps optimizer steps (cut at --plan-cap-s, at least 3)
    next_larger  the chosen setup at the next micro-batch the planner rejected (same accumulation
                 product): does it really OOM (or need the headroom)?
    alt          the planner's next fastest fitting setups and the best of each other method: the
                 fastest setup that really fits, found by trying
    afbs         transformers' auto_find_batch_size from batch 64, same method as the plan
    smallest     where nothing fits: the smallest setup searched (does it really OOM?)
  Phases run in that priority across all budgets (plans of every budget first), each trial
  checks the time left, so a timeout loses only the least important work.

Each result is one JSON line, flushed and fsynced at once.  `python -m
benchmarks.plan_proof.report FILE` turns the lines into the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
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
AFBS_BUDGETS = ("12GB", "16GB", "24GB")
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
    from vramfit.gpu import load_profiles, size_device

    d = size_device(budget)
    h = load_profiles()[THROUGHPUT_PROFILE]
    return dataclasses.replace(d, name=f"{budget} of an {h.name}", bf16_tflops=h.bf16_tflops,
                               fp16_tflops=h.fp16_tflops, bandwidth_bytes_per_s=h.bandwidth_bytes_per_s,
                               compute_capability=h.compute_capability, throughput_from=h.key, note="")


def setup_json(s) -> dict:
    from vramfit.planner import _setup_json

    return _setup_json(s)


def candidate_json(c) -> dict:
    return {"setup": setup_json(c.setup), "predicted_device_bytes": c.device_bytes,
            "predicted_allocated_bytes": c.peak_allocated_bytes, "predicted_reserved_bytes": c.peak_reserved_bytes,
            "predicted_tokens_per_s": round(c.tokens_per_s, 1), "predicted_fits": c.fits}


def next_larger(plan):
    """The chosen setup at the next micro-batch the search had (a divisor of the effective batch)."""
    s = plan.chosen.setup
    effective = s.micro_batch * s.grad_accum
    larger = [d for d in range(s.micro_batch + 1, effective + 1) if effective % d == 0]
    return s.with_(micro_batch=larger[0], grad_accum=effective // larger[0]) if larger else None


def alternatives(plan, top: int) -> list:
    """Fitting candidates worth trying besides the chosen one: the next `top` by predicted speed,
    and the fastest of each other method."""
    chosen = plan.chosen.setup
    out = list(plan.candidates[1:1 + top])
    for method in ("full", "lora", "qlora"):
        best = next((c for c in plan.candidates if c.setup.method == method), None)
        if method != chosen.method and best is not None and best not in out:
            out.append(best)
    return out


# --------------------------------------------------------------------------- one trial (torch)


class Trials:
    """Everything one model's process needs: spec, config, checkpoint, the output file."""

    def __init__(self, args, model: str, deadline: float):
        import torch

        self.torch, self.args, self.model, self.deadline = torch, args, model, deadline
        self.cuda = args.device == "cuda"
        self.overrides = dict(TINY_OVERRIDES) if args.tiny else {}
        from vramfit.spec import load_spec, resolve_config_dict

        self.spec = load_spec(model, overrides=self.overrides)
        self.config_data = {**resolve_config_dict(model)[1], **self.overrides}
        self.checkpoint = None
        self.scratch = None
        from vramfit.constants import DEFAULT

        self.outside = DEFAULT.cuda_context_bytes + DEFAULT.kernel_growth_bytes
        self.total = torch.cuda.get_device_properties(0).total_memory if self.cuda else None

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

    # -- the QLoRA checkpoint
    def qlora_checkpoint(self) -> str:
        if self.checkpoint:
            return self.checkpoint
        import torch
        from transformers import AutoModelForCausalLM

        from vramfit.spec import config_from_dict

        t = time.perf_counter()
        need = 2.3 * self.spec.params_total * 2
        shm = Path("/dev/shm")
        root = str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > need else None
        self.scratch = tempfile.mkdtemp(prefix="plan_proof_", dir=root)
        self.enforce(None)
        torch.manual_seed(SEED)
        with torch.device("cuda" if self.cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(config_from_dict(self.config_data, self.model),
                                                     dtype=torch.bfloat16)
        model.save_pretrained(self.scratch, max_shard_size="5GB")
        del model
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        self.checkpoint = self.scratch
        emit(self.args.out, self.base(kind="checkpoint", where=self.scratch, seconds=time.perf_counter() - t))
        return self.checkpoint

    def cleanup(self) -> None:
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # -- building the model as the launcher would, from the plan's objects
    def build(self, p):
        import torch
        from transformers import AutoModelForCausalLM

        from vramfit.spec import config_from_dict

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
            **extra) -> dict:
        """Train p's chosen setup under the budget; one JSON line.  Never raises."""
        import torch
        import transformers

        from benchmarks.accuracy import probe, train_case
        from vramfit.gpu import parse_size
        from vramfit.train import free_memory

        s = p.chosen.setup
        budget_bytes = parse_size(budget)
        rec = self.base(kind="trial", role=role, budget=budget, budget_bytes=budget_bytes,
                        usable_bytes=p.usable_bytes, steps_asked=steps, cap_s=cap_s,
                        **candidate_json(p.chosen), **extra)
        rec["paged_optimizer"] = s.optim.startswith("paged")  # managed memory: outside the fraction
        if self.time_left() < cap_s / 2 + 5:
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
        rec["enforced_fraction"] = self.enforce(budget_bytes)
        rec["allocator_limit_bytes"] = int(rec["enforced_fraction"] * self.total) if self.cuda else None
        sampler = probe.start_sampler() if self.cuda else None
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
            free_memory(trainer)
            trainer = model = None
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
                rec["leftover_allocated_bytes"] = torch.cuda.memory_allocated()
            rec["seconds"] = time.perf_counter() - started
            emit(self.args.out, rec)
        return rec


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


# --------------------------------------------------------------------------- one model's process


def environment(torch) -> dict:
    from benchmarks.accuracy import probe

    sampler = probe.start_sampler() if torch.cuda.is_available() else None
    env = probe.environment(torch, sampler)
    if sampler:
        sampler.stop()
    return env


def model_main(args) -> None:
    """All budgets of one model, phases in priority order."""
    import torch

    import vramfit
    from vramfit.errors import VramfitError
    from vramfit.planner import Evaluator

    model = args.worker
    if args.device == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the context, before anything is measured
    env = environment(torch)
    tr = Trials(args, model, args.deadline)
    emit(args.out, tr.base(kind="environment", environment=env, outside_bytes=tr.outside, device=args.device,
                           argv=sys.argv[1:]))
    plans = {}
    for budget in args.budgets:
        t = time.perf_counter()
        device = plan_device(budget)
        rec = tr.base(kind="plan", budget=budget, plan_device=dataclasses.asdict(device))
        try:
            p = vramfit.plan(tr.spec, gpu=device, seq_len=args.seq_len, effective_batch=args.effective_batch)
        except VramfitError as exc:
            p = None
            rec.update(status="nothing_fits", message=str(exc))
        rec["plan_seconds"] = time.perf_counter() - t
        if p is not None:
            plans[budget] = p
            rec.update(status="ok", chosen=candidate_json(p.chosen), usable_bytes=p.usable_bytes,
                       headroom_bytes=p.headroom_bytes, fitting=len(p.candidates),
                       top=[candidate_json(c) for c in p.candidates[:8]],
                       next_larger=setup_json(next_larger(p)) if next_larger(p) else None)
        try:  # what the plain size form (RTX 4090 throughput) would choose
            plain = vramfit.plan(tr.spec, gpu=budget, seq_len=args.seq_len, effective_batch=args.effective_batch)
            rec["plain_size_chosen"] = setup_json(plain.setup)
        except VramfitError:
            rec["plain_size_chosen"] = None
        emit(args.out, rec)
    ev = Evaluator(tr.spec)

    def variant(p, s):
        return dataclasses.replace(p, chosen=ev.candidate(s, p.device, p.usable_bytes))

    try:
        for budget, p in plans.items():  # 1. the plan's setup
            tr.run(p, "plan", budget, args.steps, args.plan_cap_s, 3, plan_seconds=None)
        for budget, p in plans.items():  # 2. the next-larger micro-batch it rejected
            s = next_larger(p)
            if s is not None:
                tr.run(variant(p, s), "next_larger", budget, 3, args.other_cap_s, 2)
        for budget, p in plans.items():  # 3. other fitting setups: the fastest found by trying
            for c in alternatives(p, args.alts):
                tr.run(dataclasses.replace(p, chosen=c), "alt", budget, args.alt_steps, args.other_cap_s, 3)
        if model in args.afbs_models:  # 4. transformers' auto_find_batch_size, same method as the plan
            for budget in args.afbs_budgets:
                if budget in plans:
                    tr.run(plans[budget], "afbs", budget, args.alt_steps, args.other_cap_s * 2, 3,
                           afbs_start=args.afbs_start)
        if args.confirm_nothing_fits:  # 5. where nothing fits: does the smallest setup really OOM?
            for budget in args.budgets:
                if budget not in plans and tr.spec.params_total:
                    device = plan_device(budget)
                    from vramfit.planner import make_space, search

                    try:
                        space = make_space(tr.spec, device, seq_len=args.seq_len, effective_batch=args.effective_batch)
                        res = search(tr.spec, device, space, details=False)
                    except VramfitError:
                        continue
                    tr.run(dataclasses.replace(res, chosen=res.closest), "smallest", budget, 2, args.other_cap_s, 2)
    finally:
        tr.cleanup()


# --------------------------------------------------------------------------- the parent


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON lines file (appended)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="shrunk models and budgets: the logic on CPU")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--budgets", nargs="+")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--effective-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of the plan's setup")
    ap.add_argument("--alt-steps", type=int, default=6)
    ap.add_argument("--alts", type=int, default=2, help="next-fastest fitting setups tried besides each method's best")
    ap.add_argument("--plan-cap-s", type=float, default=30.0, help="time cap of one plan trial (>= 3 steps)")
    ap.add_argument("--other-cap-s", type=float, default=8.0, help="time cap of the other trials")
    ap.add_argument("--afbs-models", nargs="*")
    ap.add_argument("--afbs-budgets", nargs="*")
    ap.add_argument("--afbs-start", type=int, default=64)
    ap.add_argument("--confirm-nothing-fits", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=480.0, help="global time guard, start-up included")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.models = a.models or list(TINY_MODELS if a.tiny else MODELS)
    a.budgets = a.budgets or list(TINY_BUDGETS if a.tiny else BUDGETS)
    a.seq_len = a.seq_len or (TINY_SEQ_LEN if a.tiny else SEQ_LEN)
    a.afbs_models = a.afbs_models if a.afbs_models is not None else list(TINY_MODELS[:1] if a.tiny else AFBS_MODELS)
    a.afbs_budgets = a.afbs_budgets if a.afbs_budgets is not None else list(TINY_BUDGETS[2:] if a.tiny else AFBS_BUDGETS)
    return a


def weight(model: str, tiny: bool) -> float:
    """Share of the time a model gets: bigger models load and step slower."""
    if tiny:
        return 1.0
    from vramfit.spec import load_spec

    return 1.0 + load_spec(model).params_total / 8e9


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        model_main(args)
        return 0
    start = time.time()
    end = start + args.max_seconds
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    weights = {m: weight(m, args.tiny) for m in args.models}
    for i, model in enumerate(args.models):
        rest = sum(weights[m] for m in args.models[i:])
        deadline = time.time() + (end - time.time()) * weights[model] / rest
        cmd = [sys.executable, "-m", "benchmarks.plan_proof.run", *(argv if argv is not None else sys.argv[1:]),
               "--worker", model, "--deadline", str(deadline)]
        t = time.time()
        print(f"[plan_proof] {model}: {deadline - t:.0f} s", flush=True)
        try:
            rc = subprocess.run(cmd, check=False, timeout=max(deadline - t + 20, 1)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        emit(args.out, {"kind": "model_done", "model": model, "rc": rc, "seconds": time.time() - t,
                        "share_s": deadline - t})
    emit(args.out, {"kind": "run_done", "seconds": time.time() - start, "max_seconds": args.max_seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
