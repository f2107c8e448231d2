"""The levers in the allocation replay (vramfit.memory.levers, issue 20): liger-kernel's fused linear
cross-entropy and layer kernels, trl's padding-free packing, trl's activation offloading, on a tiny
Llama whose vocabulary makes the logits the largest tensors."""

import importlib.util
import json

import pytest

from conftest import TINY_LLAMA

VOCAB = 8192
B, S = 2, 256
T = B * S

needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                 reason="liger-kernel not installed (pip install --no-deps liger-kernel==0.8.5)")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    from vramfit.model.spec import load_spec

    cfg = tmp_path_factory.mktemp("levers") / "config.json"
    cfg.write_text(json.dumps({**TINY_LLAMA, "vocab_size": VOCAB}))
    return load_spec(str(cfg))


def _setup(**kw):
    from vramfit.memory.setup import make_setup

    kw = {"method": "lora", "seq_len": S, "micro_batch": B, **kw}
    return make_setup(**kw)


def _events(spec, setup, after=False):
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import resolve_targets

    return training_events(spec, setup, resolve_targets(spec, setup), steps=2, after=after)


def _phase_peaks(res) -> dict:
    from vramfit.memory.replay import replay_phases, run_phases

    return {k: v[0] for k, v in run_phases(replay_phases([(res["events"], res["marks"])])).items()}


def _allocated_at(res, mark: str) -> int:
    """Bytes allocated just before `mark` (its events replayed up to there)."""
    size, live = {}, 0
    for ev in res["events"][:res["marks"][mark]]:
        if ev[0] == "a":
            size[ev[1]] = ev[2]
            live += ev[2]
        elif ev[0] == "f":
            live -= size.pop(ev[1])
    return live


def _sizes(res, start: str, stop: str) -> list:
    """The sizes allocated between two marks, cuBLAS's workspaces left out."""
    from vramfit.memory.kernels import CUBLAS_WORKSPACE

    a, b = res["marks"][start], res["marks"][stop]
    return [ev[2] for ev in res["events"][a:b] if ev[0] == "a" and ev[2] != CUBLAS_WORKSPACE]


# --------------------------------------------------------------------------- no lever: nothing changes


def test_levers_off_leave_the_key_and_the_stream_as_they_were(spec):
    from vramfit.memory.template_cache import template_key

    plain = _setup()
    off = _setup(liger=False, packing=False, activation_offloading=False)
    assert plain == off
    assert template_key(spec, plain) == template_key(spec, off)
    assert _events(spec, plain, after=True) == _events(spec, off, after=True)
    for lever in ("liger", "packing", "activation_offloading"):  # a lever never reuses a lever-free template
        assert template_key(spec, _setup(**{lever: True})) != template_key(spec, plain)
    # packing's example length is part of its key
    assert (template_key(spec, _setup(packing=True, extras={"example_len": 64}))
            != template_key(spec, _setup(packing=True)))


# --------------------------------------------------------------------------- liger


@needs_liger
def test_liger_has_no_logits_and_leaves_later_replays_alone(spec):
    plain = _setup()
    before = _events(spec, plain)
    liger = _events(spec, _setup(liger=True))
    after = _events(spec, plain)
    assert after == before  # liger's module-level patches of transformers were undone

    logits = T * VOCAB * 2  # bf16 logits; the logits path also makes fp32 copies and log-probs
    assert max(_sizes(before, "step0.forward", "step0.clip")) >= logits
    # liger's forward: chunks of at most 2 ** k tokens x vocabulary, never the whole logits
    assert max(_sizes(liger, "step0.forward", "step0.clip")) < logits
    p0, p1 = _phase_peaks(before), _phase_peaks(liger)
    step0, step1 = max(p0["forward"], p0["backward"]), max(p1["forward"], p1["backward"])
    # the logits path holds the fp32 log-probs (T x V x 4) and more through the loss; liger about none of it
    assert step0 - step1 >= T * VOCAB * 4
    # the fused linear cross-entropy computes the hidden states' gradient in the forward and keeps it
    hidden = T * TINY_LLAMA["hidden_size"] * 2
    assert hidden in _sizes(liger, "step0.forward", "step0.backward")


@needs_liger
def test_liger_under_trls_fused_head_keeps_the_head(spec):
    """SFTTrainer turns liger's fused linear cross-entropy off: trl's head still scores the tokens."""
    fused = _events(spec, _setup(loss="fused"))
    both = _events(spec, _setup(loss="fused", liger=True))
    assert both != fused  # the layer kernels changed what the layers allocate
    # trl's tile: the scored (shifted) tokens x its full chunk width, bf16
    tile = min(B * (S - 1), 4096) * 32768 * 2
    assert tile in _sizes(both, "step0.forward", "step0.backward")


# --------------------------------------------------------------------------- packing


def test_packing_records_the_packed_mask(spec):
    plain = _events(spec, _setup())
    packed = _events(spec, _setup(packing=True))
    layers = TINY_LLAMA["num_hidden_layers"]
    fwd = _sizes(packed, "step0.forward", "step0.backward")
    # the block-diagonal (1, 1, T, T) bool mask (a flattened micro-batch of B x S tokens), and per layer
    # its additive bf16 copy the memory-efficient kernel keeps for the backward
    assert fwd.count(T * T) >= 1
    assert fwd.count(T * T * 2) == layers
    assert T * T * 2 not in _sizes(plain, "step0.forward", "step0.backward")
    # the copies are held to the backward: the packed forward ends higher by about them
    grown = _allocated_at(packed, "step0.backward") - _allocated_at(plain, "step0.backward")
    assert grown >= layers * T * T * 2


def test_packing_of_one_example_has_no_mask(spec):
    from collections import Counter

    one = _events(spec, _setup(packing=True, micro_batch=1, extras={"example_len": 4096}))
    plain = _events(spec, _setup(micro_batch=1))
    more = Counter(_sizes(one, "step0.forward", "step0.backward")) - Counter(_sizes(plain, "step0.forward",
                                                                                      "step0.backward"))
    # only the collator's small tensors (position_ids, cu_seq_lens, seq_idx): flash attention, no mask
    assert more and max(more) <= (S + 1) * 8  # (the largest: find_packed_sequence_indices' diff with its prepend)


# --------------------------------------------------------------------------- activation offloading


def test_offloading_moves_saved_bytes_to_the_host(spec):
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.replay import simulated_breakdown

    # trl's fused head: the last saved tensors (the forward stash trl keeps on the GPU) are small
    plain = _events(spec, _setup(loss="fused"))
    off = _events(spec, _setup(loss="fused", activation_offloading=True))
    assert _events(spec, _setup(loss="fused", activation_offloading=True)) == off  # deterministic
    host = off["host"]
    assert host["pinned_bytes"] >= host["peak_live_bytes"] > 0
    # what the forward leaves on the GPU for the backward shrinks by most of what went to the host
    saved_plain = _allocated_at(plain, "step0.backward")
    saved_off = _allocated_at(off, "step0.backward")
    assert saved_plain - saved_off >= 0.5 * host["peak_live_bytes"]
    # the logits path: its log-probs, the last saved tensor, stay in trl's forward stash on the GPU
    logits_off = _events(spec, _setup(activation_offloading=True))
    assert _allocated_at(logits_off, "step0.backward") > T * VOCAB * 4
    # each training step enters trl's context: an empty_cache first (bitsandbytes is imported)
    assert ("e",) in off["events"][off["marks"]["step0.forward"]:off["marks"]["step0.backward"]]
    # the estimate carries the host figure
    setup = _setup(activation_offloading=True)
    bd, targets = estimate_setup(spec, setup)
    assert bd.host_bytes > 0  # the analytic bound's rough figure
    replayed = simulated_breakdown(spec, setup, targets, bd, DEFAULT)
    assert replayed.host_bytes == logits_off["host"]["pinned_bytes"]
    assert "activation offloading" in " ".join(replayed.notes)


def test_offloading_has_no_template(spec):
    from vramfit.memory.template_cache import setup_template
    from vramfit.memory.setup import resolve_targets

    setup = _setup(activation_offloading=True)
    got = setup_template(spec, setup, resolve_targets(spec, setup))
    assert got["template"] is None and "offloading" in got["note"]


# --------------------------------------------------------------------------- the analytic bound


def test_walk_bound_moves_with_the_levers(spec):
    from vramfit.memory.estimate import estimate_setup

    def bd(**kw):
        return estimate_setup(spec, _setup(**kw))[0]

    plain = bd()
    assert bd(liger=True).peak_allocated_bytes < plain.peak_allocated_bytes - T * VOCAB * 4
    assert bd(packing=True).peak_allocated_bytes >= plain.peak_allocated_bytes + TINY_LLAMA["num_hidden_layers"] * T * T * 2
    off = bd(activation_offloading=True)
    assert off.host_bytes > 0 and plain.host_bytes == 0


def test_offloading_recording_is_the_same_in_every_process(tmp_path):
    """trl keys storages by address: the replay's keys must not depend on where this process's heap put
    things (QLoRA casts each 4-bit layer's bias at the first forward: its old storage dies after
    trl's context noted the parameters)."""
    import subprocess
    import sys

    cfg = tmp_path / "config.json"
    # Qwen2.5-0.5B's widths (biased q/k/v), two layers
    cfg.write_text(json.dumps({**TINY_LLAMA, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                               "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                               "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 151936,
                               "tie_word_embeddings": True}))
    code = (
        "import hashlib, warnings; warnings.simplefilter('ignore')\n"
        "from vramfit.model.spec import load_spec\n"
        "from vramfit.memory.setup import make_setup, resolve_targets\n"
        "from vramfit.memory.events import training_events\n"
        f"spec = load_spec({str(cfg)!r})\n"
        "s = make_setup(method='qlora', seq_len=256, micro_batch=4, grad_ckpt=True, activation_offloading=True,"
        " target_modules='all-linear', optim='paged_adamw_8bit')\n"
        "ev = training_events(spec, s, resolve_targets(spec, s), steps=2)\n"
        "print(hashlib.sha256(repr((ev['events'], ev['host'])).encode()).hexdigest())\n")
    runs = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
            for _ in range(4)}
    assert len(runs) == 1
