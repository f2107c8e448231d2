"""DeepSpeed ZeRO's rank replay (vramfit.memory.zero), the engines' other CUDA streams and FSDP's wrap as
allocator events (vramfit.memory.fsdp.wrap_events, rank_replay.dropped_ids): each mechanism read from
DeepSpeed 0.19.8 / torch 2.11 and checked against the fake-process-group runs of 2026-12-07, on the CPU."""

import math

import pytest
from conftest import wide_tiny_spec

from vramfit.memory.distributed import estimate_distributed, get_strategy
from vramfit.memory.setup import make_setup
from vramfit.memory.zero import (
    ALLGATHER,
    DEFAULT,
    REDUCE,
    Streams,
    _Ids,
    bucket_flushes,
    groups,
    reduce_buffers,
    step_events,
    wrap_events,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return wide_tiny_spec(tmp_path_factory.mktemp("ztied"), tie_word_embeddings=True)


def _tensors(spec, pb=2):
    return tuple((math.prod(sh), pb, role, tuple(sh)) for sh, n, role in spec.param_shapes for _ in range(n))


def test_a_block_freed_on_one_stream_is_not_reused_by_another():
    same, other = Streams(), Streams()
    for s, second in ((same, DEFAULT), (other, REDUCE)):
        s.apply(("a", 1, 100 * MiB, DEFAULT))
        s.apply(("f", 1))
        s.apply(("a", 2, 100 * MiB, second))
    assert same.reserved == 100 * MiB
    assert other.reserved == 200 * MiB and other.allocated == same.allocated == 100 * MiB


def test_zero2_wrap_leaves_the_flat_weights_the_master_partition_and_a_cached_fp32_partition(llama1b):
    """deepspeed.initialize on llama-3.2-1b, ZeRO-2, N = 4: 3,708 MB allocated / 4,949 MB reserved measured
    (after_wrap of the 2026-12-07 run): the flat bf16 groups, the fp32 master partition, and
    initialize_optimizer_states' fp32 zeros freed (a cached block the step's fp32 gradient reuses)."""
    t = _tensors(llama1b)
    s = Streams()
    for ev in wrap_events(llama1b, t, 2, 4, 2, True, _Ids(), 5 * 10**8, 10**5):
        s.apply(ev)
    P = llama1b.params_total
    assert s.allocated == pytest.approx(P * 2 + P, rel=0.002)
    assert s.reserved - s.allocated == pytest.approx(math.ceil(groups(t)[0] / 4) * 4, rel=0.01)
    assert abs(s.allocated - 3_708_493_312) / 3_708_493_312 < 0.005
    assert abs(s.reserved - 4_949_278_720) / 4_949_278_720 < 0.005


def test_zero3_wrap_holds_the_partitions_the_ipg_bucket_and_the_gradient_buffer_lora_too(llama1b):
    """After wrap, ZeRO-3 N = 4 measured 3,473 MB (full) and 1,622 MB (LoRA): the 1 GB ipg bucket is there
    whatever the trainable size."""
    full = Streams()
    for ev in wrap_events(llama1b, _tensors(llama1b), 3, 4, 2, True, _Ids(), 5 * 10**8, 10**5):
        full.apply(ev)
    assert abs(full.allocated - 3_473_136_128) / 3_473_136_128 < 0.005
    lora_t = ((16 * 2048, 2, "lora", (16, 2048)), (2048 * 16, 2, "lora", (2048, 16)))
    lora = Streams()
    for ev in wrap_events(llama1b, lora_t, 3, 4, 2, False, _Ids(), 5 * 10**8, 10**5):
        lora.apply(ev)
    assert lora.allocated > 10**9 > llama1b.params_total * 2 / 4
    assert abs(lora.allocated - 1_622_445_056) / 1_622_445_056 < 0.01


def test_buckets_flush_before_they_overflow_and_cover_every_trainable_element():
    grads = [(i, 10) for i in range(100)]  # 100 gradients of equal size
    fl = bucket_flushes(grads, 1000, 95, end=500)
    assert all(hi - lo <= 95 for _, lo, hi in fl)
    assert fl[0][1] == 0 and fl[-1][2] == 1000 and fl[-1][0] == 500
    assert all(a[2] == b[1] for a, b in zip(fl, fl[1:]))


def test_zero2_reduces_each_ranks_slices_zero3_interleaves_the_whole_bucket():
    assert reduce_buffers(100, 400, 1000, 4, 3) == [300]
    parts = reduce_buffers(100, 400, 1000, 4, 2)  # flat-group range [600, 900): ranks 2 and 3
    assert parts == [150, 150] and sum(parts) == 300


def test_the_first_step_creates_adams_states_and_frees_its_fp32_gradient():
    s = Streams()
    for ev in step_events([400 * MiB // 4], 4, 2, True, _Ids(), []):
        s.apply(ev)
    assert s.allocated == 2 * 100 * MiB  # exp_avg and exp_avg_sq of the partition, fp32
    s2 = Streams()
    for ev in step_events([400 * MiB // 4], 4, 2, False, _Ids(), []):
        s2.apply(ev)
    assert s2.allocated == 0


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_replay_is_the_default_answer_and_names_its_streams(tiny_tied, strategy):
    from vramfit.memory.rank_replay import replayed_rank

    s = make_setup(method="full", precision="bf16-mixed", seq_len=64, micro_batch=2)
    est = estimate_distributed(tiny_tied, s, strategy, 4)
    r = replayed_rank(tiny_tied, s, strategy, 4, est)
    note = r.breakdown.notes[-1]
    assert f"ZeRO-{get_strategy(strategy).zero_stage}" in note and "stream" in note
    assert r.peak_reserved_bytes >= r.peak_allocated_bytes > 0
    P = tiny_tied.params_total
    # at least the rank's weights (whole for ZeRO-2, a quarter for ZeRO-3), its fp32 master and AdamW states
    floor = (P * 2 if strategy == "zero2" else P * 2 / 4) + 12 * P / 4
    assert r.peak_allocated_bytes > floor


def test_zero2_buckets_are_not_held_at_the_loss_before_the_first_gradient_hook(llama1b):
    """llama-3.2-1b ZeRO-2 N = 4, no checkpointing, full logits: 12,994 MB measured, the loss's moment; the
    walk put the two 1 GB buckets there (15.0 GB)."""
    s = make_setup(method="full", precision="bf16-mixed", seq_len=1024, micro_batch=2, loss="logits")
    est = estimate_distributed(llama1b, s, "zero2", 4)
    assert abs(est.peak_allocated_bytes - 12_994_353_664) / 12_994_353_664 < 0.01
    assert "zero_ipg_buckets" not in est.breakdown.components


def test_dropped_ids_take_the_gradients_and_the_optimizer_step_not_the_transients():
    from vramfit.memory.rank_replay import activation_events, dropped_ids

    ev = [("a", 1, 10), ("e",),  # a weight, the Trainer's empty_cache
          ("a", 2, 5),  # forward: an activation
          ("a", 3, 7), ("f", 2), ("a", 4, 3), ("f", 4),  # backward: a gradient (3), a transient (4)
          ("a", 5, 9), ("f", 5), ("a", 6, 2),  # clip / step: a temporary (5), a state (6)
          ("f", 3)]  # zero_grad
    marks = {"step0.forward": 2, "step0.backward": 3, "step0.clip": 7, "step0.optimizer": 7,
             "step0.post_step": 10, "end": 11}
    drop, grads = dropped_ids(ev, marks)
    assert drop == {3, 5, 6} and grads[0] == [(3, 7)]
    assert dropped_ids(ev, marks, load=True)[0] == {1, 3, 5, 6}
    assert [e for e in activation_events(ev, marks) if e[0] == "a"] == [("a", 1, 10), ("a", 2, 5), ("a", 4, 3)]


def test_fsdp2_wrap_leaves_the_shards_and_the_whole_parameters_cached(tmp_path):
    from vramfit.memory.fsdp import wrap_events as fsdp_wrap

    spec = wide_tiny_spec(tmp_path)
    s = Streams()
    for ev in fsdp_wrap(spec, None, 4, 4, _Ids()):
        s.apply(ev)
    shards = sum(n * math.ceil(sh[0] / 4) * (math.prod(sh[1:]) if len(sh) > 1 else 1) * 4
                 for sh, n, _ in spec.param_shapes)
    assert s.allocated >= shards
    assert s.reserved > s.allocated  # the whole parameters' blocks stay cached: no empty_cache after wrap


def test_multi_stream_peaks_are_of_the_sum():
    s = Streams()
    s.apply(("a", 1, 50 * MiB, ALLGATHER))
    s.apply(("a", 2, 50 * MiB, DEFAULT))
    s.apply(("f", 1))
    assert s.peak_allocated == 100 * MiB and s.allocated == 50 * MiB


def test_fsdp_reserve_is_replayed_without_the_single_gpus_gradients_and_optimizer(tmp_path):
    """The FSDP reserve of 2026-12-07 was the single-GPU replay's (its full gradients and AdamW step
    fragmenting its cache: +4 GB on llama-3.2-1b): now the rank's own default stream, from its wrap."""
    from vramfit.memory.distributed import activation_setup, engine_setup
    from vramfit.memory.rank_replay import _engine_gap_replay, rank_events, simulate_rank
    from vramfit.memory.setup import resolve_targets
    from vramfit.memory.walk import trainable_tensors

    spec = wide_tiny_spec(tmp_path)
    s = make_setup(method="full", precision="bf16-mixed", seq_len=64, micro_batch=2)
    st = get_strategy("fsdp-full")
    run = engine_setup(st, s)
    t = resolve_targets(spec, run)
    act = activation_setup(st, run, 4)
    ev = rank_events(spec, act, t)
    single = simulate_rank(ev["events"], ev["marks"], [])
    rank = _engine_gap_replay(spec, run, act, st, 4, trainable_tensors(spec, act, t), ev["events"], ev["marks"])
    P = spec.params_total
    assert rank["peak_allocated"] < single["peak_allocated"] - 3 * P  # no fp32 gradients, no AdamW states
    assert rank["peak_allocated"] >= P * 4 / 4  # the fp32 shards are there


def test_fsdp2_wrap_moves_each_unit_whole_before_sharding_it(llama1b):
    """fully_shard moves a unit's parameters to the GPU together, then shards them one by one: on
    llama-3.2-1b (bf16-mixed: fp32 trainable weights), N = 4, 1,236 MB allocated / 2,538 MB reserved
    after wrap were measured (2026-12-07); the root unit's whole tied embedding is what stays cached."""
    from vramfit.memory.fsdp import wrap_events as fsdp_wrap

    s = Streams()
    for ev in fsdp_wrap(llama1b, None, 4, 4, _Ids()):
        s.apply(ev)
    assert abs(s.allocated - 1_236_000_000) / 1_236_000_000 < 0.01
    assert abs(s.reserved - 2_538_000_000) / 2_538_000_000 < 0.03
    assert s.reserved - s.allocated > llama1b.vocab_size * llama1b.hidden_size * 4  # the embedding's fp32 block


def test_zero3_logits_loss_refetches_the_lm_head_in_one_coalesced_flat_buffer():
    """partitioned_param_coordinator's prefetch pops parameters while the bucket (5e7) is not full, the one that
    fills it included: the tied 128,256 x 2,048 weight after q, k, v, o, gate, up (44 M elements) is one flat
    buffer of 613,416,960 bytes -- the size of the h100-2026-12-07d N = 8 logits history's 585 MiB allocation
    (steps 2 and 3); none in the first step (the trace being recorded), none under the fused loss."""
    from vramfit.memory.zero import ZERO3_PERSISTENCE_THRESHOLD, head_refetch
    from vramfit.model.spec import load_spec

    spec = load_spec("llama-3.2-1b")
    logits = make_setup(method="full", precision="bf16-mixed", seq_len=1024, micro_batch=2, grad_ckpt=True)
    fused = make_setup(method="full", precision="bf16-mixed", seq_len=1024, micro_batch=2, grad_ckpt=True,
                       loss="fused")
    assert head_refetch(spec, logits, 1, ZERO3_PERSISTENCE_THRESHOLD) * 2 == 613_416_960
    assert head_refetch(spec, logits, 0, ZERO3_PERSISTENCE_THRESHOLD) == 0
    assert head_refetch(spec, fused, 1, ZERO3_PERSISTENCE_THRESHOLD) == 0


def test_zero3_n8_logits_run_reserved_is_its_second_steps():
    """The replay (two steps) against the N = 8 logits run: its second step's reserved 12,262 MiB (the all-gather
    stream 2,798 MiB: the 586 MiB segment of the head's refetch); 07j's model: 11,638 MiB (2,156 on that
    stream).  The third step's 12,848 (a second 586 MiB segment: that step's forward held one more layer's
    116 MiB flat buffer than the second's, which split the first) is not modelled."""
    import json
    from pathlib import Path

    from benchmarks.distributed.report import fake_predicted, ran_as

    path = Path(__file__).resolve().parents[1] / "benchmarks/results/h100-2026-12-07c-fake-pg-zero.jsonl"
    rec = next(r for r in map(json.loads, path.read_text().splitlines())
               if r.get("name") == "llama-3.2-1b-full-bf16-mixed-zero3-n8r0-ckpt-logits-s1024b2")
    p = fake_predicted(rec["case"], ran_as(rec), True)
    second = rec["steps"][1]
    assert p["peak_reserved_bytes"] == pytest.approx(second["peak_reserved_bytes"], rel=0.01)
    assert p["peak_allocated_bytes"] == pytest.approx(rec["peak_allocated_bytes"], rel=0.01)
