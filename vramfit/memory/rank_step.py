"""One rank's training step under a data-parallel engine, moment by moment, in bytes.  Pure: no torch.

The single-GPU walk (`vramfit.memory.walk.breakdown`) takes the largest of a few moments of the step:
the loss in the forward, the last decoder layer's recompute, the loss in the backward, the LM head's
backward, the top and the bottom decoder layer's backward, the optimizer step.  A data-parallel
engine holds different buffers at each of them -- FSDP2 has the LM head's unit gathered at the loss
but two decoder layers inside the layers; a layer's unsharded gradient is reduce-scattered before
the next layer's backward -- so one rank's step is the same moments (`moments`: the walk's own
terms, kept equal to it by a test) plus what the engine holds at each (`RankTerms`), and its peak
the largest of them (`rank_breakdown`).  `vramfit.memory.distributed` builds the terms per engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramfit.memory.constants import DEFAULT
from vramfit.memory.walk import FP32, Breakdown, head_terms

# the moments of one step, in the order the step reaches them
# forward_first: the first decoder layer, no activations yet (FSDP2's first copy-out beside the flat
# output of the unit gathered before it)
FORWARD = ("forward_first", "forward_layer", "forward_loss")
BACKWARD = ("backward_loss", "backward_head", "backward_top", "backward_bottom", "backward_end")
MOMENTS = FORWARD + BACKWARD + ("optimizer",)
PHASE = {**{m: "forward" for m in FORWARD}, **{m: "backward" for m in BACKWARD}, "optimizer": "optimizer"}
# What nvidia-smi shows beyond torch's reserved bytes grows by this much more under the sharding engines, which
# run on CUDA side streams of their own (FSDP1's unshard / post-backward / pre-unshard streams, FSDP2's all-gather
# and reduce-scatter streams, DeepSpeed's reduction and all-gather streams; DDP through the fake group has none):
# device - reserved was 828 MiB in every one of the 29 FSDP1 / FSDP2 / ZeRO-2 / ZeRO-3 fake-group runs of
# h100-2026-12-07 (H100, driver 580.159, torch 2.11) and 758 MiB (the walk's context + kernel growth) in every one
# of the 39 DDP runs.  MEASURED on those runs, not derived: the likely cause -- torch creating its CUDA stream pool
# (c10/cuda/CUDAStream.cpp, 32 streams per priority, on the first side stream) -- is not confirmed.
SIDE_STREAMS_DEVICE_BYTES = 70 << 20


def broadcast_buckets(states, bucket: int = 250 << 20) -> list:
    """broadcast_coalesced's buckets (torch/csrc/distributed/c10d/comm.cpp, reducer.cpp's
    compute_bucket_assignment_by_size with one limit): the states grouped per dtype, a group closed once it
    reaches `bucket` bytes (a tensor larger than the limit closes it with whatever it joined), the groups in
    the order of their first tensor.  -> [(bytes, tensors)]."""
    open_, done = {}, []
    for i, (key, nbytes) in enumerate(states):
        acc = open_.setdefault(key, [i, 0, 0])
        acc[1] += nbytes
        acc[2] += 1
        if acc[1] >= bucket:
            done.append(tuple(open_.pop(key)))
    done += [tuple(v) for v in open_.values()]
    return [(size, count) for _, size, count in sorted(done)]


def stream_reserved(events: list, steps: int = 2, expandable: bool = False) -> int:
    """The reserved peak of one side stream's pool over `steps` repeats of its step's `events` (ids per step)."""
    from vramfit.memory.allocator import CachingAllocator

    a, live = CachingAllocator(expandable), {}
    for step in range(steps):
        for ev in events:
            if ev[0] == "a":
                live[(step, ev[1])] = a.malloc(ev[2])
            else:
                a.free(live.pop((step, ev[1])))
    return a.peak_reserved


def backward_workspaces(events: list, grads_by_step: dict) -> set:
    """Event indices among a step's "gradients" (`rank_replay.dropped_ids`) never freed though a later step
    follows (a gradient is freed by the next zero_grad): the autograd thread's cuBLAS workspace, 32 MiB on an
    H100 (torch keeps a handle per thread and a workspace per handle and stream, CublasHandlePool.cpp; every
    h100-2026-12-07d ZeRO history holds it and the forward thread's to the end).  Used only to split the
    gradients over the layers; the replay still drops it (cpu-2026-12-08c-fake-pg-zero3.md)."""
    if len(grads_by_step) < 2:
        return set()
    last = max(grads_by_step)
    freed = {ev[1] for ev in events if ev[0] == "f"}
    return {i for k, gr in grads_by_step.items() if k != last for i, _ in gr if events[i][1] not in freed}


@dataclass(frozen=True)
class Moments:
    """The single-GPU walk's activation terms of a step (no weights, gradients or states)."""

    A_fwd: int  # saved for backward at the end of the forward
    weight_copies: int  # autocast's weight copies held to the end of the forward (checkpointing)
    fwd_loss: int  # transients at the loss in the forward
    layer_fwd: int  # one checkpointed layer's unsaved forward
    bwd_loss: int  # transients at the loss in the backward
    logprobs: int  # saved by the head, freed by its backward
    dlogits: int  # the logits' gradient, held through the LM head's backward
    top_acts: int  # activations at the top decoder layer's backward (its transients included)
    bottom_acts: int  # at the bottom decoder layer's backward
    largest_block: int  # the largest transient block (the walk's reserve term)


def moments(spec, s, targets, profile, c=DEFAULT, drop_weight_copies: bool = False) -> Moments:
    """The walk's terms (vramfit.memory.walk.breakdown, line for line; tests/test_distributed.py checks
    that the moments rebuild its phases).  `drop_weight_copies`: the engine gathers weights already
    in the compute dtype, so autocast keeps no copies of them."""
    B, S, T = s.micro_batch, s.seq_len, s.tokens
    n_layers = len(profile.layers)
    regions = {id(r): r for r in profile.layers}.values()
    per_region = {id(r): int(c.activation_scale * (r.bytes(B, S) - (r.const if drop_weight_copies else 0)))
                  for r in regions}
    layer_saved = [per_region[id(r)] for r in profile.layers]
    ht = head_terms(spec, s, profile)
    outside_saved = int(c.activation_scale * profile.outside.bytes(B, S)) + ht.saved_delta
    max_tensor = max((int(B * r.max_tensor_lin * S) for r in regions), default=0)
    max_sq = max((int(B * r.max_tensor_quad * S * S) for r in regions), default=0)
    transient = int(c.layer_backward_factor * max(max_tensor, max_sq) + 2 * profile.layer_input_lin * T)
    if s.method == "qlora":  # dequantize_4bit(W) in bf16 for the input gradient of each 4-bit layer
        from vramfit.memory.walk import _quant_totals

        transient += _quant_totals(spec, c, s.double_quant)[2] * 2
    l_max = max(layer_saved, default=0)
    head_copy = max(0, int(profile.outside.const)) if s.loss != "fused" else 0
    if drop_weight_copies and head_copy:
        # nor of the LM head's: autocast's copy of it, saved by the head's matmul for its backward, is the
        # traced constant outside the layers (under FSDP2's MixedPrecisionPolicy(param_dtype=bf16) the tail
        # is gathered in bf16 and autocast's cast returns it as it is: torch/csrc/autograd/autocast_mode.h,
        # cached_cast skips tensors already in the target dtype)
        outside_saved -= head_copy
        head_copy = 0
    if s.grad_ckpt:
        kept_per_layer, kept_shared = int(profile.layer_input_lin * T), int(profile.shared_input_lin * T)
        A_fwd = outside_saved + kept_per_layer * n_layers + kept_shared
        top = A_fwd - ht.saved_head - head_copy + l_max + transient
        bottom = kept_shared + kept_per_layer + l_max + transient
    else:
        A_fwd = outside_saved + sum(layer_saved)
        top = A_fwd - ht.saved_head - head_copy + transient
        bottom = (layer_saved[0] if layer_saved else 0) + transient
    return Moments(A_fwd=A_fwd,
                   weight_copies=sum(r.const for r in profile.layers) if s.grad_ckpt and not drop_weight_copies else 0,
                   fwd_loss=ht.fwd, layer_fwd=int(c.layer_backward_factor * max_tensor) if s.grad_ckpt else 0,
                   bwd_loss=ht.bwd, logprobs=ht.saved_head, dlogits=ht.dlogits, top_acts=top, bottom_acts=bottom,
                   largest_block=ht.largest_block)


@dataclass(frozen=True)
class RankTerms:
    """What one rank holds besides the activations, per moment (`MOMENTS`)."""

    weights: tuple  # ((name, bytes), ...) held for the whole step
    optimizer: int  # optimizer states on this GPU (torch allocator)
    optimizer_temp: int  # the optimizer step's temporaries on this GPU
    grads: dict  # moment -> gradient bytes held then (unsharded, sharded and in-flight together)
    held: dict  # moment -> {engine buffer: bytes} (gathered parameters, buckets, reduce-scatter inputs)
    pools: dict = field(default_factory=dict)  # other CUDA streams' cached bytes: name -> (reserved, {moment: in use})
    device_extra: int = 0  # outside torch's allocator (NCCL)
    device_streams: int = 0  # outside torch's allocator: the engine's side streams (SIDE_STREAMS_DEVICE_BYTES)
    no_weight_copies: bool = False  # the engine gathers weights already in the compute dtype
    host_bytes: int = 0  # pinned host memory of this rank (offload)
    host_named: tuple = ()  # ((name, bytes), ...)

    def held_at(self, moment: str) -> int:
        return sum(self.held.get(moment, {}).values())


def single_gpu_grads(G: int, G_out: int, G_step: int, n_layers: int) -> dict:
    """The walk's gradients per moment: none in the forward (zero_grad(set_to_none)), the embeddings'
    and LM head's from the head on, one layer's more at the top, all at the bottom."""
    g_layer = (G - G_out) / max(n_layers, 1)
    return {"forward_first": 0, "forward_layer": 0, "forward_loss": 0, "backward_loss": 0, "backward_head": G_out,
            "backward_top": int(G_out + g_layer), "backward_bottom": G, "backward_end": G, "optimizer": G_step}


def moment_bytes(m: Moments, t: RankTerms, ws: int) -> dict:
    """Torch-allocated bytes at every moment of the step."""
    W = sum(b for _, b in t.weights)
    persist = W + t.optimizer + ws
    acts = {"forward_first": 0, "forward_layer": m.A_fwd + m.weight_copies + m.layer_fwd,
            "forward_loss": m.A_fwd + m.weight_copies + m.fwd_loss,
            "backward_loss": m.A_fwd + m.bwd_loss,
            "backward_head": m.A_fwd - m.logprobs + m.dlogits,
            "backward_top": m.top_acts, "backward_bottom": m.bottom_acts, "backward_end": 0}
    out = {k: persist + a + t.grads.get(k, 0) + t.held_at(k) for k, a in acts.items()}
    out["optimizer"] = W + t.grads.get("optimizer", 0) + t.optimizer + t.optimizer_temp + ws + t.held_at("optimizer")
    return out


def rank_breakdown(single: Breakdown, m: Moments, t: RankTerms, c=DEFAULT, anchor: dict | None = None,
                   reserve: int | None = None) -> Breakdown:
    """One rank's Breakdown: the largest moment and its components.  Reserved: the largest moment's
    default-stream bytes plus the allocator's reserve over them (the walk's fitted one, or `reserve`),
    plus what other streams' pools hold (`RankTerms.pools`: a freed block serves only its own stream).
    `anchor`: phase -> bytes added to its moments (the replay's correction of the walk)."""
    ws = c.cublas_workspace_bytes
    at = {k: v + (anchor or {}).get(PHASE[k], 0) for k, v in moment_bytes(m, t, ws).items()}
    phases = {}
    for k, v in at.items():
        phases[PHASE[k]] = max(phases.get(PHASE[k], 0), v)
    peak_moment = max(at, key=at.get)
    peak_phase, peak = PHASE[peak_moment], at[peak_moment]
    if reserve is None:
        reserve = max(c.reserve_floor_bytes, int(c.reserve_const_bytes + c.reserve_per_logits_byte * m.largest_block
                                                 + c.reserve_per_activation_byte * (m.A_fwd - m.logprobs)
                                                 + c.reserve_per_optimizer_temp_byte * t.optimizer_temp))
    default = max(v - sum(used.get(k, 0) for _, used in t.pools.values()) for k, v in at.items())
    pooled = sum(res for res, _ in t.pools.values())
    reserved = max(peak, default + reserve + pooled)
    comps = dict(t.weights)
    comps["gradients"] = t.grads.get(peak_moment, 0)
    comps["optimizer_states"] = t.optimizer
    if peak_phase == "optimizer":
        comps["activations"] = 0
        comps["optimizer_step_temporaries"] = t.optimizer_temp
    else:
        comps["activations"] = m.A_fwd - m.logprobs
        loss = {"forward_loss": m.fwd_loss, "backward_loss": m.bwd_loss}.get(peak_moment, 0)
        comps["logits_and_loss"] = m.logprobs + loss
    comps.update(t.held.get(peak_moment, {}))
    rest = peak - sum(comps.values()) - ws
    if peak_phase != "optimizer":
        comps[f"{peak_phase}_transients"] = max(0, rest)
    comps["cublas_workspace"] = ws
    comps["allocator_reserve"] = reserved - peak
    comps["cuda_context"] = c.cuda_context_bytes + c.kernel_growth_bytes + t.device_streams
    if t.device_extra:
        comps["nccl_buffers"] = t.device_extra
    notes = single.notes + (f"peak moment: {peak_moment.replace('_', ' ')}",)
    if pooled:
        notes += ("reserved includes other CUDA streams' pools: "
                  + ", ".join(f"{k.replace('_', ' ')} {res:,} B" for k, (res, _) in t.pools.items()),)
    return Breakdown(components={k: int(v) for k, v in comps.items()}, phases={k: int(v) for k, v in phases.items()},
                     peak_phase=peak_phase, peak_allocated_bytes=int(peak), peak_reserved_bytes=int(reserved),
                     device_bytes=int(reserved + comps["cuda_context"] + t.device_extra),
                     params_total=single.params_total, params_trainable=single.params_trainable,
                     params_packed=single.params_packed, notes=notes)


__all__ = ["FP32", "MOMENTS", "backward_workspaces", "broadcast_buckets", "stream_reserved", "Moments", "RankTerms", "SIDE_STREAMS_DEVICE_BYTES", "moment_bytes", "moments", "rank_breakdown", "single_gpu_grads"]
