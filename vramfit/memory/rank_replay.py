"""One rank's peaks from the allocator replay of its own step: the default answer of `vramfit estimate
--gpus N`, as the replay is `vramfit estimate`'s (the planner searches with the walk,
vramfit.memory.distributed).

The replay records the rank's step on the meta device (vramfit.memory.events; the activation setup of
vramfit.memory.distributed, except QLoRA through the launcher, traced as itself: `launched_trace_setup`, its
4-bit layers without prepare_model_for_kbit_training and its adapters in the run's dtype).  What the engine
changes:
- DDP: allocations of its own, replayed as such, so allocated and reserved are the replay's -- its
  constructor's broadcast of the module states, bucket by bucket as broadcast_coalesced flattens them
  (`ddp_broadcast_states`), its gradient buckets from wrapping to the end (torch/csrc/distributed/
  c10d/reducer.cpp, initialize_buckets): one flat tensor per dtype at wrapping, rebuilt into the capped
  buckets at the second step's forward (`ddp_bucket_events`).
- DeepSpeed ZeRO: the rank's own events, replayed (vramfit.memory.zero): the single-GPU events without
  the load, the gradients and the optimizer step (`dropped_ids`), DeepSpeed's allocations placed where it
  makes them (wrap, buckets, gradient partitions, gathered parameters, the step), one allocator per
  CUDA stream.
- FSDP2 (and what ZeRO's replay does not cover: QLoRA, offload): their buffers come and go with each
  decoder layer, which the events do not mark; the step is cut where the rank's terms change
  (`step_windows`: the forward, the loss and the head, each decoder layer's backward from its first
  parameter gradient, the end, the optimizer step) and each window's replayed peak gets what the rank
  holds then beyond one GPU (`anchored_rank`: the walk's per-rank moments minus its single-GPU ones,
  vramfit.memory.rank_step), so the activations are the replay's.  Reserved: the largest default-stream
  moment plus the reserve of the rank's own default stream (`_engine_gap_replay`: what wrapping left --
  the shards and the cached blocks of the whole parameters they replaced, kept: the Trainer empties the
  cache before it wraps -- then the activations without the single GPU's gradients and optimizer step,
  whose fragmentation the rank does not have, and, for LoRA, the step's gathered parameters, which take the
  wrap's cached blocks: vramfit.memory.fsdp.copy_out_events; at least the segments that replay makes; full
  fine-tuning: the default stream replayed whole, its reserve that replay's -- vramfit.memory.fsdp_full), plus
  the other CUDA streams' pools (vramfit.memory.fsdp:
  the all-gather and reduce-scatter streams' own allocator replays; FSDP1 QLoRA's unshard, post-backward and
  pre-unshard streams, and its wrap unit by unit: vramfit.memory.fsdp1).  FSDP2 under mixed precision is traced
  with bf16 weights under autocast (`fsdp_trace_setup`): every parameter is gathered in bf16.
Torch-free at import; the replay itself needs torch (the meta device) and is cached per process.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import replace

from vramfit.memory.allocator import CachingAllocator, empty_cache_at
from vramfit.memory.rank_step import broadcast_buckets  # noqa: F401  (here before)

_EVENTS: dict = {}  # (id(spec), setup, targets) -> (spec, events)


def rank_events(spec, act, targets) -> dict:
    """Two Trainer steps' events of the rank's activation setup, from a cached template or the meta device."""
    from vramfit.memory.events import training_events
    from vramfit.memory.replay import template_events

    key = (id(spec), act, tuple(targets))
    hit = _EVENTS.get(key)
    if hit is None or hit[0] is not spec:
        ev = template_events(spec, act, targets)
        if ev is None:
            ev = training_events(spec, act, targets, steps=2, grad_accum=act.grad_accum)
        hit = _EVENTS[key] = (spec, ev)
    return hit[1]


def phase_cuts(marks: dict, step: int = 1) -> list:
    """[(event index, phase)] where each phase of `step` starts (forward, backward, optimizer)."""
    bounds = sorted((at, label) for label, at in marks.items() if label.startswith(f"step{step}."))
    return [(at, {"forward": "forward", "backward": "backward"}.get(label.rsplit(".", 1)[-1], "optimizer"))
            for at, label in bounds]


def phase_peaks(events: list, marks: dict, step: int = 1) -> dict:
    """Allocated bytes' peak of each phase of `step` (forward, backward, optimizer) over the events."""
    end = marks.get(f"step{step + 1}.forward", marks.get("end", len(events)))
    return window_peaks(events, phase_cuts(marks, step), end)


def window_peaks(events: list, cuts: list, end: int) -> dict:
    """Allocated bytes' peak in each window: `cuts` [(event index, window name)] sorted, to `end`."""
    sizes, cur, out, k = {}, 0, {}, -1
    for i, ev in enumerate(events[:end]):
        if ev[0] == "a":
            sizes[ev[1]] = ev[2]
            cur += ev[2]
        elif ev[0] == "f":
            cur -= sizes.pop(ev[1])
        while k + 1 < len(cuts) and cuts[k + 1][0] <= i:
            k += 1
        if k >= 0:
            out[cuts[k][1]] = max(out.get(cuts[k][1], 0), cur)
    return out


def step_windows(events: list, marks: dict, spec, tensors, step: int = 1) -> tuple | None:
    """The second step cut where the rank's terms change: its forward, the backward before the first
    decoder layer's gradient (the loss and the LM head), each decoder layer's backward (from its first
    parameter gradient: the step's gradients are the backward's allocations freed only by zero_grad,
    in the order autograd makes them), the untied embedding's at the end, the optimizer step.
    -> (cuts, end, number of layers' windows), or None where the gradients do not cut it so."""
    try:
        b0, b1 = marks[f"step{step}.backward"], marks[f"step{step}.clip"]
        f0, post = marks[f"step{step}.forward"], marks[f"step{step}.post_step"]
    except KeyError:
        return None
    end = marks.get(f"step{step + 1}.forward", marks.get("end", len(events)))
    born, dies = {}, {}
    for i, ev in enumerate(events[:end]):
        if ev[0] == "a" and b0 <= i < b1:
            born[ev[1]] = i
        elif ev[0] == "f" and ev[1] in born:
            dies[ev[1]] = i
    grads = sorted(i for k, i in born.items() if dies.get(k, end) >= post)
    L = max(spec.num_layers, 1)
    full = any(role in ("embeddings", "lm_head") for _, _, role, _ in tensors)
    head = 2 if full else 0  # the LM head's (or the tied embedding's) and the final norm's
    tail = 1 if (full and not spec.tied_embeddings and spec.params_by_role.get("lm_head")) else 0
    per_layer, rest = divmod(len(tensors) - head - tail, L)
    if rest or per_layer <= 0 or len(grads) != len(tensors):
        return None
    cuts = [(f0, "forward"), (b0, "backward_head")]
    cuts += [(grads[head + k * per_layer], ("layer", k)) for k in range(L)]
    if tail:
        cuts.append((grads[-1], "backward_end"))
    cuts.append((b1, "optimizer"))
    return cuts, end, L


def simulate_rank(events: list, marks: dict, wrap: list, later: dict | None = None, expandable: bool = False) -> dict:
    """The caching allocator over `events` with the engine's `wrap` events (("a", id, bytes), ("f", id))
    placed after the Trainer's empty_cache, and the peaks reset there, as a run measures its steps;
    `later`: {mark: events} placed where that mark of `marks` starts (an int mark: before that event index)."""
    e_at = empty_cache_at(events, marks)
    at = {e_at + 1: list(wrap)}
    for mark, evs in (later or {}).items():
        if mark in marks or isinstance(mark, int):
            at.setdefault(marks.get(mark, mark), []).extend(evs)
    a = CachingAllocator(expandable)
    live = {}

    def run(ev):
        a.apply(ev, live)

    for i, ev in enumerate(events):
        for x in at.get(i, ()):
            run(x)
        if i == e_at + 1:
            a.reset_peaks()
        run(ev)
    return {"peak_allocated": a.peak_allocated, "peak_reserved": a.peak_reserved}


def dropped_ids(events: list, marks: dict, load: bool = False) -> tuple:
    """What a sharding engine replaces in the single-GPU events: each step's gradients (allocated in its
    backward and held past its optimizer step) and everything its clip and optimizer step allocate (the
    optimizer states, made at the first step, and the step's temporaries); `load`: also every allocation
    before the Trainer's empty_cache (the engine places the weights itself).
    -> (ids, {step: [(event index, bytes) of its gradients, in birth order]})."""
    drop, grads, k = set(), {}, 0
    end = marks.get("end", len(events))
    if load:
        e_at = empty_cache_at(events, marks)
        drop |= {ev[1] for ev in events[:e_at] if ev[0] == "a"}
    while f"step{k}.forward" in marks and f"step{k}.post_step" in marks:
        b0, b1, post = marks[f"step{k}.backward"], marks[f"step{k}.clip"], marks[f"step{k}.post_step"]
        nxt = marks.get(f"step{k + 1}.forward", end)
        born = {}
        for i in range(b0, nxt):
            ev = events[i]
            if ev[0] == "a":
                if i < b1:
                    born[ev[1]] = (i, ev[2])
                else:
                    drop.add(ev[1])
            elif ev[0] == "f" and i < post:
                born.pop(ev[1], None)
        drop |= set(born)
        grads[k] = sorted(born.values())
        k += 1
    return drop, grads


def activation_events(events: list, marks: dict) -> list:
    """The single-GPU events without `dropped_ids`: the weights, the activations and the backward's
    transients, what the rank's default stream runs beside the engine's own buffers (its allocator
    reserve is the rank's there)."""
    drop = dropped_ids(events, marks)[0]
    return [ev for ev in events if not (ev[0] in ("a", "f") and ev[1] in drop)]


def ddp_buckets(tensors, first_cap: int = 1 << 20, cap: int = 25 << 20) -> list:
    """Bucket sizes as DDP assigns them (torch/distributed/distributed_c10d.py _compute_bucket_assignment_by_size,
    the parameters in reverse order, the first bucket capped at _DEFAULT_FIRST_BUCKET_BYTES = 1 MiB and the
    rest at bucket_cap_mb = 25 when the caller passes none): one flat tensor each.  Over `tensors` as given
    (trainable_tensors: grouped by shape, one dtype); the replay builds the Reducer's own buckets, in the
    parameters' order and at the times it makes them, with `ddp_bucket_events`."""
    out, cur = [], 0
    for num, pb, _, _ in reversed(tuple(tensors)):
        cur += num * pb
        if cur >= (first_cap if not out else cap):
            out.append(cur)
            cur = 0
    return out + ([cur] if cur else [])


def ddp_reducer_buckets(params, limits) -> list:
    """DDP's bucket assignment (torch/csrc/distributed/c10d/reducer.cpp compute_bucket_assignment_by_size):
    `params` [(dtype, bytes)] in the order given, one open bucket per dtype, closed once it reaches its limit
    (`limits`: the first bucket's, then the rest's, per dtype), the buckets ordered by their first tensor.
    -> [bytes] (one flat gradient tensor each, reducer.cpp initialize_buckets)."""
    open_, done, step = {}, [], {}
    for i, (key, nbytes) in enumerate(params):
        acc = open_.setdefault(key, [i, 0])
        acc[1] += nbytes
        k = step.get(key, 0)
        if acc[1] >= limits[min(k, len(limits) - 1)]:
            done.append(tuple(open_.pop(key)))
            step[key] = k + 1
    done += [tuple(v) for v in open_.values()]
    return [size for _, size in sorted(done) if size]


def ddp_bucket_events(spec, s, targets, total: int | None = None) -> tuple:
    """DDP's gradient buckets as allocator events: (at wrapping, at the second step's forward).
    Built without find_unused_parameters or static_graph (accelerate's and the Trainer's default), the Reducer
    starts with ONE bucket per dtype -- every trainable parameter's gradient in one flat tensor
    (torch/nn/parallel/distributed.py, _ddp_init_helper's bucket_size_limits: [sys.maxsize]) -- and
    rebuilds its buckets at the next forward (_pre_forward -> reducer._rebuild_buckets) in the order the first
    backward made the gradients ready (the parameters' reverse order; a tied embedding's last), capped at
    _DEFAULT_FIRST_BUCKET_BYTES (1 MiB) for the first and bucket_cap_mb (25 MiB) for the rest: the one flat
    tensor freed (buckets_.clear()), then the new ones allocated, which best fit into the blocks the first
    step left free (the optimizer step's temporaries') -- and the one large freed block then serves the
    step's activations.  The h100-2026-12-07g history of qwen2.5-1.5b full bf16 DDP N = 2: _ddp_init_helper
    makes one 2,944.4 MiB tensor (a 2,946 MiB segment); _pre_forward at step 2 makes 85 of 26.25-455.6 MiB.
    `total`: the gradient bytes the rank's terms hold (trl's bf16 adapters where the traced setup's are fp32);
    -> (wrap events, events at the second step's forward, number of rebuilt buckets)."""
    params = module_states(spec, s, targets, trainable=True)
    scale = total / max(sum(b for _, b in params), 1) if total is not None else 1.0
    first = ddp_reducer_buckets(params, [float("inf")])
    rebuilt = ddp_reducer_buckets(params[::-1], [1 << 20, 25 << 20])
    init = [("a", -1 - i, int(b * scale)) for i, b in enumerate(first)]
    later = [("f", -1 - i) for i in range(len(first))]
    later += [("a", -10**5 - i, int(b * scale)) for i, b in enumerate(rebuilt)]
    return init, later, len(rebuilt)


def module_states(spec, s, targets, trainable: bool = False) -> list:
    """DDP's module states in `named_parameters` order, as (dtype, bytes): the embedding, each decoder layer's
    linears (weight, bias, then the adapters of a targeted one), the rest of the layer (its norms), the final
    norm and an untied LM head.  Launched QLoRA (`s.method == "qlora"`): the 4-bit weights stored as bf16
    (bnb_4bit_quant_storage), numel / 2 bytes; their quantization constants are no parameters.
    `trainable`: only the parameters that train (all of them in full fine-tuning, else the adapters), in the
    same order: what DDP's Reducer buckets (`ddp_reducer_buckets`)."""
    from vramfit.memory.setup import DTYPE_BYTES

    pdt = "bfloat16" if s.method == "qlora" else s.param_dtype
    pb, ab = DTYPE_BYTES[pdt], DTYPE_BYTES[s.adapter_dtype]
    full = s.method == "full"
    quantized = {lin.name for lin in spec.quantizable_linears()} if s.method == "qlora" else set()
    targeted = set(targets) if not full else set()
    roles = spec.params_by_role
    emb, head = roles.get("embeddings", 0), roles.get("lm_head", 0)
    per_layer = {}
    for lin in spec.linears:
        parts = lin.name.split(".")
        k = next((int(x) for x in parts if x.isdigit()), None)
        per_layer.setdefault(k, []).append(lin)
    out = [(pdt, emb * pb, full)] if emb else []  # (dtype, bytes, trains)
    linear_numel = 0
    for k in sorted(x for x in per_layer if x is not None):
        for lin in per_layer[k]:
            w = lin.in_features * lin.out_features
            linear_numel += w + (lin.out_features if lin.bias else 0)
            out.append((pdt, (w + 1) // 2 if lin.name in quantized else w * pb, full))
            if lin.bias:
                out.append((pdt, lin.out_features * pb, full))
            if lin.name in targeted:
                out += [(s.adapter_dtype, s.lora_r * lin.in_features * ab, True),
                        (s.adapter_dtype, lin.out_features * s.lora_r * ab, True)]
        out.append((pdt, -1, full))  # the layer's other parameters (norms): sized once every linear is counted
    other = max(0, spec.params_total - emb - head - spec.hidden_size - linear_numel) * pb
    marks = [i for i, (_, b, _) in enumerate(out) if b == -1]
    for i in marks:
        out[i] = (pdt, int(other / max(len(marks), 1)), full)
    out.append((pdt, spec.hidden_size * pb, full))
    if head and not spec.tied_embeddings:
        out.append((pdt, head * pb, full))
    return [(k, b) for k, b, trains in out if b > 0 and (trains or not trainable)]



def ddp_broadcast_states(states, bucket: int = 250 << 20, in_flight: int = 2) -> list:
    """DDP's constructor's broadcast of the module states (`_sync_module_states`) as allocator events, bucket by
    bucket (`broadcast_buckets`): each bucket of several tensors flattened into one new tensor (at::cat; a bucket
    of one tensor is a view of it, nothing allocated), at most `in_flight` of them alive, each freed when its
    copy back is done.  The fake-group runs of llama-3.1-8b[8 layers] LoRA: the last bucket holds the untied LM
    head (1002 MiB) with what the last layer left, so the wrap's allocated peak is 1,530 MiB over the loaded
    5,339 MiB (measured 6,869 MiB) and its freed blocks are still cached when training begins (7,536 MiB
    reserved measured and replayed; uniform 250 MiB buckets: 5,872)."""
    out, live = [], []
    for i, (size, count) in enumerate(broadcast_buckets(states, bucket)):
        if len(live) >= in_flight:
            x = live.pop(0)
            if x is not None:
                out.append(("f", x))
        if count > 1 and size:
            out.append(("a", -10**6 - i, size))
            live.append(-10**6 - i)
        else:
            live.append(None)
    return out + [("f", x) for x in live if x is not None]


def fsdp_trace_setup(st, run, act):
    """The setup whose step the replay traces for the rank.  FSDP2 under accelerate's mixed precision (float32
    weights, bf16 autocast: MixedPrecisionPolicy(param_dtype=bf16)) gathers every parameter in bf16 -- the
    norms' weights and the embedding's too -- so the rank computes as bf16 weights under autocast do
    (bf16-amp): the embedding's output, the residual stream and the RMSNorms' weight products are bf16
    where one GPU's float32 weights leave them float32, and autocast casts no weight (cached_cast returns
    a bf16 tensor as it is).  The h100-2026-12-07d fsdp-full n4 nockpt history (llama-3.2-1b bf16-mixed):
    what is live at the loss's backward is 6.35 GiB of activations and loss, the float32 trace's 6.92 GiB.
    The shards, gradients and optimizer states stay the engine's (`shard_terms`, `_engine_gap_replay`)."""
    if st.engine != "fsdp" or act.method != run.method or act.param_dtype != "float32" or not act.autocast_dtype:
        return act
    amp = {"bfloat16": "bf16-amp", "float16": "16-amp"}.get(act.autocast_dtype)
    return act.with_(precision=amp) if amp else act


def launched_trace_setup(st, run, gpus: int):
    """The setup whose step the replay traces for the launcher's QLoRA (`distributed.launched_qlora`): the
    QLoRA itself as `vramfit train --gpus N` loads it -- 4-bit layers (bitsandbytes' Linear4bit forward and
    backward, their dequantized weights, peft's clone of the base output), no prepare_model_for_kbit_training
    (16-bit embeddings, norms and LM head: `kbit_prep=False`) and the adapters in the run's dtype (trl's bf16
    cast under the fused loss, `Setup.adapter_dtype`).  None where the run is not the launcher's QLoRA.
    The fake-group runs (h100-2026-12-07, 12 DDP QLoRA runs): this trace replayed with DDP's buckets gives
    every allocated peak within 0.2% (the LoRA-over-bf16 trace with its fp32 adapter casts: up to +7.9%)."""
    from vramfit.memory.distributed import launched_qlora

    if run.method == "qlora" and launched_qlora(st, gpus):
        return run.with_(kbit_prep=False)
    return None


def replayed_rank(spec, s, strategy, gpus: int, est, constants=None):
    """`est` (a DistEstimate from the walk) with its peaks from the replay; the breakdown notes how."""
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.distributed import activation_setup, engine_setup, get_strategy, shard_terms
    from vramfit.memory.kernels import Unsupported
    from vramfit.memory.setup import resolve_targets

    c = constants or DEFAULT
    st = get_strategy(strategy) if isinstance(strategy, str) else strategy
    run = engine_setup(st, s)
    targets = resolve_targets(spec, run)
    launched = launched_trace_setup(st, run, gpus)
    act = launched or fsdp_trace_setup(st, run, activation_setup(st, run, gpus))
    try:
        ev = rank_events(spec, act, targets)
    except Unsupported as exc:
        bd = est.breakdown
        return replace(est, breakdown=replace(bd, notes=bd.notes + (f"the replay does not cover {exc}: fitted peaks",)))
    events, marks = ev["events"], ev["marks"]
    bd = est.breakdown
    outside = bd.components.get("cuda_context", c.cuda_context_bytes + c.kernel_growth_bytes) + bd.components.get(
        "nccl_buffers", 0)  # the context: the walk's, with the engine's side streams (rank_step)
    if st.engine == "ddp":
        terms = shard_terms(spec, run, targets, st, gpus, c)
        G = terms.held_at("optimizer")
        buckets, rebuilt, n_rebuilt = ddp_bucket_events(spec, act, targets, G)
        sim = simulate_rank(events, marks, ddp_broadcast_states(module_states(spec, act, targets)) + buckets,
                            {"step1.forward": rebuilt},
                            act.allocator == "expandable")
        peak, reserved = sim["peak_allocated"], sim["peak_reserved"]
        note = (f"peaks from the allocator replay of the rank's two steps with DDP's gradient buckets: one flat "
                f"tensor per dtype at wrapping, rebuilt into {n_rebuilt} at the second step (and its constructor's "
                "broadcast buffers)")
    elif st.engine == "deepspeed" and run.method != "qlora" and not (st.offload_optimizer or st.offload_params):
        peak, reserved, note = _zero_rank(spec, act, targets, st, gpus, events, marks)
    else:
        out, note = anchored_rank(spec, run, act, targets, st, gpus, c, events, marks, bd)
        peak, reserved = out.peak_allocated_bytes, out.peak_reserved_bytes
        bd = replace(out, notes=bd.notes)
    comps = dict(bd.components, allocator_reserve=int(reserved - peak))
    walk_only = ("peak moment:", "reserved includes other CUDA streams")  # the walk's, superseded here
    notes = tuple(n for n in bd.notes if not n.startswith(walk_only)) + (note,)
    bd = replace(bd, components=comps, peak_allocated_bytes=int(peak), peak_reserved_bytes=int(reserved),
                 device_bytes=int(reserved + outside), notes=notes)
    return replace(est, breakdown=bd)


def _zero_rank(spec, act, targets, st, gpus: int, events: list, marks: dict) -> tuple:
    """DeepSpeed ZeRO: the allocator replay of the rank's own events (vramfit.memory.zero)."""
    from vramfit.memory.walk import trainable_tensors
    from vramfit.memory.zero import zero_replay

    drop, grads = dropped_ids(events, marks, load=True)
    sim = zero_replay(spec, act, trainable_tensors(spec, act, targets), st, gpus, events, marks, drop, grads)
    pools = ", ".join(f"{k} stream {v:,} B" for k, v in sim["pools"].items() if v)
    note = (f"peaks from the allocator replay of the rank's steps under ZeRO-{st.zero_stage} (the engine's "
            f"buffers placed as DeepSpeed allocates them, one allocator per CUDA stream{': ' + pools if pools else ''})")
    return sim["peak_allocated"], sim["peak_reserved"], note


def _engine_gap_replay(spec, run, act, st, gpus: int, tensors, events: list, marks: dict) -> dict:
    """The allocator over what the rank's default stream runs besides the engine's per-moment buffers: the
    single-GPU events without their gradients and optimizer step (`dropped_ids`), after what wrapping left
    (FSDP: vramfit.memory.fsdp.wrap_events: the sharded parameters and the cached blocks of the whole ones
    they replaced; the load's weights dropped where the model was built on the CPU)."""
    if st.engine == "ddp":  # DDP keeps the single GPU's gradients and optimizer step: its whole replay
        return simulate_rank(events, marks, [])
    if st.engine != "fsdp":
        return simulate_rank(activation_events(events, marks), marks, [])
    from vramfit.memory.fsdp import wrap_events
    from vramfit.memory.zero import _Ids

    qlora = run.method == "qlora"  # the launcher's (FSDP1), traced as itself or as LoRA over bf16
    drop = dropped_ids(events, marks, load=not qlora)[0]
    e_at = empty_cache_at(events, marks)
    originals = ()
    if qlora:  # the model loaded on the GPU: what the load left allocated
        live = {}
        for ev in events[:e_at]:
            if ev[0] == "a":
                live[ev[1]] = ev[2]
            elif ev[0] == "f":
                live.pop(ev[1], None)
        originals = tuple(live.items())
    full = act.method == "full"
    # the engine's storage (run: float32 where the traced setup is fsdp_trace_setup's bf16-amp)
    elem = 4 if (run.param_dtype == "float32" or (full and run.autocast_dtype)) else 2
    adapters = () if full else tuple((shape, 4) for _, _, _, shape in tensors)
    ids = _Ids()
    wrap = wrap_events(spec, act, gpus, elem, ids, originals, qlora, adapters)
    # FSDP2 builds the model on the CPU: the allocator is empty when wrapping starts (QLoRA's FSDP1 wraps a model
    # loaded on the GPU: its state is the load's, not replayed here)
    from vramfit.memory.fsdp import wrap_rounding

    rounding = 0 if qlora else wrap_rounding(wrap, act.allocator == "expandable")
    later = {}
    o = act.optimizer
    if not (o.paged or o.factored) and o.states:
        nb = o.state_bytes or (elem if full else 4)
        from vramfit.memory.fsdp import shard_numel
        from vramfit.memory.fsdp_full import trainer_groups

        groups = trainer_groups(spec) if full else None  # full: the Trainer's groups, group by group
        groups = ([[shard_numel(sh, gpus) * nb for sh in g] for g in groups] if groups
                  else [_shard_sizes(spec, tensors, gpus, nb, full)])
        k = 0
        while f"step{k}.optimizer" in marks:  # the rank's AdamW on its shards: states at the first step
            evs = []
            for shards in groups:
                temps = [ids() for _ in shards] if o.foreach_temp else []
                evs += [("a", ids(), b) for b in shards for _ in range(o.states)] if k == 0 else []
                evs += [("a", t, b) for t, b in zip(temps, shards)] + [("f", t) for t in temps]
            later[f"step{k}.optimizer"] = evs
            k += 1
    if full and not qlora:  # the whole default stream: gradients, gathered parameters, reduce-scatter inputs
        # (vramfit.memory.fsdp_full); its reserve is the rank's default stream's own
        from vramfit.memory.fsdp_full import full_gap_replay

        res = full_gap_replay(spec, run, st, gpus, events, marks, wrap, later, drop, ids, act.allocator == "expandable")
        if res is not None:
            return dict(res, whole=True, wrap_rounding=rounding)
    if not (qlora or full):
        # LoRA: the gathered (frozen) parameters take the blocks of the whole ones wrapping freed, beside the
        # small activations (fsdp.copy_out_events).  Full fine-tuning: its whole default stream, above
        from vramfit.memory.fsdp import copy_out_events

        gather = 2 if run.autocast_dtype else (4 if run.param_dtype == "float32" else 2)
        keep = [i for i, ev in enumerate(events) if not (ev[0] in ("a", "f") and ev[1] in drop)]
        for mark, evs in copy_out_events(spec, st, gather, marks, ids, run.loss == "fused", events, act).items():
            mark = bisect_left(keep, mark) if isinstance(mark, int) else mark  # an event index: in the kept events
            later[mark] = later.get(mark, []) + evs
    sim = simulate_rank([ev for ev in events if not (ev[0] in ("a", "f") and ev[1] in drop)], marks, wrap, later)
    return dict(sim, wrap_rounding=rounding)


def _shard_sizes(spec, tensors, n: int, nbytes: int, full: bool) -> list:
    """Bytes of each trainable parameter's FSDP shard (its padded dim-0 chunk), one AdamW state each."""
    shapes = ([tuple(sh) for sh, count, _ in spec.param_shapes for _ in range(count)] if full
              else [tuple(shape) for _, _, _, shape in tensors])
    from vramfit.memory.fsdp import shard_numel

    return [shard_numel(sh, n) * nbytes for sh in shapes]


def tied_embedding_grad(spec, st, tensors) -> int:
    """The tied embedding's own gradient in the one-GPU replay's last window: autograd makes the embedding's
    gradient (vocab x hidden) and only then adds it into the LM head's (events._sum_in_place), so the
    replayed window's peak already holds it beside every gradient.  The rank's end moment counts the same
    tensor (fsdp_terms: the tied tail's unsharded gradient beside its new one, or its reduce-scatter
    input): the one-GPU moment it is measured against must hold it too, or it is counted twice.
    0 unless FSDP runs a tied model whose embedding trains."""
    if st.engine != "fsdp" or not spec.tied_embeddings:
        return 0
    return sum(num * pb for num, pb, role, _ in tensors if role == "embeddings")


def anchored_rank(spec, run, act, targets, st, gpus: int, c, events: list, marks: dict, bd):
    """The replay's allocated peak of each window of the step (`step_windows`; each phase where the
    gradients do not cut the backward) plus what the rank holds then beyond the single GPU: the
    walk's per-rank moments minus its single-GPU ones, so that the activations are the replay's."""
    from vramfit.memory.distributed import _launched_qlora_weights, rank_moments, shard_terms
    from vramfit.memory.estimate import trace_key
    from vramfit.memory.rank_step import PHASE, RankTerms, moment_bytes, moments, single_gpu_grads
    from vramfit.memory.walk import (_grad_totals, optimizer_state_bytes, optimizer_step_temp_bytes,
                                     trainable_tensors, weight_bytes)
    from vramfit.model.trace import activation_profile

    ws = c.cublas_workspace_bytes
    profile = activation_profile(spec, trace_key(spec, act, targets), grad_ckpt=act.grad_ckpt)
    terms = shard_terms(spec, run, targets, st, gpus, c)
    tensors = trainable_tensors(spec, act, targets)
    G, G_out = _grad_totals(tensors)
    w = (_launched_qlora_weights(spec, run.with_(loss="logits"), targets, c) if act.method != run.method
         else weight_bytes(spec, act, targets, c))  # what the replayed events hold
    single = RankTerms(weights=tuple(w.items()), optimizer=optimizer_state_bytes(tensors, act, c),
                       optimizer_temp=optimizer_step_temp_bytes(tensors, act, spec),
                       grads=single_gpu_grads(G, G_out, G, max(spec.num_layers, 1)), held={})
    at_s = moment_bytes(moments(spec, act, targets, profile, c), single, ws)
    at_s["backward_end"] += tied_embedding_grad(spec, st, tensors)
    at_r = moment_bytes(rank_moments(spec, run, act, targets, profile, c, terms), terms, ws)
    d = {k: at_r[k] - at_s[k] for k in at_r}
    used = {k: sum(u.get(k, 0) for _, u in terms.pools.values()) for k in at_r}
    win = step_windows(events, marks, spec, tensors)
    if win is None:  # one window per phase
        cuts, end, L = phase_cuts(marks), marks.get("step2.forward", marks.get("end", len(events))), 0
    else:
        cuts, end, L = win
        if st.engine == "fsdp" and st.reshard_after_forward:  # the top layer's backward from its entry
            from vramfit.memory.fsdp import top_layer_entry_cut

            cuts = top_layer_entry_cut(events, cuts, spec, act)
    peaks = window_peaks(events, cuts, end)
    # the end of the backward where the gradients do not cut it (the untied embedding's backward of LoRA, the
    # tied tail's): after the bottom layer's backward, its activations freed -- the replay's allocated at
    # the clipping mark, not the bottom layer's window (h100-2026-12-07g history of llama-3.1-8b[8] LoRA:
    # the embedding's re-gather after the bottom layer's backward is the step's peak)
    end_apart = win is not None and not any(n == "backward_end" for _, n in cuts) and "step1.clip" in marks
    if end_apart:
        peaks["backward_end"] = window_peaks(events, [(marks["step1.clip"] - 1, "end")], marks["step1.clip"]).get(
            "end", 0)
    by_window = {"forward": ("forward_first", "forward_layer", "forward_loss"),
                 "backward_head": ("backward_loss", "backward_head"),
                 "backward": tuple(k for k in at_r if PHASE[k] == "backward"), "backward_end": ("backward_end",),
                 "optimizer": ("optimizer",)}
    values, default = {}, {}
    for name, peak in peaks.items():
        if isinstance(name, tuple):  # the k-th decoder layer from the top: the terms are linear in k
            k = name[1]
            f = k / max(L - 1, 1)
            cand = {"backward_top": d["backward_top"] + (d["backward_bottom"] - d["backward_top"]) * f}
            if k == L - 1 and not end_apart and not any(n == "backward_end" for _, n in cuts):
                cand["backward_end"] = d["backward_end"]
            moment = max(cand, key=cand.get)
            delta, u = cand[moment], used["backward_top" if moment == "backward_top" and k < L - 1 else
                                          ("backward_bottom" if moment == "backward_top" else moment)]
        else:  # several moments: the walk's largest rank moment over its largest single-GPU one
            moment = max(by_window[name], key=lambda m: at_r[m])
            delta, u = at_r[moment] - max(at_s[m] for m in by_window[name]), used[moment]
        values[name] = peak + delta
        default[name] = values[name] - u
    sim = _engine_gap_replay(spec, run, act, st, gpus, tensors, events, marks)
    # the shards' blocks beyond their bytes (`wrap_rounding`): allocated at every moment of the step, on the
    # default stream
    extra = sim.get("wrap_rounding", 0)
    values = {k: v + extra for k, v in values.items()}
    default = {k: v + extra for k, v in default.items()}
    gap = sim["peak_reserved"] - sim["peak_allocated"]
    phase_of = {n: ("backward" if isinstance(n, tuple) or str(n).startswith("backward") else n) for n in values}
    phases = {}
    for n, v in values.items():
        phases[phase_of[n]] = max(phases.get(phase_of[n], 0), int(v))
    peak_name = max(values, key=values.get)
    peak = int(values[peak_name])
    pooled = sum(res for res, _ in terms.pools.values())
    # the default stream holds at least the segments its replay made (wrapping's, whose blocks the step's gathered
    # parameters take): where the rank's largest default-stream moment is below the replay's allocated peak (the
    # replay holds the copy-outs too), the replay's reserve over that moment would fall below its own segments
    reserved = max(peak, int(max(max(default.values()) + gap, sim["peak_reserved"]) + pooled))
    if sim.get("whole"):  # FSDP2 full fine-tuning: the default stream replayed whole (vramfit.memory.fsdp_full)
        reserved = max(peak, int(sim["peak_reserved"] + pooled))
    comps = dict(bd.components, allocator_reserve=reserved - peak)
    where = (f"decoder layer {L - peak_name[1]} of {L}" if isinstance(peak_name, tuple)
             else str(peak_name).replace("_", " "))
    note = (f"peaks: the allocator replay of the rank's step ({len(values)} windows), each window's peak plus "
            f"what the engine holds then beyond one GPU (the walk's terms); peak at {where}; reserve: the "
            f"replay's ({gap:,} B) plus other streams' pools ({pooled:,} B)")
    out = replace(bd, components=comps, phases=phases, peak_phase=phase_of[peak_name], peak_allocated_bytes=peak,
                  peak_reserved_bytes=reserved)
    return out, note
