"""Composed templates (vramfit.memory.template_compose) at full size on bundled profiles: for setups whose
own template does not ship but compose from shipped ones (another optimizer's body, the optimizer phases of
a donor), the composed expansion against the real `training_events` recording of the setup itself: the
events (allocations in order, each run of frees as a set) and `allocator.simulate`'s peaks under the default
and the expandable-segments allocator, to the byte; and the torch-free expansion's time.

    python -m benchmarks.speed.compose_check OUT.jsonl [--sample N --seed K] [--cases]

`--sample`: N setups drawn as `cold_speed --sample` draws them (seeded), those that compose checked;
`--cases`: the fixed CASES.  Reads only the bundle (a fresh empty user cache; `--cache DIR` reads DIR too),
builds nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone

CASES = [
    ("llama-3.1-8b", {"method": "lora", "optim": "adamw_torch_fused"}),
    ("llama-3.1-8b", {"method": "qlora", "optim": "paged_adamw_8bit", "grad_ckpt": True, "micro_batch": 2}),
    ("llama-3.2-1b", {"method": "full", "optim": "adamw_torch_fused", "micro_batch": 4, "seq_len": 1024}),
    ("qwen2.5-7b", {"method": "lora", "optim": "paged_adamw_8bit", "loss": "fused", "grad_ckpt": True}),
]


def _setups(a) -> list:
    if a.cases or not a.sample:
        return CASES
    from benchmarks.speed.cold_speed import sampled_cases

    out = []
    for _, args in sampled_cases(a.sample, a.seed):
        kw, i = {}, 2
        names = {"--method": "method", "--precision": "precision", "--optim": "optim", "--seq-len": "seq_len",
                 "--batch-size": "micro_batch", "--loss": "loss", "--lora-r": "lora_r"}
        while i < len(args):
            if args[i] in names:
                v = args[i + 1]
                kw[names[args[i]]] = int(v) if names[args[i]] in ("seq_len", "micro_batch", "lora_r") else v
                i += 2
            else:
                kw["grad_ckpt"] = args[i] == "--grad-ckpt"
                i += 1
        out.append((args[1], kw))
    return out


def check(name: str, kw: dict) -> dict:
    from vramfit.memory.events import training_events
    from vramfit.memory.template_cache import setup_template
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.memory.template_build import same_events
    from vramfit.memory.template_compose import expand_any
    from vramfit.model.spec import load_spec

    spec = load_spec(name)
    setup = make_setup(**kw)
    targets = resolve_targets(spec, setup)
    own = setup_template(spec, setup, targets, build=False, compose=False)
    if own["template"] is not None:
        return {"composed": False, "why": "its own template ships"}
    got = setup_template(spec, setup, targets, build=False)
    tpl = got["template"]
    if tpl is None or "composed" not in tpl:
        return {"composed": False, "why": got["note"] or "no composition from the bundle"}
    t = time.perf_counter()
    marks = {}
    mine = expand_any(tpl, setup.micro_batch, setup.seq_len, setup.lora_r, spec.num_layers, 1, marks)
    expand_s = time.perf_counter() - t
    t = time.perf_counter()
    real = training_events(spec, setup, targets, steps=2)
    real_s = time.perf_counter() - t
    out = {"composed": True, "events": len(mine), "same_events": same_events(mine, real["events"]),
           "same_marks": marks == real["marks"], "expand_s": round(expand_s, 3), "record_s": round(real_s, 2),
           "donor_shape": tpl["composed"]["donor_shape"]}
    return dict(out, **same_peaks(mine, real["events"]))


def same_peaks(mine: list, real: list) -> dict:
    """Both allocator models' (default, expandable segments) peaks over `mine`, and whether `real`'s are equal."""
    from vramfit.memory.allocator import simulate

    out = {}
    for x in (False, True):
        a, b = simulate(mine, expandable_segments=x), simulate(real, expandable_segments=x)
        tag = "expandable" if x else "default"
        out[f"peaks_{tag}"] = [a["peak_allocated"], a["peak_reserved"]]
        out[f"same_peaks_{tag}"] = (a["peak_allocated"], a["peak_reserved"]) == (b["peak_allocated"],
                                                                                  b["peak_reserved"])
    return out


def write_checks(out_path: str, setups, check, profiles=None) -> None:
    """`check(profile, kwargs)` of each (profile, kwargs) of `setups` (those of `profiles` where given), one JSON
    line each with the environment to `out_path`, and how many of the composed ones equal their recording."""
    from vramfit.versions import installed

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
           "cpus": os.cpu_count(), "python": platform.python_version(),
           "versions": installed("torch", "transformers", "peft", "trl", "accelerate")}
    n = ok = 0
    for name, kw in setups:
        if profiles and name not in profiles:
            continue
        rec = {"profile": name, "setup": kw, **check(name, kw), "environment": env}
        if rec["composed"]:
            n += 1
            ok += rec["same_events"] and rec["same_peaks_default"] and rec["same_peaks_expandable"]
        print(json.dumps({k: v for k, v in rec.items() if k != "environment"}), flush=True)
        with open(out_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    print(f"{ok} of {n} composed setups equal to their own recording (events and both allocators' peaks)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--sample", type=int, default=0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--cases", action="store_true")
    ap.add_argument("--profiles", nargs="+", default=None, help="only these profiles' setups")
    ap.add_argument("--cache", default=None, help="a user cache to read besides the bundle (default: a new empty one)")
    a = ap.parse_args(argv)
    os.environ["VRAMFIT_CACHE_DIR"] = a.cache or tempfile.mkdtemp(prefix="vramfit-compose-check-")
    os.environ["VRAMFIT_TEMPLATE_BUILD"] = "off"
    write_checks(a.out, _setups(a), check, a.profiles)


if __name__ == "__main__":
    main()
