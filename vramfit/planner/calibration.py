"""This machine's calibration (written by `vramfit calibrate`, vramfit.run.calibrate): stored
per GPU, driver, torch and transformers versions under <cache>/calibration/<key>.json; later
estimates and plans use it and say so."""

from __future__ import annotations

import json
from pathlib import Path

from vramfit.errors import VramfitError
from vramfit.memory.constants import DEFAULT, Constants
from vramfit.model.cache import cache_dir


def calibration_dir() -> Path:
    return cache_dir() / "calibration"


def local_key() -> str | None:
    """GPU name, driver, torch and transformers versions of this machine; None without a GPU."""
    from vramfit.planner.gpu import probe
    from vramfit.versions import installed

    try:
        found = probe()
    except VramfitError:
        return None
    vers = [v or "none" for v in installed("torch", "transformers").values()]
    return "_".join([found.devices[0].name.replace(" ", "-"), found.driver_version, *vers])


def load_local_constants(spec=None) -> tuple[Constants, str | None]:
    """(constants, description) from this machine's calibration, or the defaults.

    Without any stored calibration this returns at once (no NVML call)."""
    d = calibration_dir()
    if not d.is_dir() or not any(d.glob("*.json")):
        return DEFAULT, None
    key = local_key()
    if key is None:
        return DEFAULT, None
    try:
        data = json.loads((d / f"{key}.json").read_text())
    except (OSError, ValueError):
        return DEFAULT, None
    fields = {k: v for k, v in data.get("constants", {}).items() if k in Constants.__dataclass_fields__}
    if spec is not None:
        scale = data.get("activation_scale", {}).get(spec.config_hash)
        if scale:
            fields["activation_scale"] = scale
    return DEFAULT.with_(**fields), f"calibrated {data.get('date', '?')} on {key}"
