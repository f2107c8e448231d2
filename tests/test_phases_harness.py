"""The GPU harness's phases after the steps (benchmarks/accuracy/train_case.py, a case's `after`):
evaluation, a checkpoint save, the adapter's reload and the final save, each closed into
phases_outside_steps, run on CPU through the same code path (the peaks are null there)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if importlib.util.find_spec("peft") is None:
    pytest.skip("needs peft", allow_module_level=True)

from benchmarks.accuracy import cases, harness  # noqa: E402
from conftest import harness_profiles  # noqa: E402

CUDA = torch.cuda.is_available()
PHASES = {"load", "setup", "eval", "save", "load_best", "save_model"}


@pytest.fixture(autouse=True)
def spawned_children(monkeypatch, tmp_path):
    monkeypatch.setenv("VRAMFIT_HARNESS_START_METHOD", "spawn")
    harness_profiles(tmp_path, monkeypatch)


def _case(**kwargs) -> dict:
    after = kwargs.pop("after", ["eval", "save"])
    extra = {k: kwargs.pop(k) for k in ("eval_batch", "eval_rows") if k in kwargs}
    base = dict(model="tiny-llama", method="lora", precision="32-true", optim="adamw_torch", seq_len=32,
                micro_batch=2, steps=2, lora_r=4, target_modules=["q_proj", "v_proj"])
    base.update(kwargs)
    return dict(cases.training_case(**base), after=after, **extra)


def test_lora_case_evaluates_saves_a_checkpoint_reloads_the_adapter_and_saves(tmp_path):
    result = harness.run_in_child("train", _case(eval_batch=3, eval_rows=5), 240, str(tmp_path / "log"))
    assert result["status"] == "ok", result.get("traceback") or result.get("log_tail")
    outside = result["phases_outside_steps"]
    assert set(outside) == PHASES
    # the steps keep their phases; the last step's idle ends where evaluate() begins
    assert [s["step"] for s in result["steps"]] == [0, 1]
    assert set(result["steps"][-1]["phases"]) == {"forward", "backward", "clip", "optimizer", "post_step", "idle"}
    assert all(s["loss"] is not None for s in result["steps"])  # evaluation's compute_loss closes no step phase
    assert math.isfinite(result["eval_loss"])
    files = set(result["checkpoint_files"])
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert set(result["after_seconds"]) == {"eval", "save", "load_best", "save_model"}
    for name in PHASES:
        rec = outside[name]
        if CUDA:
            assert rec["peak_reserved_bytes"] >= rec["peak_allocated_bytes"] > 0
        else:
            assert rec["peak_allocated_bytes"] is None


def test_full_fine_tuning_saves_without_an_adapter_reload_and_eval_alone_works(tmp_path):
    result = harness.run_in_child("train", _case(method="full", after=["save"]), 240, str(tmp_path / "log"))
    assert result["status"] == "ok", result.get("traceback") or result.get("log_tail")
    assert set(result["phases_outside_steps"]) == {"load", "setup", "save", "save_model"}
    assert "model.safetensors" in result["checkpoint_files"] and "eval_loss" not in result
    only_eval = harness.run_in_child("train", _case(after=["eval"]), 240, str(tmp_path / "log2"))
    assert only_eval["status"] == "ok", only_eval.get("traceback") or only_eval.get("log_tail")
    assert set(only_eval["phases_outside_steps"]) == {"load", "setup", "eval"}


def test_the_committed_phase_cases_are_valid_and_distinct():
    listed = json.loads((cases.REPO_ROOT / "benchmarks" / "accuracy" / "phases_cases.json").read_text())
    assert len(listed) >= 8
    assert len({cases.case_id(c) for c in listed}) == len(listed)
    for c in listed:
        assert set(c["after"]) <= {"eval", "save"} and c["kind"] == "train"
        assert cases.case_label(c)
    assert any(c.get("eval_batch", c["micro_batch"]) > c["micro_batch"] for c in listed)
    assert {c["method"] for c in listed} == {"full", "lora", "qlora"}
