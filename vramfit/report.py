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


# --------------------------------------------------------------------------- plan


def fmt_bytes(n: int | float) -> str:
    return f"{gib(n)} GiB"


def fmt_rate(tokens_per_s: float) -> str:
    """~1,900 tokens/s: two significant digits, the cost model is no more precise."""
    if tokens_per_s <= 0:
        return "0 tokens/s"
    digits = max(0, 2 - len(str(int(tokens_per_s))))
    rounded = round(tokens_per_s, digits - 1 if tokens_per_s >= 10 else digits)
    return f"~{rounded:,.0f} tokens/s" if rounded >= 10 else f"~{tokens_per_s:.2g} tokens/s"


METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


def method_label(s) -> str:
    if s.method == "full":
        return "full fine-tuning"
    return f"{METHOD_NAMES[s.method]} r={s.lora_r}"


def setup_label(s, short: bool = False) -> str:
    """'QLoRA r=16 · bf16-true · paged_adamw_8bit · checkpointing · micro-batch 2 x 8'."""
    parts = [method_label(s).replace("full fine-tuning", "full") if short else method_label(s), s.precision, s.optim]
    if s.grad_ckpt:
        parts.append("ckpt" if short else "checkpointing")
    if s.allocator == "expandable":
        parts.append("expandable" if short else "expandable segments")
    parts.append(f"{s.micro_batch}x{s.grad_accum}" if short else f"micro-batch {s.micro_batch} x {s.grad_accum}")
    return (" " if short else " · ").join(parts)


def plan_verdict(p) -> str:
    c = p.chosen
    s = c.setup
    how = [method_label(s)]
    if s.method != "full":
        how[0] += f" ({s.targets})"
    how.append(f"micro-batch {s.micro_batch} x {s.grad_accum}")
    if s.grad_ckpt:
        how.append("checkpointing")
    return (f"[bold]{p.model}[/] fits on [bold]{p.device.name}[/] with {', '.join(how)}: "
            f"{fmt_bytes(c.device_bytes)} of {fmt_bytes(p.usable_bytes)} usable, {fmt_rate(c.tokens_per_s)}")


def plan_budget_line(p) -> str:
    where = {"probe": "free now", "profile": "on the card, less the driver's reservation", "size": "as given"}
    return (f"budget: {fmt_bytes(p.budget_bytes)} ({where[p.device.source]}) - {fmt_bytes(p.headroom_bytes)} "
            f"headroom ({p.headroom}) = {fmt_bytes(p.usable_bytes)} usable; seq_len {p.space.seq_len}, "
            f"effective batch {p.space.effective_batch}; {p.searched:,} setups searched")


def plan_candidates_table(p, limit: int = 8):
    """The best fitting setups, one per (method, precision, checkpointing)."""
    from rich.table import Table

    table = Table(title="best setups that fit", title_justify="left")
    for col, just in (("method", "left"), ("precision", "left"), ("optimizer", "left"), ("ckpt", "left"),
                      ("micro x accum", "right"), ("device GiB", "right"), ("left GiB", "right"), ("tokens/s", "right")):
        table.add_column(col, justify=just)
    seen = set()
    for c in p.candidates:
        s = c.setup
        family = (s.method, s.precision, s.grad_ckpt)
        if family in seen:
            continue
        seen.add(family)
        table.add_row(method_label(s), s.precision, s.optim + (" (expandable)" if s.allocator == "expandable" else ""),
                      "yes" if s.grad_ckpt else "no", f"{s.micro_batch} x {s.grad_accum}", gib(c.device_bytes),
                      gib(p.budget_bytes - c.device_bytes), f"{c.tokens_per_s:,.0f}",
                      style="bold" if c is p.chosen else None)
        if len(seen) >= limit:
            break
    return table


def plan_rejection_lines(p, limit: int = 6) -> list[str]:
    lines = []
    for r in p.rejections[:limit]:
        c = r.candidate
        lines.append(f"{METHOD_NAMES[c.setup.method]} {c.setup.precision} needs {fmt_bytes(c.device_bytes)} even at "
                     f"its smallest ({setup_label(c.setup)}): {gib(r.over_bytes)} GiB over")
    return lines


LEVER_LABELS = {"grad_ckpt": "checkpointing", "micro_batch": "micro-batch", "optim": "optimizer",
                "precision": "precision", "method": "method", "lora_r": "LoRA rank", "seq_len": "seq_len",
                "allocator": "allocator"}


def _lever_change(l, chosen) -> str:
    s, c = chosen.setup, l.candidate.setup
    if l.knob == "grad_ckpt":
        return "checkpointing " + ("on" if c.grad_ckpt else "off")
    if l.knob == "micro_batch":
        return f"micro-batch {s.micro_batch} x {s.grad_accum} -> {c.micro_batch} x {c.grad_accum}"
    if l.knob == "method":
        return f"{method_label(s)} -> {method_label(c)}" + (f" ({c.precision})" if c.precision != s.precision else "")
    if l.knob == "lora_r":
        return f"LoRA r={s.lora_r} -> r={c.lora_r}"
    if l.knob == "allocator":
        return "expandable segments " + ("on" if c.allocator == "expandable" else "off")
    return f"{LEVER_LABELS[l.knob]} {getattr(s, l.knob)} -> {getattr(c, l.knob)}"


def plan_levers_table(p, limit: int = 8):
    from rich.table import Table

    table = Table(title="levers of the chosen setup (one knob at a time)", title_justify="left")
    for col, just in (("change", "left"), ("device GiB", "right"), ("change GiB", "right"), ("tokens/s", "right"),
                      ("fits", "left")):
        table.add_column(col, justify=just)
    for l in p.levers[:limit]:
        c = l.candidate
        table.add_row(_lever_change(l, p.chosen), gib(c.device_bytes), f"{l.delta_bytes / GiB:+,.2f}",
                      f"{c.tokens_per_s:,.0f} ({l.speedup:.2f}x)", "yes" if c.fits else "[red]no[/]")
    return table


def plan_extra_lines(p) -> list[str]:
    s = p.chosen.setup
    lines = []
    if p.longest_seq_len is not None:
        lines.append(f"at this setup the longest sequence that fits is {p.longest_seq_len:,} tokens; the largest "
                     f"micro-batch is {p.largest_micro_batch}")
    kw = p.to_training_arguments_kwargs()
    lines.append("TrainingArguments/SFTConfig: " + ", ".join(f"{k}={v!r}" for k, v in kw.items()))
    if p.to_lora_config_kwargs():
        lines.append("LoraConfig: " + ", ".join(f"{k}={v!r}" for k, v in p.to_lora_config_kwargs().items()))
    if p.to_bnb_config_kwargs():
        lines.append("BitsAndBytesConfig: " + ", ".join(f"{k}={v!r}" for k, v in p.to_bnb_config_kwargs().items()))
    lines.append(f"from_pretrained: dtype={s.param_dtype}, attn_implementation={s.attn}")
    lines += list(p.notes)
    lines.append(f"tokens/s: cost model {p.cost_source}; the order of setups is more reliable than the numbers")
    return lines


def nothing_fits_line(p, longest_seq: int | None = None) -> str:
    c = p.closest
    line = (f"nothing fits {p.model} on {p.device.name} with {fmt_bytes(p.usable_bytes)} usable "
            f"({fmt_bytes(p.budget_bytes)} - {p.headroom} headroom) at seq_len {p.space.seq_len}: the smallest setup, "
            f"{setup_label(c.setup)}, needs {fmt_bytes(c.device_bytes)} "
            f"({gib(c.device_bytes - p.usable_bytes)} GiB over)")
    if longest_seq:
        line += f"; at micro-batch 1 it fits up to seq_len {longest_seq:,}"
    return line + "; try --find-gpu for the smallest card that fits"


# --------------------------------------------------------------------------- GPUs


def gpus_table(profiles: dict):
    from rich.table import Table

    table = Table(title="bundled GPU profiles (profiles/gpus.toml); --gpu takes the key", title_justify="left")
    for col, just in (("key", "left"), ("name", "left"), ("memory GiB", "right"), ("bf16", "left"),
                      ("TFLOPS", "right"), ("TB/s", "right")):
        table.add_column(col, justify=just)
    for key, d in profiles.items():
        tflops = d.bf16_tflops if d.bf16 else d.fp16_tflops
        table.add_row(key, d.name.removeprefix("NVIDIA "), gib(d.total_bytes), "yes" if d.bf16 else "no",
                      f"{tflops:,.0f}" + ("" if d.bf16 else " fp16"), f"{d.bandwidth_bytes_per_s / 1e12:.2f}")
    return table


def probe_table(found):
    from rich.table import Table

    table = Table(title=f"this machine: driver {found.driver_version}, CUDA {found.cuda_version}", title_justify="left")
    for col, just in (("#", "right"), ("name", "left"), ("total GiB", "right"), ("free GiB", "right"),
                      ("other processes GiB", "right"), ("compute cap.", "right"), ("bf16", "left"), ("profile", "left")):
        table.add_column(col, justify=just)
    for d in found.devices:
        table.add_row(str(d.index), d.name, gib(d.total_bytes), gib(d.free_bytes), gib(d.used_by_others_bytes),
                      d.compute_capability, "yes" if d.bf16 else "no", d.key or f"none ({d.throughput_from} assumed)")
    return table


def find_gpu_verdict(plans) -> str:
    fit = next((p for p in plans if p.chosen is not None), None)
    if fit is None:
        big = plans[-1]
        return (f"[bold]{big.model}[/] fits on none of the bundled GPUs; on the largest ({big.device.name}) the "
                f"smallest setup needs {fmt_bytes(big.closest.device_bytes)} of {fmt_bytes(big.usable_bytes)} usable")
    c = fit.chosen
    return (f"the smallest bundled GPU for [bold]{fit.model}[/] is the [bold]{fit.device.name}[/] "
            f"({fmt_bytes(fit.budget_bytes)}): {setup_label(c.setup)}, {fmt_bytes(c.device_bytes)} of "
            f"{fmt_bytes(fit.usable_bytes)} usable, {fmt_rate(c.tokens_per_s)}")


def find_gpu_table(plans):
    from rich.table import Table

    table = Table(title="every bundled GPU, smallest first", title_justify="left")
    for col, just in (("GPU", "left"), ("usable GiB", "right"), ("fits", "left"), ("best setup", "left"),
                      ("device GiB", "right"), ("tokens/s", "right")):
        table.add_column(col, justify=just)
    for p in plans:
        c = p.chosen
        if c is None:
            table.add_row(p.device.name, gib(p.usable_bytes), "[red]no[/]",
                          f"smallest needs {gib(p.closest.device_bytes)} GiB", "", "")
        else:
            table.add_row(p.device.name, gib(p.usable_bytes), "yes", setup_label(c.setup, short=True), gib(c.device_bytes),
                          f"{c.tokens_per_s:,.0f}")
    return table


def calibration_lines(data: dict) -> list[str]:
    c = data["constants"]
    lines = [f"calibrated {data['key']} in {data['seconds']} s -> {data['path']}",
             f"  CUDA context        {c['cuda_context_bytes'] / 2**20:8.0f} MiB",
             f"  kernels loaded      {c['kernel_growth_bytes'] / 2**20:8.0f} MiB",
             f"  cuBLAS workspaces   {c['cublas_workspace_bytes'] / 2**20:8.0f} MiB"]
    if data.get("model"):
        scale = list(data["activation_scale"].values())[-1]
        lines.append(f"  {data['model']}: real / traced saved activations = {scale:.4f}")
    return lines
