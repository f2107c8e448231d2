"""ZeRO-3 LoRA under (reentrant) gradient checkpointing: the recompute's gathers of the frozen weights grow layer by
layer through the backward (vramfit.memory.zero.recompute_gathers), the bottom layer's backward holding every
frozen weight beside its activations -- the h100-2026-12-07d history of llama-3.2-1b LoRA ZeRO-3 N = 4 ckpt fused
(the all-gather stream 1,913 MiB to layer 4, +116 MiB at each of the bottom four layers' recompute, 2,357 MiB at
the run's peak, layer 0's MLP backward).  CPU, no network."""

import json
from pathlib import Path

import pytest

from vramfit.memory.rank_step import backward_workspaces
from vramfit.memory.zero import ZERO3_PERSISTENCE_THRESHOLD, layer_weights, recompute_gathers

MiB = 1 << 20
RUN = "llama-3.2-1b-lora-bf16-mixed-zero3-n4r0-ckpt-fused-s1024b2"


def test_the_recompute_gathers_the_bottom_layers_last_each_after_the_layer_above_it(llama1b):
    """16 layers x 4 LoRA gradients (q, v: A and B), top layer first.  `rest` of 3.5 layers' weights: layers 0, 1,
    2 whole and half of layer 3, each where its backward window opens (after the last gradient of the layer above);
    the bottom layer's last -- after every other layer's gradients."""
    layer = layer_weights(llama1b, ZERO3_PERSISTENCE_THRESHOLD)
    assert layer == [2048 * 2048, 512 * 2048, 512 * 2048, 2048 * 2048] + [2048 * 8192] * 3  # q, k, v, o; the MLP
    L, per = llama1b.num_layers, 4
    grads = [(100 + 10 * g, 4096) for g in range(L * per)]  # (event index, bytes), the backward's order
    rest = [sum(layer)] * 3 + [sum(layer) // 2]
    out = recompute_gathers(llama1b, rest, grads, ZERO3_PERSISTENCE_THRESHOLD)
    assert [sum(e) for _, e in out] == [sum(layer)] * 3 + [sum(layer) // 2]
    assert out[0][1] == layer  # one block per parameter, module order
    # layer j (from the bottom) after the last gradient of layer j + 1: grads[(L - 1 - j) * per - 1]
    assert [i for i, _ in out] == [grads[(L - 1 - j) * per - 1][0] + 1 for j in range(4)]
    assert sum(sum(e) for _, e in out) == sum(rest)


def test_gradients_that_do_not_split_into_the_layers_keep_every_gather_at_the_backwards_end(llama1b):
    grads = [(100 + g, 4096) for g in range(63)]
    out = recompute_gathers(llama1b, [5, 7], grads, ZERO3_PERSISTENCE_THRESHOLD)
    assert out == [(162, [5, 7])]


def test_the_backward_threads_cublas_workspace_is_not_a_gradient():
    """A block born in the first step's backward and never freed (the autograd thread's cuBLAS workspace) is told
    apart from the gradients (freed by the next step's zero_grad); the last step's gradients are not judged."""
    events = [("a", 1, 32 * MiB), ("a", 2, 4096), ("a", 3, 4096), ("f", 2), ("f", 3), ("a", 4, 4096)]
    grads = {0: [(0, 32 * MiB), (1, 4096), (2, 4096)], 1: [(5, 4096)]}
    assert backward_workspaces(events, grads) == {0}
    assert backward_workspaces(events, {0: grads[0]}) == set()


def _record():
    path = Path(__file__).resolve().parents[1] / "benchmarks/results/h100-2026-12-07c-fake-pg-zero.jsonl"
    return next(r for r in map(json.loads, path.read_text().splitlines()) if r.get("name") == RUN)


def test_zero3_lora_ckpt_run_allocated_within_one_percent():
    """The run: 4,493,528,064 B allocated (4,285.4 MiB); HEAD 6795a28's model 4,254,656,000 (-5.32%: every recompute
    gather placed after the bottom layer's activations were freed); now within 1% (the rest: the backward
    thread's 32 MiB cuBLAS workspace the replay drops with the gradients, and reentrant checkpointing's held
    layer output).  Reserved unchanged (+1.25%)."""
    from benchmarks.distributed.report import fake_predicted, ran_as

    rec = _record()
    p = fake_predicted(rec["case"], ran_as(rec), True)
    assert p["peak_allocated_bytes"] == pytest.approx(rec["peak_allocated_bytes"], rel=0.01)
    assert p["peak_reserved_bytes"] == pytest.approx(rec["peak_reserved_bytes"], rel=0.02)
