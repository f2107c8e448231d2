"""One rank's step under DDP / FSDP2 / the launcher's QLoRA, moment by moment (vramfit.memory.rank_step,
fsdp, distributed) and its replay (vramfit.memory.rank_replay): each mechanism found against the
fake-process-group runs of 2026-12-07 (benchmarks/results/h100-2026-12-07c-fake-pg.md), on the CPU."""

import math

import pytest
from conftest import TINY_LLAMA, wide_tiny_spec

from vramfit.errors import VramfitError
from vramfit.memory.constants import DEFAULT
from vramfit.memory.distributed import (
    activation_setup,
    estimate_distributed,
    get_strategy,
    rank_moments,
    shard_terms,
)
from vramfit.memory.estimate import estimate_setup, trace_key
from vramfit.memory.rank_step import MOMENTS, RankTerms, moment_bytes, moments, rank_breakdown, single_gpu_grads
from vramfit.memory.setup import make_setup, resolve_targets
from vramfit.memory.walk import (
    _grad_totals,
    _quant_totals,
    breakdown,
    optimizer_state_bytes,
    optimizer_step_temp_bytes,
    trainable_tensors,
    weight_bytes,
)
from vramfit.model.trace import activation_profile

GiB = 1 << 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return wide_tiny_spec(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return wide_tiny_spec(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


def _single(spec, s, c=DEFAULT):
    targets = resolve_targets(spec, s)
    profile = activation_profile(spec, trace_key(spec, s, targets), grad_ckpt=s.grad_ckpt)
    tensors = trainable_tensors(spec, s, targets)
    G, G_out = _grad_totals(tensors)
    terms = RankTerms(weights=tuple(weight_bytes(spec, s, targets).items()),
                      optimizer=optimizer_state_bytes(tensors, s),
                      optimizer_temp=optimizer_step_temp_bytes(tensors, s, spec),
                      grads=single_gpu_grads(G, G_out, G, spec.num_layers), held={})
    return targets, profile, terms, breakdown(spec, s, targets, profile, c)


# --------------------------------------------------------------------------- the moments


@pytest.mark.parametrize("method,precision,ckpt,loss", [
    ("full", "bf16-true", True, "logits"), ("full", "bf16-mixed", False, "fused"), ("lora", "bf16-amp", False, "fused"),
    ("lora", "bf16-mixed", True, "logits"), ("qlora", "bf16-true", True, "fused"),
    ("qlora", "bf16-amp", False, "logits")])
def test_the_moments_rebuild_the_single_gpu_walks_phases_to_the_byte(tiny, method, precision, ckpt, loss):
    s = make_setup(method=method, precision=precision, seq_len=128, micro_batch=2, grad_ckpt=ckpt, loss=loss)
    targets, profile, terms, bd = _single(tiny, s)
    at = moment_bytes(moments(tiny, s, targets, profile), terms, 64 << 20)
    rebuilt = {p: max(v for k, v in at.items() if k.startswith(p)) for p in ("forward", "backward", "optimizer")}
    assert rebuilt == bd.phases


def test_ddp_holds_its_buckets_at_every_moment_and_nothing_else_changes(llama1b):
    s = make_setup(method="full", precision="bf16-true", seq_len=1024, micro_batch=2)
    t = shard_terms(llama1b, s, (), get_strategy("ddp"), 4)
    G = _grad_totals(trainable_tensors(llama1b, s, ()))[0]
    assert {k: t.held_at(k) for k in MOMENTS} == {k: G for k in MOMENTS}
    single, _ = estimate_setup(llama1b, s)
    assert estimate_distributed(llama1b, s, "ddp", 4).breakdown.phases == {k: v + G for k, v in single.phases.items()}


# --------------------------------------------------------------------------- QLoRA as the launcher loads it


def test_launched_qlora_keeps_unquantized_weights_in_bf16_and_walks_loras_activations(llama8b):
    s = make_setup(method="qlora", precision="bf16-true", seq_len=1024, micro_batch=2, loss="logits")
    st = get_strategy("ddp")
    act = activation_setup(st, s, 8)
    assert (act.method, act.precision) == ("lora", "bf16-true")
    assert resolve_targets(llama8b, act) == resolve_targets(llama8b, s)  # all-linear either way
    w = dict(shard_terms(llama8b, s, resolve_targets(llama8b, s), st, 8).weights)
    q_numel = _quant_totals(llama8b, DEFAULT, True)[0]
    assert w["weights_bfloat16_unquantized"] == (llama8b.params_total - q_numel) * 2
    single, _ = estimate_setup(llama8b, s)  # the single-GPU recipe: prepare_model_for_kbit_training's fp32
    ddp = estimate_distributed(llama8b, s, "ddp", 8)
    assert ddp.peak_allocated_bytes < single.peak_allocated_bytes - 5 * GiB
    assert activation_setup(st, s, 1) == s  # one process: vramfit train's single-GPU path


def test_trl_casts_a_quantized_models_adapters_to_bf16_halving_their_states(llama1b):
    base = dict(method="qlora", precision="bf16-true", seq_len=512, micro_batch=1)
    st = get_strategy("ddp")
    fused = make_setup(**base, loss="fused")  # SFTTrainer
    plain = make_setup(**base, loss="logits")  # transformers' Trainer
    targets = resolve_targets(llama1b, fused)
    a, b = shard_terms(llama1b, fused, targets, st, 2), shard_terms(llama1b, plain, targets, st, 2)
    assert 2 * dict(a.weights)["lora_adapters"] == dict(b.weights)["lora_adapters"]
    assert 2 * a.optimizer == b.optimizer and 2 * a.held_at("optimizer") == b.held_at("optimizer")


def test_bf16_adapters_save_their_inputs_in_bf16_without_autocast(llama1b):
    st = get_strategy("ddp")

    def saved_less(precision):  # the rank's saved activations below LoRA's (fp32 adapters) trace
        s = make_setup(method="qlora", precision=precision, seq_len=512, micro_batch=1, loss="fused")
        t = resolve_targets(llama1b, s)
        act = activation_setup(st, s, 2)
        prof = activation_profile(llama1b, trace_key(llama1b, act, t), grad_ckpt=act.grad_ckpt)
        terms = shard_terms(llama1b, s, t, st, 2)
        return moments(llama1b, act, t, prof, DEFAULT).A_fwd - rank_moments(llama1b, s, act, t, prof, DEFAULT,
                                                                             terms).A_fwd, t

    less, t = saved_less("bf16-true")
    by = {lin.name: lin for lin in llama1b.linears}
    assert less == 512 * sum(2 * (by[x].in_features + 16) for x in t)  # dropout output + lora_A output
    assert saved_less("bf16-amp")[0] == 0  # under autocast peft casts nothing


# --------------------------------------------------------------------------- FSDP2 as accelerate 1.15 wraps it


def test_fsdp_tied_tail_holds_the_embedding_all_step_the_untied_one_lets_it_go(tiny, tiny_tied):
    s = make_setup(method="full", precision="bf16-true", seq_len=128, micro_batch=2)
    st = get_strategy("fsdp-full")
    untied, tied = shard_terms(tiny, s, (), st, 2), shard_terms(tiny_tied, s, (), st, 2)
    g = lambda t, k: t.held[k]["fsdp_gathered_params"]  # noqa: E731
    V, H = TINY_LLAMA["vocab_size"], 128
    # untied: the [norm, lm_head] tail is resharded after its backward; the embedding unit is gathered
    # only while it runs
    assert g(untied, "backward_loss") == 2 * (V * H + H)
    layer_u = g(untied, "backward_top") / 2
    assert g(tied, "backward_top") == pytest.approx(2 * layer_u + 2 * (V * H + H))
    # and its reduce-scatter input is held until the top layer's post-backward
    assert untied.held["backward_top"]["fsdp_reduce_scatter_input"] == 2 * (V * H + H)
    assert "fsdp_reduce_scatter_input" not in tied.held["backward_top"]


def test_fsdp_mixed_precision_upcasts_trainable_weights_to_fp32_and_gathers_bf16(llama1b):
    st = get_strategy("fsdp-full")
    amp = dict(shard_terms(llama1b, make_setup(method="full", precision="bf16-amp", seq_len=512), (), st, 4).weights)
    true = dict(shard_terms(llama1b, make_setup(method="full", precision="bf16-true", seq_len=512), (), st, 4).weights)
    assert amp["weights_float32_sharded"] == 2 * true["weights_bfloat16_sharded"]
    lora = make_setup(method="lora", precision="bf16-amp", seq_len=512)
    w = dict(shard_terms(llama1b, lora, resolve_targets(llama1b, lora), st, 4).weights)
    assert w["weights_bfloat16_sharded"] == true["weights_bfloat16_sharded"]  # frozen: not upcast


def test_fsdp_other_streams_pools_raise_reserved_but_not_allocated(llama8b):
    s = make_setup(method="full", precision="bf16-true", seq_len=1024, micro_batch=2, grad_ckpt=True)
    t = shard_terms(llama8b, s, (), get_strategy("fsdp-full"), 2)
    targets, profile, _, bd = _single(llama8b, s)
    m = moments(llama8b, s, targets, profile)
    with_pools, without = rank_breakdown(bd, m, t), rank_breakdown(bd, m, RankTerms(**{**t.__dict__, "pools": {}}))
    assert with_pools.peak_allocated_bytes == without.peak_allocated_bytes
    # the peak is the optimizer step, where the reduce-scatter stream's blocks (the sharded gradients) are
    # in use: what is left cached beside it is the all-gather stream's pool and the reduce-scatter
    # stream's segments beyond its sharded gradients (the allocator's rounding, the outputs' blocks)
    assert with_pools.peak_phase == "optimizer"
    ag = t.pools["fsdp_all_gather_stream"][0]
    rs, rs_used = t.pools["fsdp_reduce_scatter_stream"]
    assert 0 <= rs - rs_used["optimizer"] < 0.01 * rs
    assert with_pools.peak_reserved_bytes - without.peak_reserved_bytes == ag + rs - rs_used["optimizer"]


def test_qlora_under_fsdp_needs_autocast(llama1b):
    with pytest.raises(VramfitError, match="needs autocast"):
        estimate_distributed(llama1b, make_setup(method="qlora", precision="bf16-true"), "fsdp-full", 2)
    assert estimate_distributed(llama1b, make_setup(method="qlora", precision="bf16-amp"), "fsdp-full", 2)


# --------------------------------------------------------------------------- the replay's pieces


def test_ddp_buckets_cap_the_first_at_1_mib_and_the_rest_at_25(llama1b):
    from vramfit.memory.rank_replay import ddp_buckets

    t = trainable_tensors(llama1b, make_setup(method="full", precision="bf16-true"), ())
    sizes = ddp_buckets(t)
    assert sum(sizes) == _grad_totals(t)[0]
    assert max(sizes) == 128256 * 2048 * 2  # the embedding, larger than any cap, alone
    assert all(x < (25 << 20) + (32 << 20) for x in sizes if x != max(sizes))  # a cap plus at most one tensor
    assert sizes[0] >= 1 << 20 and all(x >= 25 << 20 for x in sizes[1:-1])


def test_ddp_broadcast_keeps_at_most_two_buckets_in_flight():
    from vramfit.memory.rank_replay import ddp_broadcast_states

    ev = ddp_broadcast_states([("bfloat16", 25 << 20)] * 40)  # four 250 MiB buckets of ten tensors
    live, most = set(), 0
    for e in ev:
        live.add(e[1]) if e[0] == "a" else live.discard(e[1])
        most = max(most, len(live))
    assert most == 2 and not live and sum(e[2] for e in ev if e[0] == "a") == 1000 << 20


def test_simulate_rank_places_the_wrap_after_empty_cache_and_measures_from_there():
    from vramfit.memory.rank_replay import simulate_rank

    events = [("a", 1, 100 << 20), ("f", 1), ("e",), ("a", 2, 30 << 20), ("f", 2)]
    sim = simulate_rank(events, {}, [("a", -1, 50 << 20)])
    assert sim["peak_allocated"] == 80 << 20  # the load's 100 MiB before empty_cache is not measured
    assert sim["peak_reserved"] == 80 << 20


def test_step_windows_cut_the_backward_at_each_layers_first_gradient(tiny):
    from vramfit.memory.rank_replay import phase_peaks, rank_events, step_windows, window_peaks

    s = make_setup(method="lora", precision="bf16-true", seq_len=64, micro_batch=1, target_modules="q_proj,v_proj")
    t = resolve_targets(tiny, s)
    ev = rank_events(tiny, s, t)
    cuts, end, L = step_windows(ev["events"], ev["marks"], tiny, trainable_tensors(tiny, s, t))
    names = [n for _, n in cuts]
    assert L == 3 and names == ["forward", "backward_head", ("layer", 0), ("layer", 1), ("layer", 2), "optimizer"]
    peaks = window_peaks(ev["events"], cuts, end)
    assert max(peaks.values()) == max(phase_peaks(ev["events"], ev["marks"]).values())


def test_ddp_replay_is_the_single_gpu_replay_plus_its_buckets(tiny):
    from vramfit.memory.rank_replay import rank_events, replayed_rank, simulate_rank

    s = make_setup(method="full", precision="bf16-true", seq_len=64, micro_batch=2)
    est = estimate_distributed(tiny, s, "ddp", 2)
    r = replayed_rank(tiny, s, "ddp", 2, est)
    ev = rank_events(tiny, s, ())
    single = simulate_rank(ev["events"], ev["marks"], [])
    G = _grad_totals(trainable_tensors(tiny, s, ()))[0]
    assert r.peak_allocated_bytes == pytest.approx(single["peak_allocated"] + G, abs=4 * 512 * 8)
    assert r.device_bytes > r.peak_reserved_bytes >= r.peak_allocated_bytes
    assert math.isclose(r.breakdown.components["ddp_gradient_buckets"], G)


# --------------------------------------------------------------------------- the report


def test_report_predicts_a_run_as_the_engine_accelerate_really_set_up():
    from benchmarks.distributed.report import ran_as

    rec = lambda st, kind: {"case": {"strategy": st}, "engine": {"distributed_type": kind}}  # noqa: E731
    # the zero2 / zero3 lines of 2026-12-07: the launch environment had no ACCELERATE_USE_DEEPSPEED
    assert ran_as(rec("zero2", "DistributedType.MULTI_GPU")) == "ddp"
    assert ran_as(rec("zero3", "DistributedType.DEEPSPEED")) == "zero3"
    assert ran_as(rec("fsdp-grad-op", "DistributedType.FSDP")) == "fsdp-grad-op"
    assert ran_as({"case": {"strategy": "ddp"}}) == "ddp"  # no record of the engine: as named


def test_report_before_after_table_has_a_row_per_strategy_as_run():
    from benchmarks.distributed.report import fake_before_after

    def row(st, before, after):
        e = lambda x: {"peak_allocated_bytes": x, "peak_reserved_bytes": x, "device_bytes": x}  # noqa: E731
        return {"ran_as": st, "error_before": e(before), "error_fitted": e(after), "error": e(after)}

    text = fake_before_after([row("ddp", 0.5, 0.001), row("ddp", -0.1, 0.0), row("fsdp-full", 0.2, -0.02)])
    lines = [x for x in text.splitlines() if x.startswith("| ddp") or x.startswith("| fsdp")]
    assert lines[0].startswith("| ddp | 2 | 30.0 / 46.0 / 50.0% | 0.1 / 0.1 / 0.1% | 0.1 / 0.1 / 0.1% |")
    assert lines[1].startswith("| fsdp-full | 1 | 20.0 / 20.0 / 20.0% | 2.0 / 2.0 / 2.0% |")


def test_report_groups_by_strategy_n_and_method_and_counts_under_predictions():
    from benchmarks.distributed.report import fake_by_strategy

    def row(st, n, method, err):
        e = {"peak_allocated_bytes": err, "peak_reserved_bytes": err, "device_bytes": err}
        return {"ran_as": st, "case": {"world_size": n, "method": method}, "error": e}

    text = fake_by_strategy([row("ddp", 4, "qlora", -0.03), row("ddp", 4, "full", 0.01), row("ddp", 4, "qlora", 0.0),
                             row("fsdp-full", 2, "lora", 0.05)])
    lines = [x for x in text.splitlines() if x.startswith("| ddp") or x.startswith("| fsdp")]
    assert [x.split(" | ")[:4] for x in lines] == [["| ddp", "4", "full", "1"], ["| ddp", "4", "qlora", "2"],
                                                  ["| fsdp-full", "2", "lora", "1"]]
    assert "1.50 / 2.70 / 3.00% (1)" in lines[1]  # one of the two under-predicted by more than 2%


# --------------------------------------------------------------------------- FSDP2 mixed precision, the tied tail


def test_fsdp_mixed_precision_keeps_no_autocast_copy_of_the_lm_head(llama1b):
    """Under FSDP2's MixedPrecisionPolicy the tail is gathered in bf16: autocast's cast of the head's weight
    returns it as it is, so the rank saves no copy of it (the logits path; trl's fused head never had one)."""
    s = make_setup(method="full", precision="bf16-mixed", seq_len=256, micro_batch=1, loss="logits")
    targets = resolve_targets(llama1b, s)
    profile = activation_profile(llama1b, trace_key(llama1b, s, targets), grad_ckpt=s.grad_ckpt)
    keep, drop = moments(llama1b, s, targets, profile), moments(llama1b, s, targets, profile, drop_weight_copies=True)
    head = llama1b.vocab_size * llama1b.hidden_size * 2
    assert profile.outside.const >= head
    assert drop.A_fwd <= keep.A_fwd - head
    assert drop.top_acts >= keep.top_acts - (keep.A_fwd - drop.A_fwd - int(profile.outside.const))  # freed there anyway
    t = shard_terms(llama1b, s, targets, get_strategy("fsdp-full"), 4)
    assert t.no_weight_copies
    m = rank_moments(llama1b, s, s, targets, profile, DEFAULT, t)
    assert m.A_fwd == drop.A_fwd


def test_the_tied_embeddings_gradient_is_in_the_replayed_end_window_once(tiny, tiny_tied):
    """The one-GPU replay's last window holds the tied embedding's own gradient (made, then added into the
    LM head's): the rank's end moment, which counts it too, is measured against a one-GPU moment holding it."""
    from vramfit.memory.rank_replay import tied_embedding_grad

    s = make_setup(method="full", precision="bf16-true", seq_len=128, micro_batch=2)
    fsdp, ddp = get_strategy("fsdp-full"), get_strategy("ddp")
    tensors = trainable_tensors(tiny_tied, s, ())
    assert tied_embedding_grad(tiny_tied, fsdp, tensors) == tiny_tied.vocab_size * tiny_tied.hidden_size * 2
    assert tied_embedding_grad(tiny_tied, ddp, tensors) == 0  # DDP's replay is its own events: nothing to match
    assert tied_embedding_grad(tiny, fsdp, trainable_tensors(tiny, s, ())) == 0  # untied: its own window
    lora = make_setup(method="lora", precision="bf16-true", seq_len=128, micro_batch=2)
    lora_tensors = trainable_tensors(tiny_tied, lora, resolve_targets(tiny_tied, lora))
    assert tied_embedding_grad(tiny_tied, fsdp, lora_tensors) == 0
