"""The `vramfit` command: typed options over library calls, rendered by report.py."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Optional

import typer

from vramfit.run.data import FORMATS
from vramfit.errors import VramfitError
from vramfit.memory.setup import ALLOCATORS, ATTENTION, LEVERS, LOSSES, METHODS


def _choices(name: str, *values: str):
    """A str Enum of `values` (member names are the values), for typer's choice options."""
    return Enum(name, {v: v for v in values}, type=str)


Method = _choices("Method", *METHODS)
PlanMethod = _choices("PlanMethod", "auto", *METHODS)
Attn = _choices("Attn", *ATTENTION)
Allocator = _choices("Allocator", *ALLOCATORS)
Loss = _choices("Loss", *LOSSES)
Prefer = _choices("Prefer", "speed", "memory")
DataFormat = _choices("DataFormat", "auto", *FORMATS)
BadRowAction = _choices("BadRowAction", "skip", "fail")
Init = _choices("Init", "pretrained", "random")
SeqLenFrom = _choices("SeqLenFrom", "max", "p99")
Sampling = _choices("Sampling", "random", "sequential")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Will this fine-tuning run fit on my GPU, and what is the best setup that does?")


LOSS_HELP = ("how the loss is computed: logits (transformers Trainer, model(labels=...): full logits, fp32 "
             "log-softmax) or fused (trl SFTTrainer's chunked LM head, what `vramfit train` runs)")

# the precision in transformers' words, on estimate, plan and train
DTYPE_OPTION = typer.Option(None, help="from_pretrained(dtype=...): float32 | bfloat16 | float16 (with --amp, "
                            "instead of --precision)")
AMP_OPTION = typer.Option(None, help="TrainingArguments autocast: none | bf16 (bf16=True) | fp16 (fp16=True) "
                          "(with --dtype, instead of --precision)")


# the memory levers (vramfit.planner.levers), in their own switches
LIGER_HELP = "TrainingArguments(use_liger_kernel=True): liger-kernel's RMSNorm, SwiGLU and RoPE kernels (CUDA)"
PACKING_HELP = ("trl SFTConfig(packing=True), bfd, padding-free: a micro-batch is --micro-batch rows of --seq-len "
                "tokens filled with whole examples, flattened into one")
OFFLOAD_HELP = "trl SFTConfig(activation_offloading=True): saved activations in pinned host memory (CUDA)"
KBIT_HELP = ("QLoRA: peft's prepare_model_for_kbit_training after loading (the standard recipe: embeddings, "
             "norms and LM head cast to fp32); --no-kbit-prep keeps them bf16 as trl's SFTTrainer and Unsloth do")
TOKENS_HELP = ("with --packing: tokens per micro-batch, a multiple of --seq-len (the micro-batch is N / seq_len "
               "packed rows)")
SEARCHED = " (default: searched: {})"  # parentheses: rich takes [default: ...] for markup and drops it


def _fail(exc: Exception) -> None:
    typer.echo(f"vramfit: error: {exc}", err=True)
    raise typer.Exit(code=2)


def _precision(precision: str | None, dtype: str | None, amp: str | None) -> str | None:
    """--precision, or the (--dtype, --amp) pair it is shorthand for."""
    from vramfit.memory.setup import PRECISIONS, _choice, resolve_precision

    try:
        if precision is not None:
            _choice("precision", precision, PRECISIONS)
        return resolve_precision(precision, dtype, amp)
    except VramfitError as exc:
        _fail(exc)


@app.command()
def estimate(
    model: str = typer.Argument(..., help="bundled profile (`vramfit profiles`), config.json, model directory or hub id"),
    method: Method = typer.Option(Method.lora, help="full fine-tuning, LoRA, or QLoRA (4-bit NF4 base)"),
    precision: Optional[str] = typer.Option(None, help="shorthand for a (dtype, amp) pair: 32-true | bf16-true | "
                                            "bf16-mixed | bf16-amp | 16-mixed | 16-true | 16-amp [default: bf16-amp: dtype bfloat16, "
                                            "amp bf16, the guides' recipe]"),
    dtype: Optional[str] = DTYPE_OPTION,
    amp: Optional[str] = AMP_OPTION,
    optim: str = typer.Option("adamw_torch", help="TrainingArguments.optim: adamw_torch, adamw_torch_fused, "
                              "adamw_bnb_8bit, paged_adamw_8bit, paged_adamw_32bit, adafactor, sgd"),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank [default: 16]"),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha [default: 2 x rank]"),
    lora_dropout: Optional[float] = typer.Option(None, help="LoRA dropout [default: 0.05]"),
    target_modules: Optional[str] = typer.Option(None, help="comma list, 'all-linear' or a regex [default: "
                                                 "q_proj,v_proj for LoRA, all-linear for QLoRA]"),
    seq_len: int = typer.Option(2048, help="tokens per sequence"),
    batch_size: int = typer.Option(1, "--batch-size", "--micro-batch", help="sequences per micro-batch"),
    grad_ckpt: bool = typer.Option(False, "--grad-ckpt/--no-grad-ckpt", help="gradient checkpointing"),
    attn: Attn = typer.Option(Attn.sdpa, help="attention implementation"),
    allocator: Allocator = typer.Option(Allocator.default, help="torch caching allocator: default or "
                                        "expandable (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)"),
    loss: Loss = typer.Option(Loss.logits, help=LOSS_HELP),
    padded: bool = typer.Option(False, "--padded", help="batches padded to their longest row, as real data of "
                                "varying lengths is: an attention mask reaches SDPA, and grouped KV heads are "
                                "repeated (what vramfit train predicts with when its rows differ in length)"),
    liger: bool = typer.Option(False, "--liger", help=LIGER_HELP),
    packing: bool = typer.Option(False, "--packing", help=PACKING_HELP),
    activation_offloading: bool = typer.Option(False, "--activation-offloading", help=OFFLOAD_HELP),
    tokens_per_batch: Optional[int] = typer.Option(None, "--tokens-per-batch", help=TOKENS_HELP),
    kbit_prep: bool = typer.Option(True, "--kbit-prep/--no-kbit-prep", help=KBIT_HELP),
    simulate_allocator: bool = typer.Option(False, "--simulate-allocator", help="accepted, does nothing: the "
                                            "allocator replay is the default answer"),
    eval_batch_size: Optional[int] = typer.Option(None, "--eval-batch-size", help="sequences per evaluation batch "
                                                  "(per_device_eval_batch_size) [default: the micro-batch, as "
                                                  "vramfit train]"),
    fast: bool = typer.Option(False, "--fast", help="the fitted analytic estimate (~0.3 s; its allocator reserve "
                              "is a linear fit, a few % off the device figure) instead of the allocator replay "
                              "(the default: ~0.5 s once the setup's event template is cached, 10-60 s to build it)"),
    trust_remote_code: bool = typer.Option(False, help="allow custom model code from the hub"),
    gpus: int | None = typer.Option(None, help="data-parallel GPUs: the memory of each [default: 1]"),
    strategy: str | None = typer.Option(None, help="with --gpus: ddp, fsdp-full, fsdp-grad-op, zero1, zero2, "
                                        "zero3, zero2-offload, zero3-offload [default: ddp]"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object and nothing else"),
):
    """Predict the GPU memory of one fine-tuning step: a breakdown and the three peaks."""
    from vramfit.api import estimate as run_estimate

    precision = _precision(precision, dtype, amp)

    if gpus is not None or strategy is not None:
        _no_levers_on_gpus(liger=liger, packing=packing, activation_offloading=activation_offloading,
                           tokens_per_batch=tokens_per_batch)
        return _estimate_gpus(model, gpus or 1, strategy or "ddp", as_json, trust_remote_code,
                              {"method": method.value, "precision": precision, "optim": optim, "lora_r": lora_r,
                               "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                               "target_modules": target_modules, "seq_len": seq_len, "micro_batch": batch_size,
                               "grad_ckpt": grad_ckpt, "attn": attn.value, "allocator": allocator.value})
    try:
        est = run_estimate(model, method=method.value, precision=precision, optim=optim, lora_r=lora_r,
                           lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                           seq_len=seq_len, micro_batch=batch_size, grad_ckpt=grad_ckpt, attn=attn.value,
                           allocator=allocator.value, loss=loss.value, padded=padded, liger=liger, packing=packing,
                           activation_offloading=activation_offloading, tokens_per_batch=tokens_per_batch,
                           trust_remote_code=trust_remote_code, simulate_allocator=simulate_allocator,
                           replay=False if fast else None, eval_batch=eval_batch_size, kbit_prep=kbit_prep,
                           template_build="background")
    except VramfitError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(est.to_json()) + "\n")
        return
    from rich.console import Console

    from vramfit.report import estimate_summary, estimate_table

    console = Console()
    console.print(estimate_table(est))
    for line in estimate_summary(est):
        console.print(line, highlight=False)


def _no_levers_on_gpus(**given) -> None:
    """The memory levers are single-GPU setup axes for now: with --gpus / --strategy, an error."""
    on = ["--" + k.replace("_", "-") for k, v in given.items() if v]
    if on:
        _fail(VramfitError(f"{', '.join(on)}: the memory levers are not modelled on several GPUs yet; drop "
                           f"--gpus/--strategy, or the lever"))


def _estimate_gpus(model, gpus, strategy, as_json, trust_remote_code, options) -> None:
    from vramfit.planner.multigpu import estimate_gpus

    try:
        d = estimate_gpus(model, gpus=gpus, strategy=strategy, trust_remote_code=trust_remote_code, **options)
    except VramfitError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps({**d.per_gpu.to_json(), **d.to_json()}) + "\n")
        return
    from rich.console import Console

    from vramfit.report_multi import gpus_estimate_lines, gpus_estimate_table

    console = Console()
    console.print(gpus_estimate_table(d))
    for line in gpus_estimate_lines(d):
        console.print(line, highlight=False)


@app.command()
def profiles():
    """List the bundled model profiles."""
    from rich.console import Console
    from rich.table import Table

    from vramfit.model.spec import MODEL_PROFILES_DIR, list_profiles

    table = Table(title="bundled model profiles")
    for col in ("name", "model_type", "hub id", "parameters"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for name in list_profiles():
        data = json.loads((MODEL_PROFILES_DIR / f"{name}.json").read_text())
        params = data.get("_params")
        table.add_row(name, data.get("model_type", "?"), data.get("_hub_id", ""), f"{params:,}" if params else "")
    Console().print(table)


@app.command()
def plan(
    model: str = typer.Argument(..., help="bundled profile (`vramfit profiles`), config.json, model directory or hub id"),
    gpu: Optional[str] = typer.Option(None, help="auto (probe: the free memory of the GPU), a profile name (3060, "
                                      "rtx-3060, T4, h100; `vramfit gpus`) or a size (12GB decimal, 12GiB binary, "
                                      "12000MiB) [default: auto]"),
    headroom: str = typer.Option("5%", help="memory kept free: a percentage of the budget or a size (1GiB)"),
    method: PlanMethod = typer.Option(PlanMethod.auto, help="auto picks the fastest that fits; or restrict to one"),
    prefer: Prefer = typer.Option(Prefer.speed, help="speed: fastest per token; memory: smallest footprint"),
    seq_len: int = typer.Option(2048, help="tokens per sequence"),
    effective_batch: int = typer.Option(16, help="sequences per optimizer step (micro-batch x accumulation)"),
    micro_batch: Optional[int] = typer.Option(None, help="fix the micro-batch [default: searched]"),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank [default: 16]"),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha [default: 2 x rank]"),
    target_modules: Optional[str] = typer.Option(None, help="comma list, 'all-linear' or a regex [default: all-linear]"),
    precision: Optional[str] = typer.Option(None, help="fix the precision [default: searched: bf16-amp, bf16-true, "
                                            "bf16-mixed; 16-amp, 16-true, 16-mixed, 32-true without bf16]"),
    dtype: Optional[str] = DTYPE_OPTION,
    amp: Optional[str] = AMP_OPTION,
    optim: Optional[str] = typer.Option(None, help="fix the optimizer [default: searched]"),
    grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="fix gradient checkpointing "
                                             "[default: searched]"),
    loss: Loss = typer.Option(Loss.fused, help=LOSS_HELP + " [default: fused, as vramfit train runs]"),
    padded: bool = typer.Option(False, "--padded", help="batches padded to their longest row, as real data of "
                                "varying lengths is: an attention mask reaches SDPA, and grouped KV heads are "
                                "repeated (what vramfit train predicts with when its rows differ in length)"),
    liger: Optional[bool] = typer.Option(None, "--liger/--no-liger", help=LIGER_HELP + SEARCHED.format(
        "tried when nothing fits without it, on the model types liger-kernel patches")),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help=PACKING_HELP + SEARCHED.format(
        "on where --rows-median is under half of --seq-len, on and off with --rows-median, else off")),
    activation_offloading: Optional[bool] = typer.Option(
        None, "--activation-offloading/--no-activation-offloading",
        help=OFFLOAD_HELP + SEARCHED.format("tried when nothing fits without it")),
    tokens_per_batch: Optional[int] = typer.Option(None, "--tokens-per-batch", help=TOKENS_HELP),
    kbit_prep: Optional[bool] = typer.Option(None, "--kbit-prep/--no-kbit-prep", help=KBIT_HELP + SEARCHED.format(
        "with it; without it tried for QLoRA when nothing fits")),
    rows_median: Optional[int] = typer.Option(None, "--rows-median", help="the data's median row length in tokens "
                                              "(as vramfit train measures it): short rows make packing the "
                                              "default, and unpacked batches padded"),
    find_gpu: bool = typer.Option(False, "--find-gpu", help="the smallest bundled GPU that fits, and the best setup on each"),
    gpus: str | None = typer.Option(None, help="several GPUs: 4x24GB, 2xh100-sxm, auto (every probed GPU) or N; "
                                       "the strategies (DDP, FSDP, DeepSpeed ZeRO) become candidates"),
    strategy: str | None = typer.Option(None, help="with --gpus: fix the strategy [default: searched]"),
    trust_remote_code: bool = typer.Option(False, help="allow custom model code from the hub"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object and nothing else"),
    simulate_allocator: bool = typer.Option(False, "--simulate-allocator", help="accepted, does nothing: the "
                                            "allocator recheck is the default"),
    fast: bool = typer.Option(False, "--fast", help="the fast model's plan only (~1 s): no allocator replay of "
                              "the choice and its next-larger micro-batch (the default replays them: ~1 s with "
                              "their event templates cached, 20-60 s a setup the first time)"),
):
    """The best fine-tuning setup of MODEL that fits the GPU: verdict, candidates, rejections, levers."""
    from vramfit.planner import search as planner

    precision = _precision(precision, dtype, amp)

    restrictions = dict(method=method.value, seq_len=seq_len, effective_batch=effective_batch, micro_batch=micro_batch,
                        lora_r=lora_r, lora_alpha=lora_alpha, target_modules=target_modules, precision=precision,
                        optim=optim, grad_ckpt=grad_ckpt)
    if gpus is not None or strategy is not None:
        _no_levers_on_gpus(liger=liger, packing=packing, activation_offloading=activation_offloading,
                           tokens_per_batch=tokens_per_batch, rows_median=rows_median)
        return _plan_gpus(model, gpus, strategy, gpu, find_gpu, headroom, prefer.value, as_json, trust_remote_code,
                          restrictions)
    restrictions["loss"] = loss.value
    restrictions["padded"] = padded
    restrictions.update(liger=liger, packing=packing, activation_offloading=activation_offloading,
                        tokens_per_batch=tokens_per_batch, rows_median=rows_median, kbit_prep=kbit_prep)
    try:
        if find_gpu:
            if gpu is not None:
                raise VramfitError("--find-gpu tries every bundled GPU profile: drop --gpu")
            plans = planner.find_gpu(model, headroom=headroom, prefer=prefer.value,
                                     trust_remote_code=trust_remote_code, **restrictions)
        else:
            result = planner.plan(model, gpu or "auto", headroom=headroom, prefer=prefer.value,
                                  trust_remote_code=trust_remote_code, replay=False if fast else None,
                                  **restrictions)
    except VramfitError as exc:
        _fail(exc)
    from rich.console import Console

    from vramfit import report

    if find_gpu:
        if as_json:
            sys.stdout.write(json.dumps({"model": plans[0].model if plans else model,
                                         "gpus": [_find_gpu_json(p) for p in plans]}) + "\n")
            return
        console = Console()
        console.print(report.find_gpu_verdict(plans), highlight=False)
        console.print(report.find_gpu_table(plans))
        return
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
        return
    console = Console()
    console.print(report.plan_verdict(result), highlight=False)
    console.print(report.plan_budget_line(result), highlight=False)
    console.print(report.plan_candidates_table(result))
    rejected = report.plan_rejection_lines(result)
    if rejected:
        console.print("[bold]faster, but nothing of them fits:[/]")
        for line in rejected:
            console.print("  " + line, highlight=False)
    console.print(report.plan_levers_table(result))
    for line in report.plan_extra_lines(result):
        console.print(line, highlight=False)


def _plan_gpus(model, gpus, strategy, gpu, find_gpu, headroom, prefer, as_json, trust_remote_code, restrictions):
    from vramfit.planner.multigpu import plan_gpus

    try:
        if gpus is None:
            raise VramfitError("--strategy needs --gpus (4x24GB, 2xh100-sxm, auto or N)")
        if gpu is not None or find_gpu:
            raise VramfitError("--gpus names the GPUs: drop --gpu / --find-gpu")
        result = plan_gpus(model, gpus, strategy=strategy, headroom=headroom, prefer=prefer,
                           trust_remote_code=trust_remote_code, **restrictions)
    except VramfitError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
        return
    from rich.console import Console

    from vramfit import report_multi

    console = Console()
    console.print(report_multi.gpus_plan_verdict(result), highlight=False)
    for line in report_multi.gpus_plan_lines(result):
        console.print(line, highlight=False)
    console.print(report_multi.gpus_strategy_table(result))


def _find_gpu_json(p) -> dict:
    return {"gpu": p.device.key, "name": p.device.name, "usable_bytes": p.usable_bytes, "fits": p.chosen is not None,
            "chosen": p.chosen.to_json() if p.chosen else None, "closest": p.closest.to_json()}


@app.command()
def gpus(as_json: bool = typer.Option(False, "--json", help="print one JSON object and nothing else")):
    """The bundled GPU profiles, and this machine's GPUs when it has any."""
    from dataclasses import asdict

    from vramfit.planner.gpu import load_profiles, probe

    profiles = load_profiles()
    try:
        found, why = probe(), None
    except VramfitError as exc:
        found, why = None, str(exc)
    if as_json:
        sys.stdout.write(json.dumps({
            "profiles": {k: asdict(d) for k, d in profiles.items()},
            "probe": None if found is None else {"driver_version": found.driver_version,
                                                 "cuda_version": found.cuda_version,
                                                 "devices": [asdict(d) for d in found.devices]},
            "probe_error": why}) + "\n")
        return
    from rich.console import Console

    from vramfit.report import gpus_table, probe_table

    console = Console()
    console.print(gpus_table(profiles))
    if found is not None:
        console.print(probe_table(found))
    else:
        console.print(f"this machine: {why}", highlight=False)


@app.command()
def calibrate(
    model: Optional[str] = typer.Option(None, help="also measure this model's saved activations against the trace"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object and nothing else"),
):
    """Measure this GPU's CUDA context, kernel and cuBLAS overheads; later estimates use them."""
    from vramfit.run.calibrate import calibrate as run_calibrate

    try:
        data = run_calibrate(model)
    except VramfitError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    from vramfit.report import calibration_lines

    for line in calibration_lines(data):
        typer.echo(line)


@app.command()
def train(
    model: str = typer.Argument(..., help="a model directory with weights or a hub id; with --init random also a "
                                "bundled profile or a config.json"),
    data: str = typer.Argument(..., help="JSONL / JSON / CSV / Parquet file, a datasets.save_to_disk folder, or a "
                               "hub dataset name (online)"),
    out: str = typer.Option("vramfit-run", "--out", help="output directory (must be new or empty, unless --resume)"),
    init: Init = typer.Option(Init.pretrained, help="pretrained weights, or random weights from the config"),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer directory or hub id [default: the model's]"),
    data_format: DataFormat = typer.Option(DataFormat.auto, "--format", help="data format [default: detected]"),
    on_bad_row: BadRowAction = typer.Option(BadRowAction.skip, help="skip bad rows (reported) or fail on them"),
    val_split: float = typer.Option(0.1, help="fraction of the data held out for validation (0: none)"),
    val_file: Optional[str] = typer.Option(None, help="validation data file instead of a held-out split"),
    max_seq_len: int = typer.Option(2048, help="longest sequence trained on: longer rows are truncated"),
    seq_len_from: SeqLenFrom = typer.Option(SeqLenFrom.max, help="the data's token length the memory prediction "
                                            "uses: the longest row or the 99th percentile"),
    method: Optional[Method] = typer.Option(None, help="full | lora | qlora [default: the planner's]"),
    precision: Optional[str] = typer.Option(None, help="32-true | bf16-true | bf16-mixed | bf16-amp | 16-mixed | "
                                            "16-true | 16-amp [default: planned]"),
    dtype: Optional[str] = DTYPE_OPTION,
    amp: Optional[str] = AMP_OPTION,
    optim: Optional[str] = typer.Option(None, help="a TrainingArguments.optim name"),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank [default: 16]"),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha [default: 2 x rank]"),
    lora_dropout: Optional[float] = typer.Option(None, help="LoRA dropout [default: 0.05]"),
    target_modules: Optional[str] = typer.Option(None, help="comma list, 'all-linear' or a regex"),
    micro_batch: Optional[int] = typer.Option(None, help="sequences per micro-batch"),
    grad_accum: Optional[int] = typer.Option(None, help="micro-batches per optimizer step"),
    grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="gradient checkpointing"),
    seq_len: Optional[int] = typer.Option(None, help="sequence length for the prediction (default: from the data; "
                                          "with packing, --max-seq-len: the packed row's length)"),
    liger: Optional[bool] = typer.Option(None, "--liger/--no-liger", help=LIGER_HELP + " (default: off, or the "
                                         "planner's when it chooses)"),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help=PACKING_HELP + " (default: on when "
                                           "the planner chooses and the rows' median is under half of --max-seq-len)"),
    activation_offloading: Optional[bool] = typer.Option(
        None, "--activation-offloading/--no-activation-offloading", help=OFFLOAD_HELP + " (default: off, or the "
        "planner's when it chooses)"),
    tokens_per_batch: Optional[int] = typer.Option(None, "--tokens-per-batch", help=TOKENS_HELP),
    kbit_prep: Optional[bool] = typer.Option(None, "--kbit-prep/--no-kbit-prep", help=KBIT_HELP + " (default: "
                                             "with it, or the planner's when it chooses)"),
    attn: Attn = typer.Option(Attn.sdpa, help="attention implementation"),
    allocator: Optional[Allocator] = typer.Option(None, help="torch caching allocator: default or expandable "
                                                  "(segments) [default: as PYTORCH_CUDA_ALLOC_CONF sets "
                                                  "expandable_segments, else expandable: padded batches "
                                                  "fragment the default one]"),
    gpu: Optional[str] = typer.Option(None, help="for the planner and the fit check: auto, a profile or a size "
                                      "[default: auto]"),
    headroom: str = typer.Option("5%", help="memory kept free: a percentage or a size"),
    simulate_allocator: Optional[bool] = typer.Option(
        None, "--simulate-allocator/--no-simulate-allocator", help="predict the reserved and device peaks by "
        "replaying 25 steps of the data's own padded batch lengths through a model of torch's caching allocator "
        "(10-40 s on a CPU for 1B-7B models; closer where batches vary in length); off: the replay of batches "
        "of the sequence length, as `vramfit estimate` [default: on a GPU]"),
    enforce_budget: bool = typer.Option(False, "--enforce-budget", help="emulate the smaller card of --gpu on this "
                                        "one: torch's allocator is capped (set_per_process_memory_fraction) so the "
                                        "process stays within --gpu less the headroom, CUDA context included"),
    effective_batch: Optional[int] = typer.Option(None, help="sequences per optimizer step, when the planner "
                                                  "chooses the micro-batch [default: 16]"),
    epochs: float = typer.Option(1.0, help="passes over the training data (when --max-steps is not given)"),
    max_steps: Optional[int] = typer.Option(None, help="optimizer steps [default: from --epochs]"),
    learning_rate: Optional[float] = typer.Option(None, help="[default: 2e-4 LoRA/QLoRA, 2e-5 full]"),
    warmup: float = typer.Option(0.03, help="warm-up: a fraction of the steps (< 1) or a number of steps"),
    logging_steps: int = typer.Option(1, help="log the loss every N steps"),
    eval_steps: Optional[int] = typer.Option(None, help="evaluate every N steps [default: a tenth of the run]"),
    save_steps: Optional[int] = typer.Option(None, help="checkpoint every N steps; 0: no checkpoints (needs "
                                             "--val-split 0) [default: --eval-steps]"),
    early_stopping_patience: int = typer.Option(3, help="evaluations without a better validation loss before "
                                                "stopping (0: never)"),
    seed: int = typer.Option(42),
    sampling: Sampling = typer.Option(Sampling.random, help="the order rows are trained in (TrainingArguments."
                                 "train_sampling_strategy): random (shuffled) or sequential (the data's own "
                                 "order, e.g. a curriculum; transformers >= 5.2)"),
    random_init_dir: Optional[str] = typer.Option(None, help="with --init random and QLoRA: where the random "
                                                  "checkpoint is written (on the CPU), kept and reused by later "
                                                  "runs of the same config and seed [default: OUT/random-init, "
                                                  "deleted at the end]"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    fallback: bool = typer.Option(True, "--fallback/--no-fallback", help="on out-of-memory, continue with a "
                                  "cheaper setup from the last checkpoint"),
    fit_check: bool = typer.Option(True, "--fit-check/--no-fit-check", help="refuse a setup predicted not to fit"),
    trust_remote_code: bool = typer.Option(False, help="allow custom model code from the hub"),
    gpus: str | None = typer.Option(None, help="train on N GPUs of this machine through accelerate launch "
                                       "(one process per GPU), or MxN: M machines of N GPUs (run the same command "
                                       "on each, with --node-rank and --main-host) [default: 1, no launcher]"),
    node_rank: int | None = typer.Option(None, help="with --gpus MxN: this machine's rank, 0 on the main one"),
    main_host: str | None = typer.Option(None, help="with --gpus MxN: the main machine's address (every machine)"),
    strategy: str | None = typer.Option(None, help="with --gpus: ddp, fsdp-full, fsdp-grad-op, zero1, zero2, "
                                        "zero3, zero2-offload, zero3-offload [default: the planner's]"),
    cpu: bool = typer.Option(False, "--cpu", help="with --gpus N: N CPU processes over gloo instead (DDP only; "
                             "to test a launch on a machine without GPUs)"),
    as_json: bool = typer.Option(False, "--json", help="progress on stderr, the run report as JSON on stdout"),
):
    """Fine-tune MODEL on DATA with the setup that fits, tracking memory against the prediction."""
    from rich.console import Console

    from vramfit.run.train import RunOptions
    from vramfit.run.train import train as run_train

    _quiet_libraries()
    opts = RunOptions(out_dir=out, init=init.value, tokenizer=tokenizer, data_format=data_format.value,
                      on_bad_row=on_bad_row.value, val_split=val_split, val_file=val_file, max_seq_len=max_seq_len,
                      seq_len_from=seq_len_from.value, epochs=epochs, max_steps=max_steps,
                      learning_rate=learning_rate, warmup=warmup, logging_steps=logging_steps, eval_steps=eval_steps,
                      save_steps=save_steps, early_stopping_patience=early_stopping_patience, seed=seed,
                      sampling=sampling.value, random_init_dir=random_init_dir,
                      resume=resume, fallback=fallback, fit_check=fit_check, gpu=gpu, headroom=headroom,
                      enforce_budget=enforce_budget, simulate_allocator=simulate_allocator,
                      effective_batch=effective_batch, trust_remote_code=trust_remote_code)
    precision = _precision(precision, dtype, amp)
    setup_options = dict(method=method.value if method else None, precision=precision, optim=optim, lora_r=lora_r,
                         lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                         micro_batch=micro_batch, grad_accum=grad_accum, grad_ckpt=grad_ckpt, seq_len=seq_len,
                         attn=attn.value, allocator=allocator.value if allocator else None, liger=liger,
                         packing=packing, activation_offloading=activation_offloading,
                         tokens_per_batch=tokens_per_batch, kbit_prep=kbit_prep)
    try:
        if gpus is not None or strategy is not None or cpu:
            _no_levers_on_gpus(liger=liger, packing=packing, activation_offloading=activation_offloading,
                               tokens_per_batch=tokens_per_batch)
            setup_options = {k: v for k, v in setup_options.items()
                             if k not in (*LEVERS, "tokens_per_batch", "kbit_prep")}
            from vramfit.run.launch import launch

            if gpus is None:
                raise VramfitError("--strategy and --cpu need --gpus N")
            rep = launch(model, data, opts, setup_options, gpus, strategy, cpu, console=Console(stderr=as_json),
                         node_rank=node_rank, main_host=main_host)
        else:
            rep = run_train(model, data, opts, setup_options, console=Console(stderr=as_json))
    except VramfitError as exc:
        _fail(exc)
    except KeyboardInterrupt:  # outside the steps (loading, saving): nothing to keep but what is written
        typer.echo("vramfit: interrupted", err=True)
        raise typer.Exit(code=130)
    if as_json:
        sys.stdout.write(json.dumps(rep, default=str) + "\n")
    if rep["status"] in ("interrupted", "aborted"):
        raise typer.Exit(code=130)


@app.command()
def merge(
    adapter_dir: str = typer.Argument(..., help="a LoRA adapter directory (adapter_config.json + weights)"),
    out: str = typer.Option(..., "--out", help="directory for the merged model (must be new or empty)"),
    base: Optional[str] = typer.Option(None, help="base model [default: the adapter's base_model_name_or_path]"),
    dtype: str = typer.Option("auto", help="dtype to merge and save in: auto (the base's), bfloat16, float16, "
                              "float32"),
    trust_remote_code: bool = typer.Option(False, help="allow custom model code from the hub"),
):
    """Merge a LoRA adapter into its base model and save a standard model (merge_and_unload)."""
    from vramfit.run.merge import merge as run_merge

    _quiet_libraries()
    try:
        result = run_merge(adapter_dir, out, base=base, dtype=dtype, trust_remote_code=trust_remote_code)
    except VramfitError as exc:
        _fail(exc)
    typer.echo(f"merged {result['adapter']} into {result['base']}: {result['params']:,} parameters saved to "
               f"{result['out']}")


def _quiet_libraries() -> None:
    """transformers/trl info and warnings would bury the run's own lines."""
    import warnings

    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft/trl, not the user's to fix


def main() -> None:  # pragma: no cover
    app()
