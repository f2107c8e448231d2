"""What a rank holds when training begins and what the launcher's QLoRA really runs (issue 21's two gaps):
DDP's constructor broadcasts the module states bucket by bucket as broadcast_coalesced flattens them, and the
launcher's QLoRA is replayed as itself (4-bit layers, no prepare_model_for_kbit_training, the run's adapters),
with FSDP's mixed precision holding its trainable parameters in fp32.  Numbers from the h100-2026-12-07
fake-process-group runs (benchmarks/results/h100-2026-12-07*-fake-pg*.jsonl)."""

from __future__ import annotations

import pytest

from vramfit.memory.distributed import get_strategy, shard_terms
from vramfit.memory.rank_replay import (
    broadcast_buckets,
    ddp_broadcast_states,
    launched_trace_setup,
    module_states,
)
from vramfit.memory.setup import make_setup, resolve_targets
from vramfit.memory.walk import _lora_total

MiB = 1 << 20


def _max_live(events) -> int:
    live, cur, top = {}, 0, 0
    for ev in events:
        if ev[0] == "a":
            live[ev[1]] = ev[2]
            cur += ev[2]
            top = max(top, cur)
        else:
            cur -= live.pop(ev[1])
    assert not live  # every flattened bucket is freed by the end of the wrap
    return top


def test_broadcast_buckets_group_per_dtype_close_at_the_limit_and_keep_the_first_tensors_order():
    mb = MiB
    states = [("bf16", 300 * mb), ("bf16", 100 * mb), ("f32", 1 * mb), ("bf16", 200 * mb), ("bf16", 10 * mb),
              ("f32", 2 * mb)]
    # the 300 MiB tensor closes a bucket of its own; 100 + 200 close the next; 10 MiB and the fp32 pair remain,
    # ordered by their first tensor (the fp32 bucket's is index 2, the last bf16 one's index 4)
    assert broadcast_buckets(states, 250 * mb) == [(300 * mb, 1), (300 * mb, 2), (3 * mb, 2), (10 * mb, 1)]
    ev = ddp_broadcast_states(states, 250 * mb)
    # a bucket of one tensor is a view (nothing allocated): only the two multi-tensor buckets are flattened
    assert [e[2] for e in ev if e[0] == "a"] == [300 * mb, 3 * mb]
    assert _max_live(ev) == 303 * mb


def test_ddp_broadcast_keeps_at_most_two_flattened_buckets_in_flight():
    states = [("bf16", 130 * MiB)] * 8  # four buckets of two tensors each
    ev = ddp_broadcast_states(states, 250 * MiB)
    assert sum(e[0] == "a" for e in ev) == 4
    assert _max_live(ev) == 2 * 260 * MiB


def test_the_module_states_are_the_ranks_weights_and_adapters(llama1b):
    s = make_setup(method="lora", precision="bf16-true", seq_len=1024, micro_batch=2, target_modules="all-linear")
    targets = resolve_targets(llama1b, s)
    states = module_states(llama1b, s, targets)
    assert sum(b for k, b in states if k == "bfloat16") == llama1b.params_total * 2
    assert sum(b for k, b in states if k == "float32") == _lora_total(llama1b, tuple(targets), 16) * 4
    assert states[0] == ("bfloat16", llama1b.params_by_role["embeddings"] * 2)  # named_parameters' first


def test_the_8b_lora_wrap_peaks_with_the_lm_head_bucket_as_measured():
    """llama-3.1-8b[8 layers] LoRA under DDP (fake group, N = 2, 4, 8): allocated at train begin 5,345.1 MiB, of
    it 6.5 MiB the gradient buckets made after the broadcast; the wrap's peak 6,868.7 MiB: 1,530.0 MiB of
    broadcast buckets in flight over the 5,338.6 MiB loaded, the last of them the untied LM head flattened with
    what the last layer left (the uniform 250 MiB buckets priced 500 MiB)."""
    from vramfit.model.spec import load_spec

    spec = load_spec("llama-3.1-8b", overrides={"num_hidden_layers": 8})  # 8 of its 32 layers, as the runs
    s = make_setup(method="lora", precision="bf16-true", seq_len=1024, micro_batch=2)
    states = module_states(spec, s, resolve_targets(spec, s))
    top = _max_live(ddp_broadcast_states(states))
    assert abs(top / MiB - (6868.7 - 5345.1 + 6.5)) < 1


def test_the_launched_qlora_is_traced_as_itself():
    ddp, fsdp = get_strategy("ddp"), get_strategy("fsdp-full")
    fused = make_setup(method="qlora", precision="bf16-amp", seq_len=512, micro_batch=1, loss="fused")
    t = launched_trace_setup(ddp, fused, 4)
    assert (t.method, t.kbit_prep, t.adapter_dtype) == ("qlora", False, "bfloat16")  # trl's SFTTrainer
    plain = make_setup(method="qlora", precision="bf16-amp", seq_len=512, micro_batch=1, loss="logits")
    assert launched_trace_setup(fsdp, plain, 4).adapter_dtype == "float32"  # transformers' Trainer: peft's fp32
    assert launched_trace_setup(ddp, fused, 1) is None  # one process: the single-GPU recipe
    lora = make_setup(method="lora", precision="bf16-amp", seq_len=512, micro_batch=1)
    assert launched_trace_setup(ddp, lora, 4) is None


@pytest.mark.parametrize("loss", ["fused", "logits"])
def test_fsdp_mixed_precision_holds_the_launched_qlora_adapters_in_fp32(llama1b, loss):
    """accelerate's prepare_model upcasts FSDP1's trainable flat parameters to fp32 under mixed precision, trl's
    bf16 adapters too: the h100-2026-12-07d history of llama-3.2-1b QLoRA fsdp-full N = 4 (fused) holds
    10.75 MiB of adapter shards and twice that in AdamW states."""
    s = make_setup(method="qlora", precision="bf16-amp", seq_len=1024, micro_batch=2, loss=loss)
    targets = resolve_targets(llama1b, s)
    t = shard_terms(llama1b, s, targets, get_strategy("fsdp-full"), 4)
    fp32_shard = _lora_total(llama1b, tuple(targets), 16) * 4 / 4
    assert abs(dict(t.weights)["lora_adapters_sharded"] - fp32_shard) < 1024
    assert abs(t.optimizer - 2 * fp32_shard) < 4096
    # DDP keeps trl's cast: bf16 adapters and states
    d = shard_terms(llama1b, s, targets, get_strategy("ddp"), 4)
    assert dict(d.weights)["lora_adapters"] == _lora_total(llama1b, tuple(targets), 16) * (2 if loss == "fused" else 4)
