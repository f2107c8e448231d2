"""benchmarks/speed/train_overhead.py: `vramfit train` against a plain SFTTrainer script, end to end on
the CPU with a tiny Llama (--tiny), and the pieces it measures with."""

import json

import pytest

from benchmarks.speed import train_overhead as to
from vramfit.run.tracker import torch_figures


def records(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead")
    rc = to.main(["--out", str(out), "--tiny", "--steps", "8", "--warmup", "2", "--profile-steps", "2",
                  "--repeats", "1", "--no-tracker-bench", "--budget-s", "600"])
    return rc, out, records(out / to.RESULT_NAME)


def test_tiny_runs_both_programs_with_the_same_config_and_tokens(tiny_result):
    rc, out, recs = tiny_result
    assert rc == 0
    env = next(r for r in recs if r["kind"] == "environment")
    assert {"torch", "transformers", "peft", "trl"} <= set(env["versions"]) and "nvidia_smi" in env
    inputs = next(r for r in recs if r["kind"] == "inputs")
    assert inputs["rows"] == to.TINY["rows"] and inputs["token_lengths"]["max"] > inputs["token_lengths"]["p50"] > 0
    runs = [r for r in recs if r["kind"] == "run"]
    assert sorted(r["side"] for r in runs) == ["plain", "vramfit"]
    for r in runs:
        assert r["status"] == "completed" and r["rc"] == 0 and r["max_steps"] == 8 + 1 + 2
        assert r["window"] == [3, 8] and r["steps_timed"] == 6 and len(r["tokens_per_step"]) == 6
        assert r["tokens"] == sum(r["tokens_per_step"]) > 0 and r["seconds"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=1e-3)
        assert 0 < r["step_s_median"] <= r["step_s_p90"]
        p = r["profile"]  # CPU: the profiled steps' wall, no GPU figures
        assert p["steps"] == 2 and p["wall_s_per_step"] > 0 and p["gpu_busy_share"] is None and p["top_host_ops"]
        assert (out / "runs" / r["name"] / "profile.txt").is_file()
        assert not (out / "runs" / r["name"] / "trace.json").exists()
    v = next(r for r in runs if r["side"] == "vramfit")
    plain = next(r for r in runs if r["side"] == "plain")
    assert "MemoryTracker" in v["callbacks_ms_per_step"] and "MemoryTracker" not in plain["callbacks_ms_per_step"]
    assert v["vramfit_report"]["status"] == "completed"
    assert v["timeline"]["tokens_per_s"] == pytest.approx(v["tokens_per_s"], rel=0.1)  # its own records agree
    assert not (out / "runs" / v["name"] / "vramfit-out" / "adapter").exists()  # no weights kept
    cmp = next(r for r in recs if r["kind"] == "comparison")
    assert cmp["configs_agree"] and cmp["disagree"] == {} and cmp["tokens_identical"]
    assert cmp["must_agree"]["per_device_train_batch_size"] == to.TINY["micro_batch"]
    assert cmp["must_agree"]["packing"] is False and cmp["must_agree"]["lora.r"] == 16
    assert cmp["must_agree"]["max_length"] == to.TINY["max_seq_len"]
    assert cmp["config_vramfit"]["model.weights_checksum"] == cmp["config_plain"]["model.weights_checksum"]
    assert cmp["ratio"] > 0 and cmp["target_ratio"] == 0.97 and isinstance(cmp["meets_target"], bool)


def test_one_statistics_read_gives_what_the_four_torch_calls_give(monkeypatch):
    import torch
    import torch.cuda.memory as tcm

    stats = to.fake_stats()
    stats["allocated_bytes"]["all"].update(current=5, peak=7)
    stats["reserved_bytes"]["all"].update(current=11, peak=13)
    for mod in (tcm, torch.cuda):
        monkeypatch.setattr(mod, "memory_stats_as_nested_dict", lambda device=None: stats)
    new = torch_figures(torch.cuda.memory_stats_as_nested_dict())
    assert new == to.old_reading_figures() == {"allocated_bytes": 5, "reserved_bytes": 11,
                                               "peak_allocated_bytes": 7, "peak_reserved_bytes": 13}
    assert torch_figures({}) == dict.fromkeys(new, 0)  # as torch's .get(key, 0)


def test_tracker_bench_times_the_old_and_new_reading(tmp_path):
    res = to.tracker_bench(tmp_path, n=200)
    assert res["same_values"] and res["old_four_calls_us"] > res["new_one_call_us"] > 0 and res["sample_us"] > 0
    assert records(tmp_path / to.RESULT_NAME)[-1]["kind"] == "tracker_bench"


def test_trace_split_is_the_union_of_gpu_intervals_inside_each_step():
    ev = [{"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#7", "ts": 0, "dur": 100},
          {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#8", "ts": 100, "dur": 100},
          {"ph": "X", "cat": "kernel", "name": "a", "ts": 10, "dur": 30},
          {"ph": "X", "cat": "kernel", "name": "b", "ts": 20, "dur": 30},  # overlaps a: 10..50
          {"ph": "X", "cat": "gpu_memcpy", "name": "c", "ts": 90, "dur": 20},  # 10 in each step
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 200}]
    s = to.trace_split({"traceEvents": ev}, cuda=True)
    assert s["steps"] == 2 and s["wall_s_per_step"] == pytest.approx(100e-6)
    assert s["gpu_busy_s_per_step"] == pytest.approx(30e-6) and s["gpu_busy_share"] == pytest.approx(0.3)
    assert s["host_overhead_share"] == pytest.approx(0.7)


def test_plain_side_falls_back_to_qlora_where_bf16_weights_cannot_fit(tmp_path):
    """benchmarks/speed/lever_proof: Llama-3.1-8B's bf16 weights (16 GB) are over 12 GiB, so the plain
    baseline is the QLoRA recipe there, and `vramfit train` gets the same method and the shared folder of
    the random checkpoint; at 24 GiB LoRA fits (the fast model only: no GPU, milliseconds)."""
    from benchmarks.speed import lever_proof as lp

    mb, ckpt, method, why = lp.plain_micro_batch("llama-3.1-8b", 12 * lp.GiB, 2048)
    assert method == why["method"] == "qlora" and why["optim"] == "paged_adamw_8bit" and mb >= 1
    assert why["predicted_device_bytes"] <= 12 * lp.GiB
    assert lp.plain_micro_batch("llama-3.1-8b", 24 * lp.GiB, 2048)[2] == "lora"
    assert lp.plain_micro_batch("llama-3.2-1b", 12 * lp.GiB, 1996)[:3] == (2, False, "lora")  # as published
    inputs = {"alpaca": "a.jsonl", "tokenizer": "tok"}
    cmd = lp.vramfit_cmd("llama-3.1-8b", inputs, lp.MODELS["llama-3.1-8b"], tmp_path / "o", 10, 12, method,
                         lp.random_init_dir(tmp_path, "llama-3.1-8b"))
    assert cmd[cmd.index("--method") + 1] == "qlora"
    assert cmd[cmd.index("--random-init-dir") + 1] == str(tmp_path / "inputs" / "llama-3.1-8b-random-init")


def test_plain_random_checkpoint_is_the_one_vramfit_train_reuses(tmp_path):
    """The plain QLoRA side's random checkpoint is written by vramfit's own code with vramfit's mark:
    `vramfit train --random-init-dir` takes it as its own (no rewrite), and refuses it for another seed."""
    from vramfit.errors import VramfitError
    from vramfit.run.model import _random_checkpoint, resolve_model

    folder = tmp_path / "smollm2-135m-random-init"
    assert to.random_checkpoint("smollm2-135m", to.SEED, folder) == str(folder)
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert "config.json" in written and "vramfit_random_init.json" in written
    source = resolve_model("smollm2-135m", "random")
    assert _random_checkpoint(source, to.SEED, tmp_path / "scratch", str(folder)) == str(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written
    with pytest.raises(VramfitError, match="another model, config or seed"):
        _random_checkpoint(source, to.SEED + 1, tmp_path / "scratch", str(folder))
