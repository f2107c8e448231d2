"""FSDP2 full fine-tuning: the rank's default CUDA stream replayed whole.  Needs no torch (the events are given).

Under full fine-tuning every parameter trains, so besides the activations the default stream holds, per unit
of `vramfit.memory.fsdp.units` (torch 2.11, torch/distributed/fsdp/_fully_shard/):
- the gathered parameters (the all-gather copy-out, `alloc_all_gather_outputs`: one tensor per parameter, its
  whole size in the gather dtype) from the unit's pre-forward to its post-forward (reshard_after_forward) and
  again from its pre-backward to its post-backward; the tied tail (reshard_after_forward=False) from the forward
  to its post-backward at the end;
- the unsharded gradients autograd makes in the unit's backward (the single-GPU events' own gradient tensors,
  the same sizes), freed at the unit's post-backward once copied into
- the reduce-scatter input (`foreach_reduce`: one flat tensor of the unit's dim-0 padded unsharded size in the
  reduce dtype, allocated on the default stream) held until the next unit's post-backward drops it
  (`comm_ctx.reduce_scatter_state`);
- the optimizer's states on the shards (made at the first step) and its step's temporaries.
The sharded gradients (reduce-scatter outputs) and the all-gather outputs are other streams' blocks
(`vramfit.memory.fsdp.stream_pools`).  A unit's post-backward runs right after its last parameter gradient
(its hook sits on the unit's inputs); the next unit's pre-backward right after it; the tied tail's and the
untied embedding's post-backward in the root's final callback, at the end of the backward.

`default_stream_replay` replays all of it through the caching allocator, so the default stream's reserve is
the one its own blocks make (the rank's gap replay without gradients or gathered parameters left it to a
fitted mix: `rank_replay.anchored_rank`).
"""

from __future__ import annotations

import math

from vramfit.memory.allocator import CachingAllocator, empty_cache_at


def step_gradients(events: list, marks: dict, step: int) -> list | None:
    """The step's parameter gradients in the events: [(birth index, id, free index or None)], born in its
    backward and alive at its post_step (freed by the next zero_grad), in birth order."""
    try:
        b0, b1, post = marks[f"step{step}.backward"], marks[f"step{step}.clip"], marks[f"step{step}.post_step"]
    except KeyError:
        return None
    end = marks.get(f"step{step + 1}.forward", marks.get("end", len(events)))
    born, freed = {}, {}
    for i in range(b0, len(events)):
        ev = events[i]
        if ev[0] == "a" and i < b1:
            born[ev[1]] = i
        elif ev[0] == "f" and ev[1] in born:
            if i < post:
                born.pop(ev[1])
            elif ev[1] not in freed:
                freed[ev[1]] = i
        if i >= end and len(freed) == len(born):
            break
    return sorted((i, k, freed.get(k)) for k, i in born.items())


def unit_gradients(grads: list, spec, tied: bool, n_tensors: int) -> list | None:
    """The gradients grouped by FSDP unit in the order their post-backward runs:
    [(unit name, [gradient entries], post-backward 'after' index or None for the final callback)].
    Full fine-tuning: the LM head's (or the tied embedding's) and the final norm's first, the decoder layers'
    from the top, an untied embedding's last.  None where the gradients do not split so."""
    L = max(spec.num_layers, 1)
    head, tail = 2, 0 if tied else 1
    per_layer, rest = divmod(len(grads) - head - tail, L)
    if rest or per_layer <= 0 or len(grads) != n_tensors:
        return None
    out = [("tail", grads[:head], None if tied else grads[head - 1][0])]
    for k in range(L):
        g = grads[head + k * per_layer: head + (k + 1) * per_layer]
        out.append(("layer", g, g[-1][0]))
    if not tied:
        out.append(("embedding", grads[-1:], None))
    return out


def _padded(shapes, n: int) -> int:
    return sum(math.ceil(sh[0] / n) * n * (math.prod(sh[1:]) if len(sh) > 1 else 1) for sh in shapes)


def default_stream_events(spec, st, n: int, events: list, marks: dict, ids, gather_bytes: int, reduce_bytes: int,
                          logits_bytes: int) -> tuple | None:
    """What FSDP2 full fine-tuning adds to (and takes from) the single-GPU events on the rank's default stream:
    -> ({event index: [events placed before it]}, {indices of the gradients' zero_grad frees}, gradient ids), or
    None where the events' gradients do not split into the units.  `logits_bytes`: the size of the forward's
    logits, where the untied tail is gathered (its LM head's forward; under trl's fused loss, which makes no whole
    logits, its largest chunk): full fine-tuning gathers the untied tail through its FSDP hooks under the fused loss
    too -- the LM head trains; LoRA's frozen head is gathered as a DTensor instead (`fsdp.copy_out_events`).
    """
    from vramfit.memory.fsdp import unit_param_shapes

    shapes = unit_param_shapes(spec)
    tied = bool(spec.tied_embeddings) or not spec.params_by_role.get("lm_head")
    full_shard = st.reshard_after_forward
    n_tensors = sum(count for _, count, _ in spec.param_shapes)
    at, drop_frees, grad_ids = {}, set(), set()

    def put(i, evs):
        at.setdefault(i, []).extend(evs)

    def gather(name, i, where=None):
        h = [ids() for _ in shapes[name]]
        evs = [("a", k, math.prod(sh) * gather_bytes) for k, sh in zip(h, shapes[name])]
        if where is None:
            put(i, evs)
        else:
            where.setdefault(i, []).extend(evs)
        return h

    def release(h, i):
        put(i, [("f", k) for k in h])

    step = 0
    while f"step{step}.forward" in marks and f"step{step}.post_step" in marks:
        f0, b0, clip = marks[f"step{step}.forward"], marks[f"step{step}.backward"], marks[f"step{step}.clip"]
        grads = step_gradients(events, marks, step) or []
        if len(grads) > n_tensors:  # a buffer the first backward makes and keeps (no gradient: never freed)
            grads = [g for g in grads if g[2] is not None]
        groups = unit_gradients(grads, spec, tied, n_tensors)
        if groups is None:
            return None
        for _, k, fr in grads:
            grad_ids.add(k)
            if fr is not None:
                drop_frees.add(fr)
        # ---- forward: the first unit (the tied tail, held to its post-backward; the untied embedding, resharded
        # after its forward under FULL_SHARD), the running layer (each takes the blocks of the one before it), the
        # untied tail at the LM head's forward
        tail_h = emb_h = None
        if tied:
            tail_h = gather("tail", f0)
        elif shapes["embedding"]:
            emb_h = gather("embedding", f0)
            if full_shard:
                release(emb_h, f0 + 1)
        # the LM head's forward: its logits (or, under the fused loss, its largest chunk)
        fwd = [i for i in range(f0, b0) if events[i][0] == "a"]
        head_at = next((i for i in fwd if events[i][2] >= logits_bytes),
                       max(fwd, key=lambda i: events[i][2]) if fwd else b0)
        if full_shard:
            release(gather("layer", f0), b0)
        else:  # SHARD_GRAD_OP: each layer gathered at its pre-forward, held to its backward -- the events do not
            # mark the layers: the forward's allocations before the head split evenly (identical layers)
            L = max(spec.num_layers, 1)
            body = [i for i in fwd if i < head_at]
            per = len(body) // L
            layer_hs = [gather("layer", body[k * per] if per else f0) for k in range(L)]
        if not tied:
            tail_h = gather("tail", head_at)
        # ---- backward: at each unit's post-backward its gathered parameters freed (reshard), the previous
        # unit's reduce-scatter input dropped, its own allocated and its gradients freed into it; the next
        # unit's pre-backward (its copy-out) right after the unit's last gradient
        posts, pre = [], {}  # pre-backward copy-outs: placed after the post-backward's reduce-scatter
        for idx, (name, g, after) in enumerate(groups):
            p = clip if after is None else after + 1
            done = g[-1][0] + 1
            if name == "layer":
                release(held if full_shard else layer_hs.pop(), p)
            elif name == "tail" and tail_h is not None:
                release(tail_h, p)
            elif name == "embedding" and emb_h is not None and not full_shard:
                release(emb_h, p)
            posts.append((p, idx, name, g))
            nxt = groups[idx + 1][0] if idx + 1 < len(groups) else None
            if full_shard and nxt == "layer":
                held = gather("layer", done, pre)
            elif full_shard and nxt == "embedding":
                release(gather("embedding", done, pre), clip)
        rs_prev = None
        for p, _, name, g in sorted(posts):
            if rs_prev is not None:
                put(p, [("f", rs_prev)])
            rs_prev = ids()
            put(p, [("a", rs_prev, _padded(shapes[name], n) * reduce_bytes)] + [("f", k) for _, k, _ in g])
        if rs_prev is not None:
            put(clip, [("f", rs_prev)])
        for i, evs in pre.items():
            put(i, evs)
        step += 1
    return at, drop_frees, grad_ids


def replay(events: list, marks: dict, wrap: list, at: dict, drop: set, drop_frees: set = frozenset(),
           expandable: bool = False) -> dict:
    """The caching allocator over `events` without `drop` (ids) and the frees at the indices `drop_frees`, with
    `wrap` placed after the Trainer's empty_cache (the peaks reset there) and `at` {index: events} before the
    event of that index."""
    e_at = empty_cache_at(events, marks)
    a, live = CachingAllocator(expandable), {}
    places = dict(at)
    places.setdefault(e_at + 1, [])
    places[e_at + 1] = list(wrap) + places[e_at + 1]
    for i, ev in enumerate(events):
        for x in places.get(i, ()):
            a.apply(x, live)
        if i == e_at + 1:
            a.reset_peaks()
        if ev[0] in ("a", "f") and (ev[1] in drop or i in drop_frees):
            continue
        a.apply(ev, live)
    for x in places.get(len(events), ()):
        a.apply(x, live)
    return {"peak_allocated": a.peak_allocated, "peak_reserved": a.peak_reserved}


def full_gap_replay(spec, run, st, n: int, events: list, marks: dict, wrap: list, later: dict, drop: set, ids,
                    expandable: bool = False) -> dict | None:
    """The rank's default stream under FSDP2 full fine-tuning (`default_stream_events`) over the single-GPU
    events without `drop` (the load, the single GPU's optimizer step) but with their gradients, after `wrap`;
    `later` {mark: events} (the optimizer's states and temporaries on the shards).  None where the gradients do
    not split into the units (the caller keeps its own replay)."""
    if run.grad_accum > 1:  # several backwards per step (each micro-batch reduce-scattered): not replayed so
        return None
    mp = bool(run.autocast_dtype)
    store = 4 if (run.param_dtype == "float32" or mp) else 2
    gather = 2 if mp else store
    reduce = 2 if mp else store
    logits = run.micro_batch * run.seq_len * spec.vocab_size * 2
    res = default_stream_events(spec, st, n, events, marks, ids, gather, reduce, logits)
    if res is None:
        return None
    at, drop_frees, grad_ids = res
    for mark, evs in later.items():
        if mark in marks:
            at.setdefault(marks[mark], []).extend(evs)
    return replay(events, marks, wrap, at, set(drop) - grad_ids, drop_frees, expandable)


def trainer_groups(spec) -> list | None:
    """Full fine-tuning's parameters as the Trainer's AdamW holds them: [decay group's shapes, no-decay group's
    shapes], each in `named_parameters` order (transformers' get_decay_parameter_names: biases and norms decay
    none) -- the embedding, each layer's linear weights, an untied LM head; then each layer's biases and norms,
    the final norm.  AdamW's step runs group by group (torch/optim/adam.py: `_init_group` makes the group's states,
    exp_avg then exp_avg_sq per parameter, at the first step; `_multi_tensor_adam` its temporaries), so the shards'
    states and temporaries come in this order.  None where the spec's parameters do not add up so."""
    L = max(spec.num_layers, 1)
    per_layer = {}
    for lin in spec.linears:
        k = next((int(x) for x in lin.name.split(".") if x.isdigit()), None)
        if k is not None:
            per_layer.setdefault(k, []).append(lin)
    roles = {role: tuple(shape) for shape, _, role in spec.param_shapes if role in ("embeddings", "lm_head")}
    norms = sum(count for shape, count, role in spec.param_shapes if role == "norms")
    per_norms, final = divmod(norms, L)
    decay, no_decay = [], []
    if "embeddings" in roles:
        decay.append(roles["embeddings"])
    for k in sorted(per_layer):
        for lin in per_layer[k]:
            decay.append((lin.out_features, lin.in_features))
            if lin.bias:
                no_decay.append((lin.out_features,))
        no_decay += [(spec.hidden_size,)] * per_norms
    no_decay += [(spec.hidden_size,)] * final
    if "lm_head" in roles:
        decay.append(roles["lm_head"])
    total = sum(count for _, count, _ in spec.param_shapes)
    if len(decay) + len(no_decay) != total or sorted(math.prod(s) for s in decay + no_decay) != sorted(
            math.prod(shape) for shape, count, _ in spec.param_shapes for _ in range(count)):
        return None
    return [g for g in (decay, no_decay) if g]
