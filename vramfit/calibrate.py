"""`vramfit calibrate`: measure the local stack's constants and keep them per GPU and versions.

Stored in <cache>/calibration/<key>.json where key names the GPU, driver, torch and
transformers versions; later estimates on the same machine use them.
"""

from __future__ import annotations

import json
from pathlib import Path

from vramfit.cache import cache_dir
from vramfit.constants import DEFAULT, Constants


def calibration_dir() -> Path:
    return cache_dir() / "calibration"


def local_key() -> str | None:
    """GPU name, driver, torch and transformers versions of this machine; None without a GPU."""
    from importlib import metadata

    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        return None
    vers = []
    for pkg in ("torch", "transformers"):
        try:
            vers.append(metadata.version(pkg))
        except metadata.PackageNotFoundError:
            vers.append("none")
    return "_".join([name.replace(" ", "-"), driver, *vers])


def load_local_constants() -> tuple[Constants, str | None]:
    """(constants, description) from this machine's calibration, or the defaults."""
    d = calibration_dir()
    if not d.is_dir() or not any(d.glob("*.json")):
        return DEFAULT, None
    key = local_key()
    if key is None:
        return DEFAULT, None
    path = d / f"{key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return DEFAULT, None
    fields = {k: v for k, v in data.get("constants", {}).items() if k in Constants.__dataclass_fields__}
    return DEFAULT.with_(**fields), f"calibrated {data.get('date', '?')} for {key}"
