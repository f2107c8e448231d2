"""Issue 20's levers in the accuracy harness (benchmarks/accuracy), on the CPU where they can run:
liger-kernel (TrainingArguments only: its triton kernels need CUDA), trl's padding-free BFD
packing (trl's own pack_dataset and collator, in a child as on the GPU), trl's activation offloading
(its context needs an accelerator: on the CPU the Trainer's wiring is checked with a stand-in)."""

from __future__ import annotations

import contextlib
import importlib.util
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("peft") is None:  # not imported here: it would initialise CUDA
    pytest.skip("needs peft", allow_module_level=True)

from benchmarks.accuracy import cases, grids, harness, train_case  # noqa: E402
from conftest import harness_profiles  # noqa: E402
from test_harness import tiny_case as harness_tiny_case  # noqa: E402

CUDA = torch.cuda.is_available()
LEVERS = ("liger", "packing", "activation_offloading")


@pytest.fixture(autouse=True)
def spawned_children(monkeypatch):
    monkeypatch.setenv("VRAMFIT_HARNESS_START_METHOD", "spawn")  # see test_harness.py


@pytest.fixture
def tiny_profiles(tmp_path, monkeypatch):
    return harness_profiles(tmp_path, monkeypatch)


def tiny_case(**kwargs) -> dict:
    return harness_tiny_case(**{"seq_len": 64, "micro_batch": 3, **kwargs})


def test_lever_keys_are_absent_when_off_so_old_ids_stay():
    # committed ids: benchmarks/results/h100-2026-12-06-full-part3.jsonl, h100-2026-12-07-recipes.jsonl
    old = cases.training_case("llama-3.2-1b", "full", "bf16-mixed", "adamw_torch", seq_len=1024,
                              micro_batch=4)
    assert cases.case_id(old) == "6eab0e16efcc"
    fused = cases.training_case("llama-3.2-1b", "lora", "bf16-amp", "adamw_torch", seq_len=1024,
                                micro_batch=4, grad_ckpt=True, lora_r=16, target_modules="all-linear",
                                loss="fused")
    assert cases.case_id(fused) == "1a7bcf59010b"
    assert not set(LEVERS) & set(old) and "example_len" not in old
    on = tiny_case(liger=True, packing=True, activation_offloading=True)
    assert on["liger"] is on["packing"] is on["activation_offloading"] is True
    assert on["example_len"] == cases.DEFAULT_EXAMPLE_LEN == 256
    assert cases.case_label(on).endswith("/liger/packed256/offload")
    with pytest.raises(ValueError):
        tiny_case(example_len=64)  # a packing key without packing


def test_packed_example_lengths_fill_every_row_exactly_and_are_reproducible():
    case = tiny_case(seq_len=1024, micro_batch=8, steps=4, packing=True)
    rows = cases.packed_example_lengths(case)
    assert rows == cases.packed_example_lengths(dict(case))  # seeded by name: same every time
    assert len(rows) == 4 * 8
    assert all(sum(r) == 1024 and r == sorted(r, reverse=True) and min(r) >= 1 for r in rows)
    whole = [n for r in rows for n in r[:-1]]  # rough check of the distribution's mean
    assert 150 < sum(whole) / len(whole) < 400
    assert rows != cases.packed_example_lengths(dict(case, example_len=128))
    positions = cases.packed_position_ids(case, step=1)
    assert len(positions) == 8 * 1024 and positions.count(0) == sum(len(r) for r in rows[8:16])


def test_packing_trains_on_trl_packed_rows_flattened_into_one_row(tiny_profiles, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    case = tiny_case(packing=True, example_len=16)
    result = harness.run_in_child("train", case, 180, str(tmp_path / "log"))
    assert result["status"] == "ok", result.get("traceback") or result.get("log_tail")
    packing = result["packing"]
    step1 = cases.packed_example_lengths(case)[:3]
    assert packing["step1_example_lengths"] == step1  # rows in order: step 1 = rows 0..2
    assert packing["step1_shape"] == [1, 3 * 64]  # micro_batch rows of seq_len: ONE row
    assert packing["step1_matches_cases"] is True
    starts, total = [], 0
    for n in (n for row in step1 for n in row):
        starts.append(total)
        total += n
    assert packing["step1_position_ids_starts"] == starts
    assert packing["step1_label_tokens"] == 3 * 64 - len(starts)  # each example's first token: -100
    assert "position_ids" in packing["step1_keys"] and "attention_mask" not in packing["step1_keys"]
    assert result["tokens_per_second"] > 0 and all(s["loss"] > 0 for s in result["steps"])
    assert result["lever_versions"]["trl"] and result["host_memory"]["after_train"]["rss_bytes"] > 0


def test_liger_sets_use_liger_kernel_and_nothing_else(tmp_path):
    base = tiny_case()
    plain = train_case.training_arguments(transformers, base, str(tmp_path), cuda=False)
    liger = train_case.training_arguments(transformers, tiny_case(liger=True), str(tmp_path), cuda=False)
    assert liger.use_liger_kernel is True and plain.use_liger_kernel is False
    assert liger.remove_unused_columns is plain.remove_unused_columns is True
    packed = train_case.training_arguments(transformers, tiny_case(packing=True), str(tmp_path), cuda=False)
    assert packed.remove_unused_columns is False  # trl's collator needs seq_lengths
    # under trl's fused head, as SFTTrainer: liger's layer kernels only, not its fused cross-entropy
    fused = train_case.training_arguments(transformers, dict(tiny_case(liger=True), loss="fused"), str(tmp_path),
                                          cuda=False)
    assert fused.liger_kernel_config == {"fused_linear_cross_entropy": False} and not liger.liger_kernel_config


@pytest.mark.skipif(not CUDA or importlib.util.find_spec("liger_kernel") is None,
                    reason="liger-kernel's triton kernels need CUDA (and liger_kernel installed)")
def test_liger_run_patches_the_model_on_gpu(tiny_profiles, tmp_path):
    case = tiny_case(precision="bf16-amp", liger=True)
    result = harness.run_in_child("train", case, 300, str(tmp_path / "log"))
    assert result["status"] == "ok", result.get("traceback") or result.get("log_tail")
    assert result["liger_applied"]["patched_modules"]


class CountingContext(contextlib.ContextDecorator):
    def __init__(self):
        self.entered = self.exited = 0

    def __enter__(self):
        self.entered += 1

    def __exit__(self, *exc):
        self.exited += 1


@pytest.mark.skipif(CUDA, reason="in-process run; on a GPU the real context runs in a child (below)")
def test_activation_offloading_wraps_each_training_step_as_sft_trainer(tiny_profiles, monkeypatch):
    """trl's context needs an accelerator: here a stand-in shows where the harness's Trainer makes
    it (with the model the Trainer holds, after its __init__) and enters it (once per step,
    around Trainer.training_step)."""
    trl_models = pytest.importorskip("trl.models")
    made = []

    def fake_ctx(model):
        made.append((model, CountingContext()))
        return made[-1][1]

    monkeypatch.setattr(trl_models, "get_act_offloading_ctx_manager", fake_ctx)
    case = tiny_case(activation_offloading=True, steps=3)
    result = train_case.run(case)
    assert result["status"] == "ok", result.get("traceback")
    assert len(made) == 1
    model, ctx = made[0]
    assert isinstance(model, transformers.PreTrainedModel)
    assert ctx.entered == ctx.exited == 3
    assert result["lever_versions"]["trl"]
    assert set(result["host_memory"]) == {"before_train", "after_train"}


@pytest.mark.skipif(not CUDA, reason="trl's activation offloading needs a CUDA stream and pinned memory")
def test_activation_offloading_records_pinned_host_memory_on_gpu(tiny_profiles, tmp_path):
    case = tiny_case(precision="bf16-amp", activation_offloading=True, seq_len=256, micro_batch=4)
    result = harness.run_in_child("train", case, 300, str(tmp_path / "log"))
    assert result["status"] == "ok", result.get("traceback") or result.get("log_tail")
    assert result["host_pinned_peak_bytes"] > 0


def test_levers_grid_covers_what_issue_20_asks():
    grid = grids.get("levers")
    ids = {cases.case_id(c) for c in grid}
    assert len(ids) == len(grid)
    for lever in LEVERS:
        on = [c for c in grid if c.get(lever)]
        assert len(on) >= 6, lever
        assert len({cases.load_profile(c["model"])["model_type"] for c in on}) >= 3, lever
        assert {c["method"] for c in on} == {"full", "lora", "qlora"}, lever
        assert {c["grad_ckpt"] for c in on} == {True, False}, lever
        for c in on:  # its baseline twin is in the grid, and nothing else is switched on
            assert sum(bool(c.get(k)) for k in LEVERS) == 1
            twin = {k: v for k, v in c.items() if k not in (lever, "example_len")}
            assert cases.case_id(twin) in ids, cases.case_label(c)
    liger_types = {cases.load_profile(c["model"])["model_type"] for c in grid if c.get("liger")}
    assert liger_types <= {"llama", "mistral", "qwen2", "gemma", "phi3"}  # liger's apply functions
    assert all(c["steps"] == 4 and c["precision"] == "bf16-amp" for c in grid)
    assert all(512 <= c["seq_len"] <= 4096 for c in grid)
    packed = [c for c in grid if c.get("packing")]
    assert all(4 <= c["micro_batch"] <= 8 and 512 <= c["seq_len"] <= 2048 for c in packed)
    assert 30 <= len(grid) <= 40 and grids.lever_seconds(grid) <= 420
    history = grids.get("levers_history")
    assert len(history) == 3 and all(cases.case_id(c) in ids for c in history)


def test_with_lever_builds_what_training_case_builds():
    base = grids._lever_base("llama-3.2-1b", "lora", 1024, 8, True)
    args = dict(model="llama-3.2-1b", method="lora", precision="bf16-amp", optim="adamw_torch",
                seq_len=1024, micro_batch=8, grad_ckpt=True, lora_r=16,
                target_modules=["q_proj", "v_proj"], steps=4)
    assert base == cases.training_case(**args)
    assert grids.with_lever(base, "packing", 128) == cases.training_case(**args, packing=True, example_len=128)
    assert grids.with_lever(base, "liger") == cases.training_case(**args, liger=True)
    assert (grids.with_lever(base, "activation_offloading")
            == cases.training_case(**args, activation_offloading=True))
    assert json.loads(json.dumps(base)) == base
