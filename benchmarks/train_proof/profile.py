"""Where a training step's time goes: torch.profiler over a few steps of a real run.

    python3 -m benchmarks.train_proof.profile --out DIR [--wait 4] [--active 3] -- train MODEL DATA ...
    python3 -m benchmarks.train_proof.profile --out DIR --proof-run 1b-lora [--tiny] [--work DIR] [-- EXTRA ...]
        [--memory-history] [--no-profiler]: also (or only) torch's allocation stream of those steps
    VRAMFIT_PROFILE_DIR=DIR python3 -m benchmarks.plan_proof.run ...     # the first trial of each worker

The first two wrap `vramfit train` (the second runs one of the train proof's runs, with its data,
tokenizer and options, for 10 steps; EXTRA options are appended, so `-- --precision bf16-true`
varies it).  The third profiles the plan proof's trainers.  In each, the first Trainer made gets a
callback that profiles steps wait+1 .. wait+active (CPU and CUDA activity) and writes, under DIR:
- profile-<n>.txt: each profiled step's wall seconds (synchronised at step ends), the share of the
  wall the GPU's kernels were busy, and the op tables by self CPU time and by self CUDA time;
- steps.jsonl: every step's wall seconds.
It answers one question: is a step bound by the GPU (kernels busy close to 100% of the wall) or by
the host (Python, a synchronisation, the allocator's cudaMalloc/cudaFree, a sampler thread)?
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def install(out: str | os.PathLike, wait: int = 4, active: int = 3, trainers: int = 1, history: bool = False,
            profile: bool = True) -> None:
    """Give the first `trainers` transformers Trainers made from now on a step profiler.
    history: also record torch's CUDA allocation stream over the same steps and write it as
    `history-<n>.json.gz` (benchmarks.accuracy.memory_history's format: allocations with their
    Python frames, frees, segment releases), for what the replay of a `vramfit train` step misses.
    profile=False: the history (or the step times) alone, without the profiler's overhead."""
    import torch
    import transformers
    from transformers import TrainerCallback

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    made = []

    class StepProfiler(TrainerCallback):
        def __init__(self, n: int):
            self.n, self.prof, self.t0, self.walls = n, None, None, []
            self.log = open(out / "steps.jsonl", "a")

        def _now(self):
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == wait and self.prof is None:
                if history and cuda:
                    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.prof = torch.profiler.profile(activities=acts) if profile else _NoProfile()
                self.prof.__enter__()
            self.t0 = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            wall = self._now() - self.t0
            self.walls.append(wall)
            self.log.write(json.dumps({"trainer": self.n, "step": state.global_step, "wall_s": round(wall, 5)}) + "\n")
            self.log.flush()
            if self.prof and state.global_step == wait + active:
                self.prof.__exit__(None, None, None)
                if history and cuda:
                    self.write_history(args)
                if profile:
                    self.write(self.prof, self.walls[-active:], args)
                self.prof = False  # done

        def write_history(self, args):
            import gzip

            from benchmarks.accuracy.memory_history import events_from_snapshot

            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            events = events_from_snapshot(snapshot)
            info = {"steps": [wait + 1, wait + active], "micro_batch": args.per_device_train_batch_size,
                    "grad_accum": args.gradient_accumulation_steps, "walls_s": [round(w, 4) for w in self.walls]}
            with gzip.open(out / f"history-{self.n}.json.gz", "wt") as f:
                json.dump({"case": None, "trainer": info, "events": events}, f)
            print(f"[profile] trainer {self.n}: {len(events)} allocation events -> history-{self.n}.json.gz",
                  flush=True)

        def write(self, prof, walls, args):
            ka = prof.key_averages()
            gpu_us = sum(e.self_device_time_total for e in ka) if cuda else 0
            head = (f"trainer {self.n} (micro-batch {args.per_device_train_batch_size} x "
                    f"{args.gradient_accumulation_steps}): steps {wait + 1}..{wait + active}: wall {sum(walls):.3f} s "
                    f"({', '.join(f'{w:.3f}' for w in walls)}); GPU kernels busy {gpu_us / 1e6:.3f} s "
                    f"= {gpu_us / 1e6 / max(sum(walls), 1e-9):.1%} of the wall")
            lines = [head, "", "## by self CPU time", ka.table(sort_by="self_cpu_time_total", row_limit=40), ""]
            if cuda:
                lines += ["## by self CUDA time", ka.table(sort_by="self_cuda_time_total", row_limit=25)]
            (out / f"profile-{self.n}.txt").write_text("\n".join(lines))
            print("[profile] " + head, flush=True)

    real_init = transformers.Trainer.__init__

    def __init__(self, *a, callbacks=None, **kw):
        callbacks = list(callbacks or [])
        if len(made) < trainers:
            made.append(1)
            callbacks.append(StepProfiler(len(made)))
        real_init(self, *a, callbacks=callbacks, **kw)

    transformers.Trainer.__init__ = __init__


class _NoProfile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __bool__(self):
        return True


def install_from_env() -> None:
    """VRAMFIT_PROFILE_DIR set: install() there (VRAMFIT_PROFILE_WAIT / _ACTIVE / _TRAINERS)."""
    where = os.environ.get("VRAMFIT_PROFILE_DIR")
    if where:
        install(where, int(os.environ.get("VRAMFIT_PROFILE_WAIT", 4)), int(os.environ.get("VRAMFIT_PROFILE_ACTIVE", 3)),
                int(os.environ.get("VRAMFIT_PROFILE_TRAINERS", 1)))


def proof_run_args(name: str, work: Path, tiny: bool, extra: list) -> list:
    from benchmarks.train_proof import run as proof

    runs = {r[0]: r for r in (proof.TINY_RUNS if tiny else proof.GPU_RUNS)}
    if name not in runs:
        raise SystemExit(f"--proof-run: one of {', '.join(runs)}")
    _, model, opts, _ = runs[name]
    work.mkdir(parents=True, exist_ok=True)
    inputs = proof.build_inputs(work)
    shutil.rmtree(work / name, ignore_errors=True)  # a previous profile's run
    cmd = proof.command(name, model, [*opts, "--max-steps", "10", *extra], inputs, work / name, tiny)
    return cmd[cmd.index("train"):]


def main() -> None:
    from vramfit.cli import main as cli_main

    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    own, rest = argv[:split], argv[split + 1:]

    def opt(name, default):
        return type(default)(own[own.index(name) + 1]) if name in own else default

    out = Path(opt("--out", "profile_out"))
    install(out, opt("--wait", 4), opt("--active", 3), history="--memory-history" in own,
            profile="--no-profiler" not in own)
    if "--proof-run" in own:
        work = Path(opt("--work", str(Path(tempfile.gettempdir()) / "vramfit-profile-work")))
        rest = proof_run_args(opt("--proof-run", ""), work, "--tiny" in own, rest)
    sys.argv = [sys.argv[0], *rest]
    cli_main()


if __name__ == "__main__":
    main()
