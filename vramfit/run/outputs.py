"""What a run writes and reads back: the output folder's checks, checkpoints per method, JSON
files and run_report.json."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from vramfit.errors import VramfitError
from vramfit.memory.setup import Setup

PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "vramfit")
REPORT_NAME, SETUP_NAME = "run_report.json", "run_setup.json"



def _checkpoint_dir(out: Path, s: Setup) -> Path:
    """Checkpoints per method: a fall-back to another method starts a new series."""
    return out / "checkpoints" / s.method


def _last_checkpoint(out: Path, s: Setup) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    d = _checkpoint_dir(out, s)
    return get_last_checkpoint(str(d)) if d.is_dir() else None


def _check_out_dir(out: Path, resume: bool) -> dict | None:
    """A finished or started run is never overwritten; --resume needs one.  -> the saved run or None."""
    saved = out / SETUP_NAME
    if resume:
        if not saved.is_file():
            raise VramfitError(f"nothing to resume in {out}: it holds no {SETUP_NAME} from an earlier run")
        return json.loads(saved.read_text())
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VramfitError(f"{out} already exists and is not empty: choose another --out, or --resume the run in it")
    return None


def _setup_json(s: Setup) -> dict:
    d = asdict(s)
    if not d.get("extras"):  # kept where it says something: packing's example length, for --resume
        d.pop("extras", None)
    return d


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def versions() -> dict:
    from vramfit.versions import installed

    return installed(*PACKAGES)


def _run_report(status, source, opts, d, s, plan, predicted, runner, max_steps, outputs, loss_note, cuda) -> dict:
    def merged(key: str) -> list:  # later attempts redo the steps after their checkpoint: theirs win
        by_step = {}
        for a in runner.attempts:
            by_step.update({x["step"]: x for x in a[key]})
        return [by_step[k] for k in sorted(by_step)]

    losses, evals = merged("losses"), merged("eval_losses")
    trainer = runner.trainer
    return {
        "status": status, "model": source.name, "model_path": source.path, "init": source.init,
        "data": d.to_json(), "loss_note": loss_note,
        "setup": _setup_json(s), "initial_setup": runner.attempts[0]["setup"] if runner.attempts else _setup_json(s),
        "plan": plan.to_json() if plan is not None else None,
        "predicted": predicted, "measured": runner.summary,
        "attempts": [{k: v for k, v in a.items() if k not in ("losses", "eval_losses")} for a in runner.attempts],
        "fallbacks": runner.fallbacks,
        "steps": runner.attempts[-1]["last_step"] if runner.attempts else runner.run_state["step_offset"],
        "max_steps": max_steps, "train_seconds": round(runner.seconds, 2),
        "tokens_seen": trainer.state.num_input_tokens_seen if trainer is not None else None,
        "losses": losses, "eval_losses": evals, "final_loss": losses[-1]["loss"] if losses else None,
        "best_eval_loss": min((e["eval_loss"] for e in evals), default=None),
        "options": asdict(opts), "cuda": cuda, "outputs": outputs, "versions": versions(),
    }


def throughput(spec, s: Setup, attempts: list, cuda: bool) -> dict | None:
    """The training steps' tokens/s (the step clock of each attempt: the second step on, evaluation and
    saving outside) and, on a GPU with a bundled profile, the model FLOPs utilization: tokens/s x
    `planner.cost.model_flops_per_token` over the card's dense peak at the compute dtype."""
    clocks = [a.get("step_clock") or {} for a in attempts]
    steps = sum(c.get("steps", 0) for c in clocks)
    seconds = sum(c.get("seconds", 0.0) for c in clocks)
    tokens = sum(c.get("tokens", 0) for c in clocks)
    if not steps or seconds <= 0 or tokens <= 0:
        return None
    out = {"steps": steps, "seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
    if not cuda:
        return out
    from vramfit.memory.setup import resolve_targets
    from vramfit.planner.cost import model_flops_per_token
    from vramfit.planner.gpu import profile_for_name

    try:
        import torch

        name = torch.cuda.get_device_name()
        prof = profile_for_name(name, torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - no name, no profile: tokens/s only
        return out
    if prof is None:
        return out
    peak = {"bfloat16": prof.bf16_tflops, "float16": prof.fp16_tflops}.get(s.compute_dtype, 0.0) * 1e12
    if peak <= 0:
        return out
    flops = model_flops_per_token(spec, s, resolve_targets(spec, s))
    out.update(gpu=name, gpu_profile=prof.key, peak_flops=peak, model_flops_per_token=round(flops),
               mfu=round(tokens / seconds * flops / peak, 4))
    return out
