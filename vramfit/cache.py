"""On-disk cache of model specs and activation profiles, so a repeated estimate skips torch.

Keyed by the config's hash and the versions of the libraries whose code the census and the
trace read (transformers, peft): a new version recomputes.  Location: $VRAMFIT_CACHE_DIR, else
~/.cache/vramfit.  A corrupt or unreadable entry is ignored and rebuilt.

profiles/cache.zip ships the same entries (one zip member per entry, same relative paths), made
by the same code (`python -m vramfit.cache --build-bundled`), for the bundled profiles at the
default setups, so a first `vramfit estimate` on a bundled profile needs no torch import when the
installed versions are the ones they were made with; with other versions the keys differ and
nothing stale is read (tests/test_cache.py recomputes them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
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


BUNDLED_ZIP = Path(__file__).resolve().parent.parent / "profiles" / "cache.zip"


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


def _spec_path(config: dict) -> Path:
    from vramfit.spec import config_hash

    return cache_dir() / "specs" / f"{_digest(config_hash(config), _versions())}.json"


def load_spec(config: dict):
    from vramfit.spec import LinearLayer, ModelSpec, config_hash

    h = config_hash(config)
    if h in _specs:
        return _specs[h]
    data = _read(_spec_path(config))
    if not data:
        return None
    try:
        data["linears"] = tuple(LinearLayer(**l) for l in data["linears"])
        data["param_shapes"] = tuple((tuple(sh), n, r) for sh, n, r in data["param_shapes"])
        data["config"] = config
        spec = ModelSpec(**data)
    except (TypeError, KeyError, ValueError):
        return None
    _specs[h] = spec
    return spec


def store_spec(spec) -> None:
    _specs[spec.config_hash] = spec
    data = dataclasses.asdict(spec)
    data.pop("config")
    _write(_spec_path(spec.config), data)


def _key_fields(key) -> dict:
    """The trace key as digested: fields added later are left out at their default, so the
    profiles cached (and bundled) before them keep their names."""
    fields = dataclasses.asdict(key)
    if not fields.get("kv_repeated"):
        fields.pop("kv_repeated", None)
    return fields


def _profile_path(spec, key, needs_input_grad: bool) -> Path:
    return cache_dir() / "profiles" / f"{_digest(spec.config_hash, _key_fields(key), needs_input_grad, _versions())}.json"


def load_profile(spec, key, needs_input_grad: bool):
    from vramfit.trace import ActivationProfile, Region, shared_regions

    mem_key = (spec.config_hash, key, needs_input_grad)
    if mem_key in _profiles:
        return _profiles[mem_key]
    data = _read(_profile_path(spec, key, needs_input_grad))
    if not data:
        return None
    try:
        data["outside"] = Region(**data["outside"])
        data["layers"] = shared_regions(Region(**r) for r in data["layers"])
        prof = ActivationProfile(**data)
    except (TypeError, KeyError):
        return None
    _profiles[mem_key] = prof
    return prof


def store_profile(spec, key, needs_input_grad: bool, prof) -> None:
    _profiles[(spec.config_hash, key, needs_input_grad)] = prof
    _write(_profile_path(spec, key, needs_input_grad), dataclasses.asdict(prof))


def build_bundled(profiles=None) -> int:
    """Fill profiles/cache with the specs of the bundled profiles and the activation profiles of
    the default setups (`vramfit estimate` defaults, the README's QLoRA command, and what the
    default `vramfit plan` evaluates on a bf16 and on an fp16 card)."""
    # this module's globals are not the live ones when it runs as __main__
    from vramfit import cache as live
    from vramfit.api import estimate

    dest = live.BUNDLED_ZIP
    build_dir = Path(tempfile.mkdtemp(prefix="vramfit-bundle-"))
    os.environ["VRAMFIT_CACHE_DIR"] = str(build_dir)
    live.BUNDLED_ZIP = build_dir / "none.zip"  # computed afresh, not read from the old bundle
    live._specs.clear()
    live._profiles.clear()
    from vramfit.spec import list_profiles

    n = 0
    from vramfit.errors import VramfitError
    from vramfit.planner import plan

    for name in profiles or list_profiles():
        estimate(name, use_calibration=False)
        try:
            estimate(name, method="qlora", grad_ckpt=True, use_calibration=False)
        except VramfitError:  # QLoRA not modelled for this architecture (fused MoE experts)
            pass
        for gpu in ("h100", "t4"):  # the default plan's setups, on a bf16 card and on an fp16 one
            try:
                plan(name, gpu=gpu)
            except VramfitError:  # nothing fits: the traces it needed are stored all the same
                pass
        # the second LoRA rank anchor of every LoRA/QLoRA trace: any rank is then interpolated
        # (trace.RANK_ANCHORS), so rank levers and --lora-r need no new trace
        from vramfit.trace import RANK_ANCHORS, activation_profile

        for (config_hash, key, needs_input_grad) in list(live._profiles):
            if key.method != "full" and key.lora_r in RANK_ANCHORS:
                spec = next(s for s in live._specs.values() if s.config_hash == config_hash)
                for r in RANK_ANCHORS:
                    activation_profile(spec, dataclasses.replace(key, lora_r=r), needs_input_grad)
        n += 1
    _pack(build_dir, dest)
    live.BUNDLED_ZIP = dest
    return n


def _pack(src: Path, dest: Path) -> None:
    """Every entry under `src` into one zip, sorted, with fixed timestamps (the same bytes for the
    same entries)."""
    tmp = dest.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for f in sorted(p for p in src.rglob("*.json") if p.is_file()):
            info = zipfile.ZipInfo(f.relative_to(src).as_posix(), date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, f.read_bytes())
    tmp.replace(dest)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if sys.argv[1:] == ["--build-bundled"]:
        print(f"bundled cache: {build_bundled()} profiles -> {BUNDLED_ZIP}")
