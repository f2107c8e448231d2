"""The public surface: `estimate` (MODEL + setup options -> Estimate, a frozen dataclass), `plan`
and `find_gpu` (the planner), `estimate_gpus` / `plan_gpus` (several GPUs) and `train` / `merge`.
The planner and the launcher are imported when first called, so `import vramfit` stays light."""

from __future__ import annotations

from dataclasses import replace

from vramfit.memory.constants import DEFAULT, Constants
from vramfit.memory.estimate import Estimate, estimate_setup
from vramfit.memory.template_bg import replayed_breakdown
from vramfit.memory.setup import make_setup


def estimate(model: str, method: str = "lora", precision: str | None = None, optim: str = "adamw_torch",
             lora_r: int | None = None, lora_alpha: int | None = None, lora_dropout: float | None = None,
             target_modules: str | None = None, seq_len: int = 2048, micro_batch: int = 1,
             grad_ckpt: bool = False, attn: str = "sdpa", allocator: str = "default", loss: str = "logits",
             padded: bool = False, liger: bool = False, packing: bool = False, activation_offloading: bool = False,
             tokens_per_batch: int | None = None, trust_remote_code: bool = False,
             constants: Constants | None = None, use_calibration: bool = True, simulate_allocator: bool = False,
             replay: bool | None = None, eval_batch: int | None = None, kbit_prep: bool = True,
             template_build: str = "now") -> Estimate:
    """Predict the memory of one fine-tuning step of MODEL (profile, config.json, dir or hub id).

    `padded`: the batches are padded to their longest row, as real data of varying lengths is, so
    an attention mask reaches SDPA; on models with grouped KV heads transformers then repeats the
    KV heads, which the backward keeps at full head count.

    The memory levers, in their own switches (vramfit.planner.levers): `liger`
    (TrainingArguments(use_liger_kernel=True); only on the model types liger-kernel patches), `packing`
    (trl SFTConfig(packing=True), bfd, padding-free: `micro_batch` packed rows of `seq_len` tokens,
    flattened into one), `activation_offloading` (SFTConfig(activation_offloading=True)).
    `tokens_per_batch` (with packing): the micro-batch in tokens, a multiple of `seq_len`.
    `kbit_prep` (QLoRA): peft's prepare_model_for_kbit_training after loading (the standard recipe);
    False: trl's and Unsloth's way, the non-quantized weights left in bf16 (`Setup.kbit_prep`).

    The three peaks are the allocator replay's (two Trainer steps' allocations and frees through a
    model of torch's caching allocator, `vramfit.memory.allocator`), expanded from the setup's event
    template (`vramfit.memory.template`: milliseconds once built; a first build takes ~10-60 s and is
    cached) or, where no template covers the setup, replayed on the meta device; the notes say which.
    `replay=False` (or VRAMFIT_REPLAY=0) gives the fitted analytic estimate instead (the planner's
    pruning bound).  `simulate_allocator` is accepted and does nothing: the replay is the default.
    The replay runs the whole run: load, the steps, an evaluation at `eval_batch` sequences
    (per_device_eval_batch_size; default the micro-batch, as vramfit train) and a checkpoint save.
    `template_build`: where the setup's template is not cached, "now" builds it before answering,
    "background" answers from the real replay and builds it in a detached process (`vramfit estimate`),
    "off" never builds (VRAMFIT_TEMPLATE_BUILD overrides; vramfit.memory.template_bg)."""
    from vramfit.model.spec import load_spec
    from vramfit.planner.levers import check_levers, micro_batch_for_tokens

    micro_batch = micro_batch_for_tokens(tokens_per_batch, seq_len, packing,
                                         None if tokens_per_batch is not None and micro_batch == 1 else micro_batch)
    setup = make_setup(method=method, precision=precision, optim=optim, lora_r=lora_r, lora_alpha=lora_alpha,
                       lora_dropout=lora_dropout, target_modules=target_modules, seq_len=seq_len,
                       micro_batch=micro_batch, grad_ckpt=grad_ckpt, attn=attn, allocator=allocator, loss=loss,
                       padded=padded, liger=liger, packing=packing, activation_offloading=activation_offloading,
                       kbit_prep=kbit_prep)
    check_levers(None, packing=packing, padded=padded)
    spec = load_spec(model, trust_remote_code=trust_remote_code)
    check_levers(spec, liger=liger)
    calibration = None
    if constants is None and use_calibration:
        from vramfit.planner.calibration import load_local_constants

        constants, calibration = load_local_constants(spec)
    bd, targets = estimate_setup(spec, setup, constants)
    if setup.attn != "eager" and not spec.supports_sdpa:
        bd = replace(bd, notes=bd.notes + (f"{spec.architecture} has no {setup.attn} support in transformers: "
                                           "estimated with eager attention, which transformers uses for it",))
    if replay is None:
        from vramfit.memory.template_bg import replay_default

        replay = simulate_allocator or replay_default()
    if replay:
        bd = replayed_breakdown(spec, setup, targets, bd, constants or DEFAULT, eval_batch=eval_batch,
                                template_build=template_build)  # vramfit.memory.template_bg's
    return Estimate(model=spec.name, architecture=spec.architecture, setup=setup, target_modules=targets,
                    params_total=bd.params_total, params_trainable=bd.params_trainable,
                    params_packed=bd.params_packed, peak_allocated_bytes=bd.peak_allocated_bytes,
                    peak_reserved_bytes=bd.peak_reserved_bytes, device_bytes=bd.device_bytes,
                    peak_phase=bd.peak_phase, breakdown=bd.components, phases=bd.phases, notes=bd.notes,
                    calibration=calibration, host_bytes=bd.host_bytes)


def plan(model, gpu="auto", **options):
    """The best setup of MODEL that fits GPU -> Plan; see vramfit.planner.search.plan."""
    from vramfit.planner.search import plan as _plan

    return _plan(model, gpu, **options)


def find_gpu(model, **options) -> tuple:
    """A Plan per bundled GPU profile, smallest first; see vramfit.planner.search.find_gpu."""
    from vramfit.planner.search import find_gpu as _find_gpu

    return _find_gpu(model, **options)


def estimate_gpus(*args, **kwargs):
    """Per-GPU memory on N GPUs with a strategy (ddp, fsdp-full, zero3, ...); see
    vramfit.planner.multigpu.estimate_gpus."""
    from vramfit.planner.multigpu import estimate_gpus as _estimate_gpus

    return _estimate_gpus(*args, **kwargs)


def plan_gpus(*args, **kwargs):
    """The best strategy and setup on several GPUs; see vramfit.planner.multigpu.plan_gpus."""
    from vramfit.planner.multigpu import plan_gpus as _plan_gpus

    return _plan_gpus(*args, **kwargs)


def train(model: str, data: str, options=None, setup_options: dict | None = None, **kwargs) -> dict:
    """Fine-tune MODEL on DATA with the setup that fits; see vramfit.run.train.train."""
    from vramfit.run.train import train as _train

    return _train(model, data, options, setup_options, **kwargs)


def merge(adapter_dir: str, out_dir: str, **kwargs) -> dict:
    """Fold a LoRA adapter into its base model; see vramfit.run.merge.merge."""
    from vramfit.run.merge import merge as _merge

    return _merge(adapter_dir, out_dir, **kwargs)
