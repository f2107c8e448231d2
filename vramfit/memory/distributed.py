"""Per-GPU memory of data-parallel training on N GPUs: DDP, FSDP2 and DeepSpeed ZeRO, in bytes.

Built on the single-GPU step walk (`vramfit.memory.walk`): the activations, logits and loss buffers of one
GPU's micro-batch are the single-GPU ones, taken at the walk's moments (`vramfit.memory.rank_step`: the
loss, the LM head, the top and bottom decoder layer, the end of the backward, the optimizer step); what a
strategy changes is which weights, gradients and optimizer states each GPU holds, and what the engine
holds at each moment (gradient buckets, gathered units and their all-gather outputs, reduce-scatter
inputs: `vramfit.memory.fsdp` for FSDP2).  `shard_terms` computes those per GPU and moment (a
`vramfit.memory.rank_step.RankTerms`), `rank_breakdown` takes the largest moment.  What each rank's
model is (`activation_setup`): DeepSpeed runs bf16 without autocast, and QLoRA through `vramfit train
--gpus N` is loaded without prepare_model_for_kbit_training.  Pure: no torch, no I/O.
`vramfit.memory.rank_replay` gives the same rank's peaks from the allocator replay of its step.

Strategies, in accelerate's vocabulary (`vramfit.run.launch` writes the accelerate config):

  ddp            torch DistributedDataParallel: everything replicated, plus gradient buckets
  fsdp-full      FSDP2 fully_shard, reshard_after_forward=True      (FULL_SHARD, ZeRO-3-like)
  fsdp-grad-op   FSDP2 fully_shard, reshard_after_forward=False     (SHARD_GRAD_OP, ZeRO-2-like)
  zero1/2/3      DeepSpeed ZeRO stage 1/2/3
  zero2-offload  ZeRO-2, optimizer states + fp32 master weights in pinned host memory (DeepSpeedCPUAdam)
  zero3-offload  ZeRO-3, optimizer and parameters in pinned host memory

Where each term comes from is said where it is computed.  Figures that are not derived from
shapes (NCCL's buffers, DeepSpeed's bucket sizes) are named constants below; the bucket sizes are
written into the DeepSpeed config vramfit launches, so the model and the run agree on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vramfit.errors import VramfitError
from vramfit.memory.rank_step import MOMENTS, RankTerms, moments, rank_breakdown, single_gpu_grads
from vramfit.memory.setup import DTYPE_BYTES, Setup

FP32 = 4
MiB = 1 << 20

# --------------------------------------------------------------------------- engine constants

# torch DDP as accelerate builds it for the Trainer: neither passes bucket_cap_mb nor gradient_as_bucket_view
# (accelerate's DistributedDataParallelKwargs.to_kwargs passes only what differs from its defaults), so DDP
# caps buckets at 25 MiB (the first at _DEFAULT_FIRST_BUCKET_BYTES, 1 MiB) and keeps gradients apart: the
# Reducer holds a flat tensor per bucket of trainable parameters and copies each gradient into it, a second
# copy of all gradients held from wrapping to the end of the run (torch/csrc/distributed/c10d/reducer.cpp,
# initialize_buckets).  At construction (no find_unused_parameters) it is ONE bucket per dtype, rebuilt into
# the capped ones at the second step (vramfit.memory.rank_replay.ddp_bucket_events): the same bytes held.
DDP_BUCKET_CAP_BYTES = 25 * MiB
# NCCL's own device memory per process (channel buffers, NCCL_BUFFSIZE 4 MiB per channel and peer
# for the Simple protocol plus the LL/LL128 buffers, the communicator's work FIFO), allocated
# outside torch's caching allocator: nvidia-smi counts it, torch does not.  Reported for PyTorch
# process groups on 4 A100s with NVLink after one all-reduce: 544 MB for a group of 2 GPUs, 688 MB
# for larger groups (github.com/NVIDIA/nccl/issues/964); NCCL's maintainers: it grows with the
# channels the link needs, not with the model (issue 986).  Not yet measured here: the 2-GPU
# proof (benchmarks/distributed) measures device - reserved per rank.
NCCL_DEVICE_BYTES = 544 * MiB
NCCL_DEVICE_BYTES_LARGER_GROUPS = 688 * MiB
# DeepSpeed ZeRO's sizes: vramfit.memory.zero

# Host-to-device link when a profile names none (offload traffic): PCIe 4.0 x16 per direction.
DEFAULT_HOST_LINK_BYTES_PER_S = 31_500_000_000


@dataclass(frozen=True)
class Strategy:
    name: str  # the short CLI name
    engine: str  # ddp | fsdp | deepspeed
    package: str  # what must be importable: torch | deepspeed
    zero_stage: int = 0  # DeepSpeed stage; FSDP's equivalent (3 full shard, 2 shard-grad-op)
    reshard_after_forward: bool = True  # FSDP2
    offload_optimizer: bool = False
    offload_params: bool = False
    accelerate: str = ""  # the accelerate config's words for it

    @property
    def sharded(self) -> bool:
        return self.engine != "ddp"


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("ddp", "ddp", "torch", accelerate="MULTI_GPU"),
        Strategy("fsdp-full", "fsdp", "torch", zero_stage=3, reshard_after_forward=True,
                 accelerate="FSDP, fsdp_version 2, fsdp_reshard_after_forward true (FULL_SHARD)"),
        Strategy("fsdp-grad-op", "fsdp", "torch", zero_stage=2, reshard_after_forward=False,
                 accelerate="FSDP, fsdp_version 2, fsdp_reshard_after_forward false (SHARD_GRAD_OP)"),
        Strategy("zero1", "deepspeed", "deepspeed", zero_stage=1, accelerate="DEEPSPEED, zero_stage 1"),
        Strategy("zero2", "deepspeed", "deepspeed", zero_stage=2, accelerate="DEEPSPEED, zero_stage 2"),
        Strategy("zero3", "deepspeed", "deepspeed", zero_stage=3, accelerate="DEEPSPEED, zero_stage 3"),
        Strategy("zero2-offload", "deepspeed", "deepspeed", zero_stage=2, offload_optimizer=True,
                 accelerate="DEEPSPEED, zero_stage 2, offload_optimizer_device cpu"),
        Strategy("zero3-offload", "deepspeed", "deepspeed", zero_stage=3, offload_optimizer=True,
                 offload_params=True,
                 accelerate="DEEPSPEED, zero_stage 3, offload_optimizer_device cpu, offload_param_device cpu"),
    )
}
# DeepSpeed builds its own optimizer from the config (AdamW; DeepSpeedCPUAdam with offload): the
# memory model prices AdamW's two fp32 states for it; vramfit asks for it as adamw_torch.
DEEPSPEED_OPTIMS = ("adamw_torch",)
# DeepSpeed manages precision itself: bf16 (bf16 weights, fp32 master weights in the optimizer:
# accelerate's mixed_precision bf16, here bf16-mixed) or fp32.
DEEPSPEED_PRECISIONS = ("bf16-mixed", "32-true")


def get_strategy(name: str) -> Strategy:
    if name in STRATEGIES:
        return STRATEGIES[name]
    import difflib

    close = difflib.get_close_matches(str(name), list(STRATEGIES), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise VramfitError(f"unknown strategy '{name}'{hint}; valid: {', '.join(STRATEGIES)}")


def check_combination(strategy: Strategy, s: Setup, gpus: int) -> None:
    """What the engines cannot run, said as a VramfitError."""
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise VramfitError(f"--gpus must be a positive number of GPUs, got {gpus!r}")
    if strategy.engine == "deepspeed":
        if s.optim not in DEEPSPEED_OPTIMS:
            raise VramfitError(f"{strategy.name} runs DeepSpeed's own AdamW: use --optim adamw_torch "
                               f"(not {s.optim})")
        if s.precision not in DEEPSPEED_PRECISIONS:
            raise VramfitError(f"{strategy.name}: DeepSpeed keeps bf16 weights with fp32 master weights "
                               f"(--precision bf16-mixed) or runs in fp32 (32-true); not {s.precision}")
    if strategy.engine == "fsdp" and s.optimizer.paged:
        raise VramfitError(f"{s.optim} keeps states in CUDA managed memory, which FSDP's sharded DTensor "
                           f"parameters do not support: choose adamw_torch or adamw_torch_fused")
    if strategy.engine == "fsdp" and s.method == "qlora" and not s.autocast_dtype:
        raise VramfitError(f"QLoRA under FSDP needs autocast: {s.precision} has none, and peft's LoRA layers then "
                           "meet fp32 inputs (transformers#30914, 'expected mat1 and mat2 to have the same dtype', "
                           "measured through the fake process group); use --amp bf16 (bf16-amp)")
    if strategy.offload_params and s.method == "qlora":
        raise VramfitError("zero3-offload with QLoRA: DeepSpeed cannot offload bitsandbytes 4-bit weights; "
                           "use zero3 or fsdp-full")


# --------------------------------------------------------------------------- the per-GPU terms


def _ceil_div(a: float, n: int) -> int:
    return math.ceil(a / n)


def launched_qlora(strategy: Strategy, gpus: int) -> bool:
    """QLoRA as `vramfit train --gpus N` loads it on every rank (vramfit.run.launch._rank_model):
    4-bit weights stored as bf16 (bnb_4bit_quant_storage), the rest loaded in bf16, and no
    prepare_model_for_kbit_training -- so, unlike the single-GPU recipe, nothing is upcast to fp32."""
    return not (gpus == 1 and strategy.engine == "ddp")


def activation_setup(strategy: Strategy, s: Setup, gpus: int = 2) -> Setup:
    """The setup whose activations one rank runs.  DeepSpeed: bf16 without autocast (`engine_setup`).
    QLoRA through the launcher (`launched_qlora`): the activations of LoRA over the same targets on
    bf16 weights -- the residual stream, the norms and the LM head stay bf16 (prepare_model_for_kbit_
    training's fp32 casts are what make the single-GPU QLoRA trace differ from LoRA's) -- with the 4-bit
    layers' weights and their dequantization buffer added by the rank's terms.  The fitted walk's view; the
    replay (`vramfit estimate --gpus N`'s default) traces the QLoRA itself, without prepare_model_for_kbit_
    training (vramfit.memory.rank_replay.launched_trace_setup)."""
    run = engine_setup(strategy, s)
    if run.method == "qlora" and launched_qlora(strategy, gpus):
        precision = {"bfloat16": "bf16-amp", "float16": "16-amp"}.get(run.autocast_dtype or "", "bf16-true")
        run = run.with_(method="lora", precision=precision, target_modules=s.targets)
    return run


def trl_casts_adapters(s: Setup) -> bool:
    """trl's SFTTrainer casts a quantized model's adapters to bf16 (`Setup.adapter_dtype`)."""
    return s.adapter_dtype == "bfloat16"


def _launched_qlora_weights(spec, s: Setup, targets, c) -> dict:
    from vramfit.memory.walk import _lora_total, _quant_totals

    q_numel, q_bytes, _ = _quant_totals(spec, c, s.double_quant)
    return {"weights_4bit": q_bytes, "weights_bfloat16_unquantized": (spec.params_total - q_numel) * 2,
            "lora_adapters": _lora_total(spec, tuple(targets), s.lora_r) * (2 if trl_casts_adapters(s) else FP32)}


def shard_terms(spec, s: Setup, targets, strategy: Strategy, gpus: int, c=None) -> RankTerms:
    """One GPU's weights, gradients, optimizer states and engine buffers under `strategy`, per
    moment of the step (vramfit.memory.rank_step)."""
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.walk import (
        _grad_totals,
        optimizer_state_bytes,
        optimizer_step_temp_bytes,
        trainable_tensors,
        weight_bytes,
    )

    c = c or DEFAULT
    run = engine_setup(strategy, s)
    qlora = run.method == "qlora" and launched_qlora(strategy, gpus)
    weights = _launched_qlora_weights(spec, run, targets, c) if qlora else weight_bytes(spec, run, targets, c)
    tensors = trainable_tensors(spec, run, targets)
    if trl_casts_adapters(run) and qlora:
        tensors = tuple((num, 2, role, shape) for num, _, role, shape in tensors)
    if strategy.engine == "fsdp" and run.autocast_dtype:
        # accelerate upcasts trainable parameters to fp32 under mixed precision: fsdp2_prepare_model (full
        # fine-tuning; peft's LoRA adapters are fp32 already) and, for the launcher's QLoRA (FSDP1), prepare_model
        # each trainable flat parameter -- trl's bf16 adapters back to fp32 (the h100-2026-12-07d history of
        # llama-3.2-1b QLoRA fsdp-full N = 4 fused: 224 adapter shards of 10.75 MiB together allocated in
        # accelerator.prepare_model, and AdamW's two states as many, fp32; bf16 would be 5.4 MiB)
        tensors = tuple((num, FP32, role, shape) for num, _, role, shape in tensors)
        if qlora and "lora_adapters" in weights:
            weights = dict(weights, lora_adapters=sum(num for num, _, _, _ in tensors) * FP32)
    G, G_out = _grad_totals(tensors)
    O = optimizer_state_bytes(tensors, run, c)
    temp = optimizer_step_temp_bytes(tensors, run, spec)
    nccl = 0 if gpus < 2 else NCCL_DEVICE_BYTES if gpus == 2 else NCCL_DEVICE_BYTES_LARGER_GROUPS
    layers = max(spec.num_layers, 1)
    if strategy.engine == "ddp":
        # torch DDP: the Reducer's flat bucket tensors, one per bucket of trainable parameters, a second
        # copy of every gradient, allocated at wrapping and held to the end (reducer.cpp,
        # initialize_buckets; gradient_as_bucket_view=False: accelerate and the Trainer pass none)
        bucket = G if gpus > 1 else 0
        held = {k: {"ddp_gradient_buckets": bucket} for k in MOMENTS} if bucket else {}
        return RankTerms(weights=tuple(weights.items()), optimizer=O, optimizer_temp=temp,
                         grads=single_gpu_grads(G, G_out, G, layers), held=held, device_extra=nccl)
    if strategy.engine == "fsdp":
        from vramfit.memory.fsdp import fsdp_terms
        from vramfit.memory.walk import _quant_totals

        packed = constants = 0
        if run.method == "qlora":
            q_numel, q_bytes, _ = _quant_totals(spec, c, run.double_quant)
            packed = (q_numel + 1) // 2
            constants = q_bytes - packed
            weights = dict(weights, weights_bfloat16_unquantized=(spec.params_total - q_numel) * 2)
        return fsdp_terms(spec, activation_setup(strategy, run, gpus), targets, strategy, gpus, c, weights, tensors,
                          O, temp, nccl if gpus > 1 else 0, packed, constants)
    from vramfit.memory.zero import zero_terms

    return zero_terms(spec, run, strategy, gpus, c, tensors, G_out, nccl)


def _compute_bytes(s: Setup) -> int:
    return DTYPE_BYTES[s.compute_dtype]


def engine_setup(strategy: Strategy, s: Setup) -> Setup:
    """The setup the engine really runs (what the cost model prices): DeepSpeed with bf16 casts the
    module to bf16 and runs without autocast, so bf16-mixed (and bf16-amp) runs as bf16-true."""
    if strategy.engine == "deepspeed" and s.precision in ("bf16-mixed", "bf16-amp"):
        return s.with_(precision="bf16-true")
    return s


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class DistEstimate:
    """Per-GPU peaks of one training step on `gpus` GPUs with `strategy`; host bytes for offload."""

    strategy: str
    gpus: int
    setup: Setup
    breakdown: object  # vramfit.memory.walk.Breakdown of one GPU
    host_bytes_per_rank: int
    host_breakdown: dict
    comm_bytes_per_step: int  # bytes each GPU sends (ring algorithms) per optimizer step
    host_link_bytes_per_step: int  # offload: host <-> device bytes per optimizer step and GPU
    per_gpu: object = None  # vramfit.api.Estimate of one GPU, when built by `estimate_gpus`

    @property
    def peak_allocated_bytes(self) -> int:
        return self.breakdown.peak_allocated_bytes

    @property
    def peak_reserved_bytes(self) -> int:
        return self.breakdown.peak_reserved_bytes

    @property
    def device_bytes(self) -> int:
        return self.breakdown.device_bytes

    @property
    def host_bytes(self) -> int:
        """Pinned host memory of all ranks of one machine."""
        return self.host_bytes_per_rank * self.gpus

    def to_json(self) -> dict:
        b = self.breakdown
        return {"strategy": self.strategy, "gpus": self.gpus, "per_gpu": {
            "peak_allocated_bytes": b.peak_allocated_bytes, "peak_reserved_bytes": b.peak_reserved_bytes,
            "device_bytes": b.device_bytes, "peak_phase": b.peak_phase, "breakdown": b.components,
            "phases": b.phases}, "host_bytes_per_rank": self.host_bytes_per_rank, "host_bytes": self.host_bytes,
            "host_breakdown": self.host_breakdown, "comm_bytes_per_step": self.comm_bytes_per_step,
            "host_link_bytes_per_step": self.host_link_bytes_per_step, "notes": list(b.notes)}


def estimate_distributed(spec, s: Setup, strategy: str | Strategy, gpus: int, constants=None) -> DistEstimate:
    """The analytic core for N GPUs on a loaded spec (what the planner calls): the single-GPU walk's
    moments of one rank's step (`activation_setup`) plus what the engine holds at each (`shard_terms`)."""
    from dataclasses import replace

    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.estimate import estimate_setup, trace_key
    from vramfit.memory.setup import resolve_targets, validate
    from vramfit.memory.walk import _quant_totals, breakdown
    from vramfit.model.trace import activation_profile

    st = strategy if isinstance(strategy, Strategy) else get_strategy(strategy)
    validate(s)
    check_combination(st, s, gpus)
    c = constants or DEFAULT
    run = engine_setup(st, s)
    targets = resolve_targets(spec, run)
    if gpus == 1 and st.engine == "ddp":  # one process: no DDP wrapper, exactly the single-GPU estimate
        bd, _ = estimate_setup(spec, run, c)
        return DistEstimate(st.name, 1, s, bd, 0, {}, 0, 0)
    estimate_setup(spec, run, c)  # the single-GPU checks (fused experts, QLoRA) and the trace cache
    act = activation_setup(st, run, gpus)
    profile = activation_profile(spec, trace_key(spec, act, targets), grad_ckpt=act.grad_ckpt)
    terms = shard_terms(spec, run, targets, st, gpus, c)
    single = breakdown(spec, act, targets, profile, c)  # parameter counts and notes
    if act.method != run.method:  # the launcher's QLoRA, walked as LoRA over bf16: its counts are QLoRA's
        single = replace(single, params_packed=spec.params_total - _quant_totals(spec, c, run.double_quant)[0] // 2)
    m = rank_moments(spec, run, act, targets, profile, c, terms)
    bd = rank_breakdown(single, m, terms, c)
    comm, host_link = communication_bytes(spec, run, targets, st, gpus, c)
    return DistEstimate(st.name, gpus, s, bd, terms.host_bytes, dict(terms.host_named), comm, host_link)


def rank_moments(spec, run: Setup, act: Setup, targets, profile, c, terms: RankTerms):
    """The walk's moments of the rank's activations (`act`), with what the launcher's QLoRA changes
    in them: bitsandbytes' dequantized bf16 weight inside every 4-bit layer's forward and backward
    (the largest one, at the layers' moments) and, under trl's bf16 cast of the adapters
    (`trl_casts_adapters`), the adapters' inputs saved in bf16 instead of fp32: peft's LoRA forward casts
    x to lora_A's dtype before the dropout without autocast (peft/tuners/lora/bnb.py, Linear4bit.forward,
    `_cast_input_dtype`), so each target saves its dropout output (in_features) and lora_A's output (r)
    at 2 bytes less per element."""
    from dataclasses import replace

    from vramfit.memory.walk import _quant_totals

    m = moments(spec, act, targets, profile, c, drop_weight_copies=terms.no_weight_copies)
    if act.method == run.method:
        return m
    dq = _quant_totals(spec, c, run.double_quant)[2] * 2
    m = replace(m, top_acts=m.top_acts + dq, bottom_acts=m.bottom_acts + dq)
    if not (trl_casts_adapters(run) and run.lora_dropout > 0 and not run.autocast_dtype):
        return m
    by_name = {lin.name: lin for lin in spec.linears}
    total = sum(2 * (by_name[t].in_features + run.lora_r) for t in targets) * run.tokens
    layer = total // max(spec.num_layers, 1)
    if run.grad_ckpt:  # only the recomputed layer holds them
        return replace(m, top_acts=m.top_acts - layer, bottom_acts=m.bottom_acts - layer)
    return replace(m, A_fwd=m.A_fwd - total, top_acts=m.top_acts - total, bottom_acts=m.bottom_acts - layer)


def communication_bytes(spec, s: Setup, targets, st: Strategy, n: int, c=None) -> tuple[int, int]:
    """Bytes each GPU sends per optimizer step (ring collectives: an all-reduce of X moves
    2 (N-1)/N X, an all-gather or reduce-scatter (N-1)/N X), and host-link bytes for offload.

    ddp: one all-reduce of the gradients per step (no_sync on the other micro-batches).
    fsdp: per micro-batch an all-gather of the parameters in forward, another in backward when
    resharded after forward, and a reduce-scatter of the gradients (sync_each_batch).
    zero1: an all-reduce of the gradients per step; zero2: a reduce-scatter per micro-batch; both
    all-gather the updated bf16 parameters after the step.  zero3: as fsdp-full, plus nothing after
    the step (parameters stay partitioned).  Offload: gradients down (fp32) and updated
    parameters up (bf16) once per step, per rank partition.
    """
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.walk import trainable_tensors, weight_bytes

    if n <= 1:
        return 0, 0
    c = c or DEFAULT
    f = (n - 1) / n
    cb = _compute_bytes(s)
    tensors = trainable_tensors(spec, s, targets)
    pt = sum(num for num, _, _, _ in tensors)
    grad_bytes = sum(num * pb for num, pb, _, _ in tensors)
    micro = s.grad_accum
    if st.engine == "ddp":
        return int(2 * f * grad_bytes), 0
    if st.engine == "fsdp":
        params = sum(weight_bytes(spec, s, targets, c).values()) * cb // DTYPE_BYTES[s.param_dtype]
        # forward; again in backward when resharded after forward; once more for the recompute of
        # checkpointed layers (transformers' warning: "a redundant AllGather in the backward pass")
        gathers = (2 + int(s.grad_ckpt)) if st.reshard_after_forward else 1
        reduce = pt * (2 if s.autocast_dtype else DTYPE_BYTES[s.param_dtype] if s.method == "full" else FP32)
        return int(micro * f * (gathers * params + reduce)), 0
    pb = 2 if s.compute_dtype != "float32" else FP32
    params = spec.params_total * pb
    if st.zero_stage == 1:
        comm = 2 * f * pt * pb + f * pt * pb
    elif st.zero_stage == 2:
        comm = micro * f * pt * pb + f * pt * pb
    else:
        comm = micro * f * (2 * params + pt * pb)
    host = int((pt * FP32 + pt * pb) / n) if st.offload_optimizer else 0
    if st.offload_params:
        host += int(micro * 2 * params / n)
    return int(comm), host
