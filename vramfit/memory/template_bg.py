"""An estimate at a setup whose event template is not cached answers from the real replay on the meta
device (one full-size recording: ~5-10 s for a 7-8B model on a 2-core CPU) and leaves the template's
build (the shrunk model's ~15 traces, checked against a full-size replay: ~15-40 s more) to a process of
its own, detached, so that the next estimate of the same discrete setup (any sequence length, rank and
micro-batch of its regime) expands it in ~0.5 s.

`VRAMFIT_TEMPLATE_BUILD`: `background` (what `vramfit estimate` asks for), `now` (build before answering,
the library's default and the tests'), `off` (never build: the real replay answers every time).

    python -m vramfit.memory.template_bg JOB.json      # the detached build (what `spawn` starts)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

MODES = ("background", "now", "off")
STALE_S = 900  # a build marker older than this is a build that died: another may start


def replay_default() -> bool:
    """Whether the default answer is the allocator replay: VRAMFIT_REPLAY, unless 0 / off / false / no (the
    fitted analytic figure instead: the tests' default, the planner's pruning bound)."""
    return os.environ.get("VRAMFIT_REPLAY", "1").lower() not in ("0", "off", "false", "no")


def mode(asked: str = "now") -> str:
    """The template build mode: the environment's VRAMFIT_TEMPLATE_BUILD, else `asked`."""
    got = os.environ.get("VRAMFIT_TEMPLATE_BUILD", "").strip().lower() or asked
    return got if got in MODES else "now"


def _marker(spec, setup) -> Path:
    from vramfit.memory.template_cache import template_key
    from vramfit.model import cache

    return cache.cache_dir() / "templates" / f"{template_key(spec, setup, 1)}.building"


def spawn(spec, setup, eval_batch: int | None = None) -> bool:
    """Start the detached build of `setup`'s step and post-training templates; False where one of the same
    key is already running (its marker younger than STALE_S) or the process cannot start."""
    marker = _marker(spec, setup)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        if marker.exists() and time.time() - marker.stat().st_mtime < STALE_S:
            return False
        marker.write_text(str(os.getpid()))
        job = {"name": spec.name, "config": spec.config, "setup": asdict(setup),
               "eval_batch": eval_batch, "marker": str(marker)}
        fd, path = tempfile.mkstemp(prefix="vramfit-template-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(job, f)
        subprocess.Popen([sys.executable, "-m", "vramfit.memory.template_bg", path], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         env={**os.environ, "VRAMFIT_TEMPLATE_BUILD": "now"})
    except OSError:
        return False
    return True


def replay_now(spec, setup, targets, bd, c, eval_batch: int | None = None, asked: str = "now"):
    """`replayed_breakdown`'s answer where no template of `setup` is cached and the mode is not `now`: the
    real replay (`simulated_breakdown`), the build spawned (`background`); None where a template is cached,
    known not to exist, or the mode is `now` (the caller goes on as before)."""
    from dataclasses import replace

    from vramfit.memory.replay import simulated_breakdown
    from vramfit.memory.template_cache import NOT_CACHED, setup_template

    how = mode(asked)
    if how == "now":
        return None
    got = setup_template(spec, setup, targets, 1, build=False)
    if got["template"] is not None or got["note"] != NOT_CACHED:
        return None
    out = simulated_breakdown(spec, setup, targets, bd, c, eval_batch=eval_batch)
    if how == "background" and spawn(spec, setup, eval_batch):
        note = ("this setup's event template is being built in the background: the next estimate of it (any "
                "sequence length, rank or larger micro-batch) takes ~0.5 s")
    else:
        note = "no event template built (VRAMFIT_TEMPLATE_BUILD=off, or a build of it is running)"
    return replace(out, notes=out.notes + (note,))


def replayed_breakdown(spec, setup, targets, bd, c, eval_batch: int | None = None, template_build: str = "now"):
    """`vramfit.memory.replay.replayed_breakdown` with the template build of `template_build` (`mode`)."""
    from vramfit.memory import replay

    now = replay_now(spec, setup, targets, bd, c, eval_batch, template_build)
    return now if now is not None else replay.replayed_breakdown(spec, setup, targets, bd, c, eval_batch=eval_batch)


def build_job(path: str) -> None:
    """The detached process: both templates built and cached (exact or with the reason why not), the
    marker removed."""
    import warnings

    from vramfit.memory.replay import post_template
    from vramfit.memory.template_cache import setup_template
    from vramfit.memory.setup import Setup, resolve_targets
    from vramfit.model.spec import spec_from_config

    job = json.loads(Path(path).read_text())
    Path(path).unlink(missing_ok=True)
    try:
        spec = spec_from_config(job["name"], job["config"])
        setup = Setup(**job["setup"])
        targets = resolve_targets(spec, setup)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setup_template(spec, setup, targets, 1, build=True)
            post_template(spec, setup, targets, job.get("eval_batch"), build=True)
    finally:
        Path(job["marker"]).unlink(missing_ok=True)


if __name__ == "__main__":  # pragma: no cover - the detached build
    build_job(sys.argv[1])
