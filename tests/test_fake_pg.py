"""The fake-process-group harness (benchmarks.distributed.fake_pg): its grid covers what issue 21 asks,
and its code path trains DDP and FSDP2 ranks on the CPU (one process as rank r of N, torch's fake group)."""

import json

import pytest

from benchmarks.distributed import fake_pg, report


def test_issue21_grid_covers_architectures_methods_sizes_strategies_checkpointing_and_losses():
    g = fake_pg.issue21_grid()
    assert len(g) >= 36 and len({c["name"] for c in g}) == len(g)
    assert {c["model"] for c in g} == {"llama-3.2-1b", "qwen2.5-1.5b", "llama-3.1-8b"}
    for strategy in ("ddp", "fsdp-full"):
        for method in ("full", "lora", "qlora"):
            for n in (2, 4, 8):
                sub = [c for c in g if (c["strategy"], c["method"], c["world_size"]) == (strategy, method, n)]
                assert len(sub) == 3
    for key in ("grad_ckpt", "loss"):
        for strategy in ("ddp", "fsdp-full"):
            assert len({c[key] for c in g if c["strategy"] == strategy}) == 2
    assert all(fake_pg.predicted(c)["per_gpu"]["peak_allocated_bytes"] > 0 for c in g[:3])


def test_report_statistics_and_targets():
    rs = [{"error": {"peak_allocated_bytes": e, "peak_reserved_bytes": e, "device_bytes": None}} for e in
          (0.0, 0.001, -0.003, 0.01, -0.03)]
    s = report.stats(rs, "peak_allocated_bytes")
    assert s["n"] == 5 and s["median"] == pytest.approx(0.003) and s["max"] == pytest.approx(0.03)
    assert s["under2"] == pytest.approx(0.2)


@pytest.mark.parametrize("name", ["full-32-true-fsdp-full-n2r0", "lora-32-true-ddp-n4r0"])
def test_one_rank_of_n_trains_through_the_fake_group_on_the_cpu(tmp_path, name):
    cases = [c for c in fake_pg.cpu_grid() if name in c["name"]]
    out = tmp_path / "fake.jsonl"
    assert fake_pg.drive(cases, out, 1, 1 << 40, float("inf"), tmp_path) == 0
    rec = json.loads(out.read_text())
    assert rec["status"] == "ok" and rec["launch_env"] and len(rec["steps"]) == cases[0]["steps"]
    assert rec["engine"]["num_processes"] == cases[0]["world_size"] and rec["engine"]["process_index"] == 0


def test_history_grid_names_the_zero_runs_and_the_worst_fsdp_ones():
    g = fake_pg.history_grid()
    assert [c["name"] for c in g] == list(fake_pg.HISTORY)
    assert sum(c["strategy"].startswith("zero") for c in g) == 4 and any(c["strategy"] == "fsdp-full" for c in g)


def test_memory_history_keeps_each_blocks_stream_and_finds_the_peak_by_frame():
    from benchmarks.distributed import history

    ds = [{"filename": "/x/torch/_tensor.py", "line": 1, "name": "t"},
          {"filename": "/x/deepspeed/runtime/zero/stage3.py", "line": 782, "name": "_setup_for_real_optimizer"}]
    snap = {"device_traces": [[
        {"action": "segment_alloc", "addr": 0, "size": 4 << 20, "stream": 7, "frames": ds, "time_us": 1},
        {"action": "alloc", "addr": 0, "size": 3 << 20, "stream": 7, "frames": ds, "time_us": 2},
        {"action": "alloc", "addr": 9 << 20, "size": 1 << 20, "stream": 0, "frames": [], "time_us": 3},
        {"action": "free_completed", "addr": 0, "size": 3 << 20, "stream": 7, "time_us": 4},
        {"action": "segment_free", "addr": 0, "size": 4 << 20, "stream": 7, "time_us": 5}]]}
    data = history.compact(snap)
    assert [r[0] for r in data["events"]] == ["S", "a", "a", "f", "s"]
    assert data["events"][1][3] == 7 and data["frames"][data["events"][1][4]].startswith("runtime/zero/stage3.py:782")
    data.update(marks=[("train_begin", 0)], name="t")
    text = history.summary(data)
    assert "peak allocated (trace) 4.0 MiB" in text and "{7: 3.0, 0: 1.0}" in text and "stage3.py:782" in text
