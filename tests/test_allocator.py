"""The caching-allocator model against hand-worked sequences (CUDACachingAllocator.cpp's rules)."""

import pytest

from vramfit.memory.allocator import (
    CachingAllocator,
    get_allocation_size,
    kLargeBuffer,
    kSmallBuffer,
    round_size,
    simulate,
)

KiB, MiB = 1 << 10, 1 << 20


def test_round_size_and_allocation_size():
    assert round_size(1) == 512
    assert round_size(512) == 512
    assert round_size(513) == 1024
    assert get_allocation_size(1 * MiB) == kSmallBuffer  # <= kSmallSize: small pool, 2 MiB segment
    assert get_allocation_size(1 * MiB + 512) == kLargeBuffer  # 1..10 MiB: one 20 MiB segment
    assert get_allocation_size(10 * MiB - 512) == kLargeBuffer
    assert get_allocation_size(10 * MiB) == 10 * MiB  # >= kMinLargeAlloc: rounded to 2 MiB
    assert get_allocation_size(11 * MiB) == 12 * MiB


def test_small_requests_share_one_2mib_segment():
    a = CachingAllocator()
    blocks = [a.malloc(100) for _ in range(4096)]  # 4096 x 512 B = exactly 2 MiB
    assert a.reserved == 2 * MiB and a.num_device_alloc == 1
    assert a.allocated == 2 * MiB
    a.malloc(1)
    assert a.reserved == 4 * MiB and a.num_device_alloc == 2
    for b in blocks:
        a.free(b)
    assert a.allocated == 512


def test_mid_size_request_splits_a_20mib_segment():
    a = CachingAllocator()
    x = a.malloc(3 * MiB)
    assert a.reserved == 20 * MiB and x.size == 3 * MiB  # remainder 17 MiB > 1 MiB: split
    y = a.malloc(5 * MiB)  # served from the remainder: no new segment
    assert a.reserved == 20 * MiB and y.addr == x.addr + 3 * MiB
    a.free(x)
    a.free(y)
    z = a.malloc(19 * MiB)  # x, y and the tail merged back into one 20 MiB block
    assert a.reserved == 20 * MiB and z.addr == x.addr


def test_large_remainder_of_at_most_1mib_is_not_split():
    a = CachingAllocator()
    x = a.malloc(19 * MiB + 512)  # >= kMinLargeAlloc: a segment rounded up to 20 MiB
    assert a.reserved == 20 * MiB
    assert x.size == 20 * MiB  # remainder 1 MiB - 512 <= kSmallSize: allocated whole
    assert a.allocated == 20 * MiB
    assert a.peak_allocated == 20 * MiB


def test_best_fit_takes_the_smallest_then_lowest_address():
    a = CachingAllocator()
    big = [a.malloc(s) for s in (40 * MiB, 24 * MiB, 30 * MiB, 24 * MiB)]
    addrs = [b.addr for b in big]
    for b in big:
        a.free(b)
    r = a.reserved
    # fits 24, 24, 30, 40: the 24 MiB segment at the lower address.  Device addresses go down, but
    # the first 24 MiB one filled the slack the 40 MiB one's alignment left above it: the second
    # one is lower (allocator._DeviceAddressSpace)
    assert addrs[3] < addrs[1]
    got = a.malloc(23 * MiB)
    assert got.addr == addrs[3] and a.reserved == r
    assert got.size == 24 * MiB  # remainder exactly 1 MiB: not split (needs > 1 MiB)
    got2 = a.malloc(26 * MiB)  # the 30 MiB block, split (4 MiB left)
    assert got2.addr == addrs[2] and got2.size == 26 * MiB


def test_freed_blocks_merge_with_free_neighbours_only():
    a = CachingAllocator()
    x = a.malloc(20 * MiB)  # 20 MiB segment, whole
    y = a.malloc(12 * MiB)  # 12 MiB segment
    a.free(y)
    a.free(x)
    assert a.malloc(30 * MiB) and a.reserved == 62 * MiB  # different segments never merge
    b = CachingAllocator()
    seg = [b.malloc(4 * MiB) for _ in range(5)]  # 5 x 4 MiB fill one 20 MiB segment
    first = seg[1].addr
    assert b.reserved == 20 * MiB
    b.free(seg[1])
    b.free(seg[3])
    w = b.malloc(8 * MiB)  # 4 + 4 MiB holes are not contiguous: a new 20 MiB segment, 12 MiB left
    assert w and b.reserved == 40 * MiB
    b.free(seg[2])  # merges with seg[1] and seg[3]: 12 MiB
    z = b.malloc(12 * MiB)  # two free 12 MiB blocks: the new segment's (lower address) first
    assert z.addr == w.addr + 8 * MiB < first
    z2 = b.malloc(12 * MiB)  # then the merged one
    assert z2.addr == first and z2.size == 12 * MiB and b.reserved == 40 * MiB


def test_simulate_events_and_peaks():
    ev = [("a", 0, 100 * MiB), ("a", 1, 50 * MiB), ("f", 0), ("a", 2, 60 * MiB), ("a", 3, 60 * MiB)]
    res = simulate(ev)
    # 60 MiB reuses the freed 100 MiB block (split, 40 MiB left); the second 60 MiB needs a segment
    assert res["peak_reserved"] == 210 * MiB
    assert res["peak_allocated"] == 170 * MiB
    assert res["num_device_alloc"] == 3


def test_expandable_segment_grows_in_20mib_pages():
    a = CachingAllocator(expandable_segments=True)
    x = a.malloc(3 * MiB)  # maps one 20 MiB page of the large pool's segment
    assert a.reserved == 20 * MiB and a.num_device_alloc == 1
    y = a.malloc(30 * MiB)  # the free 17 MiB tail of the page + 13 MiB more: one more page
    assert y.addr == x.addr + 3 * MiB
    assert a.reserved == 40 * MiB and a.num_device_alloc == 2
    z = a.malloc(1 * MiB + 512)  # 7 MiB - 512 left free in the mapped pages: reused
    assert a.reserved == 40 * MiB and z.addr == y.addr + 30 * MiB


def test_expandable_small_pool_pages_are_2mib_and_splits_go_to_512b():
    a = CachingAllocator(expandable_segments=True)
    a.malloc(1000)
    assert a.reserved == 2 * MiB
    b = CachingAllocator(expandable_segments=True)
    x = b.malloc(19 * MiB + 512)
    assert x.size == 19 * MiB + 512  # expandable: any remainder >= 512 B is split off
    assert b.allocated == 19 * MiB + 512


def test_expandable_avoids_fragmentation_the_default_allocator_suffers():
    seq = []
    for i in range(10):  # 10 MiB blocks, every other one freed, then a 40 MiB request
        seq.append(("a", i, 10 * MiB))
    for i in range(0, 10, 2):
        seq.append(("f", i))
    seq.append(("a", 99, 40 * MiB))
    default = simulate(seq)
    expandable = simulate(seq, expandable_segments=True)
    assert default["peak_reserved"] == 100 * MiB + 40 * MiB
    # one virtual segment: 100 MiB mapped (5 pages), the 40 MiB request maps 2 more pages at its end
    assert expandable["peak_reserved"] == 140 * MiB
    seq2 = seq[:-1] + [("f", 9), ("a", 99, 40 * MiB)]  # the last block freed: the tail is free
    assert simulate(seq2, expandable_segments=True)["peak_reserved"] == 120 * MiB  # 10 MiB free + 30 mapped
    assert simulate(seq2)["peak_reserved"] == 140 * MiB  # separate 10 MiB segments never merge


def test_estimate_can_take_its_peaks_from_the_allocator_simulation(tmp_path):
    import json

    from vramfit.api import estimate

    from conftest import TINY_LLAMA

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    kw = dict(method="full", precision="bf16-true", seq_len=64, micro_batch=2, use_calibration=False)
    fitted = estimate(str(cfg), **kw)
    sim = estimate(str(cfg), simulate_allocator=True, **kw)
    assert any("allocator simulation" in n for n in sim.notes)
    # the replay and the phase walk agree on what is allocated; the reserve now comes from segments
    assert abs(sim.peak_allocated_bytes - fitted.peak_allocated_bytes) < 0.05 * fitted.peak_allocated_bytes
    assert sim.peak_reserved_bytes >= sim.peak_allocated_bytes
    assert sim.peak_reserved_bytes % (2 << 20) == 0  # whole 2 MiB / 20 MiB / rounded segments
    assert sim.device_bytes - sim.peak_reserved_bytes == fitted.device_bytes - fitted.peak_reserved_bytes
    qlora = estimate(str(cfg), simulate_allocator=True, **{**kw, "method": "qlora"})
    fitted_q = estimate(str(cfg), **{**kw, "method": "qlora"})
    # QLoRA's peaks come from its replay too (within 3.4% of the 24 measured runs' device peaks,
    # benchmarks/accuracy/simulate_reserve.py)
    assert any("allocator simulation" in n for n in qlora.notes)
    assert abs(qlora.peak_allocated_bytes - fitted_q.peak_allocated_bytes) < 0.05 * fitted_q.peak_allocated_bytes
    assert qlora.device_bytes - qlora.peak_reserved_bytes == fitted_q.device_bytes - fitted_q.peak_reserved_bytes


TINY_HEADS = 4


def _tiny_qlora_events(tmp_path, seq_len=256, micro_batch=4):
    import json

    from vramfit.memory.events import training_events
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.model.spec import load_spec

    from conftest import TINY_LLAMA

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 1024}))
    spec = load_spec(str(cfg))
    setup = make_setup("qlora", "bf16-true", seq_len=seq_len, micro_batch=micro_batch)
    return spec, setup, training_events(spec, setup, resolve_targets(spec, setup), steps=1)


def _live_bytes(events):
    live = {}
    for ev in events:
        if ev[0] == "a":
            live[ev[1]] = ev[2]
        elif ev[0] == "f":
            del live[ev[1]]
    return sum(live.values())


def test_qlora_stream_after_load_holds_nf4_weights_fp32_rest_and_adapters(tmp_path):
    """After from_pretrained(4-bit) + prepare_model_for_kbit_training + LoRA: the NF4 storages of
    every quantized linear (packed, uint8 absmax, fp32 absmax2, the 256-entry code; plus the
    16-entry nf4 code and the offset bitsandbytes keeps per weight, and the global dynamic map),
    every other parameter in fp32 and the fp32 adapters; the bf16 copies all freed."""
    from vramfit.memory.constants import DEFAULT as c
    from vramfit.memory.walk import _lora_params, _nf4_bytes

    spec, setup, ev = _tiny_qlora_events(tmp_path)
    quant = spec.quantizable_linears()
    nf4 = sum(_nf4_bytes(l.numel, c, True) + 16 * 4 + 4 for l in quant) + 256 * 4
    other = spec.params_total - sum(l.numel for l in quant)
    from vramfit.memory.setup import resolve_targets

    lora = _lora_params(spec, resolve_targets(spec, setup), setup.lora_r)[0]
    head_dim = 128 // TINY_HEADS
    rope = 2 * (head_dim // 2) * 4  # the rotary inv_freq buffer and its original_inv_freq copy, fp32
    assert _live_bytes(ev["events"][:ev["marks"]["after_load"]]) == nf4 + 4 * other + 4 * lora + rope
    assert ("e",) in ev["events"][:ev["marks"]["after_load"]]  # prepare's empty_cache


def test_qlora_forward_dequantizes_each_weight_to_a_transient(tmp_path):
    """More than 512 rows: gemm_4bit dequantizes the weight (out x in, bf16) for F.linear and frees
    it; backward dequantizes it again for the input gradient."""
    spec, setup, ev = _tiny_qlora_events(tmp_path)
    events, marks = ev["events"], ev["marks"]
    quant = spec.quantizable_linears()
    down = next(l for l in quant if l.name.endswith("down_proj"))
    w_bytes = down.numel * 2
    for phase, nxt in (("step0.forward", "step0.backward"), ("step0.backward", "step0.clip")):
        seg = events[marks[phase]:marks[nxt]]
        allocs = {e[1] for e in seg if e[0] == "a" and e[2] == w_bytes}
        freed = {e[1] for e in seg if e[0] == "f"}
        # one per layer (twice in forward under checkpointing: the recompute), all freed in the phase
        assert len(allocs) >= spec.num_layers
        assert allocs <= freed


def test_qlora_small_batches_take_the_fused_kernel_without_the_transient(tmp_path):
    spec, setup, ev = _tiny_qlora_events(tmp_path, seq_len=32, micro_batch=3)  # 96 rows <= 512
    events, marks = ev["events"], ev["marks"]
    down = next(l for l in spec.quantizable_linears() if l.name.endswith("down_proj"))
    seg = events[marks["step0.forward"]:marks["step0.backward"]]
    assert not any(e[0] == "a" and e[2] == down.numel * 2 for e in seg)


def test_empty_cache_releases_whole_free_segments_only():
    a = CachingAllocator()
    x = a.malloc(30 * MiB)
    y = a.malloc(3 * MiB)
    z = a.malloc(4 * MiB)  # same 20 MiB segment as y
    a.free(x)
    a.free(y)
    a.empty_cache()
    assert a.reserved == 20 * MiB  # x's segment released, y's kept (z lives in it)
    a.free(z)
    res = simulate([("a", 0, 30 * MiB), ("f", 0), ("e",), ("a", 1, 1 * MiB)])
    assert res["reserved"] == 2 * MiB and res["peak_reserved"] == 30 * MiB


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fused_loss_replay_agrees_with_the_fused_loss_model(tmp_path, method):
    """trl's fused LM head replayed (its kernels as on a GPU: nothing allocated but its buffers) and
    the phase walk's fused-loss terms give the same allocated peak, also under autocast (where the
    head computes in the autocast dtype)."""
    import json

    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "add_fused_lm_head"):
        pytest.skip("this trl has no fused LM head")
    from vramfit.api import estimate

    from conftest import TINY_LLAMA

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY_LLAMA, "vocab_size": 65536}))  # over trl's 32,768-wide tile
    kw = dict(method=method, precision="bf16-true", seq_len=128, micro_batch=4, loss="fused", use_calibration=False)
    fitted = estimate(str(cfg), **kw)
    sim = estimate(str(cfg), simulate_allocator=True, **kw)
    assert any("allocator simulation" in n for n in sim.notes)
    assert abs(sim.peak_allocated_bytes - fitted.peak_allocated_bytes) < 0.05 * fitted.peak_allocated_bytes
    logits = estimate(str(cfg), simulate_allocator=True, **{**kw, "loss": "logits"})
    assert sim.peak_allocated_bytes < logits.peak_allocated_bytes  # no (tokens x vocab) fp32 buffers
    for precision in ("bf16-mixed", "bf16-amp"):
        fitted = estimate(str(cfg), **{**kw, "precision": precision})
        mixed = estimate(str(cfg), simulate_allocator=True, **{**kw, "precision": precision})
        assert any("allocator simulation" in n for n in mixed.notes)
        assert abs(mixed.peak_allocated_bytes - fitted.peak_allocated_bytes) < 0.05 * fitted.peak_allocated_bytes


def test_safe_softmax_holds_a_bool_tensor_of_the_scores_size_inside_the_op():
    # SDPA's math path (fp32 with grouped KV heads on CUDA) ends in _safe_softmax, whose kernel
    # compares the whole score tensor with -inf below the dispatcher; an H100 recorded that bool
    # allocation (one per layer and forward) and the replay must hold it too, until the op returns
    import torch

    from vramfit.memory.events import _recorder_class

    rec = _recorder_class()()
    scores = torch.empty((2, 3, 40, 40), device="meta")
    with rec:
        probs = torch.ops.aten._safe_softmax(scores, -1)
    allocs = [e for e in rec.events if e[0] == "a"]
    assert [a[2] for a in allocs] == [scores.numel() * 4, scores.numel()]  # the result, then the bool
    frees = [e[1] for e in rec.events if e[0] == "f"]
    assert allocs[1][1] in frees and allocs[0][1] not in frees  # the bool is gone, the result lives
    assert probs.shape == scores.shape


def test_softmax_backward_holds_grad_times_output_inside_the_op():
    # CUDA's softmax_backward_cuda_out forms tmp = grad * output beside the input gradient: a third
    # score-sized tensor in each attention backward of the math path (recorded on an H100)
    import torch

    from vramfit.memory.events import _recorder_class

    rec = _recorder_class()()
    grad = torch.empty((2, 3, 40, 40), device="meta")
    probs = torch.empty((2, 3, 40, 40), device="meta")
    with rec:
        grad_in = torch.ops.aten._softmax_backward_data(grad, probs, -1, torch.float32)
    allocs = [e for e in rec.events if e[0] == "a"]
    assert [a[2] for a in allocs] == [grad.numel() * 4, grad.numel() * 4]  # the input gradient, then tmp
    frees = [e[1] for e in rec.events if e[0] == "f"]
    assert frees == [allocs[1][1]]
    assert grad_in.shape == grad.shape


def test_math_path_attention_holds_two_score_tensors_forward_and_three_backward():
    # fp32 q, k, v with grouped KV heads (QLoRA's residual stream) take SDPA's math path.  As an H100
    # recorded it (Qwen2.5-0.5B fp32 LoRA): forward, the scores (the causal mask added in place) and
    # the probabilities; backward, the probabilities' gradient, the scores' gradient and the softmax
    # backward's grad * output, all live at once beside the saved probabilities
    import torch

    from vramfit.memory.events import _recorder_class
    from vramfit.model.emulate import _flash_like_sdpa

    B, H, KV, S, D = 2, 4, 2, 64, 16
    score = B * H * S * S * 4
    q = torch.empty((B, H, S, D), device="meta", requires_grad=True)
    k = torch.empty((B, KV, S, D), device="meta", requires_grad=True)
    v = torch.empty((B, KV, S, D), device="meta", requires_grad=True)
    rec = _recorder_class()()
    with rec:
        out = _flash_like_sdpa()(q, k, v, is_causal=True, enable_gqa=True)
        n_fwd = len(rec.events)
        out.sum().backward()
    sizes = {e[1]: e[2] for e in rec.events if e[0] == "a"}
    fwd_scores = [e for e in rec.events[:n_fwd] if e[0] == "a" and e[2] == score]
    bwd_scores = [e for e in rec.events[n_fwd:] if e[0] == "a" and e[2] == score]
    assert len(fwd_scores) == 2 and len(bwd_scores) == 3
    live, peak_scores = {}, 0
    for e in rec.events[n_fwd:]:
        if e[0] == "a":
            live[e[1]] = e[2]
        elif e[0] == "f" and e[1] in live:
            del live[e[1]]
        peak_scores = max(peak_scores, sum(1 for i in live if sizes[i] == score))
    assert peak_scores == 3  # plus the saved probabilities, allocated in the forward


# --------------------------------------------------------------------------- memory cap


def test_cap_releases_the_cache_and_fits_what_the_uncapped_reserved_peak_exceeds():
    """A cached free 30 MiB segment and a 40 MiB request: uncapped the allocator holds both (70 MiB
    reserved); under a 50 MiB cap it cudaFrees the cached segment, retries once and fits."""
    seq = [("a", 0, 30 * MiB), ("f", 0), ("a", 1, 40 * MiB)]
    free = simulate(seq)
    assert free["peak_reserved"] == 70 * MiB and not free["oom"] and free["num_alloc_retries"] == 0
    capped = simulate(seq, limit_bytes=50 * MiB)
    assert not capped["oom"] and capped["num_alloc_retries"] == 1
    assert capped["peak_reserved"] == 40 * MiB and capped["peak_allocated"] == 40 * MiB


def test_cap_ooms_when_the_allocated_bytes_alone_exceed_it():
    seq = [("a", 0, 30 * MiB), ("a", 1, 40 * MiB)]
    res = simulate(seq, limit_bytes=60 * MiB)
    assert res["oom"] and res["oom_at"] == 1 and res["num_alloc_retries"] == 1
    assert res["peak_allocated"] == 30 * MiB  # the refused request never counts
    assert not simulate(seq, limit_bytes=70 * MiB)["oom"]
    assert simulate(seq, limit_bytes=10 * MiB, initial_allocated=0)["oom_at"] == 0
    assert simulate(seq, limit_bytes=100 * MiB, initial_allocated=40 * MiB)["oom_at"] == 1


def test_cap_counts_one_retry_per_refused_segment():
    seq = [("a", 0, 30 * MiB), ("f", 0), ("a", 1, 40 * MiB), ("f", 1), ("a", 2, 44 * MiB)]
    res = simulate(seq, limit_bytes=50 * MiB)
    assert not res["oom"] and res["num_alloc_retries"] == 2 and res["reserved"] == 44 * MiB


def test_cap_check_uses_the_allocation_size_not_the_request():
    """A 2 MiB request takes a 20 MiB segment: the cap refuses it at 19 MiB left (alloc_block
    checks get_allocation_size), though the request itself would fit."""
    res = simulate([("a", 0, 30 * MiB), ("a", 1, 2 * MiB)], limit_bytes=49 * MiB)
    assert res["oom"] and res["oom_at"] == 1


def test_capped_expandable_segments_unmap_the_whole_free_pages():
    """Expandable: 30 + 30 MiB mapped in 20 MiB pages (60 MiB), the first freed; a 50 MiB request
    under an 85 MiB cap unmaps the one whole page inside the free [0, 30) MiB (reserved 40 MiB)
    and is still refused (40 + 50 > 85); under 95 MiB it fits after the unmap."""
    seq = [("a", 0, 30 * MiB), ("a", 1, 30 * MiB), ("f", 0), ("a", 2, 50 * MiB)]
    assert simulate(seq, expandable_segments=True)["peak_reserved"] == 120 * MiB
    res = simulate(seq, expandable_segments=True, limit_bytes=85 * MiB)
    assert res["oom"] and res["oom_at"] == 3 and res["reserved"] == 40 * MiB and res["num_alloc_retries"] == 1
    ok = simulate(seq, expandable_segments=True, limit_bytes=95 * MiB)
    assert not ok["oom"] and ok["num_alloc_retries"] == 1 and ok["peak_reserved"] <= 100 * MiB


def test_capped_expandable_remaps_an_unmapped_hole():
    """The unmapped hole a release leaves is found again (the lowest unmapped block with room) and
    its pages mapped anew; the cap is checked with the request's allocation size, then whole pages
    are mapped (60 MiB for 50, 40 for 30), as torch does, which can end above the cap."""
    from vramfit.memory.allocator import OutOfMemory

    a = CachingAllocator(expandable_segments=True, limit_bytes=110 * MiB)
    x = a.malloc(40 * MiB)
    start = x.addr
    a.malloc(20 * MiB)  # 60 MiB mapped
    a.free(x)
    a.malloc(50 * MiB)  # no free block holds it; 60 + 50 <= 110: 3 pages mapped at the end (120)
    assert a.reserved == 120 * MiB and a.num_alloc_retries == 0
    with pytest.raises(OutOfMemory):
        a.malloc(50 * MiB)  # 120 + 50 > 110: x's 2 pages unmapped (80); 80 + 50 > 110 still
    assert a.reserved == 80 * MiB and a.num_alloc_retries == 1
    w = a.malloc(30 * MiB)  # 80 + 30 <= 110: the hole where x was, mapped again
    assert w.addr == start and a.reserved == 120 * MiB


def test_grouped_mm_of_fp32_experts_stays_fp32_under_autocast():
    # CUDA autocast has no kernel for _grouped_mm and transformers casts the input to the weight's
    # dtype, so fp32 experts under bf16-mixed multiply in fp32 with no bf16 copy of the weights (the
    # H100 memory history of Mixtral bf16-mixed: fp32 gate_up outputs, no expert-weight casts); the
    # meta kernel takes bf16 only and is stood in for, backward included (weight gradient first)
    import torch

    from vramfit.model import trace
    from vramfit.memory.events import _recorder_class

    G, M, K, N = 4, 64, 32, 48
    rec = _recorder_class()()
    w = torch.nn.Parameter(torch.empty((G, N, K), device="meta"))
    rec.live[w.untyped_storage()._cdata] = rec.alloc(w.numel() * 4)  # loaded with the model
    x = torch.empty((M, K), device="meta", requires_grad=True)
    offs = torch.empty((G,), dtype=torch.int32, device="meta")
    with rec, trace._patched_sdpa(True, torch.bfloat16):
        with trace._autocast_mode(torch.bfloat16):
            out = torch.nn.functional.grouped_mm(x, w.transpose(-2, -1), offs=offs)
        fwd = [e[2] for e in rec.events[1:] if e[0] == "a"]
        out.backward(torch.empty_like(out))
    assert out.dtype == torch.float32 and fwd == [M * N * 4]  # the output only: no weight cast
    bwd = [e[2] for e in rec.events[len(fwd) + 1:] if e[0] == "a"]
    assert bwd[-2:] == [G * N * K * 4, M * K * 4]  # the weight's gradient, then the input's
    assert w.grad.dtype == torch.float32 and w.grad.is_contiguous()  # kept as .grad, no copy


def test_gradient_accumulation_is_replayed_in_place():
    # autograd's InputBuffer adds a tensor's second gradient into the first in place when it holds
    # the last reference (CUDA, no dispatch mode); under the recorder it adds out of place, and the
    # replay folds that sum back into the first gradient's block (H100 memory histories of
    # pythia-410m and llama-3.2-1b: no third gradient-sized block)
    import torch

    from vramfit.memory.events import _recorder_class, _sum_in_place

    x = torch.empty((64, 256), device="meta", requires_grad=True)
    rec = _recorder_class()()
    with rec:
        y = x.exp()  # x's two uses: exp and mul meet in one InputBuffer
        z = (y * x).sum()
        rec.backward = True
        z.backward()
        rec.backward = False
    nbytes = x.numel() * 4
    sums = rec.sums
    assert len(sums) == 1  # the one accumulation, recorded out of place
    marks = {"end": len(rec.events)}
    folded = _sum_in_place(rec.events, rec.sums, marks)
    assert len(folded) == len(rec.events) - 2 and marks["end"] == len(folded)
    out_id = sums[0][1]
    assert not any(e[0] == "a" and e[1] == out_id for e in folded)
    live = {}  # every free names a live block, and every block is freed once
    for e in folded:
        if e[0] == "a":
            live[e[1]] = e[2]
        elif e[0] == "f":
            live.pop(e[1])
    count = lambda evs: sum(1 for e in evs if e[0] == "a" and e[2] == nbytes)  # noqa: E731
    assert count(folded) == count(rec.events) - 1  # the sum took the first gradient's block


def test_checkpoint_recompute_adds_are_not_folded():
    # the same add with grad enabled (checkpoint's recompute, a forward) allocates on CUDA too
    import torch

    from vramfit.memory.events import _recorder_class

    a = torch.empty((64, 256), device="meta")
    rec = _recorder_class()()
    with rec:
        rec.backward = True
        with torch.enable_grad():
            c = a.exp() + a.sin()
    assert rec.sums == [] and c.shape == a.shape


def test_eager_replay_builds_the_padding_and_causal_bool_mask(tmp_path):
    # the Trainer's batch carries an attention_mask; eager attention never skips the mask, so the
    # padding mask and the causal one are joined into a (B, 1, S, S) bool before the float mask
    # (H100 memory history of smollm2-135m eager: 2 MiB at b 8, s 512; replayed, its reserved peak
    # went from -5.7% to exact)
    import json

    from conftest import TINY_LLAMA

    from vramfit.memory.events import training_events
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.model.spec import load_spec

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    spec = load_spec(str(cfg))
    B, S = 2, 48
    sizes = {}
    for attn in ("eager", "sdpa"):
        setup = make_setup("full", "bf16-true", seq_len=S, micro_batch=B, attn=attn)
        ev = training_events(spec, setup, resolve_targets(spec, setup), steps=1)
        fwd = ev["events"][ev["marks"]["step0.forward"]:ev["marks"]["step0.backward"]]
        sizes[attn] = [e[2] for e in fwd if e[0] == "a"]
    def count(attn, n):
        return sum(1 for x in sizes[attn] if x == n)

    assert count("eager", B * S * S) == count("sdpa", B * S * S) + 1  # the bool mask
    assert count("eager", B * S * S * 2) == count("sdpa", B * S * S * 2) + 1  # the bf16 mask made from it


def test_autocast_casts_an_ops_arguments_last_to_first():
    # CUDA autocast casts F.linear's arguments inside one C++ call whose arguments GCC evaluates
    # last to first: the H100 memory history of pythia-410m bf16-mixed has the bias (6 KiB), the
    # weight (6 MiB) and then the input (64 MiB) in every query_key_value forward
    import torch

    from vramfit.model import trace
    from vramfit.memory.events import _recorder_class
    from vramfit.memory.kernels import CUBLAS_WORKSPACE

    x = torch.empty((8, 64, 32), device="meta")
    w = torch.nn.Parameter(torch.empty((96, 32), device="meta"))
    b = torch.nn.Parameter(torch.empty((96,), device="meta"))
    rec = _recorder_class()()
    with rec, trace._autocast_mode(torch.bfloat16):
        out = torch.nn.functional.linear(x, w, b)
    sizes = [e[2] for e in rec.events if e[0] == "a" and e[2] != CUBLAS_WORKSPACE]
    assert sizes == [96 * 2, 96 * 32 * 2, 8 * 64 * 32 * 2, 8 * 64 * 96 * 2]  # bias, weight, input, output
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flash_backward_takes_its_scratch_as_one_allocation(kv_heads):
    # torch's flash-attention backward allocates softmax_d, dq_accum and (grouped KV heads) the
    # expanded dk / dv as ONE block, 256 bytes more than their sum (H100 memory histories:
    # pythia-410m 130 MiB + 256 B = 2 + 128 MiB; llama-3.2-1b 129 MiB + 256 B = 1 + 64 + 32 + 32 MiB)
    import torch

    from vramfit.memory.events import _recorder_class
    from vramfit.model.emulate import _flash_like_sdpa

    B, H, S, D = 2, 4, 200, 64
    q = torch.empty((B, S, H, D), device="meta", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.empty((B, S, kv_heads, D), device="meta", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    v = torch.empty((B, S, kv_heads, D), device="meta", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    rec = _recorder_class()()
    for t in (q, k, v):  # loaded before the recording
        rec.live[t.untyped_storage()._cdata] = rec.alloc(t.untyped_storage().nbytes())
    with rec:
        out = _flash_like_sdpa()(q, k, v, is_causal=True, enable_gqa=kv_heads != H)
        grad = torch.empty_like(out)
        n_fwd = len(rec.events)
        out.backward(grad)
    s_r = 256  # S rounded up to 128
    scratch = B * H * s_r * 4 + B * s_r * H * D * 4 + (B * S * H * D * 2 * 2 if kv_heads != H else 0) + 256
    bwd = [e[2] for e in rec.events[n_fwd:] if e[0] == "a"]
    grads = [B * S * H * D * 2, B * S * kv_heads * D * 2, B * S * kv_heads * D * 2]  # dq, dk, dv
    assert bwd[:4] == grads + [scratch]


def test_flash_output_follows_the_layout_of_q():
    # the flash kernel allocates its output like q as it sees it, (B, S, H, D): a q contiguous as
    # (B, H, S, D) (GPT-NeoX's and Phi-3's partial rotary ends in torch.cat) gives an output whose
    # transpose(1, 2).contiguous() copies it -- the H100 memory history of pythia-410m has that 64 MiB
    # copy in every attention forward, and the replay's reserved peak went from -17.6% to exact
    import torch

    from vramfit.memory.events import _recorder_class
    from vramfit.model.emulate import _flash_like_sdpa

    B, H, S, D = 2, 4, 128, 16
    kv = [torch.empty((B, S, H, D), device="meta", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2)]
    copies = {}
    for name, q in (("projected", torch.empty((B, S, H, D), device="meta", dtype=torch.bfloat16).transpose(1, 2)),
                    ("concatenated", torch.empty((B, H, S, D), device="meta", dtype=torch.bfloat16))):
        rec = _recorder_class()()
        for t in (q, *kv):
            rec.live[t.untyped_storage()._cdata] = rec.alloc(t.untyped_storage().nbytes())
        with rec:
            out = _flash_like_sdpa()(q, *kv, is_causal=True)
            n = len(rec.events)
            out.transpose(1, 2).contiguous()
        copies[name] = [e[2] for e in rec.events[n:] if e[0] == "a"]
    assert copies == {"projected": [], "concatenated": [B * S * H * D * 2]}


def test_replay_never_reads_a_padding_mask():
    # transformers 5.17 asks whether OPT's all-ones padding mask is all ones (a value read) before it
    # skips the causal mask; the replayed batches are never padded, so on meta the answer is yes
    import torch
    from transformers import masking_utils

    from vramfit.model import trace

    if not hasattr(masking_utils, "fast_all"):
        pytest.skip("this transformers has no fast_all")
    mask = torch.ones((2, 16), dtype=torch.bool, device="meta")
    with trace._patched_sdpa(True):
        assert masking_utils.fast_all(mask) is True
        assert bool(masking_utils.fast_all(torch.zeros(3, dtype=torch.bool))) is False  # real tensors: read


def test_flash_backward_holds_the_recomputed_output_until_it_returns():
    # the kernel reads the output and its log-sum-exp: under checkpointing the recomputed ones have
    # no other reference, and the H100 memory history of pythia-1b frees the output after the
    # backward's scratch, not before dq (freeing it early took that run from exact to -7.7%)
    import torch
    from torch.utils.checkpoint import checkpoint

    from vramfit.memory.events import _recorder_class
    from vramfit.model.emulate import _flash_like_sdpa

    B, H, S, D = 2, 4, 128, 16
    qkv = [torch.empty((B, S, H, D), device="meta", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
           for _ in range(3)]
    rec = _recorder_class()()
    for t in qkv:
        rec.live[t.untyped_storage()._cdata] = rec.alloc(t.untyped_storage().nbytes())
    with rec:
        out = checkpoint(lambda q, k, v: _flash_like_sdpa()(q, k, v, is_causal=True), *qkv, use_reentrant=False)
        grad = torch.empty_like(out)
        n = len(rec.events)
        out.backward(grad)
    bwd = rec.events[n:]
    size = {e[1]: e[2] for e in bwd if e[0] == "a"}
    out_bytes = B * S * H * D * 2
    recomputed_out = [i for i, s in size.items() if s == out_bytes][0]  # the recompute's output comes first
    scratch = max(size, key=size.get)
    at = {("a" if e[0] == "a" else "f", e[1]): j for j, e in enumerate(bwd)}
    assert at[("f", scratch)] < at[("f", recomputed_out)]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_accumulation_replay_skips_repeated_micro_batches_exactly(tmp_path, method):
    """replay._simulate_accumulation skips the micro-batches of an accumulating step once the
    allocator's state repeats: every figure equals the whole stream's, under no cap and under caps
    that make it release its cache and retry, or run out."""
    import json

    from conftest import TINY_LLAMA
    from vramfit.memory.allocator import simulate
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.events import training_events
    from vramfit.memory.replay import _simulate_accumulation
    from vramfit.memory.setup import make_setup
    from vramfit.model.spec import load_spec

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    spec = load_spec(str(cfg))
    setup = make_setup(method=method, seq_len=64, micro_batch=2, grad_accum=8)
    _, targets = estimate_setup(spec, setup)
    ev = training_events(spec, setup, targets, steps=2, grad_accum=8)
    skipped = 0
    for expandable in (False, True):
        whole = simulate(ev["events"], expandable_segments=expandable)
        for cap in (None, whole["peak_reserved"] - (1 << 20), whole["peak_reserved"] // 2):
            want = simulate(ev["events"], expandable_segments=expandable, limit_bytes=cap)
            got = _simulate_accumulation(ev["events"], ev["marks"], 8, expandable, cap, 0)
            for key in ("peak_allocated", "peak_reserved", "oom", "oom_at", "num_alloc_retries"):
                assert got[key] == want[key], (expandable, cap, key)
            skipped += got["events"] - got["events_replayed"]
    assert skipped > 0  # the uncapped runs repeat: their skipped micro-batches were not replayed
