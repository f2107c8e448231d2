"""Event templates (vramfit.memory.template): expanded without torch, they must give the events of
the real `training_events` replay and the allocator simulation's peaks to the byte, at points the
template was not built from.  The default set builds three templates on a tiny 12-layer Llama
(5-20 s each); VRAMFIT_TEMPLATE_MATRIX=1 runs the whole matrix (methods x precisions x
checkpointing x micro-batch 1 and more x losses (trl's fused one over 1 and 3 token tiles) x
Llama, GPT-NeoX, GPT-2: about an hour on two cores)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_GPT2, TINY_LLAMA, TINY_NEOX

TINY = dict(TINY_LLAMA, num_hidden_layers=12)

_TEMPLATES = {}


def _check(cfg, setup_kw, points):
    """Build (once per regime) and compare the expansion with the real replay at each (B, S, r)."""
    from vramfit.memory import template as T
    from vramfit.memory import template_build as tb
    from vramfit.memory.allocator import simulate
    from vramfit.memory.setup import make_setup
    from vramfit.model.spec import spec_from_config

    spec = spec_from_config(f"tiny-{cfg['model_type']}", cfg)
    setup = make_setup(**setup_kw)
    for B, S, r in points:
        s = dataclasses.replace(setup, micro_batch=B, seq_len=S, lora_r=r if setup.method != "full" else setup.lora_r)
        key = (json.dumps(cfg, sort_keys=True), json.dumps(setup_kw, sort_keys=True),
               json.dumps(T.regime(T.regime_info(spec, setup), B, S, 1, s.lora_r)))
        if key not in _TEMPLATES:
            _TEMPLATES[key] = tb.build(spec, s, B, S)
        tpl = _TEMPLATES[key]
        mine = T.expand(tpl, B, S, s.lora_r, spec.num_layers)
        real = tb._real_events(spec, s)
        assert tb.same_events(mine, real), (setup_kw, B, S, r)
        for expandable in (False, True):
            a, b = simulate(mine, expandable_segments=expandable), simulate(real, expandable_segments=expandable)
            assert (a["peak_allocated"], a["peak_reserved"]) == (b["peak_allocated"], b["peak_reserved"])


def test_expand_imports_no_torch():
    code = ("import sys, vramfit.memory.template, vramfit.memory.replay, vramfit.memory.allocator; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


FAST = [
    ({"method": "lora"}, [(4, 300, 16), (3, 1000, 64), (2, 2050, 4)]),
    ({"method": "full", "precision": "bf16-mixed", "grad_ckpt": True}, [(1, 700, 16), (1, 2000, 16)]),
]


@pytest.mark.parametrize("setup_kw,points", FAST, ids=lambda v: json.dumps(v) if isinstance(v, dict) else "")
def test_template_exact(setup_kw, points):
    _check(TINY, setup_kw, points)


MATRIX = [(cfg, dict(kw, **extra), [(1, 700, 32), (3, 1000, 64), (4, 300, 16), (4, 3000, 8)])
          for cfg in (TINY, TINY_NEOX, TINY_GPT2)
          for kw in ({"method": "full"}, {"method": "lora"}, {"method": "qlora"})
          for extra in ({}, {"grad_ckpt": True}, {"precision": "bf16-mixed"}, {"precision": "bf16-amp"},
                        {"loss": "fused"}, {"precision": "bf16-amp", "loss": "fused", "grad_ckpt": True})]


@pytest.mark.skipif(not os.environ.get("VRAMFIT_TEMPLATE_MATRIX"), reason="VRAMFIT_TEMPLATE_MATRIX=1: the whole matrix")
@pytest.mark.parametrize("cfg,setup_kw,points", MATRIX)
def test_template_matrix(cfg, setup_kw, points):
    _check(cfg, setup_kw, points)


def test_gradient_accumulation_and_marks():
    """Built from 2 accumulating micro-batches, the template gives 4 and 7 exactly, with
    training_events' phase marks (the capped replay names the phase that ran out of memory)."""
    from vramfit.memory import template as T
    from vramfit.memory import template_build as tb
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.model.spec import spec_from_config

    from vramfit.memory.replay import capped_replay
    from vramfit.memory.template_cache import setup_template

    spec = spec_from_config("tiny-llama", TINY)
    setup = make_setup(method="lora", micro_batch=2, seq_len=500, grad_accum=4)
    got = setup_template(spec, setup, resolve_targets(spec, setup), 4)  # built, checked at the setup, cached
    tpl = got["template"]
    assert tpl is not None, got["note"]
    for A, (B, S, r) in ((4, (2, 500, 16)), (7, (3, 1300, 40))):
        s = dataclasses.replace(setup, micro_batch=B, seq_len=S, lora_r=r, grad_accum=A)
        marks = {}
        mine = T.expand(tpl, B, S, r, spec.num_layers, A, marks)
        real = training_events(spec, s, resolve_targets(spec, s), steps=2, grad_accum=A)
        assert tb.same_events(mine, real["events"])
        assert marks == real["marks"]
    with pytest.raises(T.NoTemplate):
        T.expand(tpl, 2, 500, 16, spec.num_layers, 1)
    # the planner's capped replay expands the cached template: the same verdict as the meta device's
    s = dataclasses.replace(setup, micro_batch=3, seq_len=1300, grad_accum=5)
    targets = resolve_targets(spec, s)
    for limit in (1 << 40, 40 << 20):
        a = capped_replay(spec, s, targets, limit)
        b = capped_replay(spec, s, targets, limit, templates=False)
        keep = ("fits", "oom_at", "oom_phase", "peak_allocated_bytes", "peak_reserved_bytes", "num_alloc_retries")
        assert {k: a[k] for k in keep} == {k: b[k] for k in keep}


def test_estimate_replays_by_default(tmp_path, monkeypatch):
    """The estimate's peaks are the replay's: the first call builds and checks the template, the
    next (another sequence length, batch and rank) expands it, and both equal the real replay."""
    from vramfit import api
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.replay import simulated_breakdown
    from vramfit.model.spec import load_spec

    monkeypatch.delenv("VRAMFIT_REPLAY", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    model = str(tmp_path / "config.json")
    first = api.estimate(model, method="lora", precision="bf16-amp", seq_len=400, use_calibration=False)
    assert any("built for this setup" in n and "reproduced the real replay exactly" in n
               for n in first.notes), first.notes
    second = api.estimate(model, method="lora", precision="bf16-amp", seq_len=1100, lora_r=32, use_calibration=False)
    assert any("expanded from the setup's event template" in n for n in second.notes), second.notes
    spec = load_spec(model)
    for est in (first, second):
        bd, targets = estimate_setup(spec, est.setup, DEFAULT)
        real = simulated_breakdown(spec, est.setup, targets, bd, DEFAULT)
        assert (est.peak_allocated_bytes, est.peak_reserved_bytes, est.device_bytes) == (
            real.peak_allocated_bytes, real.peak_reserved_bytes, real.device_bytes)
    fitted = api.estimate(model, method="lora", precision="bf16-amp", seq_len=400, use_calibration=False,
                          replay=False)
    assert not any("allocator simulation" in n for n in fitted.notes)


def test_estimate_falls_back_to_the_real_replay(tmp_path, monkeypatch):
    """A model with too few layers for a template: the real replay, and the notes say so."""
    from vramfit import api

    monkeypatch.delenv("VRAMFIT_REPLAY", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    est = api.estimate(str(tmp_path / "config.json"), method="lora", seq_len=256, use_calibration=False)
    assert any("replayed on the meta device instead" in n for n in est.notes), est.notes
    assert any("allocator simulation" in n for n in est.notes)
