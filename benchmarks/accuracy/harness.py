"""Run a grid of cases, each in a fresh forked process, and append one JSON line per case.

    python -m benchmarks.accuracy.harness --grid issue2 --out benchmarks/results/h100-2026-11-23-issue2.jsonl
    python -m benchmarks.accuracy.harness --grid full --shard 1/3 --skip-done --out ...
    python -m benchmarks.accuracy.harness --grid issue2 --list

The parent imports torch/transformers once (never initialising CUDA) and forks one child
per case, so each case starts with a fresh CUDA context but pays no import time. The child
sends partial results (after model load) and a final result through a pipe; a child that hangs
past `--timeout` is killed and recorded as `timeout` with what it had sent. Each line is flushed
and fsynced as soon as its case ends, so a killed run loses nothing already done.

A result line holds: id, label, grid, status (ok | oom | error | timeout | crash), case (the whole
case dict), config (the HF config trained), environment (GPU, driver, CUDA, versions, host, date),
params (counts as peft prints them, bytes per dtype), after_cuda_init / after_load (allocated,
reserved, NVML bytes), peak_allocated_bytes / peak_reserved_bytes (whole run), nvml_peak_bytes
(+ nvml_source), phases_outside_steps (load, setup) and steps[].phases (forward, backward, clip,
optimizer, post_step, idle: peaks and end values), step_seconds, tokens_per_second,
gradient_checkpointing (function and kwargs transformers used), oom_phase / oom_step /
oom_tried_to_allocate, traceback / log_tail, seconds. load_seconds includes importing peft and
bitsandbytes in the child (they cannot be imported before the fork, see preimport).

QLoRA cases load a random-init bf16 checkpoint saved once per (model, config_overrides) by its
own child into `--checkpoint-dir`, like a user's `from_pretrained` of a Hub checkpoint; it is
deleted when no later case in the run needs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

from . import cases, grids

MIB = 1 << 20
DEFAULT_TIMEOUT_S = 300
RESULTS_DIR = cases.REPO_ROOT / "benchmarks" / "results"


def preimport() -> None:
    """Import the heavy modules in the parent so children fork with them loaded; CUDA stays off.

    Not peft nor TrainingArguments/Trainer: they import bitsandbytes, whose import initialises
    CUDA (it reads the device capability), and a forked child cannot use a CUDA context made
    before the fork. Children import those themselves.
    """
    import torch
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in the parent: forked children could not use it")


def _child_main(conn, kind: str, case: dict, extra: str | None, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        from . import context_case, train_case

        report = lambda partial: conn.send(("partial", partial))  # noqa: E731
        if kind == "train":
            result = train_case.run(case, report, checkpoint_dir=extra)
        elif kind == "context":
            result = context_case.run(case, report)
        elif kind == "checkpoint":
            result = train_case.save_random_checkpoint(case, extra)
        else:
            raise ValueError(f"unknown case kind {kind!r}")
    except BaseException:
        result = {"status": "error", "traceback": traceback.format_exc()[-3000:]}
    sys.stdout.flush()
    sys.stderr.flush()
    conn.send(("final", result))
    conn.close()
    os._exit(0)


def _log_tail(path: str, chars: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_in_child(kind: str, case: dict, timeout_s: float, log_path: str,
                 extra: str | None = None) -> dict:
    """Fork a child for one case; return its final result (or what it sent, marked timeout/crash)."""
    # fork saves the imports per case; a process whose OpenMP pool or CUDA is already running (a
    # test session, say) cannot fork safely and sets VRAMFIT_HARNESS_START_METHOD=spawn
    context = multiprocessing.get_context(os.environ.get("VRAMFIT_HARNESS_START_METHOD", "fork"))
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(sender, kind, case, extra, log_path))
    process.start()
    sender.close()
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    result = None
    while result is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            process.kill()
            result = dict(last, status="timeout", timeout_seconds=timeout_s)
        elif receiver.poll(min(remaining, 1.0)):
            try:
                tag, payload = receiver.recv()
            except EOFError:
                process.join(5)
                result = dict(last, status="crash", exitcode=process.exitcode)
                continue
            if tag == "final":
                result = payload
            else:
                last = payload
        elif not process.is_alive():
            result = dict(last, status="crash", exitcode=process.exitcode)
    process.join(30)
    if process.is_alive():
        process.kill()
        process.join()
    receiver.close()
    if result.get("status") not in ("ok", "skipped"):
        result["log_tail"] = _log_tail(log_path)
    return result


def load_cases(grid: str | None, cases_file: str | None) -> list[dict]:
    if cases_file:
        listed = json.loads(Path(cases_file).read_text())
    else:
        listed = grids.get(grid)
    return [dict(case, id=cases.case_id(case)) for case in listed]


def select(all_cases: list[dict], shard: str | None, only: str | None,
           done: set[str]) -> list[dict]:
    chosen = all_cases
    if shard:
        index, count = (int(x) for x in shard.split("/"))
        if not 1 <= index <= count:
            raise SystemExit(f"--shard {shard}: want i/n with 1 <= i <= n")
        chosen = [c for k, c in enumerate(chosen) if k % count == index - 1]
    if only:
        pattern = re.compile(only)
        chosen = [c for c in chosen if pattern.search(c["id"]) or pattern.search(cases.case_label(c))]
    return [c for c in chosen if c["id"] not in done]


def done_ids(out: Path) -> set[str]:
    if not out.exists():
        return set()
    ids = set()
    for line in out.read_text().splitlines():
        if line.strip():
            ids.add(json.loads(line).get("id"))  # other benchmarks' lines have no case id
    ids.discard(None)
    return ids


def gpu_slug() -> str:
    """'h100', 'h200', ... from NVML (no CUDA init), or 'cpu'."""
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        name = name.decode() if isinstance(name, bytes) else name
    except Exception:
        return "cpu"
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (match.group(1) if match else re.sub(r"\W+", "-", name)).lower()


def append_line(out: Path, line: dict) -> None:
    with open(out, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def progress_line(k: int, n: int, case: dict, result: dict, seconds: float) -> str:
    status = result.get("status")
    if status == "oom":
        status += f"@{result.get('oom_phase')}"
    if case.get("kind") == "context":
        init = result.get("after_cuda_init", {}).get("nvml_process_bytes")
        peaks = f"context nvml {_mib(init)} MiB"
    else:
        peaks = (f"alloc {_mib(result.get('peak_allocated_bytes'))} "
                 f"reserved {_mib(result.get('peak_reserved_bytes'))} "
                 f"nvml {_mib(result.get('nvml_peak_bytes'))} MiB")
    return f"[{k}/{n}] {cases.case_label(case)} {status} {peaks} {seconds:.1f}s"


class CheckpointCache:
    """Random-init checkpoints for QLoRA cases, made on first need, removed after last use."""

    def __init__(self, root: Path, pending: list[dict], timeout_s: float, log_dir: Path):
        self.root, self.timeout_s, self.log_dir = root, timeout_s, log_dir
        self.uses: dict[str, int] = {}
        for case in pending:
            if case.get("method") == "qlora":
                key = cases.checkpoint_key(case)
                self.uses[key] = self.uses.get(key, 0) + 1

    def get(self, case: dict) -> tuple[str, dict]:
        key = cases.checkpoint_key(case)
        directory = self.root / key
        if (directory / "COMPLETE").exists():
            return str(directory), {"key": key, "reused": True}
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        made = run_in_child("checkpoint", case, self.timeout_s,
                            str(self.log_dir / f"checkpoint-{key}.log"), extra=str(directory))
        return str(directory), {"key": key, "reused": False, **made}

    def release(self, case: dict, keep: bool) -> None:
        key = cases.checkpoint_key(case)
        self.uses[key] -= 1
        if self.uses[key] == 0 and not keep:
            shutil.rmtree(self.root / key, ignore_errors=True)


def run_case(case: dict, grid: str, timeout_s: float, log_dir: Path,
             checkpoints: CheckpointCache) -> dict:
    log_path = str(log_dir / f"{case['id']}.log")
    line = {"id": case["id"], "label": cases.case_label(case), "grid": grid}
    kind = case.get("kind", "train")
    if kind == "train" and case["method"] == "qlora":
        directory, made = checkpoints.get(case)
        line["checkpoint"] = {k: v for k, v in made.items() if k != "log_tail"}
        if made.get("status", "ok") != "ok":
            return dict(line, status="error", error_phase="checkpoint",
                        traceback=made.get("traceback") or made.get("log_tail"),
                        case={k: v for k, v in case.items() if k != "id"})
        result = run_in_child(kind, case, timeout_s, log_path, extra=directory)
    else:
        result = run_in_child(kind, case, timeout_s, log_path)
    plain = {k: v for k, v in case.items() if k != "id"}
    return dict(line, status=result.pop("status", "error"), case=plain, **result)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.harness",
                                     description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--grid", choices=sorted(grids.GRIDS), help="named grid in grids.py")
    source.add_argument("--cases", help="JSON file holding a list of case dicts")
    parser.add_argument("--out", help="JSONL to append to (default "
                        "benchmarks/results/<gpu>-<date>-<grid>.jsonl)")
    parser.add_argument("--shard", help="i/n: every n-th case starting at the i-th (1-based)")
    parser.add_argument("--only", help="regex on case id or label")
    parser.add_argument("--skip-done", action="store_true",
                        help="skip cases whose id already has a line in --out")
    parser.add_argument("--done-in", nargs="+", default=[], metavar="JSONL",
                        help="skip cases whose id has a line in any of these files too "
                             "(the committed results of earlier sessions)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds per case (default %(default)s)")
    parser.add_argument("--log-dir", default="/tmp/vramfit-harness-logs",
                        help="one log per child (stdout+stderr)")
    parser.add_argument("--checkpoint-dir", default="/tmp/vramfit-checkpoints",
                        help="random-init checkpoints for QLoRA cases")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = args.grid or Path(args.cases).stem
    out = Path(args.out) if args.out else RESULTS_DIR / (
        f"{gpu_slug()}-{datetime.date.today().isoformat()}-{grid}.jsonl")
    all_cases = load_cases(args.grid, args.cases)
    done = set().union(*(done_ids(Path(f)) for f in args.done_in))
    if args.skip_done:
        done |= done_ids(out)
    chosen = select(all_cases, args.shard, args.only, done)
    if args.list:
        for case in chosen:
            print(case["id"], cases.case_label(case))
        print(f"{len(chosen)} of {len(all_cases)} cases")
        return 0
    preimport()
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = CheckpointCache(Path(args.checkpoint_dir), chosen, args.timeout, log_dir)
    print(f"{len(chosen)} of {len(all_cases)} cases -> {out}", flush=True)
    started = time.monotonic()
    counts: dict[str, int] = {}
    for k, case in enumerate(chosen, 1):
        t = time.monotonic()
        line = run_case(case, grid, args.timeout, log_dir, checkpoints)
        line["wall_seconds"] = time.monotonic() - t
        append_line(out, line)
        if case.get("method") == "qlora":
            checkpoints.release(case, args.keep_checkpoints)
        counts[line["status"]] = counts.get(line["status"], 0) + 1
        print(progress_line(k, len(chosen), case, line, line["wall_seconds"]), flush=True)
        if line["status"] not in ("ok", "oom", "skipped"):
            detail = line.get("traceback") or line.get("log_tail") or ""
            print("    " + "\n    ".join(detail.strip().splitlines()[-6:]), flush=True)
    print(f"done: {counts} in {time.monotonic() - started:.0f}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
