"""`vramfit estimate` and `vramfit plan` on every bundled profile, as a user sees them (text and
--json), written to one JSON-lines file: run before and after a change that must not change
behaviour (the package's move into subpackages, issue 18) and compare the two files.

    python -m benchmarks.house.outputs OUT.jsonl            # record
    python -m benchmarks.house.outputs OUT.jsonl --against BEFORE.jsonl.gz   # record, then diff

The outputs of the flat package before issue 18's move (main at de21f2a, transformers 5.25.0, peft
0.21.2, torch 2.13.0 CPU) are benchmarks/results/cpu-2026-12-07-house-outputs-before.jsonl.gz; run
with an empty VRAMFIT_CACHE_DIR, and with the same transformers, so the bundled cache is read alike.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

COMMANDS = (
    ("estimate", "{m}"),
    ("estimate", "{m} --json"),
    ("estimate", "{m} --method qlora --grad-ckpt --json"),
    ("estimate", "{m} --method full --precision bf16-mixed --optim adamw_torch_fused --seq-len 512 --batch-size 2"),
    ("plan", "{m} --gpu 24GB"),
    ("plan", "{m} --gpu 24GB --json"),
    ("plan", "{m} --gpu t4 --json"),
)


def record(path: Path, models=None) -> list[dict]:
    os.environ.setdefault("COLUMNS", "140")
    from typer.testing import CliRunner

    from vramfit.cli import app

    try:
        from vramfit.model.spec import list_profiles
    except ImportError:  # the flat package before issue 18
        list_profiles = __import__("vramfit.spec", fromlist=["list_profiles"]).list_profiles

    runner = CliRunner()
    rows = []
    for m in models or list_profiles():
        for verb, args in COMMANDS:
            argv = [verb, *args.format(m=m).split()]
            res = runner.invoke(app, argv)
            rows.append({"argv": argv, "exit_code": res.exit_code, "output": res.output})
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


def _lines(path: Path) -> list[dict]:
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines()]


def compare(before: Path, after: Path) -> int:
    a, b = _lines(before), _lines(after)
    diffs = [(x["argv"], x, y) for x, y in zip(a, b) if x != y]
    print(f"{len(a)} outputs before, {len(b)} after, {len(diffs)} differ")
    for argv, x, y in diffs[:10]:
        print(" ", " ".join(argv))
    return 0 if not diffs and len(a) == len(b) else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--against", type=Path)
    args = ap.parse_args()
    rows = record(args.out)
    print(f"{len(rows)} outputs -> {args.out}")
    return compare(args.against, args.out) if args.against else 0


if __name__ == "__main__":
    sys.exit(main())
