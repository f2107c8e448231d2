"""MemoryTracker: a TrainerCallback that records GPU memory through a run, against the prediction.

Add it to any transformers/trl Trainer:

    tracker = MemoryTracker("run/memory_timeline.jsonl", predicted=vramfit.estimate(...))
    Trainer(..., callbacks=[tracker]).train()

It reads, at every step's start and end and from a sampler thread between them: torch's
allocated and reserved bytes, the allocator's peaks since the previous reading (it resets
torch's peak counters to get them: `reset_peaks=False` leaves them to you), and the process's
device memory as NVML lists it (what nvidia-smi shows, CUDA context included).  Every reading is
one JSON line, flushed at once, so a run that dies keeps its timeline.  At the end of training:
a summary line (measured against predicted peaks) and a PNG plot (`vramfit.report`).  Without
CUDA it records the host's resident memory and says that CUDA is absent.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

PEAK_KEYS = ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes")
# Sampler period: short enough to see each phase of a step of a small model, long enough that a
# 10-hour run writes a timeline of tens of MB.  The allocator's own peak counters catch what
# happens between readings.
DEFAULT_INTERVAL_S = 0.1
NO_CUDA_NOTE = ("CUDA is absent: torch allocated/reserved and NVML device memory do not exist here; "
                "the host's resident memory (rss_bytes) is recorded instead")


def predicted_peaks(predicted) -> dict | None:
    """An Estimate, a Breakdown, a Candidate or a dict -> {peak_allocated_bytes, peak_reserved_bytes, device_bytes}."""
    if predicted is None:
        return None
    get = predicted.get if isinstance(predicted, dict) else lambda k: getattr(predicted, k, None)
    out = {k: get(k) for k in PEAK_KEYS}
    if get("tokens_per_micro_batch") is not None:  # what the peaks were predicted at (packed: N tokens)
        out["tokens_per_micro_batch"] = get("tokens_per_micro_batch")
    return out


def torch_figures(stats: dict) -> dict:
    """torch's allocated and reserved bytes and their peaks from one read of the allocator's
    statistics (`torch.cuda.memory_stats_as_nested_dict()`): the values `memory_allocated()`,
    `memory_reserved()`, `max_memory_allocated()` and `max_memory_reserved()` return, without their
    cost: each of those reads every statistic and flattens and sorts them in Python, so a reading
    made of the four held the GIL 0.45-0.9 ms on a 2-core CPU (1.8-3.6 ms, 0.9-1.8%, of a 0.2 s step
    with its four readings), one read 0.01-0.02 ms (`python -m benchmarks.speed.train_overhead
    --tracker-bench`)."""
    def get(name: str, which: str) -> int:
        return ((stats.get(name) or {}).get("all") or {}).get(which, 0)

    return {"allocated_bytes": get("allocated_bytes", "current"), "reserved_bytes": get("reserved_bytes", "current"),
            "peak_allocated_bytes": get("allocated_bytes", "peak"),
            "peak_reserved_bytes": get("reserved_bytes", "peak")}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Nvml:
    """This process's device memory through NVML: the per-process figure where the driver lists
    the process, else the device's used memory above what it was when tracking began."""

    def __init__(self, index: int):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.pid = os.getpid()
        self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.source = None  # "process" | "device_minus_baseline"

    def read(self) -> int | None:
        nv = self.nvml
        for getter in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                for p in getter(self.handle):
                    if p.pid == self.pid and p.usedGpuMemory is not None:
                        self.source = "process"
                        return int(p.usedGpuMemory)
            except nv.NVMLError:
                pass
        self.source = "device_minus_baseline"
        return int(nv.nvmlDeviceGetMemoryInfo(self.handle).used) - self.baseline


def nvml_index() -> int:
    """NVML's index of the GPU this process uses: cuda:0, or cuda:LOCAL_RANK in a process that
    accelerate launched (one per GPU), mapped through CUDA_VISIBLE_DEVICES."""
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if local < len(visible):
        return int(visible[local]) if visible[local].isdigit() else local
    return local


class MemoryTracker(TrainerCallback):
    def __init__(self, path: str | os.PathLike | None = "memory_timeline.jsonl", predicted=None,
                 interval_s: float = DEFAULT_INTERVAL_S, plot_path: str | os.PathLike | None = "auto",
                 reset_peaks: bool = True, finish_on_train_end: bool = True):
        """path: the JSONL timeline (None: keep readings in memory only); predicted: the peaks to
        compare with; plot_path: the PNG ("auto": next to the timeline; None: no plot);
        finish_on_train_end: stop and summarize at on_train_end (False: call finish() yourself)."""
        self.path = Path(path) if path is not None else None
        self.plot_path = (self.path.with_suffix(".png") if self.path else None) if plot_path == "auto" else plot_path
        self.predicted = predicted_peaks(predicted)
        self.interval_s = interval_s
        self.reset_peaks = reset_peaks
        self.finish_on_train_end = finish_on_train_end
        self.cuda = False
        self.capacity_bytes = None
        self.allocator_limit_bytes = None
        self.measured = dict.fromkeys(PEAK_KEYS + ("rss_bytes",))  # the whole run
        self._attempt = dict(self.measured)  # since begin_attempt(): what the current setup used
        # free device memory plus what torch's allocator held when tracking began: the most it can reach
        self.allocator_room_bytes = None
        self.last: dict = {}
        self.step = 0
        self.records: list = []  # the lines, kept in memory only when there is no file
        self._file = None
        self._nvml = None
        self._t0 = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._finished = False

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "MemoryTracker":
        """Open the timeline and start the sampler (again after finish(), or a no-op if running)."""
        if self._thread is not None:
            return self
        import torch

        self._finished = False
        self._t0 = time.perf_counter()
        self.cuda = torch.cuda.is_available()
        header = {"kind": "start", "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "cuda": self.cuda, "predicted": self.predicted, "interval_s": self.interval_s}
        if self.cuda:
            dev = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(dev)
            self.capacity_bytes = int(props.total_memory)
            fraction = torch.cuda.get_per_process_memory_fraction(dev)
            if fraction < 1.0:
                self.allocator_limit_bytes = int(fraction * self.capacity_bytes)
            if self.allocator_room_bytes is None:
                self.allocator_room_bytes = int(torch.cuda.mem_get_info(dev)[0]) + torch.cuda.memory_reserved(dev)
            header.update(device=props.name, capacity_bytes=self.capacity_bytes,
                          allocator_limit_bytes=self.allocator_limit_bytes,
                          allocator_room_bytes=self.allocator_room_bytes)
            try:
                self._nvml = _Nvml(nvml_index())
            except Exception as exc:  # no NVML in this container: torch's figures still come
                header["nvml"] = f"unavailable ({type(exc).__name__})"
        else:
            header["note"] = NO_CUDA_NOTE
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._write(header)
        self.sample("first_reading")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="vramfit-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def finish(self) -> dict:
        """Stop sampling, write the summary line and the plot; returns the summary.  Idempotent."""
        if self._finished:
            return self.summary()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._t0 is None:  # never started
            self._finished = True
            return self.summary()
        self.sample("end")
        summary = self.summary()
        self._write({"kind": "summary", **summary})
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.plot_path is not None:
            from vramfit.run.timeline_plot import memory_timeline_plot

            memory_timeline_plot(self.records_of_last_session(), self.plot_path)
        self._finished = True
        return summary

    # ----------------------------------------------------------------- readings

    def reading(self) -> dict:
        """One reading now: torch, NVML and host figures (None where absent)."""
        r = dict.fromkeys(("allocated_bytes", "reserved_bytes", "peak_allocated_bytes", "peak_reserved_bytes",
                           "device_bytes"))
        r["rss_bytes"] = _rss_bytes()
        if self.cuda:
            import torch

            if torch.cuda.is_initialized():
                r.update(torch_figures(torch.cuda.memory_stats_as_nested_dict()))
                if self.reset_peaks:
                    torch.cuda.reset_peak_memory_stats()
            if self._nvml is not None:
                try:
                    r["device_bytes"] = self._nvml.read()
                except Exception:  # a failed read must not kill the run
                    pass
        return r

    def sample(self, kind: str = "sample", **extra) -> dict:
        with self._lock:
            if self._t0 is None:
                return {}
            rec = {"kind": kind, "t": round(time.perf_counter() - self._t0, 4), "step": self.step,
                   **self.reading(), **extra}
            for k in PEAK_KEYS + ("rss_bytes",):
                v = rec.get(k)
                for peaks in (self.measured, self._attempt):
                    if v is not None and (peaks[k] is None or v > peaks[k]):
                        peaks[k] = v
            self.last = rec
            self._write_locked(rec)
            return rec

    def begin_attempt(self, setup: dict | None = None, predicted=None) -> None:
        """A new setup starts (the OOM fall-back): its own peaks and prediction from here on."""
        self.start()
        if predicted is not None:
            self.predicted = predicted_peaks(predicted)
        self._attempt = dict.fromkeys(self._attempt)
        self.sample("event", message="setup", setup=setup, predicted=self.predicted)

    def attempt_peaks(self) -> dict:
        return dict(self._attempt)

    def attempt_peak(self, key: str) -> int | None:
        return self._attempt.get(key)

    def event(self, message: str, **data) -> None:
        """A line in the timeline for something that happened (an OOM, a re-plan, an interrupt)."""
        self.sample("event", message=message, **data)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a failed reading must not kill the run
                pass

    def _write(self, rec: dict) -> None:
        with self._lock:
            self._write_locked(rec)

    def _write_locked(self, rec: dict) -> None:
        if self._file is None:
            self.records.append(rec)
        else:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()

    def records_of_last_session(self) -> list:
        """The timeline since the last start line (a resumed run appends to the same file)."""
        recs = self.records
        if self.path is not None and self.path.is_file():
            recs = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        starts = [i for i, r in enumerate(recs) if r.get("kind") == "start"]
        return recs[starts[-1]:] if starts else recs

    # ----------------------------------------------------------------- results

    def summary(self) -> dict:
        """Measured peaks of the last setup against its predicted ones: error = (predicted -
        measured) / measured.  `measured_whole_run` includes setups the OOM fall-back left."""
        errors = {}
        for k in PEAK_KEYS:
            p, m = (self.predicted or {}).get(k), self._attempt.get(k)
            errors[k] = round((p - m) / m, 4) if p and m else None
        out = {"cuda": self.cuda, "measured": dict(self._attempt), "measured_whole_run": dict(self.measured),
               "predicted": self.predicted,
               "relative_error": errors, "capacity_bytes": self.capacity_bytes,
               "allocator_limit_bytes": self.allocator_limit_bytes}
        if self._nvml is not None:
            out["device_bytes_source"] = self._nvml.source
        if not self.cuda:
            out["note"] = NO_CUDA_NOTE
        return out

    # ----------------------------------------------------------------- TrainerCallback

    def on_train_begin(self, args, state, control, **kwargs):
        self.start()
        self.step = state.global_step
        self.sample("train_begin")

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1  # the step being run
        self.sample("step_begin")

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.sample("step_end")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.sample("evaluate", eval_loss=(metrics or {}).get("eval_loss"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if logs and self._t0 is not None:
            self._write({"kind": "log", "t": round(time.perf_counter() - self._t0, 4), "step": state.global_step,
                         **logs})

    def on_train_end(self, args, state, control, **kwargs):
        self.sample("train_end")
        if self.finish_on_train_end:
            self.finish()
