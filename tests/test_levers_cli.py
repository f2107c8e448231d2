"""The memory levers (issue 20) as setup axes: --liger, --packing, --activation-offloading and
--tokens-per-batch on estimate / plan, the API's keywords, the bad combinations, the planner's search
and lever lines, and the speed factors derived from measured twins."""

import json
import re
from dataclasses import replace

import pytest
from typer.testing import CliRunner

import vramfit
from vramfit import VramfitError
from vramfit.cli import app
from vramfit.memory.setup import make_setup
from vramfit.planner import levers as L

runner = CliRunner()


def _json(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# --------------------------------------------------------------------------- estimate


def test_estimate_json_inputs_show_the_levers_and_tokens_per_batch_is_packed_rows():
    d = _json(["estimate", "llama-3.2-1b", "--method", "lora", "--seq-len", "1024", "--liger", "--packing",
               "--activation-offloading", "--tokens-per-batch", "4096", "--json"])
    i = d["inputs"]
    assert (i["liger"], i["packing"], i["activation_offloading"]) == (True, True, True)
    assert (i["seq_len"], i["micro_batch"], i["padded"]) == (1024, 4, False)
    off = _json(["estimate", "llama-3.2-1b", "--method", "lora", "--seq-len", "1024", "--json"])["inputs"]
    assert (off["liger"], off["packing"], off["activation_offloading"]) == (False, False, False)


def test_api_estimate_takes_the_setup_field_names():
    est = vramfit.estimate("llama-3.2-1b", method="lora", seq_len=512, packing=True, tokens_per_batch=2048,
                           liger=True, activation_offloading=True)
    s = est.setup
    assert (s.liger, s.packing, s.activation_offloading, s.micro_batch, s.tokens) == (True, True, True, 4, 2048)
    with pytest.raises(VramfitError, match="not a multiple of --seq-len 512"):
        vramfit.estimate("llama-3.2-1b", seq_len=512, packing=True, tokens_per_batch=1000)


@pytest.mark.parametrize("args, needle", [
    (["estimate", "gpt2", "--liger"], "model type 'gpt2'"),
    (["estimate", "pythia-160m", "--liger"], "gpt_neox"),
    (["estimate", "gpt2", "--tokens-per-batch", "2048", "--seq-len", "1024"], "add --packing"),
    (["estimate", "gpt2", "--packing", "--tokens-per-batch", "3000", "--seq-len", "1024"], "try 2,048 or 3,072"),
    (["estimate", "gpt2", "--packing", "--tokens-per-batch", "2048", "--seq-len", "1024", "--batch-size", "4"],
     "micro-batch 2"),
    (["estimate", "gpt2", "--packing", "--padded"], "never padded"),
    (["estimate", "llama-3.2-1b", "--packing", "--gpus", "2"], "several GPUs"),
    (["plan", "gpt2", "--gpu", "24GiB", "--liger"], "model type 'gpt2'"),
    (["plan", "llama-3.2-1b", "--gpu", "24GiB", "--tokens-per-batch", "4096"], "add --packing"),
    (["plan", "llama-3.2-1b", "--gpu", "24GiB", "--packing", "--tokens-per-batch", "3072", "--seq-len", "2048"],
     "not a multiple"),
    (["plan", "llama-3.2-1b", "--gpu", "24GiB", "--rows-median", "0"], "--rows-median"),
    (["plan", "llama-3.2-1b", "--gpus", "2x24GB", "--liger"], "several GPUs"),
])
def test_bad_lever_combinations_are_one_line_and_exit_code_2(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_the_static_liger_list_is_liger_kernels_own():
    """Checked against liger-kernel's MODEL_TYPE_TO_APPLY_LIGER_FN where its source is at hand."""
    import ast
    from pathlib import Path

    src = Path("/tmp/ligerdl/src/liger_kernel/transformers/monkey_patch.py")
    if not src.is_file():
        pytest.skip("liger-kernel's source is not unpacked here")
    tree = ast.parse(src.read_text())
    keys = next(set(ast.literal_eval(k) for k in node.value.keys) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MODEL_TYPE_TO_APPLY_LIGER_FN")
    assert keys == set(L.LIGER_MODEL_TYPES)


@pytest.mark.xfail(strict=False, reason="until the memory model models the levers (issue 20, vramfit/memory)")
@pytest.mark.parametrize("lever", ["liger", "activation_offloading"])
def test_a_lever_that_saves_activations_predicts_less_memory(lever):
    base = dict(method="lora", seq_len=2048, micro_batch=4, grad_ckpt=False, replay=False)
    off = vramfit.estimate("llama-3.2-1b", **base)
    on = vramfit.estimate("llama-3.2-1b", **base, **{lever: True})
    assert on.peak_allocated_bytes < off.peak_allocated_bytes


# --------------------------------------------------------------------------- plan


def test_the_default_plan_searches_no_lever_and_shows_each_as_a_lever_line():
    d = _json(["plan", "llama-3.2-1b", "--gpu", "24GiB", "--json"])
    assert d["searched"] == 1080  # the space without the levers: no new setups, no new templates
    for c in [d["chosen"], *d["candidates"]]:
        assert (c["liger"], c["packing"], c["activation_offloading"]) == (False, False, False)
    knobs = {l["knob"] for l in d["levers"]}
    assert {"liger", "packing", "activation_offloading"} <= knobs
    assert set(d["lever_speeds"]) == {"liger", "packing", "activation_offloading"}
    assert "packing" not in d["sft_config"] and d["sft_config"]["max_length"] == 2048
    r = runner.invoke(app, ["plan", "llama-3.2-1b", "--gpu", "24GiB"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "memory levers of the chosen setup" in text
    assert "with Liger's kernels (TrainingArguments(use_liger_kernel=True)):" in text
    speeds = L.lever_speeds()
    if not speeds["liger"].measured:
        assert "speed not measured" in text


def test_short_rows_make_packing_the_plans_default_with_the_sft_config_switches():
    d = _json(["plan", "llama-3.2-1b", "--gpu", "24GiB", "--rows-median", "300", "--json"])
    c = d["chosen"]
    assert c["packing"] and not c["padded"]
    assert d["sft_config"]["packing"] is True and d["sft_config"]["packing_strategy"] == "bfd"
    assert d["sft_config"]["padding_free"] is True and d["sft_config"]["max_length"] == 2048
    off = next(l for l in d["levers"] if l["knob"] == "packing")
    assert not off["packing"] and off["padded"]  # unpacked, short rows are padded batches
    r = runner.invoke(app, ["plan", "llama-3.2-1b", "--gpu", "24GiB", "--rows-median", "300"])
    text = " ".join(r.stdout.split())
    assert "SFTConfig (trl) also: max_length=2048, packing=True, packing_strategy='bfd', padding_free=True" in text
    assert "the rows' median (300 tokens) is under 50% of seq_len 2,048" in text and "without packing:" in text
    # long rows: packing is searched both ways, and --no-packing keeps it off
    both = _json(["plan", "llama-3.2-1b", "--gpu", "24GiB", "--rows-median", "1500", "--json"])
    assert both["searched"] == 2 * 1080
    assert not _json(["plan", "llama-3.2-1b", "--gpu", "24GiB", "--rows-median", "300", "--no-packing",
                      "--json"])["chosen"]["packing"]


def test_tokens_per_batch_fixes_the_packed_micro_batch_and_levers_can_be_fixed_on():
    d = _json(["plan", "llama-3.2-1b", "--gpu", "80GiB", "--packing", "--tokens-per-batch", "8192",
               "--liger", "--activation-offloading", "--json"])
    c = d["chosen"]
    assert (c["micro_batch"], c["grad_accum"], c["packing"], c["liger"], c["activation_offloading"]) == (
        4, 4, True, True, True)
    assert d["training_arguments"]["use_liger_kernel"] is True and d["sft_config"]["activation_offloading"] is True


def test_when_nothing_fits_without_a_lever_the_search_tries_it(monkeypatch, llama1b):
    """A memory model that finds Liger's kernels smaller (as it will): the budget only the lever meets."""
    import vramfit.memory.estimate as E
    from vramfit.planner.gpu import resolve_gpu
    from vramfit.planner.search import plan, search
    from vramfit.planner.space import make_space

    real = E.estimate_setup

    def fake(spec, s, constants=None):
        bd, targets = real(spec, s, constants)
        if s.liger:
            bd = replace(bd, device_bytes=bd.device_bytes // 2)
        return bd, targets

    monkeypatch.setattr(E, "estimate_setup", fake)
    big = resolve_gpu("80GiB")
    smallest = search(llama1b, big, make_space(llama1b, big), prefer="memory", details=False).chosen.device_bytes
    gpu = f"{smallest * 0.8 / 0.95 / (1 << 30):.2f}GiB"
    p = plan(llama1b, gpu, replay=False)
    assert p.chosen.setup.liger
    assert any(n.startswith("nothing fits without Liger's kernels") and "the search tried them" in n for n in p.notes)
    with pytest.raises(VramfitError, match="nothing fits"):
        plan(llama1b, gpu, replay=False, liger=False, kbit_prep=True)


# --------------------------------------------------------------------------- speed factors


def _row(case, tps, gpu="NVIDIA H100 80GB HBM3", **extra):
    return {"status": "ok", "case": case, "tokens_per_second": tps, "environment": {"gpu_name": gpu}, **extra}


BASE = {"kind": "train", "model": "llama-3.2-1b", "method": "lora", "seq_len": 1024, "micro_batch": 4}


def test_lever_ratios_come_from_twins_only():
    rows = [_row({**BASE, "liger": False}, 1000.0), _row({**BASE, "liger": True}, 1200.0),
            _row({**BASE, "seq_len": 2048}, 800.0), _row({**BASE, "seq_len": 2048, "liger": True}, 1000.0),
            _row({**BASE, "packing": True, "example_len": 256}, 900.0),
            _row({**BASE, "packing": True, "example_len": 256, "liger": True}, 1080.0),  # twin of both
            _row({**BASE, "activation_offloading": True}, 700.0, gpu="NVIDIA H200"),  # twin on another GPU
            _row({**BASE, "loss": "fused", "liger": True}, 5000.0),  # no twin
            {**_row({**BASE, "liger": True, "seq_len": 512}, 10.0), "status": "oom"}]
    got = L.derive_lever_speeds(rows, source="x.jsonl")
    assert set(got) == {"liger", "packing"}
    assert got["liger"]["cases"] == 3 and got["liger"]["ratio"] == pytest.approx(1.2)
    assert (got["liger"]["low"], got["liger"]["high"]) == (1.2, 1.25) and got["liger"]["by_loss"] == {
        "logits": pytest.approx(1.2)}
    assert got["packing"]["cases"] == 2 and got["packing"]["ratio"] == pytest.approx(0.9)
    assert got["packing"]["source"] == "x.jsonl"
    explicit = [_row(BASE, 1000.0, id="a"), _row({**BASE, "micro_batch": 8, "activation_offloading": True}, 500.0,
                                                 baseline_id="a")]
    assert L.derive_lever_speeds(explicit)["activation_offloading"]["ratio"] == pytest.approx(0.5)


def test_the_script_writes_the_table_the_cost_model_reads(tmp_path, monkeypatch, llama1b):
    from benchmarks.speed import lever_speed
    from vramfit.planner.cost import seconds_per_token
    from vramfit.planner.gpu import resolve_gpu

    results = tmp_path / "h100-levers.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in [
        _row(BASE, 1000.0), _row({**BASE, "liger": True}, 1300.0),
        _row({**BASE, "loss": "fused"}, 1000.0), _row({**BASE, "loss": "fused", "liger": True}, 1100.0)]) + "\n")
    out = tmp_path / "lever_speed.json"
    assert lever_speed.main([str(results), "--out", str(out)]) == 0
    table = L.load_lever_speeds(str(out))
    assert table["liger"].measured and table["liger"].ratio == pytest.approx(1.2)
    assert table["liger"].ratio_for("fused") == pytest.approx(1.1) and table["liger"].ratio_for("logits") == 1.3
    assert not table["packing"].measured and table["packing"].text() == "speed not measured"
    assert "1.20x tokens/s measured (2 twin runs" in table["liger"].text()

    only = tmp_path / "logits-only.json"
    results.write_text("\n".join(json.dumps(r) for r in [
        _row(BASE, 1000.0), _row({**BASE, "liger": True}, 1300.0),
        _row({**BASE, "packing": True, "example_len": 128}, 1100.0)]) + "\n")
    assert lever_speed.main([str(results), "--out", str(only)]) == 0
    logits = L.load_lever_speeds(str(only))
    # liger's kernels differ by loss: measured under the model's own loss only, trl's fused loss counts 1.0
    assert logits["liger"].ratio_for("logits") == 1.3 and logits["liger"].ratio_for("fused") == 1.0
    assert "speed not measured under trl's fused loss (1.30x under the model's own loss" in logits["liger"].text("fused")
    assert logits["packing"].ratio_for("fused") == pytest.approx(1.1)  # packing's does not depend on it

    monkeypatch.setattr(L, "lever_speeds", lambda: table)
    s = make_setup(method="lora", seq_len=1024, micro_batch=4, loss="fused")
    h100 = resolve_gpu("h100")
    t0 = seconds_per_token(llama1b, s, h100)
    assert seconds_per_token(llama1b, s.with_(liger=True), h100) == pytest.approx(t0 / 1.1)
    # packing's cost is modelled, not its measured factor: the flattened row's masked attention square
    assert seconds_per_token(llama1b, s.with_(packing=True), h100) > t0


def test_without_a_results_file_no_lever_has_a_speed_gain(tmp_path):
    table = L.load_lever_speeds(str(tmp_path / "missing.json"))
    assert all(not v.measured and v.ratio == 1.0 for v in table.values())
    assert L.speed_factor(make_setup(liger=True, packing=True)) == pytest.approx(
        L.lever_speeds()["liger"].ratio_for("logits"))  # packing: modelled in the cost model, no factor


def test_packed_attention_costs_the_flattened_square_under_sdpa(llama1b):
    """Under SDPA a packed micro-batch attends over its whole flattened row (the masked square), so
    each token's attention FLOPs grow with the micro-batch; flash attention's varlen path attends per
    example, and an unpacked row causally over itself."""
    from vramfit.planner.cost import train_flops_per_token

    packed = make_setup(method="lora", seq_len=2048, micro_batch=2, grad_accum=8, packing=True, loss="fused",
                        extras={"example_len": 150})
    from vramfit.memory.setup import resolve_targets

    targets = resolve_targets(llama1b, packed)

    def flops(s):
        return train_flops_per_token(llama1b, s, targets)[0]

    assert flops(packed.with_(micro_batch=4, grad_accum=4)) > flops(packed)
    assert flops(packed.with_(attn="flash_attention_2")) < flops(packed.with_(packing=False)) < flops(packed)
