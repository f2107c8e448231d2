"""A plan: the chosen setup, the alternatives, and the kwargs / objects a user's script takes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vramfit.errors import VramfitError
from vramfit.memory.setup import Setup
from vramfit.planner.convert import (
    bnb_config,
    bnb_config_kwargs,
    lora_config,
    lora_config_kwargs,
    model_kwargs,
    rename_checkpointing,
    sft_config_kwargs,
    training_arguments_kwargs,
)
from vramfit.planner.cost import DEFAULT_COST
from vramfit.planner import levers as _levers
from vramfit.planner.space import Space

@dataclass(frozen=True)
class Candidate:
    setup: Setup
    device_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    seconds_per_token: float
    fits: bool
    # False: not evaluated, because a smaller micro-batch of the same setup already misses (memory
    # grows with the micro-batch); device_bytes is then that smaller one's, a lower bound.
    exact: bool = True
    # paged optimizer states (CUDA managed memory, outside device_bytes) and the part of them that
    # does not fit in the usable memory next to device_bytes, so pages to host at every step
    paged_bytes: int = 0
    paging_bytes: int = 0
    # pinned host memory beside the GPU's (activation offloading's copies), where the memory model says
    host_bytes: int = 0
    # the figures are the allocator replay's (under the plan's cap where it fits), not the fast model's
    replayed: bool = False

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    def to_json(self) -> dict:
        return {**setup_json(self.setup), "device_bytes": self.device_bytes,
                "peak_allocated_bytes": self.peak_allocated_bytes, "peak_reserved_bytes": self.peak_reserved_bytes,
                "tokens_per_s": round(self.tokens_per_s, 1), "fits": self.fits, "exact": self.exact,
                "paged_bytes": self.paged_bytes, "paging_bytes": self.paging_bytes, "host_bytes": self.host_bytes,
                "replayed": self.replayed}



@dataclass(frozen=True)
class Rejection:
    """A (method, precision) family that would run faster than the chosen setup but of which
    nothing fits: `candidate` is its smallest setup, `over_bytes` how far that misses."""

    candidate: Candidate
    over_bytes: int


@dataclass(frozen=True)
class Lever:
    """One knob of the chosen setup turned: what it would need and how fast it would run."""

    # grad_ckpt | micro_batch | optim | precision | method | lora_r | seq_len | allocator, and the memory
    # levers liger | packing | activation_offloading (vramfit.planner.levers)
    knob: str
    candidate: Candidate
    delta_bytes: int  # candidate's device bytes minus the chosen one's
    speedup: float  # candidate's tokens/s over the chosen one's


def setup_json(s: Setup) -> dict:
    d = asdict(s)
    d.pop("extras", None)
    d["dtype"], d["amp"] = s.dtype, s.amp
    if s.method == "full":
        for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules"):
            d[k] = None
    else:
        d["lora_alpha"] = s.lora_alpha or 2 * s.lora_r
    return d



@dataclass(frozen=True)
class Plan:
    model: str
    device: object  # vramfit.planner.gpu.Device
    budget_bytes: int  # the device's free memory: what the run may use before headroom
    headroom_bytes: int
    headroom: str  # as given ("5%", "1GiB")
    prefer: str  # speed | memory
    space: Space
    chosen: Candidate | None
    candidates: tuple  # those that fit, best first
    rejections: tuple  # faster (method, precision) families that do not fit
    levers: tuple  # the chosen setup's knobs turned one at a time
    closest: Candidate  # the smallest footprint searched, fitting or not
    longest_seq_len: int | None  # at the chosen setup (micro-batch kept): the longest that fits
    largest_micro_batch: int | None  # at the chosen setup, any micro-batch (not only divisors)
    searched: int  # setups considered
    evaluated: int  # of which the memory model predicted (the others are bounded by a smaller micro-batch)
    notes: tuple = ()
    cost_source: str = DEFAULT_COST.source
    replay: dict | None = None  # what the allocator recheck checked and changed (simulate_allocator)

    @property
    def usable_bytes(self) -> int:
        return self.budget_bytes - self.headroom_bytes

    # the memory levers' measured speed factors and switches, for the report (which imports no planner)
    @staticmethod
    def lever_speeds() -> dict:
        return _levers.lever_speeds()

    @staticmethod
    def lever_switches() -> dict:
        return dict(_levers.LEVER_SWITCHES)

    @property
    def setup(self) -> Setup:
        return self._chosen().setup

    def _chosen(self) -> Candidate:
        if self.chosen is None:
            from vramfit.report import nothing_fits_line

            raise VramfitError(nothing_fits_line(self, None))
        return self.chosen

    # -- plain dicts a user's script can take
    def to_training_arguments_kwargs(self) -> dict:
        return training_arguments_kwargs(self.setup)

    def to_sft_config_kwargs(self) -> dict:
        """trl `SFTConfig` kwargs: TrainingArguments' plus max_length and the trl-only levers (packing,
        activation offloading)."""
        return sft_config_kwargs(self.setup)

    def to_lora_config_kwargs(self) -> dict | None:
        return lora_config_kwargs(self.setup)

    def to_bnb_config_kwargs(self) -> dict | None:
        return bnb_config_kwargs(self.setup)

    def to_model_kwargs(self) -> dict:
        """from_pretrained kwargs (the quantization config as its kwargs under its key)."""
        return model_kwargs(self.setup)

    def env(self) -> dict:
        """Environment to set before CUDA starts."""
        return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if self.setup.allocator == "expandable" else {}

    # -- the real objects, built lazily (imports transformers / peft / trl)
    def training_arguments(self, output_dir: str, **overrides):
        from transformers import TrainingArguments

        kw = rename_checkpointing({**self.to_training_arguments_kwargs(), **overrides}, TrainingArguments)
        return TrainingArguments(output_dir=output_dir, **kw)

    def sft_config(self, output_dir: str, **overrides):
        from trl import SFTConfig

        return SFTConfig(output_dir=output_dir, **rename_checkpointing({**self.to_sft_config_kwargs(), **overrides},
                                                                       SFTConfig))

    def lora_config(self):
        return lora_config(self.setup)

    def bnb_config(self):
        return bnb_config(self.setup)

    def model_kwargs(self) -> dict:
        """`AutoModelForCausalLM.from_pretrained(name, **plan.model_kwargs())`."""
        import torch

        kw = {k: v for k, v in self.to_model_kwargs().items() if k != "quantization_config"}
        kw["dtype"] = getattr(torch, kw["dtype"])
        if self.setup.method == "qlora":
            kw["quantization_config"] = self.bnb_config()
        return kw

    def to_json(self) -> dict:
        chosen = self.chosen
        return {
            "model": self.model,
            "device": asdict(self.device),
            "budget_bytes": self.budget_bytes, "headroom_bytes": self.headroom_bytes, "headroom": self.headroom,
            "usable_bytes": self.usable_bytes, "prefer": self.prefer,
            "seq_len": self.space.seq_len, "effective_batch": self.space.effective_batch,
            "chosen": chosen.to_json() if chosen else None,
            "candidates": [c.to_json() for c in self.candidates[:20]],
            "fitting_count": len(self.candidates), "searched": self.searched, "evaluated": self.evaluated,
            "rejections": [{**r.candidate.to_json(), "over_bytes": r.over_bytes} for r in self.rejections],
            "levers": [{"knob": l.knob, **l.candidate.to_json(), "delta_bytes": l.delta_bytes,
                        "speedup": round(l.speedup, 3)} for l in self.levers],
            "closest": self.closest.to_json(),
            "longest_seq_len": self.longest_seq_len, "largest_micro_batch": self.largest_micro_batch,
            "training_arguments": training_arguments_kwargs(chosen.setup) if chosen else None,
            "sft_config": sft_config_kwargs(chosen.setup) if chosen else None,
            "lever_speeds": {k: {"ratio": v.ratio_for(chosen.setup.loss if chosen else None),
                                 "measured": v.measured_for(chosen.setup.loss if chosen else None),
                                 "text": v.text(chosen.setup.loss if chosen else None)}
                             for k, v in _levers.lever_speeds().items()},
            "lora_config": lora_config_kwargs(chosen.setup) if chosen else None,
            "bnb_config": bnb_config_kwargs(chosen.setup) if chosen else None,
            "model_kwargs": model_kwargs(chosen.setup) if chosen else None,
            "env": self.env() if chosen else {},
            "notes": list(self.notes), "cost_model": self.cost_source,
            "allocator_replay": self.replay,
        }


# Setup -> the kwargs of the real objects.  Precision mapping as the accuracy harness ran it
# (benchmarks/accuracy/cases.py): "-true" loads the weights in that dtype and leaves autocast off;
# "-mixed" loads fp32 weights and turns on Trainer's bf16/fp16 autocast.

