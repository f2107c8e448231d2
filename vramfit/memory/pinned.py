"""Pinned event streams: the meta-device replay's two Trainer steps of one exact setup, kept on disk.

Where a setup has no event template (vramfit.memory.template_cache: the builder refuses its stream, e.g.
Adafactor's deferred frees, or activation offloading, whose recording follows the allocator model's
block addresses), the plan's capped replay and the estimate's replay record it on the meta device:
seconds for a small model, minutes for an 8B one offloading its activations.  The recorded stream is
kept here, keyed by everything it was recorded from, so the next replay of the very same setup reads it
instead (vramfit.memory.replay: `_replay_events`, `simulated_breakdown`):

- the setup's template key (the config, the discrete setup, its regime, the traced libraries'
  versions and the replay's code: vramfit.memory.template_cache.template_key);
- the whole setup (every field: micro-batch, sequence, rank, accumulation, allocator, ...), the
  targets and the replay's extras (packing's example length);
- under activation offloading also the allocator model's and the offloading model's code, which the
  recording reads (trl keys saved tensors by their storage's address).

Nothing is interpolated: a pinned stream answers only its own setup, exactly as the replay it came
from did.  The user cache keeps every stream that took longer than PIN_SECONDS to record; the bundle
ships those of the bundled plans (vramfit.bundle).  Entries live under `streams/` of the cache.
"""

from __future__ import annotations

import array
import base64
import itertools
import lzma
import os

from vramfit.model import cache

# a stream recorded faster than this is not kept (reading one back costs ~0.05-0.2 s)
PIN_SECONDS = 1.0
# the user cache keeps at most this much of them, the least recently written dropped first (an 8B model's
# offloading stream, 600k events, is ~5 KB encoded; its JSON host copy table ~0.1 MB)
PIN_BUDGET_BYTES = 256 << 20
FORMAT = 2  # 2: the events in columns, LZMA-compressed (an 8B stream of 600k events: 11 MB of JSON -> ~5 KB)
KEY = 1  # what the key is made of (below); the entry's FORMAT is checked when it is read
_ALLOCATOR_SOURCES = ("memory/allocator.py", "memory/offload.py")


def pinned_key(spec, setup, targets, extras: tuple = (), run: tuple = ()) -> str:
    """`run`: how training_events was asked beyond two steps of the setup (the estimate's: the rest of the
    run, its evaluation micro-batch, the steps' padded lengths)."""
    from vramfit.memory.template_cache import template_key
    from vramfit.versions import source_digest

    parts = [template_key(spec, setup, setup.grad_accum), repr(setup), list(targets), list(extras), KEY]
    if run:
        parts.append(list(run))
    if setup.activation_offloading:
        parts.append(source_digest(*_ALLOCATOR_SOURCES))
    return cache.template_digest(*parts)


def _path(key: str):
    return cache.cache_dir() / "streams" / f"{key}.json"


def enabled() -> bool:
    """VRAMFIT_PIN_STREAMS=off: neither read nor kept (a measurement of the replay itself)."""
    return os.environ.get("VRAMFIT_PIN_STREAMS", "on") != "off"


def load(key: str) -> dict | None:
    """The pinned stream {events, marks, host?} of `key` from the user cache or the bundle, or None."""
    if not enabled():
        return None
    data = cache._read(_path(key))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    if not isinstance(data.get("events"), dict):
        return None
    out = _Stream(marks=dict(data["marks"]), pin=key)
    out.packed = data["events"]
    after = data.get("after")
    if isinstance(after, dict):  # the rest of the run (training_events(after=True)), decoded now
        out["after"] = {"events": decode(after["events"]), "marks": dict(after["marks"])}
    if data.get("host") is not None:  # JSON made the streams' allocation ids strings
        out["host"] = dict(data["host"], streams={int(k): v for k, v in (data["host"].get("streams") or {}).items()})
    return out


class _Stream(dict):
    """A pinned stream: its events decoded when first asked for (a plan whose verdicts are kept needs the
    marks alone)."""

    packed: dict = {}

    def __missing__(self, name):
        if name != "events":
            raise KeyError(name)
        self["events"] = decode(self.packed)
        return self["events"]


def store(key: str, result: dict, seconds: float, setup=None) -> bool:
    """Keep a recorded stream that took `seconds` (only where that is worth a read; -> whether it was);
    `setup` is named in the entry for whoever reads the cache."""
    if not enabled() or seconds < PIN_SECONDS:
        return False
    entry = {"format": FORMAT, "setup": repr(setup), "seconds": round(seconds, 1), "marks": result["marks"],
             "events": encode(result["events"])}
    if result.get("host") is not None:
        entry["host"] = result["host"]
    if result.get("after") is not None:
        entry["after"] = {"events": encode(result["after"]["events"]), "marks": result["after"]["marks"]}
    path = _path(key)
    cache._write(path, entry)
    _trim(path.parent)
    return True


# The allocator model's verdict over a pinned stream, under one cap: kept too (a few numbers), keyed by the
# stream's key, the cap and the code that simulates it -- a plan that steps down through an 8B model's
# offloading setups simulates ~3 million events otherwise (~10 s on a 2-core CPU).
_SIM_SOURCES = ("memory/allocator.py", "memory/offload.py", "memory/replay.py")


def _sim_path(stream_key: str, limit_bytes: int, initial_allocated: int, expandable: bool):
    from vramfit.versions import source_digest

    key = cache.template_digest(stream_key, int(limit_bytes), int(initial_allocated), bool(expandable),
                                source_digest(*_SIM_SOURCES), KEY)
    return cache.cache_dir() / "streams" / "sim" / f"{key}.json"


def load_sim(stream_key: str, limit_bytes: int, initial_allocated: int, expandable: bool) -> dict | None:
    if not enabled():
        return None
    data = cache._read(_sim_path(stream_key, limit_bytes, initial_allocated, expandable))
    return data if isinstance(data, dict) and "peak_reserved" in data else None


def store_sim(stream_key: str, limit_bytes: int, initial_allocated: int, expandable: bool, sim: dict) -> None:
    if enabled():
        cache._write(_sim_path(stream_key, limit_bytes, initial_allocated, expandable), sim)


def _trim(folder) -> None:
    try:
        kept = sorted(((st.st_mtime, st.st_size, p) for p in folder.glob("*.json") for st in [p.stat()]), reverse=True)
    except OSError:
        return
    total = 0
    for _, size, p in kept:
        total += size
        if total > PIN_BUDGET_BYTES:
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the events' encoding
# An event is (kind, id, size, ...): a one-letter kind and integers.  Kept as columns -- the kinds, each
# event's length, the ids as differences from the one before, the other integers in order -- and the
# whole LZMA-compressed: a training stream repeats per layer, which LZMA finds.


def encode(events: list) -> dict:
    kinds, lengths = [], bytearray()
    ids, rest = array.array("q"), array.array("q")
    prev = 0
    for ev in events:
        kinds.append(ev[0])
        lengths.append(len(ev))
        if len(ev) > 1:
            ids.append(ev[1] - prev)
            prev = ev[1]
            rest.extend(ev[2:])
    kind_bytes = "".join(kinds).encode()
    if len(kind_bytes) != len(events):
        raise ValueError("an event kind is not one letter")
    raw = kind_bytes + bytes(lengths) + ids.tobytes() + rest.tobytes()
    return {"codec": "lzma-columns", "n": len(events), "ids": len(ids),
            "data": base64.b64encode(lzma.compress(raw, preset=6)).decode()}


def decode(packed: dict) -> list:
    if packed.get("codec") != "lzma-columns":
        raise ValueError(f"unknown codec {packed.get('codec')!r}")
    raw = lzma.decompress(base64.b64decode(packed["data"]))
    n, m = packed["n"], packed["ids"]
    kinds, lengths = raw[:n].decode(), raw[n:2 * n]
    ids = array.array("q")
    ids.frombytes(raw[2 * n:2 * n + 8 * m])
    rest = array.array("q")
    rest.frombytes(raw[2 * n + 8 * m:])
    id_iter, rest_iter = itertools.accumulate(ids), iter(rest)
    out = []
    for kind, length in zip(kinds, lengths):
        if length == 3:
            out.append((kind, next(id_iter), next(rest_iter)))
        elif length == 2:
            out.append((kind, next(id_iter)))
        elif length == 1:
            out.append((kind,))
        else:
            out.append((kind, next(id_iter), *itertools.islice(rest_iter, length - 2)))
    return out
