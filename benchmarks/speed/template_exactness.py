"""Exactness of event templates at full size on bundled profiles: per case, a template is built
(from the model shrunk to 6-8 layers) in the regime of each point, expanded to the full model and
compared with the real `training_events` replay there (events, and `allocator.simulate`'s peaks
under the default and the expandable-segments allocator, to the byte).  Points include ones the
template was not built at (another sequence, micro-batch, rank, accumulation).

    python3 benchmarks/speed/template_exactness.py benchmarks/results/cpu-2026-12-07-template-exactness.jsonl [PROFILE ...]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

# (profile, setup, points (micro-batch, seq, rank, accumulation)); the first point of a regime builds
CASES = [
    ("llama-3.2-1b", {"method": "lora"}, [(2, 1500, 24, 1), (3, 3000, 64, 1), (4, 700, 8, 1)]),
    ("llama-3.2-1b", {"method": "full", "precision": "bf16-mixed", "grad_ckpt": True},
     [(1, 2048, 16, 1), (1, 3000, 16, 1)]),
    ("pythia-410m", {"method": "lora", "grad_ckpt": True}, [(2, 1024, 16, 1), (4, 2000, 32, 1)]),
    ("gpt2", {"method": "full"}, [(2, 1024, 16, 1), (3, 700, 16, 1)]),
    ("mistral-7b-v0.1", {"method": "lora"}, [(1, 4096, 16, 1), (1, 2000, 32, 1), (1, 5000, 16, 1), (1, 4095, 16, 1)]),
    ("qwen2.5-0.5b", {"method": "qlora", "precision": "bf16-amp", "loss": "fused"},
     [(4, 2048, 16, 1), (3, 2500, 32, 1)]),
    ("llama-3.2-1b", {"method": "lora", "optim": "paged_adamw_8bit"}, [(2, 1024, 16, 4), (3, 2048, 16, 8)]),
    ("phi-3-mini", {"method": "lora", "precision": "bf16-amp"}, [(2, 1024, 16, 1), (2, 2048, 32, 1)]),
    ("gemma-2-2b", {"method": "lora"}, [(2, 1024, 16, 1)]),
]


def _strict(events) -> list:
    """Allocations numbered in order, frees by that number, in their order."""
    ordinal, out = {}, []
    for e in events:
        if e[0] == "a":
            ordinal[e[1]] = len(ordinal)
            out.append(("a", e[2]))
        elif e[0] == "f":
            out.append(("f", ordinal[e[1]]))
        else:
            out.append(("e",))
    return out


def run(path: str, only: list | None = None) -> None:
    from vramfit.memory import template as T
    from vramfit.memory import template_build as tb
    from vramfit.memory.allocator import simulate
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.memory.events import training_events
    from vramfit.model.spec import load_spec
    from vramfit.versions import installed

    versions = installed("torch", "transformers", "peft", "trl", "accelerate")
    with open(path, "a") as f:
        for model, kw, points in CASES:
            if only and model not in only:
                continue
            spec = load_spec(model)
            base = make_setup(**kw)
            tpls = {}
            for B, S, r, A in points:
                s = dataclasses.replace(base, micro_batch=B, seq_len=S, grad_accum=A,
                                        lora_r=r if base.method != "full" else base.lora_r)
                reg = json.dumps(T.regime(T.regime_info(spec, s), B, S, A, s.lora_r if s.method != "full" else 0))
                row = {"date": time.strftime("%Y-%m-%d"), "model": model, "setup": kw, "B": B, "S": S,
                       "r": s.lora_r, "grad_accum": A, "layers": spec.num_layers, "regime": reg, "versions": versions}
                built_here = reg not in tpls
                if built_here:
                    t = time.perf_counter()
                    try:
                        tpls[reg] = tb.build(spec, s, B, S, A)
                        row["template_build_s"] = round(time.perf_counter() - t, 1)
                    except T.NoTemplate as exc:
                        tpls[reg] = None
                        row["no_template"] = str(exc)
                tpl = tpls[reg]
                row["built_at_this_point"] = built_here
                if tpl is not None:
                    t = time.perf_counter()
                    mine = T.expand(tpl, B, S, s.lora_r, spec.num_layers, A)
                    row["expand_s"] = round(time.perf_counter() - t, 3)
                    t = time.perf_counter()
                    real = training_events(spec, s, resolve_targets(spec, s), steps=2, grad_accum=A)["events"]
                    row["real_training_events_s"] = round(time.perf_counter() - t, 2)
                    row["events"] = len(real)
                    # equal: up to the order of consecutive frees (which leaves the allocator as it is);
                    # identical: in the same order too
                    row["events_equal"] = tb.same_events(mine, real)
                    row["events_identical"] = _strict(mine) == _strict(real)
                    for x in (False, True):
                        a, b = simulate(mine, expandable_segments=x), simulate(real, expandable_segments=x)
                        name = "expandable" if x else "default"
                        row[f"peaks_equal_{name}"] = (a["peak_allocated"], a["peak_reserved"]) == (
                            b["peak_allocated"], b["peak_reserved"])
                        row[f"peak_reserved_{name}"] = b["peak_reserved"]
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cpu-2026-12-07-template-exactness.jsonl",
        sys.argv[2:])
