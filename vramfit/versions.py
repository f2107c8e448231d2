"""Installed package versions, read from package metadata (no imports of the packages)."""

from __future__ import annotations

import functools
from importlib import metadata


def installed(*names: str) -> dict:
    """{name: version, or None where the package is not installed} (read once per process: every cache
    key names them, and reading a package's metadata takes ~2 ms)."""
    return {name: _version(name) for name in names}


@functools.lru_cache(maxsize=None)
def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def source_digest(*rels: str) -> str:
    """16 hex digits of sha256 over vramfit's own source files `rels` (paths below the package, in
    order; a missing one counts by its name): what a cached result computed by that code is keyed by."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for rel in rels:
        try:
            h.update((root / rel).read_bytes())
        except OSError:
            h.update(rel.encode())
    return h.hexdigest()[:16]
