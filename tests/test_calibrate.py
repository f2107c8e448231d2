"""Calibration: refuses cleanly without a GPU, and a stored calibration changes later estimates."""

import json

from typer.testing import CliRunner

from vramfit.planner import calibration as cal
from vramfit.api import estimate
from vramfit.cli import app
from vramfit.model.spec import load_spec


def test_calibrate_without_gpu_exits_2_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    r = CliRunner().invoke(app, ["calibrate"])
    assert r.exit_code == 2
    assert "nothing was changed" in r.stderr
    assert not (tmp_path / "calibration").exists()


def test_stored_calibration_is_used_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cal, "local_key", lambda: "Test-GPU_1.0_torch_tf")
    base = estimate("qwen2.5-0.5b", method="lora", seq_len=1024, use_calibration=False)
    spec = load_spec("qwen2.5-0.5b")
    d = tmp_path / "calibration"
    d.mkdir()
    (d / "Test-GPU_1.0_torch_tf.json").write_text(json.dumps({
        "date": "2026-11-23", "constants": {"cuda_context_bytes": 1 << 30},
        "activation_scale": {spec.config_hash: 1.5}}))
    after = estimate("qwen2.5-0.5b", method="lora", seq_len=1024)
    assert after.calibration and "Test-GPU" in after.calibration
    assert after.device_bytes > base.device_bytes + (1 << 29)
    assert after.breakdown["activations"] > 1.4 * base.breakdown["activations"]
