"""Build profiles/cache.zip: the specs of the bundled profiles and the activation profiles of the
default setups, computed by the same code a user's estimate runs (vramfit.model.cache reads them).

    python -m vramfit.bundle
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
from pathlib import Path

from vramfit.model import cache as live


def build_bundled(profiles=None, templates: bool = True) -> int:
    """Fill profiles/cache with the specs of the bundled profiles and the activation profiles of
    the default setups (`vramfit estimate` defaults, the README's QLoRA command, and what the
    default `vramfit plan` evaluates on a bf16 and on an fp16 card).  With `templates`, the two
    estimates also leave their event templates (vramfit.memory.template), each checked against the
    real replay at the default setup, or the reason there is none (~1 min a profile); they are keyed
    by the replay's code, so an edit to it makes them unused until the bundle is rebuilt."""
    from vramfit.api import estimate as _estimate

    def estimate(*args, **kwargs):
        return _estimate(*args, replay=templates, **kwargs)

    dest = live.BUNDLED_ZIP
    build_dir = Path(tempfile.mkdtemp(prefix="vramfit-bundle-"))
    os.environ["VRAMFIT_CACHE_DIR"] = str(build_dir)
    live.BUNDLED_ZIP = build_dir / "none.zip"  # computed afresh, not read from the old bundle
    live._specs.clear()
    live._profiles.clear()
    live._templates.clear()
    from vramfit.model.spec import list_profiles

    n = 0
    from vramfit.errors import VramfitError
    from vramfit.planner.search import plan

    for name in profiles or list_profiles():
        estimate(name, use_calibration=False)
        try:
            estimate(name, method="qlora", grad_ckpt=True, use_calibration=False)
        except VramfitError:  # QLoRA not modelled for this architecture (fused MoE experts)
            pass
        for gpu in ("h100", "t4"):  # the default plan's setups, on a bf16 card and on an fp16 one
            try:
                chosen = plan(name, gpu=gpu).chosen
            except VramfitError:  # nothing fits: the traces it needed are stored all the same
                chosen = None
            if templates and chosen is not None:  # `plan --simulate-allocator` replays the choice
                _plan_template(name, chosen.setup)
        # the second LoRA rank anchor of every LoRA/QLoRA trace: any rank is then interpolated
        # (trace.RANK_ANCHORS), so rank levers and --lora-r need no new trace
        from vramfit.model.trace import RANK_ANCHORS, activation_profile

        for (config_hash, key, needs_input_grad) in list(live._profiles):
            if key.method != "full" and key.lora_r in RANK_ANCHORS:
                spec = next(s for s in live._specs.values() if s.config_hash == config_hash)
                for r in RANK_ANCHORS:
                    activation_profile(spec, dataclasses.replace(key, lora_r=r), needs_input_grad)
        n += 1
    _pack(build_dir, dest)
    live.BUNDLED_ZIP = dest
    return n


def _plan_template(name: str, setup) -> None:
    """The event template of a plan's chosen setup, with its gradient accumulation (what the
    planner's capped replay expands), built and checked at that setup."""
    from vramfit.memory.replay import setup_template
    from vramfit.memory.setup import resolve_targets
    from vramfit.model.spec import load_spec

    spec = load_spec(name)
    setup_template(spec, setup, resolve_targets(spec, setup), setup.grad_accum, build=True)


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
    n = build_bundled(names or None, templates="--no-templates" not in sys.argv)
    print(f"bundled cache: {n} profiles -> {live.BUNDLED_ZIP}")
