"""FSDP2 LoRA as the 2026-12-07g memory histories show it (benchmarks/results/h100-2026-12-07g-fake-pg-history-lora,
issue 21): trl's fused loss gathers an untied LM head's weight whole on the default stream (no FSDP all-gather of
the tail), the first layer's copy-out runs beside the flat output of the unit gathered before it, and the untied
embedding re-gathered at the end of a checkpointed LoRA backward holds its copy-out beside its own flat output.
Shapes from the bundled profiles; no network, no torch model."""

import pytest

from vramfit.memory.distributed import get_strategy, shard_terms
from vramfit.memory.fsdp import units
from vramfit.model.spec import load_spec
from vramfit.memory.setup import make_setup, resolve_targets

MiB = 1 << 20


@pytest.fixture(scope="module")
def llama8b8():
    return load_spec("llama-3.1-8b", overrides={"num_hidden_layers": 8})


def _terms(spec, strategy="fsdp-full", n=4, **kw):
    s = make_setup(**{"method": "lora", "precision": "bf16-amp", "seq_len": 1024, "micro_batch": 2,
                      "grad_ckpt": True, "loss": "fused", **kw})
    return shard_terms(spec, s, resolve_targets(spec, s), get_strategy(strategy), n)


def _gathered(t, moment):
    return t.held.get(moment, {}).get("fsdp_gathered_params", 0)


def test_trl_fused_loss_gathers_the_untied_head_whole_beside_the_top_layers_flat_output(llama8b8):
    """History: at the loss 1002 MiB from DTensor's gather (torch/_library/autograd.py) beside the top layer's
    416 MiB flat output, nothing of the head in the backward, and no 1002 MiB tail block on the all-gather stream
    (its pool 1422 MiB: the embedding's flat output and a layer's)."""
    fused, logits = _terms(llama8b8), _terms(llama8b8, loss="logits")
    head = units(llama8b8)["tail"] * 2
    layer = _gathered(fused, "forward_layer") / 2
    assert _gathered(fused, "forward_loss") == pytest.approx(head + layer, rel=0.01)
    assert _gathered(logits, "forward_loss") == pytest.approx(2 * head, rel=0.01)  # the tail's FSDP all-gather
    assert _gathered(fused, "backward_loss") == 0 < _gathered(logits, "backward_loss")
    assert fused.pools["fsdp_all_gather_stream"][0] == pytest.approx(1422 * MiB, rel=0.01)
    assert logits.pools["fsdp_all_gather_stream"][0] > fused.pools["fsdp_all_gather_stream"][0] + 900 * MiB


def test_the_untied_embedding_regathered_last_holds_its_copy_out_beside_its_flat_output(llama8b8):
    """History: the step's peak, 3,440 MiB, is the embedding's copy-out (1002 MiB) beside its flat output
    (1002 MiB) after the bottom layer's backward -- with checkpointed LoRA the embedding's output needs a
    gradient (enable_input_require_grads), so FSDP2 re-gathers it."""
    t = _terms(llama8b8)
    emb = units(llama8b8)["embedding"] * 2
    assert _gathered(t, "backward_end") == pytest.approx(2 * emb, rel=0.01)
    assert _gathered(_terms(llama8b8, grad_ckpt=False), "backward_end") == 0  # not re-gathered
    assert _gathered(_terms(llama8b8, strategy="fsdp-grad-op"), "backward_end") == pytest.approx(emb, rel=0.01)


def test_the_first_layers_copy_out_runs_beside_the_previous_units_flat_output():
    """History (llama-3.2-1b, tied, N = 4): the peak, 1,901 MiB, at the step's first layer: the tail's flat
    output (501 MiB) still held beside its copy-out (501) and the layer's flat output and copy-out (116 each)."""
    spec = load_spec("llama-3.2-1b")
    t = _terms(spec)
    tail = units(spec)["tail"] * 2
    layer = (_gathered(t, "forward_layer") - tail) / 2  # the tied tail is held all step
    assert layer == pytest.approx(116.2 * MiB, rel=0.01)
    assert _gathered(t, "forward_first") == pytest.approx(2 * tail + 2 * layer, rel=0.01)
    assert t.pools["fsdp_all_gather_stream"][1]["forward_first"] == pytest.approx(tail + layer, rel=0.01)
    assert "forward_first" not in _terms(spec, strategy="fsdp-grad-op").held or \
        not _gathered(_terms(spec, strategy="fsdp-grad-op"), "forward_first")


def test_the_untied_tails_copy_out_under_the_logits_loss_is_replayed():
    """The untied tail [final norm, LM head] under the logits loss is gathered through its FSDP hooks from the final
    norm's forward to its post-backward: the gap replay places its copy-out there (fsdp._tail_copy_out) -- one
    1,002 MiB block beside the step's largest activations: llama-3.1-8b[8] LoRA fsdp-full N = 8 without
    checkpointing, reserved -3.5% (07i) -> within 1%.  Under the fused loss (trl's DTensor gather) nothing is added."""
    import json
    from pathlib import Path

    from benchmarks.distributed.report import fake_predicted, ran_as
    from vramfit.memory.fsdp import copy_out_events
    from vramfit.memory.zero import _Ids

    path = Path(__file__).resolve().parents[1] / "benchmarks/results/h100-2026-12-07-fake-pg.jsonl"
    name = "llama-3.1-8b[num_hidden_layers=8]-lora-bf16-true-fsdp-full-n8r0-nockpt-logits-s1024b2"
    rec = next(r for r in map(json.loads, path.read_text().splitlines()) if r.get("name") == name)
    p = fake_predicted(rec["case"], ran_as(rec), True)
    assert p["peak_reserved_bytes"] == pytest.approx(rec["peak_reserved_bytes"], rel=0.01)
    # the placement: at the logits' allocation, freed after the second hidden-size gradient of the backward
    spec = load_spec("llama-3.1-8b", overrides={"num_hidden_layers": 8})
    s = make_setup(method="lora", precision="bf16-true", seq_len=1024, micro_batch=2, loss="logits")
    tok, logits, hid = 2048, 2048 * 128256 * 2, 2048 * 4096 * 2
    events = [("a", 1, 10), ("a", 2, logits), ("a", 3, hid), ("a", 4, 5), ("a", 5, hid), ("a", 6, hid), ("f", 1)]
    marks = {"step0.forward": 0, "step0.backward": 3, "step0.clip": 7}
    out = copy_out_events(spec, get_strategy("fsdp-full"), 2, marks, _Ids(), False, events, s)
    assert sum(ev[2] for ev in out[1]) == (128256 * 4096 + 4096) * 2 and len(out[6]) == 2 and tok
    fused = copy_out_events(spec, get_strategy("fsdp-full"), 2, marks, _Ids(), True, events, s)
    assert not any(isinstance(k, int) for k in fused)
