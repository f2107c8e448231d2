"""The CLI: one JSON object with --json, one line and exit code 2 for bad input."""

import json

import pytest
from typer.testing import CliRunner

from vramfit.cli import app

runner = CliRunner()


def test_estimate_json_has_the_documented_keys():
    r = runner.invoke(app, ["estimate", "qwen2.5-0.5b", "--method", "lora", "--seq-len", "512", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    for key in ("params_total", "params_trainable", "peak_allocated_bytes", "peak_reserved_bytes",
                "device_bytes", "breakdown", "inputs"):
        assert key in data
    assert data["inputs"]["seq_len"] == 512
    assert data["device_bytes"] > data["peak_reserved_bytes"] >= data["peak_allocated_bytes"]
    assert all(isinstance(v, int) for v in data["breakdown"].values())


def test_estimate_table_shows_the_three_peaks():
    r = runner.invoke(app, ["estimate", "smollm2-135m", "--method", "full"])
    assert r.exit_code == 0, r.output
    for word in ("peak allocated", "peak reserved", "nvidia-smi", "GiB"):
        assert word in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["estimate", "llama-2-7"], "llama-2-7b"),
    (["estimate", "gpt2", "--seq-len", "0"], "seq-len"),
    (["estimate", "gpt2", "--precision", "bf17"], "bf16-true"),
    (["estimate", "gpt2", "--optim", "adam"], "adamw_torch"),
    (["estimate", "gpt2", "--method", "full", "--lora-r", "8"], "--lora-r"),
    (["estimate", "gpt2", "--method", "qlora", "--precision", "32-true"], "QLoRA"),
    (["estimate", "gpt2", "--target-modules", "q_proj"], "c_attn"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output


def test_malformed_config_json_is_reported(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    r = runner.invoke(app, ["estimate", str(p)])
    assert r.exit_code == 2 and "not valid JSON" in r.stderr


def test_estimate_eval_batch_size_makes_evaluation_the_peak(monkeypatch):
    """--eval-batch-size is per_device_eval_batch_size: an evaluation batch 8x the training one is
    the whole run's peak in the replay (the fitted estimate has no evaluation phase)."""
    import json

    from typer.testing import CliRunner

    from vramfit.cli import app

    monkeypatch.delenv("VRAMFIT_REPLAY", raising=False)
    args = ["estimate", "smollm2-135m", "--method", "lora", "--seq-len", "256", "--batch-size", "2", "--json"]
    base = json.loads(CliRunner().invoke(app, args).stdout)
    big = json.loads(CliRunner().invoke(app, args + ["--eval-batch-size", "16"]).stdout)
    assert base["peak_phase"] != "eval" and big["peak_phase"] == "eval"
    assert big["phases"]["eval"] > base["phases"]["eval"] and big["phases"]["backward"] == base["phases"]["backward"]
