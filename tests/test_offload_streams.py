"""trl's activation offloading on its copy stream (vramfit.memory.offload, 2026-12-07h): the copies
brought back in the backward are allocated while trl's copy stream is current, so torch's caching
allocator takes them from, and returns them to, that stream's own pools, which the default stream's
requests never use.  A tiny Llama (no network)."""

import json
import random

import pytest

from conftest import TINY_LLAMA

MiB = 1 << 20
B, S = 2, 256


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    from vramfit.model.spec import load_spec

    cfg = tmp_path_factory.mktemp("offload_streams") / "config.json"
    cfg.write_text(json.dumps({**TINY_LLAMA, "vocab_size": 8192}))
    return load_spec(str(cfg))


def _setup(**kw):
    from vramfit.memory.setup import make_setup

    return make_setup(**{"method": "full", "seq_len": S, "micro_batch": B, **kw})


def _record(spec, setup, monkeypatch=None):
    """training_events' result and the copy stream's allocations (its host["streams"], what the replay reads)."""
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import resolve_targets

    res = training_events(spec, setup, resolve_targets(spec, setup), steps=2)
    return res, (res.get("host") or {}).get("streams", {})


def test_the_estimate_replays_the_copy_stream_in_its_own_pools(spec):
    """simulated_breakdown (the replay an offloading estimate answers with) reserves what simulate_streams
    gives over the recording, and more than one pool would: the copy stream's freed blocks stay its own."""
    from vramfit.memory.allocator import simulate
    from vramfit.memory.offload import simulate_streams
    from vramfit.memory.replay import replay_phases

    res, streams = _record(spec, _setup(loss="fused", activation_offloading=True))
    assert streams
    parts = [(res["events"], res["marks"])]
    mine = replay_phases(parts, streams=streams)
    assert mine["peak_reserved"] == simulate_streams(res["events"], streams)["peak_reserved"]
    assert mine["peak_reserved"] >= simulate(res["events"])["peak_reserved"]


# --------------------------------------------------------------------------- the allocator's stream pools


def _ev(*evs):
    return list(evs)


def test_a_block_freed_on_the_copy_stream_never_serves_the_default_stream():
    from vramfit.memory.allocator import simulate
    from vramfit.memory.offload import COPY_STREAM, simulate_streams

    events = _ev(("a", 1, 30 * MiB), ("f", 1), ("a", 2, 30 * MiB), ("f", 2))
    one_pool = simulate(events)
    assert one_pool["peak_reserved"] == 30 * MiB and one_pool["num_device_alloc"] == 1
    # the first block on the copy stream: the default stream's request cudaMallocs its own segment
    two = simulate_streams(events, {1: COPY_STREAM})
    assert two["peak_reserved"] == 60 * MiB and two["num_device_alloc"] == 2
    assert two["peak_allocated"] == one_pool["peak_allocated"] == 30 * MiB
    # the copy stream reuses its own freed block (and splits its own segments)
    again = simulate_streams(events + [("a", 3, 30 * MiB), ("a", 4, 1000)], {1: COPY_STREAM, 3: COPY_STREAM})
    assert again["peak_reserved"] == 60 * MiB + 2 * MiB and again["num_device_alloc"] == 3


def test_empty_cache_releases_every_streams_free_segments():
    from vramfit.memory.offload import COPY_STREAM, StreamAllocator

    a, live = StreamAllocator(streams={1: COPY_STREAM, 3: COPY_STREAM}), {}
    for ev in [("a", 1, 30 * MiB), ("a", 2, 30 * MiB), ("a", 3, 12 * MiB), ("f", 1), ("f", 3)]:
        a.apply(ev, live)
    assert a.reserved == 72 * MiB
    a.apply(("e",), live)
    assert a.reserved == 30 * MiB and a.segments == 1  # only the default stream's live block is left
    a.apply(("f", 2), live)
    a.apply(("e",), live)
    assert a.reserved == 0


def test_without_other_streams_the_replay_is_the_single_pool_one():
    from vramfit.memory.allocator import simulate
    from vramfit.memory.offload import simulate_streams

    rng = random.Random(7)
    events, live, n = [], [], 0
    for _ in range(3000):
        r = rng.random()
        if r < 0.5 or not live:
            n += 1
            events.append(("a", n, rng.choice([512, 4096, 700_000, 3 * MiB, 12 * MiB + 5, 40 * MiB])))
            live.append(n)
        elif r < 0.98:
            events.append(("f", live.pop(rng.randrange(len(live)))))
        else:
            events.append(("e",))
    for expandable in (False, True):
        assert simulate_streams(events, {}, expandable) == simulate(events, expandable)
        assert simulate_streams(events, {}, expandable, limit_bytes=200 * MiB) == \
            simulate(events, expandable, limit_bytes=200 * MiB)


# --------------------------------------------------------------------------- the emulation's tags


def _phase_ranges(res):
    marks = res["marks"]
    return [(marks[f"step{k}.backward"], marks[f"step{k}.clip"]) for k in range(2)]


def test_the_copies_brought_back_are_the_copy_streams_and_die_in_the_backward(spec, monkeypatch):
    res, streams = _record(spec, _setup(loss="fused", activation_offloading=True), monkeypatch)
    events = res["events"]
    assert streams and set(streams.values()) == {1}
    at = {ev[1]: i for i, ev in enumerate(events) if ev[0] == "a"}
    freed = {ev[1]: i for i, ev in enumerate(events) if ev[0] == "f"}
    backward = _phase_ranges(res)
    size = {ev[1]: ev[2] for ev in events if ev[0] == "a"}
    for i in streams:
        # allocated in a backward (trl's unpack), freed before the step's clip (its end-of-backward callback)
        k = next(k for k, (lo, hi) in enumerate(backward) if lo <= at[i] < hi)
        assert at[i] < freed[i] < backward[k][1]
        assert size[i] >= 1024  # trl offloads nothing smaller
    # both steps bring back the same copies
    per_step = [sum(1 for i in streams if lo <= at[i] < hi) for lo, hi in backward]
    assert per_step[0] == per_step[1] > 0
    # no lever, or a lever without offloading: nothing on another stream
    assert _record(spec, _setup(loss="fused"), monkeypatch)[1] == {}
    assert _record(spec, _setup(loss="fused", liger=False, packing=True), monkeypatch)[1] == {}


def test_the_copy_streams_segments_stay_reserved_through_the_optimizer_step(spec, monkeypatch):
    """The qwen2.5-0.5b fused-loss full offloading run's mechanism at small size: after the backward every
    copy-stream block is free but its segments stay reserved (until the next step's empty_cache), and the
    optimizer step must find its own blocks: reserved at the optimizer step is at least the single-pool
    replay's, allocated the same."""
    from vramfit.memory.allocator import CachingAllocator, simulate
    from vramfit.memory.offload import COPY_STREAM, StreamAllocator, simulate_streams

    res, streams = _record(spec, _setup(loss="fused", activation_offloading=True), monkeypatch)
    events, marks = res["events"], res["marks"]
    a, live = StreamAllocator(streams=streams), {}
    one, live1 = CachingAllocator(), {}
    for ev in events[:marks["step1.clip"]]:
        a.apply(ev, live)
        one.apply(ev, live1)
    copy_pools = a.stream_pools[COPY_STREAM]
    free_on_copy = sum(b.size for p in copy_pools.values() for b in p.blocks.values())
    assert free_on_copy > 0
    assert not any(s == COPY_STREAM for s in a.stream_of_live.values())  # all copies freed
    assert a.allocated == one.allocated
    assert a.reserved >= one.reserved
    whole = simulate_streams(events, streams)
    single = simulate(events)
    assert whole["peak_allocated"] == single["peak_allocated"]
    assert whole["peak_reserved"] >= single["peak_reserved"]
    # the next step's empty_cache (trl's context entry) gives the copy stream's free segments back
    b, live_b = StreamAllocator(streams=streams), {}
    e_after_clip = next(i for i in range(marks["step0.clip"], len(events)) if events[i][0] == "e")
    for ev in events[:e_after_clip + 1]:
        b.apply(ev, live_b)
    assert sum(bl.size for p in b.stream_pools[COPY_STREAM].values() for bl in p.blocks.values()) == 0


def test_the_tags_are_the_same_in_every_recording(spec, monkeypatch):
    setup = _setup(loss="fused", activation_offloading=True)
    first, s1 = _record(spec, setup, monkeypatch)
    again, s2 = _record(spec, setup, monkeypatch)
    assert first["events"] == again["events"] and s1 == s2


# --------------------------------------------------------------------------- the H100 memory history


def test_the_real_stream_of_an_offloading_run_needs_the_copy_streams_own_pools():
    """The H100 memory history of llama-3.2-1b full fine-tuning with offloading (2026-12-07d): its real
    allocations and frees, the copies trl's unpack brought back on its copy stream in their own pools,
    give torch's reserved peak and cudaMalloc count exactly; one pool for all gives neither."""
    import gzip
    from pathlib import Path

    from benchmarks.accuracy.memory_history import _replayable
    from vramfit.memory.allocator import simulate
    from vramfit.memory.offload import COPY_STREAM, simulate_streams

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    with gzip.open(results / "h100-2026-12-07d-levers-memory-history" / "a2daeaaa769e.json.gz", "rt") as f:
        real = json.load(f)["events"]
    run = next(json.loads(line) for line in (results / "h100-2026-12-07d-levers-history.jsonl").read_text().splitlines()
               if json.loads(line)["id"] == "a2daeaaa769e")
    events = _replayable(real)  # the n-th allocation gets id n
    copies, n = {}, 0
    for ev in real:
        if ev[0] == "a":
            n += 1
            if "unpack_tensor" in (ev[3] or ""):  # activation_offloading.py's unpack, under torch.cuda.stream(s1)
                copies[n] = COPY_STREAM
    assert len(copies) > 1000
    streams = simulate_streams(events, copies)
    assert streams["peak_reserved"] == run["peak_reserved_bytes"]  # 16370 MiB
    assert streams["num_device_alloc"] == run["cuda_memory_stats"]["num_device_alloc"]  # 262
    assert streams["peak_allocated"] == run["peak_allocated_bytes"]
    one = simulate(events)
    assert one["peak_reserved"] != run["peak_reserved_bytes"] and one["num_device_alloc"] < 200
