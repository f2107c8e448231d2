"""Rich tables and plots: the only place that turns bytes into GiB for people."""

from __future__ import annotations

GiB = 1 << 30

COMPONENT_LABELS = {
    "weights_float32": "weights (fp32)",
    "weights_bfloat16": "weights (bf16)",
    "weights_float16": "weights (fp16)",
    "weights_4bit": "weights (4-bit NF4 + absmax)",
    "weights_fp32_unquantized": "weights not quantized (fp32)",
    "lora_adapters": "LoRA adapters (fp32)",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "optimizer_states_paged": "optimizer states (paged, managed memory)",
    "activations": "activations (saved for backward)",
    "logits_and_loss": "logits and loss buffers",
    "backward_transients": "backward working set",
    "optimizer_step_temporaries": "optimizer step temporaries",
    "cublas_workspace": "cuBLAS workspace",
    "allocator_reserve": "allocator reserve (cached, unused)",
    "cuda_context": "CUDA context",
}


def gib(n: int | float) -> str:
    return f"{n / GiB:,.2f}"


def estimate_table(est):
    from rich.table import Table

    s = est.setup
    title = f"{est.model} · {s.method}"
    if s.method != "full":
        title += f" r={s.lora_r} ({len(est.target_modules)} layers)"
    title += f" · {s.precision} · {s.optim} · seq {s.seq_len} × batch {s.micro_batch}"
    title += " · checkpointing" if s.grad_ckpt else ""
    table = Table(title=title, title_justify="left")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("share", justify="right")
    total = est.device_bytes
    for name, b in est.breakdown.items():
        if b == 0:
            continue
        table.add_row(COMPONENT_LABELS.get(name, name), gib(b), f"{100 * b / total:.1f}%")
    table.add_section()
    table.add_row("[bold]peak allocated[/] (torch max_memory_allocated)", f"[bold]{gib(est.peak_allocated_bytes)}", "")
    table.add_row("[bold]peak reserved[/] (torch max_memory_reserved)", f"[bold]{gib(est.peak_reserved_bytes)}", "")
    table.add_row("[bold]device[/] (nvidia-smi, this process)", f"[bold]{gib(est.device_bytes)}", "100.0%")
    return table


def estimate_summary(est) -> list[str]:
    lines = [
        f"parameters: {est.params_total:,} total, {est.params_trainable:,} trainable "
        f"({100 * est.params_trainable / max(est.params_total, 1):.4f}%)",
    ]
    if est.setup.method == "qlora":
        lines.append(f"base model with 4-bit weights counted packed (as model.num_parameters() shows): {est.params_packed:,}")
    lines.append(f"peak phase: {est.peak_phase} (forward {gib(est.phases['forward'])}, backward "
                 f"{gib(est.phases['backward'])}, optimizer {gib(est.phases['optimizer'])} GiB allocated)")
    lines += list(est.notes)
    lines.append(f"calibration: {est.calibration or 'none (bundled H100 constants)'}")
    return lines
