"""Several GPUs: what `--gpus` names (GpuSet), and the planner's search over strategies on them.

`--gpus` forms:
  4x24GB / 2x80GiB       N cards known by their size (throughput from the stand-in profile)
  2xh100-sxm / 8xa100    N cards of a bundled profile (its interconnect from profiles/gpus.toml)
  auto                   every GPU NVML probes on this machine (they must be the same model)
  2                      the first 2 probed GPUs (for `vramfit estimate`, just the count)
  2x8xh100-sxm           2 machines (nodes) of 8 cards each: 16 ranks; the link between the
                         machines is priced apart from the one inside them (INTER_NODE_BYTES_PER_S)

The search (`search_gpus`) is the single-GPU planner's recipe with one more axis: each setup of
the space is tried under every strategy that the setup and the installed packages allow, with
the effective batch shared out over the GPUs (micro-batch x accumulation x N), each candidate's
per-GPU device bytes against one GPU's usable memory, and its time per token including the
communication the strategy adds (vramfit.memory.distributed.communication_bytes) over the link.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, replace

from vramfit.memory.distributed import (
    DEFAULT_HOST_LINK_BYTES_PER_S,
    STRATEGIES,
    check_combination,
    estimate_distributed,
    get_strategy,
)
from vramfit.errors import VramfitError
from vramfit.planner.cost import DEFAULT_COST, seconds_per_token
from vramfit.planner.result import Candidate
from vramfit.planner.search import _rank_key, parse_headroom
from vramfit.planner.space import DEFAULT_EFFECTIVE_BATCH, DEFAULT_HEADROOM, DEFAULT_SEQ_LEN, divisors, make_space

# Fraction of a step's communication that is not hidden behind compute.  DDP overlaps its bucket
# all-reduces with backward, FSDP2 prefetches the next layer's all-gather, DeepSpeed overlaps with
# overlap_comm; none hides all of it.  A prior until the 2-GPU proof measures step times.
COMM_EXPOSED_FRACTION = 0.3
# Fraction of a link's per-direction peak that NCCL's ring collectives reach on large messages
# (nccl-tests bus bandwidth is typically 70-85% of the NVLink / PCIe peak).
LINK_EFFICIENCY = 0.8
# The link between machines, per GPU and direction, when --gpus names several nodes: one 400 Gb/s
# NIC per GPU (InfiniBand NDR or 400 GbE RoCE), as NVIDIA's DGX H100 / HGX reference systems pair
# eight ConnectX-7 400 Gb/s adapters with eight GPUs (docs.nvidia.com/dgx/dgxh100-user-guide,
# "Network ports"); 400 Gb/s = 50 GB/s.
INTER_NODE_BYTES_PER_S = 50_000_000_000
INTER_NODE_LINK = "400 Gb/s per GPU between machines (assumed)"
# DeepSpeedCPUAdam's update rate per rank, parameters per second: a prior (the ZeRO-Offload paper,
# Ren et al. 2021, reports CPU-Adam updating ~1B parameters in well under a second on a server CPU).
CPU_ADAM_PARAMS_PER_S = 1.0e9


@dataclass(frozen=True)
class GpuSet:
    """N identical GPUs of one machine."""

    count: int
    device: object  # vramfit.planner.gpu.Device: one of them (the smallest free memory when probed)
    link_bytes_per_s: int  # GPU-to-GPU, per direction
    link: str  # as people name it ("NVLink 4 900 GB/s", "PCIe 4.0 x16")
    source: str  # size | profile | probe
    note: str = ""
    nodes: int = 1  # machines; count is all GPUs of all of them (the ranks)
    inter_node_bytes_per_s: int = INTER_NODE_BYTES_PER_S  # per GPU and direction, between machines
    inter_node_link: str = INTER_NODE_LINK

    @property
    def per_node(self) -> int:
        return self.count // max(self.nodes, 1)

    @property
    def label(self) -> str:
        if self.nodes > 1:
            return f"{self.nodes} nodes x {self.per_node} x {self.device.name}"
        return f"{self.count} x {self.device.name}"


def _interconnects() -> dict:
    from vramfit.planner.gpu import gpu_table

    return {k: (int(g.get("interconnect_bytes_per_s", DEFAULT_HOST_LINK_BYTES_PER_S)),
                g.get("interconnect", "PCIe 4.0 x16 (assumed)")) for k, g in gpu_table().items()}


def resolve_gpus(text) -> GpuSet:
    """What follows `--gpus` -> GpuSet (module docstring for the forms)."""
    from vramfit.planner.gpu import probe, resolve_gpu

    raw = str(text if text is not None else "").strip().lower()
    if not raw:
        raise VramfitError("--gpus is empty: give a count and a GPU (2xh100, 4x24GB) or auto")
    if raw == "auto" or raw.isdigit():
        found = probe().devices
        want = len(found) if raw == "auto" else int(raw)
        if want < 1:
            raise VramfitError(f"--gpus must be at least 1, got {raw}")
        if want > len(found):
            raise VramfitError(f"--gpus {want}: this machine has {len(found)} GPU{'s' * (len(found) != 1)} "
                               f"({', '.join(d.name for d in found)})")
        chosen = found[:want]
        names = {d.name for d in chosen}
        if len(names) > 1:
            raise VramfitError(f"mismatched GPUs: {', '.join(f'{d.index}: {d.name}' for d in chosen)}; vramfit plans "
                               f"data-parallel runs on identical GPUs: pick them with CUDA_VISIBLE_DEVICES and --gpus N")
        smallest = min(chosen, key=lambda d: d.free_bytes)
        bw, link = _interconnects().get(smallest.throughput_from or "", (DEFAULT_HOST_LINK_BYTES_PER_S,
                                                                          "PCIe 4.0 x16 (assumed)"))
        return GpuSet(want, smallest, bw, link, "probe",
                      note="budget: the smallest free memory among the probed GPUs")
    multi = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)\s*[x*]\s*(.+)", raw)
    if multi:
        nodes, per_node = int(multi.group(1)), int(multi.group(2))
        if nodes < 1 or per_node < 1:
            raise VramfitError(f"--gpus '{text}': nodes and GPUs per node must be at least 1")
        one = resolve_gpus(f"{per_node}x{multi.group(3)}")
        return replace(one, count=nodes * per_node, nodes=nodes)
    m = re.fullmatch(r"(\d+)\s*[x*]\s*(.+)", raw)
    if not m:
        raise VramfitError(f"--gpus '{text}': write N x GPU (2xh100, 4x24GB, 8xa100-80gb) or auto")
    count = int(m.group(1))
    if count < 1:
        raise VramfitError(f"--gpus '{text}': the count must be at least 1")
    device = resolve_gpu(m.group(2))
    if device.source == "probe":
        raise VramfitError(f"--gpus '{text}': use --gpus auto or --gpus N for this machine's GPUs")
    key = device.key or device.throughput_from
    bw, link = _interconnects().get(key or "", (DEFAULT_HOST_LINK_BYTES_PER_S, "PCIe 4.0 x16 (assumed)"))
    note = "" if device.source == "profile" else f"link assumed: {link} (name the card for its own)"
    return GpuSet(count, device, bw, link, device.source, note=note)


# --------------------------------------------------------------------------- what can run here


def missing_package(strategy_name: str) -> str | None:
    """A line saying what is missing to run `strategy_name` on this machine; None if all is there."""
    st = get_strategy(strategy_name)
    if st.package == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return f"strategy {st.name} needs DeepSpeed, which is not installed: pip install deepspeed"
    if importlib.util.find_spec("accelerate") is None:
        return "multi-GPU runs start through accelerate launch: pip install accelerate"
    return None


# --------------------------------------------------------------------------- cost


def step_seconds(spec, s, strategy, gpus: GpuSet, est, targets=(), cost=DEFAULT_COST) -> float:
    """Seconds of one optimizer step on every GPU: compute (the single-GPU cost model on this GPU's
    share), the exposed part of the communication, and the offload's host traffic and CPU Adam."""
    from vramfit.memory.distributed import engine_setup
    from vramfit.planner.cost import optimizer_step_bytes

    st = get_strategy(strategy)
    run = engine_setup(st, s)
    tokens = s.tokens * s.grad_accum
    compute = seconds_per_token(spec, run, gpus.device, targets, cost) * tokens
    if st.sharded:  # each GPU steps the optimizer on its 1/N of the states
        bw = gpus.device.bandwidth_bytes_per_s * cost.bandwidth_efficiency
        compute -= optimizer_step_bytes(spec, run, targets) / bw * (1 - 1 / gpus.count)
    comm = communication_seconds(est.comm_bytes_per_step, gpus) * COMM_EXPOSED_FRACTION
    offload = 0.0
    if st.offload_optimizer:
        offload = est.host_link_bytes_per_step / (DEFAULT_HOST_LINK_BYTES_PER_S * LINK_EFFICIENCY)
        trainable = spec.params_total if s.method == "full" else est.breakdown.params_trainable
        offload += trainable / gpus.count / CPU_ADAM_PARAMS_PER_S
    return compute + comm + offload


def inter_node_bytes(comm_bytes: int, gpus: GpuSet) -> int:
    """Of the bytes one GPU sends per step, those that cross between machines.  NCCL runs a
    collective over several nodes hierarchically (reduce-scatter / all-gather inside each machine,
    the rest between machines: each GPU carries 1/per_node of the data over its NIC, to M-1 of M
    nodes): ring bytes over all N ranks scale by (N-1)/N, the inter-node part by (M-1)/M / per_node."""
    n, m = gpus.count, max(gpus.nodes, 1)
    if m <= 1 or n <= 1:
        return 0
    return int(comm_bytes * ((m - 1) / m) / ((n - 1) / n) / gpus.per_node)


def communication_seconds(comm_bytes: int, gpus: GpuSet) -> float:
    """Seconds of one step's communication on the wire: the intra-machine part over the GPUs' link
    and, across machines, the inter-node part over the slower network, priced apart."""
    inter = inter_node_bytes(comm_bytes, gpus)
    seconds = comm_bytes / (gpus.link_bytes_per_s * LINK_EFFICIENCY)
    if inter:
        seconds += inter / (gpus.inter_node_bytes_per_s * LINK_EFFICIENCY)
    return seconds


# --------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class GpusCandidate(Candidate):
    """A candidate on N GPUs: per-GPU bytes, global tokens/s."""

    strategy: str = "ddp"
    gpus: int = 1
    host_bytes: int = 0  # pinned host memory of all ranks (offload)
    comm_bytes_per_step: int = 0

    def to_json(self) -> dict:
        return {**super().to_json(), "strategy": self.strategy, "gpus": self.gpus, "host_bytes": self.host_bytes,
                "comm_bytes_per_step": self.comm_bytes_per_step}


@dataclass(frozen=True)
class GpusPlan:
    model: str
    gpus: GpuSet
    budget_bytes: int  # one GPU's free memory
    headroom_bytes: int
    effective_batch: int  # sequences per optimizer step, over all GPUs
    seq_len: int
    chosen: GpusCandidate | None
    candidates: tuple  # fitting, best first
    closest: GpusCandidate  # smallest per-GPU footprint searched
    by_strategy: tuple  # the best fitting candidate (or the closest) of each strategy searched
    searched: int
    skipped: tuple  # (strategy, why) not searched: package missing, count not dividing the batch
    host_budget_bytes: int | None = None
    notes: tuple = ()

    @property
    def usable_bytes(self) -> int:
        return self.budget_bytes - self.headroom_bytes

    @property
    def setup(self):
        if self.chosen is None:
            raise VramfitError(nothing_fits_line(self))
        return self.chosen.setup

    def to_json(self) -> dict:
        from dataclasses import asdict

        return {"model": self.model, "gpus": self.gpus.count, "nodes": self.gpus.nodes,
                "inter_node_link": self.gpus.inter_node_link if self.gpus.nodes > 1 else None,
                "inter_node_bytes_per_s": self.gpus.inter_node_bytes_per_s if self.gpus.nodes > 1 else None,
                "device": asdict(self.gpus.device),
                "link": self.gpus.link, "link_bytes_per_s": self.gpus.link_bytes_per_s,
                "budget_bytes_per_gpu": self.budget_bytes, "headroom_bytes": self.headroom_bytes,
                "usable_bytes_per_gpu": self.usable_bytes, "effective_batch": self.effective_batch,
                "seq_len": self.seq_len, "chosen": self.chosen.to_json() if self.chosen else None,
                "candidates": [c.to_json() for c in self.candidates[:20]], "fitting_count": len(self.candidates),
                "by_strategy": [c.to_json() for c in self.by_strategy], "closest": self.closest.to_json(),
                "searched": self.searched, "skipped": [{"strategy": n, "why": w} for n, w in self.skipped],
                "host_budget_bytes": self.host_budget_bytes, "notes": list(self.notes)}


def nothing_fits_line(p: GpusPlan) -> str:
    from vramfit.report import fmt_bytes, setup_label

    c = p.closest
    return (f"nothing fits on {p.gpus.label} ({fmt_bytes(p.usable_bytes)} usable per GPU): the smallest is "
            f"{c.strategy} with {setup_label(c.setup)} at {fmt_bytes(c.device_bytes)} per GPU, "
            f"{fmt_bytes(c.device_bytes - p.usable_bytes)} over")


def search_gpus(spec, gpus: GpuSet, space, strategies=None, headroom=DEFAULT_HEADROOM, prefer: str = "speed",
                constants=None, cost=None, host_budget_bytes: int | None = None,
                installed_only: bool = True) -> GpusPlan:
    """Every (strategy, setup) of `space` on `gpus`.  `space.effective_batch` is global: a setup's
    micro-batch x accumulation x N must equal it."""
    cost = cost or DEFAULT_COST
    budget = gpus.device.free_bytes
    headroom_bytes = parse_headroom(headroom, budget)
    usable = budget - headroom_bytes
    names = list(strategies or STRATEGIES)
    skipped = []
    if installed_only:
        for n in list(names):
            why = missing_package(n)
            if why:
                skipped.append((n, why))
                names.remove(n)
    if space.effective_batch % gpus.count:
        raise VramfitError(f"the effective batch {space.effective_batch} does not divide over {gpus.count} GPUs: "
                           f"give --effective-batch as a multiple of {gpus.count}")
    per_gpu = space.effective_batch // gpus.count
    local = replace(space, effective_batch=per_gpu,
                    micro_batch=space.micro_batch if space.micro_batch in divisors(per_gpu) else None)
    setups = local.setups(gpus.device.bf16)
    cands, memo = [], {}
    for name in names:
        miss = {}
        for s in setups:
            try:
                check_combination(get_strategy(name), s, gpus.count)
            except VramfitError:
                continue
            family = (s.method, s.precision, s.optim, s.grad_ckpt, s.allocator, s.lora_r, s.seq_len)
            if family in miss:  # a smaller micro-batch already misses: so does this one
                continue
            key = (name, s)
            est = memo.get(key) or estimate_distributed(spec, s, name, gpus.count, constants)
            memo[key] = est
            secs = step_seconds(spec, s, name, gpus, est, _targets(spec, s), cost)
            fits = est.device_bytes <= usable and (host_budget_bytes is None or est.host_bytes <= host_budget_bytes)
            c = GpusCandidate(setup=s, device_bytes=est.device_bytes, peak_allocated_bytes=est.peak_allocated_bytes,
                              peak_reserved_bytes=est.peak_reserved_bytes,
                              seconds_per_token=secs / (s.tokens * s.grad_accum * gpus.count), fits=fits,
                              strategy=name, gpus=gpus.count, host_bytes=est.host_bytes,
                              comm_bytes_per_step=est.comm_bytes_per_step)
            if not fits:
                miss[family] = c
            cands.append(c)
    if not cands:
        raise VramfitError(f"no strategy can run here: {'; '.join(w for _, w in skipped) or 'none given'}")
    fitting = tuple(sorted((c for c in cands if c.fits), key=rank_key(prefer)))
    closest = min(cands, key=lambda c: (c.device_bytes, c.seconds_per_token))
    best = {}
    for c in list(fitting) + sorted(cands, key=lambda c: c.device_bytes):
        best.setdefault(c.strategy, c)
    notes = tuple(x for x in (gpus.note, gpus.device.note) if x)
    return GpusPlan(model=spec.name, gpus=gpus, budget_bytes=budget, headroom_bytes=headroom_bytes,
                    effective_batch=space.effective_batch, seq_len=space.seq_len, chosen=fitting[0] if fitting else None,
                    candidates=fitting, closest=closest, by_strategy=tuple(best.values()), searched=len(cands),
                    skipped=tuple(skipped), host_budget_bytes=host_budget_bytes, notes=notes)


# Within the speed tie (planner.SPEED_TIE), the plainer engine wins: DDP, then FSDP (in torch),
# then DeepSpeed, then offload (host memory and a compiled CPU optimizer).
STRATEGY_DEVIATION = {"ddp": 0, "fsdp-full": 1, "fsdp-grad-op": 1, "zero1": 2, "zero2": 2, "zero3": 2,
                      "zero2-offload": 3, "zero3-offload": 3}


def rank_key(prefer: str):
    base = _rank_key(prefer)
    if prefer == "memory":
        return base
    return lambda c: (base(c)[0], STRATEGY_DEVIATION.get(c.strategy, 4)) + tuple(base(c)[1:])


def _targets(spec, s):
    from vramfit.memory.setup import resolve_targets

    return resolve_targets(spec, s)


def plan_gpus(model, gpus="auto", *, strategy: str | None = None, headroom=DEFAULT_HEADROOM, method: str = "auto",
              prefer: str = "speed", seq_len: int = DEFAULT_SEQ_LEN, effective_batch: int = DEFAULT_EFFECTIVE_BATCH,
              micro_batch: int | None = None, lora_r: int | None = None, lora_alpha: int | None = None,
              target_modules: str | None = None, precision: str | None = None, optim: str | None = None,
              grad_ckpt: bool | None = None, allocator: str | None = None, attn: str = "sdpa", constants=None,
              cost=None, host_budget_bytes: int | None = None, installed_only: bool = True,
              trust_remote_code: bool = False) -> GpusPlan:
    """The best (strategy, setup) of MODEL on GPUS ("4x24GB", "2xh100", "auto", a GpuSet).
    Nothing fits: VramfitError naming the closest."""
    from vramfit.planner.search import _check_choice, _resolve

    spec, _, constants = _resolve(model, None, constants, trust_remote_code)
    gset = gpus if isinstance(gpus, GpuSet) else resolve_gpus(gpus)
    _check_choice("prefer", prefer, ("speed", "memory"))
    _check_choice("method", method, ("auto", "full", "lora", "qlora"))
    strategies = None
    if strategy is not None:
        get_strategy(strategy)
        why = missing_package(strategy) if installed_only else None
        if why:
            raise VramfitError(why)
        strategies = (strategy,)
    if micro_batch is not None and (effective_batch % gset.count or (effective_batch // gset.count) % micro_batch):
        raise VramfitError(f"micro-batch {micro_batch} x {gset.count} GPUs does not divide the effective batch "
                           f"{effective_batch}")
    space = make_space(spec, gset.device, method=method, seq_len=seq_len, effective_batch=effective_batch,
                       micro_batch=micro_batch, lora_r=lora_r, lora_alpha=lora_alpha, target_modules=target_modules,
                       precision=precision, optim=optim, grad_ckpt=grad_ckpt, allocator=allocator, attn=attn,
                       liger=False, packing=False, activation_offloading=False)  # levers: one GPU only, for now
    if host_budget_bytes is None and gset.source == "probe":  # offload must fit this machine's RAM
        host_budget_bytes = host_available_bytes()
    result = search_gpus(spec, gset, space, strategies, headroom, prefer, constants, cost, host_budget_bytes,
                         installed_only)
    if result.chosen is None:
        raise VramfitError(nothing_fits_line(result))
    return result


def host_available_bytes() -> int | None:
    """MemAvailable of this machine (/proc/meminfo), the budget for offload's pinned memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimate_gpus(model: str, gpus: int = 2, strategy: str = "ddp", trust_remote_code: bool = False,
                  constants=None, use_calibration: bool = True, replay: bool | None = None, **setup_options):
    """`vramfit.estimate` for `gpus` GPUs with `strategy` -> DistEstimate whose `per_gpu` is the
    Estimate of one GPU (its breakdown and three peaks); host bytes for offload beside it.
    setup_options: those of `vramfit.estimate` (method, precision, optim, seq_len, micro_batch, ...).
    The peaks are the allocator replay's of the rank's step (vramfit.memory.rank_replay), as
    `vramfit.estimate`'s are; `replay=False` (or VRAMFIT_REPLAY=0) gives the fitted per-rank walk, what
    the planner searches with."""
    from vramfit.memory.estimate import Estimate
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.model.spec import load_spec

    st = get_strategy(strategy)
    if "micro_batch" not in setup_options and "batch_size" in setup_options:
        setup_options["micro_batch"] = setup_options.pop("batch_size")
    setup = make_setup(**setup_options)
    check_combination(st, setup, gpus)
    spec = load_spec(model, trust_remote_code=trust_remote_code)
    calibration = None
    if constants is None and use_calibration:
        from vramfit.planner.calibration import load_local_constants

        constants, calibration = load_local_constants(spec)
    d = estimate_distributed(spec, setup, st, gpus, constants)
    if replay is None:
        from vramfit.memory.template_bg import replay_default

        replay = replay_default()
    if replay and gpus > 1:
        from vramfit.memory.rank_replay import replayed_rank

        d = replayed_rank(spec, setup, st, gpus, d, constants)
    bd = d.breakdown
    targets = resolve_targets(spec, setup)
    per_gpu = Estimate(model=spec.name, architecture=spec.architecture, setup=setup, target_modules=targets,
                       params_total=bd.params_total, params_trainable=bd.params_trainable,
                       params_packed=bd.params_packed, peak_allocated_bytes=bd.peak_allocated_bytes,
                       peak_reserved_bytes=bd.peak_reserved_bytes, device_bytes=bd.device_bytes,
                       peak_phase=bd.peak_phase, breakdown=bd.components, phases=bd.phases, notes=bd.notes,
                       calibration=calibration)
    return replace(d, per_gpu=per_gpu)
