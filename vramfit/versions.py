"""Installed package versions, read from package metadata (no imports of the packages)."""

from __future__ import annotations

from importlib import metadata


def installed(*names: str) -> dict:
    """{name: version, or None where the package is not installed}."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
