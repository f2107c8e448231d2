"""The `vramfit` command: typed options over library calls, rendered by report.py."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Optional

import typer

from vramfit.errors import VramfitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Will this fine-tuning run fit on my GPU, and what is the best setup that does?")


class Method(str, Enum):
    full = "full"
    lora = "lora"
    qlora = "qlora"


class Attn(str, Enum):
    sdpa = "sdpa"
    flash_attention_2 = "flash_attention_2"
    eager = "eager"


class Allocator(str, Enum):
    default = "default"
    expandable = "expandable"


def _fail(exc: Exception) -> None:
    typer.echo(f"vramfit: error: {exc}", err=True)
    raise typer.Exit(code=2)


@app.command()
def estimate(
    model: str = typer.Argument(..., help="bundled profile (`vramfit profiles`), config.json, model directory or hub id"),
    method: Method = typer.Option(Method.lora, help="full fine-tuning, LoRA, or QLoRA (4-bit NF4 base)"),
    precision: str = typer.Option("bf16-true", help="32-true | bf16-true | bf16-mixed | 16-mixed | 16-true"),
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
    trust_remote_code: bool = typer.Option(False, help="allow custom model code from the hub"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object and nothing else"),
):
    """Predict the GPU memory of one fine-tuning step: a breakdown and the three peaks."""
    from vramfit.api import estimate as run_estimate

    try:
        est = run_estimate(model, method=method.value, precision=precision, optim=optim, lora_r=lora_r,
                           lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                           seq_len=seq_len, micro_batch=batch_size, grad_ckpt=grad_ckpt, attn=attn.value,
                           allocator=allocator.value, trust_remote_code=trust_remote_code)
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


@app.command()
def profiles():
    """List the bundled model profiles."""
    from rich.console import Console
    from rich.table import Table

    from vramfit.spec import MODEL_PROFILES_DIR, list_profiles

    table = Table(title="bundled model profiles")
    for col in ("name", "model_type", "hub id", "parameters"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for name in list_profiles():
        data = json.loads((MODEL_PROFILES_DIR / f"{name}.json").read_text())
        params = data.get("_params")
        table.add_row(name, data.get("model_type", "?"), data.get("_hub_id", ""), f"{params:,}" if params else "")
    Console().print(table)


def main() -> None:  # pragma: no cover
    app()
