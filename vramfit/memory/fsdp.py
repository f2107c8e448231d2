"""What one rank holds under FSDP2 (`fully_shard`) as accelerate 1.15 wraps a causal LM, moment by moment.
Pure: no torch.

Units (accelerate/utils/fsdp_utils.py, fsdp2_prepare_model): every decoder layer (TRANSFORMER_BASED_WRAP)
with the strategy's reshard_after_forward; the input embedding alone when untied (same setting);
the "tail" [final norm, LM head] -- with the embedding in it when tied -- with
reshard_after_forward=False ("forward-end / backward-start uses cluster"); and the root.

torch 2.11's FSDP2 (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, _fsdp_collectives.py):
- a unit's all-gather allocates one flat output of its unsharded size (`foreach_all_gather`, in the
  all-gather copy-in stream); the copy-out allocates the unsharded parameters (default stream).
  In the forward the flat output is kept until the next unit's copy-out, or the root's post-forward
  ([Note: Overlapping all-gather copy-in and all-gather], `wait_for_unshard`): a layer runs beside
  its own flat output, and at the loss the last gathered unit's flat output is still held.  In the
  backward it is freed right after the copy-out, and each unit's pre-backward prefetches the unit
  before it in the forward's order (`_backward_prefetch`): a layer's backward runs beside the next
  one's flat output.
- post-backward: reshard, then the previous unit's reduce-scatter input is dropped
  (`comm_ctx.reduce_scatter_state`) and this unit's is allocated (its padded unsharded gradient size,
  reduce dtype, default stream), the unsharded gradients copied in and freed; the sharded gradient
  is the reduce-scatter output (reduce-scatter stream), cast to the parameter dtype when they differ.
- a unit's post-backward hook sits on its forward inputs that require grad: for a unit whose inputs
  are token ids (the tied tail, the embedding) it runs in the root's final callback, at the end.
- the other streams' pools are replayed through the caching allocator (`stream_pools`): under mixed
  precision each unit's float32 shards are cast into one bf16 all-gather input on the all-gather stream,
  and each reduce-scatter output (bf16) is cast to the float32 sharded gradient on the reduce-scatter
  stream (the h100-2026-12-07d fsdp-full histories: 746 and 1368 MiB on those streams, llama-3.2-1b N = 4).
QLoRA: vramfit launches it with FSDP1 (peft's FSDP-QLoRA recipe: flat parameters of bf16 storage, one per
decoder layer and per LoRA module, the root's never resharded after the forward, BACKWARD_PRE
prefetch; torch/distributed/fsdp/_runtime_utils.py): one unit gathered at a time in the forward,
two in the backward, the root (embeddings, final norm, LM head) all step; the padded flat parameters are
allocated in FSDP1's unshard stream's own pool (vramfit.memory.fsdp1: that pool, the post-backward and
pre-unshard streams' replayed; the default stream's reserve is the rank's gap replay's).
Mixed precision (accelerate's mixed_precision bf16 -> MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=bf16)): fsdp2_prepare_model first upcasts every trainable parameter to fp32, so the
sharded parameters, gradients and optimizer states of trainable parameters are fp32 and every
parameter is gathered in bf16.
"""

from __future__ import annotations

import math

from vramfit.memory.allocator import CachingAllocator
from vramfit.memory.rank_step import SIDE_STREAMS_DEVICE_BYTES, RankTerms, stream_reserved

FP32 = 4


def _ceil_div(a: float, n: int) -> int:
    return math.ceil(a / n)


def shard_numel(shape, gpus: int) -> int:
    """Elements of one rank's shard of a parameter: FSDP2 shards on dim 0 (torch.chunk), each rank's
    chunk padded to ceil(dim0 / N) rows (torch/distributed/fsdp/_fully_shard/_fsdp_param.py)."""
    return math.ceil(shape[0] / gpus) * (math.prod(shape[1:]) if len(shape) > 1 else 1)


def fsdp_shard_numel(spec, gpus: int) -> int:
    """Elements of one rank's shards of every parameter (`shard_numel`)."""
    return sum(count * shard_numel(shape, gpus) for shape, count, _ in spec.param_shapes)


def units(spec) -> dict:
    """Element counts of the FSDP2 units accelerate builds: one decoder layer, the embedding unit
    (0 when tied: it is in the tail), the tail and whatever is left to the root."""
    roles = spec.params_by_role
    emb, head, norm = roles.get("embeddings", 0), roles.get("lm_head", 0), spec.hidden_size
    layers = max(spec.num_layers, 1)
    per_layer = max(0, spec.params_total - emb - head - norm) / layers
    tied = bool(spec.tied_embeddings) or head == 0
    return {"layer": per_layer, "embedding": 0 if tied else emb, "tail": head + norm + (emb if tied else 0),
            "tied": tied, "layers": layers}


def fsdp_terms(spec, s, targets, st, n: int, c, weights: dict, tensors, O: int, temp: int, nccl: int,
               qlora_packed: int = 0, qlora_constants: int = 0) -> RankTerms:
    """One rank's terms under FSDP2 (`st.reshard_after_forward`: FULL_SHARD true, SHARD_GRAD_OP false).
    `weights`: the single-GPU weights by name (as the rank's model stores them); `tensors`: the
    trainable tensors; QLoRA (`qlora_packed` 4-bit bytes, their quantization constants replicated)."""
    u = units(spec)
    L, tied, full_shard = u["layers"], u["tied"], st.reshard_after_forward
    fsdp1 = qlora_packed > 0  # the launcher's QLoRA (`s`: its activation setup, LoRA over bf16)
    if fsdp1:  # FSDP1: the root holds everything outside the layers, gathered all step
        u = dict(u, tail=u["tail"] + u["embedding"], embedding=0)
        tied = True
    mp = bool(s.autocast_dtype)  # accelerate's mixed precision: MixedPrecisionPolicy(bf16, bf16)
    pb = 2 if s.param_dtype != "float32" else FP32
    gb = 2 if mp else pb  # gather dtype of the base parameters
    full = s.method == "full"
    store = FP32 if (full and mp) else pb  # trainable storage: upcast to fp32 under mixed precision
    adapters = weights.get("lora_adapters", 0) / FP32  # elements
    # ---- sharded parameters (padded dim-0 chunks), at rest
    frac = fsdp_shard_numel(spec, n) / max(spec.params_total, 1)
    w = {}
    if fsdp1:
        w["weights_4bit_sharded"] = _ceil_div(qlora_packed, n)
        w["weights_4bit_quant_constants"] = qlora_constants  # QuantState's absmax: not a parameter
        w["weights_bfloat16_unquantized_sharded"] = _ceil_div(weights["weights_bfloat16_unquantized"], n)
    else:
        base = spec.params_total * (store if full else pb)
        w[f"weights_{'float32' if (store if full else pb) == FP32 else s.param_dtype}_sharded"] = int(base * frac)
    if adapters:
        w["lora_adapters_sharded"] = _ceil_div(adapters * FP32, n)
    # ---- unsharded units in the gather dtype (adapters: fp32, or bf16 under mixed precision)
    ab = 2 if mp else FP32
    if fsdp1:
        q_numel = 2 * qlora_packed
        U = (qlora_packed + (u["layer"] * L - q_numel) * 2 + adapters * ab) / L
    else:
        U = u["layer"] * gb + adapters * ab / L
    U_tail, U_emb = u["tail"] * gb, u["embedding"] * gb
    # ---- gradients: unsharded in the reduce dtype, sharded in the parameter's
    grad_u = 2 if mp else (store if full else FP32)
    grad_s = store if full else FP32
    t_layer = u["layer"] if full else adapters / L  # trainable elements of one layer
    g_u = t_layer * grad_u
    g_s_layers = _ceil_div(t_layer * L * grad_s, n)
    t_tail = (u["tail"]) if full else 0
    t_emb = u["embedding"] if full else 0
    tail_u, tail_s = t_tail * grad_u, _ceil_div(t_tail * grad_s, n)
    emb_u, emb_s = t_emb * grad_u, _ceil_div(t_emb * grad_s, n)
    # untied: the tail is reduce-scattered after the final norm's backward (its inputs need grad),
    # its input buffer kept until the top layer's post-backward; tied: its hook sits on token ids,
    # so its gradient stays unsharded to the end
    tail_state = tail_u if tied else tail_s
    # the embedding takes part in the backward (FSDP2 re-gathers it in its pre-backward) when its
    # output needs a gradient: its weight trains, or checkpointed LoRA (enable_input_require_grads)
    emb_in_backward = full or (s.grad_ckpt and s.method != "full")
    # ---- what is gathered at each moment
    keep_tail = U_tail if tied else 0  # the tied tail holds the embedding: gathered all step
    # trl's fused loss calls its own kernel with lm_head.weight instead of the LM head's forward: untied, the
    # tail's FSDP hooks never run and the sharded weight (a DTensor) is gathered whole, once, on the default
    # stream for the loss's forward and freed after it (the loss's gradient is made in the forward); the last
    # flat output held to the root's post-forward is then the top layer's (h100-2026-12-07g memory histories,
    # llama-3.1-8b[8] LoRA under fsdp-full and fsdp-grad-op)
    dtensor_head = s.loss == "fused" and not tied and not full  # (full fine-tuning: not measured so)
    last_flat = U if (tied or dtensor_head) else U_tail
    # LoRA under trl's fused loss with a tied tail [final norm, embedding, LM head] (accelerate's
    # fsdp2_prepare_model: one group, reshard_after_forward=False, gathered at the embedding's pre-forward): the
    # LM head's forward never runs, so the group's forward is left incomplete and FSDP2 finishes it from the
    # root's post-forward (torch/distributed/fsdp/_fully_shard/_fsdp_state.py, FSDPState.
    # _force_complete_incomplete_states -- torch 2.13's source, read here; the runs were torch 2.11): the tail's
    # post_forward appends it to the post-forward order after the top layer and registers its pre-backward hook
    # on the root's output, the loss.  The backward's first step is then the tail's _pre_backward ->
    # FSDPParamGroup.pre_backward (unshard: a no-op, it is gathered) -> _backward_prefetch: the top layer's
    # all-gather (its flat output, U, on the all-gather stream) issued before the loss's own backward and held
    # through it (trl's _ChunkedLogProbFunction.backward: its fp32 hidden gradient and 128 MiB tile) to the top
    # layer's copy-out.  The h100-2026-12-07g / 08a histories, `_prefetch_unshard` at the backward's start:
    # qwen2.5-1.5b N = 2, 89.6 MiB (entry 19510; trl's backward from 19521); llama-3.2-1b N = 8, 116.4 MiB
    # (8939; 8950); llama-3.2-1b bf16-amp N = 4, 116.2 MiB (10526; 10538).  The full fine-tuning ones (08a:
    # qwen2.5-1.5b N = 2 and 4) gather the top layer at its own pre_backward, after the loss's backward, as
    # modelled.  (The untied LoRA histories, llama-3.1-8b[8] N = 2 and 4, show the same prefetch, 416.8 MiB at
    # 4734; their head is gathered as a DTensor, not through the tail's hooks -- `dtensor_head` -- and the
    # prefetch moves none of their peaks: left as it was.)  Under the logits loss the tail's hook sits on the
    # logits: the prefetch comes after the loss's backward (backward_head).
    fused_prefetch = full_shard and s.loss == "fused" and tied and not full
    if full_shard:
        g_fwd_layer = keep_tail + 2 * U  # running layer + its flat all-gather output
        g_fwd_loss = U_tail + last_flat  # the tail (or the gathered LM-head weight) + the last flat output
        g_bwd_loss = (0 if dtensor_head else U_tail) + (U if fused_prefetch else 0)
        g_bwd_head = g_bwd_loss + (U if s.loss != "fused" else 0)  # logits path: the tail's pre-backward prefetch
        g_top = keep_tail + 2 * U  # the layer + the next one's prefetched flat output
        g_bottom = keep_tail + U + (U_emb if not tied else 0)  # + the embedding's prefetched flat output
        # the untied embedding re-gathered last (LoRA, checkpointed): its copy-out beside its own flat output
        g_end = (U_emb if (tied or full) else 2 * U_emb) if emb_in_backward else 0
    else:  # SHARD_GRAD_OP: gathered from its forward to its backward, no all-gather in the backward
        keep = keep_tail or U_emb
        g_fwd_layer = keep + L * U + U
        g_fwd_loss = keep + L * U + U_tail * (0 if tied else 1) + last_flat
        g_bwd_loss = g_bwd_head = keep + L * U + (0 if (tied or dtensor_head) else U_tail)
        g_top, g_bottom, g_end = keep + L * U, keep + U, U_emb
    if fsdp1:
        g_fwd_layer, g_fwd_loss, g_bwd_loss = U_tail + U, U_tail, U_tail
        # BACKWARD_PRE prefetches the handle before the running one in POST-forward order (_exec_order_utils.py
        # get_handle_to_backward_prefetch): the root's is the top layer, a layer's is its own last LoRA unit --
        # the layer below is gathered only from the end of this one's backward (its first LoRA unit's
        # pre-backward), after its peak: one layer at each layer's peak (the 07d history, llama-3.2-1b N = 4:
        # 530.3 MiB on the unshard stream at the step's peak, the root's 501 and one layer's 29.3)
        g_bwd_head, g_top, g_bottom, g_end = U_tail + U, U_tail + U, U_tail + U, U_tail
        if not full_shard:
            g_fwd_layer, g_fwd_loss = U_tail + L * U, U_tail + L * U
            g_bwd_loss = g_bwd_head = g_top = U_tail + L * U
    # the first layer's copy-out runs beside the flat output of the unit gathered before it (the tied
    # tail, or the untied embedding), freed only then (h100-2026-12-07g history of llama-3.2-1b LoRA)
    prev_flat = (U_tail if tied else U_emb) if full_shard and not fsdp1 else 0
    held = {"forward_first": {"fsdp_gathered_params": keep_tail + 2 * U + prev_flat} if prev_flat else {},
            "forward_layer": {"fsdp_gathered_params": g_fwd_layer},
            "forward_loss": {"fsdp_gathered_params": g_fwd_loss},
            "backward_loss": {"fsdp_gathered_params": g_bwd_loss},
            "backward_head": {"fsdp_gathered_params": g_bwd_head},
            "backward_top": {"fsdp_gathered_params": g_top, "fsdp_reduce_scatter_input": 0 if tied else tail_u},
            "backward_bottom": {"fsdp_gathered_params": g_bottom, "fsdp_reduce_scatter_input": g_u},
            "backward_end": {}}
    # the end: the embedding's (untied) or the tied tail's backward beside layer 1's reduce-scatter
    # input, then its post-backward: its gradient and its reduce-scatter input
    last_u = emb_u if not tied else tail_u
    last_params = g_end if not tied else U_tail
    end_a, end_b = last_params + last_u + g_u, 2 * last_u
    held["backward_end"] = {"fsdp_gathered_params": last_params if end_a >= end_b else 0,
                            "fsdp_reduce_scatter_input": g_u if end_a >= end_b else last_u}
    sharded_all = g_s_layers + tail_s + emb_s
    grads = {"forward_layer": 0, "forward_loss": 0, "backward_loss": 0,
             "backward_head": tail_u,  # the LM head's (tied: shared) gradient, unsharded
             "backward_top": int(g_u + tail_state),
             "backward_bottom": int(g_u + g_s_layers * (L - 1) / L + tail_state),
             "backward_end": int(g_s_layers + tail_state + last_u) if tied else int(g_s_layers + tail_s + emb_u),
             "optimizer": sharded_all}
    # other streams' pools (CUDACachingAllocator: a freed block serves only its own stream): the
    # flat all-gather outputs and, under mixed precision, each unit's all-gather input (copy-in stream:
    # two outputs at once in the forward), the reduce-scatter outputs and the sharded gradients
    # (reduce-scatter stream: freed by zero_grad, cached for the next step) -- replayed (`stream_pools`)
    flat_in_use = {"forward_first": U + prev_flat, "forward_layer": U, "forward_loss": last_flat,
                   "backward_loss": U if fused_prefetch else 0,
                   "backward_head": U if (full_shard and (s.loss != "fused" or fused_prefetch)) else 0,
                   "backward_top": U if full_shard else 0, "backward_bottom": U_emb if full_shard else 0}
    if full_shard and not tied and not full and emb_in_backward and end_a >= end_b:  # the embedding's flat output
        flat_in_use["backward_end"] = U_emb
    if fsdp1:  # FSDP1 all-gathers into each unit's padded flat parameter: no copy-in stream output
        flat_in_use = {}
    rs_in_use = {"backward_top": tail_s, "backward_bottom": g_s_layers * (L - 1) / L + tail_s,
                 "backward_end": g_s_layers + tail_s, "optimizer": sharded_all}
    pools = {}
    if fsdp1:  # the unshard, post-backward and pre-unshard streams' own pools (vramfit.memory.fsdp1)
        from vramfit.memory.fsdp1 import fsdp1_pools

        res = fsdp1_pools(spec, s, targets, n, full_shard)
        gathered = {k: int(v.get("fsdp_gathered_params", 0)) for k, v in held.items()}
        pools = {"fsdp1_unshard_stream": (res["unshard"], gathered),
                 "fsdp1_post_backward_stream": (res["post_backward"], {k: int(v) for k, v in rs_in_use.items()}),
                 "fsdp1_pre_unshard_stream": (res["pre_unshard"], {})}
    else:
        # per unit: elements gathered, those cast for the all-gather (stored in another dtype than the
        # gather's: accelerate's float32 upcast under MixedPrecisionPolicy(param_dtype=bf16)), trainable ones
        base_store = store if full else pb
        cast_base = mp and base_store != gb
        unit = {"layer": (u["layer"], t_layer, adapters / L),
                "tail": (0 if dtensor_head else u["tail"], t_tail, 0),  # (its weight gathered on the default stream)
                "embedding": (u["embedding"], t_emb, 0)}
        spec_units = {}
        for name, (elems, trained, adapter) in unit.items():
            flat = elems * gb + adapter * ab
            cast_in = ((elems if cast_base else 0) * gb + (adapter * ab if mp else 0)) / n
            rs_out = trained * grad_u / n
            rs_keep = trained * grad_s / n if grad_s != grad_u else 0
            spec_units[name] = (int(flat), int(cast_in), int(rs_out), int(rs_keep))
        res = stream_pools(spec_units, L, tied, full_shard, emb_in_backward, expandable=s.allocator == "expandable")
        pools = {"fsdp_all_gather_stream": (res["all_gather"], {k: int(v) for k, v in flat_in_use.items()}),
                 "fsdp_reduce_scatter_stream": (res["reduce_scatter"], {k: int(v) for k, v in rs_in_use.items()})}
    return RankTerms(weights=tuple((k, int(v)) for k, v in w.items()), optimizer=_ceil_div(O, n),
                     optimizer_temp=_ceil_div(temp, n), grads=grads,
                     held={k: {a: int(b) for a, b in v.items() if b} for k, v in held.items()}, pools=pools,
                     device_extra=nccl, device_streams=SIDE_STREAMS_DEVICE_BYTES, no_weight_copies=mp)


def stream_events(units: dict, L: int, tied: bool, full_shard: bool, emb_in_backward: bool) -> dict:
    """One step of FSDP2's other CUDA streams, as allocator events ("a", id, bytes) / ("f", id) per stream.
    `units`: name ("layer", "tail", "embedding") -> (flat all-gather output bytes, all-gather input bytes
    (0 where nothing is cast), reduce-scatter output bytes, sharded gradient cast bytes (0: none)).
    torch 2.11 (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py), as the h100-2026-12-07d
    histories show it (fsdp-full n4 llama-3.2-1b, bf16-mixed):
    - all-gather stream: per unit, under mixed precision its shards cast into one flat input
      (`_get_param_all_gather_inputs`' foreach copy, only for parameters stored in another dtype), the
      flat output (`foreach_all_gather`), the input freed once copied in; in the forward the previous
      unit's output is freed after this one's all-gather (its copy-out done), the last at the root's
      post-forward; in the backward each resharded unit is gathered again and its output freed after
      its copy-out, before the next one's.  The forward's order: the tied tail first (the embedding is
      in it), or the embedding, the layers, the untied tail; the backward's: the layers from the top,
      the embedding last (when it takes part in the backward).
    - reduce-scatter stream: per unit's post-backward (the untied tail's after the final norm's
      backward, the layers from the top, the tied tail's or the embedding's at the end) the
      reduce-scatter output in the reduce dtype, cast to the parameter's dtype where it differs
      (`_to_dtype_if_needed`, the output then freed); the sharded gradients held to zero_grad."""
    ids = iter(range(1, 1 << 30))
    ag, rs, keep = [], [], []

    def gather(name, free_prev=None):
        flat, cast_in = units[name][:2]
        i, o = next(ids), next(ids)
        out = [("a", i, cast_in)] if cast_in else []
        out.append(("a", o, flat))
        if cast_in:
            out.append(("f", i))
        if free_prev is not None:
            out.append(("f", free_prev))
        return out, o

    prev = None
    fwd = (["tail"] if tied else (["embedding"] if units["embedding"][0] else [])) + ["layer"] * L
    fwd += [] if tied else (["tail"] if units["tail"][0] else [])
    for name in fwd:
        evs, prev_new = gather(name, prev)
        ag += evs
        prev = prev_new
    if prev is not None:
        ag.append(("f", prev))
    if full_shard:
        for name in ["layer"] * L + (["embedding"] if (not tied and emb_in_backward and units["embedding"][0]) else []):
            evs, o = gather(name)
            ag += evs + [("f", o)]
    order = ([] if tied else ["tail"]) + ["layer"] * L + (["tail"] if tied else ["embedding"])
    for name in order:
        _, _, out_b, cast_b = units[name]
        if not out_b:
            continue
        o = next(ids)
        rs.append(("a", o, out_b))
        if cast_b:
            c_ = next(ids)
            rs += [("a", c_, cast_b), ("f", o)]
            keep.append(c_)
        else:
            keep.append(o)
    rs += [("f", k) for k in keep]  # zero_grad(set_to_none) after the optimizer step
    return {"all_gather": ag, "reduce_scatter": rs}


def stream_pools(units: dict, L: int, tied: bool, full_shard: bool, emb_in_backward: bool, steps: int = 2,
                 expandable: bool = False) -> dict:
    """Each other stream's reserved bytes after `steps` steps (`stream_events`), through the caching allocator:
    its own segments (a block is rounded, a 1-10 MiB request takes a 20 MiB segment, a freed block is reused
    only by requests of its own stream).  Cached: the planner's walk asks for the same units again and again."""
    key = (tuple(sorted(units.items())), L, tied, full_shard, emb_in_backward, steps, expandable)
    hit = _POOLS.get(key)
    if hit is None:
        hit = _POOLS[key] = _stream_pools(units, L, tied, full_shard, emb_in_backward, steps, expandable)
    return dict(hit)


_POOLS: dict = {}


def _stream_pools(units, L, tied, full_shard, emb_in_backward, steps, expandable) -> dict:
    return {name: stream_reserved(evs, steps, expandable)
            for name, evs in stream_events(units, L, tied, full_shard, emb_in_backward).items()}


def wrap_events(spec, s, n: int, full_bytes: int, ids, originals: tuple = (), qlora: bool = False,
                adapters: tuple = ()) -> list:
    """What wrapping leaves on the GPU before the first step (the Trainer's empty_cache runs before it:
    transformers' _inner_training_loop frees memory, then prepares the model), as allocator events.
    FSDP2 (accelerate's fsdp2_prepare_model on a model built on the CPU): fully_shard moves each unit's
    parameters to the GPU whole, then copies each one's padded dim-0 chunk into its own sharded tensor and
    drops the whole one (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, _init_sharded_param): per
    parameter, the whole tensor (`full_bytes` per element: fp32 where accelerate upcast the trainable ones)
    then its shard.  FSDP1 (the launcher's QLoRA, its model loaded on the GPU: `originals`, the load's live
    allocations): per unit, the flat parameter (the unit's tensors concatenated) and its local shard, the
    flat one freed, and the original tensors freed once they are views of nothing.  Against the fake-group
    runs' after-wrap reserved (llama-3.1-8b's untied 128k head: 5 GB cached at N = 8) this is what keeps
    the wrap's cache in the rank's reserve."""
    u = units(spec)
    L = u["layers"]
    out = []
    if qlora:  # FSDP1, unit by unit: its broadcast, flat parameter and shard (vramfit.memory.fsdp1)
        from vramfit.memory.fsdp1 import fsdp1_wrap_events
        from vramfit.memory.setup import resolve_targets

        return fsdp1_wrap_events(spec, s, resolve_targets(spec, s), n, ids, originals)
    # fully_shard(unit) moves the whole unit to the GPU first (_move_states_to_device), then shards its
    # parameters one by one: per decoder layer, then the root with what is left (embeddings, LM head, norm)
    layer, root = [], list(adapters)  # adapters: (shape, bytes per element)
    for shape, count, role in spec.param_shapes:
        per = 0 if role in ("embeddings", "lm_head") else count // L
        layer += [(tuple(shape), full_bytes)] * per
        root += [(tuple(shape), full_bytes)] * (count - per * L)
    # the whole parameters stay alive until the unit is sharded (fully_shard holds them, `params`, until
    # _init_param_group returns), so a unit's shards never take its own wholes' blocks: they take segments of
    # their own, and the next unit's wholes take the freed ones (the h100-2026-12-07g history of llama-3.1-8b[8]
    # LoRA fsdp-grad-op N = 4: _move_states_to_device's 8 segments, 2,424 MiB -- one layer's wholes and the
    # embedding's and LM head's -- and _init_sharded_param's 35, 1,338 MiB; after wrapping 3,764 MiB reserved)
    for unit in [layer] * L + [root]:
        wholes = [ids() for _ in unit]
        out += [("a", w, math.prod(sh) * nb) for w, (sh, nb) in zip(wholes, unit)]
        out += [("a", ids(), shard_numel(shape, n) * nbytes) for shape, nbytes in unit]
        out += [("f", w) for w in wholes]
    return out


def wrap_rounding(wrap: list, expandable: bool = False) -> int:
    """Bytes the caching allocator gives the blocks wrapping leaves allocated beyond their requested sizes: the
    rank's shards, held all run, are counted by their bytes in the walk's terms, but each is a block of its own
    (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, _init_sharded_param: one padded dim-0 chunk per
    parameter).  A request over 10 MiB that takes a new segment gets one rounded up to 2 MiB, and the block is
    split only when more than 1 MiB would be left (CUDACachingAllocator's should_split, kSmallSize), so the
    whole segment is allocated: qwen2.5-1.5b at N = 2 shards each MLP weight (8960 x 1536 bf16) into 13.125 MiB,
    allocated as 14 MiB -- the h100-2026-12-07 run's after-wrap allocated is 1,536.2 MiB against 1,476.4 MiB of
    shards (59.8 MiB more: such blocks, in its memory history), and the same blocks stay allocated at every
    step's peak.  The allocator over `wrap` alone (wrapping starts from an empty allocator: the model is built
    on the CPU and the Trainer empties the cache first): allocated minus requested at its end."""
    a, live = CachingAllocator(expandable), {}
    for ev in wrap:
        a.apply(ev, live)
    return int(a.allocated - a.requested)


def top_layer_entry_cut(events: list, cuts: list, spec, act) -> list:
    """`cuts` (`step_windows`) with the top decoder layer's own window ("layer", 0) opened where its backward
    begins rather than at its first parameter gradient.  Under FULL_SHARD the top layer's pre-backward
    (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, FSDPParamGroup.pre_backward: unshard, then
    wait_for_unshard's copy-out, then _backward_prefetch of the layer below) runs when the gradient first
    reaches the layer: from there on the rank holds the layer's gathered parameters and the next one's flat
    all-gather output -- the backward_top terms -- while the layer's backward runs up to its first parameter
    gradient: the MLP's backward (its checkpointed recompute first), which for LoRA on the attention's
    projections (q, v) is most of the layer.  Left in the loss's window ("backward_head") it was anchored to
    the loss's terms, which hold neither: the h100-2026-12-07g / 08a histories' step peaks are there
    (qwen2.5-1.5b LoRA N = 2 ckpt: the recompute's MLP, entry 19702, beside the copy-out 19588 and the
    prefetched flat 19607; llama-3.2-1b LoRA N = 8: the MLP's backward, entry 9036).  The events do not mark
    the layer's entry; its first (tokens x intermediate) allocation does (the recompute's gate projection,
    or the down projection's input gradient without checkpointing): the loss's and the final norm's backward
    allocate nothing of that size.  Unchanged where no such allocation lies between the two cuts.  (FSDP1's
    QLoRA, BACKWARD_PRE, gathers the top layer at its pre-backward too: its runs' allocated moved by 0.3-0.6
    points toward the measured.)"""
    k = next((j for j, (_, name) in enumerate(cuts) if name == "backward_head"), None)
    inter = getattr(spec, "intermediate_size", 0) or 0
    if k is None or k + 1 >= len(cuts) or cuts[k + 1][1] != ("layer", 0) or inter <= 0:
        return cuts
    sizes = {act.tokens * inter * b for b in (2, 4)}
    at = next((i for i in range(cuts[k][0], cuts[k + 1][0]) if events[i][0] == "a" and events[i][2] in sizes),
              None)
    if at is None:
        return cuts
    return cuts[:k + 1] + [(at, ("layer", 0))] + cuts[k + 1:]


def unit_param_shapes(spec) -> dict:
    """The parameters' shapes of each FSDP2 unit (`units`): one decoder layer's, the untied embedding's, the
    tail's (final norm, LM head; the embedding when tied)."""
    L = max(spec.num_layers, 1)
    out = {"layer": [], "embedding": [], "tail": []}
    tied = bool(spec.tied_embeddings) or not spec.params_by_role.get("lm_head")
    for shape, count, role in spec.param_shapes:
        if role == "embeddings":
            out["tail" if tied else "embedding"] += [tuple(shape)] * count
        elif role == "lm_head":
            out["tail"] += [tuple(shape)] * count
        else:
            per = count // L
            out["layer"] += [tuple(shape)] * per
            out["tail"] += [tuple(shape)] * (count - per * L)  # the final norm
    return out


def copy_out_events(spec, st, gather_bytes: int, marks: dict, ids, loss_fused: bool = False, events=None,
                    s=None) -> dict:
    """FSDP2's unsharded parameters on the default stream (the all-gather copy-out: one tensor per parameter of
    its whole size in the gather dtype, `alloc_all_gather_outputs`) as allocator events of the rank's gap replay:
    {mark: events}.  They are the sizes of the whole parameters that wrapping freed (`wrap_events`), so they take
    those cached blocks: the h100-2026-12-07g history of llama-3.1-8b[8] LoRA fsdp-grad-op N = 4 -- the default
    stream reuses the 2,424 MiB of segments `_move_states_to_device` left for the gathered parameters (2,366 MiB
    of them in use at the first step's reserved peak), its reserve over its allocated peak is 213 MiB.
    Held from each step's forward to its clipping: FULL_SHARD, the running layer (each one's re-gathered into
    the blocks of the one before it) and the tied tail (gathered all step); SHARD_GRAD_OP, every layer and the
    tail or the untied embedding (gathered from their forward to their backward)."""
    shapes = unit_param_shapes(spec)
    tied = bool(spec.tied_embeddings) or not spec.params_by_role.get("lm_head")
    L = max(spec.num_layers, 1)
    held = shapes["layer"] * (1 if st.reshard_after_forward else L)
    if tied:
        held = shapes["tail"] + held
    elif not st.reshard_after_forward:
        held = shapes["embedding"] + held
    # trl's fused loss gathers an untied LM head's sharded weight whole on the default stream for the loss's forward
    # and frees it after (fsdp_terms' dtensor_head): at the end of the forward, beside all the activations, it
    # takes a segment of its own where no cached block fits it (the 8B N = 2 no-checkpointing history: a 1,002 MiB
    # segment from torch/_library/autograd.py, 544 MiB of it reused by the backward at the reserved peak)
    head = [sh for sh, _, role in spec.param_shapes if role == "lm_head"] if (loss_fused and not tied) else []
    out, k = {}, 0
    while f"step{k}.forward" in marks and f"step{k}.clip" in marks:
        h = [ids() for _ in held]
        out[f"step{k}.forward"] = [("a", i, math.prod(sh) * gather_bytes) for i, sh in zip(h, held)]
        out[f"step{k}.clip"] = [("f", i) for i in h]
        if head and f"step{k}.backward" in marks:
            g = [ids() for _ in head]
            out[f"step{k}.backward"] = ([("a", i, math.prod(sh) * gather_bytes) for i, sh in zip(g, head)]
                                        + [("f", i) for i in g])
        if not (tied or loss_fused) and events is not None and s is not None:
            out.update(_tail_copy_out(spec, events, marks, k, s, gather_bytes, ids))
        k += 1
    return out


def _tail_copy_out(spec, events: list, marks: dict, k: int, s, gather_bytes: int, ids) -> dict:
    """An untied tail [final norm, LM head] under the logits loss, gathered through its FSDP hooks
    (reshard_after_forward=False): its copy-out from its pre-forward (the final norm's, right before the LM head's
    logits) to its post-backward (after the final norm's backward: the second hidden-size gradient of the
    backward), as {event index: events}.  The 07i replay left it out (the walk's terms held it): llama-3.1-8b[8]
    LoRA fsdp-full N = 8 without checkpointing -3.5% reserved, its 1,002 MiB LM head gathered beside the step's
    largest activations."""
    f0, b0 = marks.get(f"step{k}.forward"), marks.get(f"step{k}.backward")
    if f0 is None or b0 is None:
        return {}
    tokens = s.seq_len * s.micro_batch
    head = next((i for i in range(f0, b0) if events[i][0] == "a" and events[i][2] >= tokens * spec.vocab_size * 2),
                None)
    hidden = {tokens * spec.hidden_size * b for b in (2, 4)}
    grads = [i for i in range(b0, min(len(events), marks.get(f"step{k}.clip", len(events))))
             if events[i][0] == "a" and events[i][2] in hidden][:2]
    if head is None or not grads:
        return {}
    shapes = unit_param_shapes(spec)["tail"]
    h = [ids() for _ in shapes]
    return {head: [("a", i, math.prod(sh) * gather_bytes) for i, sh in zip(h, shapes)],
            grads[-1] + 1: [("f", i) for i in h]}
