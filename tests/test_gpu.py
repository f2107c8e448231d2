"""GPU profiles, sizes, fuzzy names and the NVML probe (pynvml mocked: no GPU needed)."""

import sys
import types

import pytest
from typer.testing import CliRunner

from vramfit.cli import app
from vramfit.errors import VramfitError
from vramfit.planner.gpu import DRIVER_RESERVED_FRACTION, load_profiles, parse_size, probe, profile_for_name, resolve_gpu

GiB = 1 << 30
runner = CliRunner()


# --------------------------------------------------------------------------- a fake pynvml


class _NVMLError(Exception):
    pass


def fake_pynvml(gpus=(), init_error=None, processes_error=False):
    """A pynvml stand-in: gpus = [(name, total, free, used, (major, minor), [(pid, bytes)])]."""
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError

    def init():
        if init_error:
            raise _NVMLError(init_error)

    def processes(h):
        if processes_error:
            raise _NVMLError("Not Supported")
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in gpus[h][5]]

    m.nvmlInit = init
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlSystemGetDriverVersion = lambda: b"550.54.15"
    m.nvmlSystemGetCudaDriverVersion = lambda: 12040
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: gpus[h][0]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=gpus[h][1], free=gpus[h][2], used=gpus[h][3])
    m.nvmlDeviceGetCudaComputeCapability = lambda h: gpus[h][4]
    m.nvmlDeviceGetComputeRunningProcesses = processes
    return m


TWO_GPUS = [
    ("NVIDIA H100 80GB HBM3", 81559 * (1 << 20), 60 * GiB, 20 * GiB, (9, 0), [(999999, 19 * GiB)]),
    ("Tesla T4", 15360 * (1 << 20), 14 * GiB, 1 * GiB, (7, 5), []),
]


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, expected", [
    ("12GB", 12 * 10**9), ("12 GB", 12 * 10**9), ("12gb", 12 * 10**9), ("12GiB", 12 * GiB),
    ("12000MiB", 12000 * (1 << 20)), ("1.5GiB", int(1.5 * GiB)), ("0.5TB", 5 * 10**11), ("512MB", 512 * 10**6),
])
def test_sizes_respect_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


def test_twelve_gb_is_smaller_than_twelve_gib_by_the_unit_ratio():
    assert parse_size("12GiB") - parse_size("12GB") == 12 * (GiB - 10**9)


@pytest.mark.parametrize("text, needle", [
    ("12", "no unit"), ("12 G", "malformed"), ("twelve GB", "malformed"), ("12XB", "malformed"), ("0GiB", "larger than zero"),
])
def test_malformed_sizes_say_what_is_accepted(text, needle):
    with pytest.raises(VramfitError, match=needle):
        parse_size(text)


def test_a_size_device_is_its_own_budget_and_borrows_throughput():
    d = resolve_gpu("12GiB")
    assert d.source == "size" and d.total_bytes == d.free_bytes == 12 * GiB
    assert d.bf16 and d.bf16_tflops > 0 and d.throughput_from in load_profiles()
    assert "assumed" in d.note and "decimal" not in d.note
    assert "decimal" in resolve_gpu("12GB").note  # a card sold as 12 GB has 12 GiB: say so


@pytest.mark.parametrize("text", ["12G", "12 GBB", "12 gigs"])
def test_malformed_gpu_size_names_the_accepted_forms(text):
    with pytest.raises(VramfitError, match="12GiB"):
        resolve_gpu(text)


# --------------------------------------------------------------------------- profiles and names


def test_at_least_25_profiles_with_usable_memory_below_the_driver_total():
    profiles = load_profiles()
    assert len(profiles) >= 25
    for key, d in profiles.items():
        assert d.source == "profile" and d.key == key
        assert d.free_bytes == d.total_bytes - int(d.total_bytes * DRIVER_RESERVED_FRACTION)
        assert d.fp16_tflops > 0 and d.bandwidth_bytes_per_s > 0
        assert d.bf16 == (float(d.compute_capability) >= 8.0)


@pytest.mark.parametrize("text, key", [
    ("3060", "rtx-3060"), ("rtx-3060", "rtx-3060"), ("RTX 3060", "rtx-3060"), ("NVIDIA GeForce RTX 3060", "rtx-3060"),
    ("T4", "t4"), ("t4", "t4"), ("h100", "h100-sxm"), ("H100 SXM", "h100-sxm"), ("h100_pcie", "h100-pcie"),
    ("A100 40GB", "a100-40gb"), ("4090", "rtx-4090"),
])
def test_fuzzy_profile_names(text, key):
    assert resolve_gpu(text).key == key


def test_t4_has_no_bf16():
    t4 = resolve_gpu("T4")
    assert not t4.bf16 and t4.bf16_tflops == 0 and t4.tflops("bfloat16") == t4.fp16_tflops


@pytest.mark.parametrize("text, suggestion", [("rtx 9090", "rtx-5090"), ("h1000", "h100-sxm"), ("a1000", "a100")])
def test_unknown_gpu_names_its_close_matches(text, suggestion):
    with pytest.raises(VramfitError, match="unknown GPU") as exc:
        resolve_gpu(text)
    assert suggestion in str(exc.value)


def test_bare_number_that_is_no_card_suggests_both_units():
    with pytest.raises(VramfitError, match="4060GB decimal or 4060GiB binary"):
        resolve_gpu("4060")


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("Tesla T4", "t4"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A10G", "a10g"),
    ("NVIDIA GeForce RTX 3090", "rtx-3090"), ("NVIDIA RTX A6000", "rtx-a6000"),
])
def test_probed_names_find_their_profile(name, key):
    assert profile_for_name(name).key == key


def test_a_card_without_profile_matches_none():
    assert profile_for_name("NVIDIA GeForce GTX 1080") is None


# --------------------------------------------------------------------------- the probe


def test_probe_reads_every_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(TWO_GPUS))
    found = probe()
    assert found.driver_version == "550.54.15" and found.cuda_version == "12.4"
    h100, t4 = found.devices
    assert (h100.index, h100.source, h100.key) == (0, "probe", "h100-sxm")
    assert h100.free_bytes == 60 * GiB and h100.used_by_others_bytes == 19 * GiB
    assert h100.bf16 and h100.compute_capability == "9.0" and h100.bf16_tflops == load_profiles()["h100-sxm"].bf16_tflops
    assert not t4.bf16 and t4.compute_capability == "7.5" and t4.key == "t4"


def test_auto_takes_the_gpu_with_most_free_memory_and_its_free_memory_is_the_budget(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(TWO_GPUS))
    d = resolve_gpu("auto")
    assert d.index == 0 and d.free_bytes == 60 * GiB
    assert resolve_gpu("cuda:1").name == "Tesla T4"
    with pytest.raises(VramfitError, match="no GPU 2"):
        resolve_gpu("cuda:2")


def test_probe_falls_back_to_used_memory_when_processes_are_not_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(TWO_GPUS, processes_error=True))
    assert probe().devices[0].used_by_others_bytes == 20 * GiB


def test_unknown_probed_card_borrows_throughput_and_says_so(monkeypatch):
    gpus = [("NVIDIA GeForce GTX 1080 Ti", 11 * GiB, 10 * GiB, GiB, (6, 1), [])]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(gpus))
    d = probe().devices[0]
    assert d.key is None and d.throughput_from and "no bundled profile" in d.note and not d.bf16


def test_no_driver_is_a_clear_error_pointing_at_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error="Driver Not Loaded"))
    with pytest.raises(VramfitError, match="no NVIDIA driver.*--gpu"):
        resolve_gpu("auto")


def test_driver_without_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([]))
    with pytest.raises(VramfitError, match="no GPU"):
        probe()


# --------------------------------------------------------------------------- vramfit gpus


def test_gpus_command_lists_profiles_and_says_when_there_is_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error="Driver Not Loaded"))
    r = runner.invoke(app, ["gpus"])
    assert r.exit_code == 0, r.output
    assert "rtx-3060" in r.stdout and "GeForce RTX 3060" in r.stdout and "no NVIDIA driver" in r.stdout


def test_gpus_command_shows_the_probe(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(TWO_GPUS))
    r = runner.invoke(app, ["gpus", "--json"])
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(r.stdout)
    assert data["probe"]["driver_version"] == "550.54.15" and len(data["probe"]["devices"]) == 2
    assert data["profiles"]["t4"]["bf16"] is False
