"""FSDP1 (FullyShardedDataParallel), as `vramfit train --gpus N` launches QLoRA (peft's FSDP-QLoRA recipe:
vramfit.run.launch, fsdp_version=1, use_orig_params=False, BACKWARD_PRE prefetch, sync_module_states=True),
what the rank's CUDA streams hold besides the activations.  Pure: no torch.

Units: peft's fsdp_auto_wrap_policy with accelerate's transformer-layer policy -- every LoRA Linear (lora_A,
lora_B: a leaf whose weight trains) is a unit of its own, wrapped before the decoder layer that holds it
(`_recursive_wrap` goes children first), then each decoder layer (its 4-bit weights stored as bf16, its norms),
then the root (embeddings, final norm, an untied LM head).  torch 2.11, torch/distributed/fsdp/:
- wrapping (_init_utils.py, `_init_param_handle_from_module`), per unit: sync_module_states broadcasts the
  unit's states (`_sync_module_params_and_buffers` -> dist._broadcast_coalesced, 250 MiB buckets, at most two
  flattened buckets alive: comm.cpp), then FlatParamHandle concatenates the parameters into one flat
  parameter (flatten_tensors), `shard` clones rank r's chunk and frees the flat storage, and the original
  tensors die when the function returns.  The untied 8B's root: [final norm, LM head] is one bucket of two
  tensors, a 1,002 MiB temporary, whose freed block later takes the root's shard -- the fake-group runs'
  after-wrap reserved (6,040-6,122 MiB) does not depend on N.
- unsharding (_flat_param.py `_alloc_padded_unsharded_flat_param`, called under the unshard stream): each
  unit's padded unsharded flat parameter is allocated in the UNSHARD stream's pool, not the default stream's;
  the root's is held from its pre-forward to its post-backward, each layer's from its pre-forward to its
  post-forward (FULL_SHARD) and again in the backward, two at once (BACKWARD_PRE: the next unit's all-gather
  is issued in this one's pre-backward); SHARD_GRAD_OP keeps every layer from its forward to its backward.
- post-backward (_runtime_utils.py `_reduce_grad`, post-backward stream): per LoRA unit the reduce-scatter
  output (`_get_reduce_scatter_tensors`, its shard in the reduce dtype) and, where the parameter is stored in
  another dtype, its cast (`_cast_grad_to_param_dtype`), kept as the sharded gradient to zero_grad.
- mixed precision: accelerate's prepare_model upcasts every trainable flat parameter to float32 after wrapping
  ("to mimic DeepSpeed's casting in FSDP": `param.data = param.data.to(torch.float32)`), whatever dtype trl
  gave the adapters; the LoRA units' shards are then cast to bf16 on the pre-unshard stream for each all-gather
  (`_use_low_precision_shard`) and their bf16 gradient shards back to float32 (the 07d history's
  `_cast_grad_to_param_dtype` and `_use_low_precision_shard` segments, a run under trl's fused loss).
The h100-2026-12-07d history of llama-3.2-1b QLoRA fsdp-full N = 4 (bf16-amp, checkpointed): the default
stream stays at what the load and the wrap left (1,726 MiB) through the steps; the unshard stream holds 564 MiB
in 4 segments (the tied root's 501 MiB flat parameter, two layers' 29 MiB, the LoRA units' 2 MiB), the
post-backward stream 12 MiB, the pre-unshard stream 2 MiB: 2,304 MiB, the run's reserved peak.
"""

from __future__ import annotations

import math

from vramfit.memory.rank_step import broadcast_buckets, stream_reserved

BUCKET = 250 << 20  # torch/distributed/fsdp/_init_utils.py PARAM_BROADCAST_BUCKET_SIZE
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def fsdp1_units(spec, s, targets) -> list:
    """FSDP1's units in wrapping order: [(kind, [(dtype, bytes) of its parameters in module order])], kind
    "lora" (one adapter matrix), "layer" (a decoder layer's base weights, 4-bit ones as numel / 2 bf16 bytes,
    and its norms) or "root" (embeddings, final norm, an untied LM head)."""
    ab = _BYTES.get(s.adapter_dtype, 4)
    quantized = {lin.name for lin in spec.quantizable_linears()}
    targeted = set(targets)
    roles = spec.params_by_role
    emb, head = roles.get("embeddings", 0), roles.get("lm_head", 0)
    per_layer = {}
    for lin in spec.linears:
        k = next((int(x) for x in lin.name.split(".") if x.isdigit()), None)
        if k is not None:
            per_layer.setdefault(k, []).append(lin)
    out, linear_numel = [], 0
    for k in sorted(per_layer):
        states = []
        for lin in per_layer[k]:
            w = lin.in_features * lin.out_features
            linear_numel += w + (lin.out_features if lin.bias else 0)
            states.append(("bfloat16", (w + 1) // 2 if lin.name in quantized else w * 2))
            if lin.bias:
                states.append(("bfloat16", lin.out_features * 2))
            if lin.name in targeted:
                out += [("lora", [(s.adapter_dtype, s.lora_r * lin.in_features * ab)]),
                        ("lora", [(s.adapter_dtype, lin.out_features * s.lora_r * ab)])]
        out.append(("layer", states))
    layers = [i for i, (kind, _) in enumerate(out) if kind == "layer"]
    other = max(0, spec.params_total - emb - head - spec.hidden_size - linear_numel) * 2 // max(len(layers), 1)
    for i in layers:  # the layer's norms
        out[i][1].append(("bfloat16", other))
    root = [("bfloat16", emb * 2)] if emb else []
    root.append(("bfloat16", spec.hidden_size * 2))
    if head and not spec.tied_embeddings:
        root.append(("bfloat16", head * 2))
    out.append(("root", root))
    return out


def broadcast_events(states, ids, bucket: int = BUCKET, in_flight: int = 2) -> list:
    """dist._broadcast_coalesced of a unit's states as allocator events: buckets per dtype closed once they reach
    `bucket` bytes, each bucket of several tensors flattened into one new tensor (a bucket of one is a view),
    at most `in_flight` alive (torch/csrc/distributed/c10d/comm.cpp)."""
    out, live = [], []
    for size, count in broadcast_buckets(states, bucket):
        if len(live) >= in_flight:
            x = live.pop(0)
            if x is not None:
                out.append(("f", x))
        if count > 1 and size:
            x = ids()
            out.append(("a", x, size))
            live.append(x)
        else:
            live.append(None)
    return out + [("f", x) for x in live if x is not None]


def _shard_bytes(nbytes: int, n: int, elem: int = 2) -> int:
    return math.ceil(nbytes / elem / n) * elem


def fsdp1_wrap_events(spec, s, targets, n: int, ids, originals: tuple) -> list:
    """What FSDP1's wrapping does on the default stream, unit by unit (module docstring): the broadcast's
    flattened buckets, the flat parameter, its shard, the flat parameter freed, then the unit's original
    tensors freed.  `originals`: the load's live allocations ((id, bytes), in load order); a unit's are the
    first unused ones of its parameters' sizes (the quantization constants, no parameters, stay)."""
    free_by_size = {}
    for i, b in originals:
        free_by_size.setdefault(b, []).append(i)
    out = []
    for _, states in fsdp1_units(spec, s, targets):
        total = sum(b for _, b in states)
        if not total:
            continue
        out += broadcast_events(states, ids)
        flat, shard = ids(), ids()
        elem = _BYTES.get(states[0][0], 2)
        out += [("a", flat, total), ("a", shard, _shard_bytes(total, n, elem)), ("f", flat)]
        for _, b in states:
            pool = free_by_size.get(b)
            if pool:
                out.append(("f", pool.pop(0)))
    return out




def stream_events(spec, s, targets, n: int, full_shard: bool, mp: bool) -> dict:
    """One step of FSDP1's side streams as allocator events (module docstring): "unshard" (the padded unsharded
    flat parameters), "post_backward" (the LoRA units' reduce-scatter outputs and sharded gradients),
    "pre_unshard" (the LoRA units' low-precision shards, mixed precision only)."""
    units = fsdp1_units(spec, s, targets)
    root = next(sum(b for _, b in st) for kind, st in units if kind == "root")
    layers, k = [], -1
    for kind, st in units:
        if kind == "lora":
            if k < 0 or layers[k][0] is not None:
                layers.append([None, []])
                k += 1
            layers[k][1].append((st[0][0], sum(b for _, b in st)))
        elif kind == "layer":
            if k < 0 or layers[k][0] is not None:
                layers.append([None, []])
                k += 1
            layers[k][0] = sum(b for _, b in st)
    if mp:  # accelerate's float32 upcast of the trainable flat parameters
        layers = [[size, [("float32", b // _BYTES.get(dt, 2) * 4) for dt, b in loras]] for size, loras in layers]
    nxt = iter(range(1, 1 << 30))
    gather = lambda b, dt: _shard_bytes(b, n, _BYTES.get(dt, 2)) * n * (2 if mp else _BYTES.get(dt, 2)) // \
        _BYTES.get(dt, 2)  # padded, in the gather dtype
    ug, pre, post, keep = [], [], [], []

    def lora_gathers(loras, hold: list | None):
        for dt, b in loras:
            if mp and dt != "bfloat16":  # the shard's bf16 copy for the all-gather
                c = next(nxt)
                pre.extend([("a", c, _shard_bytes(b, n, _BYTES.get(dt, 2)) // _BYTES.get(dt, 2) * 2), ("f", c)])
            g = next(nxt)
            ug.append(("a", g, gather(b, dt)))
            if hold is None:
                ug.append(("f", g))
            else:
                hold.append(g)

    r = next(nxt)
    ug.append(("a", r, _shard_bytes(root, n) * n))
    held = []
    for size, loras in layers:  # the forward
        g = next(nxt)
        ug.append(("a", g, _shard_bytes(size, n) * n))
        lora_gathers(loras, held if not full_shard else None)
        if full_shard:
            ug.append(("f", g))
        else:
            held.append(g)
    if full_shard:  # the backward, from the top: each layer's pre-backward prefetches the one below
        ids_ = [next(nxt) for _ in layers]
        ug.append(("a", ids_[-1], _shard_bytes(layers[-1][0], n) * n))
        for i in range(len(layers) - 1, -1, -1):
            if i:
                ug.append(("a", ids_[i - 1], _shard_bytes(layers[i - 1][0], n) * n))
            lora_gathers(layers[i][1], None)
            ug.append(("f", ids_[i]))
    else:
        ug += [("f", g) for g in reversed(held)]
    ug.append(("f", r))
    rb = 2 if mp else None
    for _, loras in reversed(layers):  # post-backward, the top layer's units first
        for dt, b in reversed(loras):
            eb = _BYTES.get(dt, 2)
            shard = _shard_bytes(b, n, eb) // eb
            o = next(nxt)
            post.append(("a", o, shard * (rb or eb)))
            if rb and rb != eb:
                c = next(nxt)
                post += [("a", c, shard * eb), ("f", o)]
                keep.append(c)
            else:
                keep.append(o)
    post += [("f", x) for x in keep]  # zero_grad
    return {"unshard": ug, "post_backward": post, "pre_unshard": pre}


_POOLS: dict = {}


def fsdp1_pools(spec, s, targets, n: int, full_shard: bool) -> dict:
    """Each FSDP1 side stream's reserved bytes after two steps (`stream_events` through the caching allocator:
    a freed block serves only its own stream).  Cached per process."""
    mp = bool(s.autocast_dtype)
    key = (id(spec), s.adapter_dtype, s.lora_r, tuple(targets), n, full_shard, mp, s.allocator)
    hit = _POOLS.get(key)
    if hit is None or hit[0] is not spec:
        evs = stream_events(spec, s, targets, n, full_shard, mp)
        hit = _POOLS[key] = (spec, {k: stream_reserved(v, expandable=s.allocator == "expandable") for k, v in evs.items()})
    return dict(hit[1])
