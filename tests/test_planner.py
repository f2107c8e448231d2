"""The planner: what fits where, the ranking, the cost model, the converters and `vramfit plan`."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from vramfit.planner import search as planner
from vramfit.cli import app
from vramfit.errors import VramfitError
from vramfit.planner.gpu import resolve_gpu
from vramfit.planner.cost import CostModel, fit_cost_model, matmul_params, seconds_per_token, train_flops_per_token
from vramfit.planner.search import find_gpu, max_micro_batch, max_seq_len, plan, search
from vramfit.planner.space import divisors, make_space
from vramfit.memory.setup import Setup, resolve_targets
from vramfit.model.spec import load_spec

GiB = 1 << 30
runner = CliRunner()
SMALL = "qwen2.5-0.5b"


@pytest.fixture(scope="module")
def small():
    return load_spec(SMALL)


@pytest.fixture(scope="module")
def seven_b():
    return load_spec("llama-2-7b")


@pytest.fixture(scope="module")
def floor(small):
    """The smallest device bytes of any setup of SMALL: budgets below are multiples of it, so the
    tests hold whatever the memory model's absolute numbers."""
    big = resolve_gpu("80GiB")
    return search(small, big, make_space(small, big), prefer="memory", details=False).chosen.device_bytes


def budget(floor, factor):
    """A --gpu size whose usable memory (5% headroom off) is `factor` x floor."""
    return f"{int(floor * factor / 0.95)}B"


def _next_divisor(effective, mb):
    bigger = [d for d in divisors(effective) if d > mb]
    return bigger[0] if bigger else None


# --------------------------------------------------------------------------- what fits where


def test_a_7b_fits_on_12gb_only_with_qlora(seven_b):
    p = plan(seven_b, "12GiB")
    assert p.chosen.setup.method == "qlora" and p.chosen.fits
    assert p.chosen.device_bytes <= p.usable_bytes < 12 * GiB
    assert {c.setup.method for c in p.candidates} == {"qlora"}
    for method in ("lora", "full"):
        with pytest.raises(VramfitError, match="nothing fits.*GiB over"):
            plan(seven_b, "12GiB", method=method)


def test_on_an_80gb_card_the_7b_gets_something_faster_than_qlora(seven_b):
    big = plan(seven_b, "h100")
    small_card = plan(seven_b, "12GiB")
    assert big.chosen.setup.method != "qlora"
    assert big.chosen.tokens_per_s > small_card.chosen.tokens_per_s


@pytest.mark.parametrize("method", ["auto", "lora", "qlora"])
def test_bigger_budget_never_yields_a_slower_choice(small, floor, method):
    last = 0.0
    for factor in (1.25, 1.4, 1.6, 2, 2.5, 3, 4, 6, 10, 14):
        p = plan(small, budget(floor, factor), method=method)
        # ties within planner.SPEED_TIE may go to a plainer setup
        assert p.chosen.tokens_per_s >= last * (1 - planner.SPEED_TIE), (factor, p.chosen.setup)
        last = max(last, p.chosen.tokens_per_s)


@pytest.mark.parametrize("factor", [1.1, 1.7, 2.6, 5])
def test_chosen_micro_batch_is_the_largest_that_fits_at_its_checkpointing_setting(small, floor, factor):
    p = plan(small, budget(floor, factor))
    s = p.chosen.setup
    nxt = _next_divisor(p.space.effective_batch, s.micro_batch)
    if nxt is not None:
        bigger = s.with_(micro_batch=nxt, grad_accum=p.space.effective_batch // nxt)
        needed = planner.Evaluator(small).memory(bigger)[0].device_bytes
        assert needed > p.usable_bytes, f"micro-batch {nxt} would fit too: {needed} <= {p.usable_bytes}"
    assert p.largest_micro_batch >= s.micro_batch


def test_the_chosen_setup_is_the_fastest_that_fits_and_rejections_are_faster_misses(small, floor):
    p = plan(small, budget(floor, 1.05))
    assert all(c.fits for c in p.candidates)
    bucket = lambda c: planner._rank_key("speed")(c)[0]
    assert bucket(p.chosen) == min(bucket(c) for c in p.candidates)
    for r in p.rejections:
        assert not r.candidate.fits and r.over_bytes == r.candidate.device_bytes - p.usable_bytes > 0
    space_all = search(small, p.device, p.space, details=False)
    assert p.searched == space_all.searched == 3 * 3 * 6 * 2 * 2 * 5 and p.rejections  # methods x precisions x optims x ckpt x allocators x micro-batches


def test_bounding_micro_batches_changes_nothing_but_the_work(small, floor):
    device = resolve_gpu(budget(floor, 1.5))
    space = make_space(small, device)
    fast, full = search(small, device, space), search(small, device, space, exhaustive=True)
    assert fast.chosen == full.chosen and fast.candidates == full.candidates
    assert [r.candidate.setup for r in fast.rejections] == [r.candidate.setup for r in full.rejections]
    assert fast.evaluated < full.evaluated == full.searched == fast.searched
    by_family: dict = {}  # the bound rests on memory growing with the micro-batch
    every = planner.Evaluator(small).candidates(space.setups(True), device, device.free_bytes, exhaustive=True)
    for c in sorted(every, key=lambda c: c.setup.micro_batch):
        s = c.setup
        by_family.setdefault((s.method, s.precision, s.optim, s.grad_ckpt, s.allocator), []).append(c.device_bytes)
    assert len(by_family) == 3 * 3 * 6 * 2 * 2 and all(b == sorted(b) for b in by_family.values())


def test_prefer_memory_picks_the_smallest_footprint(small, floor):
    fast = plan(small, budget(floor, 1.5))
    lean = plan(small, budget(floor, 1.5), prefer="memory")
    assert lean.chosen.device_bytes == min(c.device_bytes for c in lean.candidates)
    assert lean.chosen.device_bytes <= fast.chosen.device_bytes
    assert lean.chosen.tokens_per_s <= fast.chosen.tokens_per_s * (1 + planner.SPEED_TIE)


def test_method_restriction_and_fixed_knobs_are_respected(small):
    p = plan(small, "24GiB", method="lora", optim="adamw_torch", grad_ckpt=True, lora_r=8, target_modules="q_proj,v_proj")
    assert {(c.setup.method, c.setup.optim, c.setup.grad_ckpt, c.setup.lora_r) for c in p.candidates} == {
        ("lora", "adamw_torch", True, 8)}
    assert p.to_lora_config_kwargs()["target_modules"] == ["q_proj", "v_proj"]


def test_without_bf16_only_fp16_and_fp32_are_tried(small):
    p = plan(small, "T4")
    assert {c.setup.precision for c in p.candidates} <= {"16-amp", "16-true", "16-mixed", "32-true"}
    assert p.chosen.setup.precision != "32-true"  # fp32 matmuls are far slower
    with pytest.raises(VramfitError, match="no bf16"):
        plan(small, "T4", precision="bf16-true")


def test_headroom_is_taken_off_the_budget(small):
    p = plan(small, "40GiB", headroom="1GiB")
    assert (p.budget_bytes, p.headroom_bytes, p.usable_bytes) == (40 * GiB, GiB, 39 * GiB)
    assert plan(small, "40GiB").headroom_bytes == int(40 * GiB * 0.05)
    assert plan(small, "40GiB", headroom="0").usable_bytes == 40 * GiB
    with pytest.raises(VramfitError, match="headroom"):
        plan(small, "40GiB", headroom="lots")


def test_a_budget_below_the_cuda_context_is_refused(small):
    with pytest.raises(VramfitError, match="CUDA context"):
        plan(small, "400MiB")


def test_levers_turn_one_knob_and_checkpointing_trades_memory_for_speed(small, floor):
    p = plan(small, budget(floor, 3))
    s = p.chosen.setup
    ckpt = next(l for l in p.levers if l.knob == "grad_ckpt")
    assert ckpt.candidate.setup == s.with_(grad_ckpt=not s.grad_ckpt)
    if s.grad_ckpt:  # turning it off costs memory and buys speed
        assert ckpt.delta_bytes > 0 and ckpt.speedup > 1
    else:
        assert ckpt.delta_bytes < 0 and ckpt.speedup < 1
    seq = [l for l in p.levers if l.knob == "seq_len" and l.candidate.setup.seq_len > s.seq_len]
    assert seq and seq[0].delta_bytes > 0


# --------------------------------------------------------------------------- inverse questions


def test_longest_seq_len_and_largest_micro_batch_are_the_edges(small, floor):
    usable = 2 * floor
    s = Setup(method="lora", target_modules="all-linear", micro_batch=2, grad_accum=8, grad_ckpt=True, loss="fused")
    ev = planner.Evaluator(small)
    n = max_seq_len(small, s, usable, evaluator=ev)
    assert 0 < n < 32768
    assert ev.memory(s.with_(seq_len=n))[0].device_bytes <= usable < ev.memory(s.with_(seq_len=n + 1))[0].device_bytes
    b = max_micro_batch(small, s, usable, evaluator=ev)
    assert ev.memory(s.with_(micro_batch=b, grad_accum=1))[0].device_bytes <= usable
    assert ev.memory(s.with_(micro_batch=b + 1, grad_accum=1))[0].device_bytes > usable


def test_longest_seq_len_is_capped_at_the_models_positions(small):
    s = Setup(method="qlora", grad_ckpt=True)
    assert max_seq_len(small, s, 10**15) == small.config["max_position_embeddings"]


def test_find_gpu_returns_the_smallest_card_that_fits(seven_b):
    plans = find_gpu(seven_b, method="lora")
    usable = [p.usable_bytes for p in plans]
    assert usable == sorted(usable)
    first = next(i for i, p in enumerate(plans) if p.chosen is not None)
    assert all(p.chosen is None for p in plans[:first])
    assert all(p.chosen.setup.method == "lora" for p in plans[first:])
    assert plans[first].chosen.device_bytes <= plans[first].usable_bytes
    assert plans[first].device.total_bytes >= 16 * 10**9  # a 7B's bf16 weights alone are 13.5 GB


# --------------------------------------------------------------------------- the cost model


def test_full_fine_tuning_costs_about_6n_flops_per_token(seven_b):
    s = Setup(method="full", seq_len=128)
    main, fp32 = train_flops_per_token(seven_b, s, ())
    n = matmul_params(seven_b)
    assert fp32 == 0 and 6 * n < main < 6.1 * n  # attention at 128 tokens is a sliver


def test_lora_costs_two_thirds_of_full_and_checkpointing_adds_a_forward(seven_b):
    full = sum(train_flops_per_token(seven_b, Setup(method="full"), ()))
    lora = Setup(method="lora", precision="bf16-mixed", target_modules="all-linear")
    targets = resolve_targets(seven_b, lora)
    plain = sum(train_flops_per_token(seven_b, lora, targets))
    ckpt = sum(train_flops_per_token(seven_b, lora.with_(grad_ckpt=True), targets))
    assert 0.64 < plain / full < 0.70
    assert 1.4 < ckpt / plain < 1.55


def test_qlora_is_slower_than_lora_and_bigger_micro_batches_are_faster(seven_b):
    h100 = resolve_gpu("h100")
    lora = Setup(method="lora", target_modules="all-linear", micro_batch=1, grad_accum=16)
    qlora = lora.with_(method="qlora", precision="bf16-mixed")
    t = lambda s: seconds_per_token(seven_b, s, h100, resolve_targets(seven_b, s))
    assert t(qlora) > t(lora.with_(precision="bf16-mixed"))
    times = [t(lora.with_(micro_batch=mb, grad_accum=16 // mb)) for mb in (1, 2, 4, 8, 16)]
    assert times == sorted(times, reverse=True)


def test_paged_states_that_do_not_fit_beside_the_rest_page_at_every_step(small):
    h100 = resolve_gpu("h100")
    ev = planner.Evaluator(small)
    s = Setup(method="full", precision="bf16-true", optim="paged_adamw_8bit", micro_batch=2, grad_accum=2)
    bd, _ = ev.memory(s)
    paged = bd.components["optimizer_states_paged"]
    assert paged > 0
    roomy = ev.candidate(s, h100, bd.device_bytes + paged)
    tight = ev.candidate(s, h100, bd.device_bytes + paged // 3)
    assert roomy.fits and tight.fits and roomy.paging_bytes == 0
    assert tight.paging_bytes == paged - paged // 3
    # both ways over the host link, once per optimizer step
    extra = (tight.seconds_per_token - roomy.seconds_per_token) * s.tokens * s.grad_accum
    assert extra == pytest.approx(2 * tight.paging_bytes / planner.DEFAULT_COST.host_link_bytes_per_s)
    # bitsandbytes' unpaged 8-bit AdamW holds the same states inside the device figure
    unpaged = ev.candidate(s.with_(optim="adamw_bnb_8bit"), h100, bd.device_bytes + paged)
    assert unpaged.paged_bytes == 0 and unpaged.device_bytes >= bd.device_bytes + paged * 0.99


def test_fit_cost_model_recovers_known_constants(small, seven_b):
    truth = CostModel(mfu_max=0.37, layer_overhead_s=250e-6, dequant_bytes_per_param=11.0)
    h100 = resolve_gpu("h100")
    samples = []
    for spec in (small, seven_b):
        for method in ("lora", "qlora"):
            for mb, seq in ((1, 512), (4, 2048)):
                s = Setup(method=method, precision="bf16-mixed", target_modules="all-linear", micro_batch=mb,
                          seq_len=seq, grad_accum=1)
                tps = 1 / seconds_per_token(spec, s, h100, resolve_targets(spec, s), truth)
                samples.append((spec, s, h100, tps))
    fitted = fit_cost_model(samples)
    assert fitted.mfu_max == pytest.approx(0.37, rel=1e-6)
    assert fitted.layer_overhead_s == pytest.approx(250e-6, rel=1e-6)
    assert fitted.dequant_bytes_per_param == pytest.approx(11.0, rel=1e-6)
    assert "fitted on 8" in fitted.source
    with pytest.raises(VramfitError, match="at least"):
        fit_cost_model(samples[:1])


def test_fit_cost_model_separates_the_adapters_overhead_when_full_runs_are_given(small, seven_b):
    truth = CostModel(mfu_max=0.5, layer_overhead_s=900e-6, adapter_overhead_s=40e-6, dequant_bytes_per_param=30.0)
    h100 = resolve_gpu("h100")
    samples = []
    for spec in (small, seven_b):
        for method, precision in (("full", "bf16-true"), ("lora", "bf16-true"), ("qlora", "bf16-mixed")):
            for mb, seq in ((1, 512), (4, 2048)):
                s = Setup(method=method, precision=precision, micro_batch=mb, seq_len=seq, grad_accum=1,
                          **({} if method == "full" else {"target_modules": "all-linear"}))
                tps = 1 / seconds_per_token(spec, s, h100, resolve_targets(spec, s), truth)
                samples.append((spec, s, h100, tps))
    fitted = fit_cost_model(samples, base=CostModel(adapter_overhead_s=0.0))
    assert fitted.adapter_overhead_s == pytest.approx(40e-6, rel=1e-6)
    assert fitted.layer_overhead_s == pytest.approx(900e-6, rel=1e-6)
    assert fitted.dequant_bytes_per_param == pytest.approx(30.0, rel=1e-6)
    lora = [x for x in samples if x[1].method == "lora"]  # no full run: the adapter term is not identifiable
    assert fit_cost_model(lora, base=CostModel(adapter_overhead_s=5e-6)).adapter_overhead_s == 5e-6


def test_a_calibrated_cost_model_is_used_by_the_plan(small):
    slow = replace(planner.DEFAULT_COST, mfu_max=0.1, source="test")
    p = plan(small, "24GiB", cost=slow)
    assert p.cost_source == "test" and p.chosen.tokens_per_s < plan(small, "24GiB").chosen.tokens_per_s


# --------------------------------------------------------------------------- converters


def test_converters_give_the_kwargs_and_the_real_objects(seven_b, tmp_path):
    p = plan(seven_b, "12GiB")
    s = p.setup
    kw = p.to_training_arguments_kwargs()
    assert kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 16
    assert kw["gradient_checkpointing"] == s.grad_ckpt and kw["optim"] == s.optim
    assert kw["bf16"] == (s.autocast_dtype == "bfloat16") and kw["fp16"] is False
    assert p.to_sft_config_kwargs()["max_length"] == 2048
    assert p.to_lora_config_kwargs() == {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                                         "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    assert p.to_bnb_config_kwargs() == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                        "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
    args = p.training_arguments(str(tmp_path), report_to=[], use_cpu=True, optim="adamw_torch",
                                bf16=False, gradient_checkpointing=False)
    assert args.per_device_train_batch_size == s.micro_batch and args.gradient_accumulation_steps == s.grad_accum
    lora = p.lora_config()
    assert lora.r == 16 and lora.target_modules == "all-linear"
    assert p.bnb_config().load_in_4bit


def test_a_plan_with_levers_builds_the_real_sft_config_with_their_switches(small, tmp_path):
    p = plan(small, "80GiB", packing=True, tokens_per_batch=4096, seq_len=1024, liger=True,
             activation_offloading=True)
    s = p.setup
    assert (s.packing, s.micro_batch, s.liger, s.activation_offloading) == (True, 4, True, True)
    kw = p.to_sft_config_kwargs()
    assert {k: kw[k] for k in ("packing", "packing_strategy", "padding_free", "max_length", "activation_offloading",
                               "use_liger_kernel")} == {"packing": True, "packing_strategy": "bfd",
                                                        "padding_free": True, "max_length": 1024,
                                                        "activation_offloading": True, "use_liger_kernel": True}
    assert "packing" not in p.to_training_arguments_kwargs()  # TrainingArguments has no packing
    cfg = p.sft_config(str(tmp_path), report_to=[], use_cpu=True, bf16=False)
    assert cfg.packing and cfg.padding_free and cfg.packing_strategy == "bfd" and cfg.use_liger_kernel
    assert cfg.activation_offloading and cfg.max_length == 1024 and cfg.per_device_train_batch_size == 4
    plain = plan(small, "80GiB", seq_len=1024)
    assert not {"use_liger_kernel", "packing", "activation_offloading"} & set(plain.to_sft_config_kwargs())


def test_full_fine_tuning_plan_has_no_lora_or_bnb_config(small):
    p = plan(small, "80GiB", method="full")
    assert p.to_lora_config_kwargs() is None and p.to_bnb_config_kwargs() is None and p.lora_config() is None
    assert p.to_model_kwargs()["dtype"] == p.setup.param_dtype


def test_plan_json_is_plain_data(small):
    data = json.loads(json.dumps(plan(small, "24GiB").to_json()))
    assert data["chosen"]["fits"] and data["usable_bytes"] == data["budget_bytes"] - data["headroom_bytes"]
    assert data["searched"] >= 600 and isinstance(data["chosen"]["device_bytes"], int)


# --------------------------------------------------------------------------- the CLI


def test_plan_cli_prints_the_verdict_first():
    r = runner.invoke(app, ["plan", "llama-2-7b", "--gpu", "12GiB"])
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]
    assert "fits on" in first and "QLoRA" in first
    for word in ("best setups", "levers", "TrainingArguments", "LoraConfig", "BitsAndBytesConfig"):
        assert word in r.stdout


def test_plan_cli_json():
    r = runner.invoke(app, ["plan", SMALL, "--gpu", "24GB", "--json", "--seq-len", "1024", "--effective-batch", "8"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["seq_len"] == 1024 and data["effective_batch"] == 8
    assert data["budget_bytes"] == 24 * 10**9
    assert data["chosen"]["micro_batch"] * data["chosen"]["grad_accum"] == 8


def test_find_gpu_cli():
    r = runner.invoke(app, ["plan", "llama-2-7b", "--find-gpu", "--method", "qlora", "--json"])
    assert r.exit_code == 0, r.output
    gpus = json.loads(r.stdout)["gpus"]
    first = next(i for i, g in enumerate(gpus) if g["fits"])
    assert gpus[first]["chosen"]["method"] == "qlora" and not any(g["fits"] for g in gpus[:first])
    assert [g["usable_bytes"] for g in gpus] == sorted(g["usable_bytes"] for g in gpus)


@pytest.mark.parametrize("args, needle", [
    (["plan", SMALL, "--gpu", "rtx 9090"], "rtx-5090"),
    (["plan", SMALL, "--gpu", "12G"], "12GiB (binary"),
    (["plan", SMALL, "--gpu", "400MiB"], "CUDA context"),
    (["plan", "llama-2-7b", "--gpu", "4GiB"], "GiB over"),  # 6 GiB fits QLoRA without kbit prep
    (["plan", SMALL, "--gpu", "8GiB", "--headroom", "150%"], "headroom"),
    (["plan", SMALL, "--gpu", "8GiB", "--method", "full", "--lora-r", "8"], "--lora-r"),
    (["plan", SMALL, "--gpu", "8GiB", "--micro-batch", "3"], "does not divide"),
    (["plan", SMALL, "--gpu", "8GiB", "--find-gpu"], "drop --gpu"),
    (["plan", SMALL, "--gpu", "8GiB", "--target-modules", "c_attn"], "q_proj"),
])
def test_plan_bad_input_is_one_line_and_exit_code_2(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_nothing_fits_says_what_comes_closest_and_by_how_much():
    r = runner.invoke(app, ["plan", "llama-2-7b", "--gpu", "4GiB"])
    assert r.exit_code == 2
    assert "nothing fits" in r.stderr and "the smallest setup" in r.stderr and "QLoRA" in r.stderr


def test_auto_without_a_driver_says_to_use_gpu(monkeypatch):
    from tests.test_gpu import fake_pynvml

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error="Driver Not Loaded"))
    r = runner.invoke(app, ["plan", SMALL])
    assert r.exit_code == 2 and "no NVIDIA driver" in r.stderr and "--gpu" in r.stderr


def test_vramfit_plan_is_exported_lazily():
    code = "import sys, vramfit; assert callable(vramfit.plan); assert 'vramfit.planner.search' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_with_simulate_allocator_on_a_tiny_model_says_what_the_replay_did(tmp_path):
    """The capped replay rechecks the fast choice and its next-larger micro-batch; the JSON says
    the cap, what was checked and what changed, and a note says it in words.  Default plans carry
    no replay."""
    import json

    import vramfit
    from conftest import TINY_LLAMA

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    fast = vramfit.plan(str(cfg), gpu="1.1GB", seq_len=128, effective_batch=4)
    assert fast.replay is None and fast.to_json()["allocator_replay"] is None
    p = vramfit.plan(str(cfg), gpu="1.1GB", seq_len=128, effective_batch=4, simulate_allocator=True)
    rep = p.to_json()["allocator_replay"]
    assert rep["limit_bytes"] == p.usable_bytes - 520 * 2**20 - 238 * 2**20  # usable - context - kernels
    assert rep["checks"][0]["role"] == "chosen" and rep["checks"][0]["replay_fits"]
    assert rep["fast_choice"]["micro_batch"] == fast.chosen.setup.micro_batch
    assert rep["changed"] in (["nothing"], ["stepped_up"], ["larger_batch_fits"])
    assert any(n.startswith("allocator replay:") for n in p.notes)
    # whatever the replay did, the user's effective batch is kept
    assert p.chosen.setup.micro_batch * p.chosen.setup.grad_accum == 4
    if rep["changed"] == ["stepped_up"]:  # the next-larger micro-batch fit under the cap and is faster
        nl = [c for c in rep["checks"] if c["role"] == "next_larger"][0]
        assert not nl["fast_fits"] and nl["replay_fits"]
        assert p.chosen.setup.micro_batch == nl["setup"]["micro_batch"] > fast.chosen.setup.micro_batch
        assert p.chosen.tokens_per_s > fast.chosen.tokens_per_s
    if rep["changed"] == ["larger_batch_fits"]:  # beyond the effective batch: said, not taken
        assert p.chosen.setup == fast.chosen.setup
        assert any("--effective-batch" in n for n in p.notes)
    # what the plan says it needs is the replay's figure for the setup it chose
    from vramfit.planner.result import setup_json as _setup_json

    mine = [c for c in rep["checks"] if c["setup"] == _setup_json(p.chosen.setup) and c["replay_fits"]][-1]
    assert (p.chosen.device_bytes, p.chosen.peak_reserved_bytes) == (mine["device_bytes"], mine["peak_reserved_bytes"])
    assert p.candidates[0] == p.chosen and p.to_json()["chosen"]["device_bytes"] == mine["device_bytes"]


def test_recheck_keeps_the_effective_batch_when_the_replay_fits_beyond_it(tmp_path):
    """At accumulation 1 the fast model's next-larger micro-batch lies beyond the effective batch;
    a replay that fits it must not change the user's effective batch (the search keeps it)."""
    import json

    import vramfit
    from conftest import TINY_LLAMA

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    p = vramfit.plan(str(cfg), gpu="1.1GB", seq_len=64, effective_batch=2, simulate_allocator=True)
    rep = p.to_json()["allocator_replay"]
    nl = [c for c in rep["checks"] if c["role"] == "next_larger"][0]
    assert nl["setup"]["micro_batch"] > 2 and nl["setup"]["grad_accum"] == 1
    assert not nl["fast_fits"] and nl["replay_fits"]  # the case at issue: it fits under the cap
    assert (p.chosen.setup.micro_batch, p.chosen.setup.grad_accum) == (2, 1)
    assert rep["changed"] == ["larger_batch_fits"]
    assert any(f"--effective-batch {nl['setup']['micro_batch']}" in n for n in p.notes)


def test_capped_replay_is_cached_and_reports_oom_under_a_small_cap(tmp_path):
    import json

    from conftest import TINY_LLAMA
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.replay import capped_replay
    from vramfit.memory.setup import make_setup
    from vramfit.model.spec import load_spec

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    spec = load_spec(str(cfg))
    s = make_setup(method="full", seq_len=64, micro_batch=2, grad_accum=2)
    _, targets = estimate_setup(spec, s)
    free = capped_replay(spec, s, targets, 1 << 40)
    assert free["fits"] and not free["cached"] and free["num_alloc_retries"] == 0
    assert capped_replay(spec, s, targets, 1 << 40)["cached"]
    tight = capped_replay(spec, s, targets, free["peak_allocated_bytes"] // 2)
    assert tight["oom"] and not tight["fits"] and tight["oom_phase"] is not None and tight["num_alloc_retries"] >= 1


def test_lora_config_pins_all_linear_on_fused_experts():
    """peft's "all-linear" reaches Mixtral's fused 3-D expert weights (ParamWrapper, which refuses
    lora_dropout 0.05); the launcher's LoraConfig names the Linear layers vramfit models instead."""
    import peft
    import transformers

    from vramfit.planner.convert import lora_config

    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=64, num_local_experts=4)
    s = Setup(method="lora", lora_r=4, lora_dropout=0.05, target_modules="all-linear")
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="lora_dropout"):  # what the launcher hit before
        peft.get_peft_model(model, lora_config(s))
    lcfg = lora_config(s, transformers.AutoModelForCausalLM.from_config(cfg))
    spec_targets = {n.rsplit(".", 1)[-1] for n in resolve_targets(load_spec("mixtral-8x7b"), s)}
    assert set(lcfg.target_modules) == spec_targets
    wrapped = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(cfg), lcfg)
    assert {n.split(".")[-4] for n, _ in wrapped.named_parameters() if "lora_A" in n} == spec_targets
    dense = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64))
    assert lora_config(s, dense).target_modules == "all-linear"  # no fused experts: peft's meaning is vramfit's


def test_plan_replays_by_default_and_fast_or_env_skips_it(tmp_path, monkeypatch):
    """The replay recheck is the plan's default (VRAMFIT_REPLAY unset); replay=False, the CLI's
    --fast and VRAMFIT_REPLAY=0 (what the test suite sets) give the fast model's plan."""
    import json

    from typer.testing import CliRunner

    import vramfit
    from conftest import TINY_LLAMA
    from vramfit.cli import app

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    assert vramfit.plan(str(cfg), gpu="1.1GB", seq_len=128, effective_batch=4).replay is None  # VRAMFIT_REPLAY=0
    monkeypatch.delenv("VRAMFIT_REPLAY", raising=False)
    p = vramfit.plan(str(cfg), gpu="1.1GB", seq_len=128, effective_batch=4)
    assert p.replay is not None and p.replay["checks"][0]["role"] == "chosen"
    assert vramfit.plan(str(cfg), gpu="1.1GB", seq_len=128, effective_batch=4, replay=False).replay is None
    runner = CliRunner()
    args = ["plan", str(cfg), "--gpu", "1.1GB", "--seq-len", "128", "--effective-batch", "4", "--json"]
    got = json.loads(runner.invoke(app, args).stdout)
    assert got["allocator_replay"]["checks"][0]["role"] == "chosen"
    got = json.loads(runner.invoke(app, args + ["--fast"]).stdout)
    assert got["allocator_replay"] is None
    got = json.loads(runner.invoke(app, args + ["--simulate-allocator"]).stdout)  # accepted: the default
    assert got["allocator_replay"] is not None


def test_step_down_skips_setups_the_failed_replays_overshoot_rules_out(monkeypatch):
    """After a replay runs out of memory, setups whose fast figure scaled by that replay's overshoot
    is still over the budget are skipped; other allocator settings are always tried."""
    from types import SimpleNamespace as NS

    import vramfit.memory.replay as replay_mod
    from vramfit.planner.recheck import _next_to_try

    GiB = 1 << 30

    def cand(gib, allocator="default"):
        return NS(setup=NS(allocator=allocator), device_bytes=int(gib * GiB))

    fitting = [cand(10.5), cand(10.4), cand(10.2), cand(10.3, "expandable"), cand(9.0)]
    ev = NS(memory=lambda setup: (None, ()))
    monkeypatch.setattr(replay_mod, "capped_replay", lambda *a, **k: {"device_bytes": int(11.55 * GiB)})  # x1.1
    assert _next_to_try(None, ev, fitting, 0, {}, int(10.62 * GiB), None) == (3, 2)  # 10.4, 10.2 x 1.1 > 10.62
    assert _next_to_try(None, ev, fitting, 3, {}, int(10.62 * GiB), None)[0] == 4
    monkeypatch.setattr(replay_mod, "capped_replay", lambda *a, **k: {"device_bytes": int(10.5 * GiB)})  # no overshoot
    assert _next_to_try(None, ev, fitting, 0, {}, int(10.62 * GiB), None) == (1, 0)


def test_step_down_skips_other_optimizers_of_a_setup_that_ran_out_before_its_first_step(monkeypatch):
    """A replay that runs out of memory before the first optimizer step (load, step 0's forward or
    backward) rules out the same setup under every other optimizer with the same allocator settings,
    wherever they stand in the ranking; past the first step the optimizer matters and nothing is ruled out."""
    from types import SimpleNamespace as NS

    import vramfit.memory.replay as replay_mod
    from vramfit.memory.setup import Setup
    from vramfit.planner.recheck import _before_optimizer, _next_to_try

    GiB = 1 << 30
    base = Setup(method="lora", micro_batch=4, grad_accum=4, grad_ckpt=True, optim="adamw_torch_fused")
    other = Setup(method="lora", micro_batch=2, grad_accum=8, grad_ckpt=True, optim="adamw_torch_fused")
    fitting = [NS(setup=s, device_bytes=int(9 * GiB)) for s in
               (base, base.with_(optim="paged_adamw_32bit"), base.with_(allocator="expandable"),
                base.with_(optim="adafactor"), other, base.with_(optim="sgd", lora_r=8))]
    ev = NS(memory=lambda setup: (None, ()))
    monkeypatch.setattr(replay_mod, "capped_replay", lambda *a, **k: {"device_bytes": int(9 * GiB)})  # no overshoot
    usable = int(10 * GiB)
    assert _next_to_try(None, ev, fitting, 0, {}, usable, None) == (1, 0)  # nothing ruled out
    assert _next_to_try(None, ev, fitting, 0, {}, usable, None, (base,)) == (2, 1)  # paged_adamw_32bit skipped
    # the expandable twin ran out too: adafactor (native) is skipped as base's twin, the other micro-batch tried
    assert _next_to_try(None, ev, fitting, 2, {}, usable, None, (base, fitting[2].setup)) == (4, 1)
    assert _next_to_try(None, ev, fitting, 4, {}, usable, None, (base,)) == (5, 0)  # sgd at another rank differs
    assert _before_optimizer("step0.backward") and _before_optimizer("load") and _before_optimizer("after_load")
    assert _before_optimizer("step0.micro1.forward") and _before_optimizer("step0.clip")
    assert not _before_optimizer("step0.optimizer") and not _before_optimizer("step1.forward")
    assert not _before_optimizer(None) and not _before_optimizer("step0.post_step")
