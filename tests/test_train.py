"""`vramfit train` end to end on CPU: a tiny random Llama and tokenizer built here, real SFTTrainer
steps (LoRA and full), the OOM fall-back from inside a step, Ctrl-C and --resume, merge, and the
user errors caught before any work."""

import json
import math
import os
import signal

import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

from vramfit import VramfitError
from vramfit.cli import app
from vramfit.memory.setup import make_setup
from vramfit.model.spec import spec_from_config
from vramfit.run.fallback import fallback_ladder, fallback_setup
from vramfit.run.predict import predict
from vramfit.run.train import RunOptions, choose_setup, train, trainer_loss

from conftest import TINY_LLAMA
from tiny_lm import alpaca_rows, chat_rows, make_model_dir, write_jsonl

runner = CliRunner()
LORA = dict(method="lora", precision="32-true", optim="adamw_torch", micro_batch=2, grad_accum=1, grad_ckpt=False)
LORA_ARGS = ["--method", "lora", "--precision", "32-true", "--optim", "adamw_torch", "--micro-batch", "2",
             "--grad-accum", "1", "--no-grad-ckpt", "--max-steps", "3", "--max-seq-len", "64"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def model_dir(workdir):
    return str(make_model_dir(workdir / "tiny-llama"))


@pytest.fixture(scope="module")
def alpaca(workdir):
    return write_jsonl(workdir / "alpaca.jsonl", alpaca_rows(24))


@pytest.fixture(scope="module")
def lora_run(workdir, model_dir, alpaca):
    out = workdir / "lora-run"
    r = runner.invoke(app, ["train", model_dir, alpaca, "--out", str(out), *LORA_ARGS])
    return out, r


def report(out):
    return json.loads((out / "run_report.json").read_text())


def timeline(out):
    return [json.loads(x) for x in (out / "memory_timeline.jsonl").read_text().splitlines()]


def test_lora_three_steps_through_the_cli_write_adapter_report_timeline_and_plot(lora_run):
    out, r = lora_run
    assert r.exit_code == 0, r.output
    rep = report(out)
    assert (rep["status"], rep["steps"], rep["max_steps"]) == ("completed", 3, 3)
    assert [x["step"] for x in rep["losses"]] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in rep["losses"])
    assert rep["eval_losses"] and rep["data"]["format"] == "alpaca" and rep["data"]["eval_rows"] == 2
    assert rep["setup"]["seq_len"] == rep["data"]["seq_len"] <= 64  # the data's longest row, not a guess
    assert rep["predicted"]["device_bytes"] > rep["predicted"]["peak_reserved_bytes"] > 0
    assert rep["versions"]["trl"] and rep["cuda"] is False
    assert rep["options"]["simulate_allocator"] is False  # the replay's default is "on a GPU"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "tokenizer_config.json").is_file()
    lines = timeline(out)
    assert lines[0]["kind"] == "start" and lines[-1]["kind"] == "summary"
    assert {x["step"] for x in lines if x["kind"] == "step_end"} == {1, 2, 3}
    assert (out / "memory_timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert "tokens per row: median" in r.output and "run completed: 3 of 3 steps" in r.output
    assert "step 3/3 · loss" in r.output  # plain progress lines in a pipe


def test_the_guides_recipe_bf16_weights_under_bf16_autocast_trains_as_given(workdir, model_dir, alpaca):
    """--dtype bfloat16 --amp bf16: from_pretrained(dtype=bfloat16) and SFTConfig(bf16=True), as predicted."""
    out = workdir / "bf16-amp-run"
    args = [a for a in LORA_ARGS if a not in ("--precision", "32-true")]
    r = runner.invoke(app, ["train", model_dir, alpaca, "--out", str(out), *args, "--dtype", "bfloat16", "--amp", "bf16"])
    assert r.exit_code == 0, r.output
    rep = report(out)
    assert rep["status"] == "completed" and rep["setup"]["precision"] == "bf16-amp"
    assert all(math.isfinite(x["loss"]) for x in rep["losses"])


def test_merge_folds_the_adapter_into_a_standard_model(lora_run, model_dir, workdir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = lora_run
    merged = workdir / "merged"
    r = runner.invoke(app, ["merge", str(out / "adapter"), "--out", str(merged)])
    assert r.exit_code == 0, r.output
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 5, 9, 14, 20, 7]])
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, peft(ids).logits, atol=1e-5)
    again = runner.invoke(app, ["merge", str(out / "adapter"), "--out", str(merged)])
    assert again.exit_code == 2 and "not empty" in again.stderr


def test_full_fine_tuning_on_chat_data_with_checkpointing_saves_the_model(workdir, model_dir):
    data = write_jsonl(workdir / "chat.jsonl", chat_rows(20))
    out = workdir / "full-run"
    rep = train(model_dir, data, RunOptions(out_dir=str(out), max_steps=3, max_seq_len=64, live=False),
                dict(LORA, method="full", grad_ckpt=True))
    assert (rep["status"], rep["steps"], rep["data"]["format"], rep["loss_note"]) == ("completed", 3, "messages", None)
    assert all(math.isfinite(x["loss"]) for x in rep["losses"])
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    assert not (out / "adapter").exists()


def test_random_init_from_a_config_directory_trains_and_merge_asks_for_a_base(workdir, alpaca):
    from tiny_lm import llama_config, make_tokenizer

    cfg_dir = workdir / "config-and-tokenizer"
    tok = make_tokenizer()
    llama_config(tok).save_pretrained(cfg_dir)
    tok.save_pretrained(cfg_dir)
    out = workdir / "random-run"
    rep = train(str(cfg_dir), alpaca, RunOptions(out_dir=str(out), init="random", max_steps=2, max_seq_len=64,
                                                 val_split=0, live=False), LORA)
    assert (rep["status"], rep["init"], rep["data"]["eval_rows"], rep["eval_losses"]) == ("completed", "random", 0, [])
    r = runner.invoke(app, ["merge", str(out / "adapter"), "--out", str(workdir / "nowhere")])
    assert r.exit_code == 2 and "give the base with --base" in r.stderr


class OomOnce(TrainerCallback):
    """Raises torch.OutOfMemoryError from the model's forward in step `at`, once."""

    def __init__(self, at: int):
        self.at, self.fired = at, False

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 != self.at or self.fired:
            return

        def hook(module, inputs):
            self.fired = True
            handle.remove()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. (injected by the test)")

        handle = model.register_forward_pre_hook(hook)


def test_oom_in_a_step_replans_to_a_smaller_micro_batch_and_finishes_from_the_checkpoint(workdir, model_dir, alpaca):
    out = workdir / "oom-run"
    rep = train(model_dir, alpaca, RunOptions(out_dir=str(out), max_steps=3, max_seq_len=64, save_steps=1, live=False),
                LORA, callbacks=[OomOnce(at=2)])
    assert (rep["status"], rep["steps"]) == ("completed", 3)
    [f] = rep["fallbacks"]
    assert f["step"] == 2 and f["resumed_from"].endswith("checkpoint-1")
    assert (f["setup_before"]["micro_batch"], f["setup_before"]["grad_accum"]) == (2, 1)
    assert (f["setup_after"]["micro_batch"], f["setup_after"]["grad_accum"]) == (1, 2)
    assert (rep["setup"]["micro_batch"], rep["setup"]["grad_accum"]) == (1, 2)
    assert [a["outcome"] for a in rep["attempts"]] == ["out of memory", "finished"]
    assert rep["predicted"]["peak_allocated_bytes"] < rep["attempts"][0]["predicted"]["peak_allocated_bytes"]
    assert [x["step"] for x in rep["losses"]][-1] == 3 and all(math.isfinite(x["loss"]) for x in rep["losses"])
    events = [x["message"] for x in timeline(out) if x["kind"] == "event"]
    assert events == ["setup", "out of memory", "re-planned", "setup"]
    assert json.loads((out / "run_setup.json").read_text())["setup"]["micro_batch"] == 1  # what --resume uses


def test_oom_without_the_fall_back_is_a_user_error_with_the_report_written(workdir, model_dir, alpaca):
    out = workdir / "oom-no-fallback"
    with pytest.raises(VramfitError, match=r"out of memory at step 1 .*--no-fallback"):
        train(model_dir, alpaca, RunOptions(out_dir=str(out), max_steps=3, max_seq_len=64, fallback=False, live=False),
              LORA, callbacks=[OomOnce(at=1)])
    assert report(out)["status"] == "out of memory" and timeline(out)[-1]["kind"] == "summary"


class CtrlCAt(TrainerCallback):
    def __init__(self, at: int):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint_and_the_adapter_then_resume_finishes(workdir, model_dir, alpaca):
    out = workdir / "interrupted"
    opts = RunOptions(out_dir=str(out), max_steps=3, max_seq_len=64, save_steps=3, eval_steps=3, live=False)
    rep = train(model_dir, alpaca, opts, LORA, callbacks=[CtrlCAt(at=2)])
    assert (rep["status"], rep["steps"]) == ("interrupted", 2)
    assert rep["outputs"]["checkpoint"].endswith("checkpoint-2") and (out / "adapter" / "adapter_config.json").is_file()
    assert timeline(out)[-1]["kind"] == "summary"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler is gone

    resumed = train(model_dir, alpaca, RunOptions(**{**opts.__dict__, "resume": True}), {"method": "full"})
    assert (resumed["status"], resumed["steps"], resumed["setup"]["method"]) == ("completed", 3, "lora")
    assert [x["step"] for x in resumed["losses"]] == [1, 2, 3]  # the history comes back with the checkpoint
    assert sum(x["kind"] == "start" for x in timeline(out)) == 2


@pytest.mark.parametrize("positional, options, needle", [
    (["{model}", "{tmp}/missing.jsonl"], {}, "no such data file"),
    (["{tmp}/config-only", "{data}"], {}, "has a config but no weights"),
    (["smollm2-135m", "{data}"], {}, "config without weights: its weights are on the hub as"),
    (["{model}", "{data}"], {"--method": "qlora", "--precision": "bf16-true"}, "QLoRA needs a CUDA GPU"),
    (["{model}", "{data}"], {"--optim": "paged_adamw_8bit"}, "needs bitsandbytes on a CUDA GPU"),
    (["{model}", "{data}"], {"--format": "messages"}, "none of its 24 rows is valid for format messages"),
    (["{model}", "{data}"], {"--save-steps": "3", "--eval-steps": "2"}, "multiple of --eval-steps"),
    (["{model}", "{data}"], {"--resume": None}, "nothing to resume"),
])
def test_user_errors_are_one_line_before_anything_is_written(tmp_path, model_dir, alpaca, positional, options,
                                                              needle):
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text(json.dumps(TINY_LLAMA))
    fill = {"model": model_dir, "data": alpaca, "tmp": str(tmp_path)}
    given = {"--method": "lora", "--precision": "32-true", "--optim": "adamw_torch", "--micro-batch": "1",
             "--grad-accum": "1", "--no-grad-ckpt": None, "--max-steps": "3", **options}
    out = tmp_path / "out"
    args = [a.format(**fill) for a in positional] + [x for k, v in given.items() for x in (k, v) if x is not None]
    r = runner.invoke(app, ["train", *args, "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_setup_predicted_not_to_fit_the_gpu_is_refused_before_loading(tmp_path, model_dir, alpaca, monkeypatch):
    import vramfit.run.train as vt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU with 100 MB free: checked, never used
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(vt, "usable_bytes", lambda gpu, headroom: 100_000_000)
    out = tmp_path / "out"
    with pytest.raises(VramfitError, match=r"predicted to need 0\.\d\d GiB but 0\.09 GiB is usable"):
        train(model_dir, alpaca, RunOptions(out_dir=str(out), max_steps=3), LORA)
    assert not out.exists()


def test_when_nothing_fits_the_planner_says_so_in_one_line(tmp_path, model_dir, alpaca):
    out = tmp_path / "out"
    r = runner.invoke(app, ["train", model_dir, alpaca, "--out", str(out), "--gpu", "0.3GiB", "--max-steps", "3"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "CUDA context" in r.stderr
    assert not out.exists()


def test_an_existing_run_is_never_overwritten(lora_run, model_dir, alpaca):
    out, _ = lora_run
    r = runner.invoke(app, ["train", model_dir, alpaca, "--out", str(out), *LORA_ARGS])
    assert r.exit_code == 2 and "already exists and is not empty" in r.stderr


# --------------------------------------------------------------------------- pure parts


@pytest.fixture(scope="module")
def tiny_spec():
    return spec_from_config("tiny-llama", TINY_LLAMA)


def test_fallback_ladder_halves_the_micro_batch_then_checkpoints_then_changes_method():
    s = make_setup(method="full", precision="bf16-true", micro_batch=4, grad_accum=2, seq_len=128)
    ladder = [(x.method, x.grad_ckpt, x.micro_batch, x.grad_accum) for x in fallback_ladder(s)]
    assert ladder[:6] == [("full", False, 2, 4), ("full", False, 1, 8), ("full", True, 4, 2), ("full", True, 2, 4),
                          ("full", True, 1, 8), ("lora", False, 4, 2)]
    assert ladder[-1] == ("qlora", True, 1, 8) and len(ladder) == 5 + 6 + 6
    lora = fallback_ladder(make_setup(method="lora", target_modules="q_proj", micro_batch=1, grad_ckpt=True))
    assert [(x.method, x.targets) for x in lora] == [("qlora", "q_proj")]  # same LoRA layers: the adapter loads


def test_fallback_picks_the_first_setup_predicted_to_fit_after_the_measured_overshoot(tiny_spec):
    s = make_setup(method="full", precision="32-true", micro_batch=8, grad_accum=1, seq_len=256)
    ladder = fallback_ladder(s)
    reserved = [predict(tiny_spec, x)["peak_reserved_bytes"] for x in ladder]
    scale = 1.3
    cap = int(sorted(reserved)[len(reserved) // 2] * scale)  # half the ladder fits
    chosen, pred = fallback_setup(tiny_spec, s, scale, cap, cuda=True)
    i = ladder.index(chosen)
    assert pred["peak_reserved_bytes"] * scale <= cap and all(r * scale > cap for r in reserved[:i])
    assert fallback_setup(tiny_spec, s, scale, None, cuda=False)[0] == ladder[0]  # no cap known: the next rung
    assert fallback_setup(tiny_spec, s, scale, 1, cuda=True) == (None, None)


def test_a_complete_setup_from_options_skips_the_planner(tiny_spec):
    s, plan = choose_setup(tiny_spec, dict(LORA, lora_r=8), seq_len=100)
    assert plan is None and s == make_setup(**LORA, lora_r=8, seq_len=100, loss=trainer_loss(), allocator=s.allocator)


def test_the_run_is_predicted_with_the_loss_its_trainer_computes(tiny_spec):
    # trl's SFTTrainer (trl 1.x) patches the model with a chunked LM head: no full logits
    from trl.trainer import utils as trl_utils

    assert trainer_loss() == ("fused" if hasattr(trl_utils, "add_fused_lm_head") else "logits")
    s, _ = choose_setup(tiny_spec, dict(LORA, lora_r=8), seq_len=100)
    assert s.loss == trainer_loss()


@pytest.mark.parametrize("conf, expected", [(None, "expandable"), ("expandable_segments:True", "expandable"),
                                             ("max_split_size_mb:128, expandable_segments:true", "expandable"),
                                             ("expandable_segments:False", "default")])
def test_the_run_is_predicted_with_the_allocator_torch_will_use(tiny_spec, monkeypatch, conf, expected):
    # the planner must not pick an allocator the run does not apply: PYTORCH_CUDA_ALLOC_CONF decides
    # unless --allocator is given; unset, expandable segments (padded batches fragment the default)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    if conf is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
    assert choose_setup(tiny_spec, dict(LORA, lora_r=8), seq_len=100)[0].allocator == expected
    given = "default" if expected == "expandable" else "expandable"
    assert choose_setup(tiny_spec, dict(LORA, lora_r=8, allocator=given), seq_len=100)[0].allocator == given
    pytest.importorskip("vramfit.planner.search")
    s, plan = choose_setup(tiny_spec, {"method": "lora"}, seq_len=100, gpu="24GiB", effective_batch=8)
    assert s.allocator == expected


def test_missing_options_are_chosen_by_the_planner(tiny_spec):
    pytest.importorskip("vramfit.planner.search")
    s, plan = choose_setup(tiny_spec, {"method": "lora", "micro_batch": 2}, seq_len=100, gpu="24GiB",
                           effective_batch=8)
    assert plan is not None and plan.setup == s
    assert (s.method, s.seq_len, s.micro_batch, s.micro_batch * s.grad_accum) == ("lora", 100, 2, 8)


def test_without_a_planner_the_missing_options_are_named(tiny_spec, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vramfit.planner.search", None)
    with pytest.raises(VramfitError, match="give --precision, --grad-ckpt"):
        choose_setup(tiny_spec, {"method": "lora", "optim": "sgd", "micro_batch": 1, "grad_accum": 1}, seq_len=64)


def test_save_steps_zero_writes_no_checkpoint_and_needs_no_validation(workdir, model_dir, alpaca):
    out = workdir / "no-checkpoints"
    rep = train(model_dir, alpaca, RunOptions(out_dir=str(out), max_steps=2, max_seq_len=64, val_split=0, save_steps=0,
                                              live=False), LORA)
    assert (rep["status"], rep["steps"], rep["outputs"]["checkpoint"]) == ("completed", 2, None)
    assert not list(out.glob("checkpoints/*/checkpoint-*")) and (out / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(VramfitError, match="--save-steps 0 .* needs --val-split 0"):
        train(model_dir, alpaca, RunOptions(out_dir=str(workdir / "x"), max_steps=2, max_seq_len=64, save_steps=0,
                                            live=False), LORA)


def test_enforce_budget_caps_the_allocator_below_the_card_by_what_lives_outside_it(monkeypatch):
    import vramfit.run.fallback as vt
    from vramfit.memory.constants import DEFAULT

    usable = 24 * 2**30 - int(0.05 * 24 * 2**30)
    assert vt.usable_bytes("24GiB", "5%") == usable
    assert vt.allocator_cap_bytes("24GiB", "5%") == usable - DEFAULT.cuda_context_bytes - DEFAULT.kernel_growth_bytes
    with pytest.raises(VramfitError, match="no CUDA GPU"):
        vt.enforce_budget("24GiB", "5%")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gpu in (None, "auto", "cuda:0"):
        with pytest.raises(VramfitError, match="needs --gpu with a smaller card"):
            vt.enforce_budget(gpu, "5%")


def test_free_memory_releases_the_embeddings_bitsandbytes_keeps_for_8bit_optimizers():
    # transformers' Trainer registers each nn.Embedding with bitsandbytes' process-wide manager when
    # the optimizer is a bnb 8-bit one; without a reset the weights outlive the Trainer (the OOM
    # fall-back's next attempt, or any later Trainer in the process, would start with them resident)
    import gc
    import weakref

    bnb = pytest.importorskip("bitsandbytes")
    from vramfit.run.fallback import free_memory

    emb = torch.nn.Embedding(16, 8)
    bnb.optim.GlobalOptimManager.get_instance().register_module_override(emb, "weight", {"optim_bits": 32})
    weight = weakref.ref(emb.weight)
    del emb
    gc.collect()
    assert weight() is not None  # what the manager holds
    free_memory(None)
    assert weight() is None
    assert bnb.optim.GlobalOptimManager.get_instance().module_weight_config_triple == []


def test_rows_shorter_than_the_sequence_length_mean_padded_batches(tiny_spec):
    from types import SimpleNamespace

    from vramfit.run.train import data_is_padded

    d = lambda count, over: SimpleNamespace(lengths=SimpleNamespace(count=count, over_max_seq_len=over))  # noqa: E731
    assert data_is_padded(d(100, 10)) and not data_is_padded(d(100, 100)) and not data_is_padded(d(0, 0))
    s, _ = choose_setup(tiny_spec, dict(LORA, lora_r=8), seq_len=100, padded=True)
    assert s.padded and not choose_setup(tiny_spec, dict(LORA, lora_r=8), seq_len=100)[0].padded


def test_batch_lengths_follow_the_data_and_simulated_predictions_replay_them(tiny_spec):
    from vramfit.run.predict import batch_lengths

    rows = [30, 500, 120, 90, 700, 60, 45, 300]
    lens = batch_lengths(rows, micro_batch=2, seq_len=256, steps=10, seed=1)
    assert len(lens) == 10 and all(0 < n <= 256 for n in lens)
    assert lens == batch_lengths(rows, 2, 256, 10, 1) and lens != batch_lengths(rows, 2, 256, 10, 2)
    assert batch_lengths([], 2, 256, 10, 1) == []
    s = make_setup(**LORA, lora_r=8, seq_len=256, padded=True)
    uniform = predict(tiny_spec, s)
    sim = predict(tiny_spec, s, seq_lens=lens)
    assert "10 steps of the data's padded batch lengths" in sim["notes"][0]
    # the allocated peak is the longest batch's, which the replay and the fast model agree on to 2%
    assert sim["peak_allocated_bytes"] == pytest.approx(
        predict(tiny_spec, s.with_(seq_len=max(lens)))["peak_allocated_bytes"], rel=0.02)
    assert sim["device_bytes"] >= sim["peak_reserved_bytes"] >= sim["peak_allocated_bytes"]
    assert "notes" not in uniform


def test_the_run_is_predicted_by_the_allocator_replay_as_estimate_answers(tiny_spec, monkeypatch):
    """vramfit train's prediction (its fit check, live view and report) is the default answer of `vramfit
    estimate` -- the allocator replay of the whole run -- not the fitted figure the planner prunes with."""
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.replay import replayed_breakdown

    monkeypatch.setenv("VRAMFIT_TEMPLATE_BUILD", "off")
    monkeypatch.setenv("VRAMFIT_REPLAY", "1")  # the tests' default is the fitted figure (conftest)
    s = make_setup(**dict(LORA, micro_batch=2), lora_r=8, seq_len=96)
    got = predict(tiny_spec, s)
    bd, targets = estimate_setup(tiny_spec, s)
    want = replayed_breakdown(tiny_spec, s, targets, bd, DEFAULT)
    peaks = ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes")
    assert tuple(got[k] for k in peaks) == tuple(getattr(want, k) for k in peaks)
    fitted = predict(tiny_spec, s, replay=False)
    assert tuple(fitted[k] for k in peaks) == tuple(getattr(bd, k) for k in peaks) != tuple(got[k] for k in peaks)


def test_sequential_sampling_resumes_a_mid_run_oom_from_its_checkpoint_with_steps_counted_once(workdir, model_dir,
                                                                                            alpaca):
    """--sampling sequential (TrainingArguments.train_sampling_strategy): the rows in the file's order;
    an OOM after the first checkpoint resumes from it, the resumed Trainer skipping the rows done."""
    from trl import SFTConfig

    from vramfit.run.train import sampling_kwargs

    assert sampling_kwargs("sequential", SFTConfig) == {"train_sampling_strategy": "sequential"}
    with pytest.raises(VramfitError, match="--sampling must be one of"):
        sampling_kwargs("shuffled", SFTConfig)
    out = workdir / "oom-midrun"
    rep = train(model_dir, alpaca, RunOptions(out_dir=str(out), max_steps=4, max_seq_len=64, save_steps=2, val_split=0,
                                              sampling="sequential", live=False), LORA, callbacks=[OomOnce(at=4)])
    assert (rep["status"], rep["steps"], rep["options"]["sampling"]) == ("completed", 4, "sequential")
    [f] = rep["fallbacks"]
    assert f["step"] == 4 and f["resumed_from"].endswith("checkpoint-2")
    assert [x["step"] for x in rep["losses"]] == [1, 2, 3, 4]
    steps = [x["step"] for x in timeline(out) if x["kind"] == "step_end"]
    assert steps == [1, 2, 3, 3, 4]  # step 3 redone from checkpoint-2, then 4: four optimizer steps in all


def test_random_init_dir_is_written_once_kept_and_refused_for_another_config_or_seed(tmp_path):
    from tiny_lm import llama_config, make_tokenizer

    from vramfit.run.model import RANDOM_INIT_MARK, _random_checkpoint, resolve_model

    cfg_dir = tmp_path / "config"
    llama_config(make_tokenizer()).save_pretrained(cfg_dir)
    source = resolve_model(str(cfg_dir), "random")
    shared = tmp_path / "shared"
    path = _random_checkpoint(source, 7, tmp_path / "run-a", shared=shared)
    assert path == str(shared) and (shared / RANDOM_INIT_MARK).is_file() and not (tmp_path / "run-a").exists()
    stamp = (shared / "config.json").stat().st_mtime_ns
    assert _random_checkpoint(source, 7, tmp_path / "run-b", shared=shared) == path  # reused by another run
    assert (shared / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(VramfitError, match="another model, config or seed"):
        _random_checkpoint(source, 8, tmp_path / "run-c", shared=shared)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(VramfitError, match="not empty and holds no checkpoint"):
        _random_checkpoint(source, 7, tmp_path / "run-d", shared=tmp_path / "junk")


# --------------------------------------------------------------------------- the memory levers (issue 20)


def test_packing_trains_end_to_end_on_packed_padding_free_rows(workdir, model_dir, alpaca):
    """--packing --tokens-per-batch: trl packs the rows (bfd) into rows of --max-seq-len tokens, the collator
    flattens a micro-batch into one padding-free row, and the run is predicted at those tokens."""
    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            seen["args"] = (args.packing, args.packing_strategy, args.padding_free, args.max_length,
                            args.per_device_train_batch_size)
            seen["columns"] = train_dataloader.dataset.column_names
            seen["rows"] = len(train_dataloader.dataset)
            seen["padding_free"] = train_dataloader.collate_fn.padding_free

    out = workdir / "packed-run"
    opts = RunOptions(out_dir=str(out), max_steps=3, max_seq_len=128, live=False)
    rep = train(model_dir, alpaca, opts, dict(LORA, micro_batch=None, packing=True, tokens_per_batch=256),
                callbacks=[Look()])
    assert rep["status"] == "completed" and all(math.isfinite(x["loss"]) for x in rep["losses"])
    s = rep["setup"]
    assert (s["packing"], s["seq_len"], s["micro_batch"], s["padded"]) == (True, 128, 2, False)
    assert seen["args"] == (True, "bfd", True, 128, 2) and seen["padding_free"]
    assert "seq_lengths" in seen["columns"] and seen["rows"] < rep["data"]["train_rows"]  # examples share rows
    assert rep["predicted"]["tokens_per_micro_batch"] == 256
    started = next(x for x in timeline(out) if x.get("message") == "setup")
    assert started["predicted"]["tokens_per_micro_batch"] == 256


def test_liger_and_activation_offloading_reach_the_sft_config_and_are_refused_on_cpu(tmp_path, model_dir, alpaca):
    from trl import SFTConfig

    from vramfit.run.predict import runtime_problem
    from vramfit.run.train import sft_config

    s = make_setup(**LORA, seq_len=64, liger=True, activation_offloading=True)
    c = sft_config(s, RunOptions(max_seq_len=64), tmp_path / "c", 3, False, False, False)
    assert isinstance(c, SFTConfig) and c.use_liger_kernel and c.activation_offloading and not c.packing
    plain = sft_config(make_setup(**LORA, seq_len=64), RunOptions(max_seq_len=64), tmp_path / "p", 3, False, False, False)
    assert not plain.use_liger_kernel and not plain.activation_offloading
    assert "CUDA" in runtime_problem(s.with_(activation_offloading=False), cuda=False)
    assert "CUDA" in runtime_problem(s.with_(liger=False), cuda=False)
    for flag in ("--liger", "--activation-offloading"):
        out = tmp_path / flag.strip("-")
        r = runner.invoke(app, ["train", model_dir, alpaca, "--out", str(out), *LORA_ARGS, flag])
        assert r.exit_code == 2 and flag in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_short_rows_make_packing_the_default_only_where_the_planner_chooses(tiny_spec):
    from vramfit.run.train import packing_for

    assert packing_for({"method": "lora"}, rows_median=40, pack_len=128)  # the planner chooses, short rows
    assert not packing_for({"method": "lora"}, rows_median=80, pack_len=128)
    assert not packing_for(dict(LORA), rows_median=40, pack_len=128)  # the user's complete setup
    assert packing_for(dict(LORA), rows_median=400, pack_len=128) is False
    assert packing_for({**LORA, "packing": True}, rows_median=400, pack_len=128)
    assert not packing_for({"method": "lora", "packing": False}, rows_median=40, pack_len=128)
    s, plan = choose_setup(tiny_spec, {"method": "lora", "packing": True, "tokens_per_batch": 512}, seq_len=128,
                           gpu="24GiB", effective_batch=8, padded=True, rows_median=40)
    assert (s.packing, s.padded, s.micro_batch, s.grad_accum) == (True, False, 4, 2)
    assert plan.setup == s and any("packing" in n and "median (40 tokens)" in n for n in plan.notes)
    with pytest.raises(VramfitError, match="add --packing"):
        choose_setup(tiny_spec, {**LORA, "micro_batch": None, "tokens_per_batch": 256}, seq_len=128)


def test_when_the_planner_chooses_short_rows_are_packed_by_default(workdir, model_dir, alpaca):
    """Rows of median ~40 tokens under --max-seq-len 128: the run packs (rows of 128 tokens) unless told not to."""
    out = workdir / "default-packed"
    args = ["--method", "lora", "--precision", "32-true", "--optim", "adamw_torch", "--max-steps", "1",
            "--max-seq-len", "128", "--gpu", "24GiB", "--effective-batch", "4", "--val-split", "0"]
    r = runner.invoke(app, ["train", model_dir, alpaca, "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    s = report(out)["setup"]
    assert (s["packing"], s["seq_len"], s["padded"]) == (True, 128, False)
    assert "packing (trl, bfd, padding-free): rows of 128 tokens" in " ".join(r.output.split())
    r = runner.invoke(app, ["train", model_dir, alpaca, "--out", str(workdir / "not-packed"), *args, "--no-packing"])
    assert r.exit_code == 0, r.output
    s = report(workdir / "not-packed")["setup"]
    assert not s["packing"] and s["seq_len"] < 128 and s["padded"]
