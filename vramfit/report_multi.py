"""Display of several-GPU estimates and plans (the multi-GPU half of report.py, kept apart while
issue 6 is merged): GiB only here, labelled."""

from __future__ import annotations

from vramfit.report import (
    estimate_summary,
    estimate_table,
    fmt_bytes,
    fmt_rate,
    gib,
    setup_label,
)


def gpus_estimate_table(d):
    """The per-GPU breakdown table of a DistEstimate, titled with the strategy."""
    table = estimate_table(d.per_gpu)
    table.title = f"{d.strategy} on {d.gpus} GPUs, per GPU · {table.title}"
    return table


def gpus_estimate_lines(d) -> list[str]:
    lines = [(f"per GPU: {gib(d.peak_allocated_bytes)} GiB allocated, {gib(d.peak_reserved_bytes)} GiB reserved, "
             f"{gib(d.device_bytes)} GiB device (nvidia-smi) on each of {d.gpus} GPUs")]
    if d.host_bytes:
        parts = ", ".join(f"{k.replace('_', ' ')} {gib(v)} GiB" for k, v in d.host_breakdown.items())
        lines.append(f"host memory (pinned, offload): {gib(d.host_bytes_per_rank)} GiB per rank ({parts}), "
                     f"{gib(d.host_bytes)} GiB for all {d.gpus} ranks")
    if d.comm_bytes_per_step:
        lines.append(f"communication: {gib(d.comm_bytes_per_step)} GiB sent per GPU per optimizer step")
    return lines + [x for x in estimate_summary(d.per_gpu) if not x.startswith("peak phase")] + \
        [f"peak phase: {d.breakdown.peak_phase}"]


def gpus_plan_verdict(p) -> str:
    c = p.chosen
    return (f"[bold]{p.model}[/] fits on [bold]{p.gpus.label}[/] with [bold]{c.strategy}[/], "
            f"{setup_label(c.setup)} per GPU: {fmt_bytes(c.device_bytes)} of {fmt_bytes(p.usable_bytes)} usable "
            f"per GPU, {fmt_rate(c.tokens_per_s)} over all GPUs")


def gpus_plan_lines(p) -> list[str]:
    lines = [(f"budget per GPU: {fmt_bytes(p.budget_bytes)} - {fmt_bytes(p.headroom_bytes)} headroom = "
             f"{fmt_bytes(p.usable_bytes)} usable; link {p.gpus.link}"
             + (f", between machines {p.gpus.inter_node_link}" if p.gpus.nodes > 1 else "")
             + f"; effective batch {p.effective_batch} "
             f"over {p.gpus.count} GPUs; {p.searched:,} (strategy, setup) pairs searched")]
    if p.chosen is not None and p.chosen.host_bytes:
        lines.append(f"host memory for offload: {fmt_bytes(p.chosen.host_bytes)} pinned (all ranks)")
    for name, why in p.skipped:
        lines.append(f"not searched: {name} ({why})")
    return lines + list(p.notes)


def gpus_strategy_table(p):
    from rich.table import Table

    table = Table(title="best setup per strategy (per-GPU memory, tokens/s over all GPUs)", title_justify="left")
    for col in ("strategy", "setup", "GiB per GPU", "host GiB", "tokens/s", "fits"):
        table.add_column(col, justify="right" if col in ("GiB per GPU", "host GiB", "tokens/s") else "left")
    for c in p.by_strategy:
        table.add_row(c.strategy, setup_label(c.setup, short=True), gib(c.device_bytes),
                      gib(c.host_bytes) if c.host_bytes else "-", f"{c.tokens_per_s:,.0f}",
                      "yes" if c.fits else f"no (+{gib(c.device_bytes - p.usable_bytes)})")
    return table


def rank_lines(rep: dict) -> list[str]:
    """One line per rank of a finished multi-GPU run: measured against predicted peaks."""
    predicted = rep["predicted"]["per_gpu"]
    lines = []
    for rank, r in enumerate(rep.get("measured_per_rank") or []):
        m = (r or {}).get("measured") or {}
        if m.get("peak_allocated_bytes") is None:
            rss = m.get("rss_bytes")
            lines.append(f"rank {rank}: no CUDA (host resident {gib(rss)} GiB)" if rss else f"rank {rank}: no reading")
            continue
        parts = [f"{label} {gib(m[k])} GiB (predicted {gib(predicted[k])})" for k, label in
                 (("peak_allocated_bytes", "allocated"), ("peak_reserved_bytes", "reserved"),
                  ("device_bytes", "device")) if m.get(k) is not None]
        lines.append(f"rank {rank}: " + ", ".join(parts))
    return lines
