"""Templates composed along trl's fused-loss tile axis (vramfit.memory.template_tiles) at full size on bundled
profiles: for setups at 4 or more token tiles where each tile count is a template of its own (QLoRA after
prepare_model_for_kbit_training, fp32 weights under autocast), the template composed from the same setup's
templates at 2 and 3 tiles against the real `training_events` recording of the setup itself: the events
(allocations in order, each run of frees as a set) and `allocator.simulate`'s peaks under the default and the
expandable-segments allocator, to the byte; and the torch-free composition and expansion's time.

    python -m benchmarks.speed.tile_compose_check OUT.jsonl [--cache DIR]

The bases come from the bundle or `--cache DIR`; missing ones are built there (and kept).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

from benchmarks.speed.compose_check import same_peaks, write_checks

_Q = {"method": "qlora", "precision": "bf16-amp", "loss": "fused"}
CASES = [
    ("llama-3.2-1b", dict(_Q, grad_ckpt=True, micro_batch=8, seq_len=2048)),
    ("llama-3.2-1b", dict(_Q, grad_ckpt=True, micro_batch=16, seq_len=2048)),
    ("llama-3.2-1b", dict(_Q, grad_ckpt=True, micro_batch=3, seq_len=8000, lora_r=64)),
    ("llama-3.1-8b", dict(_Q, grad_ckpt=True, micro_batch=8, seq_len=2048)),
    ("llama-3.1-8b", dict(_Q, grad_ckpt=True, micro_batch=4, seq_len=5000, optim="paged_adamw_8bit")),
    ("qwen2.5-7b", dict(_Q, grad_ckpt=True, micro_batch=6, seq_len=4096)),
    ("mistral-7b-v0.3", dict(_Q, grad_ckpt=False, micro_batch=16, seq_len=1100)),
    ("llama-3.2-3b", {"method": "lora", "precision": "bf16-mixed", "loss": "fused", "grad_ckpt": True,
                      "micro_batch": 8, "seq_len": 2048}),
    ("qwen2.5-1.5b", {"method": "full", "precision": "bf16-mixed", "loss": "fused", "grad_ckpt": True,
                      "micro_batch": 5, "seq_len": 4000}),
]


def check(name: str, kw: dict) -> dict:
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.memory.template import expand, token_tiles
    from vramfit.memory.template_build import same_events
    from vramfit.memory.template_cache import setup_template, template_key
    from vramfit.memory.template_tiles import BASES, base_seq, tile_composed
    from vramfit.model.spec import load_spec

    spec = load_spec(name)
    setup = make_setup(**kw)
    targets = resolve_targets(spec, setup)
    out = {"tiles": token_tiles(setup.micro_batch, setup.seq_len), "bases": {}}
    for tt in BASES:
        s = replace(setup, seq_len=base_seq(spec, setup, 1, tt))
        t = time.perf_counter()
        got = setup_template(spec, s, resolve_targets(spec, s), build=True, compose=False)
        out["bases"][tt] = {"seq_len": s.seq_len, "seconds": round(time.perf_counter() - t, 1),
                            "ok": got["template"] is not None, "note": got["note"][:120]}
    t = time.perf_counter()
    tpl = tile_composed(spec, setup, 1, template_key(spec, setup) + "-check",
                        lambda s, ga: setup_template(spec, s, resolve_targets(spec, s), ga, False,
                                                     compose=False)["template"])
    if tpl is None:
        return dict(out, composed=False)
    marks = {}
    mine = expand(tpl, setup.micro_batch, setup.seq_len, setup.lora_r, spec.num_layers, 1, marks)
    compose_s = time.perf_counter() - t
    t = time.perf_counter()
    real = training_events(spec, setup, targets, steps=2)
    real_s = time.perf_counter() - t
    out.update({"composed": True, "events": len(mine), "same_events": same_events(mine, real["events"]),
                "same_marks": marks == real["marks"], "compose_expand_s": round(compose_s, 3),
                "record_s": round(real_s, 2)})
    return dict(out, **same_peaks(mine, real["events"]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--cache", default=None, help="a user cache for the bases (default: a new empty one)")
    ap.add_argument("--profiles", nargs="+", default=None, help="only these profiles' setups")
    a = ap.parse_args(argv)
    os.environ["VRAMFIT_CACHE_DIR"] = a.cache or tempfile.mkdtemp(prefix="vramfit-tile-check-")
    write_checks(a.out, CASES, check, a.profiles)


if __name__ == "__main__":
    main()
