"""The allocator replay: training steps' allocation events (vramfit.memory.events) replayed through
the caching allocator model (vramfit.memory.allocator) for the reserved and nvidia-smi peaks."""

from __future__ import annotations

from dataclasses import replace

from vramfit.memory.constants import DEFAULT, Constants
from vramfit.memory.setup import Setup
from vramfit.memory.template_cache import setup_template, template_key
from vramfit.memory.walk import Breakdown


def simulated_breakdown(spec, setup: Setup, targets, bd: Breakdown, c: Constants, seq_lens=None,
                        after: bool = True, eval_batch: int | None = None) -> Breakdown:
    """`bd` with its three peaks from the allocator simulation, or with a note saying why not.
    `seq_lens`: one padded batch length per replayed step (real data), instead of two steps at
    `setup.seq_len`.  `after`: the whole run's peaks, the evaluation and checkpoint save after the
    steps replayed from the state they leave (`phases` then holds each phase's allocated peak), the
    evaluation at micro-batch `eval_batch` (default the training one, as vramfit train's)."""
    import time

    from vramfit.memory import pinned
    from vramfit.memory.events import training_events
    from vramfit.memory.kernels import Unsupported

    started = time.perf_counter()
    pin = pinned.pinned_key(spec, setup, targets, _extras(setup), ("after", after, eval_batch, seq_lens))
    try:
        # two steps: measured reserved is flat from the second step on (optimizer states exist), and
        # 2- and 3-step replays gave the same peaks on the 7 cases compared; a slow recording is kept
        ev = pinned.load(pin)
        kept = ev is not None
        if not kept:
            ev = training_events(spec, setup, targets, steps=2, seq_lens=seq_lens, after=after, eval_batch=eval_batch)
            pinned.store(pin, ev, time.perf_counter() - started, setup)
    except Unsupported as exc:
        return replace(bd, notes=bd.notes + (f"the allocator simulation does not cover {exc} yet: the reserve is "
                                             "the fitted one",))
    parts = [(ev["events"], ev["marks"])] + ([(ev["after"]["events"], ev["after"]["marks"])] if after else [])
    streams = (ev.get("host") or {}).get("streams")  # activation offloading's copy stream
    sim = replay_phases(parts, expandable=setup.allocator == "expandable", streams=streams)
    bd = with_host(bd, ev.get("host"))
    steps = f"{len(seq_lens)} steps of the data's padded batch lengths" if seq_lens else "2 steps"
    rest = ", evaluation and a checkpoint save" if after else ""
    note = (f"reserved and device peaks from the allocator simulation: {sum(len(e) for e, _ in parts):,} "
            f"allocations and frees of {steps}{rest} replayed in {time.perf_counter() - started:.1f} s"
            + (" (their recording read from the cache, where an earlier replay pinned it)" if kept else ""))
    if after:
        return with_phases(bd, sim, c, note)
    comps = dict(bd.components)
    comps["allocator_reserve"] = sim["peak_reserved"] - sim["peak_allocated"]
    outside = c.cuda_context_bytes + c.kernel_growth_bytes
    return replace(bd, components=comps, peak_allocated_bytes=sim["peak_allocated"],
                   peak_reserved_bytes=sim["peak_reserved"], device_bytes=sim["peak_reserved"] + outside,
                   notes=bd.notes + (note,))


# --------------------------------------------------------------------------- the run's phases

# the whole run's phases, in order: loading (with the Trainer's set-up), a step's forward, backward and
# optimizer step (gradient clipping, the step, zero_grad), evaluation and checkpoint saving
PHASES = ("load", "forward", "backward", "optimizer", "eval", "save")


def phase_of(mark: str) -> str:
    """The phase a mark of `training_events` (or of its post-training stream) opens: after_load -> setup,
    step1.micro2.backward -> backward, step0.clip -> optimizer, eval1 -> eval, save.load_best -> load_best
    (the measured phases' names: benchmarks/accuracy/train_case.py)."""
    if mark in ("load", "after_load"):
        return "load" if mark == "load" else "setup"
    if mark == "save.load_best":
        return "load_best"
    last = mark.rsplit(".", 1)[-1]
    if last in ("forward", "backward"):
        return last
    if last in ("clip", "optimizer", "post_step"):
        return "optimizer"
    head = mark.split(".", 1)[0].rstrip("0123456789")
    return head if head in ("eval", "save") else last


def replay_phases(parts, expandable: bool = False, limit_bytes: int | None = None, streams: dict | None = None) -> dict:
    """Streams of events replayed one after another through one allocator model, each continuing from
    the state the one before left (its live blocks and its cached segments): `parts` is a list of
    (events, marks), each stream's ids its own.  -> {peak_allocated, peak_reserved, allocated, reserved,
    oom, oom_phase, phases: {phase: {peak_allocated, peak_reserved, allocated_end, reserved_end}}} with
    the phases of `phase_of` (a phase met several times, as each step's forward, keeps its maxima).
    `streams`: the first stream's allocations made on another CUDA stream (training_events' host["streams"]:
    activation offloading's copy stream), replayed in that stream's own pools."""
    from vramfit.memory.allocator import CachingAllocator, OutOfMemory
    from vramfit.memory.offload import StreamAllocator

    a = StreamAllocator(expandable, limit_bytes) if streams else CachingAllocator(expandable, limit_bytes)
    phases: dict = {}
    oom_phase = None

    def close(name):
        ph = phases.setdefault(name, {"peak_allocated": 0, "peak_reserved": 0})
        ph["peak_allocated"] = max(ph["peak_allocated"], a.peak_allocated)
        ph["peak_reserved"] = max(ph["peak_reserved"], a.peak_reserved)
        ph["allocated_end"], ph["reserved_end"] = a.allocated, a.reserved
        a.reset_peaks()

    peak_a = peak_r = 0
    for part, (events, marks) in enumerate(parts):
        live = {}
        if streams:  # the table names the first stream's ids (a later one's ids are its own)
            a.streams, a.stream_of_live = (streams if part == 0 else {}), {}
        # by position, marks at the same one in their order (an empty phase first)
        bounds = sorted((at, k, phase_of(name)) for k, (name, at) in enumerate(marks.items()) if name != "end")
        if not bounds or bounds[0][0] > 0:
            bounds.insert(0, (0, -1, "load"))
        bounds.append((len(events), 0, None))
        for (start, _, name), (stop, _, _) in zip(bounds, bounds[1:]):
            try:
                for ev in events[start:stop]:  # a StreamAllocator's apply keeps the copy stream's blocks apart
                    a.apply(ev, live)
            except OutOfMemory:
                oom_phase = name
            peak_a, peak_r = max(peak_a, a.peak_allocated), max(peak_r, a.peak_reserved)
            close(name)
            if oom_phase:
                break
        if oom_phase:
            break
    return {"peak_allocated": peak_a, "peak_reserved": peak_r, "allocated": a.allocated, "reserved": a.reserved,
            "oom": oom_phase is not None, "oom_phase": oom_phase, "phases": phases}


def run_phases(result: dict) -> dict:
    """replay_phases' per-phase figures grouped as the run's PHASES (the set-up joins loading, the
    adapter's reload the save) ->
    {phase: (peak allocated, peak reserved)}, in run order, the phases met only."""
    out = {}
    for name, ph in result["phases"].items():
        key = {"setup": "load", "load_best": "save"}.get(name, name)
        a, r = out.get(key, (0, 0))
        out[key] = (max(a, ph["peak_allocated"]), max(r, ph["peak_reserved"]))
    return {k: out[k] for k in PHASES if k in out}


# capped replays of this process: events per (spec, setup, targets), a few kept (a large model's
# two steps are a few hundred thousand tuples); results per (that, cap, initial bytes), all kept
_REPLAY_EVENTS: dict = {}
_REPLAY_EVENTS_KEPT = 6
_REPLAY_RESULTS: dict = {}
# expanded template streams of this process, a few kept (keyed by the template object, which the
# model cache keeps alive, and the shape)
_EXPANDED: dict = {}
_EXPANDED_KEPT = 3


def _replay_events(spec, setup: Setup, targets) -> dict:
    from vramfit.memory.events import training_events

    key = (id(spec), setup, tuple(targets)) + _extras(setup)
    hit = _REPLAY_EVENTS.pop(key, None)
    if hit is None:
        # two optimizer steps (each with its accumulation's micro-batches): reserved is flat from
        # the second on, as in simulated_breakdown; a slow recording is kept (vramfit.memory.pinned)
        import time

        from vramfit.memory import pinned

        pin = pinned.pinned_key(spec, setup, targets, _extras(setup))
        got = pinned.load(pin)
        if got is None:
            started = time.perf_counter()
            got = training_events(spec, setup, targets, steps=2, grad_accum=setup.grad_accum)
            if pinned.store(pin, got, time.perf_counter() - started, setup):
                got = dict(got, pin=pin)
        hit = (spec, got)
    _REPLAY_EVENTS[key] = hit  # most recently used last
    while len(_REPLAY_EVENTS) > _REPLAY_EVENTS_KEPT:
        _REPLAY_EVENTS.pop(next(iter(_REPLAY_EVENTS)))
    return hit[1]


def _extras(setup: Setup) -> tuple:
    """What of a setup's extras (not in its equality) its replay depends on: packing's example length."""
    if not setup.packing:
        return ()
    from vramfit.memory.levers import cache_part

    return cache_part(setup)


def template_events(spec, setup: Setup, targets) -> dict | None:
    """Two steps' events (and marks) at `setup`, with its accumulation, from a cached exact event
    template (none is built here), or None."""
    from vramfit.memory.template import NoTemplate
    from vramfit.memory.template_compose import expand_any as expand

    tpl = setup_template(spec, setup, targets, setup.grad_accum, build=False)["template"]
    if tpl is None:
        return None
    # the allocator is not the template's: the plan's replays of one shape under several allocators
    # and caps share one expansion
    key = (id(tpl), setup.micro_batch, setup.seq_len, setup.lora_r, spec.num_layers, setup.grad_accum)
    hit = _EXPANDED.pop(key, None)
    if hit is None or hit[0] is not tpl:
        marks = {}
        try:
            events = expand(tpl, setup.micro_batch, setup.seq_len, setup.lora_r, spec.num_layers, setup.grad_accum,
                            marks)
        except (NoTemplate, KeyError, IndexError, TypeError, ValueError):
            return None
        hit = (tpl, {"events": events, "marks": marks})
    _EXPANDED[key] = hit  # most recently used last
    while len(_EXPANDED) > _EXPANDED_KEPT:
        _EXPANDED.pop(next(iter(_EXPANDED)))
    return hit[1]


def _simulate_accumulation(events: list, marks: dict, grad_accum: int, expandable: bool, limit_bytes: int,
                           initial_allocated: int, streams: dict | None = None) -> dict:
    """`allocator.simulate` over two accumulating steps, skipping the micro-batches whose outcome is
    known: a step's micro-batches after the first repeat one micro-batch's events (up to ids), so
    once the allocator's whole state (blocks, segments, live ids; not the peaks) is the same before
    two consecutive ones, every later one makes the same decisions from the same state, and the run
    goes on from the last micro-batch (whose leftovers the optimizer frees), peaks as they were,
    retries and events counted for the skipped ones.  A stream whose micro-batches leave tensors to
    the next (the live ids differ) never repeats, and is replayed whole.  `streams`: allocations on
    another CUDA stream (activation offloading's copy stream), in that stream's own pools."""
    from vramfit.memory.allocator import CachingAllocator, OutOfMemory
    from vramfit.memory.offload import StreamAllocator

    a = StreamAllocator(expandable, limit_bytes, streams) if streams else CachingAllocator(expandable, limit_bytes)
    live: dict = {}
    A = grad_accum
    # per step: the start of each accumulating micro-batch (1 .. A-1)
    steps = []
    for s in range(2):
        starts = [marks.get(f"step{s}.micro{k}.forward") for k in range(1, A)]
        if A > 3 and None not in starts and starts == sorted(starts):
            steps.append(starts)
    bounds = sorted((at, s, k) for s, starts in enumerate(steps) for k, at in enumerate(starts, 1) if 2 <= k < A - 1)
    oom_at, i, n, counted, retries_extra = None, -1, len(events), 0, 0
    malloc, free, empty_cache = a.malloc, a.free, a.empty_cache
    previous = {}
    try:
        if initial_allocated:
            a.malloc(initial_allocated)
        pos = 0
        for at, s, k in bounds + [(n, None, None)]:
            if at < pos:  # inside a skipped stretch
                continue
            i = pos - 1
            if streams:  # the copy stream's blocks in their own pools (StreamAllocator.apply)
                for ev in events[pos:at]:
                    i += 1
                    a.apply(ev, live)
            else:
                for ev in events[pos:at]:  # CachingAllocator.apply, inlined: the replay's hot loop
                    i += 1
                    kind = ev[0]
                    if kind == "a":
                        live[ev[1]] = malloc(ev[2])
                    elif kind == "f":
                        free(live.pop(ev[1]))
                    else:
                        empty_cache()
            pos = at
            if s is None:
                break
            state = (a.state(live), frozenset(live), a.num_alloc_retries)
            before = previous.get(s)
            previous[s] = state
            if before is not None and before[0] == state[0] and before[1] == state[1]:
                last = steps[s][-1]  # the start of the step's last micro-batch: the state there is this one
                skipped = A - 1 - k
                retries_extra += skipped * (state[2] - before[2])
                counted += last - at
                pos = last
    except OutOfMemory:
        oom_at = i
    return {"peak_allocated": a.peak_allocated, "peak_reserved": a.peak_reserved,
            "num_device_alloc": a.num_device_alloc, "allocated": a.allocated, "reserved": a.reserved,
            "oom": oom_at is not None, "oom_at": oom_at, "num_alloc_retries": a.num_alloc_retries + retries_extra,
            "events": n, "events_replayed": n - counted}


def _quiet(fn):
    """Run `fn` with the traced libraries' warnings silenced (transformers' deprecation notes while the
    model is built and traced on the meta device say nothing about the user's setup)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return wrapper


@_quiet
def capped_replay(spec, setup: Setup, targets, limit_bytes: int, constants: Constants | None = None,
                  initial_allocated: int = 0, templates: bool = True) -> dict:
    """Two Trainer steps of `setup` replayed through the allocator model under a cap of
    `limit_bytes` on torch's allocator (what `torch.cuda.set_per_process_memory_fraction` allows
    it): under the cap the allocator releases its cached blocks and retries before it gives up,
    so a setup can fit where its uncapped reserved peak would not.  Raises
    `vramfit.memory.events.Unsupported` for what the replay does not cover.  The events come from the
    setup's event template where one is cached (`templates`), else from the meta device.  Cached in-process per
    (spec, setup, targets, cap): a repeated check costs nothing.

    -> {fits, oom, oom_at, oom_phase, peak_allocated_bytes, peak_reserved_bytes, device_bytes,
        num_alloc_retries, limit_bytes, events, seconds, cached}"""
    import time

    from vramfit.memory import pinned

    c = constants or DEFAULT
    key = (id(spec), setup, tuple(targets), int(limit_bytes), int(initial_allocated), templates) + _extras(setup)
    hit = _REPLAY_RESULTS.get(key)
    if hit is not None and hit[0] is spec:
        return dict(hit[1], cached=True)
    started = time.perf_counter()
    ev = template_events(spec, setup, targets) if templates else None
    if ev is None:
        ev = _replay_events(spec, setup, targets)
    pin, expandable = ev.get("pin"), setup.allocator == "expandable"  # a pinned stream's verdicts are kept too
    sim = pinned.load_sim(pin, limit_bytes, initial_allocated, expandable) if pin else None
    if sim is None:
        sim = _simulate_accumulation(ev["events"], ev["marks"], setup.grad_accum, expandable, int(limit_bytes),
                                     int(initial_allocated), (ev.get("host") or {}).get("streams"))
        if pin:
            pinned.store_sim(pin, limit_bytes, initial_allocated, expandable, sim)
    phase = None
    if sim["oom"]:
        phase = max(((at, name) for name, at in ev["marks"].items() if at <= max(sim["oom_at"], 0)),
                    default=(0, "load"))[1]
    out = {"fits": not sim["oom"], "oom": sim["oom"], "oom_at": sim["oom_at"], "oom_phase": phase,
           "peak_allocated_bytes": sim["peak_allocated"], "peak_reserved_bytes": sim["peak_reserved"],
           "device_bytes": sim["peak_reserved"] + c.cuda_context_bytes + c.kernel_growth_bytes,
           "num_alloc_retries": sim["num_alloc_retries"], "limit_bytes": int(limit_bytes),
           "events": sim["events"], "seconds": time.perf_counter() - started, "cached": False}
    _REPLAY_RESULTS[key] = (spec, out)
    return dict(out)


# --------------------------------------------------------------------------- the replay from templates
# (vramfit.memory.template_cache: which template a setup has, its key, its build)

def template_replay(spec, setup: Setup, targets, build: bool = True, after: bool = True,
                    eval_batch: int | None = None) -> tuple:
    """(replay_phases' result over two steps at `setup`, grad_accum 1 as `simulated_breakdown`, and with
    `after` the rest of the run (post_stream), a note) from the setup's template, or (None, why not)."""
    import time

    from vramfit.memory.template import NoTemplate
    from vramfit.memory.template_compose import expand_any as expand

    started = time.perf_counter()
    got = setup_template(spec, setup, targets, 1, build)
    if "first" in got:  # built now: the real replay it was checked against is the answer
        _, res = got["first"]
        parts = [(res["events"], res["marks"])]
        note = (f"reserved and device peaks from the allocator simulation of {len(res['events']):,} allocations "
                f"and frees of 2 steps; {got['note']}")
    else:
        tpl = got["template"]
        if tpl is None:
            return None, got["note"]
        marks = {}
        try:
            events = expand(tpl, setup.micro_batch, setup.seq_len, setup.lora_r, spec.num_layers, 1, marks)
        except (NoTemplate, KeyError, IndexError, TypeError, ValueError) as exc:
            return None, f"the event template does not expand here ({type(exc).__name__}: {exc})"
        parts = [(events, marks)]
        note = (f"reserved and device peaks from the allocator simulation of {len(events):,} allocations and "
                f"frees of 2 steps, expanded from the setup's event template"
                + (f" ({tpl['note']})" if tpl.get("note") else ""))
    if after:
        post = post_stream(spec, setup, targets, eval_batch, build=build)
        parts.append((post["events"], post["marks"]))
        how = "its template" if post["source"] == "template" else "the meta device"
        note += f"; evaluation and a checkpoint save after them ({len(post['events']):,} events, from {how})"
    sim = replay_phases(parts, expandable=setup.allocator == "expandable")
    return sim, note + f", in {time.perf_counter() - started:.2f} s"


# --------------------------------------------------------------------------- the rest of the run
# evaluation and a checkpoint save after the steps (training_events(after=True)): a stream of its own,
# replayed from the state the training stream leaves.  Its template is built by template_build itself,
# given the load and this stream as one (the evaluations' forwards named as training forwards), so it
# expands torch-free to any micro-batch, sequence, rank and layer count as the training template does.

POST_FORMAT = 1


def eval_setup(setup: Setup, eval_batch: int | None = None) -> Setup:
    """What the post-training stream depends on: the setup at the evaluation's micro-batch (vramfit
    train's per_device_eval_batch_size is the training micro-batch, the default here)."""
    return replace(setup, micro_batch=eval_batch or setup.micro_batch)


def _as_training(res: dict) -> tuple:
    """training_events(steps=0, after=True) as one stream, load then the rest of the run, with the
    evaluation batches' marks named as training forwards (what the template builder's tagging knows)."""
    load, post = res["events"], res["after"]["raw"]
    marks = {"after_load": res["marks"]["after_load"]}
    for name, at in res["after"]["marks"].items():
        marks[_AS_TRAINING.get(name, name)] = len(load) + at
    return load + post, marks


_AS_TRAINING = {f"eval{k}": f"step{k}.forward" for k in range(8)}
_FROM_TRAINING = {v: k for k, v in _AS_TRAINING.items()}


def _post_record(spec, setup, layers: int, grad_accum: int = 1) -> list:
    """template_build's `record` for the post-training stream (build time only)."""
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import resolve_targets
    from vramfit.memory.template_record import _tag, _tagging, shrunk_spec

    small = shrunk_spec(spec, layers)
    with _tagging(layers) as st:
        res = training_events(small, setup, resolve_targets(small, setup), steps=0, after=True)
    events, marks = _as_training(res)
    return _tag(events, marks, st.rec.meta, layers - 1)


def _post_real(spec, setup, layers: int | None = None, grad_accum: int = 1) -> list:
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import resolve_targets
    from vramfit.memory.template_record import shrunk_spec

    s = spec if layers is None else shrunk_spec(spec, layers)
    return _as_training(training_events(s, setup, resolve_targets(s, setup), steps=0, after=True))[0]


def _post_part(events: list, marks: dict) -> dict:
    """The post-training part of a joined stream (_as_training's, or its template's expansion)."""
    from vramfit.memory.events import _own_ids

    cut = marks["step0.forward"]
    first = next((ev[1] for ev in events[cut:] if ev[0] == "a"), 0)
    own, foreign = _own_ids(events[cut:], first)
    if foreign:
        raise ValueError("the rest of the run frees the load's allocations")
    out = {_FROM_TRAINING.get(k, k): v - cut for k, v in marks.items() if v >= cut}
    # a save with no event on the GPU starts no run of the template: it starts where the next phase does
    out.setdefault("save", out.get("save.load_best", out.get("end", len(own))))
    return {"events": own, "marks": out}


def post_template(spec, setup: Setup, targets, eval_batch: int | None = None, build: bool = True) -> dict:
    """The post-training stream's template at `setup` (its evaluation micro-batch): {"template"} from
    the cache, or built now with template_build (patched to record this stream), checked at full size
    and cached, exact or not; {"template": None, "note"} where none."""
    from vramfit.memory.kernels import Unsupported
    from vramfit.memory.template import NoTemplate, expand
    from vramfit.memory.template_build import same_events
    from vramfit.model import cache

    s = eval_setup(setup, eval_batch)
    key = cache.template_digest(template_key(spec, s), "post", POST_FORMAT)
    entry = _post_cached(spec, s)
    if entry is not None:
        return {"template": entry.get("template") if entry.get("exact") else None,
                "note": "" if entry.get("exact") else f"no post-training template: {entry.get('reason')}"}
    tiled = _post_tiles(spec, setup, targets, eval_batch)
    if tiled is not None:
        return {"template": tiled, "note": ""}
    if not build:
        return {"template": None, "note": "no post-training template cached"}
    from vramfit.memory import template_build as tb

    saved = tb.record, tb._real_events
    tb.record, tb._real_events = _post_record, _post_real
    try:
        tpl = tb.build(spec, s, s.micro_batch, s.seq_len)
        mine = expand(tpl, s.micro_batch, s.seq_len, s.lora_r, spec.num_layers)
        real = _post_real(spec, s)
        ok, why = same_events(mine, real), "its events differ from the real recording's"
    except (NoTemplate, Unsupported) as exc:
        tpl, ok, why = None, False, str(exc)
    except Exception as exc:  # noqa: BLE001  the builder's own failure: not cached, the recording answers
        return {"template": None, "note": f"building the post-training template failed ({type(exc).__name__}: {exc})"}
    finally:
        tb.record, tb._real_events = saved
    cache.store_template(key, {"exact": True, "template": tpl} if ok else {"exact": False, "reason": why})
    return {"template": tpl if ok else None, "note": "" if ok else f"no post-training template: {why}"}


def _post_cached(spec, s: Setup) -> dict | None:
    """The cached post-training template entry of evaluation setup `s`, under the installed library stack or
    one that records the same (vramfit.memory.stack_alias); where the rest of the run never steps the
    optimizer (training_events(steps=0)), another optimizer's exact one is this one's."""
    from vramfit.memory import stack_alias
    from vramfit.memory.template_compose import BODY_OPTIMS
    from vramfit.model import cache

    def lookup(st):
        def key(versions=None):
            return cache.template_digest(template_key(spec, st, versions=versions), "post", POST_FORMAT)

        def check(tpl) -> bool:  # the installed stack records what the template expands to (LB layers)
            from vramfit.memory.template import expand
            from vramfit.memory.template_build import LB, same_events

            return same_events(expand(tpl, st.micro_batch, st.seq_len, st.lora_r, LB), _post_real(spec, st, LB))

        got = cache.load_template(key())
        return got if got is not None else stack_alias.aliased(key, check)[0]

    entry = lookup(s)
    if entry is None and not (s.liger or s.packing or s.activation_offloading):
        for opt in BODY_OPTIMS:
            other = lookup(replace(s, optim=opt)) if opt != s.optim else None
            if other is not None and other.get("exact"):
                return other
    return entry


def _post_tiles(spec, setup: Setup, targets, eval_batch: int | None) -> dict | None:
    """The post-training template at >= 4 token tiles of trl's fused loss where each tile count is a template
    of its own (the evaluation's forwards run the same tile loop): composed from the cached ones at 2 and 3
    tiles (vramfit.memory.template_tiles), or None."""
    from vramfit.memory.template_tiles import from_bases

    s = eval_setup(setup, eval_batch)
    return from_bases(spec, s, 1, lambda seq: post_template(spec, replace(setup, seq_len=seq), targets, eval_batch,
                                                            build=False)["template"])


def post_stream(spec, setup: Setup, targets, eval_batch: int | None = None, build: bool = True) -> dict:
    """The rest of the run after the steps at `setup` (evaluation at `eval_batch`, a checkpoint save):
    {"events", "marks", "source"} from its template (torch-free) or recorded on the meta device."""
    from vramfit.memory.template import NoTemplate, expand

    s = eval_setup(setup, eval_batch)
    tpl = post_template(spec, setup, targets, eval_batch, build)["template"]
    if tpl is not None:
        marks = {}
        try:
            events = expand(tpl, s.micro_batch, s.seq_len, s.lora_r, spec.num_layers, 1, marks)
            return dict(_post_part(events, marks), source="template")
        except (NoTemplate, KeyError, IndexError, TypeError, ValueError):
            pass
    from vramfit.memory.events import training_events

    res = training_events(spec, s, targets, steps=0, after=True)
    return {"events": res["after"]["events"], "marks": res["after"]["marks"], "source": "recorded"}


def with_host(bd: Breakdown, host: dict | None) -> Breakdown:
    """`bd` with activation offloading's pinned host memory (training_events' "host"), where it offloads."""
    if not host:
        return bd
    gib = 2 ** 30
    note = (f"activation offloading: {host['pinned_bytes'] / gib:.2f} GiB of pinned host memory (torch's caching "
            f"host allocator; live copies at most {host['peak_live_bytes'] / gib:.2f} GiB, "
            f"{host['offloaded_bytes'] / gib:.2f} GiB copied to the host over the replayed steps)")
    return replace(bd, host_bytes=int(host["pinned_bytes"]), notes=bd.notes + (note,))


def with_phases(bd: Breakdown, result: dict, c: Constants, note: str) -> Breakdown:
    """`bd` with the whole run's peaks from `replay_phases`' result (load, the steps, evaluation, saving):
    `phases` the replayed allocated peak of each, `peak_phase` the largest, and a note with each
    phase's reserved peak."""
    per = run_phases(result)
    comps = dict(bd.components)
    comps["allocator_reserve"] = result["peak_reserved"] - result["peak_allocated"]
    peak_phase = max(per, key=lambda k: per[k][0])
    reserved = ", ".join(f"{k} {v[1] / 2**30:.2f}" for k, v in per.items())
    return replace(bd, components=comps, peak_allocated_bytes=result["peak_allocated"],
                   peak_reserved_bytes=result["peak_reserved"],
                   device_bytes=result["peak_reserved"] + c.cuda_context_bytes + c.kernel_growth_bytes,
                   phases={k: v[0] for k, v in per.items()}, peak_phase=peak_phase,
                   notes=bd.notes + (f"replayed reserved peaks by phase (GiB): {reserved}", note))


@_quiet
def replayed_breakdown(spec, setup: Setup, targets, bd: Breakdown, c: Constants,
                       eval_batch: int | None = None) -> Breakdown:
    """`bd` with the whole run's peaks replayed through the allocator model (load, two steps, evaluation,
    a checkpoint save): from the setup's event templates where they exist or can be built, else from the
    real replay (`simulated_breakdown`), saying so."""
    sim, note = template_replay(spec, setup, targets, eval_batch=eval_batch)
    if sim is None:
        out = simulated_breakdown(spec, setup, targets, bd, c, eval_batch=eval_batch)
        return replace(out, notes=out.notes + (f"{note}: replayed on the meta device instead",))
    return with_phases(bd, sim, c, note)
