"""GPUs: the pynvml probe and the bundled profiles (profiles/gpus.toml) -> Device.

A `Device` is what the planner needs to know about a card: how much memory the run may use
(`free_bytes`), whether it does bf16, and its dense tensor TFLOPS and memory bandwidth for the
cost model.  `resolve_gpu(text)` turns what a user types after `--gpu` into one:

- `auto` (or `cuda:N`): probe with NVML; the free memory of the chosen GPU is the budget;
- a profile name, matched loosely: `3060`, `RTX 3060`, `rtx-3060`, `T4`, `h100`;
- a size: `12GB` (decimal, 12 x 10^9 bytes), `12GiB` (binary, 12 x 2^30), `12000MiB`.

Nothing here imports torch; pynvml is imported only by the probe.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import tomllib
from dataclasses import dataclass

from vramfit.errors import VramfitError
from vramfit.model.spec import PROFILES_DIR

GPUS_FILE = PROFILES_DIR / "gpus.toml"
DEFAULT_THROUGHPUT_PROFILE = "rtx-4090"

# Memory the driver keeps on an idle card, outside what CUDA can allocate: nvidia-smi's total
# minus cudaMemGetInfo's total.  Measured: H100 80GB 81559 - 81079 MiB = 0.59%; H200
# 143771 - 143155 MiB = 0.43% (profiles/README.md).  Applied to profiles, not to probes
# (NVML's free memory is already net of it) nor to sizes (a size is the budget itself).
DRIVER_RESERVED_FRACTION = 0.006

# Size units: decimal (SI) and binary (IEC) kept apart, as the issue asks.
SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
SIZE_FORMS = "12GB (decimal, 10^9 bytes), 12GiB (binary, 2^30 bytes), 12000MiB, 0.5TB"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)?\s*$")
# Words dropped before matching a name: "NVIDIA GeForce RTX 3060" matches "rtx-3060".
_NOISE_WORDS = ("nvidia", "geforce", "tesla", "graphics", "card")


@dataclass(frozen=True)
class Device:
    """One GPU as the planner sees it; all memory in bytes."""

    name: str
    total_bytes: int
    free_bytes: int  # what a new training process may use: the budget before headroom
    bf16: bool
    compute_capability: str  # "major.minor"
    bf16_tflops: float  # dense tensor-core peak, FP32 accumulate; 0 without bf16
    fp16_tflops: float
    bandwidth_bytes_per_s: int
    source: str  # "probe" | "profile" | "size"
    key: str | None = None  # the profile's key in gpus.toml, when one describes this card
    index: int | None = None  # NVML index, for probed GPUs
    used_by_others_bytes: int = 0  # probed: memory held by other processes
    throughput_from: str | None = None  # profile whose TFLOPS/bandwidth were borrowed, if any
    note: str = ""

    def tflops(self, compute_dtype: str) -> float:
        """Dense peak TFLOPS for matmuls in `compute_dtype` (bfloat16 / float16)."""
        if compute_dtype == "bfloat16" and self.bf16:
            return self.bf16_tflops
        return self.fp16_tflops


@dataclass(frozen=True)
class Probe:
    """What NVML reports about this machine."""

    driver_version: str
    cuda_version: str  # the highest CUDA the driver supports, "12.4"
    devices: tuple  # Device per GPU, NVML order


# --------------------------------------------------------------------------- profiles


@functools.lru_cache(maxsize=1)
def gpu_table() -> dict:
    """gpus.toml's [gpus] table, read once: {key: its fields}."""
    with GPUS_FILE.open("rb") as f:
        return tomllib.load(f)["gpus"]


@functools.lru_cache(maxsize=1)
def load_profiles() -> dict:
    """gpus.toml -> {key: Device} (source "profile"), in file order."""
    out = {}
    for key, g in gpu_table().items():
        total = int(g["memory_bytes"])
        out[key] = Device(name=g["name"], total_bytes=total,
                          free_bytes=total - int(total * DRIVER_RESERVED_FRACTION), bf16=bool(g["bf16"]),
                          compute_capability=str(g["compute_capability"]),
                          bf16_tflops=float(g["bf16_tflops"]), fp16_tflops=float(g["fp16_tflops"]),
                          bandwidth_bytes_per_s=int(g["bandwidth_bytes_per_s"]), source="profile", key=key)
    return out


@functools.lru_cache(maxsize=1)
def _aliases() -> dict:
    """compact name -> profile key, for the key, every alias and the marketing name."""
    out = {}
    for key, g in gpu_table().items():
        for name in (key, *g.get("aliases", ()), g["name"]):
            out.setdefault(_compact(name), key)
    return out


def _compact(text: str) -> str:
    """'NVIDIA GeForce RTX 3060' -> 'rtx3060': lower case, noise words and separators dropped."""
    t = text.lower()
    for w in _NOISE_WORDS:
        t = t.replace(w, "")
    return re.sub(r"[^a-z0-9]", "", t)


def find_profile(text: str) -> Device | None:
    """A profile by name, alias or marketing name, loosely spelled; None when nothing matches."""
    key = _aliases().get(_compact(text))
    return load_profiles()[key] if key else None


def profile_for_name(name: str, total_bytes: int | None = None) -> Device | None:
    """The profile describing a probed card ('NVIDIA H100 80GB HBM3'): the longest alias the
    compact name contains, ties broken by the closest memory; None when nothing fits."""
    compact = _compact(name)
    exact = _aliases().get(compact)
    if exact:
        return load_profiles()[exact]
    longest: dict = {}  # profile key -> its longest alias inside the name (3+ characters)
    for alias, key in _aliases().items():
        if len(alias) >= 3 and alias in compact:
            longest[key] = max(longest.get(key, 0), len(alias))
    if not longest:
        return None
    profiles = load_profiles()
    best = max(longest.values())
    tied = [k for k, n in longest.items() if n == best]
    if total_bytes is not None:
        tied.sort(key=lambda k: abs(profiles[k].total_bytes - total_bytes))
    return profiles[tied[0]]


def default_profile() -> Device:
    """Throughput stand-in for a card known only by its memory (or not in the profiles): the
    RTX 4090, the commonest card people fine-tune on at home; one card for every size, so that
    tokens/s compare across sizes."""
    return load_profiles()[DEFAULT_THROUGHPUT_PROFILE]


# --------------------------------------------------------------------------- sizes


def parse_size(text: str, what: str = "size") -> int:
    """'12GB' -> 12_000_000_000, '12GiB' -> 12_884_901_888.  Bare numbers are ambiguous: refused."""
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").lower() if m else ""
    if not m or unit not in SIZE_UNITS:
        if m and not unit:
            raise VramfitError(f"{what} '{text}' has no unit: write {text.strip()}GB (decimal) or "
                               f"{text.strip()}GiB (binary)")
        raise VramfitError(f"malformed {what} '{text}'; accepted forms: {SIZE_FORMS}")
    value = int(float(m.group(1)) * SIZE_UNITS[unit])
    if value <= 0:
        raise VramfitError(f"{what} '{text}' must be larger than zero")
    return value


def size_device(text: str) -> Device:
    """A card known only by its memory: bf16 assumed, throughput borrowed from `default_profile`."""
    total = parse_size(text, "GPU size")
    stand_in = default_profile()
    note = f"tokens/s assumed for an {stand_in.name}; name your card with --gpu for its own"
    number, unit = _SIZE_RE.match(text).groups()
    if unit.lower() in ("kb", "mb", "gb", "tb"):
        binary = f"{number}{unit[0].upper()}iB"
        note += (f"; {text.strip()} is read as decimal units: a card sold as {number} GB has "
                 f"{binary} (give --gpu {binary} or its name)")
    return Device(name=text.strip(), total_bytes=total, free_bytes=total, bf16=True,
                  compute_capability=stand_in.compute_capability, bf16_tflops=stand_in.bf16_tflops,
                  fp16_tflops=stand_in.fp16_tflops, bandwidth_bytes_per_s=stand_in.bandwidth_bytes_per_s,
                  source="size", throughput_from=stand_in.key, note=note)


# --------------------------------------------------------------------------- probe


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe() -> Probe:
    """Every NVIDIA GPU on this machine via NVML: memory (total, free, used by others), compute
    capability, driver and CUDA versions.  No driver or no GPU: VramfitError saying what to do."""
    try:
        import pynvml
    except ImportError:
        raise VramfitError("cannot probe GPUs: nvidia-ml-py is not installed; name a GPU with "
                           "--gpu (a profile like 3060, or a size like 12GiB)") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise VramfitError(f"no NVIDIA driver found (NVML: {exc}); name a GPU with --gpu (a profile "
                           f"like 3060 or h100, or a size like 12GiB; `vramfit gpus` lists profiles)") from None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise VramfitError("the NVIDIA driver sees no GPU; name one with --gpu (a profile like 3060, "
                               "or a size like 12GiB)")
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        devices = tuple(_probe_device(pynvml, i) for i in range(count))
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return Probe(driver_version=driver, cuda_version=cuda_version, devices=devices)


def _probe_device(pynvml, index: int) -> Device:
    h = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(pynvml.nvmlDeviceGetName(h))
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        others = sum(int(p.usedGpuMemory or 0) for p in procs if p.pid != os.getpid())
    except pynvml.NVMLError:  # not supported (some vGPUs, containers): fall back to "used"
        others = int(mem.used)
    cc = f"{major}.{minor}"
    bf16 = major >= 8
    prof = profile_for_name(name, int(mem.total))
    note = ""
    if prof is None:
        prof = default_profile()
        note = (f"no bundled profile for '{name}': throughput assumed from the {prof.name}; "
                f"pass --gpu with a profile name for its own tokens/s")
    return Device(name=name, total_bytes=int(mem.total), free_bytes=int(mem.free), bf16=bf16,
                  compute_capability=cc, bf16_tflops=prof.bf16_tflops if bf16 else 0.0,
                  fp16_tflops=prof.fp16_tflops, bandwidth_bytes_per_s=prof.bandwidth_bytes_per_s,
                  source="probe", key=prof.key if not note else None, index=index,
                  used_by_others_bytes=others, throughput_from=prof.key, note=note)


# --------------------------------------------------------------------------- --gpu


def resolve_gpu(text: str = "auto") -> Device:
    """What follows `--gpu` -> Device.  See the module docstring for the accepted forms."""
    raw = str(text or "").strip()
    if not raw:
        raise VramfitError(f"--gpu is empty: give auto, a GPU name (`vramfit gpus`) or a size ({SIZE_FORMS})")
    low = raw.lower()
    if low == "auto" or re.fullmatch(r"(cuda|gpu|auto):\d+", low):
        return _pick_probed(probe(), None if low == "auto" else int(low.split(":")[1]))
    found = find_profile(raw)
    if found is not None:
        return found
    m = _SIZE_RE.match(raw)
    if m and m.group(2) and m.group(2).lower() in SIZE_UNITS:
        return size_device(raw)
    if m and m.group(2) and set(m.group(2).lower()) <= set("kmgtib"):  # a size with a bad unit
        raise VramfitError(f"malformed GPU size '{raw}'; accepted forms: {SIZE_FORMS}")
    names = sorted(set(_aliases()))
    close = difflib.get_close_matches(_compact(raw), names, n=4, cutoff=0.6)
    keys = list(dict.fromkeys(_aliases()[c] for c in close))
    hint = f" Did you mean: {', '.join(keys)}?" if keys else ""
    size_hint = f"a size with its unit ({SIZE_FORMS})"
    if m and not m.group(2):
        size_hint = f"a size with its unit ({raw}GB decimal or {raw}GiB binary)"
    raise VramfitError(f"unknown GPU '{raw}'.{hint} Give a profile name (`vramfit gpus` lists them), "
                       f"{size_hint}, or auto")


def _pick_probed(found: Probe, index: int | None) -> Device:
    """`auto`: the GPU with the most free memory; `cuda:N`: NVML's GPU N."""
    if index is None:
        return max(found.devices, key=lambda d: (d.free_bytes, -d.index))
    if index >= len(found.devices):
        raise VramfitError(f"no GPU {index}: this machine has {len(found.devices)} (0-{len(found.devices) - 1})")
    return found.devices[index]
