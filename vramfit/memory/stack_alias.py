"""Event templates traced under another library stack, used where the installed one is checked to record the same.

A template's key names the versions of the libraries it was traced under (torch, transformers, peft, trl,
accelerate: vramfit.memory.template_cache.template_key), so a new release of any of them misses every
bundled template: each setup would be built again (20-170 s) or replayed for real (seconds to minutes).
Most releases do not change what a training step allocates.  Here a template of a stack the bundle was
traced under (`traced_stacks`, the bundle's stacks.json) answers for the installed stack once the
installed stack is checked to record the same (the caller's `check`: template_cache's for the training steps,
replay's for the post-training stream): the stream is recorded now on the meta device on the model shrunk to
the template builder's LB decoder layers, at the setup's own micro-batch, sequence length and rank, and must
equal the template's expansion there, event for event (the builder's own check,
vramfit.memory.template_build.same_events); ~0.3-1 s after torch, transformers and peft are imported.  A template is exact at every shape of its regime
under the stack it was traced under; the check asks whether the installed stack's code records that same
stream, on the layers and at the shape the question is about.

The verdict (same or not) is kept per (installed stack, template) in the cache's `stacks/` folder; the
bundle ships those of the stack current when it was packed, so that stack needs no check at all.  A
template that differs is not used: the setup's own template is built, or the replay answers, as for any
setup without one.  Specs, activation profiles and pinned streams are not aliased: they are computed
again under a new stack (the bundle ships those of the stack current when it was packed).
VRAMFIT_STACK_ALIAS=off turns this off.
"""

from __future__ import annotations

import os

from vramfit.model import cache

STACK = ("torch", "transformers", "peft", "trl", "accelerate")  # what template_key names
_verdicts: dict = {}  # {(installed stack, traced key): same}


def enabled() -> bool:
    return os.environ.get("VRAMFIT_STACK_ALIAS", "on") != "off"


def installed_stack() -> dict:
    from vramfit.versions import installed

    return installed(*STACK)


def traced_stacks() -> list:
    """The stacks other than the installed one that cached templates may have been traced under (the
    cache's stacks.json, user cache else bundle: {"traced": [{package: version}, ...]}, newest first; read
    on a template's miss only)."""
    data = cache._read(cache.cache_dir() / "stacks.json")
    here = installed_stack()
    return [s for s in (data.get("traced", []) if isinstance(data, dict) else []) if isinstance(s, dict) and s != here]


def _verdict_path(traced_key: str):
    return cache.cache_dir() / "stacks" / f"{cache.template_digest(installed_stack(), traced_key)}.json"


def verdict(traced_key: str) -> bool | None:
    """Whether the installed stack records what the template under `traced_key` expands to: True / False,
    None where not yet checked."""
    memo = (tuple(installed_stack().items()), traced_key)
    if memo in _verdicts:
        return _verdicts[memo]
    data = cache._read(_verdict_path(traced_key))
    got = data.get("same") if isinstance(data, dict) and data.get("traced") == traced_key else None
    if got is not None:
        _verdicts[memo] = bool(got)
    return got


def keep_verdict(traced_key: str, same: bool) -> None:
    _verdicts[(tuple(installed_stack().items()), traced_key)] = same
    cache._write(_verdict_path(traced_key), {"same": same, "traced": traced_key, "stack": installed_stack()})


def aliased(key_of, check) -> tuple:
    """The entry of another traced stack that answers for the installed one: `key_of(versions)` is the
    entry's cache key under those versions, `check(template) -> bool` records the setup under the installed
    stack and compares (called only where no verdict is kept; it may raise, which counts as different).
    -> (entry, traced key) or (None, None).  An entry without a template (the builder could not build one)
    answers as it is: its setup is replayed for real under any stack."""
    if not enabled():
        return None, None
    for versions in traced_stacks():
        key = key_of(versions)
        entry = cache.load_template(key)
        if entry is None:
            continue
        if not entry.get("exact"):
            return entry, key
        same = verdict(key)
        if same is None:
            try:
                same = bool(check(entry["template"]))
            except Exception:  # noqa: BLE001  the check could not record or expand it: not the same
                same = False
            keep_verdict(key, same)
        if same:
            return entry, key
    return None, None
