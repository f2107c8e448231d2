"""Per-GPU memory of data-parallel training on N GPUs: DDP, FSDP2 and DeepSpeed ZeRO, in bytes.

Built on the single-GPU step walk (`vramfit.memory.walk.breakdown`): the activations, logits and loss
buffers of one GPU's micro-batch are the single-GPU ones; what a strategy changes is which
weights, gradients and optimizer states each GPU holds, and the buffers the engine adds (gradient
buckets, all-gathered layers).  `shard_terms` computes those per GPU (a `Sharding`), and
`breakdown(..., sharding=...)` walks the step with them.  Pure: no torch, no I/O.

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
from dataclasses import dataclass, field

from vramfit.errors import VramfitError
from vramfit.memory.setup import DTYPE_BYTES, Setup

FP32 = 4
MiB = 1 << 20

# --------------------------------------------------------------------------- engine constants

# torch DDP: bucket_cap_mb=25 (accelerate's DistributedDataParallelKwargs default), and
# gradient_as_bucket_view=False (same source): the Reducer allocates flat bucket tensors for every
# trainable parameter's gradient at construction and copies each gradient into its bucket, so the
# buckets are a second copy of all gradients, held from wrapping to the end of the run
# (torch/csrc/distributed/c10d/reducer.cpp, initialize_buckets).
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
# DeepSpeed ZeRO sizes, written explicitly into the generated DeepSpeed config (vramfit.run.launch);
# the values are DeepSpeed's documented defaults (deepspeed.ai/docs/config-json, "ZeRO
# optimizations"): reduce_bucket_size 5e8 and allgather_bucket_size 5e8 elements,
# stage3_prefetch_bucket_size 5e7, stage3_max_live_parameters 1e9, stage3_max_reuse_distance 1e9,
# stage3_param_persistence_threshold 1e5 elements.
ZERO_REDUCE_BUCKET = 500_000_000
ZERO_ALLGATHER_BUCKET = 500_000_000
ZERO3_PREFETCH_BUCKET = 50_000_000
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000
ZERO3_PERSISTENCE_THRESHOLD = 100_000
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
    if strategy.offload_params and s.method == "qlora":
        raise VramfitError("zero3-offload with QLoRA: DeepSpeed cannot offload bitsandbytes 4-bit weights; "
                           "use zero3 or fsdp-full")


# --------------------------------------------------------------------------- the per-GPU terms


@dataclass(frozen=True)
class Sharding:
    """One GPU's bytes under a strategy, as `memory.breakdown` consumes them."""

    weights: tuple  # ((name, bytes), ...) held for the whole step
    grads: int  # gradients held at the end of backward (the walk's G)
    grads_outside: int  # of which embeddings / LM head (held from the top of backward)
    grads_step: int  # gradients held during the optimizer step
    optimizer: int  # optimizer states on this GPU (torch allocator)
    optimizer_temp: int  # the optimizer step's temporaries on this GPU
    extra: dict  # phase -> engine buffers: forward, backward_top, backward_bottom, optimizer
    named: dict = field(default_factory=dict)  # phase -> {component name: bytes}, for the breakdown
    device_extra: int = 0  # outside torch's allocator (NCCL)
    no_weight_copies: bool = False  # the engine gathers weights already in the compute dtype
    host_bytes: int = 0  # pinned host memory of this rank (offload)
    host_named: tuple = ()  # ((name, bytes), ...)

    def components(self, phase: str) -> dict:
        return dict(self.named.get(phase, {}))


def _elements(spec) -> dict:
    """Element counts the strategies need: per decoder layer, outside the layers, largest tensor."""
    roles = spec.params_by_role
    outside = roles.get("embeddings", 0) + roles.get("lm_head", 0) + spec.hidden_size  # + the final norm
    n = max(spec.num_layers, 1)
    layer = max(0, spec.params_total - outside) / n
    return {"layer": layer, "outside": spec.params_total - layer * n, "total": spec.params_total}


def fsdp_shard_numel(spec, gpus: int) -> int:
    """Elements of one rank's shards: FSDP2 shards every parameter on dim 0 (torch.chunk), each
    rank's chunk padded to ceil(dim0 / N) rows (torch/distributed/fsdp/_fully_shard/_fsdp_param.py)."""
    total = 0
    for shape, count, _ in spec.param_shapes:
        rest = math.prod(shape[1:]) if len(shape) > 1 else 1
        total += count * math.ceil(shape[0] / gpus) * rest
    return total


def _ceil_div(a: float, n: int) -> int:
    return math.ceil(a / n)


def shard_terms(spec, s: Setup, targets, strategy: Strategy, gpus: int, c=None) -> Sharding:
    """One GPU's weights, gradients, optimizer states and engine buffers under `strategy`."""
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.walk import (
        _grad_totals,
        optimizer_state_bytes,
        optimizer_step_temp_bytes,
        trainable_tensors,
        weight_bytes,
    )

    c = c or DEFAULT
    weights = weight_bytes(spec, s, targets, c)
    tensors = trainable_tensors(spec, s, targets)
    G, G_out = _grad_totals(tensors)
    O = optimizer_state_bytes(tensors, s, c)
    temp = optimizer_step_temp_bytes(tensors, s, spec)
    el = _elements(spec)
    nccl = 0 if gpus < 2 else NCCL_DEVICE_BYTES if gpus == 2 else NCCL_DEVICE_BYTES_LARGER_GROUPS
    if strategy.engine == "ddp":
        bucket = G if gpus > 1 else 0  # a DDP of one process still builds buckets; N=1 means no DDP here
        named = {ph: {"ddp_gradient_buckets": bucket} for ph in ("forward", "backward", "optimizer")} if bucket else {}
        return Sharding(weights=tuple(weights.items()), grads=G, grads_outside=G_out, grads_step=G, optimizer=O,
                        optimizer_temp=temp, named=named, device_extra=nccl,
                        extra={k: bucket for k in ("forward", "backward_top", "backward_bottom", "optimizer")})
    if strategy.engine == "fsdp":
        return _fsdp_terms(spec, s, targets, strategy, gpus, c, weights, tensors, G, G_out, O, temp, el, nccl)
    return _zero_terms(spec, s, strategy, gpus, c, tensors, G_out, el, nccl)


def _compute_bytes(s: Setup) -> int:
    return DTYPE_BYTES[s.compute_dtype]


def _fsdp_terms(spec, s, targets, st, n, c, weights, tensors, G, G_out, O, temp, el, nccl) -> Sharding:
    """FSDP2 `fully_shard` on every decoder layer and on the root (accelerate's fsdp_version 2 with
    TRANSFORMER_BASED_WRAP).  Per GPU:
    - parameters: each rank's dim-0 shards (padded), in the dtype they were loaded in; adapters too.
      QLoRA (bnb_4bit_quant_storage=bfloat16, as peft's FSDP-QLoRA guide requires, so the packed
      4-bit weights are bf16-typed and shard with the rest): the packed bytes are sharded, the
      quantization constants (absmax, a QuantState attribute, not a parameter) stay on every rank.
      vramfit launches QLoRA with FSDP1 (peft's recipe: one flat parameter per decoder layer,
      limit_all_gathers keeps two in flight, BACKWARD_PRE prefetch): the same bytes up to padding.
    - all-gathered layers: the layer running and the next one prefetched (FSDP2's implicit forward
      prefetch and backward_prefetch of one layer), each unsharded in MixedPrecisionPolicy's
      param_dtype (accelerate sets param_dtype = reduce_dtype = bf16 under mixed precision), plus
      its all-gather output buffer until copy-out: ~2 layers x 2 buffers at the worst moment we count
      as 2 layers unsharded + 1 all-gather output.
    - the root module's parameters (embeddings, final norm, LM head) are gathered from the start of
      forward to the end of backward: fully_shard sets reshard_after_forward=False for the root.
    - reshard_after_forward=False (SHARD_GRAD_OP): every layer stays gathered from its forward to
      its backward, so the top of backward holds all layers unsharded.
    - gradients: sharded (reduce-scattered per layer in backward), plus one layer's unsharded
      gradient in reduce_dtype while it is reduce-scattered; the root's gradients are unsharded
      until the root's post-backward.  vramfit's run sets sync_each_batch=True, so gradient
      accumulation does not keep unsharded gradients between micro-batches (accelerate's no_sync).
    - optimizer states and step temporaries: of the local shards, so 1/N.
    """
    cb = _compute_bytes(s)
    layers = max(spec.num_layers, 1)
    shard_fraction = fsdp_shard_numel(spec, n) / max(spec.params_total, 1)  # padding included
    w = {}
    for name, b in weights.items():
        if name == "weights_4bit":
            q_numel = _q_numel(spec, c, s)
            packed = (q_numel + 1) // 2
            w["weights_4bit_sharded"] = _ceil_div(packed, n)
            w["weights_4bit_quant_constants"] = b - packed  # absmax (+ nested): replicated
        elif name == "weights_fp32_unquantized":
            # FSDP-QLoRA loads with dtype = quant storage dtype (bf16): nothing is upcast to fp32
            w["weights_bfloat16_unquantized_sharded"] = _ceil_div(b // FP32 * 2, n)
        elif name == "lora_adapters":
            w["lora_adapters_sharded"] = _ceil_div(b, n)
        else:
            w[name + "_sharded"] = int(b * shard_fraction)
    # one decoder layer unsharded in the compute dtype (adapters included); QLoRA's 4-bit layers
    # are gathered packed
    # adapters (fp32, peft) are gathered in fp32 unless a MixedPrecisionPolicy casts every parameter
    # (FSDP2 all-gathers mixed dtypes of one group as bytes)
    adapters = weights.get("lora_adapters", 0) / FP32 * (cb if s.autocast_dtype else FP32)
    if s.method == "qlora":
        q_numel = _q_numel(spec, c, s)
        layer_gather = ((q_numel + 1) // 2 + (el["layer"] * layers - q_numel) * cb + adapters) / layers
    else:
        layer_gather = el["layer"] * cb + adapters / layers
    root_gather = el["outside"] * cb
    gather_fwd = int(2 * layer_gather + layer_gather)  # running + prefetched + the prefetch's all-gather output
    trainable_layer = (G - G_out) / layers  # one layer's gradient bytes (param dtype)
    grad_dtype_ratio = (2 / FP32) if (s.autocast_dtype and _trainable_fp32(tensors)) else 1.0
    unsharded_grad = int(trainable_layer * grad_dtype_ratio * (1 + 1 / n))  # + reduce-scatter output
    if st.reshard_after_forward:
        fwd = root_gather + gather_fwd
        top = bottom = root_gather + gather_fwd + unsharded_grad
    else:
        all_layers = int(layer_gather * layers)
        fwd = root_gather + all_layers + int(layer_gather)
        top = root_gather + all_layers + unsharded_grad
        bottom = root_gather + gather_fwd + unsharded_grad
    grads = G_out + _ceil_div(G - G_out, n)
    named = {"forward": {"fsdp_gathered_params": int(fwd)},
             "backward": {"fsdp_gathered_params": int(top - unsharded_grad),
                          "fsdp_unsharded_layer_grad": unsharded_grad}}
    return Sharding(weights=tuple(w.items()), grads=grads, grads_outside=G_out, grads_step=_ceil_div(G, n),
                    optimizer=_ceil_div(O, n), optimizer_temp=_ceil_div(temp, n),
                    extra={"forward": int(fwd), "backward_top": int(top), "backward_bottom": int(bottom)},
                    named=named, device_extra=nccl if n > 1 else 0, no_weight_copies=bool(s.autocast_dtype))


def _trainable_fp32(tensors) -> bool:
    return any(pb == FP32 for _, pb, _, _ in tensors)


def _q_numel(spec, c, s) -> int:
    from vramfit.memory.walk import _quant_totals

    return _quant_totals(spec, c, s.double_quant)[0]


def _zero_terms(spec, s, st, n, c, tensors, G_out, el, nccl) -> Sharding:
    """DeepSpeed ZeRO (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py) as accelerate starts it
    with bf16 enabled: the engine casts the module to bf16 (adapters too), keeps an fp32 master copy
    of its partition of the trainable parameters inside the optimizer, and AdamW's two fp32 states
    of that partition.  Per GPU (Pt trainable elements, P all elements, pb the compute dtype):
    - stage 1: bf16 params and bf16 gradients in full; master 4 Pt/N + states 8 Pt/N; at the step
      the fp32 gradient partition 4 Pt/N.
    - stage 2: gradients reduced in buckets of reduce_bucket_size into this rank's partition
      (contiguous_gradients: a bf16 partition buffer pb Pt/N and the ipg bucket).
    - stage 3: also the parameters partitioned (pb P/N; tensors under the persistence threshold
      kept whole) and gathered on use: at most stage3_max_live_parameters; and, when the model is
      smaller than stage3_max_reuse_distance, DeepSpeed keeps gathered what it will reuse within
      that distance, so a small model stays gathered from forward to backward.
    - offload_optimizer (cpu): master, states and the fp32 gradient partition live in pinned host
      memory (16 Pt/N per rank); the GPU keeps the ipg bucket.  offload_param (cpu, stage 3): the
      bf16 partitions live in pinned host memory too (pb P/N per rank).
    """
    from vramfit.memory.walk import _quant_totals

    pb = 2 if s.compute_dtype != "float32" else FP32
    pt = sum(num for num, _, _, _ in tensors)  # trainable elements
    P = spec.params_total
    layers = max(spec.num_layers, 1)
    # the model in the engine's dtype: bf16 weights (QLoRA: 4-bit packed + bf16 unquantized)
    if s.method == "qlora":
        q_numel, q_bytes, _ = _quant_totals(spec, c, s.double_quant)
        base = q_bytes + (P - q_numel) * pb
        packed = (q_numel + 1) // 2
        constants = q_bytes - packed
    else:
        q_numel, base, packed, constants = 0, P * pb, 0, 0
    adapters = pt * pb if s.method != "full" else 0
    w, host = {}, {}
    if st.zero_stage < 3:
        w["weights_" + ("bfloat16" if pb == 2 else "float32")] = base - (constants if s.method == "qlora" else 0)
        if constants:
            w["weights_4bit_quant_constants"] = constants
        if adapters:
            w["lora_adapters"] = adapters
    else:
        persistent = _persistent_numel(spec)
        part = _ceil_div(base - constants - persistent * pb, n) + persistent * pb + _ceil_div(adapters, n)
        if st.offload_params:
            host["params_partition"] = part - persistent * pb
            part = persistent * pb
        w["weights_partitioned"] = part
        if constants:
            w["weights_4bit_quant_constants"] = constants
    bucket = min(ZERO_REDUCE_BUCKET, pt) * pb  # the ipg bucket (contiguous_gradients)
    g_part = _ceil_div(pt * pb, n)
    fp32_part = _ceil_div(pt * FP32, n)
    master_states = _ceil_div(pt * (FP32 + 8), n)  # fp32 master + AdamW exp_avg and exp_avg_sq
    if st.zero_stage == 1:
        grads, grads_out, grads_step = pt * pb, G_out if s.method == "full" else 0, pt * pb + fp32_part
    else:
        grads, grads_out, grads_step = g_part + bucket, 0, g_part + fp32_part
    optimizer, opt_temp = master_states, _ceil_div(pt * FP32, n) if s.optimizer.foreach_temp else 0
    if st.offload_optimizer:
        host["optimizer_master_and_states"] = master_states
        host["fp32_gradient_partition"] = fp32_part
        optimizer, opt_temp, grads, grads_step = 0, 0, bucket, 0
    extra = {"forward": 0, "backward_top": 0, "backward_bottom": 0}
    named = {}
    if st.zero_stage == 3:
        layer = el["layer"] + pt / layers if s.method != "full" else el["layer"]
        largest = max([el["layer"]] + [math.prod(sh) for sh, _, _ in spec.param_shapes])
        if P <= ZERO3_MAX_REUSE_DISTANCE:  # reused within the distance: kept gathered
            live = P + (pt if s.method != "full" else 0)
        else:  # the layers within the reuse distance of the forward/backward turn stay gathered
            live = ZERO3_MAX_REUSE_DISTANCE / 2 + max(layer, largest) + ZERO3_PREFETCH_BUCKET
        live = min(live, ZERO3_MAX_LIVE_PARAMETERS)
        gathered = int(live * (base - constants + adapters) / (P + (pt if s.method != "full" else 0)))
        extra = {"forward": gathered, "backward_top": gathered, "backward_bottom": gathered}
        named = {"forward": {"zero3_gathered_params": gathered}, "backward": {"zero3_gathered_params": gathered}}
    return Sharding(weights=tuple(w.items()), grads=grads, grads_outside=min(grads_out, grads), grads_step=grads_step,
                    optimizer=optimizer, optimizer_temp=opt_temp, extra=extra, named=named,
                    device_extra=nccl if n > 1 else 0, no_weight_copies=True,
                    host_bytes=sum(host.values()), host_named=tuple(host.items()))


def _persistent_numel(spec) -> int:
    """Elements of parameters below stage3_param_persistence_threshold: kept whole on every rank."""
    return sum(count * math.prod(shape) for shape, count, _ in spec.param_shapes
               if math.prod(shape) < ZERO3_PERSISTENCE_THRESHOLD)


def engine_setup(strategy: Strategy, s: Setup) -> Setup:
    """The setup whose activations the engine really runs: DeepSpeed with bf16 casts the module to
    bf16 and runs without autocast, so bf16-mixed (and bf16-amp) traces as bf16-true."""
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
    """The analytic core for N GPUs on a loaded spec (what the planner calls)."""
    from vramfit.memory.estimate import trace_key
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.walk import breakdown
    from vramfit.memory.setup import resolve_targets, validate
    from vramfit.model.trace import activation_profile

    st = strategy if isinstance(strategy, Strategy) else get_strategy(strategy)
    validate(s)
    check_combination(st, s, gpus)
    c = constants or DEFAULT
    run = engine_setup(st, s)
    targets = resolve_targets(spec, run)
    from vramfit.memory.estimate import estimate_setup

    if gpus == 1 and st.engine == "ddp":  # one process: no DDP wrapper, exactly the single-GPU estimate
        bd, _ = estimate_setup(spec, run, c)
        return DistEstimate(st.name, 1, s, bd, 0, {}, 0, 0)
    estimate_setup(spec, run, c)  # the single-GPU checks (fused experts, QLoRA) and the trace cache
    profile = activation_profile(spec, trace_key(spec, run, targets), grad_ckpt=run.grad_ckpt)
    sh = shard_terms(spec, run, targets, st, gpus, c)
    bd = breakdown(spec, run, targets, profile, c, sharding=sh)
    comm, host_link = communication_bytes(spec, run, targets, st, gpus, c)
    return DistEstimate(st.name, gpus, s, bd, sh.host_bytes, dict(sh.host_named), comm, host_link)


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
