"""Issue 19's speed targets, as a new user meets them: `python -m benchmarks.speed.cold_speed [--out FILE]`.

Every command runs in a fresh process with an empty user cache (`VRAMFIT_CACHE_DIR` a new empty
folder), so what is not in the bundled cache (profiles/cache.zip) is computed there and then:
- `vramfit estimate` of bundled profiles at setups whose event templates ship (the README's command,
  the estimate's defaults) and at setups whose do not (another sequence, micro-batch, method, model);
- `vramfit plan` of bundled profiles on cards whose plans' templates ship and on one whose do not;
- `vramfit estimate` of a local config.json, the first time and again (same cache).
Targets (issue 19, item 2): estimate <= 1.5 s at any setup, plan <= 3 s, a local config.json <= 10 s
the first time and <= 0.5 s after.

`--plans P1,P2`: instead, `vramfit plan` of those profiles on each card of PLAN_GPUS (target 3 s).
`--sample N --seed K [--profiles grid|default|all]`: instead, N setups drawn at random (seeded) over the
profiles whose whole template grid ships (`vramfit.bundle.TEMPLATE_PROFILES`, the default), the default
tier's (`TEMPLATE_DEFAULT_PROFILES`) or every bundled profile, and the axes a user varies (method, precision, optimizer,
checkpointing, micro-batch, sequence, rank, loss), each timed the same way: how much of "any setup"
the bundle answers within the target, and what the rest costs.  Each line: the command, its wall seconds, whether it built an event
template (the replay's ~10-60 s first build), what answered (its own template, a composed one, the real replay)
and its exit code; one JSON line per command to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from vramfit.versions import installed

# (what it shows, the vramfit arguments)
CASES = [
    ("README's command (template bundled)", ["estimate", "llama-3.1-8b", "--method", "qlora", "--grad-ckpt"]),
    ("estimate defaults (template bundled)", ["estimate", "llama-3.2-1b"]),
    ("estimate defaults (template bundled)", ["estimate", "qwen2.5-7b"]),
    ("another micro-batch and sequence (not bundled)", ["estimate", "llama-3.1-8b", "--method", "qlora", "--grad-ckpt",
                                                        "--seq-len", "3000", "--batch-size", "3"]),
    ("another model (not bundled)", ["estimate", "gemma-2b"]),
    ("plan (templates bundled)", ["plan", "llama-3.1-8b", "--gpu", "12GB"]),
    ("plan (templates bundled)", ["plan", "llama-3.1-8b", "--gpu", "rtx-4090"]),
    ("plan (templates bundled)", ["plan", "llama-3.1-8b", "--gpu", "24GB"]),
    ("estimate defaults (default-tier profile)", ["estimate", "mistral-7b-v0.1"]),
    ("estimate defaults (default-tier profile)", ["estimate", "gemma-2-9b"]),
    ("plan (default-tier profile)", ["plan", "qwen2.5-3b", "--gpu", "16GB"]),
    ("plan (default-tier profile)", ["plan", "phi-3-mini", "--gpu", "24GB"]),
    ("plan (not bundled)", ["plan", "qwen2.5-3b", "--gpu", "40GB"]),
]


def run(args: list, cache: str) -> dict:
    env = dict(os.environ, VRAMFIT_CACHE_DIR=cache)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "vramfit", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    return {"command": "vramfit " + " ".join(args), "seconds": round(wall, 2), "rc": p.returncode,
            "built_template": "template built for this setup" in p.stdout + p.stderr
            or "building the allocator replay" in p.stderr,
            "answer": _answer(" ".join(p.stdout.split())),
            "first_line": (p.stdout.strip().splitlines() or [""])[0][:160]}


def _answer(out: str) -> str:
    """What answered, from the estimate's notes (whitespace folded)."""
    if "composed from the template" in out:
        return "composed template"
    if "expanded from the setup's event template" in out:
        return "template"
    if "replayed on the meta device" in out or "no event template built" in out:
        return "real replay"
    return "other"


SAMPLE_AXES = {
    "method": ("lora", "qlora", "full"), "precision": ("bf16-amp", "bf16-true", "bf16-mixed"),
    "optim": ("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"), "grad_ckpt": (False, True),
    "batch": (1, 2, 4, 8), "seq": (512, 1024, 2048, 4096), "lora_r": (8, 16, 64), "loss": ("logits", "fused"),
}


def sample_profiles(which: str) -> tuple:
    """The profiles a sample draws from: "grid" (TEMPLATE_PROFILES, whose whole template grid ships),
    "default" (TEMPLATE_DEFAULT_PROFILES) or "all" (every bundled profile)."""
    from vramfit.bundle import TEMPLATE_DEFAULT_PROFILES, TEMPLATE_PROFILES
    from vramfit.model.spec import list_profiles

    return {"grid": TEMPLATE_PROFILES, "default": TEMPLATE_DEFAULT_PROFILES}.get(which) or tuple(list_profiles())


def sampled_cases(n: int, seed: int, profiles: str = "grid") -> list:
    """N random setups (seeded) of `profiles` (sample_profiles) over SAMPLE_AXES."""
    import random

    names = sample_profiles(profiles)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pick = {k: rng.choice(v) for k, v in SAMPLE_AXES.items()}
        args = ["estimate", rng.choice(names), "--method", pick["method"], "--precision",
                pick["precision"], "--optim", pick["optim"], "--seq-len", str(pick["seq"]), "--batch-size",
                str(pick["batch"]), "--loss", pick["loss"], "--grad-ckpt" if pick["grad_ckpt"] else "--no-grad-ckpt"]
        if pick["method"] != "full":
            args += ["--lora-r", str(pick["lora_r"])]
        out.append(("a random setup", args))
    return out


PLAN_GPUS = ("8GB", "12GB", "16GB", "24GB", "rtx-4090", "l4", "a100-40gb", "48GB", "a100-80gb", "h100", "t4",
             "rtx-3060")


def plan_cases(profiles: list) -> list:
    """`vramfit plan` of each of `profiles` on each card of PLAN_GPUS (what the bundle's plans cover)."""
    return [("plan", ["plan", name, "--gpu", gpu]) for name in profiles for gpu in PLAN_GPUS]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="substring of the commands to run")
    ap.add_argument("--sample", type=int, default=0, help="N random setups instead of the fixed cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profiles", default="grid", choices=("grid", "default", "all"),
                    help="what --sample draws from: the grid's 6 profiles, the default tier's 12, or all bundled")
    ap.add_argument("--plans", default=None, help="comma list of profiles: their plans on PLAN_GPUS instead")
    a = ap.parse_args(argv)
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
           "cpus": os.cpu_count(), "python": platform.python_version(),
           "versions": installed("torch", "transformers", "peft", "trl", "accelerate")}
    lines = []
    cases = plan_cases(a.plans.split(",")) if a.plans else sampled_cases(a.sample, a.seed, a.profiles) if a.sample else CASES
    for what, args in cases:
        if a.only and a.only not in " ".join(args):
            continue
        with tempfile.TemporaryDirectory() as cache:
            rec = dict(run(args, cache), what=what, cache="empty", environment=env)
        lines.append(rec)
        print(f"{rec['seconds']:7.2f} s  rc {rec['rc']}  {rec['answer']:17}  {rec['command']}", flush=True)
    if a.sample or a.plans:
        secs = sorted(r["seconds"] for r in lines)
        target = 3.0 if a.plans else 1.5
        within = sum(1 for x in secs if x <= target)
        print(f"{within} of {len(secs)} within {target} s; median {secs[len(secs) // 2]:.2f} s, max {secs[-1]:.2f} s")
        kinds = sorted({r["answer"] for r in lines})
        for k in kinds:
            own = sorted(r["seconds"] for r in lines if r["answer"] == k)
            print(f"  {k}: {len(own)}, median {own[len(own) // 2]:.2f} s, max {own[-1]:.2f} s")
    if (not a.only or "config.json" in a.only) and not a.sample and not a.plans:
        with tempfile.TemporaryDirectory() as d:
            cfg = Path(d) / "config.json"
            src = Path(__file__).resolve().parents[2] / "profiles" / "models" / "llama-3.2-3b.json"
            cfg.write_text(json.dumps({k: v for k, v in json.loads(src.read_text()).items() if not k.startswith("_")}))
            cache = str(Path(d) / "cache")
            for n in ("first", "again"):
                rec = dict(run(["estimate", str(cfg)], cache), what=f"a local config.json, {n}", cache=n,
                           environment=env)
                rec["command"] = "vramfit estimate ./config.json"
                lines.append(rec)
                print(f"{rec['seconds']:7.2f} s  rc {rec['rc']}  template built: {rec['built_template']!s:5}  "
                      f"{rec['command']} ({n})", flush=True)
    if a.out:
        with open(a.out, "a") as f:
            for rec in lines:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
