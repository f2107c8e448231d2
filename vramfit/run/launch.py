"""`vramfit train --gpus N`: the accelerate config for the chosen strategy, `accelerate launch`, one
training process per GPU.

A recipe in two halves:
  parent (`launch`): check the GPUs and packages, choose the setup (the user's, or `plan_gpus`),
      predict each GPU's memory, write OUT/launch/{accelerate_config.yaml, deepspeed_config.json,
      launch.json}, and run `accelerate launch --config_file ... -m vramfit.run.launch OUT/launch/launch.json`.
  child (`run_rank`, once per rank): the same training path as `vramfit train` (vramfit.run.train's
      model, tokenizer, data, SFTConfig and LoRA config), under the engine accelerate sets up; a
      MemoryTracker per rank writes OUT/memory_timeline.rank<r>.jsonl; rank 0 gathers every rank's
      peaks into OUT/run_report.json.
No distributed code of our own: DDP, FSDP2 and DeepSpeed come from torch / deepspeed through
accelerate.  Not in a multi-GPU run: the OOM fall-back (the ranks would have to agree on it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from vramfit.memory.distributed import check_combination, get_strategy
from vramfit.memory.zero import (
    ZERO3_MAX_LIVE_PARAMETERS,
    ZERO3_MAX_REUSE_DISTANCE,
    ZERO3_PERSISTENCE_THRESHOLD,
    ZERO3_PREFETCH_BUCKET,
    ZERO_ALLGATHER_BUCKET,
    ZERO_OVERLAP_COMM,
    ZERO_REDUCE_BUCKET,
)
from vramfit.errors import VramfitError

LAUNCH_DIR = "launch"
CONFIG_NAME, DS_CONFIG_NAME, LAUNCH_NAME = "accelerate_config.yaml", "deepspeed_config.json", "launch.json"


def timeline_name(rank: int) -> str:
    return f"memory_timeline.rank{rank}.jsonl"


# --------------------------------------------------------------------------- machines

# The rendezvous port on the main machine when none is given (nor MASTER_PORT): accelerate's and
# torchrun's default.
DEFAULT_MAIN_PORT = 29500


@dataclass(frozen=True)
class Nodes:
    """The machines of a run: how many, this one's rank, where rank 0's machine listens."""

    count: int = 1
    rank: int = 0
    main_host: str = "127.0.0.1"
    port: int = DEFAULT_MAIN_PORT


def parse_gpus(text) -> tuple[int, int]:
    """`--gpus` of vramfit train: N (GPUs of this machine) or MxN (M machines of N GPUs) -> (M, N)."""
    raw = str(text).strip().lower()
    m = re.fullmatch(r"(?:(\d+)\s*[x*]\s*)?(\d+)", raw)
    if not m or int(m.group(2)) < 1 or (m.group(1) is not None and int(m.group(1)) < 1):
        raise VramfitError(f"--gpus must be N (GPUs of this machine) or MxN (M machines of N GPUs), got {text!r}")
    return int(m.group(1) or 1), int(m.group(2))


def make_nodes(count: int, node_rank: int | None, main_host: str | None, port: int | None = None) -> Nodes | None:
    """Several machines need this one's rank and the main machine's address; one needs neither."""
    if count <= 1:
        if node_rank not in (None, 0) or main_host:
            raise VramfitError("--node-rank and --main-host are for several machines: --gpus MxN (2x8)")
        return None
    if node_rank is None or not main_host:
        raise VramfitError(f"--gpus {count} machines: give --node-rank (0..{count - 1}, 0 on the main machine) and "
                           f"--main-host (the main machine's address, the same on every machine)")
    if not 0 <= node_rank < count:
        raise VramfitError(f"--node-rank must be 0..{count - 1} for {count} machines, got {node_rank}")
    return Nodes(count, node_rank, main_host, port or int(os.environ.get("MASTER_PORT") or DEFAULT_MAIN_PORT))


# --------------------------------------------------------------------------- configs


def mixed_precision(s) -> str:
    """accelerate's mixed_precision for a setup: autocast only for the -mixed precisions."""
    return {"bfloat16": "bf16", "float16": "fp16"}.get(s.autocast_dtype or "", "no")


def deepspeed_config(strategy: str) -> dict:
    """The DeepSpeed JSON: batch sizes, clipping and bf16 left "auto" for the Trainer to fill, the
    ZeRO sizes written out (the values vramfit.memory.zero models)."""
    st = get_strategy(strategy)
    zero = {"stage": st.zero_stage, "overlap_comm": ZERO_OVERLAP_COMM, "contiguous_gradients": True,
            "reduce_bucket_size": ZERO_REDUCE_BUCKET, "allgather_bucket_size": ZERO_ALLGATHER_BUCKET}
    if st.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ZERO3_PREFETCH_BUCKET,
                    stage3_max_live_parameters=ZERO3_MAX_LIVE_PARAMETERS,
                    stage3_max_reuse_distance=ZERO3_MAX_REUSE_DISTANCE,
                    stage3_param_persistence_threshold=ZERO3_PERSISTENCE_THRESHOLD,
                    stage3_gather_16bit_weights_on_model_save=True)
    if st.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if st.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "bf16": {"enabled": "auto"}, "zero_optimization": zero}
    if st.offload_optimizer:
        # the Trainer's torch AdamW stepped on the host copies: no DeepSpeedCPUAdam to compile
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def accelerate_config(strategy: str, gpus: int, s, cpu: bool = False, deepspeed_file: str | None = None,
                      layer_cls: str | None = None, nodes: Nodes | None = None) -> dict:
    """The accelerate config (what `accelerate config` would write) for `strategy` on `gpus`
    processes in all; `nodes`: the machines, this one's rank and the main one's address."""
    st = get_strategy(strategy)
    cfg = {"compute_environment": "LOCAL_MACHINE", "machine_rank": 0, "num_machines": 1, "num_processes": gpus,
           "main_training_function": "main", "rdzv_backend": "static", "same_network": True, "use_cpu": cpu,
           "debug": False, "downcast_bf16": "no", "tpu_env": [], "tpu_use_cluster": False, "tpu_use_sudo": False}
    if nodes is not None and nodes.count > 1:
        cfg.update(num_machines=nodes.count, machine_rank=nodes.rank, main_process_ip=nodes.main_host,
                   main_process_port=nodes.port)
    if st.engine == "ddp":
        cfg.update(distributed_type="MULTI_CPU" if cpu else "MULTI_GPU", mixed_precision=mixed_precision(s))
        if not cpu:
            cfg["gpu_ids"] = "all"
        return cfg
    if st.engine == "fsdp":
        fsdp = {"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_cpu_ram_efficient_loading": False,
                "fsdp_offload_params": False, "fsdp_state_dict_type": "FULL_STATE_DICT",
                "fsdp_activation_checkpointing": False}
        if layer_cls:
            fsdp["fsdp_transformer_layer_cls_to_wrap"] = layer_cls
        if s.method == "qlora" and mixed_precision(s) == "no":
            raise VramfitError(f"QLoRA under FSDP needs autocast: {s.precision} has none, and peft's LoRA layers "
                               "then meet fp32 inputs (transformers#30914, 'expected mat1 and mat2 to have the same "
                               "dtype', measured through the fake process group); use --amp bf16 (bf16-amp)")
        if s.method == "qlora":  # peft's FSDP-QLoRA recipe: FSDP1, flat parameters of bf16 storage
            fsdp.update(fsdp_version=1, fsdp_sharding_strategy="FULL_SHARD" if st.reshard_after_forward
                        else "SHARD_GRAD_OP", fsdp_use_orig_params=False, fsdp_backward_prefetch="BACKWARD_PRE",
                        fsdp_forward_prefetch=False, fsdp_sync_module_states=True)
        else:
            fsdp.update(fsdp_version=2, fsdp_reshard_after_forward=st.reshard_after_forward)
        cfg.update(distributed_type="FSDP", mixed_precision=mixed_precision(s), fsdp_config=fsdp)
        if not cpu:
            cfg["gpu_ids"] = "all"
        return cfg
    cfg.update(distributed_type="DEEPSPEED",
               deepspeed_config={"deepspeed_config_file": deepspeed_file or DS_CONFIG_NAME,
                                 "zero3_init_flag": st.zero_stage == 3})
    return cfg


def _yaml(obj: dict) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=True)


def write_configs(directory: Path, strategy: str, gpus: int, s, cpu: bool = False, layer_cls: str | None = None,
                  nodes: Nodes | None = None) -> Path:
    """Write the accelerate YAML (and the DeepSpeed JSON it names) into `directory` -> the YAML."""
    directory.mkdir(parents=True, exist_ok=True)
    ds = None
    if get_strategy(strategy).engine == "deepspeed":
        ds = directory / DS_CONFIG_NAME
        ds.write_text(json.dumps(deepspeed_config(strategy), indent=1) + "\n")
    path = directory / CONFIG_NAME
    path.write_text(_yaml(accelerate_config(strategy, gpus, s, cpu, str(ds.resolve()) if ds else None, layer_cls,
                                            nodes)))
    return path


def launch_command(config: Path, launch_json: Path, gpus: int, cpu: bool = False, port: int | None = None,
                   nodes: Nodes | None = None) -> list:
    """`accelerate launch` with the written config (`gpus`: processes on all machines).  CPU
    processes (--cpu, for tests) start through torch's own launcher instead: accelerate's --cpu
    spawns several processes only through mpirun; each process's Accelerator then finds
    WORLD_SIZE > 1 on a CPU and uses gloo (MULTI_CPU).  Several machines: the same command on each,
    with its own machine rank; rank 0's machine is the rendezvous."""
    multi = nodes is not None and nodes.count > 1
    if cpu:
        where = (["--nnodes", str(nodes.count), "--node_rank", str(nodes.rank), "--master_addr", nodes.main_host,
                  "--master_port", str(nodes.port)] if multi else ["--standalone"])
        return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node",
                str(gpus // (nodes.count if multi else 1)), "-m", "vramfit.run.launch", str(launch_json)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(gpus)]
    if multi:
        cmd += ["--num_machines", str(nodes.count), "--machine_rank", str(nodes.rank), "--main_process_ip",
                nodes.main_host, "--main_process_port", str(nodes.port)]
    elif port:
        cmd += ["--main_process_port", str(port)]
    return cmd + ["-m", "vramfit.run.launch", str(launch_json)]


def launch_env(config: Path) -> dict:
    """The environment `accelerate launch --config_file config` gives each process (accelerate's own
    parsing and validation), for checking a config without GPUs: the engine's plugin reads it."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    # accelerate launch hands a DeepSpeed config to its deepspeed launcher (launch_command), everything
    # else to the multi-GPU one
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config.keys()) if defaults else []
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE", "FSDP"))}


# --------------------------------------------------------------------------- parent


def check_runnable(strategy: str, gpus: int, cpu: bool) -> None:
    """More GPUs than exist, mismatched GPUs, a strategy whose package is missing: VramfitError."""
    from vramfit.planner.multigpu import missing_package, resolve_gpus

    st = get_strategy(strategy)
    if not isinstance(gpus, int) or gpus < 1:
        raise VramfitError(f"--gpus must be a positive number of GPUs, got {gpus!r}")
    why = missing_package(st.name)
    if why:
        raise VramfitError(why)
    if cpu:
        if st.engine != "ddp":
            raise VramfitError(f"--cpu runs DDP over gloo only (for testing the launch); {st.name} needs GPUs")
        return
    resolve_gpus(str(gpus))  # probes: more GPUs than this machine has, or mismatched ones, raise


def choose(spec, setup_options: dict, seq_len: int, gpus: int, strategy: str | None, headroom: str,
           effective_batch: int | None, machines: int = 1):
    """The setup and strategy -> (Setup, strategy, GpusPlan or None)."""
    from vramfit.memory.setup import make_setup
    from vramfit.run.train import SETUP_FIELDS, planner_restrictions

    given = {k: v for k, v in setup_options.items() if v is not None}
    given.setdefault("seq_len", seq_len)
    if all(k in given for k in SETUP_FIELDS) and strategy:
        s = make_setup(**given)
        check_combination(get_strategy(strategy), s, gpus)
        return s, strategy, None
    from vramfit.planner.multigpu import plan_gpus

    from dataclasses import replace

    from vramfit.planner.multigpu import resolve_gpus

    gset = resolve_gpus(str(gpus // machines))  # this machine's GPUs (probed); the others are alike
    if machines > 1:
        gset = replace(gset, count=gpus, nodes=machines)
    p = plan_gpus(spec, gset, strategy=strategy, method=given.get("method", "auto"), seq_len=given["seq_len"],
                  headroom=headroom, **planner_restrictions(given, effective_batch, gpus))
    return p.setup, p.chosen.strategy, p


def launch(model: str, data: str, options, setup_options: dict, gpus, strategy: str | None = None,
           cpu: bool = False, console=None, port: int | None = None, node_rank: int | None = None,
           main_host: str | None = None) -> dict:
    """Parent: check, choose, predict, write the configs, run accelerate launch -> the run report.
    `gpus`: N of this machine or "MxN" (M machines, run on each with its `node_rank`; `main_host` is
    machine 0's address).  Off machine 0 the report is machine 0's: this returns its own status."""
    machines, per_node = parse_gpus(gpus)
    nodes = make_nodes(machines, node_rank, main_host, port)
    gpus = machines * per_node  # processes on all machines: the world size
    from rich.console import Console

    from vramfit.run import data as vdata
    from vramfit import report
    from vramfit.memory.distributed import estimate_distributed
    from vramfit.run.model import load_tokenizer, resolve_model
    from vramfit.run.outputs import _check_out_dir

    console = console or Console()
    say = lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True)
    if strategy is not None:
        get_strategy(strategy)
    if options.resume:
        raise VramfitError("--resume is not supported with --gpus yet: start a new --out")
    out = Path(options.out_dir).expanduser()
    _check_out_dir(out, False)
    if strategy is not None:
        check_runnable(strategy, per_node, cpu)
    source = resolve_model(model, options.init, options.trust_remote_code)
    tokenizer = load_tokenizer(source, options.tokenizer, options.trust_remote_code)
    d = vdata.prepare(data, tokenizer, options.data_format, options.on_bad_row, options.val_split, options.val_file,
                      options.max_seq_len, options.seq_len_from, options.seed)
    for line in report.data_report_lines(d):
        say(line)
    if cpu:
        from vramfit.memory.setup import make_setup

        given = {k: v for k, v in setup_options.items() if v is not None}
        given.setdefault("seq_len", d.seq_len)
        s, chosen, plan = make_setup(**given), strategy or "ddp", None
    else:
        s, chosen, plan = choose(source.spec, setup_options, d.seq_len, gpus, strategy, options.headroom,
                                 options.effective_batch, machines)
    check_runnable(chosen, per_node, cpu)
    est = estimate_distributed(source.spec, s, chosen, gpus)
    where = f" ({machines} machines of {per_node}, this one rank {nodes.rank})" if nodes else ""
    say(f"{chosen} on {gpus} {'CPU processes' if cpu else 'GPUs'}{where}: {report.setup_label(s)}; predicted per GPU "
        f"{report.fmt_bytes(est.peak_allocated_bytes)} allocated, {report.fmt_bytes(est.device_bytes)} device"
        + (f"; host (offload) {report.fmt_bytes(est.host_bytes)}" if est.host_bytes else ""))
    directory = out / LAUNCH_DIR
    config = write_configs(directory, chosen, gpus, s, cpu, nodes=nodes)
    job = {"model": model, "data": data, "options": asdict(options), "setup": _setup_json(s), "strategy": chosen,
           "gpus": gpus, "cpu": cpu, "predicted": est.to_json(), "plan": plan.to_json() if plan else None,
           "nodes": asdict(nodes) if nodes else None}
    launch_json = directory / LAUNCH_NAME
    launch_json.write_text(json.dumps(job, indent=1, default=str) + "\n")
    cmd = launch_command(config, launch_json, gpus, cpu, port, nodes)
    say("launching: " + " ".join(cmd[2:]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if s.allocator == "expandable":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    rc = subprocess.run(cmd, env=env, check=False).returncode
    rep_path = out / "run_report.json"
    if nodes and nodes.rank != 0 and rc == 0:  # machine 0's rank 0 writes the report, on machine 0
        say(f"machine {nodes.rank} of {nodes.count}: its ranks finished; the run report is on the main machine "
            f"({nodes.main_host}), the memory timelines of this machine's ranks in {out}")
        return {"status": "completed", "node_rank": nodes.rank, "nodes": nodes.count, "report": "on the main machine"}
    if rc != 0 or not rep_path.is_file():
        raise VramfitError(f"accelerate launch exited with code {rc}; the per-rank logs are above and the "
                           f"memory timelines in {out}")
    rep = json.loads(rep_path.read_text())
    from vramfit.report_multi import rank_lines

    for line in rank_lines(rep):
        say(line)
    say(f"{rep['status']}: {rep['steps']} steps in {rep['train_seconds']} s; report {rep_path}")
    return rep


def _setup_json(s) -> dict:
    d = asdict(s)
    d.pop("extras", None)
    return d


# --------------------------------------------------------------------------- child


def run_rank(launch_json: str) -> dict | None:
    """One rank of the run: vramfit.run.train's path under the engine accelerate set up."""
    import torch

    from vramfit.run import data as vdata
    from vramfit.memory.setup import Setup
    from vramfit.run.tracker import MemoryTracker
    from vramfit.run.model import _name_base, build_model, load_tokenizer, resolve_model
    from vramfit.run.outputs import versions
    from vramfit.run.train import RunOptions, lora_config, sft_config

    job = json.loads(Path(launch_json).read_text())
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not job["cpu"]
    if cuda:
        torch.cuda.set_device(local)
    opts = RunOptions(**job["options"])
    s = Setup(**job["setup"])
    out = Path(opts.out_dir).expanduser()
    source = resolve_model(job["model"], opts.init, opts.trust_remote_code)
    tokenizer = load_tokenizer(source, opts.tokenizer, opts.trust_remote_code)
    d = vdata.prepare(job["data"], tokenizer, opts.data_format, opts.on_bad_row, opts.val_split, opts.val_file,
                      opts.max_seq_len, opts.seq_len_from, opts.seed)
    steps = opts.max_steps or max(1, -(-len(d.train.rows) // (s.micro_batch * s.grad_accum * world)))
    # the model is built on the CPU: the engine moves (DDP, ZeRO-1/2) or shards (FSDP2, ZeRO-3) it
    model = _rank_model(source, s, job["strategy"], local, cuda, opts.seed, out, opts.random_init_dir) \
        if s.method == "qlora" else build_model(source, s, False, opts.seed, None, out)
    if source.path:
        _name_base(model, source.path)
    predicted = job["predicted"]["per_gpu"]
    tracker = MemoryTracker(out / timeline_name(rank), predicted=predicted, finish_on_train_end=True,
                            plot_path=None)
    args = sft_config(s, opts, out / "checkpoints" / s.method, steps, False, cuda, False)
    if get_strategy(job["strategy"]).engine == "fsdp":
        # reduce-scatter every micro-batch: accelerate's no_sync would keep unsharded gradients
        args.accelerator_config.gradient_accumulation_kwargs = {"sync_each_batch": True}
    args.save_strategy = "no"
    args.ddp_find_unused_parameters = False  # LoRA's frozen weights are not DDP parameters: none unused
    from trl import SFTTrainer

    train_ds = vdata.to_hf_dataset(d.train.rows)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                         peft_config=lora_config(s, model), callbacks=[tracker])
    result = trainer.train()
    summary = tracker.summary()
    target = out / ("model" if s.method == "full" else "adapter")
    trainer.save_model(str(target))
    peaks = _gather(summary, world)
    if rank != 0:
        return None
    history = trainer.state.log_history
    rep = {"status": "completed", "model": source.name, "strategy": job["strategy"], "gpus": world,
           "cpu": job["cpu"], "setup": job["setup"], "predicted": job["predicted"],
           "measured_per_rank": peaks, "steps": trainer.state.global_step, "max_steps": steps,
           "train_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
           "losses": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
           "outputs": {"timelines": [str(out / timeline_name(r)) for r in range(world)], str(target.name): str(target),
                       "accelerate_config": str(out / LAUNCH_DIR / CONFIG_NAME)},
           "data": d.to_json(), "options": job["options"], "versions": versions()}
    (out / "run_report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    if not opts.random_init_dir:
        shutil.rmtree(out / "random-init", ignore_errors=True)
    return rep


def _gather(summary: dict, world: int) -> list:
    """Every rank's tracker summary, on every rank (torch.distributed.all_gather_object)."""
    import torch.distributed as dist

    if world <= 1 or not dist.is_initialized():
        return [summary]
    out = [None] * world
    dist.all_gather_object(out, summary)
    return out


def _rank_model(source, s, strategy: str, local: int, cuda: bool, seed: int, scratch: Path,
                random_init_dir: str | None = None):
    """QLoRA on several GPUs: 4-bit weights stored as bf16 (bnb_4bit_quant_storage), as peft's
    FSDP-QLoRA and DeepSpeed-ZeRO3-QLoRA guides require, loaded onto this rank's GPU (FSDP: on the
    CPU, FSDP moves the shards)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from vramfit.run.model import _random_checkpoint, loading_phase

    if not cuda:
        raise VramfitError("QLoRA needs CUDA GPUs")
    path = source.path or _random_checkpoint(source, seed, scratch, random_init_dir)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=s.quant_type,
                           bnb_4bit_use_double_quant=s.double_quant, bnb_4bit_compute_dtype=torch.bfloat16,
                           bnb_4bit_quant_storage=torch.bfloat16)
    kw = {"dtype": torch.bfloat16, "attn_implementation": s.attn, "quantization_config": q}
    if get_strategy(strategy).engine != "fsdp" and get_strategy(strategy).zero_stage != 3:
        kw["device_map"] = {"": local}
    with loading_phase("loading the weights and quantizing them to 4-bit (from_pretrained)"):
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    model.config.use_cache = False
    return model


def main(argv=None) -> int:  # pragma: no cover - run by accelerate launch in each process
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m vramfit.run.launch OUT/launch/launch.json (started by accelerate launch)", file=sys.stderr)
        return 2
    try:
        run_rank(argv[0])
    except VramfitError as exc:
        print(f"vramfit: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _exit(code: int) -> None:  # pragma: no cover
    """Leave without the interpreter's teardown: a gloo process group still alive then aborted a
    CPU rank now and then ("terminate called without an active exception") after training had
    finished and its files were written."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    _exit(main())
