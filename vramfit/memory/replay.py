"""The allocator replay: training steps' allocation events (vramfit.memory.events) replayed through
the caching allocator model (vramfit.memory.allocator) for the reserved and nvidia-smi peaks."""

from __future__ import annotations

from dataclasses import replace

from vramfit.memory.constants import DEFAULT, Constants
from vramfit.memory.setup import Setup
from vramfit.memory.walk import Breakdown


def simulated_breakdown(spec, setup: Setup, targets, bd: Breakdown, c: Constants, seq_lens=None) -> Breakdown:
    """`bd` with its three peaks from the allocator simulation, or with a note saying why not.
    `seq_lens`: one padded batch length per replayed step (real data), instead of two steps at
    `setup.seq_len`."""
    import time

    from vramfit.memory.events import training_events
    from vramfit.memory.kernels import Unsupported
    from vramfit.memory.allocator import simulate

    started = time.perf_counter()
    try:
        # two steps: measured reserved is flat from the second step on (optimizer states exist), and
        # 2- and 3-step replays gave the same peaks on the 7 cases compared
        ev = training_events(spec, setup, targets, steps=2, seq_lens=seq_lens)
    except Unsupported as exc:
        return replace(bd, notes=bd.notes + (f"the allocator simulation does not cover {exc} yet: the reserve is "
                                             "the fitted one",))
    sim = simulate(ev["events"], expandable_segments=setup.allocator == "expandable")
    comps = dict(bd.components)
    comps["allocator_reserve"] = sim["peak_reserved"] - sim["peak_allocated"]
    outside = c.cuda_context_bytes + c.kernel_growth_bytes
    steps = f"{len(seq_lens)} steps of the data's padded batch lengths" if seq_lens else "2 steps"
    note = (f"reserved and device peaks from the allocator simulation: {len(ev['events']):,} allocations and "
            f"frees of {steps} replayed in {time.perf_counter() - started:.1f} s")
    return replace(bd, components=comps, peak_allocated_bytes=sim["peak_allocated"],
                   peak_reserved_bytes=sim["peak_reserved"], device_bytes=sim["peak_reserved"] + outside,
                   notes=bd.notes + (note,))


# capped replays of this process: events per (spec, setup, targets), a few kept (a large model's
# two steps are a few hundred thousand tuples); results per (that, cap, initial bytes), all kept
_REPLAY_EVENTS: dict = {}
_REPLAY_EVENTS_KEPT = 6
_REPLAY_RESULTS: dict = {}


def _replay_events(spec, setup: Setup, targets) -> dict:
    from vramfit.memory.events import training_events

    key = (id(spec), setup, tuple(targets))
    hit = _REPLAY_EVENTS.pop(key, None)
    if hit is None:
        # two optimizer steps (each with its accumulation's micro-batches): reserved is flat from
        # the second on, as in simulated_breakdown
        hit = (spec, training_events(spec, setup, targets, steps=2, grad_accum=setup.grad_accum))
    _REPLAY_EVENTS[key] = hit  # most recently used last
    while len(_REPLAY_EVENTS) > _REPLAY_EVENTS_KEPT:
        _REPLAY_EVENTS.pop(next(iter(_REPLAY_EVENTS)))
    return hit[1]


def _template_events(spec, setup: Setup, targets) -> dict | None:
    """Two steps' events (and marks) at `setup`, with its accumulation, from a cached exact event
    template (none is built here), or None."""
    from vramfit.memory.template import NoTemplate, expand

    tpl = setup_template(spec, setup, targets, setup.grad_accum, build=False)["template"]
    if tpl is None:
        return None
    marks = {}
    try:
        events = expand(tpl, setup.micro_batch, setup.seq_len, setup.lora_r, spec.num_layers, setup.grad_accum, marks)
    except (NoTemplate, KeyError, IndexError, TypeError, ValueError):
        return None
    return {"events": events, "marks": marks}


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

    from vramfit.memory.allocator import simulate

    c = constants or DEFAULT
    key = (id(spec), setup, tuple(targets), int(limit_bytes), int(initial_allocated), templates)
    hit = _REPLAY_RESULTS.get(key)
    if hit is not None and hit[0] is spec:
        return dict(hit[1], cached=True)
    started = time.perf_counter()
    ev = _template_events(spec, setup, targets) if templates else None
    if ev is None:
        ev = _replay_events(spec, setup, targets)
    sim = simulate(ev["events"], expandable_segments=setup.allocator == "expandable",
                   limit_bytes=int(limit_bytes), initial_allocated=int(initial_allocated))
    phase = None
    if sim["oom"]:
        phase = max(((at, name) for name, at in ev["marks"].items() if at <= max(sim["oom_at"], 0)),
                    default=(0, "load"))[1]
    out = {"fits": not sim["oom"], "oom": sim["oom"], "oom_at": sim["oom_at"], "oom_phase": phase,
           "peak_allocated_bytes": sim["peak_allocated"], "peak_reserved_bytes": sim["peak_reserved"],
           "device_bytes": sim["peak_reserved"] + c.cuda_context_bytes + c.kernel_growth_bytes,
           "num_alloc_retries": sim["num_alloc_retries"], "limit_bytes": int(limit_bytes),
           "events": len(ev["events"]), "seconds": time.perf_counter() - started, "cached": False}
    _REPLAY_RESULTS[key] = (spec, out)
    return dict(out)


# --------------------------------------------------------------------------- the replay from templates
# (vramfit.memory.template): the same events, expanded without torch from a template built once per
# discrete setup and regime, checked against the real replay before it is kept

# the code whose behaviour a template freezes: an edit to any of these rebuilds the templates
_REPLAY_SOURCES = ("memory/events.py", "memory/kernels.py", "memory/template.py", "memory/template_build.py",
                   "memory/template_record.py", "model/emulate.py", "model/trace.py", "model/spec.py")


def _code_digest() -> str:
    import hashlib
    from pathlib import Path

    global _CODE
    if _CODE is None:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for rel in _REPLAY_SOURCES:
            try:
                h.update((root / rel).read_bytes())
            except OSError:
                h.update(rel.encode())
        _CODE = h.hexdigest()[:16]
    return _CODE


_CODE = None


def template_key(spec, setup: Setup, grad_accum: int = 1) -> str:
    """The cache digest of `setup`'s template: the config, the setup's discrete fields, its regime,
    the libraries traced and the replay's code."""
    from vramfit.memory.template import FORMAT, regime, regime_info
    from vramfit.model import cache
    from vramfit.versions import installed

    discrete = (setup.method, setup.precision, setup.optim, setup.attn, setup.loss, setup.padded, setup.grad_ckpt,
                setup.targets if setup.method != "full" else "", setup.method != "full" and setup.lora_dropout > 0,
                setup.double_quant, setup.quant_type)
    versions = installed("torch", "transformers", "peft", "trl", "accelerate")
    reg = regime(regime_info(spec, setup), setup.micro_batch, setup.seq_len, grad_accum,
                 setup.lora_r if setup.method != "full" else 0)
    return cache.template_digest(spec.config_hash, discrete, reg, versions, _code_digest(), FORMAT)


def setup_template(spec, setup: Setup, targets, grad_accum: int = 1, build: bool = True) -> dict:
    """The setup's event template: {"template"} from the user cache or the bundle, or, with
    `build`, built now (torch, ~10-60 s), checked against the real replay at this very setup and
    cached, exact or not: then {"template" (None if not exact), "first": (the real replay's
    simulate result, training_events' result), "note"}; {"template": None, "note"} where none."""
    from vramfit.memory.kernels import Unsupported
    from vramfit.memory.template import NoTemplate
    from vramfit.model import cache

    key = template_key(spec, setup, grad_accum)
    entry = cache.load_template(key)
    if entry is not None:
        if entry.get("exact"):
            return {"template": entry["template"], "note": ""}
        return {"template": None, "note": f"no event template: {entry.get('reason', 'not exact')}"}
    if not build:
        return {"template": None, "note": "no event template cached for this setup"}
    from vramfit.memory.template_build import build as build_template
    from vramfit.memory.template_build import check_full_size

    try:
        tpl = build_template(spec, setup, setup.micro_batch, setup.seq_len, grad_accum)
    except (NoTemplate, Unsupported) as exc:
        cache.store_template(key, {"exact": False, "reason": str(exc)})
        return {"template": None, "note": f"no event template: {exc}"}
    except Exception as exc:  # noqa: BLE001  the builder's own failure: not cached, the real replay answers
        return {"template": None, "note": f"building the event template failed ({type(exc).__name__}: {exc})"}
    ok, sim, res, why = check_full_size(tpl, spec, setup, targets, grad_accum)
    cache.store_template(key, {"exact": True, "template": tpl} if ok else {"exact": False, "reason": why})
    if sim is None:
        return {"template": None, "note": f"no event template: {why}"}
    note = (f"the event template built for this setup ({tpl['build']['seconds']:.0f} s) "
            + ("reproduced the real replay exactly and is cached" if ok else f"did not ({why}) and is not used"))
    return {"template": tpl if ok else None, "first": (sim, res), "note": note}


def template_replay(spec, setup: Setup, targets, build: bool = True) -> tuple:
    """(simulate's result over two steps at `setup`, grad_accum 1 as `simulated_breakdown`, a note)
    from the setup's template, or (None, why not)."""
    import time

    from vramfit.memory.template import NoTemplate, replay

    started = time.perf_counter()
    got = setup_template(spec, setup, targets, 1, build)
    if "first" in got:  # built now: the real replay it was checked against is the answer
        sim, res = got["first"]
        return sim, (f"reserved and device peaks from the allocator simulation of {len(res['events']):,} allocations "
                     f"and frees of 2 steps; {got['note']}")
    tpl = got["template"]
    if tpl is None:
        return None, got["note"]
    try:
        sim = replay(tpl, setup.micro_batch, setup.seq_len, setup.lora_r, spec.num_layers,
                     expandable=setup.allocator == "expandable")
    except (NoTemplate, KeyError, IndexError, TypeError, ValueError) as exc:
        return None, f"the event template does not expand here ({type(exc).__name__}: {exc})"
    return sim, (f"reserved and device peaks from the allocator simulation of {sim['events']:,} allocations and "
                 f"frees of 2 steps, expanded from the setup's event template in {time.perf_counter() - started:.2f} s")


def replayed_breakdown(spec, setup: Setup, targets, bd: Breakdown, c: Constants) -> Breakdown:
    """`bd` with its three peaks replayed through the allocator model: from the setup's event template
    where one exists or can be built, else from the real replay (`simulated_breakdown`), saying so."""
    sim, note = template_replay(spec, setup, targets)
    if sim is None:
        out = simulated_breakdown(spec, setup, targets, bd, c)
        return replace(out, notes=out.notes + (f"{note}: replayed on the meta device instead",))
    comps = dict(bd.components)
    comps["allocator_reserve"] = sim["peak_reserved"] - sim["peak_allocated"]
    outside = c.cuda_context_bytes + c.kernel_growth_bytes
    return replace(bd, components=comps, peak_allocated_bytes=sim["peak_allocated"],
                   peak_reserved_bytes=sim["peak_reserved"], device_bytes=sim["peak_reserved"] + outside,
                   notes=bd.notes + (note,))
