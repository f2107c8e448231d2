"""Speed of the default `vramfit estimate` (allocator replay from event templates), each call a fresh
process, on bundled profiles at setups outside the bundled traces.  Per case, in one empty
VRAMFIT_CACHE_DIR: (1) cold: no template anywhere, so it is built (torch), checked against the
real replay at that setup and cached; (2) warm: another sequence / micro-batch / rank of the same
discrete setup, expanded from the cached template (no torch import); (3) the same setup with
VRAMFIT_REPLAY=0 (the fitted estimate, for reference); (4) the real replay of the warm setup on the
meta device (`simulated_breakdown`, the reference the template must equal to the byte).

    python3 benchmarks/speed/template_speed.py benchmarks/results/cpu-2026-12-07-template-speed.jsonl
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

CASES = [
    ("llama-3.2-1b", ["--method", "lora", "--seq-len", "1500", "--micro-batch", "2", "--lora-r", "24"],
     ["--method", "lora", "--seq-len", "3000", "--micro-batch", "3", "--lora-r", "64"]),
    ("smollm2-135m", ["--method", "full", "--precision", "bf16-mixed", "--seq-len", "1000", "--micro-batch", "4"],
     ["--method", "full", "--precision", "bf16-mixed", "--seq-len", "2500", "--micro-batch", "2"]),
    ("qwen2.5-0.5b", ["--method", "qlora", "--grad-ckpt", "--seq-len", "1800", "--micro-batch", "2"],
     ["--method", "qlora", "--grad-ckpt", "--seq-len", "4000", "--micro-batch", "3", "--lora-r", "48"]),
    ("llama-3.1-8b", ["--method", "qlora", "--grad-ckpt", "--precision", "bf16-amp", "--seq-len", "1500"],
     ["--method", "qlora", "--grad-ckpt", "--precision", "bf16-amp", "--seq-len", "4096", "--lora-r", "64"]),
]


def _run(model, args, env) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "vramfit", "estimate", model, *args, "--json"], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        return {"wall_s": round(wall, 2), "error": p.stderr[-500:]}
    out = json.loads(p.stdout)
    return {"wall_s": round(wall, 2), "peak_allocated_bytes": out["peak_allocated_bytes"],
            "peak_reserved_bytes": out["peak_reserved_bytes"], "device_bytes": out["device_bytes"],
            "notes": [n for n in out["notes"] if "allocator simulation" in n or "template" in n]}


_REAL = """
import json, sys
from vramfit.memory.constants import DEFAULT
from vramfit.memory.estimate import estimate_setup
from vramfit.memory.replay import simulated_breakdown
from vramfit.memory.setup import make_setup
from vramfit.model.spec import load_spec
model, kw = sys.argv[1], json.loads(sys.argv[2])
spec = load_spec(model)
setup = make_setup(**kw)
bd, targets = estimate_setup(spec, setup, DEFAULT)
bd = simulated_breakdown(spec, setup, targets, bd, DEFAULT)
print(json.dumps({"peak_allocated_bytes": bd.peak_allocated_bytes, "peak_reserved_bytes": bd.peak_reserved_bytes,
                  "device_bytes": bd.device_bytes}))
"""


def _kwargs(args) -> dict:
    """The CLI arguments of a case as make_setup's keywords."""
    kw, i = {}, 0
    while i < len(args):
        name = args[i][2:].replace("-", "_")
        if name == "grad_ckpt":
            kw[name] = True
            i += 1
            continue
        value = args[i + 1]
        kw[name] = int(value) if value.isdigit() else value
        i += 2
    return kw


def _real(model, args, env) -> dict:
    """The real replay (training_events on the meta device + the allocator model) at the same setup."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _REAL, model, json.dumps(_kwargs(args))], env=env, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        return {"wall_s": round(wall, 2), "error": p.stderr[-500:]}
    return {"wall_s": round(wall, 2), **json.loads(p.stdout.strip().splitlines()[-1])}


def main(path: str) -> None:
    from vramfit.versions import installed

    machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "versions": installed("torch", "transformers", "peft", "trl", "accelerate")}
    with open(path, "a") as f:
        for model, cold, warm in CASES:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, VRAMFIT_CACHE_DIR=cache, HF_HUB_OFFLINE="1")
                env.pop("VRAMFIT_REPLAY", None)
                for kind, args, extra in (("cold (template built)", cold, {}), ("warm (template cached)", warm, {}),
                                          ("fitted (VRAMFIT_REPLAY=0)", warm, {"VRAMFIT_REPLAY": "0"})):
                    row = {"date": time.strftime("%Y-%m-%d"), "model": model, "args": args, "case": kind,
                           **_run(model, args, dict(env, **extra)), **machine}
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")
                row = {"date": time.strftime("%Y-%m-%d"), "model": model, "args": warm,
                       "case": "real replay (meta device, the reference)", **_real(model, warm, env), **machine}
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cpu-2026-12-07-template-speed.jsonl")
