"""On-disk cache of model specs and activation profiles, so a repeated estimate skips torch.

Keyed by the config's hash and the versions of the libraries whose code the census and the
trace read (transformers, peft): a new version recomputes.  Location: $VRAMFIT_CACHE_DIR, else
~/.cache/vramfit.  A corrupt or unreadable entry is ignored and rebuilt.

profiles/cache.zip ships the same entries (one zip member per entry, same relative paths), made
by the same code (`python -m vramfit.bundle`), for the bundled profiles at the
default setups, so a first `vramfit estimate` on a bundled profile needs no torch import when the
installed versions are the ones they were made with; with other versions the keys differ and
nothing stale is read (tests/test_cache.py recomputes them).  Event templates of another stack may
answer where the installed one is checked to record the same (vramfit.memory.stack_alias).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("VRAMFIT_CACHE_DIR") or Path.home() / ".cache" / "vramfit")


@functools.lru_cache(maxsize=1)
def _versions() -> str:
    from vramfit.versions import installed

    return ",".join(f"{pkg}={v or 'none'}" for pkg, v in installed("transformers", "peft").items()) + ",format=10"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


BUNDLED_ZIP = Path(__file__).resolve().parents[2] / "profiles" / "cache.zip"


@functools.lru_cache(maxsize=2)
def _bundle(path: Path) -> zipfile.ZipFile | None:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile):
        return None


def _read(path: Path):
    """An entry from the user cache, else from the bundled one (same relative path)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    bundle = _bundle(BUNDLED_ZIP)
    if bundle is None:
        return None
    try:
        return json.loads(bundle.read(path.relative_to(cache_dir()).as_posix()))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return None


def _write(path: Path, data) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs speed


_specs: dict = {}
_profiles: dict = {}


def _spec_path(config_hash: str) -> Path:
    return cache_dir() / "specs" / f"{_digest(config_hash, _versions())}.json"


def load_spec(config_hash: str, build):
    """The spec of a config (by its hash) from memory, the user cache or the bundle; `build(data)`
    turns the stored fields back into a ModelSpec (vramfit.model.spec owns the type)."""
    if config_hash in _specs:
        return _specs[config_hash]
    data = _read(_spec_path(config_hash))
    if not data:
        return None
    try:
        spec = build(data)
    except (TypeError, KeyError, ValueError):
        return None
    _specs[config_hash] = spec
    return spec


def store_spec(spec) -> None:
    _specs[spec.config_hash] = spec
    data = dataclasses.asdict(spec)
    data.pop("config")
    _write(_spec_path(spec.config_hash), data)


def _key_fields(key) -> dict:
    """The trace key as digested: fields added later are left out at their default, so the
    profiles cached (and bundled) before them keep their names."""
    fields = dataclasses.asdict(key)
    for name, default in (("kv_repeated", False), ("kbit_prep", True), ("adapter_dtype", None)):
        if fields.get(name, default) == default:
            fields.pop(name, None)
    return fields


def _profile_path(spec, key, needs_input_grad: bool) -> Path:
    return cache_dir() / "profiles" / f"{_digest(spec.config_hash, _key_fields(key), needs_input_grad, _versions())}.json"


def load_profile(spec, key, needs_input_grad: bool, build):
    """An activation profile from memory, the user cache or the bundle; `build(data)` turns the
    stored fields back into an ActivationProfile (vramfit.model.trace owns the type)."""
    mem_key = (spec.config_hash, key, needs_input_grad)
    if mem_key in _profiles:
        return _profiles[mem_key]
    data = _read(_profile_path(spec, key, needs_input_grad))
    if not data:
        return None
    try:
        prof = build(data)
    except (TypeError, KeyError):
        return None
    _profiles[mem_key] = prof
    return prof


def store_profile(spec, key, needs_input_grad: bool, prof) -> None:
    _profiles[(spec.config_hash, key, needs_input_grad)] = prof
    _write(_profile_path(spec, key, needs_input_grad), dataclasses.asdict(prof))


# --------------------------------------------------------------------------- event templates
# (vramfit.memory.template): keyed by what the caller digests (config, the setup's discrete fields,
# the regime, the versions and the replay's own code), one JSON entry each, user cache then bundle

_templates: dict = {}


def _template_path(digest: str) -> Path:
    return cache_dir() / "templates" / f"{digest}.json"


def template_digest(*parts) -> str:
    return _digest(*parts)


def load_template(digest: str):
    if digest in _templates:
        return _templates[digest]
    data = _read(_template_path(digest))
    if not isinstance(data, dict):
        return None
    _templates[digest] = data
    return data


def store_template(digest: str, entry: dict) -> None:
    _templates[digest] = entry
    _write(_template_path(digest), entry)
