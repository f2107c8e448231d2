"""The benchmarks' JSON lines: every result is one line, appended and flushed as it happens, so a
file from a killed run may end in a cut line."""

from __future__ import annotations

import json
from pathlib import Path


def records(path) -> list:
    """The records in `path` (none if it does not exist), skipping blank lines and a cut last one."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return out
