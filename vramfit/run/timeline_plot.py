"""The memory timeline's plot (vramfit train's memory_timeline.png): allocated, reserved and device memory
over the run against the predicted peaks."""

from __future__ import annotations

GiB = 1 << 30


def memory_timeline_plot(records: list, path) -> None:
    """PNG of allocated / reserved / device memory over the run, the predicted peaks as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = next((r for r in records if r.get("kind") == "start"), {})
    samples = [r for r in records if "t" in r and r.get("kind") not in ("log", "summary")]
    pred = next((r["predicted"] for r in reversed(records) if r.get("predicted")), None) or {}
    fig, ax = plt.subplots(figsize=(10, 5))
    t = [r["t"] for r in samples]
    series = (("peak_allocated_bytes", "allocated (peak between readings)", "tab:blue"),
              ("peak_reserved_bytes", "reserved (peak between readings)", "tab:orange"),
              ("device_bytes", "device (NVML, this process)", "tab:green"))
    drew = False
    for key, label, color in series:
        pts = [(x, r[key] / GiB) for x, r in zip(t, samples) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label, color=color, linewidth=1.2)
            drew = True
        if pred.get(key):
            ax.axhline(pred[key] / GiB, color=color, linestyle="--", linewidth=1, label=f"predicted {label.split()[0]}")
    if not drew:
        pts = [(x, r["rss_bytes"] / GiB) for x, r in zip(t, samples) if r.get("rss_bytes") is not None]
        if pts:
            ax.plot(*zip(*pts), label="host resident memory (no CUDA)", color="tab:gray")
    limit = start.get("allocator_limit_bytes") or start.get("capacity_bytes")
    if limit:
        ax.axhline(limit / GiB, color="black", linewidth=1, label="allocator limit" if start.get(
            "allocator_limit_bytes") else "GPU capacity")
    for r in samples:
        if r.get("kind") == "event" and r.get("message") != "setup":
            ax.axvline(r["t"], color="red", linewidth=0.8)
            ax.annotate(str(r.get("message", ""))[:40], (r["t"], ax.get_ylim()[1]), rotation=90, va="top",
                        fontsize=7, color="red")
    title = f"memory over the run ({start.get('device') or 'CUDA absent'})"
    ax.set(xlabel="seconds since start", ylabel="GiB (2^30 bytes)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
