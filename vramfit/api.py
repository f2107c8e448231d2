"""`vramfit.estimate(...)`: MODEL + setup options -> Estimate (a frozen dataclass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from vramfit.constants import DEFAULT, Constants
from vramfit.errors import VramfitError
from vramfit.memory import Breakdown, breakdown
from vramfit.setup import Setup, make_setup, resolve_targets, validate


@dataclass(frozen=True)
class Estimate:
    model: str
    architecture: str
    setup: Setup
    target_modules: tuple  # resolved module paths (empty for full fine-tuning)
    params_total: int
    params_trainable: int
    params_packed: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_bytes: int
    peak_phase: str
    breakdown: dict
    phases: dict
    notes: tuple
    calibration: str | None = None  # where the constants came from when not the defaults

    def to_json(self) -> dict:
        s = asdict(self.setup)
        s.pop("extras", None)
        s["lora_alpha"] = self.setup.lora_alpha if self.setup.method != "full" else None
        if self.setup.method == "full":
            for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules"):
                s[k] = None
        else:
            s["lora_alpha"] = self.setup.lora_alpha or 2 * self.setup.lora_r
            s["target_modules"] = self.setup.targets
        return {
            "model": self.model,
            "architecture": self.architecture,
            "params_total": self.params_total,
            "params_trainable": self.params_trainable,
            "params_packed_4bit_as_half": self.params_packed,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "device_bytes": self.device_bytes,
            "peak_phase": self.peak_phase,
            "breakdown": self.breakdown,
            "phases": self.phases,
            "inputs": s,
            "lora_target_count": len(self.target_modules),
            "notes": list(self.notes),
            "calibration": self.calibration,
        }


def trace_key(spec, setup: Setup, targets):
    from vramfit.trace import TraceKey

    param_dtype = "bfloat16" if setup.method == "qlora" and setup.param_dtype == "float32" else setup.param_dtype
    if setup.method == "qlora" and setup.precision.startswith("16"):
        param_dtype = "float16"
    return TraceKey(method=setup.method, param_dtype=param_dtype, autocast_dtype=setup.autocast_dtype,
                    attn="eager" if setup.attn == "eager" or not spec.supports_sdpa else "sdpa",
                    lora_r=setup.lora_r if setup.method != "full" else 0,
                    lora_dropout=setup.method != "full" and setup.lora_dropout > 0,
                    target_modules=tuple(targets),
                    kv_repeated=bool(setup.padded and setup.micro_batch > 1 and setup.attn != "eager"
                                     and spec.has_grouped_kv))


def estimate_setup(spec, setup: Setup, constants: Constants | None = None) -> tuple[Breakdown, tuple]:
    """The analytic core on a loaded spec: what the planner calls thousands of times."""
    from vramfit.trace import activation_profile

    validate(setup)
    if setup.method == "qlora" and spec.has_fused_experts:
        raise VramfitError(f"QLoRA on {spec.architecture}: its experts are fused 3-D parameters, which "
                           "bitsandbytes does not quantize as Linear layers; vramfit does not model this yet "
                           "(use --method lora or full)")
    if spec.has_fused_experts and setup.compute_dtype != "bfloat16":
        raise VramfitError(f"{spec.architecture}'s fused experts run torch's grouped_mm, which takes bf16 "
                           f"only: use --precision bf16-true or bf16-mixed (not {setup.precision})")
    targets = resolve_targets(spec, setup)
    profile = activation_profile(spec, trace_key(spec, setup, targets), grad_ckpt=setup.grad_ckpt)
    return breakdown(spec, setup, targets, profile, constants or DEFAULT), targets


def simulated_breakdown(spec, setup: Setup, targets, bd: Breakdown, c: Constants, seq_lens=None) -> Breakdown:
    """`bd` with its three peaks from the allocator simulation, or with a note saying why not.
    `seq_lens`: one padded batch length per replayed step (real data), instead of two steps at
    `setup.seq_len`."""
    import time

    from vramfit.alloc_events import Unsupported, training_events
    from vramfit.allocator import simulate

    started = time.perf_counter()
    try:
        # two steps: measured reserved is flat from the second step on (optimizer states exist), and
        # 2- and 3-step replays gave the same peaks on the 7 cases compared
        ev = training_events(spec, setup, targets, steps=2, seq_lens=seq_lens)
    except Unsupported as exc:
        return replace(bd, notes=bd.notes + (f"the allocator simulation does not cover {exc} yet: the reserve is "
                                             "the fitted one",))
    sim = simulate(ev["events"], expandable_segments=setup.allocator == "expandable")
    comps = dict(bd.components)
    comps["allocator_reserve"] = sim["peak_reserved"] - sim["peak_allocated"]
    outside = c.cuda_context_bytes + c.kernel_growth_bytes
    steps = f"{len(seq_lens)} steps of the data's padded batch lengths" if seq_lens else "2 steps"
    note = (f"reserved and device peaks from the allocator simulation: {len(ev['events']):,} allocations and "
            f"frees of {steps} replayed in {time.perf_counter() - started:.1f} s")
    return replace(bd, components=comps, peak_allocated_bytes=sim["peak_allocated"],
                   peak_reserved_bytes=sim["peak_reserved"], device_bytes=sim["peak_reserved"] + outside,
                   notes=bd.notes + (note,))


# capped replays of this process: events per (spec, setup, targets), a few kept (a large model's
# two steps are a few hundred thousand tuples); results per (that, cap, initial bytes), all kept
_REPLAY_EVENTS: dict = {}
_REPLAY_EVENTS_KEPT = 6
_REPLAY_RESULTS: dict = {}


def _replay_events(spec, setup: Setup, targets) -> dict:
    from vramfit.alloc_events import training_events

    key = (id(spec), setup, tuple(targets))
    hit = _REPLAY_EVENTS.pop(key, None)
    if hit is None:
        # two optimizer steps (each with its accumulation's micro-batches): reserved is flat from
        # the second on, as in simulated_breakdown
        hit = (spec, training_events(spec, setup, targets, steps=2, grad_accum=setup.grad_accum))
    _REPLAY_EVENTS[key] = hit  # most recently used last
    while len(_REPLAY_EVENTS) > _REPLAY_EVENTS_KEPT:
        _REPLAY_EVENTS.pop(next(iter(_REPLAY_EVENTS)))
    return hit[1]


def capped_replay(spec, setup: Setup, targets, limit_bytes: int, constants: Constants | None = None,
                  initial_allocated: int = 0) -> dict:
    """Two Trainer steps of `setup` replayed through the allocator model under a cap of
    `limit_bytes` on torch's allocator (what `torch.cuda.set_per_process_memory_fraction` allows
    it): under the cap the allocator releases its cached blocks and retries before it gives up,
    so a setup can fit where its uncapped reserved peak would not.  Raises
    `vramfit.alloc_events.Unsupported` for what the replay does not cover.  Cached in-process per
    (spec, setup, targets, cap): a repeated check costs nothing.

    -> {fits, oom, oom_at, oom_phase, peak_allocated_bytes, peak_reserved_bytes, device_bytes,
        num_alloc_retries, limit_bytes, events, seconds, cached}"""
    import time

    from vramfit.allocator import simulate

    c = constants or DEFAULT
    key = (id(spec), setup, tuple(targets), int(limit_bytes), int(initial_allocated))
    hit = _REPLAY_RESULTS.get(key)
    if hit is not None and hit[0] is spec:
        return dict(hit[1], cached=True)
    started = time.perf_counter()
    ev = _replay_events(spec, setup, targets)
    sim = simulate(ev["events"], expandable_segments=setup.allocator == "expandable",
                   limit_bytes=int(limit_bytes), initial_allocated=int(initial_allocated))
    phase = None
    if sim["oom"]:
        phase = max(((at, name) for name, at in ev["marks"].items() if at <= max(sim["oom_at"], 0)),
                    default=(0, "load"))[1]
    out = {"fits": not sim["oom"], "oom": sim["oom"], "oom_at": sim["oom_at"], "oom_phase": phase,
           "peak_allocated_bytes": sim["peak_allocated"], "peak_reserved_bytes": sim["peak_reserved"],
           "device_bytes": sim["peak_reserved"] + c.cuda_context_bytes + c.kernel_growth_bytes,
           "num_alloc_retries": sim["num_alloc_retries"], "limit_bytes": int(limit_bytes),
           "events": len(ev["events"]), "seconds": time.perf_counter() - started, "cached": False}
    _REPLAY_RESULTS[key] = (spec, out)
    return dict(out)


def estimate(model: str, method: str = "lora", precision: str | None = None, optim: str = "adamw_torch",
             lora_r: int | None = None, lora_alpha: int | None = None, lora_dropout: float | None = None,
             target_modules: str | None = None, seq_len: int = 2048, micro_batch: int = 1,
             grad_ckpt: bool = False, attn: str = "sdpa", allocator: str = "default", loss: str = "logits",
             padded: bool = False, trust_remote_code: bool = False, constants: Constants | None = None,
             use_calibration: bool = True, simulate_allocator: bool = False) -> Estimate:
    """Predict the memory of one fine-tuning step of MODEL (profile, config.json, dir or hub id).

    `padded`: the batches are padded to their longest row, as real data of varying lengths is, so
    an attention mask reaches SDPA; on models with grouped KV heads transformers then repeats the
    KV heads, which the backward keeps at full head count.

    `simulate_allocator`: replay two Trainer steps on the meta device through a model of torch's
    caching allocator (`vramfit.allocator`) for the reserved and nvidia-smi peaks instead of the
    fitted reserve: slower (seconds to a minute), closer (benchmarks/results/simulated-reserve.txt)."""
    from vramfit.spec import load_spec

    setup = make_setup(method=method, precision=precision, optim=optim, lora_r=lora_r, lora_alpha=lora_alpha,
                       lora_dropout=lora_dropout, target_modules=target_modules, seq_len=seq_len,
                       micro_batch=micro_batch, grad_ckpt=grad_ckpt, attn=attn, allocator=allocator, loss=loss,
                       padded=padded)
    spec = load_spec(model, trust_remote_code=trust_remote_code)
    calibration = None
    if constants is None and use_calibration:
        from vramfit.calibrate import load_local_constants

        constants, calibration = load_local_constants(spec)
    bd, targets = estimate_setup(spec, setup, constants)
    if setup.attn != "eager" and not spec.supports_sdpa:
        bd = replace(bd, notes=bd.notes + (f"{spec.architecture} has no {setup.attn} support in transformers: "
                                           "estimated with eager attention, which transformers uses for it",))
    if simulate_allocator:
        bd = simulated_breakdown(spec, setup, targets, bd, constants or DEFAULT)
    return Estimate(model=spec.name, architecture=spec.architecture, setup=setup, target_modules=targets,
                    params_total=bd.params_total, params_trainable=bd.params_trainable,
                    params_packed=bd.params_packed, peak_allocated_bytes=bd.peak_allocated_bytes,
                    peak_reserved_bytes=bd.peak_reserved_bytes, device_bytes=bd.device_bytes,
                    peak_phase=bd.peak_phase, breakdown=bd.components, phases=bd.phases, notes=bd.notes,
                    calibration=calibration)
