"""Rich tables and plots: the only place that turns bytes into GiB for people."""

from __future__ import annotations

from vramfit.memory.setup import LEVERS, SHOWN_FAMILIES, family

GiB = 1 << 30

COMPONENT_LABELS = {
    "weights_float32": "weights (fp32)",
    "weights_bfloat16": "weights (bf16)",
    "weights_float16": "weights (fp16)",
    "weights_4bit": "weights (4-bit NF4 + absmax)",
    "weights_fp32_unquantized": "weights not quantized (fp32)",
    "weights_16bit_unquantized": "weights not quantized (16-bit)",
    "lora_adapters": "LoRA adapters",
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
    title += " · fused loss (trl)" if s.loss == "fused" else ""
    title += " · padded batches" if getattr(s, "padded", False) else ""
    title += "".join(f" · {w}" for w in lever_words(s))
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


def peak_phase_line(est) -> str:
    """The phase of the peak: the replayed whole run's (load, forward, backward, optimizer, eval, save:
    each phase's allocated peak) when the replay answered, else the fitted step's."""
    if "load" in est.phases:  # the allocator replay's phases
        each = ", ".join(f"{name} {gib(b)}" for name, b in est.phases.items())
        return f"peak phase: {est.peak_phase}, of the whole run replayed ({each} GiB allocated)"
    return (f"peak phase: {est.peak_phase} (forward {gib(est.phases['forward'])}, backward "
            f"{gib(est.phases['backward'])}, optimizer {gib(est.phases['optimizer'])} GiB allocated)")


def estimate_summary(est) -> list[str]:
    lines = [
        f"parameters: {est.params_total:,} total, {est.params_trainable:,} trainable "
        f"({100 * est.params_trainable / max(est.params_total, 1):.4f}%)",
    ]
    if est.setup.method == "qlora":
        lines.append(f"base model with 4-bit weights counted packed (as model.num_parameters() shows): {est.params_packed:,}")
    lines.append(peak_phase_line(est))
    if est.host_bytes:
        lines.append(f"pinned host memory (activation offloading's copies of saved activations, outside the GPU "
                     f"figures): {fmt_bytes(est.host_bytes)}")
    lines += list(est.notes)
    lines.append(f"calibration: {est.calibration or 'none (constants measured on an H200, driver 580, CUDA 13, torch 2.11)'}")
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


def lever_words(s, short: bool = False) -> list:
    """The memory levers a setup turns on, in words."""
    out = []
    if s.liger:
        out.append("liger" if short else "Liger's kernels")
    if s.packing:
        out.append("packed" if short else f"packed ({s.tokens:,} tokens per micro-batch)")
    if s.activation_offloading:
        out.append("offload" if short else "activation offloading")
    if s.method == "qlora" and not s.kbit_prep:
        out.append("no-kbit-prep" if short else "no prepare_model_for_kbit_training")
    return out


def setup_label(s, short: bool = False) -> str:
    """'QLoRA r=16 · bf16-true · paged_adamw_8bit · checkpointing · micro-batch 2 x 8'."""
    parts = [method_label(s).replace("full fine-tuning", "full") if short else method_label(s), s.precision, s.optim]
    if s.grad_ckpt:
        parts.append("ckpt" if short else "checkpointing")
    if s.allocator == "expandable":
        parts.append("expandable" if short else "expandable segments")
    if s.loss == "fused":
        parts.append("fused-loss" if short else "trl fused loss")
    if getattr(s, "padded", False):
        parts.append("padded" if short else "padded batches")
    parts += lever_words(s, short)
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
    if s.allocator == "expandable":
        how.append("expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)")
    how.append("trl's fused loss (SFTTrainer, as vramfit train runs)" if s.loss == "fused"
               else "full-logits loss (transformers Trainer)")
    if s.liger:
        how.append("Liger's kernels (use_liger_kernel=True)")
    if s.packing:
        how.append(f"packing (bfd, padding-free: {s.tokens:,} tokens per micro-batch)")
    if s.activation_offloading:
        how.append("activation offloading")
    return (f"[bold]{p.model}[/] fits on [bold]{p.device.name}[/] with {', '.join(how)}: "
            f"{fmt_bytes(c.device_bytes)} of {fmt_bytes(p.usable_bytes)} usable, {fmt_rate(c.tokens_per_s)}")


def plan_budget_line(p) -> str:
    where = {"probe": "free now", "profile": "on the card, less the driver's reservation", "size": "as given"}
    return (f"budget: {fmt_bytes(p.budget_bytes)} ({where[p.device.source]}) - {fmt_bytes(p.headroom_bytes)} "
            f"headroom ({p.headroom}) = {fmt_bytes(p.usable_bytes)} usable; seq_len {p.space.seq_len}, "
            f"effective batch {p.space.effective_batch}; {p.searched:,} setups searched")


def plan_candidates_table(p, limit: int = SHOWN_FAMILIES):
    """The best fitting setups, one per family (`result.family`)."""
    from rich.table import Table

    title = "best setups that fit"
    fast = [c for c in p.candidates if not c.replayed]
    if p.replay:
        title += (" (device GiB: the allocator replay's" + ("; ~ the fast model's, not replayed" if fast else "")
                  + ")")
    table = Table(title=title, title_justify="left")
    with_levers = any(lever_words(c.setup) for c in p.candidates)
    cols = [("method", "left"), ("precision", "left"), ("optimizer", "left"), ("ckpt", "left")]
    cols += [("levers", "left")] if with_levers else []
    cols += [("micro x accum", "right"), ("device GiB", "right"), ("left GiB", "right"), ("tokens/s", "right")]
    for col, just in cols:
        table.add_column(col, justify=just)
    seen = set()
    for c in p.candidates:
        s = c.setup
        if family(s) in seen:
            continue
        seen.add(family(s))
        levers = [", ".join(lever_words(s, short=True)) or "-"] if with_levers else []
        table.add_row(method_label(s), s.precision, s.optim + (" (expandable)" if s.allocator == "expandable" else ""),
                      "yes" if s.grad_ckpt else "no", *levers, f"{s.micro_batch} x {s.grad_accum}",
                      _approx(p, c) + gib(c.device_bytes), gib(p.budget_bytes - c.device_bytes),
                      f"{c.tokens_per_s:,.0f}", style="bold" if c is p.chosen else None)
        if len(seen) >= limit:
            break
    return table


def _approx(p, c) -> str:
    """'~' before a figure of a replayed plan that is the fast model's."""
    return "~" if p.replay and not c.replayed else ""


def plan_rejection_lines(p, limit: int = 6) -> list[str]:
    lines = []
    for r in p.rejections[:limit]:
        c = r.candidate
        lines.append(f"{METHOD_NAMES[c.setup.method]} {c.setup.precision} needs {_approx(p, c)}"
                     f"{fmt_bytes(c.device_bytes)} even at "
                     f"its smallest ({setup_label(c.setup)}): {gib(r.over_bytes)} GiB over")
    return lines


LEVER_LABELS = {"grad_ckpt": "checkpointing", "micro_batch": "micro-batch", "optim": "optimizer",
                "precision": "precision", "method": "method", "lora_r": "LoRA rank", "seq_len": "seq_len",
                "allocator": "allocator", "liger": "Liger's kernels", "packing": "packing",
                "activation_offloading": "activation offloading",
                "kbit_prep": "prepare_model_for_kbit_training"}


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
    if l.knob in LEVERS or l.knob == "kbit_prep":
        return ("with " if getattr(c, l.knob) else "without ") + LEVER_LABELS[l.knob]
    return f"{LEVER_LABELS[l.knob]} {getattr(s, l.knob)} -> {getattr(c, l.knob)}"


def plan_levers_table(p, limit: int = 8):
    from rich.table import Table

    fast = p.replay and any(not l.candidate.replayed for l in p.levers[:limit])
    title = "levers of the chosen setup (one knob at a time" + ("; ~ the fast model's figure, not replayed)" if fast
                                                                 else ")")
    table = Table(title=title, title_justify="left")
    for col, just in (("change", "left"), ("device GiB", "right"), ("change GiB", "right"), ("tokens/s", "right"),
                      ("fits", "left")):
        table.add_column(col, justify=just)
    for l in p.levers[:limit]:
        c = l.candidate
        table.add_row(_lever_change(l, p.chosen), _approx(p, c) + gib(c.device_bytes), f"{l.delta_bytes / GiB:+,.2f}",
                      f"{c.tokens_per_s:,.0f} ({l.speedup:.2f}x)", "yes" if c.fits else "[red]no[/]")
    return table


def plan_extra_lines(p) -> list[str]:
    s = p.chosen.setup
    lines = []
    if p.longest_seq_len is not None:
        lines.append(f"at this setup the longest sequence that fits is {p.longest_seq_len:,} tokens; the largest "
                     f"micro-batch is {p.largest_micro_batch}" + (" (the fast model's bounds)" if p.replay else ""))
    kw = p.to_training_arguments_kwargs()
    lines.append("TrainingArguments/SFTConfig: " + ", ".join(f"{k}={v!r}" for k, v in kw.items()))
    trl_only = {k: v for k, v in p.to_sft_config_kwargs().items() if k not in kw}
    if s.packing or s.activation_offloading:
        lines.append("SFTConfig (trl) also: " + ", ".join(f"{k}={v!r}" for k, v in trl_only.items()))
    if p.to_lora_config_kwargs():
        lines.append("LoraConfig: " + ", ".join(f"{k}={v!r}" for k, v in p.to_lora_config_kwargs().items()))
    if p.to_bnb_config_kwargs():
        lines.append("BitsAndBytesConfig: " + ", ".join(f"{k}={v!r}" for k, v in p.to_bnb_config_kwargs().items()))
    lines.append(f"from_pretrained: dtype={s.param_dtype}, attn_implementation={s.attn}")
    lines += list(p.notes)
    lines += plan_memory_lever_lines(p)
    lines.append(f"tokens/s: cost model {p.cost_source}; the order of setups is more reliable than the numbers")
    return lines


def plan_memory_lever_lines(p) -> list[str]:
    """One line per memory lever of the chosen setup: 'with Liger's kernels (use_liger_kernel=True):
    3.10 GiB less, 1.20x tokens/s (measured ...)' (the replay's memory where replayed, the measured speed)."""
    speeds, switches = p.lever_speeds(), p.lever_switches()
    out = []
    for l in p.levers:
        if l.knob not in LEVERS:
            continue
        on = getattr(l.candidate.setup, l.knob)
        d = l.delta_bytes
        mem = "the same memory" if abs(d) < (1 << 20) else f"{_approx(p, l.candidate)}{gib(abs(d))} GiB " \
                                                           f"{'less' if d < 0 else 'more'}"
        sp = speeds[l.knob]
        loss = l.candidate.setup.loss
        speed = (f"{l.speedup:.2f}x tokens/s ({LEVER_LABELS[l.knob]} measured {sp.ratio_for(loss):.2f}x: "
                 f"{sp.evidence()})" if sp.measured_for(loss) else sp.text(loss))
        if l.knob == "packing" and p.space.rows_median is not None and p.space.rows_median < p.space.seq_len:
            speed += (f"; unpacked, tokens/s counts the padding too (rows of median {p.space.rows_median:,} tokens "
                      f"padded to the longest of their batch)")
        fits = "" if l.candidate.fits else "; does not fit"
        if l.candidate.host_bytes:
            fits += f"; {gib(l.candidate.host_bytes)} GiB pinned host memory"
        switch = f" ({switches[l.knob]})" if on else ""
        out.append(f"{'with' if on else 'without'} {LEVER_LABELS[l.knob]}{switch}: {mem}, {speed}{fits}")
    if out:
        fast = any(not l.candidate.replayed for l in p.levers if l.knob in LEVERS)
        out.insert(0, "memory levers of the chosen setup (" + ("~ the fast model's memory, not replayed; " if fast
                                                               else "the allocator replay's memory; ")
                   + "tokens/s factors from benchmarks/results, 1.00x where not measured):")
    return ["  " + x if i else x for i, x in enumerate(out)]


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


# --------------------------------------------------------------------------- train


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def data_report_lines(d) -> list[str]:
    """What was read, what was dropped, and the token lengths, before any GPU work."""
    t, n = d.train, d.lengths
    how = "detected" if t.detected else "forced with --format"
    lines = [f"data: {t.source}: {t.total_rows:,} rows, format {t.format} ({how}); {len(t.rows):,} for training, "
             f"{len(d.eval_rows):,} for validation ({d.eval_source})"]
    if t.bad_rows:
        lines.append(f"skipped {len(t.bad_rows):,} bad rows: " + "; ".join(str(b) for b in t.bad_rows[:5])
                     + (" ..." if len(t.bad_rows) > 5 else ""))
    lines.append(f"tokens per row: median {n.p50:,}, p99 {n.p99:,}, max {n.max:,} (mean {n.mean:,.1f}); "
                 f"{n.over_max_seq_len:,} of {n.count:,} rows are over --max-seq-len {n.max_seq_len:,} and will be "
                 f"truncated")
    basis = "the longest row" if d.seq_len_basis == "max" else "the 99th percentile row"
    capped = " (capped by --max-seq-len)" if d.seq_len < (n.max if d.seq_len_basis == "max" else n.p99) else ""
    lines.append(f"sequence length for the memory prediction: {d.seq_len:,} tokens = {basis}{capped}")
    return lines


def packing_line(s, d) -> str:
    """How a packed run fills its micro-batches, from the data's token lengths."""
    n = d.lengths
    per_row = s.seq_len / max(n.mean, 1.0)
    return (f"packing (trl, bfd, padding-free): rows of {s.seq_len:,} tokens, ~{per_row:,.1f} examples each "
            f"(mean {n.mean:,.1f} tokens, median {n.p50:,}); a micro-batch is {s.micro_batch} rows = "
            f"{s.tokens:,} tokens flattened into one")


def prediction_line(setup, predicted: dict, budget_bytes: int | None) -> str:
    where = f" of {fmt_bytes(budget_bytes)} available" if budget_bytes else " (no CUDA GPU: not checked against one)"
    return (f"setup: {setup_label(setup)} · seq {setup.seq_len:,}; predicted peaks: allocated "
            f"{fmt_bytes(predicted['peak_allocated_bytes'])}, reserved {fmt_bytes(predicted['peak_reserved_bytes'])}, "
            f"device {fmt_bytes(predicted['device_bytes'])}{where}")


def _gib_or_dash(n) -> str:
    return gib(n) if n is not None else "-"


def memory_summary_table(summary: dict):
    """Predicted against measured peaks (the tracker's summary)."""
    from rich.table import Table

    table = Table(title="memory: predicted vs measured", title_justify="left")
    for col, just in (("peak", "left"), ("predicted GiB", "right"), ("measured GiB", "right"), ("error", "right")):
        table.add_column(col, justify=just)
    pred = summary.get("predicted") or {}
    for key, label in (("peak_allocated_bytes", "allocated (torch)"), ("peak_reserved_bytes", "reserved (torch)"),
                       ("device_bytes", "device (NVML, this process)")):
        err = summary["relative_error"].get(key)
        table.add_row(label, _gib_or_dash(pred.get(key)), _gib_or_dash(summary["measured"].get(key)),
                      f"{100 * err:+.1f}%" if err is not None else "-")
    if not summary.get("cuda"):
        table.caption = f"CUDA absent; host resident memory peaked at {_gib_or_dash(summary['measured'].get('rss_bytes'))} GiB"
    return table


def train_status(step: int, max_steps: int, elapsed_s: float, tokens_per_s: float | None, loss, eval_loss,
                 reading: dict, predicted: dict | None) -> dict:
    """The figures the live view and the plain log line show, computed once."""
    eta = elapsed_s / step * (max_steps - step) if step else None
    return dict(step=step, max_steps=max_steps, elapsed_s=elapsed_s, eta_s=eta, tokens_per_s=tokens_per_s,
                loss=loss, eval_loss=eval_loss, reading=reading or {}, predicted=predicted or {})


def train_status_line(s: dict) -> str:
    """One plain line for a pipe or CI log."""
    parts = [f"step {s['step']}/{s['max_steps']}"]
    if s["loss"] is not None:
        parts.append(f"loss {s['loss']:.4f}")
    if s["eval_loss"] is not None:
        parts.append(f"eval_loss {s['eval_loss']:.4f}")
    if s["tokens_per_s"]:
        parts.append(f"{s['tokens_per_s']:,.0f} tokens/s")
    r, p = s["reading"], s["predicted"]
    if r.get("peak_allocated_bytes") is not None:
        parts.append(f"allocated {gib(r['peak_allocated_bytes'])}/{_gib_or_dash(p.get('peak_allocated_bytes'))} GiB "
                     f"predicted")
    if r.get("device_bytes") is not None:
        parts.append(f"device {gib(r['device_bytes'])}/{_gib_or_dash(p.get('device_bytes'))} GiB predicted")
    if r.get("peak_allocated_bytes") is None and r.get("rss_bytes") is not None:
        parts.append(f"host RSS {gib(r['rss_bytes'])} GiB (no CUDA)")
    parts.append(f"{fmt_duration(s['elapsed_s'])} elapsed, ETA {fmt_duration(s['eta_s'])}")
    return " · ".join(parts)


def _gauge(label: str, value, predicted, capacity, width: int = 40) -> str:
    """A bar of `value` with the prediction as a red mark; the scale leaves room above both."""
    if value is None:
        return f"{label:<10} -"
    full = 1.2 * max(x for x in (value, predicted, 1) if x is not None)
    if capacity:
        full = min(full, capacity)
    filled = min(width, int(width * value / full))
    mark = min(width - 1, int(width * predicted / full)) if predicted else None
    bar = "".join("[red]|[/]" if i == mark else ("█" if i < filled else "·") for i in range(width))
    tail = f"{gib(value)} GiB" + (f" / predicted {gib(predicted)}" if predicted else "")
    tail += f" / capacity {gib(capacity)}" if capacity else ""
    return f"{label:<10} {bar} {tail}"


def train_live(s: dict, capacity_bytes: int | None = None):
    """The terminal view: progress and memory gauges against the predicted peaks (red mark)."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    r, p = s["reading"], s["predicted"]
    grid = Table.grid(padding=(0, 1))
    grid.add_column()
    grid.add_row(ProgressBar(total=max(s["max_steps"], 1), completed=s["step"], width=50))
    grid.add_row(Text(train_status_line({**s, "reading": {}})))
    if r.get("peak_allocated_bytes") is not None:
        for key, label in (("peak_allocated_bytes", "allocated"), ("peak_reserved_bytes", "reserved"),
                           ("device_bytes", "device")):
            grid.add_row(Text.from_markup(_gauge(label, r.get(key), p.get(key), capacity_bytes)))
    else:
        grid.add_row(Text(f"no CUDA: host RSS {_gib_or_dash(r.get('rss_bytes'))} GiB"))
    return grid


def fallback_line(f: dict) -> str:
    """What the OOM fall-back did, for the log."""
    how = f"resumed from {f['resumed_from']}" if f.get("resumed_from") else "restarted (no checkpoint yet)"
    measured = f" (measured {fmt_bytes(f['measured_bytes'])} against {fmt_bytes(f['predicted_bytes'])} predicted)" \
        if f.get("measured_bytes") else ""
    return (f"out of memory at step {f['step']}{measured}: {setup_label_from_json(f['setup_before'])} -> "
            f"{setup_label_from_json(f['setup_after'])}; {how}")


def setup_label_from_json(d: dict) -> str:
    from vramfit.memory.setup import Setup

    return setup_label(Setup(**{k: v for k, v in d.items() if k in Setup.__dataclass_fields__ and v is not None}))


def run_summary_lines(rep: dict) -> list[str]:
    lines = [f"run {rep['status']}: {rep['steps']} of {rep['max_steps']} steps in {fmt_duration(rep['train_seconds'])}"]
    if rep.get("final_loss") is not None:
        lines[0] += f", final loss {rep['final_loss']:.4f}"
    if rep.get("best_eval_loss") is not None:
        lines[0] += f", best eval_loss {rep['best_eval_loss']:.4f}"
    for f in rep.get("fallbacks", []):
        lines.append(fallback_line(f))
    t = rep.get("throughput")
    if t:
        line = f"training steps: {t['tokens_per_s']:,.0f} tokens/s over {t['steps']} steps (the first and evaluation/saving left out)"
        if t.get("mfu") is not None:
            line += (f", model FLOPs utilization {100 * t['mfu']:.1f}% ({t['model_flops_per_token'] / 1e9:,.1f} GFLOP a "
                     f"token of the {t['gpu_profile']}'s {t['peak_flops'] / 1e12:,.0f} dense TFLOP/s)")
        lines.append(line)
    for key, label in (("adapter", "adapter"), ("model", "model"), ("checkpoint", "checkpoint"),
                       ("report", "run report"), ("timeline", "memory timeline"), ("plot", "memory plot")):
        if rep["outputs"].get(key):
            lines.append(f"{label}: {rep['outputs'][key]}")
    if rep["status"] == "interrupted":
        lines.append("continue with the same command and --resume")
    return lines
