"""Pinned event streams (vramfit.memory.pinned): a slow meta-device recording kept on disk answers the
very same setup again, identically, and nothing else."""

import dataclasses

import pytest

from tests.conftest import TINY_LLAMA

@pytest.fixture(autouse=True)
def _pins_on(monkeypatch):
    monkeypatch.setenv("VRAMFIT_PIN_STREAMS", "on")


KEEP = ("fits", "oom", "oom_at", "oom_phase", "peak_allocated_bytes", "peak_reserved_bytes", "num_alloc_retries")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache, every recording kept, and the in-process caches of the replay emptied."""
    from vramfit.memory import pinned, replay

    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pinned, "PIN_SECONDS", 0.0)

    def forget():
        replay._REPLAY_EVENTS.clear()
        replay._REPLAY_RESULTS.clear()

    forget()
    yield forget
    forget()


def _spec():
    from vramfit.model.spec import spec_from_config

    return spec_from_config("tiny-llama-pin", TINY_LLAMA)


def _calls(monkeypatch):
    """Count the meta-device recordings."""
    from vramfit.memory import events

    real, n = events.training_events, []

    def counted(*a, **k):
        n.append(1)
        return real(*a, **k)

    monkeypatch.setattr(events, "training_events", counted)
    return n


@pytest.mark.parametrize("offload", [False, True])
def test_pinned_stream_answers_its_setup_again(fresh, tmp_path, monkeypatch, offload):
    from vramfit.memory.replay import capped_replay
    from vramfit.memory.setup import make_setup, resolve_targets

    spec = _spec()
    setup = make_setup(method="lora", precision="bf16-amp", micro_batch=2, seq_len=96, grad_accum=2,
                       activation_offloading=offload)
    targets = resolve_targets(spec, setup)
    n = _calls(monkeypatch)
    first = capped_replay(spec, setup, targets, 1 << 40, templates=False)
    assert len(n) == 1 and len(list((tmp_path / "streams").glob("*.json"))) == 1
    for limit in (1 << 40, first["peak_reserved_bytes"] // 2):  # a fresh process, under a cap too
        fresh()
        again = capped_replay(spec, setup, targets, limit, templates=False)
        fresh()
        monkeypatch.setenv("VRAMFIT_PIN_STREAMS", "off")
        real = capped_replay(spec, setup, targets, limit, templates=False)
        monkeypatch.setenv("VRAMFIT_PIN_STREAMS", "on")
        assert {k: again[k] for k in KEEP} == {k: real[k] for k in KEEP}
    assert len(n) == 3  # the two with pinning off only
    from vramfit.memory import events, pinned

    kept = pinned.load(pinned.pinned_key(spec, setup, targets))
    real = events.training_events(spec, setup, targets, steps=2, grad_accum=setup.grad_accum)
    assert kept["events"] == real["events"] and kept["marks"] == real["marks"]
    assert kept.get("host") == real.get("host") and (real.get("host") is not None) == offload
    # another shape, rank or allocator is not this stream
    for other in (dict(seq_len=97), dict(lora_r=8), dict(grad_accum=3), dict(allocator="expandable")):
        fresh()
        capped_replay(spec, dataclasses.replace(setup, **other), targets, 1 << 40, templates=False)
    assert len(n) == 8


def test_offloading_pin_follows_the_allocator_model(fresh, monkeypatch):
    """Offloading's recording reads the allocator model's addresses: its key names that code; other
    setups' keys do not."""
    from vramfit import versions
    from vramfit.memory import pinned
    from vramfit.memory.setup import make_setup, resolve_targets

    spec = _spec()
    on = make_setup(method="lora", micro_batch=2, seq_len=96, activation_offloading=True)
    off = make_setup(method="lora", micro_batch=2, seq_len=96)
    keys = {s: pinned.pinned_key(spec, s, resolve_targets(spec, s)) for s in (on, off)}
    real = versions.source_digest
    monkeypatch.setattr(versions, "source_digest",
                        lambda *rels: "edited" if "memory/allocator.py" in rels else real(*rels))
    assert pinned.pinned_key(spec, on, resolve_targets(spec, on)) != keys[on]
    assert pinned.pinned_key(spec, off, resolve_targets(spec, off)) == keys[off]


def test_fast_recordings_are_not_kept(tmp_path, monkeypatch):
    from vramfit.memory import pinned

    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    pinned.store("k", {"events": [("a", 0, 512)], "marks": {"after_load": 1}}, pinned.PIN_SECONDS / 2)
    assert pinned.load("k") is None
    pinned.store("k", {"events": [("a", 0, 512)], "marks": {"after_load": 1}, "host": {"streams": {7: 1}}},
                 pinned.PIN_SECONDS)
    got = pinned.load("k")
    assert got["events"] == [("a", 0, 512)] and got["host"]["streams"] == {7: 1}


def test_the_user_cache_keeps_a_budget_of_streams(tmp_path, monkeypatch):
    import os

    from vramfit.memory import pinned

    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    entry = {"events": [("a", i, 512) for i in range(200)], "marks": {"after_load": 1}}
    pinned.store("first", entry, 60)
    size = pinned._path("first").stat().st_size
    os.utime(pinned._path("first"), (1, 1))  # the oldest
    monkeypatch.setattr(pinned, "PIN_BUDGET_BYTES", 2 * size)
    pinned.store("second", entry, 60)
    pinned.store("third", entry, 60)
    assert pinned.load("first") is None and pinned.load("second") and pinned.load("third")


def test_the_encoding_is_exact():
    from vramfit.memory import pinned

    events = [("a", 0, 512), ("a", 1, 1 << 40), ("f", 0), ("e",), ("a", 7, 3), ("f", 1), ("x", 9, 1, 2, 3), ("f", 7)]
    assert pinned.decode(pinned.encode(events)) == events
    with pytest.raises(ValueError):
        pinned.encode([("alloc", 0, 512)])


def test_a_pinned_streams_verdict_is_kept_per_cap_and_allocator_code(fresh, monkeypatch):
    from vramfit import versions
    from vramfit.memory import replay
    from vramfit.memory.setup import make_setup, resolve_targets

    spec = _spec()
    setup = make_setup(method="lora", micro_batch=2, seq_len=96, grad_accum=2)
    targets = resolve_targets(spec, setup)
    real, sims = replay._simulate_accumulation, []

    def counted(*a, **k):
        sims.append(1)
        return real(*a, **k)

    monkeypatch.setattr(replay, "_simulate_accumulation", counted)
    first = replay.capped_replay(spec, setup, targets, 1 << 40, templates=False)
    capped = replay.capped_replay(spec, setup, targets, first["peak_reserved_bytes"] // 2, templates=False)
    assert len(sims) == 2 and capped["oom"] != first["oom"]
    for limit, want in ((1 << 40, first), (first["peak_reserved_bytes"] // 2, capped)):
        fresh()
        got = replay.capped_replay(spec, setup, targets, limit, templates=False)
        assert {k: got[k] for k in KEEP} == {k: want[k] for k in KEEP}
    assert len(sims) == 2  # both verdicts read back
    digest = versions.source_digest
    monkeypatch.setattr(versions, "source_digest", lambda *rels: "edited" if "memory/allocator.py" in rels
                        else digest(*rels))
    fresh()
    replay.capped_replay(spec, setup, targets, 1 << 40, templates=False)
    assert len(sims) == 3  # another allocator model: simulated again


def test_the_estimates_replay_is_pinned_with_the_rest_of_the_run(fresh, monkeypatch):
    """simulated_breakdown's stream (the steps, evaluation and a checkpoint save) is pinned too: the same
    answer read back, and another evaluation micro-batch is another stream."""
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.replay import simulated_breakdown
    from vramfit.memory.setup import make_setup, resolve_targets

    spec = _spec()
    setup = make_setup(method="lora", micro_batch=2, seq_len=96)
    targets = resolve_targets(spec, setup)
    bd, _ = estimate_setup(spec, setup)
    n = _calls(monkeypatch)
    first = simulated_breakdown(spec, setup, targets, bd, DEFAULT)
    again = simulated_breakdown(spec, setup, targets, bd, DEFAULT)
    assert len(n) == 1
    monkeypatch.setenv("VRAMFIT_PIN_STREAMS", "off")
    real = simulated_breakdown(spec, setup, targets, bd, DEFAULT)
    monkeypatch.setenv("VRAMFIT_PIN_STREAMS", "on")
    for b in (first, again):
        assert (b.peak_allocated_bytes, b.peak_reserved_bytes, b.phases) == (
            real.peak_allocated_bytes, real.peak_reserved_bytes, real.phases)
    simulated_breakdown(spec, setup, targets, bd, DEFAULT, eval_batch=1)
    assert len(n) == 3
