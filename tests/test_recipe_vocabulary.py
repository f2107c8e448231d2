"""Precision in transformers' own words (issue 19): `--dtype` (what from_pretrained loads) and
`--amp` (TrainingArguments bf16= / fp16=), `--precision` as the shorthand for the pair; the pair
the standard guides run, bfloat16 weights under bf16 autocast (bf16-amp), modelled and planned;
`vramfit plan` plans for the loss `vramfit train` computes."""

import json

import pytest
from typer.testing import CliRunner

from conftest import TINY_LLAMA
from vramfit.cli import app
from vramfit.errors import VramfitError
from vramfit.memory.setup import PRECISIONS, make_setup, precision_of

runner = CliRunner()


@pytest.fixture
def tiny_config(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(TINY_LLAMA))
    return str(p)


def test_every_precision_name_is_shorthand_for_its_dtype_amp_pair():
    for name, (dtype, autocast) in PRECISIONS.items():
        s = make_setup(method="lora", precision=name)
        assert (s.dtype, s.autocast_dtype) == (dtype, autocast)
        assert precision_of(s.dtype, s.amp) == name
    assert make_setup(dtype="bfloat16", amp="bf16").precision == "bf16-amp"
    assert make_setup(dtype="float32", amp="bf16").precision == "bf16-mixed"
    assert make_setup(dtype="bf16", amp="none").precision == "bf16-true"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(dtype="bfloat16", amp="fp16"), "not a recipe"),
    (dict(dtype="float8", amp="bf16"), "dtype"),
    (dict(precision="bf16-true", amp="bf16"), "give one or the other"),
    (dict(method="full", precision="16-amp"), "GradScaler"),
])
def test_pairs_that_do_not_train_are_refused_with_a_reason(kwargs, needle):
    with pytest.raises(VramfitError, match=needle):
        make_setup(**{"method": "lora", **kwargs})


def test_estimate_json_inputs_show_dtype_and_amp(tiny_config):
    r = runner.invoke(app, ["estimate", tiny_config, "--dtype", "bfloat16", "--amp", "bf16", "--seq-len", "64",
                            "--json"])
    assert r.exit_code == 0, r.output
    inputs = json.loads(r.stdout)["inputs"]
    assert (inputs["precision"], inputs["dtype"], inputs["amp"]) == ("bf16-amp", "bfloat16", "bf16")
    r = runner.invoke(app, ["estimate", tiny_config, "--precision", "bf16-mixed", "--seq-len", "64", "--json"])
    inputs = json.loads(r.stdout)["inputs"]
    assert (inputs["dtype"], inputs["amp"]) == ("float32", "bf16")
    r = runner.invoke(app, ["estimate", tiny_config, "--precision", "bf16-true", "--amp", "bf16"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_bf16_weights_under_autocast_hold_bf16_weights_and_fp32_adapters(tiny_config):
    from vramfit.api import estimate

    amp = estimate(tiny_config, method="lora", precision="bf16-amp", seq_len=64, micro_batch=2)
    mixed = estimate(tiny_config, method="lora", precision="bf16-mixed", seq_len=64, micro_batch=2)
    true = estimate(tiny_config, method="lora", precision="bf16-true", seq_len=64, micro_batch=2)
    assert amp.breakdown["weights_bfloat16"] == true.breakdown["weights_bfloat16"]
    assert "weights_float32" in mixed.breakdown and "weights_float32" not in amp.breakdown
    assert amp.breakdown["lora_adapters"] == true.breakdown["lora_adapters"] == mixed.breakdown["lora_adapters"]


def test_the_planner_searches_the_guides_recipe_and_prints_what_it_modelled(tiny_config):
    import vramfit

    p = vramfit.plan(tiny_config, gpu="2GB", seq_len=64, effective_batch=4, method="lora", precision="bf16-amp")
    s = p.chosen.setup
    assert s.precision == "bf16-amp" and s.loss == "fused"  # the loss vramfit train computes
    data = p.to_json()
    assert data["training_arguments"]["bf16"] is True and data["training_arguments"]["fp16"] is False
    assert data["model_kwargs"]["dtype"] == "bfloat16"
    assert data["chosen"]["dtype"] == "bfloat16" and data["chosen"]["amp"] == "bf16"
    searched = vramfit.plan(tiny_config, gpu="2GB", seq_len=64, effective_batch=4)
    assert {c["precision"] for c in searched.to_json()["candidates"]} >= {"bf16-amp"}


def test_plan_says_which_loss_it_planned_for_in_its_first_line(tiny_config):
    r = runner.invoke(app, ["plan", tiny_config, "--gpu", "2GB", "--seq-len", "64", "--effective-batch", "4"])
    assert r.exit_code == 0, r.output
    assert "trl's fused loss" in r.stdout.splitlines()[0] or "fused loss" in " ".join(r.stdout.splitlines()[:3])
    r = runner.invoke(app, ["plan", tiny_config, "--gpu", "2GB", "--seq-len", "64", "--effective-batch", "4",
                            "--loss", "logits"])
    assert "full-logits loss" in " ".join(r.stdout.splitlines()[:3])


def test_the_replay_runs_trls_fused_head_under_autocast_in_the_autocast_dtype():
    """Under bf16 autocast over fp32 weights the fused head's tiles are bf16 (its compute dtype
    follows CUDA autocast), not the fp32 of its inputs."""
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import resolve_targets
    from vramfit.model.spec import spec_from_config

    spec = spec_from_config("tiny", dict(TINY_LLAMA))
    rows, vocab_chunk = 2 * 63, 32768  # the shifted labels: 63 scored positions a row

    def sizes(precision):
        s = make_setup(method="lora", precision=precision, seq_len=64, micro_batch=2, loss="fused")
        ev = training_events(spec, s, resolve_targets(spec, s), steps=1)
        return {e[2] for e in ev["events"] if e[0] == "a"}

    assert rows * vocab_chunk * 2 in sizes("bf16-mixed") and rows * vocab_chunk * 4 not in sizes("bf16-mixed")
    assert rows * vocab_chunk * 4 in sizes("32-true")
