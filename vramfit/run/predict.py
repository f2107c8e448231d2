"""The prediction of a run (vramfit train) before anything loads: the allocator the run applies,
what the runtime cannot do, and the peaks, replayed over the data's own padded batch lengths."""

from __future__ import annotations

import os

from vramfit.memory.setup import Setup


def env_allocator(environ=None) -> str:
    """The allocator a run uses unless --allocator says: what PYTORCH_CUDA_ALLOC_CONF (or
    PYTORCH_ALLOC_CONF) sets expandable_segments to, and `expandable` when it is not set.

    Expandable segments are the launcher's default because real data comes in batches padded to
    different lengths, and the default allocator's fixed segments fragment under them: on an H100
    (2026-11-23, benchmarks/results/h100-2026-11-23-train-proof-2.md) Mistral-7B LoRA reserved
    39.14 GiB with the default allocator and 35.66 GiB with expandable segments, for 35.49 GiB
    allocated at most in both; Llama-3.2-1B LoRA 16.66 and 16.15 GiB for 15.8."""
    environ = os.environ if environ is None else environ
    conf = environ.get("PYTORCH_CUDA_ALLOC_CONF") or environ.get("PYTORCH_ALLOC_CONF") or ""
    opts = dict(part.split(":", 1) for part in conf.replace(" ", "").split(",") if ":" in part)
    value = opts.get("expandable_segments", "").lower()
    return "default" if value == "false" else "expandable"


def apply_allocator(s: Setup, cuda: bool) -> None:
    """Make torch's caching allocator the one the setup was predicted with (before the model loads;
    the setting applies to the segments created from then on)."""
    if cuda:
        import torch

        torch.cuda.memory._set_allocator_settings(
            f"expandable_segments:{'True' if s.allocator == 'expandable' else 'False'}")


def runtime_problem(s: Setup, cuda: bool) -> str | None:
    """What this machine cannot run of `s`, said before anything is loaded; None if all is well."""
    import importlib.util

    if not cuda:
        if s.method == "qlora":
            return "QLoRA needs a CUDA GPU (bitsandbytes' 4-bit kernels); on CPU use --method lora or full"
        if s.optimizer.needs_bnb:
            return f"optimizer {s.optim} needs bitsandbytes on a CUDA GPU; on CPU use adamw_torch"
        if s.precision.startswith("16"):
            return f"precision {s.precision} (fp16) needs a CUDA GPU; on CPU use 32-true, bf16-true or bf16-mixed"
        if s.liger:
            return "--liger: liger-kernel's kernels are triton kernels and need a CUDA GPU; on CPU drop --liger"
        if s.activation_offloading:
            return ("--activation-offloading moves activations from a CUDA GPU to host memory: on CPU there is "
                    "nothing to offload; drop it")
    else:
        import torch

        if s.precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            return "this GPU has no bf16: use --precision 16-mixed, 16-true or 32-true"
    if (s.method == "qlora" or s.optimizer.needs_bnb) and importlib.util.find_spec("bitsandbytes") is None:
        return "QLoRA and the 8-bit/paged optimizers need bitsandbytes: pip install bitsandbytes"
    if s.liger and importlib.util.find_spec("liger_kernel") is None:
        return "--liger needs liger-kernel: pip install liger-kernel"
    if s.attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "--attn flash_attention_2 needs the flash-attn package"
    return None


# Steps the allocator simulation replays with the data's batch lengths: on the H100 7B runs the
# reserved peak of 25 replayed steps equalled that of 50 (benchmarks/results/cpu-2026-11-23-replay-lengths.txt)
SIMULATED_STEPS = 25


def predict(spec, s: Setup, constants=None, seq_lens=None, replay: bool | None = None) -> dict:
    """The three peaks of `s`: the allocator replay's, as `vramfit estimate` answers (the whole run: load,
    the steps, an evaluation and a checkpoint save; from the setup's event template where one is cached,
    else replayed on the meta device, no template built here).  `seq_lens` (`--simulate-allocator`): the
    steps replayed at those padded batch lengths instead.  `replay=False` (default: VRAMFIT_REPLAY, as
    `vramfit.api.estimate`): the fitted analytic figure."""
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.replay import simulated_breakdown
    from vramfit.memory.template_bg import replay_default, replayed_breakdown

    if replay is None:
        replay = replay_default()
    bd, targets = estimate_setup(spec, s, constants)
    if seq_lens:
        bd = simulated_breakdown(spec, s, targets, bd, constants or DEFAULT, seq_lens=list(seq_lens))
    elif replay:  # (what the replay does not cover keeps the fitted figure, saying so)
        bd = replayed_breakdown(spec, s, targets, bd, constants or DEFAULT, template_build="off")
    out = {"peak_allocated_bytes": bd.peak_allocated_bytes, "peak_reserved_bytes": bd.peak_reserved_bytes,
           "device_bytes": bd.device_bytes, "peak_phase": bd.peak_phase, "breakdown": dict(bd.components),
           "tokens_per_micro_batch": s.tokens, "host_bytes": bd.host_bytes}
    if seq_lens:
        out["notes"] = list(bd.notes[-1:])
    elif s.packing:
        out["notes"] = [f"packed: every micro-batch predicted at its full {s.tokens:,} tokens ({s.micro_batch} rows "
                        f"of {s.seq_len:,}, flattened into one)"]
    return out


def batch_lengths(row_lengths: list, micro_batch: int, seq_len: int, steps: int, seed: int) -> list:
    """Padded lengths of `steps` batches drawn as a shuffled epoch would draw them (seeded): each
    batch is as long as its longest row, rows cut at `seq_len`.  Not the trainer's own order (which
    its sampler fixes later), but the same distribution: replayed for the H100 7B runs, three orders
    gave reserved peaks 6% (LoRA) and 8% (full) apart with the default allocator and 1% with
    expandable segments (benchmarks/results/cpu-2026-11-23-replay-lengths.txt)."""
    import random

    if not row_lengths:
        return []
    rng = random.Random(seed)
    order = []
    while len(order) < steps * micro_batch:
        idx = list(range(len(row_lengths)))
        rng.shuffle(idx)
        order += idx
    return [max(min(row_lengths[i], seq_len) for i in order[k * micro_batch:(k + 1) * micro_batch])
            for k in range(steps)]
