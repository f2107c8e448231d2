"""QLoRA's loading recipes: with peft's prepare_model_for_kbit_training (the standard one: the
non-quantized weights cast to fp32) or without it (trl's SFTTrainer and Unsloth: left as loaded),
and trl's cast of a quantized model's adapters to bf16 under SFTTrainer (loss "fused")."""

from __future__ import annotations

import pytest

from vramfit.api import estimate
from vramfit.errors import VramfitError
from vramfit.memory.constants import DEFAULT
from vramfit.memory.setup import make_setup, resolve_targets
from vramfit.memory.walk import _lora_total, _quant_totals
from vramfit.model.spec import load_spec

MODEL = "llama-3.2-1b"


def _qlora(**kw):
    return estimate(MODEL, method="qlora", grad_ckpt=True, replay=False, use_calibration=False, **kw)


def test_fast_model_weights_and_adapters():
    spec = load_spec(MODEL)
    q_numel = _quant_totals(spec, DEFAULT, True)[0]
    prep, bare = _qlora(), _qlora(kbit_prep=False)
    unq = spec.params_total - q_numel
    assert prep.breakdown["weights_fp32_unquantized"] == 4 * unq
    assert bare.breakdown["weights_16bit_unquantized"] == 2 * unq
    assert bare.peak_allocated_bytes < prep.peak_allocated_bytes
    # trl's SFTTrainer keeps a quantized model's adapters (and so their gradients and states) in bf16
    logits, fused = _qlora(loss="logits"), _qlora(loss="fused")
    adapters = _lora_total(spec, resolve_targets(spec, make_setup(method="qlora")), 16)
    assert logits.breakdown["lora_adapters"] == 4 * adapters
    assert fused.breakdown["lora_adapters"] == 2 * adapters
    lora = estimate(MODEL, method="lora", loss="fused", replay=False, use_calibration=False)
    assert lora.setup.adapter_dtype == "float32"  # peft's fp32 adapters over a bf16 base, trl keeps them


def test_no_kbit_prep_is_qlora_only():
    with pytest.raises(VramfitError, match="only applies to --method qlora"):
        make_setup(method="lora", kbit_prep=False)


def _live_after_load(setup):
    from vramfit.memory.events import training_events
    from vramfit.memory.template_record import shrunk_spec

    spec = shrunk_spec(load_spec(MODEL), 2)
    res = training_events(spec, setup, resolve_targets(spec, setup), steps=1)
    live = {}
    for ev in res["events"][:res["marks"]["after_load"]]:
        if ev[0] == "a":
            live[ev[1]] = ev[2]
        elif ev[0] == "f":
            live.pop(ev[1], None)
    return spec, sum(live.values())


def test_replay_loads_as_the_recipe_does():
    """The replay's load: prepare_model_for_kbit_training's fp32 copies of the non-quantized weights, and
    trl's bf16 adapters, each exactly what the recipe leaves allocated."""
    base = dict(method="qlora", grad_ckpt=True, seq_len=64)
    spec, prep = _live_after_load(make_setup(**base))
    _, bare = _live_after_load(make_setup(**base, kbit_prep=False))
    _, fused = _live_after_load(make_setup(**base, loss="fused"))
    unq = spec.params_total - _quant_totals(spec, DEFAULT, True)[0]
    assert prep - bare == 2 * unq  # fp32 against bf16
    adapters = _lora_total(spec, resolve_targets(spec, make_setup(**base)), 16)
    assert prep - fused == 2 * adapters  # fp32 adapters against trl's bf16 ones


def test_template_keys_tell_the_adapter_dtype_and_the_prep_apart():
    """Each loading recipe's stream differs: each has a template of its own; the standard one's key is as before."""
    from vramfit.memory.template_cache import template_key

    spec = load_spec(MODEL)
    base = make_setup(method="qlora", grad_ckpt=True, loss="fused")
    keys = {template_key(spec, s) for s in (base, base.with_(kbit_prep=False), base.with_(trl_adapter_cast=False))}
    assert len(keys) == 3
    lora = make_setup(method="lora", loss="fused")
    assert template_key(spec, lora) == template_key(spec, lora.with_(trl_adapter_cast=False))
