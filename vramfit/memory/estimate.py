"""The memory model on a loaded spec: (ModelSpec, Setup) -> Breakdown, what the planner calls
thousands of times (~0.1 ms each once the activation profile is cached), and `Estimate`, the answer
vramfit.api.estimate gives for a named model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vramfit.errors import VramfitError
from vramfit.memory.constants import DEFAULT, Constants
from vramfit.memory.setup import Setup, resolve_targets, validate
from vramfit.memory.walk import Breakdown, breakdown


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
    # pinned host memory besides the GPU's (activation offloading's copies of saved activations), bytes
    host_bytes: int = 0

    def to_json(self) -> dict:
        s = asdict(self.setup)
        s.pop("extras", None)
        if self.setup.packing:  # packing's average example length (Setup.extras, vramfit.memory.levers)
            from vramfit.memory.levers import example_len

            s["example_len"] = example_len(self.setup)
        s["dtype"], s["amp"] = self.setup.dtype, self.setup.amp
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
            "host_bytes": self.host_bytes,
        }


def trace_key(spec, setup: Setup, targets):
    from vramfit.model.trace import TraceKey

    param_dtype = "bfloat16" if setup.method == "qlora" and setup.param_dtype == "float32" else setup.param_dtype
    if setup.method == "qlora" and setup.precision.startswith("16"):
        param_dtype = "float16"
    return TraceKey(method=setup.method, param_dtype=param_dtype, autocast_dtype=setup.autocast_dtype,
                    attn="eager" if setup.attn == "eager" or not spec.supports_sdpa else "sdpa",
                    lora_r=setup.lora_r if setup.method != "full" else 0,
                    lora_dropout=setup.method != "full" and setup.lora_dropout > 0,
                    target_modules=tuple(targets),
                    kv_repeated=bool(setup.padded and setup.micro_batch > 1 and setup.attn != "eager"
                                     and spec.has_grouped_kv),
                    kbit_prep=setup.kbit_upcast or setup.method != "qlora",
                    adapter_dtype=None if setup.adapter_dtype == "float32" else setup.adapter_dtype)


def estimate_setup(spec, setup: Setup, constants: Constants | None = None) -> tuple[Breakdown, tuple]:
    """The analytic core on a loaded spec: what the planner calls thousands of times."""
    from vramfit.model.trace import activation_profile

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
