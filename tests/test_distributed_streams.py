"""What the CUDA memory histories of 2026-12-07d showed the per-rank replay was missing (issue 21), one test per
mechanism: FSDP2's mixed precision computes in bf16 (`rank_replay.fsdp_trace_setup`), FSDP2's all-gather and
reduce-scatter streams replayed through the caching allocator (`fsdp.stream_pools`), ZeRO-3's first step
gathering parameter by parameter and its later steps coalescing (`zero.gather_blocks`), ZeRO-3's wrap (module.to
first, then the partitions carved out of the freed whole weights, the defragmentation's empty_cache) and the
synchronous gathers on the default stream.  Tiny models from configs and llama-3.2-1b's shapes; no network."""

import math

import pytest
from conftest import wide_tiny_spec

from vramfit.memory.distributed import activation_setup, engine_setup, estimate_distributed, get_strategy, shard_terms
from vramfit.memory.setup import make_setup, resolve_targets

MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return wide_tiny_spec(tmp_path_factory.mktemp("streams"))


# --------------------------------------------------------------------------- FSDP2 under mixed precision


def test_fsdp_mixed_precision_is_traced_as_bf16_weights_under_autocast():
    from vramfit.memory.rank_replay import fsdp_trace_setup

    mixed = make_setup(method="full", precision="bf16-mixed")
    for name in ("fsdp-full", "fsdp-grad-op"):
        st = get_strategy(name)
        assert fsdp_trace_setup(st, mixed, mixed).precision == "bf16-amp"
    # the others keep their setup: DDP computes with its own fp32 weights, DeepSpeed runs bf16-true already,
    # bf16-amp / bf16-true FSDP gathers what it stores, the launcher's QLoRA is traced as LoRA apart
    assert fsdp_trace_setup(get_strategy("ddp"), mixed, mixed) == mixed
    for p in ("bf16-amp", "bf16-true"):
        s = make_setup(method="full", precision=p)
        assert fsdp_trace_setup(get_strategy("fsdp-full"), s, s) == s
    q = make_setup(method="qlora", precision="bf16-amp")
    st = get_strategy("fsdp-full")
    act = activation_setup(st, engine_setup(st, q), 4)
    assert fsdp_trace_setup(st, q, act) == act


def test_fsdp_mixed_precision_replay_holds_bf16_activations(tiny, monkeypatch):
    """The fsdp-full N = 4 llama-3.2-1b bf16-mixed history: 6.35 GiB of activations and loss live at the loss's
    backward where the float32-weight trace holds 6.92 GiB; the replay was 6.1% over, now 0.0%."""
    from vramfit.memory import rank_replay

    s = make_setup(method="full", precision="bf16-mixed", seq_len=256, micro_batch=2, loss="logits")
    est = estimate_distributed(tiny, s, "fsdp-full", 4)
    bf16 = rank_replay.replayed_rank(tiny, s, "fsdp-full", 4, est)
    monkeypatch.setattr(rank_replay, "fsdp_trace_setup", lambda st, run, act: act)
    rank_replay._EVENTS.clear()
    fp32 = rank_replay.replayed_rank(tiny, s, "fsdp-full", 4, est)
    assert bf16.peak_allocated_bytes < fp32.peak_allocated_bytes
    # the shards stay the engine's: float32 (accelerate's upcast), a quarter each
    assert bf16.breakdown.components["weights_float32_sharded"] == fp32.breakdown.components["weights_float32_sharded"]


# --------------------------------------------------------------------------- FSDP2's other streams


def test_fsdp_streams_pools_are_the_histories_segments(llama1b):
    """fsdp-full N = 4, llama-3.2-1b (tied), bf16-mixed: the all-gather stream's pool 746 MiB (the tail's
    bf16 all-gather input 126, its flat output 502 and a layer's 118 beside it), the reduce-scatter
    stream's 1368 MiB (sixteen layers' and the tail's float32 gradient shards, 1212 MiB, and the tail's and
    a layer's bf16 reduce-scatter outputs, 156 MiB)."""
    s = make_setup(method="full", precision="bf16-mixed", seq_len=1024, micro_batch=2, loss="logits")
    t = shard_terms(llama1b, s, (), get_strategy("fsdp-full"), 4)
    ag, rs = t.pools["fsdp_all_gather_stream"][0], t.pools["fsdp_reduce_scatter_stream"][0]
    assert ag == pytest.approx(746 * MiB, rel=0.01)
    assert rs == pytest.approx(1368 * MiB, rel=0.03)


def test_fsdp_all_gather_input_and_reduce_scatter_cast_only_under_mixed_precision():
    from vramfit.memory.fsdp import stream_events, stream_pools

    # (flat output, all-gather input, reduce-scatter output, sharded gradient cast) per unit, MiB
    mp = {"layer": (116 * MiB, 29 * MiB, 29 * MiB, 58 * MiB), "tail": (501 * MiB, 125 * MiB, 125 * MiB, 250 * MiB),
          "embedding": (0, 0, 0, 0)}
    true = {k: (f, 0, r, 0) for k, (f, _, r, _) in mp.items()}
    a, b = stream_pools(mp, 16, True, True, True), stream_pools(true, 16, True, True, True)
    assert a["all_gather"] - b["all_gather"] == 126 * MiB  # the tail's input, reused by the layers'
    # the cast shards are held to zero_grad; without a cast the reduce-scatter outputs are the shards
    assert a["reduce_scatter"] > 16 * 58 * MiB + 250 * MiB > b["reduce_scatter"] >= 16 * 29 * MiB + 125 * MiB
    ev = stream_events(mp, 16, True, True, True)
    assert sum(1 for e in ev["all_gather"] if e[0] == "a") == 2 * (1 + 16) + 2 * 16  # forward, backward re-gather
    live = set()
    for e in ev["reduce_scatter"]:
        live.add(e[1]) if e[0] == "a" else live.remove(e[1])
    assert not live  # zero_grad frees every shard by the step's end


def test_fsdp_untied_tail_gathered_beside_the_last_layer_takes_its_own_segment():
    """Untied, the forward gathers the embedding, the layers, then the tail: the tail's flat output comes while
    the last layer's is still held, in the embedding's segment with an even number of layers."""
    from vramfit.memory.fsdp import stream_pools

    u = {"layer": (416 * MiB, 0, 0, 0), "tail": (1002 * MiB, 0, 0, 0), "embedding": (1002 * MiB, 0, 0, 0)}
    even, odd = stream_pools(u, 8, False, True, False), stream_pools(u, 7, False, True, False)
    assert even["all_gather"] == (1002 + 1002 + 416) * MiB
    assert odd["all_gather"] == (1002 + 416) * MiB


# --------------------------------------------------------------------------- ZeRO-3's gathers


def test_zero3_first_step_gathers_per_parameter_later_steps_coalesce_per_layer(llama1b):
    from vramfit.memory.walk import trainable_tensors
    from vramfit.memory.zero import gather_blocks

    s = make_setup(method="full", precision="bf16-true", seq_len=1024, micro_batch=2)
    tensors = trainable_tensors(llama1b, s, ())
    live = 1_050_000_000
    first, later, (rest0, rest1) = gather_blocks(llama1b, tensors, True, live, 100_000)
    emb = 128256 * 2048
    layer = (llama1b.params_total - emb) // 16
    # the first step: the embedding (a module of its own) beside one decoder-layer weight (8192 x 2048)
    assert first == [emb, 8192 * 2048]
    # later: the embedding alone, then flat buffers of a decoder layer each: twelve, and what is left
    assert later[0] == emb and later[1:13] == [layer] * 12 and sum(later) == live
    assert layer * 2 == pytest.approx(116 * MiB, rel=0.01)  # the history's 116 MiB flat segments
    assert not rest0 and not rest1  # full fine-tuning: no recompute of frozen weights
    # a coalesced layer is unflattened into its weights' own blocks (the history's 2, 8 and 32 MiB 'wait' ones)
    from vramfit.memory.zero import layer_weights

    H, KV, F = 2048, 512, 8192
    assert layer_weights(llama1b, 100_000) == [H * H, H * KV, H * KV, H * H, F * H, F * H, F * H]
    assert sum(layer_weights(llama1b, 100_000)) == pytest.approx(layer, rel=0.01)
    lora = make_setup(method="lora", precision="bf16-true", seq_len=1024, micro_batch=2, grad_ckpt=True)
    t = trainable_tensors(llama1b, lora, resolve_targets(llama1b, lora))
    first, later, (rest0, rest1) = gather_blocks(llama1b, t, False, live, 100_000)
    # checkpointed LoRA: by the first step's end every weight gathered, one buffer each (the history's 66
    # segments, 2360 MiB); later steps hold `live` coalesced and the rest per parameter
    assert sum(first) + sum(rest0) == pytest.approx(llama1b.params_total, rel=0.01)
    assert sum(later) + sum(rest1) == pytest.approx(llama1b.params_total, rel=0.01)


def test_zero3_all_gather_pool_holds_the_first_steps_blocks_and_the_later_flat_ones(llama1b):
    """llama-3.2-1b ZeRO-3 LoRA N = 4, checkpointed, fused loss: 6.26 GiB reserved measured, 3804 MiB of it on
    the all-gather stream; the replay held 2360 MiB there (-29% in all)."""
    from vramfit.memory.rank_replay import replayed_rank

    s = make_setup(method="lora", precision="bf16-mixed", seq_len=1024, micro_batch=2, grad_ckpt=True, loss="fused")
    est = estimate_distributed(llama1b, s, "zero3", 4)
    r = replayed_rank(llama1b, s, "zero3", 4, est)
    assert abs(r.peak_reserved_bytes - 6_723_469_312) / 6_723_469_312 < 0.03
    note = r.breakdown.notes[-1]
    ag = int(note.split("allgather stream ")[1].split(" B")[0].replace(",", ""))
    assert ag == pytest.approx(3804 * MiB, rel=0.03)


# --------------------------------------------------------------------------- ZeRO-3's wrap


def test_zero3_wrap_keeps_the_frozen_partitions_segments_and_frees_the_trainable_ones(llama1b):
    """After wrapping, the ZeRO-3 histories (N = 4): LoRA 1547 MiB allocated, 2082 MiB reserved (the frozen
    partitions carved out of module.to's blocks, 984 MiB of segments with 543 MiB of partitions in them);
    full 3312 / 4044 MiB (the defragmentation emptied the cache, then one 502 MiB block cached by the
    sequential gather of every trainable parameter)."""
    from vramfit.memory.walk import trainable_tensors
    from vramfit.memory.zero import Streams, _Ids, wrap_events

    for method, alloc, res in (("lora", 1547, 2082), ("full", 3312, 4044)):
        s = make_setup(method=method, precision="bf16-true", seq_len=1024, micro_batch=2)
        t = trainable_tensors(llama1b, s, resolve_targets(llama1b, s))
        st = Streams()
        for ev in wrap_events(llama1b, t, 3, 4, 2, method == "full", _Ids(), 500_000_000, 100_000):
            st.apply(ev)
        assert st.allocated == pytest.approx(alloc * MiB, rel=0.01), method
        assert st.reserved == pytest.approx(res * MiB, rel=0.02), method


# --------------------------------------------------------------------------- the report


def test_report_reads_back_its_predictions_as_a_baseline_and_reports_repeats_apart(tmp_path):
    from benchmarks.distributed.report import fake_baseline_after, fake_per_source, read_baseline, write_predictions

    e = lambda x: {"peak_allocated_bytes": x, "peak_reserved_bytes": x, "device_bytes": x}  # noqa: E731
    rows = [{"source": "/x/a.jsonl", "name": "n1", "rank": 0, "ran_as": "zero3", "predicted": e(100),
             "error_baseline": e(-0.29), "error": e(0.01)},
            {"source": "/x/b.jsonl", "name": "n2", "rank": 7, "ran_as": "fsdp-full", "predicted": e(200),
             "error_baseline": e(-0.11), "error": e(-0.03)}]
    p = tmp_path / "pred.jsonl"
    write_predictions(rows, str(p))
    assert read_baseline(str(p)) == {("a.jsonl", "n1", 0): e(100), ("b.jsonl", "n2", 7): e(200)}
    text = fake_baseline_after(rows, str(p))
    line = next(x for x in text.splitlines() if x.startswith("| zero3"))
    assert "29.00 / 29.00 / 29.00% (1) | 1.00 / 1.00 / 1.00% (0)" in line
    assert next(x for x in text.splitlines() if x.startswith("| all")).startswith("| all | 2 |")
    assert "| a.jsonl | 1 |" in fake_per_source(rows) and "| b.jsonl | 1 |" in fake_per_source(rows)


def test_history_stream_summary_reads_each_streams_pool_at_the_reserved_peak():
    from benchmarks.distributed.history import stream_summary

    M = MiB
    ev = [["S", 0, 20 * M, 0, 0, 5], ["a", 0, 8 * M, 0, 0, 5],  # default stream: 20 MiB segment, 8 in use
          ["S", 100 * M, 116 * M, 7, 1, 6], ["a", 100 * M, 116 * M, 7, 1, 6],  # another stream's flat output
          ["f", 100 * M, 116 * M, 7, -1, 7],  # freed: cached for stream 7 alone
          ["a", 4 * M, 2 * M, 0, 0, 8]]
    data = {"name": "x", "events": ev, "frames": ["activations", "foreach_all_gather"],
            "marks": [["step2_begin", 5], ["step2_end", 9]]}
    text = stream_summary(data)
    assert "reserved peak 136.0 MiB" in text and "allocated peak 124.0 MiB" in text
    assert "stream 7: 116.0 MiB in 1 segments" in text and "116.0 MiB    1 segs,       0.0 in use  foreach" in text
    assert "stream 0: 20.0 MiB in 1 segments" in text
