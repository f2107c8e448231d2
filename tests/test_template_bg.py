"""An estimate whose setup has no cached template answers from the real replay and builds the template in
a detached process; the next estimate of that setup expands it."""

from __future__ import annotations

import time

from tests.conftest import TINY_LLAMA

from vramfit.api import estimate
from vramfit.model import cache


def _config(tmp_path):
    import json

    cfg = dict(TINY_LLAMA, num_hidden_layers=10)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_background_build_then_the_template_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VRAMFIT_TEMPLATE_BUILD", "background")
    cache._templates.clear()
    cfg = _config(tmp_path)
    first = estimate(cfg, seq_len=128, micro_batch=2, replay=True, use_calibration=False)
    assert any("being built in the background" in n for n in first.notes), first.notes
    deadline = time.time() + 240
    templates = tmp_path / "cache" / "templates"
    while time.time() < deadline and (not templates.is_dir() or any(templates.glob("*.building"))):
        time.sleep(1)
    assert templates.is_dir() and not any(templates.glob("*.building")), "the detached build did not finish"
    cache._templates.clear()
    again = estimate(cfg, seq_len=128, micro_batch=2, replay=True, use_calibration=False)
    assert any("expanded from the setup's event template" in n for n in again.notes), again.notes
    # the same peaks from the template as from the real replay
    assert (again.peak_allocated_bytes, again.peak_reserved_bytes, again.device_bytes) == \
        (first.peak_allocated_bytes, first.peak_reserved_bytes, first.device_bytes)
    other = estimate(cfg, seq_len=200, micro_batch=3, replay=True, use_calibration=False)  # the same regime
    assert any("expanded from the setup's event template" in n for n in other.notes), other.notes


def test_off_never_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VRAMFIT_TEMPLATE_BUILD", "off")
    cache._templates.clear()  # the first test's, kept in memory
    est = estimate(_config(tmp_path), seq_len=128, micro_batch=2, replay=True, use_calibration=False)
    assert any("no event template built" in n for n in est.notes), est.notes
    assert not list((tmp_path / "cache").rglob("*.building"))
