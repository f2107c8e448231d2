"""The package's rooms import one way (cli -> api -> planner / run -> memory -> model), with no
circle, and the memory model imports no torch: what makes it cheap for the planner and the CLI."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "vramfit"
# a room may import the rooms after it in this list, never those before it
ROOMS = ("cli", "bundle", "api", "run", "planner", "memory", "model")
LEAVES = ("errors", "versions", "report", "report_multi")  # display and plain helpers: any room may use them


def _imports():
    """(importing module, imported vramfit module) for every import, also those inside functions."""
    for f in PKG.rglob("*.py"):
        mod = ".".join(f.relative_to(PKG.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vramfit"):
                names = [node.module] if node.module != "vramfit" else [f"vramfit.{a.name}" for a in node.names]
                yield from ((mod, n) for n in names)
            elif isinstance(node, ast.Import):
                yield from ((mod, a.name) for a in node.names if a.name.startswith("vramfit."))


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_rooms_import_only_the_rooms_below_them():
    wrong = []
    for src, dst in _imports():
        a, b = _room(src), _room(dst)
        if a in ("__init__", "__main__") or b in LEAVES or a == b or b is None:
            continue
        if a in LEAVES:
            if b != "memory":  # report reads the Setup's fields
                wrong.append((src, dst))
            continue
        if ROOMS.index(b) <= ROOMS.index(a):
            wrong.append((src, dst))
    assert wrong == []


def test_no_module_is_longer_than_600_lines():
    long = {str(f.relative_to(PKG)): n for f in PKG.rglob("*.py") if (n := len(f.read_text().splitlines())) > 600}
    assert long == {}


def test_the_memory_model_and_the_planner_import_no_torch():
    code = ("import sys, vramfit.memory.walk, vramfit.memory.estimate, vramfit.memory.allocator, "
            "vramfit.memory.events, vramfit.memory.distributed, vramfit.planner.search, vramfit.model.spec, "
            "vramfit.model.trace; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'transformers' not in sys.modules, 'transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)
