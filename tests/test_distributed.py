"""Per-GPU memory on N GPUs (vramfit.memory.distributed), --gpus planning (vramfit.planner.multigpu) and the
accelerate launch (vramfit.run.launch): invariants of the memory model, the planner's choice when one
GPU is not enough, the configs accelerate reads, the bad-input lines, and a real 2-process run."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from tiny_lm import alpaca_rows, make_model_dir, write_jsonl
from typer.testing import CliRunner

from vramfit.cli import app
from vramfit.memory.distributed import NCCL_DEVICE_BYTES, estimate_distributed, get_strategy, shard_terms
from vramfit.memory.fsdp import fsdp_shard_numel
from vramfit.memory.zero import ZERO_REDUCE_BUCKET
from vramfit.errors import VramfitError
from vramfit.memory.walk import _grad_totals, optimizer_state_bytes, trainable_tensors
from vramfit.memory.setup import make_setup, resolve_targets

runner = CliRunner()
GiB = 1 << 30


def full(precision="bf16-true", **kw):
    return make_setup(method="full", precision=precision, optim="adamw_torch", seq_len=1024, **kw)


# --------------------------------------------------------------------------- the memory model


def test_fsdp_shard_numel_is_each_tensors_padded_dim0_chunk(llama1b):
    # FSDP2 chunks every parameter on dim 0; each rank's chunk is ceil(rows / N) rows
    assert fsdp_shard_numel(llama1b, 1) == llama1b.params_total
    by_hand = sum(count * math.ceil(shape[0] / 3) * math.prod(shape[1:]) for shape, count, _ in llama1b.param_shapes)
    assert fsdp_shard_numel(llama1b, 3) == by_hand
    # 128256 embedding rows do not divide by 7: padding makes the shard larger than total / 7
    assert fsdp_shard_numel(llama1b, 7) > llama1b.params_total / 7


@pytest.mark.parametrize("n", [2, 4, 8])
def test_fsdp_full_shard_gathers_the_tail_at_the_loss_and_two_layers_inside_them(llama8b, n):
    s = full("bf16-true")
    sh = shard_terms(llama8b, s, (), get_strategy("fsdp-full"), n)
    weights = dict(sh.weights)
    assert weights == {"weights_bfloat16_sharded": int(2 * llama8b.params_total * fsdp_shard_numel(llama8b, n)
                                                       / llama8b.params_total)}
    roles = llama8b.params_by_role
    tail = roles["lm_head"] + llama8b.hidden_size  # accelerate's [final norm, LM head] unit (untied)
    layer = (llama8b.params_total - roles["embeddings"] - tail) / llama8b.num_layers
    gathered = {k: v.get("fsdp_gathered_params", 0) for k, v in sh.held.items()}
    # at the loss: the tail and its own all-gather output, held to the root's post-forward
    assert gathered["forward_loss"] == pytest.approx(2 * 2 * tail, rel=1e-6)
    # inside the layers: the running layer and its (forward) or the next one's (backward) all-gather output
    assert gathered["forward_layer"] == gathered["backward_top"] == pytest.approx(2 * 2 * layer, rel=1e-6)
    assert gathered["backward_loss"] == pytest.approx(2 * tail, rel=1e-6)
    assert sh.optimizer == math.ceil(optimizer_state_bytes(trainable_tensors(llama8b, s, ()), s) / n)


def test_shard_grad_op_keeps_every_layer_gathered_through_backward(llama8b):
    s = full("bf16-true")
    op = shard_terms(llama8b, s, (), get_strategy("fsdp-grad-op"), 4)
    fs = shard_terms(llama8b, s, (), get_strategy("fsdp-full"), 4)
    top = lambda sh: sh.held["backward_top"]["fsdp_gathered_params"]  # noqa: E731
    assert top(op) - top(fs) > 0.8 * 2 * llama8b.params_total * 0.8
    assert op.weights == fs.weights and op.optimizer == fs.optimizer


def test_zero2_partitions_gradients_and_states_but_not_the_bf16_weights(llama8b):
    s = full("bf16-mixed")
    n = 4
    sh = shard_terms(llama8b, s, (), get_strategy("zero2"), n)
    p = llama8b.params_total
    assert dict(sh.weights) == {"weights_bfloat16": 2 * p}
    assert sh.grads["backward_end"] == math.ceil(2 * p / n)  # the bf16 partition
    # overlap_comm: two ipg buckets of reduce_bucket_size bf16 elements through the backward only
    assert sh.held["backward_top"]["zero_ipg_buckets"] == 2 * 2 * ZERO_REDUCE_BUCKET
    assert "zero_ipg_buckets" not in sh.held.get("forward_loss", {}) and not sh.held.get("optimizer")
    assert sh.optimizer == math.ceil(12 * p / n)  # fp32 master + AdamW's two fp32 states
    z1 = shard_terms(llama8b, s, (), get_strategy("zero1"), n)
    assert z1.grads["backward_end"] == 2 * p and z1.optimizer == sh.optimizer


def test_offload_moves_master_weights_states_and_fp32_grads_to_the_host(llama8b):
    s = full("bf16-mixed")
    on = shard_terms(llama8b, s, (), get_strategy("zero2"), 2)
    off = shard_terms(llama8b, s, (), get_strategy("zero2-offload"), 2)
    assert off.optimizer == 0 and off.grads["optimizer"] == 0
    # stage 3 too: the fp32 gradient partition is on the host at the step, not also on the GPU
    z3_off = shard_terms(llama8b, s, (), get_strategy("zero3-offload"), 2)
    assert z3_off.grads["optimizer"] == 0 and dict(z3_off.host_named)["fp32_gradient_partition"] > 0
    assert shard_terms(llama8b, s, (), get_strategy("zero3"), 2).grads["optimizer"] > 0
    assert dict(off.host_named)["optimizer_master_and_states"] == on.optimizer
    assert off.host_bytes == on.optimizer + math.ceil(4 * llama8b.params_total / 2)
    est = estimate_distributed(llama8b, s, "zero2-offload", 2)
    assert est.host_bytes == 2 * est.host_bytes_per_rank
    assert est.device_bytes < estimate_distributed(llama8b, s, "zero2", 2).device_bytes - 50 * GiB
    z3 = estimate_distributed(llama8b, s, "zero3-offload", 2)
    assert z3.host_bytes > est.host_bytes  # the bf16 parameter partitions as well


def test_ddp_is_the_single_gpu_step_plus_a_bucket_copy_of_the_gradients_and_nccl(llama1b):
    from vramfit.memory.estimate import estimate_setup

    s = full("bf16-true", micro_batch=2)
    single, _ = estimate_setup(llama1b, s)
    d = estimate_distributed(llama1b, s, "ddp", 2)
    grads = _grad_totals(trainable_tensors(llama1b, s, ()))[0]
    assert d.peak_allocated_bytes == single.peak_allocated_bytes + grads
    assert d.device_bytes >= single.device_bytes + grads + NCCL_DEVICE_BYTES
    assert d.breakdown.components["ddp_gradient_buckets"] == grads


def test_one_gpu_ddp_is_exactly_the_single_gpu_estimate(llama1b):
    from vramfit.memory.estimate import estimate_setup

    s = make_setup(method="lora", seq_len=512, micro_batch=2)
    single, _ = estimate_setup(llama1b, s)
    one = estimate_distributed(llama1b, s, "ddp", 1)
    assert (one.peak_allocated_bytes, one.device_bytes, one.breakdown.components) == \
        (single.peak_allocated_bytes, single.device_bytes, single.components)
    assert one.comm_bytes_per_step == 0 and one.host_bytes == 0


@pytest.mark.parametrize("strategy", ["fsdp-full", "zero3", "zero2"])
def test_per_gpu_memory_of_full_fine_tuning_falls_as_gpus_are_added(llama8b, strategy):
    s = full("bf16-mixed")
    peaks = [estimate_distributed(llama8b, s, strategy, n).peak_allocated_bytes for n in (2, 4, 8)]
    assert peaks[0] > peaks[1] > peaks[2]


def test_fsdp_qlora_shards_the_packed_weights_and_keeps_the_quant_constants_on_every_rank(llama8b):
    s = make_setup(method="qlora", seq_len=1024)
    targets = resolve_targets(llama8b, s)
    two = dict(shard_terms(llama8b, s, targets, get_strategy("fsdp-full"), 2).weights)
    four = dict(shard_terms(llama8b, s, targets, get_strategy("fsdp-full"), 4).weights)
    assert four["weights_4bit_sharded"] == pytest.approx(two["weights_4bit_sharded"] / 2, abs=1)
    assert four["weights_4bit_quant_constants"] == two["weights_4bit_quant_constants"] > 0
    # bnb_4bit_quant_storage=bfloat16: the unquantized parameters stay bf16 (not fp32) under FSDP
    assert "weights_bfloat16_unquantized_sharded" in two


def test_deepspeed_refuses_what_it_cannot_run(llama1b):
    with pytest.raises(VramfitError, match="adamw_torch"):
        estimate_distributed(llama1b, make_setup(method="lora", optim="paged_adamw_8bit"), "zero2", 2)
    with pytest.raises(VramfitError, match="bf16-mixed"):
        estimate_distributed(llama1b, make_setup(method="lora", precision="16-true"), "zero3", 2)
    with pytest.raises(VramfitError, match="unknown strategy 'zero4'.*zero3"):
        estimate_distributed(llama1b, make_setup(method="lora"), "zero4", 2)


def test_estimate_cli_reports_per_gpu_and_host_bytes(tmp_path):
    r = runner.invoke(app, ["estimate", "llama-3.1-8b", "--method", "full", "--precision", "bf16-mixed",
                            "--gpus", "2", "--strategy", "zero3-offload", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["strategy"] == "zero3-offload" and d["gpus"] == 2
    assert d["per_gpu"]["device_bytes"] == d["device_bytes"] < 40 * GiB
    assert d["host_bytes"] == 2 * d["host_bytes_per_rank"] > 100 * GiB
    r = runner.invoke(app, ["estimate", "llama-3.1-8b", "--gpus", "2", "--strategy", "fsdp-ful"])
    assert r.exit_code == 2 and "did you mean fsdp-full" in r.output


# --------------------------------------------------------------------------- --gpus and the planner


def test_gpus_forms_parse_count_card_and_link():
    from vramfit.planner.multigpu import resolve_gpus

    g = resolve_gpus("2xh100-sxm")
    assert (g.count, g.device.key, g.link_bytes_per_s) == (2, "h100-sxm", 450_000_000_000)
    g = resolve_gpus("4x24GiB")
    assert (g.count, g.device.total_bytes, g.source) == (4, 24 * GiB, "size")
    for bad in ("x24GB", "0xh100", "2xnocard"):
        with pytest.raises(VramfitError):
            resolve_gpus(bad)


def fake_probe(monkeypatch, names):
    from vramfit.planner import gpu

    h100 = gpu.load_profiles()["h100-sxm"]
    devices = tuple(replace(h100, name=n, source="probe", index=i, throughput_from="h100-sxm", key=None)
                    for i, n in enumerate(names))
    monkeypatch.setattr(gpu, "probe", lambda: gpu.Probe("580", "13.0", devices))


def test_gpus_auto_takes_every_probed_gpu_and_refuses_mismatched_or_too_many(monkeypatch):
    from vramfit.planner.multigpu import resolve_gpus

    fake_probe(monkeypatch, ["NVIDIA H100 80GB HBM3"] * 2)
    assert resolve_gpus("auto").count == 2
    with pytest.raises(VramfitError, match="--gpus 4: this machine has 2 GPUs"):
        resolve_gpus("4")
    fake_probe(monkeypatch, ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])
    with pytest.raises(VramfitError, match="mismatched GPUs"):
        resolve_gpus("auto")


def test_planner_shards_full_fine_tuning_that_one_gpu_cannot_hold(llama8b):
    from vramfit.planner.multigpu import plan_gpus
    from vramfit.planner.search import plan

    with pytest.raises(VramfitError):  # bf16-mixed full fine-tuning of 8B: ~160 GB on one card
        plan(llama8b, "80GiB", method="full", precision="bf16-mixed", optim="adamw_torch")
    p = plan_gpus(llama8b, "4x80GiB", method="full", precision="bf16-mixed", optim="adamw_torch",
                  installed_only=False)
    assert p.chosen.strategy != "ddp" and get_strategy(p.chosen.strategy).sharded
    assert p.chosen.device_bytes <= p.usable_bytes
    by = {c.strategy: c for c in p.by_strategy}
    assert not by["ddp"].fits  # replicated states do not fit either
    assert p.chosen.setup.micro_batch * p.chosen.setup.grad_accum * 4 == p.effective_batch


def test_train_without_a_complete_setup_asks_the_planner_for_setup_and_strategy(llama1b, monkeypatch):
    from vramfit.run.launch import choose

    fake_probe(monkeypatch, ["NVIDIA H100 80GB HBM3"] * 2)
    s, strategy, p = choose(llama1b, {"method": "full", "precision": "bf16-mixed"}, 2048, 2, None, "5%", None)
    assert p is not None and p.gpus.count == 2 and strategy == p.chosen.strategy
    assert (s.method, s.precision) == ("full", "bf16-mixed")
    assert s.micro_batch * s.grad_accum * 2 == 16  # the default effective batch over both GPUs
    given = {"method": "lora", "precision": "bf16-true", "optim": "adamw_torch", "micro_batch": 2, "grad_accum": 4,
             "grad_ckpt": False}
    s, strategy, p = choose(llama1b, given, 512, 2, "fsdp-full", "5%", None)
    assert p is None and strategy == "fsdp-full" and s.micro_batch == 2


def test_planner_skips_strategies_whose_package_is_missing(llama1b, monkeypatch):
    from vramfit.planner import multigpu

    real = multigpu.importlib.util.find_spec  # only DeepSpeed missing (peft asks it about bitsandbytes too)
    monkeypatch.setattr(multigpu.importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    p = multigpu.plan_gpus(llama1b, "2x24GiB", method="lora")
    assert {c.strategy for c in p.by_strategy} <= {"ddp", "fsdp-full", "fsdp-grad-op"}
    assert any(n == "zero3" and "pip install deepspeed" in w for n, w in p.skipped)
    with pytest.raises(VramfitError, match="needs DeepSpeed, which is not installed"):
        multigpu.plan_gpus(llama1b, "2x24GiB", strategy="zero3")
    r = runner.invoke(app, ["plan", "llama-3.2-1b", "--gpus", "2x24GiB", "--strategy", "zero2"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "deepspeed" in r.output


def test_plan_cli_with_gpus_names_the_strategy(tmp_path):
    r = runner.invoke(app, ["plan", "qwen2.5-0.5b", "--gpus", "2xh100-sxm", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["gpus"] == 2 and d["chosen"]["strategy"] in ("ddp", "fsdp-full", "fsdp-grad-op", "zero1", "zero2",
                                                          "zero3", "zero2-offload", "zero3-offload")
    assert d["link_bytes_per_s"] == 450_000_000_000


# --------------------------------------------------------------------------- the launch


@pytest.mark.parametrize("strategy", ["ddp", "fsdp-full", "fsdp-grad-op", "zero2", "zero3-offload"])
def test_written_accelerate_config_loads_with_accelerates_own_class(tmp_path, strategy):
    from accelerate.commands.config.config_args import ClusterConfig

    from vramfit.run.launch import write_configs

    s = make_setup(method="lora", precision="bf16-mixed")
    path = write_configs(tmp_path, strategy, 2, s)
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes == 2
    st = get_strategy(strategy)
    if st.engine == "ddp":
        assert str(cfg.distributed_type).endswith("MULTI_GPU") and cfg.mixed_precision == "bf16"
    elif st.engine == "fsdp":
        assert str(cfg.distributed_type).endswith("FSDP")
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_reshard_after_forward"] is st.reshard_after_forward
    else:
        assert str(cfg.distributed_type).endswith("DEEPSPEED")
        ds = json.loads(Path(cfg.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == st.zero_stage
        assert ("offload_optimizer" in ds["zero_optimization"]) is st.offload_optimizer
        assert ds["zero_optimization"]["reduce_bucket_size"] == ZERO_REDUCE_BUCKET


@pytest.mark.parametrize("strategy", ["fsdp-full", "fsdp-grad-op"])
def test_accelerate_launch_turns_the_fsdp_config_into_the_plugin_we_model(tmp_path, strategy, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from vramfit.run.launch import launch_env, write_configs

    env = launch_env(write_configs(tmp_path, strategy, 2, make_setup(method="full", precision="bf16-mixed")))
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is get_strategy(strategy).reshard_after_forward


def test_qlora_under_fsdp_uses_fsdp1_flat_parameters(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    from vramfit.run.launch import write_configs

    path = write_configs(tmp_path, "fsdp-grad-op", 2, make_setup(method="qlora"))
    cfg = ClusterConfig.from_yaml_file(str(path)).fsdp_config
    assert cfg["fsdp_version"] == 1 and cfg["fsdp_sharding_strategy"] == "SHARD_GRAD_OP"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    return make_model_dir(d / "model"), write_jsonl(d / "alpaca.jsonl", alpaca_rows(24)), d


TRAIN = ["--method", "lora", "--precision", "32-true", "--optim", "adamw_torch", "--micro-batch", "2",
         "--grad-accum", "1", "--no-grad-ckpt", "--max-steps", "3"]


def test_train_with_more_gpus_than_exist_is_one_line_and_exit_2(tiny, monkeypatch):
    model, data, d = tiny
    fake_probe(monkeypatch, ["NVIDIA H100 80GB HBM3"])
    r = runner.invoke(app, ["train", str(model), str(data), "--out", str(d / "x"), "--gpus", "2", "--strategy",
                            "ddp", *TRAIN])
    assert r.exit_code == 2 and "--gpus 2: this machine has 1 GPU" in r.output
    assert not (d / "x").exists()
    r = runner.invoke(app, ["train", str(model), str(data), "--out", str(d / "x"), "--gpus", "2", "--strategy",
                            "fsdp-full", "--cpu", *TRAIN])
    assert r.exit_code == 2 and "DDP over gloo only" in r.output


def test_plan_with_mismatched_gpus_and_train_with_a_missing_engine_are_one_line_and_exit_2(tiny, monkeypatch):
    model, data, d = tiny
    fake_probe(monkeypatch, ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])
    r = runner.invoke(app, ["plan", "llama-3.2-1b", "--gpus", "auto"])
    assert r.exit_code == 2 and "mismatched GPUs: 0: NVIDIA H100 80GB HBM3, 1: NVIDIA A100-SXM4-40GB" in r.output
    from vramfit.planner import multigpu

    real = multigpu.importlib.util.find_spec
    monkeypatch.setattr(multigpu.importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    r = runner.invoke(app, ["train", str(model), str(data), "--out", str(d / "z"), "--gpus", "2", "--strategy",
                            "zero3", *TRAIN])
    assert r.exit_code == 2 and "zero3 needs DeepSpeed, which is not installed" in r.output
    assert not (d / "z").exists()


def test_two_cpu_processes_train_ddp_with_a_timeline_per_rank(tiny):
    """A real launch: torch.distributed.run, 2 processes, gloo, vramfit's training path in each."""
    model, data, d = tiny
    out = d / "ddp-run"
    r = runner.invoke(app, ["train", str(model), str(data), "--out", str(out), "--gpus", "2", "--strategy", "ddp",
                            "--cpu", *TRAIN])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "run_report.json").read_text())
    assert rep["gpus"] == 2 and rep["strategy"] == "ddp" and rep["steps"] == 3
    assert len(rep["measured_per_rank"]) == 2
    for rank in (0, 1):
        lines = [json.loads(x) for x in (out / f"memory_timeline.rank{rank}.jsonl").read_text().splitlines()]
        assert lines[0]["kind"] == "start" and lines[-1]["kind"] == "summary"
    assert (out / "adapter" / "adapter_config.json").is_file()
    cfg = (out / "launch" / "accelerate_config.yaml").read_text()
    assert "distributed_type: MULTI_CPU" in cfg and "num_processes: 2" in cfg


# --------------------------------------------------------------------------- several machines


def test_gpus_nodes_by_gpus_parse_and_price_the_link_between_machines_apart():
    from vramfit.planner.multigpu import communication_seconds, inter_node_bytes, resolve_gpus

    one, two = resolve_gpus("16xh100-sxm"), resolve_gpus("2x8xh100-sxm")
    assert two.count == 16 and two.nodes == 2 and two.per_node == 8 and "2 nodes x 8 x" in two.label
    assert one.nodes == 1 and inter_node_bytes(10**9, one) == 0
    # hierarchical: each GPU carries 1/8 of the (M-1)/M share over its NIC
    assert inter_node_bytes(15 * 10**9, two) == int(15e9 * 0.5 / (15 / 16) / 8)
    assert communication_seconds(10**10, two) > communication_seconds(10**10, one)
    with pytest.raises(VramfitError):
        resolve_gpus("0x8xh100-sxm")


def test_plan_on_two_machines_searches_16_ranks_and_says_the_inter_node_link(tmp_path):
    r = runner.invoke(app, ["plan", "llama-3.1-8b", "--gpus", "2x8xh100-sxm", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["gpus"] == 16 and d["nodes"] == 2 and d["inter_node_bytes_per_s"] > 0


def test_train_gpus_forms_and_node_options_are_checked():
    from vramfit.run.launch import make_nodes, parse_gpus

    assert parse_gpus("2x8") == (2, 8) and parse_gpus(4) == (1, 4) and parse_gpus("1x2") == (1, 2)
    for bad in ("0x8", "x", "2x0", "8xh100"):
        with pytest.raises(VramfitError):
            parse_gpus(bad)
    assert make_nodes(1, None, None) is None
    with pytest.raises(VramfitError, match="--node-rank"):
        make_nodes(2, None, "10.0.0.1")
    with pytest.raises(VramfitError, match="0..1"):
        make_nodes(2, 2, "10.0.0.1")
    with pytest.raises(VramfitError, match="several machines"):
        make_nodes(1, 1, "10.0.0.1")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp-full"])
def test_multi_node_config_loads_through_accelerates_own_classes(tmp_path, strategy):
    """What `accelerate launch --config_file` on machine 1 of 2 reads: accelerate's ClusterConfig and its
    launcher's own validation see 2 machines, this one's rank, the main machine's address, 16 processes."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from vramfit.memory.setup import make_setup
    from vramfit.run.launch import Nodes, launch_command, write_configs

    nodes = Nodes(2, 1, "10.1.2.3", 29501)
    path = write_configs(tmp_path, strategy, 16, make_setup(method="full", precision="bf16-mixed"), nodes=nodes)
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert (cfg.num_machines, cfg.machine_rank, cfg.main_process_ip, cfg.main_process_port, cfg.num_processes) == \
        (2, 1, "10.1.2.3", 29501, 16)
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "t.py"]))
    assert (args.num_machines, args.machine_rank, args.main_process_ip, args.num_processes) == (2, 1, "10.1.2.3", 16)
    cmd = launch_command(path, tmp_path / "launch.json", 16, nodes=nodes)
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and cmd[cmd.index("--num_machines") + 1] == "2"
    cpu = launch_command(path, tmp_path / "launch.json", 2, cpu=True, nodes=Nodes(2, 0, "127.0.0.1", 29502))
    assert cpu[cpu.index("--nnodes") + 1] == "2" and cpu[cpu.index("--nproc_per_node") + 1] == "1"


def test_two_machines_of_one_cpu_process_each_train_end_to_end(tiny):
    """Two local processes as two machines (node ranks 0 and 1, gloo over 127.0.0.1): vramfit train
    --gpus 2x1 --node-rank R --main-host 127.0.0.1 on each, the main one writes the run report."""
    import socket
    import subprocess
    import sys

    model, data, d = tiny
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**__import__("os").environ, "MASTER_PORT": str(port)}
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "vramfit", "train", str(model), str(data), "--out", str(d / f"node{rank}"),
               "--gpus", "2x1", "--strategy", "ddp", "--cpu", "--node-rank", str(rank), "--main-host", "127.0.0.1",
               *TRAIN]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rep = json.loads((d / "node0" / "run_report.json").read_text())
    assert rep["gpus"] == 2 and rep["steps"] == 3 and len(rep["measured_per_rank"]) == 2
    cfg = (d / "node1" / "launch" / "accelerate_config.yaml").read_text()
    assert "num_machines: 2" in cfg and "machine_rank: 1" in cfg and "main_process_ip: 127.0.0.1" in cfg
    assert (d / "node1" / "memory_timeline.rank1.jsonl").is_file()
    assert "the run report is on the main machine" in outs[1]
