"""The GPU measurement harness (benchmarks/accuracy), exercised on CPU through the same code path:
fork a child per case, train a tiny Llama with transformers.Trainer, write one JSON line.

GPU-only parts (CUDA peaks, NVML, QLoRA, the context micro-case) are skipped here; their results
live in benchmarks/results/.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if importlib.util.find_spec("peft") is None:  # not imported here: it would initialise CUDA
    pytest.skip("needs peft", allow_module_level=True)

from benchmarks.accuracy import cases, grids, harness  # noqa: E402
from conftest import HARNESS_LLAMA, harness_profiles  # noqa: E402

CUDA = torch.cuda.is_available()
TINY_LLAMA = HARNESS_LLAMA
# embed 256*64 + 2 layers * (q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*128 + 2 norms*64) + norm 64
TINY_LLAMA_PARAMS = 256 * 64 + 2 * (4096 + 2 * 2048 + 4096 + 3 * 8192 + 128) + 64
# LoRA r=4 on q (64->64) and v (64->32): A r*in + B out*r per layer
TINY_LLAMA_LORA_QV_R4 = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))


@pytest.fixture(autouse=True)
def spawned_children(monkeypatch):
    """Earlier tests have started torch's OpenMP pool in this process, and a forked child of it
    can hang: the tests start their children fresh (the GPU runs keep fork, see harness.py)."""
    monkeypatch.setenv("VRAMFIT_HARNESS_START_METHOD", "spawn")


@pytest.fixture(autouse=True)
def cuda_not_initialised_here():
    """Children are forked: a CUDA context made in this process (say, another test imported
    bitsandbytes through peft) would be unusable in them."""
    if CUDA and torch.cuda.is_initialized():
        pytest.skip("CUDA already initialised in the pytest process; run this file on its own")


@pytest.fixture
def tiny_profiles(tmp_path, monkeypatch):
    return harness_profiles(tmp_path, monkeypatch)


def tiny_case(**kwargs) -> dict:
    """A tiny-llama full fine-tuning case (the harness profiles'), `kwargs` changed."""
    base = dict(model="tiny-llama", method="full", precision="32-true", optim="adamw_torch",
                seq_len=32, micro_batch=2, steps=2)
    return cases.training_case(**{**base, **kwargs})


def test_case_id_is_stable_and_ignores_key_order_and_id():
    case = tiny_case()
    shuffled = dict(reversed(list(case.items())))
    assert cases.case_id(case) == cases.case_id(shuffled) == cases.case_id(dict(case, id="x"))
    assert cases.case_id(case) != cases.case_id(tiny_case(seq_len=64))
    assert len(cases.case_id(case)) == 12


def test_profile_underscore_keys_are_stripped_and_overrides_applied(tiny_profiles):
    config = cases.model_config_dict(tiny_case(config_overrides={"num_hidden_layers": 1}))
    assert "_params" not in config
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 64


def test_full_fine_tuning_of_tiny_llama_runs_with_cuda_fields_null_on_cpu(tiny_profiles, tmp_path):
    result = harness.run_in_child("train", tiny_case(), 120, str(tmp_path / "log"))
    assert result["status"] == "ok", result.get("traceback") or result.get("log_tail")
    assert result["params"]["total_params"] == TINY_LLAMA_PARAMS == TINY_LLAMA["_params"]
    assert result["params"]["trainable_params"] == TINY_LLAMA_PARAMS
    assert result["params"]["param_bytes_by_dtype"] == {"torch.float32": 4 * TINY_LLAMA_PARAMS}
    assert [s["step"] for s in result["steps"]] == [0, 1]
    assert set(result["steps"][0]["phases"]) == {"forward", "backward", "clip", "optimizer",
                                                 "post_step", "idle"}
    assert set(result["phases_outside_steps"]) == {"load", "setup"}
    if CUDA:
        assert result["peak_reserved_bytes"] >= result["peak_allocated_bytes"] > 0
    else:
        assert result["peak_allocated_bytes"] is None and result["peak_reserved_bytes"] is None
    assert result["tokens_per_second"] > 0
    assert result["environment"]["versions"]["torch"] == torch.__version__
    assert result["config"]["hidden_size"] == 64


def test_lora_qv_r4_on_tiny_llama_with_checkpointing_counts_like_peft_and_trains(
        tiny_profiles, tmp_path):
    case = tiny_case(method="lora", lora_r=4, target_modules=["q_proj", "v_proj"], grad_ckpt=True)
    result = harness.run_in_child("train", case, 120, str(tmp_path / "log"))
    assert result["status"] == "ok", result.get("traceback") or result.get("log_tail")
    assert result["params"]["trainable_params"] == TINY_LLAMA_LORA_QV_R4
    assert result["params"]["total_params"] == TINY_LLAMA_PARAMS + TINY_LLAMA_LORA_QV_R4
    assert result["trainable_params_without_grad"] == 0
    assert "use_reentrant" in result["gradient_checkpointing"]["kwargs"]


def test_bf16_weights_under_bf16_autocast_with_trl_fused_loss_trains_lora(tiny_profiles, tmp_path):
    """The guides' recipe (dtype=bfloat16 + bf16=True) with SFTTrainer's fused LM head: bf16 base
    weights, fp32 adapters (peft), a loss from the fused head and no logits."""
    pytest.importorskip("trl")
    case = tiny_case(method="lora", precision="bf16-amp", lora_r=4, target_modules=["q_proj", "v_proj"],
                     loss="fused")
    assert case["loss"] == "fused" and "loss" not in tiny_case()  # older cases keep their ids
    result = harness.run_in_child("train", case, 180, str(tmp_path / "log"))
    assert result["status"] == "ok", result.get("traceback") or result.get("log_tail")
    by_dtype = result["params"]["param_bytes_by_dtype"]
    assert by_dtype["torch.bfloat16"] == 2 * TINY_LLAMA_PARAMS
    assert by_dtype["torch.float32"] == 4 * TINY_LLAMA_LORA_QV_R4
    assert all(s["loss"] is not None and s["loss"] > 0 for s in result["steps"])


def test_cli_appends_one_line_per_case_and_skip_done_runs_nothing_twice(tiny_profiles, tmp_path):
    cases_file = tmp_path / "two.json"
    cases_file.write_text(json.dumps([tiny_case(), tiny_case(optim="sgd")]))
    out = tmp_path / "out.jsonl"
    argv = ["--cases", str(cases_file), "--out", str(out), "--log-dir", str(tmp_path / "logs")]
    assert harness.main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["status"] for line in lines] == ["ok", "ok"]
    assert [line["id"] for line in lines] == [cases.case_id(c) for c in json.loads(cases_file.read_text())]
    assert lines[1]["case"]["optim"] == "sgd"
    assert harness.main(argv + ["--skip-done"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_a_case_past_its_timeout_is_killed_and_recorded(tiny_profiles, tmp_path):
    result = harness.run_in_child("train", tiny_case(steps=10_000), 0.5, str(tmp_path / "log"))
    assert result["status"] == "timeout" and result["timeout_seconds"] == 0.5


def test_shard_and_only_partition_the_grid():
    all_cases = harness.load_cases("issue2", None)
    shards = [harness.select(all_cases, f"{i}/3", None, set()) for i in (1, 2, 3)]
    assert sorted(c["id"] for s in shards for c in s) == sorted(c["id"] for c in all_cases)
    only = harness.select(all_cases, None, "qlora", set())
    assert only and all(c["method"] == "qlora" for c in only)


def _coverage(grid: list[dict]) -> dict:
    train = [c for c in grid if c["kind"] == "train"]
    model_types = {cases.load_profile(c["model"])["model_type"] for c in train}
    sizes = [cases.load_profile(c["model"])["_params"] for c in train if not c["config_overrides"]]
    return {
        "n": len(train), "model_types": model_types,
        "methods": {c["method"] for c in train}, "precisions": {c["precision"] for c in train},
        "optims": {c["optim"] for c in train}, "seq": {c["seq_len"] for c in train},
        "batch": {c["micro_batch"] for c in train}, "ckpt": {c["grad_ckpt"] for c in train},
        "attn": {c["attn"] for c in train}, "allocators": {c["allocator"] for c in train},
        "ranks": {c["lora_r"] for c in train if c["lora_r"]},
        "targets": {str(c["target_modules"]) for c in train if c["target_modules"]},
        "min_size": min(sizes), "max_size": max(sizes), "context": len(grid) - len(train),
    }


def test_issue2_grid_covers_what_issue_2_asks():
    cov = _coverage(grids.get("issue2"))
    assert cov["n"] >= 30 and len(cov["model_types"]) >= 6
    assert cov["methods"] == {"full", "lora", "qlora"}
    assert {"bf16-true", "bf16-mixed", "32-true"} <= cov["precisions"]
    assert {"adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "sgd",
            "adafactor"} <= cov["optims"]
    assert min(cov["seq"]) <= 256 and max(cov["seq"]) >= 2048
    assert min(cov["batch"]) == 1 and max(cov["batch"]) >= 8
    assert cov["ckpt"] == {True, False} and cov["attn"] == {"sdpa", "eager"}
    assert cov["allocators"] == {"default", "expandable"} and cov["context"] >= 1
    assert cov["min_size"] <= 150e6 and cov["max_size"] >= 6.5e9


def test_full_grid_covers_what_issue_3_asks():
    grid = grids.get("full")
    cov = _coverage(grid)
    assert cov["n"] >= 160 and len(cov["model_types"]) >= 10
    assert {"qwen2_moe", "mixtral", "gemma", "phi3", "gpt2", "gpt_neox", "opt", "mistral",
            "qwen2", "llama"} <= cov["model_types"]
    assert min(cov["ranks"]) == 4 and max(cov["ranks"]) == 256
    assert "all-linear" in cov["targets"] and "['q_proj', 'v_proj']" in cov["targets"]
    assert min(cov["seq"]) == 128 and max(cov["seq"]) == 8192
    assert min(cov["batch"]) == 1 and max(cov["batch"]) == 32
    assert len({c["id"] if "id" in c else cases.case_id(c) for c in grid}) == len(grid)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: context sizes, cuBLAS workspace and "
                    "allocator rounding; measured in benchmarks/results/*.jsonl")
def test_context_micro_case_measures_context_and_rounding(tmp_path):
    result = harness.run_in_child("context", cases.context_case(), 120, str(tmp_path / "log"))
    assert result["status"] == "ok"
    assert result["after_cuda_init"]["nvml_process_bytes"] > 100 * 2**20
    assert result["allocator_rounding"][0]["reserved_growth_bytes"] >= 512


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and bitsandbytes: QLoRA loads a 4-bit "
                    "model on the GPU; measured in benchmarks/results/*.jsonl")
def test_qlora_case_runs_on_gpu(tiny_profiles, tmp_path):
    case = tiny_case(method="qlora", precision="bf16-true", lora_r=4)
    checkpoints = harness.CheckpointCache(tmp_path / "ckpt", [case], 300, tmp_path)
    line = harness.run_case(dict(case, id=cases.case_id(case)), "test", 300, tmp_path, checkpoints)
    assert line["status"] == "ok", line.get("traceback")
    assert line["peak_reserved_bytes"] >= line["peak_allocated_bytes"] > 0


def test_memory_history_splits_allocator_and_replay_errors():
    """A real stream (torch's snapshot format) through the allocator model, and the allocations of
    1 MiB or more that the replay lacks, with where they came from."""
    from benchmarks.accuracy import memory_history as mh

    MiB = 1 << 20
    frames = [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
              {"filename": "/x/transformers/loss_utils.py", "line": 40, "name": "ForCausalLMLoss"}]
    trace = [{"action": "alloc", "addr": 0x1000, "size": 30 * MiB, "frames": frames},
             {"action": "alloc", "addr": 0x9000, "size": 5 * MiB, "frames": frames},
             {"action": "free_requested", "addr": 0x1000},
             {"action": "free_completed", "addr": 0x1000},
             {"action": "alloc", "addr": 0x1000, "size": 10 * MiB, "frames": frames},  # address reused
             {"action": "free_completed", "addr": 0x77}]  # allocated before the recording: skipped
    events = mh.events_from_snapshot({"device_traces": [trace]})
    assert [e[0] for e in events] == ["a", "a", "f", "a", "f"]
    assert events[0][3] == "loss_utils.py:40:ForCausalLMLoss"  # the first frame outside torch
    replay = [("a", 1, 30 * MiB), ("f", 1), ("a", 2, 10 * MiB)]  # lacks the 5 MiB one
    res = mh.compare({"events": events}, replay)
    real = res["allocator_on_real_stream"]
    assert real["peak_allocated"] >= 35 * MiB and real["peak_reserved"] >= real["peak_allocated"]
    assert [(r["size"], r["missing"]) for r in res["size_diff"]] == [(5 * MiB, 1)]
    assert res["size_diff"][0]["frames"][0][0] == "loss_utils.py:40:ForCausalLMLoss"


def test_replay_phase_peaks_follow_the_marks():
    from benchmarks.accuracy.replay_phases import phase_peaks

    events = [("a", 1, 10), ("a", 2, 5), ("f", 1), ("a", 3, 7), ("f", 2), ("f", 3)]
    assert phase_peaks(events, {"forward": 0, "backward": 2}) == {"forward": 15, "backward": 12}
