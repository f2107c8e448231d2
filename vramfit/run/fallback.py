"""The budget of a run and the OOM fall-back: the usable bytes of --gpu, the allocator cap of
--enforce-budget, the ladder of cheaper setups tried after an out-of-memory step, what to say
after an out-of-memory error while the model loads, and freeing what the failed trainer held."""

from __future__ import annotations

import gc
import re

from vramfit.errors import VramfitError
from vramfit.memory.setup import LEVERS, Setup, validate
from vramfit.run.predict import predict, runtime_problem



def usable_bytes(gpu: str, headroom: str) -> int:
    """Device memory the run may use on GPU (`--gpu` forms): its free memory less the headroom."""
    from vramfit.planner.gpu import resolve_gpu
    from vramfit.planner.search import parse_headroom

    free = resolve_gpu(gpu or "auto").free_bytes
    return free - parse_headroom(headroom, free)


def allocator_cap_bytes(gpu: str, headroom: str, constants=None) -> int:
    """`--enforce-budget`: the most torch's caching allocator may reserve so that the process, as
    nvidia-smi shows it, stays within `gpu` less the headroom: that budget less what lives outside
    the allocator (the CUDA context and the kernels a training step loads)."""
    from vramfit.memory.constants import DEFAULT

    c = constants or DEFAULT
    return usable_bytes(gpu, headroom) - c.cuda_context_bytes - c.kernel_growth_bytes


def enforce_budget(gpu: str | None, headroom: str, constants=None) -> dict:
    """Emulate a smaller card on this one: `torch.cuda.set_per_process_memory_fraction` at
    `allocator_cap_bytes`, so an allocation past it raises torch.OutOfMemoryError in the step as
    the smaller card would.  -> what was enforced (for the run report)."""
    import torch

    if not torch.cuda.is_available():
        raise VramfitError("--enforce-budget caps a CUDA GPU's allocator: there is no CUDA GPU here")
    if gpu is None or re.fullmatch(r"(cuda|gpu|auto)(:\d+)?", gpu.strip().lower()):
        raise VramfitError("--enforce-budget needs --gpu with a smaller card's name or size (e.g. --gpu 16GB): "
                           "it emulates that card on this one")
    dev = torch.cuda.current_device()
    total = int(torch.cuda.get_device_properties(dev).total_memory)
    cap = allocator_cap_bytes(gpu, headroom, constants)
    if cap <= 0 or cap > total:
        raise VramfitError(f"--gpu {gpu} less the headroom and the CUDA context leaves {cap:,} bytes for the "
                           f"allocator; this GPU has {total:,}: give a size between")
    fraction = cap / total
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    return {"gpu": gpu, "headroom": headroom, "allocator_cap_bytes": cap, "device_total_bytes": total,
            "fraction": fraction}


# --------------------------------------------------------------------------- the OOM fall-back


def fallback_ladder(s: Setup) -> list[Setup]:
    """Cheaper setups in the order the fall-back tries them: smaller micro-batches (more
    accumulation, the same effective batch), then gradient checkpointing (at each micro-batch
    again), then LoRA, then QLoRA.  A method change keeps the LoRA layers, so an adapter
    checkpoint stays loadable."""
    effective = s.micro_batch * s.grad_accum
    micro = [d for d in range(s.micro_batch, 0, -1) if effective % d == 0]
    methods = [s.method] + [m for m in ("lora", "qlora") if ("full", "lora", "qlora").index(m) >
                            ("full", "lora", "qlora").index(s.method)]
    out = []
    for m in methods:
        base = s
        if m != s.method:
            targets = s.targets if s.method != "full" else "all-linear"
            precision = s.precision
            if m == "qlora" and precision == "32-true":
                precision = "bf16-amp"
            base = s.with_(method=m, precision=precision, target_modules=targets)
        for ckpt in sorted({base.grad_ckpt, True}):
            for mb in micro:
                c = base.with_(grad_ckpt=ckpt, micro_batch=mb, grad_accum=effective // mb)
                if c != s and c not in out:
                    out.append(c)
    return out


def fallback_setup(spec, s: Setup, scale: float, cap_bytes: int | None, cuda: bool, constants=None):
    """After an OOM at `s`: the first setup of the ladder predicted to fit once its reserved peak
    is scaled by the measured overshoot (`scale` = needed / predicted); without a known cap, the
    first of the ladder.  -> (Setup, its prediction) or (None, None)."""
    for c, p in _runnable(spec, s, cuda, constants):
        if cap_bytes is None or p["peak_reserved_bytes"] * scale <= cap_bytes:
            return c, p
    return None, None


def _runnable(spec, s: Setup, cuda: bool, constants=None, other_method: bool = False):
    """(setup, its prediction) down the fall-back ladder of `s`, for the rungs that are valid and
    that this machine can run (`other_method`: only those with another method than `s`)."""
    for c in fallback_ladder(s):
        if other_method and c.method == s.method:
            continue
        try:
            validate(c)
        except VramfitError:
            continue
        if runtime_problem(c, cuda):
            continue
        yield c, predict(spec, c, constants)


def load_fallback(spec, s: Setup, budget_bytes: int | None, cuda: bool, constants=None):
    """After an OOM while the model loads (its weights did not fit, whatever the batch): the first
    setup of the ladder with a method whose weights take less (full -> LoRA -> QLoRA) that this
    machine can run and is predicted to fit `budget_bytes` (device bytes; None: any).
    -> (Setup, its prediction) or (None, None)."""
    for c, p in _runnable(spec, s, cuda, constants, other_method=True):
        if budget_bytes is None or p["device_bytes"] <= budget_bytes:
            return c, p
    return None, None


def setup_flags(s: Setup) -> str:
    """The `vramfit train` options that give `s`."""
    flags = [f"--method {s.method}"]
    if s.method != "full":
        flags.append(f"--lora-r {s.lora_r}")
    flags += [f"--precision {s.precision}", f"--optim {s.optim}", f"--micro-batch {s.micro_batch}",
              f"--grad-accum {s.grad_accum}", "--grad-ckpt" if s.grad_ckpt else "--no-grad-ckpt"]
    flags += ["--" + k.replace("_", "-") for k in LEVERS if getattr(s, k)]
    if s.method == "qlora" and not s.kbit_prep:
        flags.append("--no-kbit-prep")
    return " ".join(flags)


def load_oom_message(spec, s: Setup, phase: str, error: str, predicted: dict, budget_bytes: int | None,
                     enforced: dict | None, cuda: bool, constants=None, model: str | None = None,
                     gpu: str | None = None) -> str:
    """What went wrong and what to do when the model ran out of memory before its first step: the
    phase, the budget, what the setup's weights were predicted to take, and the next setup to try."""
    from vramfit.report import fmt_bytes, setup_label

    weights = sum(v for k, v in predicted.get("breakdown", {}).items() if k.startswith("weights"))
    if enforced:
        budget = (f"the budget is --gpu {enforced['gpu']} less {enforced['headroom']} headroom, enforced: torch's "
                  f"allocator capped at {fmt_bytes(enforced['allocator_cap_bytes'])}")
    elif budget_bytes is not None:
        budget = f"the budget is {fmt_bytes(budget_bytes)} usable on this GPU"
    else:
        budget = "no GPU budget is known here"
    need = f"the setup's weights are predicted at {fmt_bytes(weights)}, its peak at " \
           f"{fmt_bytes(predicted['device_bytes'])}" if weights else \
        f"the setup's peak is predicted at {fmt_bytes(predicted['device_bytes'])}"
    new, new_pred = load_fallback(spec, s, budget_bytes, cuda, constants)
    if new is not None:
        advice = (f"Try {setup_label(new)} ({setup_flags(new)}), predicted at {fmt_bytes(new_pred['device_bytes'])}"
                  f", or a smaller model")
    else:
        advice = "No setup with lighter weights is predicted to fit: try a smaller model or a GPU with more memory"
    gpu = gpu or (enforced or {}).get("gpu")
    plan = f"; `vramfit plan {model}{' --gpu ' + gpu if gpu else ''}` shows what fits" if model else ""
    return (f"out of memory while {phase} with {setup_label(s)} ({error}); {budget}; {need}. {advice}"
            f"{plan}")


_SIZE = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)")


def oom_measurement(exc: BaseException, tracker, predicted: dict) -> dict:
    """What the failed step needed at least: the peak allocated in this attempt plus the request
    that failed; its ratio to the prediction; and the allocator's cap."""
    m = _SIZE.search(str(exc))
    tried = int(float(m.group(1)) * 1024 ** ("B", "KiB", "MiB", "GiB", "TiB").index(m.group(2))) if m else 0
    peak = tracker.attempt_peak("peak_allocated_bytes")
    needed = (peak or 0) + tried
    scale = max(1.0, needed / predicted["peak_allocated_bytes"]) if peak else 1.0
    return {"tried_bytes": tried, "measured_bytes": needed if peak else None, "scale": round(scale, 4),
            "cap_bytes": tracker.allocator_limit_bytes or tracker.allocator_room_bytes,
            "error": str(exc).splitlines()[0][:300] if str(exc) else "out of memory"}


def forget_bnb_overrides() -> None:
    """With a bitsandbytes 8-bit optimizer, transformers' Trainer registers every nn.Embedding with
    bitsandbytes' process-wide GlobalOptimManager (32-bit states for embeddings).  The manager keeps
    the modules, and so their weights, for the life of the process: measured on an H100, one
    embedding per Trainer (0.5 GB for Llama-3.2-1B in bf16, 2.1 GB for Llama-3.1-8B's fp32 one
    under QLoRA) that no later attempt could use.  Its stale parameter ids could also match new
    parameters.  Reset it between Trainers."""
    import sys

    optim = sys.modules.get("bitsandbytes.optim.optimizer")
    manager = getattr(getattr(optim, "GlobalOptimManager", None), "_instance", None)
    if manager is not None:
        manager.initialize()


def free_memory(trainer) -> None:
    """Drop what a failed attempt holds on the GPU (the caller drops its own references)."""
    import torch

    if trainer is not None:
        trainer.accelerator.free_memory()
        trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    forget_bnb_overrides()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
