"""Memory readings inside the child: torch's allocator counters and NVML ("what nvidia-smi shows").

NVML gives the process's device memory (context + everything cudaMalloc'd, cuBLAS workspaces
and loaded kernels included), which is the figure a user compares with the card's size.
`NvmlSampler` polls it from a thread every ~5 ms and keeps the max; where the driver does not
list the process (some containers), it falls back to device-used minus the used-before-start
baseline, and says which it used.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import threading
import time

from vramfit.versions import installed

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "nvidia-ml-py")


def package_versions() -> dict:
    return installed(*PACKAGES)


def nvml_index() -> int:
    """NVML index of the device torch calls cuda:0 (first entry of CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


class NvmlSampler:
    """Polls this process's device memory through NVML in a thread; `peak` holds the max seen."""

    def __init__(self, interval_s: float = 0.005):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index())
        self.pid = os.getpid()
        self.interval_s = interval_s
        self.baseline_used = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.process_peak: int | None = None  # from the per-process list
        self.device_delta_peak = 0  # device used minus the baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def process_bytes(self) -> int | None:
        """This process's device memory as nvidia-smi lists it, or None if it is not listed."""
        nvml = self._nvml
        for getter in (nvml.nvmlDeviceGetComputeRunningProcesses,
                       nvml.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                for proc in getter(self.handle):
                    if proc.pid == self.pid and proc.usedGpuMemory is not None:
                        return int(proc.usedGpuMemory)
            except nvml.NVMLError:
                pass
        return None

    def device_delta(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used) - self.baseline_used

    def read(self) -> dict:
        """One reading now (also folded into the peaks)."""
        proc, delta = self.process_bytes(), self.device_delta()
        self._fold(proc, delta)
        return {"nvml_process_bytes": proc, "nvml_device_delta_bytes": delta}

    def _fold(self, proc: int | None, delta: int) -> None:
        if proc is not None and (self.process_peak is None or proc > self.process_peak):
            self.process_peak = proc
        if delta > self.device_delta_peak:
            self.device_delta_peak = delta
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._fold(self.process_bytes(), self.device_delta())
            except Exception:  # a failed read must not kill the measurement
                pass
            time.sleep(self.interval_s)

    def start(self) -> "NvmlSampler":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=2)
        self.read()
        source = "process" if self.process_peak is not None else "device_minus_baseline"
        peak = self.process_peak if self.process_peak is not None else self.device_delta_peak
        return {
            "nvml_peak_bytes": peak,
            "nvml_source": source,
            "nvml_process_peak_bytes": self.process_peak,
            "nvml_device_delta_peak_bytes": self.device_delta_peak,
            "nvml_baseline_used_bytes": self.baseline_used,
            "nvml_samples": self.samples,
        }

    def driver_version(self) -> str:
        version = self._nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version


def start_sampler() -> NvmlSampler | None:
    """A running sampler, or None where there is no NVML (CPU machines)."""
    try:
        return NvmlSampler().start()
    except Exception:
        return None


def torch_memory(torch) -> dict:
    """Allocated and reserved now (None on CPU)."""
    if not torch.cuda.is_available():
        return {"allocated_bytes": None, "reserved_bytes": None}
    torch.cuda.synchronize()
    return {"allocated_bytes": torch.cuda.memory_allocated(),
            "reserved_bytes": torch.cuda.memory_reserved()}


def environment(torch, sampler: NvmlSampler | None) -> dict:
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "gpu_name": props.name if props else None,
        "gpu_total_bytes": props.total_memory if props else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "driver": sampler.driver_version() if sampler else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "versions": package_versions(),
        "hostname": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
