"""An out-of-memory error before the first step (writing the random checkpoint, loading or quantizing
the model, the trainer moving it to the GPU) is a user error: one line naming the phase, the budget
and the setup to try next, exit code 2, never a traceback.  Simulated on the CPU: torch's
OutOfMemoryError raised from the loading function."""

import json

import pytest
import torch
from typer.testing import CliRunner

import vramfit.run.train as vt
from vramfit import VramfitError
from vramfit.cli import app
from vramfit.memory.setup import make_setup
from vramfit.model.spec import spec_from_config
from vramfit.run import model as vm
from vramfit.run.fallback import load_fallback, load_oom_message
from vramfit.run.predict import predict
from vramfit.run.train import RunOptions, train

from conftest import TINY_LLAMA
from tiny_lm import alpaca_rows, make_model_dir, write_jsonl

runner = CliRunner()
CUDA_OOM = ("CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "512.00 MiB is free. (injected by the test)")
FULL_ARGS = ["--method", "full", "--precision", "32-true", "--optim", "adamw_torch", "--micro-batch", "2",
             "--grad-accum", "1", "--no-grad-ckpt", "--max-steps", "2", "--max-seq-len", "64"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("load-oom")


@pytest.fixture(scope="module")
def model_dir(workdir):
    return str(make_model_dir(workdir / "tiny-llama"))


@pytest.fixture(scope="module")
def alpaca(workdir):
    return write_jsonl(workdir / "alpaca.jsonl", alpaca_rows(16))


def raise_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError(CUDA_OOM)


def test_oom_loading_the_weights_is_one_line_with_the_phase_and_the_next_setup(tmp_path, model_dir, alpaca,
                                                                                monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", raise_oom)
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", model_dir, alpaca, "--out", str(out), *FULL_ARGS])
    assert r.exit_code == 2, r.output
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("vramfit: error: out of memory while loading the weights (from_pretrained) with full "
                           "fine-tuning")
    assert "Tried to allocate 1.96 GiB" in line and "no GPU budget is known here" in line
    assert "Try LoRA r=16" in line and "--method lora" in line  # lighter weights: the ladder's next method
    assert "Traceback" not in r.output and not isinstance(r.exception, torch.OutOfMemoryError)
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("target, phase", [
    ("build_model", "loading the weights (from_pretrained)"),
    ("_trainer", "moving the model to the GPU (SFTTrainer)"),
])
def test_on_a_gpu_the_message_gives_the_budget(tmp_path, model_dir, alpaca, monkeypatch, target, phase):
    """A (pretended) GPU with 12 GB usable: the budget is in the message."""
    if target == "build_model":
        from transformers import AutoModelForCausalLM

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", raise_oom)
    else:
        monkeypatch.setattr(vt, "_trainer", raise_oom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vt, "usable_bytes", lambda gpu, headroom: 12 * 10**9)
    monkeypatch.setattr(vt, "apply_allocator", lambda s, cuda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    r = runner.invoke(app, ["train", model_dir, alpaca, "--out", str(tmp_path / "run"), "--gpu", "12GB",
                            "--no-simulate-allocator", *FULL_ARGS])
    assert r.exit_code == 2, r.output
    [line] = r.stderr.strip().splitlines()
    assert f"out of memory while {phase} with full fine-tuning" in line
    assert "the budget is 11.18 GiB usable on this GPU" in line
    assert "Try LoRA r=16" in line and "`vramfit plan " in line


def test_oom_loading_a_fall_back_setup_ends_the_run_with_its_report(workdir, model_dir, alpaca, monkeypatch):
    """A step OOM falls back to a smaller micro-batch; that attempt's model does not load: the run
    stops with status 'out of memory', the report and timeline written, the loading phase said."""
    from test_train import LORA, OomOnce

    calls = []
    real = vt.build_model

    def second_load_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise_oom()
        return real(*args, **kwargs)

    monkeypatch.setattr(vt, "build_model", lambda *a, **k: _in_phase(second_load_fails, *a, **k))
    out = workdir / "fallback-load-oom"
    with pytest.raises(VramfitError, match=r"out of memory while loading the weights \(from_pretrained\) with LoRA"):
        train(model_dir, alpaca, RunOptions(out_dir=str(out), max_steps=3, max_seq_len=64, save_steps=1, live=False),
              LORA, callbacks=[OomOnce(at=2)])
    rep = json.loads((out / "run_report.json").read_text())
    assert rep["status"] == "out of memory" and [a["outcome"] for a in rep["attempts"]] == ["out of memory"]
    assert len(rep["fallbacks"]) == 1
    events = [json.loads(x) for x in (out / "memory_timeline.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e["kind"] == "event"][-1] == "out of memory"
    assert [e for e in events if e["kind"] == "event"][-1]["phase"] == "loading the weights (from_pretrained)"


def _in_phase(fn, *args, **kwargs):
    with vm.loading_phase("loading the weights (from_pretrained)"):
        return fn(*args, **kwargs)


def test_oom_writing_the_random_checkpoint_names_that_phase(tmp_path, monkeypatch):
    from tiny_lm import llama_config, make_tokenizer

    cfg_dir = tmp_path / "config"
    llama_config(make_tokenizer()).save_pretrained(cfg_dir)
    monkeypatch.setattr(vm, "write_random_checkpoint", raise_oom)
    with pytest.raises(vm.LoadOutOfMemory) as e:
        vm._random_checkpoint(vm.resolve_model(str(cfg_dir), "random"), 0, tmp_path)
    assert e.value.phase.startswith("writing the random checkpoint") and "Tried to allocate" in e.value.error


@pytest.mark.parametrize("exc, turned", [
    (torch.cuda.OutOfMemoryError(CUDA_OOM), True),
    (RuntimeError("CUDA error: out of memory"), True),  # a kernel's own allocation (bitsandbytes)
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 17179869184 bytes"), True),
    (RuntimeError("shape mismatch"), False),
    (KeyError("x"), False),
])
def test_only_out_of_memory_errors_become_load_errors(exc, turned):
    with pytest.raises(vm.LoadOutOfMemory if turned else type(exc)) as e:
        with vm.loading_phase("quantizing"):
            raise exc
    if turned:
        assert e.value.phase == "quantizing" and e.value.__suppress_context__
        assert e.value.__context__.__traceback__ is None  # its frames (and the tensors they hold) are let go


def test_the_message_under_an_enforced_budget_names_the_card_and_the_cap():
    spec = spec_from_config("tiny", TINY_LLAMA)
    s = make_setup(method="full", precision="32-true", optim="adamw_torch", micro_batch=2, grad_accum=1,
                   grad_ckpt=False, seq_len=64)
    enforced = {"gpu": "12GB", "headroom": "5%", "allocator_cap_bytes": 10_000_000_000}
    msg = load_oom_message(spec, s, "loading the weights", CUDA_OOM.split(".")[0], predict(spec, s), 11_400_000_000,
                           enforced, True, model="llama-3.1-8b")
    assert "the budget is --gpu 12GB less 5% headroom, enforced: torch's allocator capped at 9.31 GiB" in msg
    assert "the setup's weights are predicted at" in msg and "`vramfit plan llama-3.1-8b --gpu 12GB`" in msg
    assert "Try LoRA r=16" in msg


def test_with_the_lightest_weights_already_there_is_no_next_setup():
    spec = spec_from_config("tiny", TINY_LLAMA)
    s = make_setup(method="lora", precision="32-true", optim="adamw_torch", micro_batch=1, grad_accum=1,
                   grad_ckpt=True, seq_len=64)
    assert load_fallback(spec, s, None, cuda=False) == (None, None)  # QLoRA needs CUDA
    msg = load_oom_message(spec, s, "loading the weights", "CUDA out of memory", predict(spec, s), None, None, False)
    assert "No setup with lighter weights is predicted to fit: try a smaller model" in msg
