"""Speed of `vramfit estimate`: `python -m benchmarks.speed.estimate_speed [--out FILE]`.

Measures, on this machine:
- the CLI in a new process with an empty cache (first use: torch, transformers and peft are
  imported, the model is built on the meta device and traced),
- the CLI in a new process with the on-disk cache filled (every later use; no torch import),
- one analytic estimate on a cached spec (what the planner calls), median of 2,000.
Targets (issue 2): CLI under 3 s, one estimate under 1 ms.  Appends a JSON line to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

from vramfit.versions import installed

CASES = [("llama-3.1-8b", ["--method", "qlora", "--grad-ckpt"]), ("qwen2.5-0.5b", ["--method", "lora"]),
         ("mistral-7b-v0.1", ["--method", "full", "--precision", "bf16-mixed"])]


def _cli_seconds(model, args, cache_dir) -> float:
    env = {**os.environ, "VRAMFIT_CACHE_DIR": cache_dir}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from vramfit.cli import app; app()", "estimate", model, *args, "--json"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "versions": installed("torch", "transformers", "peft"), "cases": []}
    for model, extra in CASES:
        with tempfile.TemporaryDirectory() as cache:
            first = _cli_seconds(model, extra, cache)
            warm = [_cli_seconds(model, extra, cache) for _ in range(3)]
        result["cases"].append({"model": model, "args": extra, "cli_first_use_s": round(first, 3),
                                "cli_cached_s": round(statistics.median(warm), 3)})
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.setup import make_setup
    from vramfit.model.spec import load_spec

    spec = load_spec("llama-3.1-8b")
    setup = make_setup("qlora", seq_len=2048, grad_ckpt=True)
    estimate_setup(spec, setup)
    times = []
    for i in range(2000):
        s = setup.with_(micro_batch=1 + i % 16)
        t = time.perf_counter()
        estimate_setup(spec, s)
        times.append(time.perf_counter() - t)
    result["estimate_on_cached_spec_ms"] = round(1000 * statistics.median(times), 4)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
