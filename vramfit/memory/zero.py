"""One rank's memory under DeepSpeed ZeRO (0.19.8) as accelerate starts it for the Trainer (bf16, the
Trainer's torch AdamW, the ZeRO sizes vramfit.run.launch writes: overlap_comm, contiguous_gradients,
reduce_bucket_size 5e8, stage3_max_live_parameters 1e9, stage3_prefetch_bucket_size 5e7): the allocator
replay of the rank's own step (`zero_replay`, the default answer of `vramfit estimate --gpus N
--strategy zero*`), from the single-GPU events of the bf16 step without what ZeRO replaces (the load,
the gradients and the optimizer step: `rank_replay.dropped_ids`) plus the engine's own allocations, each
on the CUDA stream DeepSpeed makes it on (a freed block serves only its own stream: one allocator per
stream).  `zero_terms`: the same engine as the fitted walk's per-moment terms (vramfit.memory.rank_step,
what the planner searches with).  Pure: no torch.

What DeepSpeed allocates (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py, partition_parameters.py,
partitioned_param_coordinator.py); Pt trainable elements (the optimizer's param groups: the Trainer's
decay and no-decay groups, each flattened and partitioned apart), P all, N ranks, bf16 (2 bytes):
- wrapping, ZeRO-1/2: the module moved to the GPU parameter by parameter; per group (after an
  empty_cache) the group flattened into one bf16 buffer (the parameters become views of it, their own
  tensors freed), the rank's fp32 master partition (a bf16 clone cast to fp32), then
  initialize_optimizer_states' fp32 zeros of each partition, freed at once (a cached block the step's
  fp32 gradient reuses).  ZeRO-3: the whole module moved first, then every parameter partitioned, each
  partition carved from the blocks the whole ones freed (parameters under stage3_param_persistence_threshold
  elements stay whole); the trainable partitions moved off, the cache emptied and one flat buffer filled
  (defragment): the frozen partitions keep module.to's segments; the fp32 master partition,
  initialize_optimizer_states' fp32 gradient buffer (freed), the ipg bucket (reduce_bucket_size elements,
  allocated at wrap and held for good, LoRA too), the bf16 gradient partitions' flat buffer (held for good),
  then every trainable parameter gathered once on the default stream and released (its largest block
  cached there).
- the backward, ZeRO-1/2: at the first gradient hook setup_buckets allocates the ipg bucket twice
  (overlap_comm's double buffer), reduce_bucket_size elements each, whatever the model's size; every
  gradient is copied into it and its own tensor freed; at the first bucket flush (reduce_ipg_grads on the
  reduction stream) the rank's bf16 gradient partition (grads_in_partition, Pt/N) is allocated on that
  stream; the epilogue frees the buckets.  ZeRO-3: each gradient copied into the held bucket.  Both: a
  tied LM head's gradient waits in autograd for the embedding's before its hook (one vocab x hidden
  block from the LM head's backward to the end, and the embedding's own beside it at the end).
- ZeRO-3 LoRA under checkpointing: each layer's recompute gathers the frozen weights not held, held to the
  backward's end: every frozen weight by the bottom layer's backward, beside its activations (`recompute_gathers`).
- ZeRO-3's gathered parameters, on the all-gather stream (`gather_blocks`): in the first step, the trace
  being recorded, each module's own parameters one buffer each, released after the module; once the
  trace is complete the coordinator keeps what it will reuse within stage3_max_reuse_distance and
  prefetches up to stage3_max_live_parameters, each fetch coalesced into one flat buffer (a decoder
  layer's weights): held here as min(P, max_live + prefetch bucket) elements from the forward to the
  step's release (the fake-group runs of 2026-12-07: ~2.1 GB on llama-3.2-1b, N = 4 and 8, full and LoRA;
  not derived element by element), in buffers the first step's per-parameter blocks cannot serve, a
  fetch unflattened at its wait into per-parameter blocks (the 2026-12-07d histories).  The fused loss
  reads lm_head.weight outside the module hooks: in the first step DeepSpeed gathers it synchronously on
  the default stream.  Under the logits loss the head is a module of the trace: from the second step its
  weight, released after the head's backward, is fetched again in one coalesced flat buffer with the next
  layer weights the prefetch bucket takes (`head_refetch`: 585 MiB on llama-3.2-1b, its own segment; the
  2026-12-07d N = 8 history; an untied head's refetch is not measured).
- the step: per group, the bf16 partition flattened and cast to an fp32 gradient (Pt/N x 4), the bf16
  gradients freed; at the first step AdamW's two fp32 states; foreach AdamW's sqrt temporary; the fp32
  gradient freed.
"""

from __future__ import annotations

import math

from vramfit.memory.allocator import CachingAllocator, empty_cache_at

FP32 = 4
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
# overlap_comm, as vramfit.run.launch.deepspeed_config writes it: ZeRO-1/2 then double-buffers its ipg
# bucket (stage_1_and_2.py, setup_buckets: "Use double buffers to avoid data access conflict").
ZERO_OVERLAP_COMM = True


def _ceil_div(a: float, n: int) -> int:
    return math.ceil(a / n)


DEFAULT, REDUCE, ALLGATHER = 0, 1, 2  # CUDA streams


class Streams:
    """One caching allocator per CUDA stream (CUDACachingAllocator keeps a freed block for the stream that
    allocated it); events ("a", id, bytes, stream) / ("f", id) / ("e",).  Peaks over the sum."""

    def __init__(self, expandable: bool = False):
        self.alloc = {s: CachingAllocator(expandable) for s in (DEFAULT, REDUCE, ALLGATHER)}
        self.where, self.live = {}, {}
        self.peak_allocated = self.peak_reserved = 0

    def apply(self, ev) -> None:
        if ev[0] == "a":
            s = ev[3] if len(ev) > 3 else DEFAULT
            self.where[ev[1]] = s
            self.live[ev[1]] = self.alloc[s].malloc(ev[2])
        elif ev[0] == "f":
            self.alloc[self.where.pop(ev[1])].free(self.live.pop(ev[1]))
        else:
            for a in self.alloc.values():
                a.empty_cache()
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    @property
    def allocated(self) -> int:
        return sum(a.allocated for a in self.alloc.values())

    @property
    def reserved(self) -> int:
        return sum(a.reserved for a in self.alloc.values())

    def reset_peaks(self) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved


class _Ids:
    def __init__(self):
        self.n = -(1 << 40)

    def __call__(self) -> int:
        self.n -= 1
        return self.n


def groups(tensors) -> list:
    """The Trainer's param groups (decay, no-decay: biases and norms, the 1-d tensors), in elements."""
    decay = sum(num for num, _, _, shape in tensors if len(shape) > 1)
    return [g for g in (decay, sum(num for num, _, _, shape in tensors if len(shape) <= 1)) if g]


def wrap_events(spec, tensors, stage: int, n: int, pb: int, full: bool, ids, bucket: int,
                persistence: int) -> list:
    """What deepspeed.initialize leaves on the GPU (see the module's docstring), as events."""
    out = []
    frozen = [] if full else [(math.prod(sh), tuple(sh)) for sh, count, _ in spec.param_shapes for _ in range(count)]
    train = [(num, tuple(shape)) for num, _, _, shape in tensors]
    gs = groups(tensors)
    if stage == 3 and not full:
        frozen = [(num, ()) for num in module_order(spec)] or frozen
    if stage < 3:
        for num, _ in frozen:
            out.append(("a", ids(), num * pb))
        per_group = {0: [], 1: []}
        for num, shape in train:
            i = ids()
            out.append(("a", i, num * pb))
            per_group[0 if len(shape) > 1 else 1].append(i)
        keys = [k for k in (0, 1) if per_group[k]]
        for g, k in zip(gs, keys):
            out.append(("e",))
            out.append(("a", ids(), g * pb))  # the flat bf16 group
            out += [("f", i) for i in per_group[k]]
            clone = ids()
            out += [("a", clone, math.ceil(g / n) * pb), ("a", ids(), math.ceil(g / n) * 4), ("f", clone)]
        zeros = [ids() for _ in gs]
        out += [("a", z, math.ceil(g / n) * 4) for z, g in zip(zeros, gs)] + [("f", z) for z in zeros]
        return out
    # the engine moves the whole module to the GPU (engine.py, _configure_distributed_model: module.to),
    # then partitions parameter by parameter: each partition carved from the blocks the whole parameters
    # before it freed (parameters under stage3_param_persistence_threshold stay whole)
    wholes = [(ids(), num, (num, shape) in train) for num, shape in frozen + train]
    out += [("a", w, num * pb) for w, num, _ in wholes]
    parts = []
    for w, num, trains in wholes:
        if num < persistence:  # kept whole on every rank
            continue
        p = ids()
        out += [("a", p, math.ceil(num / n) * pb), ("f", w)]
        if trains:
            parts.append(p)
    # _create_fp16_partitions_with_defragmentation (runtime/zero/utils.py, defragment): the trainable
    # partitions moved off the GPU, the cache emptied, one flat buffer allocated and filled; the frozen
    # partitions stay where they were carved, keeping their segments (the h100-2026-12-07d ZeRO-3 LoRA
    # history: 984 MiB in 23 segments of module.to with 543 MiB of partitions in them after wrapping)
    part = sum(math.ceil(g / n) for g in gs)
    out += [("f", p) for p in parts] + [("e",)]
    out.append(("a", ids(), part * pb))
    out += [("a", ids(), math.ceil(g / n) * 4) for g in gs]  # fp32 master partitions
    buf = ids()
    out += [("a", buf, max(math.ceil(g / n) for g in gs) * 4), ("f", buf)]  # initialize_optimizer_states
    out.append(("a", ids(), bucket * pb))  # the ipg bucket, held
    out.append(("a", ids(), part * pb))  # grad_partitions_flat_buffer, held
    # then every trainable parameter is gathered once, one by one, on the default stream and released at
    # once (partition_parameters.py `_all_gather` -> `_allgather_params_sequential`): the largest one's block
    # stays cached there (the h100-2026-12-07d ZeRO-3 full histories: a 502 MiB default-stream segment,
    # unused, after wrapping llama-3.2-1b; LoRA's: only its adapters' 0.1 MiB blocks)
    for num, _ in sorted(train, reverse=True):
        if num >= persistence:
            g = ids()
            out += [("a", g, num * pb), ("f", g)]
    return out


def module_order(spec) -> list:
    """Elements of the model's weights in module order (the embedding, each decoder layer's Linears as
    `spec.linears` lists them, an untied LM head last; the norms, under the persistence threshold, left
    out), or [] where those do not add up to the model's parameters."""
    roles = spec.params_by_role
    lins = [lin for lin in spec.linears if not lin.name.endswith("lm_head")]
    head = roles.get("lm_head", 0) if not spec.tied_embeddings else 0
    out = [roles["embeddings"]] if roles.get("embeddings") else []
    out += [lin.numel for lin in lins] + ([head] if head else [])
    small = roles.get("norms", 0)
    return out if abs(sum(out) + small - spec.params_total) <= 0.01 * spec.params_total else []


def step_events(gs: list, n: int, pb: int, first: bool, ids, free_before: list) -> list:
    """The optimizer step of ZeRO's optimizer, per group: the bf16 partition flattened, cast to fp32, the
    bf16 gradients freed (`free_before`), AdamW's states (first step), its sqrt temporary, fp32 freed."""
    out = []
    for k, g in enumerate(gs):
        part = math.ceil(g / n)
        flat, fp32 = ids(), ids()
        out += [("a", flat, part * pb), ("a", fp32, part * 4), ("f", flat)]
        if k == 0:
            out += [("f", i) for i in free_before]
        if first:
            out += [("a", ids(), part * 4), ("a", ids(), part * 4)]
        tmp = ids()
        out += [("a", tmp, part * 4), ("f", tmp), ("f", fp32)]
    return out


def zero_replay(spec, act, tensors, st, n: int, events: list, marks: dict, dropped: set,
                grads_by_step: dict) -> dict:
    """Peaks of the rank's steps: the single-GPU events without `dropped` ids (the load, the gradients and
    the optimizer step), the engine's allocations inserted (see the module's docstring).
    `grads_by_step`: step -> [(event index, bytes)] of its gradients in birth order."""
    from vramfit.memory.rank_step import backward_workspaces

    ids = _Ids()
    workspaces = backward_workspaces(events, grads_by_step)
    pb = 2 if act.compute_dtype != "float32" else 4
    full = act.method == "full"
    stage = st.zero_stage
    bucket = ZERO_REDUCE_BUCKET
    gs = groups(tensors)
    pt = sum(gs)
    e_at = empty_cache_at(events, marks)
    at: dict = {}

    def put(i, evs):
        at.setdefault(i, []).extend(evs)

    put(e_at + 1, wrap_events(spec, tensors, stage, n, pb, full, ids, bucket, ZERO3_PERSISTENCE_THRESHOLD))
    tied = full and bool(spec.tied_embeddings)
    vh = spec.vocab_size * spec.hidden_size * pb
    live_elems = min(spec.params_total + (0 if full else pt), ZERO3_MAX_LIVE_PARAMETERS + ZERO3_PREFETCH_BUCKET)
    if tied:  # the tied weight's hook fires last, once autograd has added the embedding's gradient to it
        vocab_blocks = {spec.vocab_size * spec.hidden_size * b for b in (2, 4)}
        grads_by_step = {j: [g for g in gr if g[1] not in vocab_blocks] + [g for g in gr if g[1] in vocab_blocks]
                         for j, gr in grads_by_step.items()}
    # the flushes' sizes are the same every step (DeepSpeed's hooks run in one order): the first step's
    first = next((gr for gr in grads_by_step.values() if gr), [])
    sizes = [(lo, hi) for _, lo, hi in bucket_flushes(first, pt, bucket, 0)]
    k = 0
    while f"step{k}.clip" in marks:
        f0, b1 = marks[f"step{k}.forward"], marks[f"step{k}.clip"]
        grads = grads_by_step.get(k, [])
        g0 = min(i for i, _ in grads) if grads else b1
        free_at_end = []
        if stage == 3 and k == 0 and act.loss == "fused" and grads:
            # trl's fused loss reads lm_head.weight itself, outside the module's hooks: in the first step (the
            # trace not yet recorded) DeepSpeed's parameter access gathers it synchronously on the default
            # stream (ZeROOrderedDict.__getitem__ -> param.all_gather), released after the loss (the
            # h100-2026-12-07d ZeRO-3 fused histories: a 501 MiB default-stream block in step 1 only)
            head_w = spec.vocab_size * spec.hidden_size
            if head_w >= ZERO3_PERSISTENCE_THRESHOLD and marks.get(f"step{k}.backward") is not None:
                x = ids()
                put(marks[f"step{k}.backward"], [("a", x, head_w * pb), ("f", x)])
        if stage == 3:
            first, coalesced, rests = gather_blocks(spec, tensors, full, live_elems, ZERO3_PERSISTENCE_THRESHOLD)
            held, rest = (first, rests[0]) if k == 0 else (coalesced, rests[1])
            blocks = [ids() for _ in held]
            put(f0, [("a", b, int(e * pb), ALLGATHER) for b, e in zip(blocks, held)])
            unflat = layer_weights(spec, ZERO3_PERSISTENCE_THRESHOLD) if k > 0 and len(held) > 2 else []
            if unflat and abs(sum(unflat) - held[1]) <= 0.01 * held[1]:
                # a coalesced fetch is unflattened at its wait (AllGatherCoalescedHandle.wait): each parameter
                # copied into a buffer of its own on the all-gather stream, then the flat one freed -- one
                # decoder layer's per-parameter blocks beside the flat ones (the h100-2026-12-07d ZeRO-3
                # histories: 96-116 MiB of new 20 and 32 MiB segments in the second step, none for LoRA, whose
                # first step had gathered every weight one by one already)
                own = [ids() for _ in unflat]
                put(f0, [("a", b, int(e * pb), ALLGATHER) for b, e in zip(own, unflat)] + [("f", blocks[1])])
                blocks = blocks[:1] + blocks[2:] + own
            free_at_end += blocks
            head_fetch = head_refetch(spec, act, k, ZERO3_PERSISTENCE_THRESHOLD)
            if head_fetch and grads and blocks:
                # the logits loss calls the LM head as a module: from the second step its weight is released
                # after the head's backward (the backward's first gradient) and fetched again within one
                # coalesced prefetch (`head_refetch`): one flat buffer held to the backward's end, unflattened
                # there into the head's own block
                flat, own = ids(), ids()
                put(g0 + 1, [("f", blocks[0]), ("a", flat, head_fetch * pb, ALLGATHER)])
                put(max(i for i, _ in grads), [("a", own, int(spec.vocab_size * spec.hidden_size * pb), ALLGATHER),
                                               ("f", flat)])
                free_at_end = [b for b in free_at_end if b != blocks[0]] + [own]
            if not full and act.grad_ckpt and grads and rest:
                # a checkpointed layer's recompute gathers the frozen weights not held, each in its own buffer,
                # held to the backward's end (`recompute_gathers`)
                layer_grads = [g for g in grads if g[0] not in workspaces]
                for i, elems in recompute_gathers(spec, rest, layer_grads, ZERO3_PERSISTENCE_THRESHOLD):
                    more = [ids() for _ in elems]
                    put(i, [("a", b, int(e * pb), ALLGATHER) for b, e in zip(more, elems)])
                    free_at_end += more
        else:
            ipg = [ids(), ids()]
            put(g0, [("a", i, bucket * pb) for i in ipg])
            free_at_end += ipg
        if tied and grads:
            head, emb = ids(), ids()
            put(g0, [("a", head, vh)])
            put(max(i for i, _ in grads), [("a", emb, vh)])
            free_at_end += [head, emb]
        part_grads = []
        flushes = [(_index_at(grads, hi / pt, b1) if hi < pt else b1, lo, hi) for lo, hi in sizes]
        for j, (i, lo, hi) in enumerate(flushes):  # the reductions, on the reduction stream
            evs = []
            for size in reduce_buffers(lo, hi, pt, n, stage):
                x = ids()
                evs += [("a", x, size * pb, REDUCE), ("f", x)]
            if stage < 3 and j == 0:  # grads_in_partition: at the first flush, after the reduction
                gp = ids()
                evs.append(("a", gp, math.ceil(pt / n) * pb, REDUCE))
                part_grads.append(gp)
            put(i, evs)
        put(b1, [("f", i) for i in free_at_end] + step_events(gs, n, pb, k == 0, ids, part_grads))
        k += 1
    s = Streams(act.allocator == "expandable")
    starts = {marks[f"step{j}.forward"]: j for j in range(1, k + 1) if f"step{j}.forward" in marks}
    steps = []
    for i, ev in enumerate(events):
        if i in starts:  # each step's peaks, as the runner records them (the peaks are not reset)
            steps.append((s.peak_allocated, s.peak_reserved))
        for x in at.get(i, ()):
            s.apply(x)
        if i == e_at + 1:
            s.reset_peaks()
            wrapped = (s.allocated, s.reserved)
        if i <= e_at or (ev[0] in ("a", "f") and ev[1] in dropped):
            continue
        s.apply(ev)
    steps.append((s.peak_allocated, s.peak_reserved))
    return {"peak_allocated": s.peak_allocated, "peak_reserved": s.peak_reserved, "steps": steps, "wrapped": wrapped,
            "pools": {name: s.alloc[x].peak_reserved for name, x in (("reduce", REDUCE), ("allgather", ALLGATHER))}}


def gather_blocks(spec, tensors, full: bool, live_elems: int, persistence: int) -> tuple:
    """ZeRO-3's gathered parameters on its all-gather stream, in elements: (the first step's blocks, a later
    step's, (the first step's, a later step's) per-parameter blocks that a checkpointed LoRA's recompute adds
    by the end of the backward: every weight not held already).
    The first step records the module trace (partitioned_param_coordinator: the trace is incomplete), so each
    module fetches only its own parameters as it runs, one buffer per parameter (partition_parameters.py,
    `_all_gather_sequential`), released after the module: at most the largest parameter (the embedding, a
    module of its own, or a tied LM head) beside one decoder-layer weight.  From the second step the trace
    is complete and the coordinator prefetches up to stage3_max_live_parameters, each fetch coalesced into
    one flat buffer per dtype (`_all_gather_dtype`): a decoder layer's weights in one buffer, the largest
    parameter alone -- buffers of sizes the first step's per-parameter blocks cannot serve, so the stream's
    pool holds both (the h100-2026-12-07d ZeRO-3 histories, llama-3.2-1b: 536 MiB of per-parameter segments
    after the first step, then twelve 116 MiB and one 52 MiB flat segments, a decoder layer each; ZeRO-3 LoRA
    with checkpointing: every weight gathered one by one by the end of the first step, 2360 MiB in 66
    segments, then the same flat ones: 3804 MiB on that stream).  A later step holds `live_elems` in all."""
    frozen = [] if full else [math.prod(sh) for sh, count, _ in spec.param_shapes for _ in range(count)]
    params = sorted((e for e in frozen + [num for num, _, _, _ in tensors] if e >= persistence), reverse=True)
    if not params:
        return [], [], ([], [])
    big = params[0]
    first = [big] + params[1:2]
    roles = spec.params_by_role
    per_layer = max(1, (spec.params_total - roles.get("embeddings", 0) - roles.get("lm_head", 0))
                    // max(spec.num_layers, 1))
    left = max(0, live_elems - big)
    coalesced = [big] + [per_layer] * int(left // per_layer) + ([left % per_layer] if left % per_layer else [])
    beyond = max(0, sum(params) - live_elems)  # what the recompute gathers beyond the held ones
    rest, acc = [], 0
    for e in params[1:]:
        if acc >= beyond:
            break
        rest.append(min(e, beyond - acc))
        acc += rest[-1]
    if full:  # no frozen weight for a recompute to gather
        return first, coalesced, ([], [])
    return first, coalesced, (params[len(first):], rest)


def head_refetch(spec, act, k: int, persistence: int) -> int:
    """Elements of the coalesced fetch that gathers the LM head's weight again in the backward of a step after
    the first under the logits loss (0 otherwise): the head's weight with the weights of one decoder layer in
    module order that stay under stage3_prefetch_bucket_size (partitioned_param_coordinator.fetch_sub_module's
    prefetch loop pops parameters while the bucket is not full, the one that fills it included, and gathers
    them as one flat buffer per dtype, `_all_gather_dtype`).  The h100-2026-12-07d ZeRO-3 full N = 8 logits
    history: a 585 MiB flat buffer (the tied 501 MiB weight + 84 MiB: q, k, v, o, gate, up of one layer, 44 M
    elements < 5e7) at the start of the backward of steps 2 and 3, its own segment (no cached block of the
    stream's pool is that large), freed at the backward's end after the weight's 501 MiB unflattened copy;
    the fused-loss histories have none (the fused loss reads the weight outside the module's hooks).  That the
    head's entry follows a layer's first weights in the prefetch queue is read off that history, not derived."""
    if k == 0 or getattr(act, "loss", "logits") != "logits":
        return 0
    head = spec.vocab_size * spec.hidden_size
    if head < persistence:
        return 0
    acc = 0
    for e in layer_weights(spec, persistence):
        if acc + e >= ZERO3_PREFETCH_BUCKET:
            break
        acc += e
    return head + acc


def recompute_gathers(spec, rest: list, grads: list, persistence: int) -> list:
    """[(event index, [elements])]: where a checkpointed LoRA's recompute gathers the frozen weights not held
    (`rest`), a block each.  trl forces reentrant checkpointing for PEFT under ZeRO-3 (sft_trainer.py, 1.16.0):
    a layer's recompute is a forward in the backward's graph task, and `_fetch_sub_module_impl`
    (partitioned_param_coordinator.py, 0.19.8) gathers what is not available and, `in_checkpoint_recompute`,
    gives the frozen weights to the running backward module (update_recompute_parameters), released with it:
    the outermost, at the end.  So the set grows as the backward goes down, beside each layer's activations (the
    07d LoRA history, step 2: 1,913 MiB to layer 4, +116 MiB at each bottom layer's recompute, 2,357 at layer
    0's MLP backward, the peak).  `rest` laid over the layers from the bottom up, module order; layer j's after
    layer j + 1's last gradient (`grads`: backward order), the top's at its first; uneven: all at the end."""
    if not grads:
        return []
    layer = layer_weights(spec, persistence)
    L = max(spec.num_layers, 1)
    total = sum(rest)
    if not layer or len(grads) % L:
        return [(max(i for i, _ in grads), list(rest))]
    per, out, acc = len(grads) // L, [], 0
    for k in range(L - 1, -1, -1):  # the layer k-th in the backward, from the bottom one up
        elems = []
        while acc < total and len(elems) < len(layer):
            elems.append(min(layer[len(elems)], total - acc))
            acc += elems[-1]
        if elems:
            out.append((grads[k * per - 1][0] + 1 if k > 0 else grads[0][0], elems))
    return out


def layer_weights(spec, persistence: int) -> list:
    """Elements of one decoder layer's gathered weights in module order (those at or over the persistence
    threshold), [] where the model's Linears do not tell them."""
    lins = [lin.numel for lin in spec.linears if not lin.name.endswith("lm_head")]
    L = max(spec.num_layers, 1)
    if not lins or len(lins) % L:
        return []
    return [e for e in lins[:len(lins) // L] if e >= persistence]


def bucket_flushes(grads: list, pt: int, bucket: int, end: int) -> list:
    """[(event index, lo, hi)]: the ipg bucket's reductions, elements [lo, hi) of the trainable ones counted
    from the end of the flat groups (the backward's order): a flush when the next gradient would overflow
    the bucket (reduce_independent_p_g_buckets_and_remove_grads), the rest at the backward's epilogue.
    The gradients' sizes are the single-GPU ones, scaled to `pt` elements."""
    total = sum(b for _, b in grads) or 1
    out, lo, cur = [], 0, 0
    for i, b in grads:
        e = b / total * pt
        if cur - lo + e > bucket and cur > lo:
            out.append((i, lo, int(cur)))
            lo = int(cur)
        cur += e
    if pt > lo:
        out.append((end, lo, pt))
    return out


# --------------------------------------------------------------------------- the fitted walk's terms


def zero_terms(spec, s, st, n, c, tensors, G_out, nccl):
    """DeepSpeed ZeRO (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py, 0.19.8) as accelerate starts
    it with bf16 enabled: the engine casts the module to bf16 (adapters too), keeps an fp32 master copy
    of its partition of the trainable parameters inside the optimizer, and AdamW's two fp32 states
    of that partition.  Per GPU (Pt trainable elements, P all elements, pb the compute dtype):
    - stage 1: bf16 params and bf16 gradients in full; master 4 Pt/N + states 8 Pt/N; at the step
      the fp32 gradient partition 4 Pt/N.
    - stage 2: gradients reduced in buckets into this rank's partition (contiguous_gradients: a bf16
      partition buffer pb Pt/N).
    - stages 1 and 2, during the backward: the ipg buckets, `setup_buckets` allocates
      reduce_bucket_size elements of the reduction dtype, twice with overlap_comm ("double buffers"),
      whatever the model's size, and `_release_ipg_buffers` frees them after the backward's epilogue.
    - stage 3: also the parameters partitioned (pb P/N; tensors under the persistence threshold
      kept whole) and gathered on use: at most stage3_max_live_parameters; and, when the model is
      smaller than stage3_max_reuse_distance, DeepSpeed keeps gathered what it will reuse within
      that distance, so a small model stays gathered from forward to backward.
    - offload_optimizer (cpu): master, states and the fp32 gradient partition live in pinned host
      memory (16 Pt/N per rank); the GPU keeps the ipg buckets.  offload_param (cpu, stage 3): the
      bf16 partitions live in pinned host memory too (pb P/N per rank).
    Measured through the fake group (benchmarks/results/h100-2026-12-07c-fake-pg-zero.jsonl); the replay
    of the rank's own events (vramfit.memory.zero) is the default answer.
    """
    from vramfit.memory.rank_step import MOMENTS, SIDE_STREAMS_DEVICE_BYTES, RankTerms, single_gpu_grads
    from vramfit.memory.walk import _quant_totals

    pb = 2 if s.compute_dtype != "float32" else FP32
    pt = sum(num for num, _, _, _ in tensors)  # trainable elements
    P = spec.params_total
    layers = max(spec.num_layers, 1)
    # the model in the engine's dtype: bf16 weights (QLoRA: 4-bit packed + bf16 unquantized)
    if s.method == "qlora":
        q_numel, q_bytes, _ = _quant_totals(spec, c, s.double_quant)
        base = q_bytes + (P - q_numel) * pb
        constants = q_bytes - (q_numel + 1) // 2  # the absmax constants beside the packed 4-bit weights
    else:
        base, constants = P * pb, 0
    adapters = pt * pb if s.method != "full" else 0
    w, host = {}, {}
    if st.zero_stage < 3:
        w["weights_" + ("bfloat16" if pb == 2 else "float32")] = base - constants
        if constants:
            w["weights_4bit_quant_constants"] = constants
        if adapters:
            w["lora_adapters"] = adapters
    else:
        persistent = persistent_numel(spec)
        part = _ceil_div(base - constants - persistent * pb, n) + persistent * pb + _ceil_div(adapters, n)
        if st.offload_params:
            host["params_partition"] = part - persistent * pb
            part = persistent * pb
        w["weights_partitioned"] = part
        if constants:
            w["weights_4bit_quant_constants"] = constants
    # the ipg bucket: stages 1/2 allocate it twice (overlap_comm) at the backward's first gradient hook and free
    # it at its epilogue; stage 3 allocates it once at wrap and holds it, beside the bf16 gradient partitions'
    # flat buffer (stage3.py, _setup_for_real_optimizer) -- whatever the trainable size, LoRA too
    ipg = (2 if ZERO_OVERLAP_COMM else 1) * ZERO_REDUCE_BUCKET * pb if st.zero_stage < 3 else ZERO_REDUCE_BUCKET * pb
    g_part = _ceil_div(pt * pb, n)
    fp32_part = _ceil_div(pt * FP32, n)
    master_states = _ceil_div(pt * (FP32 + 8), n)  # fp32 master + AdamW exp_avg and exp_avg_sq
    # a tied LM head's gradient waits in autograd for the embedding's before its hook copies it away
    tied = spec.vocab_size * spec.hidden_size * pb if (s.method == "full" and spec.tied_embeddings) else 0
    if st.zero_stage == 1:
        grads, grads_out, grads_step = pt * pb, G_out if s.method == "full" else 0, pt * pb + fp32_part
    else:  # the step: the bf16 partition flattened beside its fp32 cast, then the fp32 gradient
        grads, grads_out, grads_step = g_part + tied, tied, fp32_part
    optimizer, opt_temp = master_states, _ceil_div(pt * FP32, n) if s.optimizer.foreach_temp else 0
    if st.offload_optimizer:
        host["optimizer_master_and_states"] = master_states
        host["fp32_gradient_partition"] = fp32_part
        optimizer, opt_temp, grads_step = 0, 0, 0
    # stages 1/2: the buckets from the first hook (after the LM head's backward) to the epilogue
    held = {k: {"zero_ipg_buckets": ipg} for k in ("backward_top", "backward_bottom", "backward_end")}
    if st.zero_stage == 3:
        held = {k: {"zero_ipg_bucket": ipg, "zero3_gradient_partitions": g_part} for k in MOMENTS}
        grads = tied  # the partitions are held above; the step's fp32 partition as for stage 2 (or on the host)
        # gathered parameters once the first step traced the module order: the coordinator keeps what it
        # reuses within stage3_max_reuse_distance and prefetches up to stage3_max_live_parameters; held as
        # min(all, max_live + prefetch bucket) elements (vramfit.memory.zero; fitted to the fake-group runs)
        total = P + (pt if s.method != "full" else 0)
        live = min(total, ZERO3_MAX_LIVE_PARAMETERS + ZERO3_PREFETCH_BUCKET)
        gathered = int(live * (base - constants + adapters) / total)
        for k in MOMENTS[:-1]:
            held[k]["zero3_gathered_params"] = gathered
    # other streams' pools: stage 3 gathers on its all-gather stream and interleaves each bucket's gradients
    # for the reduce-scatter on its reduction stream; stages 1/2 flatten a partition's slices for the reduce
    # and keep the gradient partition there (vramfit.memory.zero)
    bucket_rs = min(ZERO_REDUCE_BUCKET, pt) * pb if st.zero_stage == 3 else min(ZERO_REDUCE_BUCKET, _ceil_div(pt, n)) * pb
    pools = {"zero_reduction_stream": (bucket_rs + (0 if st.zero_stage == 3 else g_part),
                                       {} if st.zero_stage == 3 else {"backward_bottom": g_part, "backward_end": g_part})}
    if st.zero_stage == 3:
        # under the logits loss, the LM head's weight fetched again in the backward within one coalesced flat
        # buffer of a size the pool's other blocks cannot serve: its own segment (`head_refetch`)
        refetch = head_refetch(spec, s, 1, ZERO3_PERSISTENCE_THRESHOLD) * pb
        pools["zero3_allgather_stream"] = (gathered + refetch, {k: gathered for k in MOMENTS[:-1]})
    return RankTerms(weights=tuple(w.items()), optimizer=optimizer, optimizer_temp=opt_temp,
                     grads=single_gpu_grads(grads, min(grads_out, grads), grads_step, layers),
                     held=held, pools=pools, device_extra=nccl if n > 1 else 0, no_weight_copies=True,
                     device_streams=SIDE_STREAMS_DEVICE_BYTES,
                     host_bytes=sum(host.values()), host_named=tuple(host.items()))


def persistent_numel(spec) -> int:
    """Elements of parameters below stage3_param_persistence_threshold: kept whole on every rank."""
    return sum(count * math.prod(shape) for shape, count, _ in spec.param_shapes
               if math.prod(shape) < ZERO3_PERSISTENCE_THRESHOLD)


def _index_at(grads: list, frac: float, end: int) -> int:
    """The event index where the gradients born so far reach `frac` of all of them."""
    total = sum(b for _, b in grads) or 1
    c, last = 0, 0
    for i, b in grads:
        c, last = c + b, max(last, i)
        if c / total >= frac - 1e-9:
            return last
    return end


def reduce_buffers(lo: int, hi: int, pt: int, n: int, stage: int) -> list:
    """Elements of the temporaries one flush allocates on the reduction stream.  ZeRO-3: the bucket's
    gradients interleaved into one flat tensor (comm/coalesced_collectives.py, reduce_scatter_coalesced's
    torch.cat).  ZeRO-1/2: per rank whose partition the bucket meets, its slices flattened for the reduce
    (allreduce_no_retain -> allreduce_bucket's flatten), one after the other."""
    if stage == 3:
        return [hi - lo]
    part = math.ceil(pt / n)
    a, b = pt - hi, pt - lo  # the bucket's range in the flat group's order
    return [min(b, (r + 1) * part) - max(a, r * part) for r in range(n) if min(b, (r + 1) * part) > max(a, r * part)]
