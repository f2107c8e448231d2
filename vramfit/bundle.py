"""Build profiles/cache.zip: the specs of the bundled profiles and the activation profiles of the
default setups, computed by the same code a user's estimate runs (vramfit.model.cache reads them).

    python -m vramfit.bundle
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from pathlib import Path

from vramfit.model import cache as live


# The profiles whose event templates ship (the allocator replay, `vramfit estimate` and `plan`'s default
# answer, torch-free in ~1 s once a template exists; a first build takes ~10-60 s): the ones people
# fine-tune most, at the estimate's default setup, the README's QLoRA command, and the setups the default
# plan replays on the cards of TEMPLATE_GPUS.  Keyed by the replay's code and the traced libraries'
# versions: an edit to the replay or another transformers makes them unused until the bundle is rebuilt.
TEMPLATE_PROFILES = ("llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b-v0.3", "qwen2.5-7b",
                     "qwen2.5-1.5b")
TEMPLATE_GPUS = ("12GB", "16GB", "rtx-4090", "h100")
# more cards and sizes whose plans of TEMPLATE_PROFILES ship: the planner's accumulating setups (micro-batch
# x accumulation) differ per budget, and the templates of these cover most budgets in between (a plan on
# another size reuses them where it picks the same discrete setups)
TEMPLATE_MORE_GPUS = ("24GB", "8GB", "a100-40gb", "t4", "a100-80gb", "l4", "rtx-3060", "48GB", "6GB", "10GB", "20GB",
                      "32GB", "40GB", "64GB", "rtx-3090", "a10g", "v100-16gb", "rtx-4060-ti-16gb")
# profiles whose default estimates, TEMPLATE_ESTIMATES, the grid under bf16-amp alone (default_tier_grid) and
# plans on DEFAULT_PROFILE_GPUS ship; every other profile's default estimates and TEMPLATE_ESTIMATES ship
TEMPLATE_DEFAULT_PROFILES = ("mistral-7b-v0.1", "gemma-2-9b", "phi-3-mini", "qwen2.5-3b", "tinyllama-1.1b",
                             "gemma-2-2b", "qwen2.5-0.5b", "llama-2-7b", "qwen2.5-14b", "smollm2-1.7b", "gemma-7b",
                             "llama-2-13b")
DEFAULT_PROFILE_GPUS = ("12GB", "16GB", "rtx-4090", "24GB", "h100")
# more of the estimate's setups whose templates ship (with the defaults' and the plans'): a template covers
# every sequence length and rank of its discrete setup, and a micro-batch of 2 or more every larger one
# (trl's fused loss: every tile count from 2 where its tiles allocate nothing)
TEMPLATE_ESTIMATES = ({"micro_batch": 4}, {"grad_ckpt": True}, {"loss": "fused"}, {"loss": "fused", "micro_batch": 4},
                      {"method": "qlora", "grad_ckpt": True, "micro_batch": 4})
TRACE_GPUS = ("h100", "t4")  # the default plan's setups, on a bf16 card and on an fp16 one (fast model)
# the estimate's axes, whole: every method x precision x loss x checkpointing x micro-batch regime (1; 2 and
# more: built at 4 x 2,048 tokens and, for trl's loss, at 2 x 512, its one-tile regime) under adamw_torch --
# the bodies the composed templates borrow (vramfit.memory.template_compose) -- QLoRA's <= 512-row regime,
# and per method x precision (QLoRA: x loss, as trl's adapter cast follows it) the optimizer phases of
# TEMPLATE_DONOR_OPTIMS (the donors).  A setup of these axes under any optimizer with a donor then answers
# from the bundle; where the fused loss's tiles allocate (bf16-mixed, QLoRA with kbit prep), tile counts
# >= 4 compose from the 2- and 3-tile bases (TILE_BASES below).
TEMPLATE_PRECISIONS = ("bf16-amp", "bf16-true", "bf16-mixed")
TEMPLATE_DONOR_OPTIMS = ("adamw_torch_fused", "paged_adamw_8bit")
# where the fused loss's tiles allocate, each tile count is a template of its own; 4 tiles and more are
# composed from the templates at 2 and 3 (vramfit.memory.template_tiles): the 3-tile bases of the grid's
# families at micro-batch >= 2 (the grid's 4 x 2,048 tokens are its 2-tile ones), and for the default tier
# QLoRA under trl's loss, checkpointed, at 2 and 3 tiles
TILE_BASES = tuple(dict(method=m, precision=p, loss="fused", grad_ckpt=ck, micro_batch=4, seq_len=2600)
                   for m, p in [("qlora", p) for p in TEMPLATE_PRECISIONS] + [("lora", "bf16-mixed"),
                                                                             ("full", "bf16-mixed")]
                   for ck in (True, False))
TILE_BASE_ESTIMATES = tuple(dict(method="qlora", loss="fused", grad_ckpt=True, micro_batch=4, seq_len=s)
                            for s in (2048, 2600))


def template_grid(precisions: tuple = TEMPLATE_PRECISIONS) -> list:
    """The estimate setups (kwargs) whose templates the grid above ships, in build order; the
    default tier's grid is the same under the recipes' precision alone (DEFAULT_TIER_PRECISIONS)."""
    methods = ("lora", "qlora", "full")
    out = [dict(method=m, precision=p, loss=loss, grad_ckpt=ck, micro_batch=mb)
           for p in precisions for m in methods for loss in ("logits", "fused") for ck in (False, True)
           for mb in (1, 4)]
    out += [dict(method=m, precision=p, loss=loss, optim=o) for p in precisions for m in methods
            for loss in (("logits", "fused") if m == "qlora" else ("logits",)) for o in TEMPLATE_DONOR_OPTIMS]
    out += [dict(method=m, precision=p, loss="fused", grad_ckpt=ck, micro_batch=2, seq_len=512)
            for p in precisions for m in methods for ck in (False, True)]
    out += [dict(method="qlora", precision=p, loss=loss, grad_ckpt=ck, micro_batch=1, seq_len=512)
            for p in precisions for loss in ("logits", "fused") for ck in (False, True)]
    # a bitsandbytes optimizer's regime counts the LoRA matrices past its size thresholds: other ranks' donors
    out += [dict(method=m, precision=p, loss=loss, optim="paged_adamw_8bit", lora_r=r) for r in (64, 8)
            for p in precisions for m in ("lora", "qlora")
            for loss in (("logits", "fused") if m == "qlora" else ("logits",))]
    return out


# the default tier's grid: template_grid under the recipes' (bfloat16, bf16) alone, with its tile bases
DEFAULT_TIER_PRECISIONS = ("bf16-amp",)


def default_tier_grid() -> list:
    return template_grid(DEFAULT_TIER_PRECISIONS) + [kw for kw in TILE_BASES if kw["precision"] in DEFAULT_TIER_PRECISIONS]


def build_bundled(profiles=None, templates: bool = True, jobs: int = 1) -> int:
    """Fill profiles/cache with the specs of the bundled profiles and the activation profiles of
    the default setups (`vramfit estimate` defaults, the README's QLoRA command, and what the
    default `vramfit plan` evaluates on a bf16 and on an fp16 card), and with `templates` the event
    templates of TEMPLATE_PROFILES and TEMPLATE_DEFAULT_PROFILES (see there), each checked against the
    real replay at the setup it was built for, or the reason there is none.  `jobs` processes share the
    profiles."""
    import multiprocessing as mp

    dest = live.BUNDLED_ZIP
    build_dir = Path(tempfile.mkdtemp(prefix="vramfit-bundle-"))
    from vramfit.model.spec import list_profiles

    names = list(profiles or list_profiles())
    work = [(name, str(build_dir), ("grid" if name in TEMPLATE_PROFILES else "default"
                                    if name in TEMPLATE_DEFAULT_PROFILES else "estimates") if templates else None)
            for name in names]
    if jobs > 1:
        with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
            for name in pool.imap_unordered(_bundle_profile, work):
                print(f"bundled {name}", flush=True)
    else:
        for item in work:
            print(f"bundled {_bundle_profile(item)}", flush=True)
    write_stacks(build_dir)
    _pack(build_dir, dest)
    live.BUNDLED_ZIP = dest
    return len(names)


def write_stacks(build_dir: Path) -> list:
    """stacks.json: the library stacks the entries under `build_dir` were traced under, the installed one
    first (a build on an older bundle keeps the older ones: its templates answer for a newer stack where it
    records the same, vramfit.memory.stack_alias)."""
    from vramfit.memory.stack_alias import installed_stack

    path = Path(build_dir) / "stacks.json"
    try:
        old = json.loads(path.read_text()).get("traced", [])
    except (OSError, ValueError):
        old = []
    stacks = [installed_stack()] + [s for s in old if s != installed_stack()]
    path.write_text(json.dumps({"traced": stacks}, indent=1))
    return stacks


def _bundle_profile(item) -> str:
    """One profile's entries into the build directory (a process of its own with `jobs`)."""
    name, build_dir, tier = item  # tier: "grid" (TEMPLATE_PROFILES), "default" (TEMPLATE_DEFAULT_PROFILES),
    templates = tier is not None  # "estimates" (the others: TEMPLATE_ESTIMATES' templates, no plans'), None
    os.environ["VRAMFIT_CACHE_DIR"] = build_dir
    live.BUNDLED_ZIP = Path(build_dir) / "none.zip"  # computed afresh, not read from the old bundle
    live._specs.clear()
    live._profiles.clear()
    live._templates.clear()
    from vramfit.api import estimate
    from vramfit.errors import VramfitError
    from vramfit.planner.search import plan

    estimate(name, use_calibration=False, replay=templates)
    try:
        estimate(name, method="qlora", grad_ckpt=True, use_calibration=False, replay=templates)
    except VramfitError:  # QLoRA not modelled for this architecture (fused MoE experts)
        pass
    more = (tuple(template_grid()) + TILE_BASES if tier == "grid" else tuple(default_tier_grid()) if tier == "default"
            else TILE_BASE_ESTIMATES)
    for kw in (TEMPLATE_ESTIMATES + more) if templates else ():
        try:
            estimate(name, use_calibration=False, replay=True, **kw)
        except VramfitError:
            pass
    gpus = {"grid": TEMPLATE_GPUS + TEMPLATE_MORE_GPUS, "default": DEFAULT_PROFILE_GPUS}.get(tier, ())
    for gpu in dict.fromkeys(TRACE_GPUS + gpus):
        try:  # the plan's replay (recheck) builds the templates of what it replays, and pins the
            # streams whose recording is slow and has none (vramfit.memory.pinned: streams/)
            plan(name, gpu=gpu, replay=tier in ("grid", "default"))
        except VramfitError:  # nothing fits: the traces it needed are stored all the same
            pass
    # the second LoRA rank anchor of every LoRA/QLoRA trace: any rank is then interpolated
    # (trace.RANK_ANCHORS), so rank levers and --lora-r need no new trace
    from vramfit.model.trace import RANK_ANCHORS, activation_profile

    for (config_hash, key, needs_input_grad) in list(live._profiles):
        if key.method != "full" and key.lora_r in RANK_ANCHORS:
            spec = next(s for s in live._specs.values() if s.config_hash == config_hash)
            for r in RANK_ANCHORS:
                activation_profile(spec, dataclasses.replace(key, lora_r=r), needs_input_grad)
    return name


def _pack(src: Path, dest: Path) -> None:
    """Every entry under `src` into one zip, sorted, with fixed timestamps (the same bytes for the
    same entries)."""
    tmp = dest.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for f in sorted(p for p in src.rglob("*.json") if p.is_file()):
            info = zipfile.ZipInfo(f.relative_to(src).as_posix(), date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, f.read_bytes())
    tmp.replace(dest)


if __name__ == "__main__":  # pragma: no cover
    import sys

    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    jobs = next((int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--jobs=")), 1)
    n = build_bundled(names or None, templates="--no-templates" not in sys.argv, jobs=jobs)
    print(f"bundled cache: {n} profiles -> {live.BUNDLED_ZIP}")
