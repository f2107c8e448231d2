"""Which event template (vramfit.memory.template) a setup has: its cache key (the config, the setup's discrete
fields, its regime, the traced libraries' versions and the replay's code) and `setup_template`: from the user
cache or the bundle, composed from other cached ones (vramfit.memory.template_tiles, template_compose), or built
now and checked against the real replay at the setup itself before it is kept."""

from __future__ import annotations

import functools

from vramfit.memory.setup import Setup

# the code whose behaviour a template freezes, an edit to any of which rebuilds the templates: what the replay
# records and how a template expands.  The builder (template_build, template_record) is not part of it: a
# template is checked against the real replay before it is kept (at shapes it was not fitted on, and at full
# size), so an edit to the builder leaves the templates made before as exact as they were, and an entry it
# could not build is retried by a newer builder (template_build.BUILDER).  So that the keys made while the
# builder was part of the key keep their value, the key hashes the builder's sources as they were when it
# left (template_key_builder.zip) where they stood in the list.
_REPLAY_SOURCES = ("memory/events.py", "memory/kernels.py", "memory/template.py", "memory/template_build.py",
                   "memory/template_record.py", "model/emulate.py", "model/trace.py", "model/spec.py")
_BUILDER_SOURCES = ("memory/template_build.py", "memory/template_record.py")


@functools.cache
def _code_digest() -> str:
    """16 hex digits of sha256 over _REPLAY_SOURCES, the builder's as frozen (see above)."""
    import hashlib
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with zipfile.ZipFile(Path(__file__).with_name("template_key_builder.zip")) as z:
        frozen = {rel: z.read(rel) for rel in _BUILDER_SOURCES}
    h = hashlib.sha256()
    for rel in _REPLAY_SOURCES:
        h.update(frozen[rel] if rel in frozen else (root / rel).read_bytes())
    return h.hexdigest()[:16]


def template_key(spec, setup: Setup, grad_accum: int = 1, exact_tiles: bool = False,
                 versions: dict | None = None) -> str:
    """The cache digest of `setup`'s template: the config, the setup's discrete fields, its regime,
    the libraries traced and the replay's code.  `exact_tiles`: the fused loss's own tile count in
    the regime even where one template serves every count >= 2 (template.tiles_general).  `versions`:
    the traced libraries' ({package: version}, vramfit.memory.stack_alias.STACK), default the installed."""
    from vramfit.memory.template import FORMAT, regime, regime_info
    from vramfit.model import cache
    from vramfit.versions import installed

    discrete = (setup.method, setup.precision, setup.optim, setup.attn, setup.loss, setup.padded, setup.grad_ckpt,
                setup.targets if setup.method != "full" else "", setup.method != "full" and setup.lora_dropout > 0,
                setup.double_quant, setup.quant_type)
    if setup.method == "qlora" and not setup.kbit_prep:  # a key with it is as it was
        discrete += ("no-kbit-prep",)
    if setup.method == "qlora" and setup.loss == "fused" and not setup.trl_adapter_cast:  # the old harness runs'
        discrete += ("fp32-adapters",)
    if setup.liger or setup.packing or setup.activation_offloading:  # a lever-free key is as it was
        from vramfit.memory.levers import key_part

        discrete += key_part(setup)
    if versions is None:
        versions = installed("torch", "transformers", "peft", "trl", "accelerate")
    reg = regime(regime_info(spec, setup, exact_tiles), setup.micro_batch, setup.seq_len, grad_accum,
                 setup.lora_r if setup.method != "full" else 0)
    return cache.template_digest(spec.config_hash, discrete, reg, versions, _code_digest(), FORMAT)


NOT_CACHED = "no event template cached for this setup"


def _records_as(spec, setup: Setup, grad_accum: int = 1):
    """-> check(template): whether the installed library stack records what the template (traced under another
    stack) expands to, on the builder's LB decoder layers at the setup's own shape, 2 micro-batches where it
    accumulates (vramfit.memory.stack_alias)."""

    def check(tpl) -> bool:
        from vramfit.memory.template_build import LB, _real_events, same_events
        from vramfit.memory.template_compose import expand_any

        a = 2 if grad_accum > 1 else 1
        b, s, r = setup.micro_batch, setup.seq_len, setup.lora_r
        return same_events(expand_any(tpl, b, s, r, LB, a), _real_events(spec, setup, LB, a))

    return check


def setup_template(spec, setup: Setup, targets, grad_accum: int = 1, build: bool = True,
                   exact_tiles: bool = False, compose: bool = True) -> dict:
    """The setup's event template: {"template"} from the user cache or the bundle, or, with
    `build`, built now (torch, ~10-60 s), checked against the real replay at this very setup and
    cached, exact or not: then {"template" (None if not exact), "first": (the real replay's
    simulate result, training_events' result), "note"}; {"template": None, "note"} where none.
    The fused loss's template for every tile count >= 2 (template.tiles_general) is tried first;
    where it cannot be built (the tile loops allocate after all), its entry says so ("tiles": "exact")
    and the template of this very tile count answers (`exact_tiles`), as for the other setups.
    `compose`: where none is cached, one composed from cached templates of other tile counts of trl's
    fused loss (vramfit.memory.template_tiles) or of other optimizers (vramfit.memory.template_compose)
    answers before any build; an entry an older builder could not build is built again where `build`."""
    if compose:
        got = setup_template(spec, setup, targets, grad_accum, False, exact_tiles, compose=False)
        if got["note"] == NOT_CACHED:
            from vramfit.memory.template_compose import composed
            from vramfit.memory.template_tiles import tile_composed

            def plain(s, ga):
                return setup_template(spec, s, targets, ga, False, compose=False)["template"]

            def cached(s, ga):  # its own, or composed along the fused loss's tiles
                return plain(s, ga) or tile_composed(spec, s, ga, template_key(spec, s, ga), plain)

            key = template_key(spec, setup, grad_accum)
            tpl = tile_composed(spec, setup, grad_accum, key, plain) or composed(spec, setup, grad_accum, key, cached)
            if tpl is not None:
                return {"template": tpl, "note": ""}
        if not build or got["note"] != NOT_CACHED and not got.get("stale"):
            return got
        return setup_template(spec, setup, targets, grad_accum, True, exact_tiles, compose=False)
    from vramfit.memory.kernels import Unsupported
    from vramfit.memory.template import TILES_GENERAL, NoTemplate, regime, regime_info
    from vramfit.model import cache

    if setup.activation_offloading:
        return {"template": None, "note": "no event template for activation offloading (its host copies are "
                                          "recorded on the meta device only)"}
    general = regime(regime_info(spec, setup, exact_tiles), setup.micro_batch, setup.seq_len)[3] == TILES_GENERAL
    from vramfit.memory.template_build import BUILDER

    key = template_key(spec, setup, grad_accum, exact_tiles)
    entry = cache.load_template(key)
    if entry is None:  # one traced under another library stack, where the installed one records the same
        from vramfit.memory import stack_alias

        entry, _ = stack_alias.aliased(lambda v: template_key(spec, setup, grad_accum, exact_tiles, v),
                                       _records_as(spec, setup, grad_accum))
    if build and entry is not None and not entry.get("exact") and entry.get("builder", 1) < BUILDER:
        entry = None  # an older builder could not build it: this one tries (a lookup alone keeps the answer)
    if general and (entry.get("tiles") == "exact" if entry is not None else not build):  # the count's own
        return setup_template(spec, setup, targets, grad_accum, build, exact_tiles=True, compose=False)
    if entry is not None:
        if entry.get("exact"):
            return {"template": entry["template"], "note": ""}
        return {"template": None, "note": f"no event template: {entry.get('reason', 'not exact')}",
                **({"stale": True} if entry.get("builder", 1) < BUILDER else {})}
    if not build:
        return {"template": None, "note": NOT_CACHED}
    from vramfit.memory.template_build import build as build_template
    from vramfit.memory.template_build import check_full_size

    try:
        tpl = build_template(spec, setup, setup.micro_batch, setup.seq_len, grad_accum, exact_tiles=exact_tiles)
    except (NoTemplate, Unsupported) as exc:
        general = general and isinstance(exc, NoTemplate)  # then the tile count's own template answers
        cache.store_template(key, {"exact": False, "reason": str(exc), "builder": BUILDER,
                                   **({"tiles": "exact"} if general else {})})
        return setup_template(spec, setup, targets, grad_accum, build, True, compose=False) if general else {
            "template": None, "note": f"no event template: {exc}"}
    except Exception as exc:  # noqa: BLE001  the builder's own failure: not cached, the real replay answers
        return {"template": None, "note": f"building the event template failed ({type(exc).__name__}: {exc})"}
    ok, sim, res, why = check_full_size(tpl, spec, setup, targets, grad_accum)
    general = general and not ok and sim is not None
    cache.store_template(key, {"exact": True, "template": tpl} if ok else
                         {"exact": False, "reason": why, "builder": BUILDER, **({"tiles": "exact"} if general else {})})
    if general:
        return setup_template(spec, setup, targets, grad_accum, build, exact_tiles=True, compose=False)
    if sim is None:
        return {"template": None, "note": f"no event template: {why}"}
    note = (f"the event template built for this setup ({tpl['build']['seconds']:.0f} s) "
            + ("reproduced the real replay exactly and is cached" if ok else f"did not ({why}) and is not used"))
    return {"template": tpl if ok else None, "first": (sim, res), "note": note}
