"""`vramfit train`: MODEL + DATA -> a fine-tuned adapter or model, memory tracked against the prediction.

A recipe, read top to bottom in `train()`:
  1. the model: a directory with weights, a hub id, or `init="random"` from a config or profile
  2. the tokenizer: pad token set when missing, right padding
  3. the data (`vramfit.data.prepare`): format, bad rows, validation split, token lengths
  4. the setup: the user's options, or the planner's answer (`choose_setup`, the one place it is called)
  5. the prediction (`estimate_setup`) and the fit check
     ---- every user mistake above raises VramfitError; nothing is written or loaded on a GPU before here
  6. the model's objects: BitsAndBytesConfig + prepare_model_for_kbit_training (QLoRA), LoraConfig
  7. trl SFTTrainer with SFTConfig, a MemoryTracker, early stopping on validation loss, Ctrl-C
     handling, and the OOM fall-back (`fallback_setup`): free memory, a cheaper setup, continue
     from the last checkpoint
  8. the outputs: the adapter (safetensors) or the full model, the tokenizer, run_report.json,
     memory_timeline.jsonl and its plot
"""

from __future__ import annotations

import gc
import os
import json
import math
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vramfit import data as vdata
from vramfit.convert import (
    CHECKPOINTING_KWARGS,
    bnb_config,
    lora_config,
    rename_checkpointing,
    training_arguments_kwargs,
)
from vramfit.errors import VramfitError
from vramfit.setup import Setup, make_setup, validate
from vramfit.tracker import nvml_index

# The options that make a setup complete; with one missing, the planner chooses.
SETUP_FIELDS = ("method", "precision", "optim", "micro_batch", "grad_accum", "grad_ckpt")
# Learning rates that are the usual starting points: LoRA/QLoRA 2e-4 (the QLoRA paper's for
# 7B-13B), full fine-tuning 2e-5 (trl's SFTConfig default).
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "vramfit")
REPORT_NAME, SETUP_NAME = "run_report.json", "run_setup.json"
TIMELINE_NAME = "memory_timeline.jsonl"


@dataclass(frozen=True)
class RunOptions:
    """Everything about a run that is not the memory setup."""

    out_dir: str = "vramfit-run"
    init: str = "pretrained"  # pretrained | random
    tokenizer: str | None = None  # default: the model's
    data_format: str = "auto"
    on_bad_row: str = "skip"
    val_split: float = vdata.DEFAULT_VAL_SPLIT
    val_file: str | None = None
    max_seq_len: int = 2048
    seq_len_from: str = "max"  # max | p99 of the token lengths: the planner's seq_len
    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float | None = None  # default: DEFAULT_LR of the method
    warmup: float = 0.03  # a fraction of the steps (< 1) or a number of steps
    logging_steps: int = 1
    eval_steps: int | None = None  # default: a tenth of the steps
    save_steps: int | None = None  # default: eval_steps; 0: no checkpoints (nor one at the end)
    save_total_limit: int = 2
    early_stopping_patience: int = 3
    seed: int = 42
    resume: bool = False
    fallback: bool = True
    fit_check: bool = True
    gpu: str | None = None  # for the planner and the fit check: auto, a profile, a size
    enforce_budget: bool = False  # cap torch's allocator so this process cannot use more than `gpu` (CUDA)
    # reserved/device peaks from a replay of the data's batch lengths; None: on a GPU (the H100
    # train proof of 2026-11-23 met the accuracy targets with it: benchmarks/results/h100-2026-11-23-train-proof-3.md)
    simulate_allocator: bool | None = None
    headroom: str = "5%"
    effective_batch: int | None = None
    trust_remote_code: bool = False
    live: bool = True  # the rich live view when the console is a terminal


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: str | None  # a local directory or hub id with weights; None for random init
    config: dict
    init: str
    spec: object  # vramfit.spec.ModelSpec
    local_dir: str | None = None  # MODEL as a local directory (its tokenizer is the default one)
    trust_remote_code: bool = False


# --------------------------------------------------------------------------- 1-2. model and tokenizer


def resolve_model(model: str, init: str = "pretrained", trust_remote_code: bool = False) -> ModelSource:
    from vramfit.spec import MODEL_PROFILES_DIR, resolve_config_dict, spec_from_config

    if init not in ("pretrained", "random"):
        raise VramfitError(f"--init must be pretrained or random, got '{init}'")
    name, config = resolve_config_dict(model, trust_remote_code)
    path = Path(str(model)).expanduser()
    profile = MODEL_PROFILES_DIR / f"{str(model).strip().lower()}.json"
    local_dir = str(path.resolve()) if path.is_dir() and not profile.is_file() else None
    weights = None
    if init == "pretrained":
        if local_dir:
            if not any(any(path.glob(p)) for p in WEIGHT_FILES):
                raise VramfitError(f"{path} has a config but no weights (*.safetensors or *.bin); give a model "
                                   f"directory with weights, or --init random to train from random weights")
            weights = local_dir
        elif profile.is_file() or path.is_file():
            hub = json.loads(profile.read_text()).get("_hub_id") if profile.is_file() else None
            hint = f"its weights are on the hub as {hub}, or " if hub else ""
            raise VramfitError(f"'{model}' is a config without weights: {hint}use --init random for a random-init run")
        else:
            weights = str(model)  # a hub id: from_pretrained downloads it
    return ModelSource(name=name, path=weights, config=config, init=init, spec=spec_from_config(name, config),
                       local_dir=local_dir, trust_remote_code=trust_remote_code)


def load_tokenizer(source: ModelSource, tokenizer: str | None, trust_remote_code: bool = False):
    """The model's tokenizer (or --tokenizer), with a pad token and right padding for training."""
    from transformers import AutoTokenizer

    where = tokenizer or source.path or source.local_dir
    if where is None:
        raise VramfitError(f"--init random from '{source.name}' has no tokenizer: give one with --tokenizer "
                           f"(a model directory or hub id)")
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing files, offline hub: the user's to fix
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise VramfitError(f"cannot load a tokenizer from {where} ({msg}); give one with --tokenizer") from None
    if tok.pad_token is None:
        if tok.eos_token is None and tok.unk_token is None:
            raise VramfitError(f"the tokenizer of {where} has no pad, eos or unk token to pad with")
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    if len(tok) > source.spec.vocab_size:
        raise VramfitError(f"the tokenizer has {len(tok):,} tokens but the model's vocabulary only "
                           f"{source.spec.vocab_size:,}: they do not belong together")
    return tok


# --------------------------------------------------------------------------- 4-5. setup and prediction


def trainer_loss() -> str:
    """How the run's trainer computes the loss (Setup.loss): trl's SFTTrainer scores tokens with its
    fused, chunked LM head where trl has one (`add_fused_lm_head`), else from full logits."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return "logits"
    return "fused" if hasattr(trl_utils, "add_fused_lm_head") else "logits"


def planner_restrictions(given: dict, effective_batch: int | None, gpus: int = 1) -> dict:
    """The options the user fixed, as the planner's keyword arguments; the effective batch is the
    given one, else micro-batch x accumulation x GPUs when both are fixed."""
    mb, ga = given.get("micro_batch"), given.get("grad_accum")
    effective = effective_batch or (mb * ga * gpus if mb and ga else None)
    kw = {k: given[k] for k in ("micro_batch", "lora_r", "lora_alpha", "target_modules", "precision", "optim",
                                "grad_ckpt", "attn", "allocator") if k in given}
    if effective:
        kw["effective_batch"] = effective
    return kw


def choose_setup(spec, options: dict, seq_len: int, gpu: str | None = None, headroom: str = "5%",
                 effective_batch: int | None = None, padded: bool = False):
    """The setup the run uses -> (Setup, Plan or None).  All of SETUP_FIELDS given: the user's,
    validated.  Any missing: `vramfit.planner.plan` chooses them, the given ones fixed."""
    given = {k: v for k, v in options.items() if v is not None}
    given.setdefault("seq_len", seq_len)
    given.setdefault("loss", trainer_loss())
    given.setdefault("allocator", env_allocator())  # what this process's torch will really use
    given.setdefault("padded", padded)  # rows of different lengths: batches padded, an attention mask
    if all(k in given for k in SETUP_FIELDS):
        return make_setup(**given), None
    try:
        from vramfit.planner import plan
    except ImportError:
        missing = ", ".join("--" + k.replace("_", "-") for k in SETUP_FIELDS if k not in given)
        raise VramfitError(f"give {missing}: the planner that would choose them is not installed") from None
    p = plan(spec, gpu or "auto", headroom=headroom, method=given.get("method", "auto"), seq_len=given["seq_len"],
             loss=given["loss"], padded=given["padded"], **planner_restrictions(given, effective_batch))
    s = p.setup
    if s.method != "full" and "lora_dropout" in given:
        s = s.with_(lora_dropout=given["lora_dropout"])
    return s, p


def data_is_padded(d) -> bool:
    """Whether the trainer's batches get padding (and so an attention mask): some training row is
    shorter than the sequence length the rows are cut to, so a batch of several rows is padded to
    its longest.  (A micro-batch of one has no padding: the memory model checks that.)"""
    return d.lengths.over_max_seq_len < d.lengths.count


def env_allocator(environ=None) -> str:
    """The allocator a run uses unless --allocator says: what PYTORCH_CUDA_ALLOC_CONF (or
    PYTORCH_ALLOC_CONF) sets expandable_segments to, and `expandable` when it is not set.

    Expandable segments are the launcher's default because real data comes in batches padded to
    different lengths, and the default allocator's fixed segments fragment under them: on an H100
    (2026-11-23, benchmarks/results/h100-2026-11-23-train-proof-2.md) Mistral-7B LoRA reserved
    39.14 GiB with the default allocator and 35.66 GiB with expandable segments, for 35.49 GiB
    allocated at most in both; Llama-3.2-1B LoRA 16.66 and 16.15 GiB for 15.8."""
    environ = os.environ if environ is None else environ
    conf = environ.get("PYTORCH_CUDA_ALLOC_CONF") or environ.get("PYTORCH_ALLOC_CONF") or ""
    opts = dict(part.split(":", 1) for part in conf.replace(" ", "").split(",") if ":" in part)
    value = opts.get("expandable_segments", "").lower()
    return "default" if value == "false" else "expandable"


def apply_allocator(s: Setup, cuda: bool) -> None:
    """Make torch's caching allocator the one the setup was predicted with (before the model loads;
    the setting applies to the segments created from then on)."""
    if cuda:
        import torch

        torch.cuda.memory._set_allocator_settings(
            f"expandable_segments:{'True' if s.allocator == 'expandable' else 'False'}")


def runtime_problem(s: Setup, cuda: bool) -> str | None:
    """What this machine cannot run of `s`, said before anything is loaded; None if all is well."""
    import importlib.util

    if not cuda:
        if s.method == "qlora":
            return "QLoRA needs a CUDA GPU (bitsandbytes' 4-bit kernels); on CPU use --method lora or full"
        if s.optimizer.needs_bnb:
            return f"optimizer {s.optim} needs bitsandbytes on a CUDA GPU; on CPU use adamw_torch"
        if s.precision.startswith("16"):
            return f"precision {s.precision} (fp16) needs a CUDA GPU; on CPU use 32-true, bf16-true or bf16-mixed"
    else:
        import torch

        if s.precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            return "this GPU has no bf16: use --precision 16-mixed, 16-true or 32-true"
    if (s.method == "qlora" or s.optimizer.needs_bnb) and importlib.util.find_spec("bitsandbytes") is None:
        return "QLoRA and the 8-bit/paged optimizers need bitsandbytes: pip install bitsandbytes"
    if s.attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "--attn flash_attention_2 needs the flash-attn package"
    return None


# Steps the allocator simulation replays with the data's batch lengths: on the H100 7B runs the
# reserved peak of 25 replayed steps equalled that of 50 (benchmarks/results/cpu-2026-11-23-replay-lengths.txt)
SIMULATED_STEPS = 25


def predict(spec, s: Setup, constants=None, seq_lens=None) -> dict:
    """The three peaks of `s`.  `seq_lens` (`--simulate-allocator`): the reserved and device peaks
    from replaying that many steps of those padded batch lengths through the allocator model."""
    from vramfit.api import estimate_setup, simulated_breakdown
    from vramfit.constants import DEFAULT

    bd, targets = estimate_setup(spec, s, constants)
    if seq_lens:
        bd = simulated_breakdown(spec, s, targets, bd, constants or DEFAULT, seq_lens=list(seq_lens))
    out = {"peak_allocated_bytes": bd.peak_allocated_bytes, "peak_reserved_bytes": bd.peak_reserved_bytes,
           "device_bytes": bd.device_bytes, "peak_phase": bd.peak_phase, "breakdown": dict(bd.components)}
    if seq_lens:
        out["notes"] = list(bd.notes[-1:])
    return out


def batch_lengths(row_lengths: list, micro_batch: int, seq_len: int, steps: int, seed: int) -> list:
    """Padded lengths of `steps` batches drawn as a shuffled epoch would draw them (seeded): each
    batch is as long as its longest row, rows cut at `seq_len`.  Not the trainer's own order (which
    its sampler fixes later), but the same distribution: replayed for the H100 7B runs, three orders
    gave reserved peaks 6% (LoRA) and 8% (full) apart with the default allocator and 1% with
    expandable segments (benchmarks/results/cpu-2026-11-23-replay-lengths.txt)."""
    import random

    if not row_lengths:
        return []
    rng = random.Random(seed)
    order = []
    while len(order) < steps * micro_batch:
        idx = list(range(len(row_lengths)))
        rng.shuffle(idx)
        order += idx
    return [max(min(row_lengths[i], seq_len) for i in order[k * micro_batch:(k + 1) * micro_batch])
            for k in range(steps)]


def usable_bytes(gpu: str, headroom: str) -> int:
    """Device memory the run may use on GPU (`--gpu` forms): its free memory less the headroom."""
    from vramfit.gpu import resolve_gpu
    from vramfit.planner import parse_headroom

    free = resolve_gpu(gpu or "auto").free_bytes
    return free - parse_headroom(headroom, free)


def allocator_cap_bytes(gpu: str, headroom: str, constants=None) -> int:
    """`--enforce-budget`: the most torch's caching allocator may reserve so that the process, as
    nvidia-smi shows it, stays within `gpu` less the headroom: that budget less what lives outside
    the allocator (the CUDA context and the kernels a training step loads)."""
    from vramfit.constants import DEFAULT

    c = constants or DEFAULT
    return usable_bytes(gpu, headroom) - c.cuda_context_bytes - c.kernel_growth_bytes


def enforce_budget(gpu: str | None, headroom: str, constants=None) -> dict:
    """Emulate a smaller card on this one: `torch.cuda.set_per_process_memory_fraction` at
    `allocator_cap_bytes`, so an allocation past it raises torch.OutOfMemoryError in the step as
    the smaller card would.  -> what was enforced (for the run report)."""
    import torch

    if not torch.cuda.is_available():
        raise VramfitError("--enforce-budget caps a CUDA GPU's allocator: there is no CUDA GPU here")
    if gpu is None or re.fullmatch(r"(cuda|gpu|auto)(:\d+)?", gpu.strip().lower()):
        raise VramfitError("--enforce-budget needs --gpu with a smaller card's name or size (e.g. --gpu 16GB): "
                           "it emulates that card on this one")
    dev = torch.cuda.current_device()
    total = int(torch.cuda.get_device_properties(dev).total_memory)
    cap = allocator_cap_bytes(gpu, headroom, constants)
    if cap <= 0 or cap > total:
        raise VramfitError(f"--gpu {gpu} less the headroom and the CUDA context leaves {cap:,} bytes for the "
                           f"allocator; this GPU has {total:,}: give a size between")
    fraction = cap / total
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    return {"gpu": gpu, "headroom": headroom, "allocator_cap_bytes": cap, "device_total_bytes": total,
            "fraction": fraction}


# --------------------------------------------------------------------------- the OOM fall-back


def fallback_ladder(s: Setup) -> list[Setup]:
    """Cheaper setups in the order the fall-back tries them: smaller micro-batches (more
    accumulation, the same effective batch), then gradient checkpointing (at each micro-batch
    again), then LoRA, then QLoRA.  A method change keeps the LoRA layers, so an adapter
    checkpoint stays loadable."""
    effective = s.micro_batch * s.grad_accum
    micro = [d for d in range(s.micro_batch, 0, -1) if effective % d == 0]
    methods = [s.method] + [m for m in ("lora", "qlora") if ("full", "lora", "qlora").index(m) >
                            ("full", "lora", "qlora").index(s.method)]
    out = []
    for m in methods:
        base = s
        if m != s.method:
            targets = s.targets if s.method != "full" else "all-linear"
            precision = s.precision
            if m == "qlora" and precision == "32-true":
                precision = "bf16-true"
            base = s.with_(method=m, precision=precision, target_modules=targets)
        for ckpt in sorted({base.grad_ckpt, True}):
            for mb in micro:
                c = base.with_(grad_ckpt=ckpt, micro_batch=mb, grad_accum=effective // mb)
                if c != s and c not in out:
                    out.append(c)
    return out


def fallback_setup(spec, s: Setup, scale: float, cap_bytes: int | None, cuda: bool, constants=None):
    """After an OOM at `s`: the first setup of the ladder predicted to fit once its reserved peak
    is scaled by the measured overshoot (`scale` = needed / predicted); without a known cap, the
    first of the ladder.  -> (Setup, its prediction) or (None, None)."""
    for c in fallback_ladder(s):
        try:
            validate(c)
        except VramfitError:
            continue
        if runtime_problem(c, cuda):
            continue
        p = predict(spec, c, constants)
        if cap_bytes is None or p["peak_reserved_bytes"] * scale <= cap_bytes:
            return c, p
    return None, None


_SIZE = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)")


def oom_measurement(exc: BaseException, tracker, predicted: dict) -> dict:
    """What the failed step needed at least: the peak allocated in this attempt plus the request
    that failed; its ratio to the prediction; and the allocator's cap."""
    m = _SIZE.search(str(exc))
    tried = int(float(m.group(1)) * 1024 ** ("B", "KiB", "MiB", "GiB", "TiB").index(m.group(2))) if m else 0
    peak = tracker.attempt_peak("peak_allocated_bytes")
    needed = (peak or 0) + tried
    scale = max(1.0, needed / predicted["peak_allocated_bytes"]) if peak else 1.0
    return {"tried_bytes": tried, "measured_bytes": needed if peak else None, "scale": round(scale, 4),
            "cap_bytes": tracker.allocator_limit_bytes or tracker.allocator_room_bytes,
            "error": str(exc).splitlines()[0][:300] if str(exc) else "out of memory"}


def forget_bnb_overrides() -> None:
    """With a bitsandbytes 8-bit optimizer, transformers' Trainer registers every nn.Embedding with
    bitsandbytes' process-wide GlobalOptimManager (32-bit states for embeddings).  The manager keeps
    the modules, and so their weights, for the life of the process: measured on an H100, one
    embedding per Trainer (0.5 GB for Llama-3.2-1B in bf16, 2.1 GB for Llama-3.1-8B's fp32 one
    under QLoRA) that no later attempt could use.  Its stale parameter ids could also match new
    parameters.  Reset it between Trainers."""
    import sys

    optim = sys.modules.get("bitsandbytes.optim.optimizer")
    manager = getattr(getattr(optim, "GlobalOptimManager", None), "_instance", None)
    if manager is not None:
        manager.initialize()


def free_memory(trainer) -> None:
    """Drop what a failed attempt holds on the GPU (the caller drops its own references)."""
    import torch

    if trainer is not None:
        trainer.accelerator.free_memory()
        trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    forget_bnb_overrides()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- Ctrl-C


def _callback_classes():
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        """First Ctrl-C: finish the step, save a checkpoint, stop.  Second: stop now."""

        def __init__(self):
            self.requested = False

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True

    class LiveView(TrainerCallback):
        """Progress and memory against the prediction: a rich live view in a terminal, plain lines
        (one per logging step) in a pipe."""

        def __init__(self, console, tracker, max_steps, enabled):
            self.console, self.tracker, self.max_steps = console, tracker, max_steps
            self.use_live = enabled and console.is_terminal
            self.live = None
            self.loss = self.eval_loss = None
            self.t0 = time.perf_counter()
            self.tokens0 = None

        def status(self, state):
            from vramfit.report import train_status

            elapsed = time.perf_counter() - self.t0
            if self.tokens0 is None:
                self.tokens0 = state.num_input_tokens_seen
            tokens = (state.num_input_tokens_seen - self.tokens0) / elapsed if elapsed > 0 else None
            return train_status(state.global_step, self.max_steps, elapsed, tokens, self.loss, self.eval_loss,
                                self.tracker.last, self.tracker.predicted)

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
            if self.use_live and self.live is None:
                from rich.live import Live

                self.live = Live(console=self.console, refresh_per_second=2, transient=False)
                self.live.start()

        def on_step_end(self, args, state, control, **kwargs):
            if self.live is not None:
                from vramfit.report import train_live

                self.live.update(train_live(self.status(state), self.tracker.capacity_bytes))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            self.loss = logs.get("loss", self.loss)
            self.eval_loss = logs.get("eval_loss", self.eval_loss)
            if self.live is None and ("loss" in logs or "eval_loss" in logs):
                from vramfit.report import train_status_line

                self.console.print(train_status_line(self.status(state)), highlight=False, markup=False,
                                   soft_wrap=True)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self):
            if self.live is not None:
                self.live.stop()
                self.live = None

    return GracefulStop, LiveView


@contextmanager
def ctrl_c(stopper, say):
    """SIGINT -> stopper.requested (the run stops after the step, with a checkpoint); a second
    SIGINT raises KeyboardInterrupt.  Only the main thread can take signals: elsewhere, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stopper.requested:
            raise KeyboardInterrupt
        stopper.requested = True
        say("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- 6-7. model and trainer


def build_model(source: ModelSource, s: Setup, cuda: bool, seed: int, base_path: str | None, scratch: Path):
    """The base model as `s` loads it: dtype, attention, 4-bit NF4 + prepare_model_for_kbit_training
    for QLoRA.  LoRA layers are added by SFTTrainer from `lora_config(s)`."""
    import torch
    from transformers import AutoModelForCausalLM

    from vramfit.spec import config_from_dict

    dtype = getattr(torch, s.param_dtype)
    path = base_path or source.path
    kw = {"dtype": dtype, "attn_implementation": s.attn, "trust_remote_code": source.trust_remote_code}
    if s.method == "qlora":
        kw["quantization_config"] = bnb_config(s)
        kw["device_map"] = {"": torch.cuda.current_device()}
        if path is None:  # bitsandbytes quantizes while loading: write the random weights first
            path = _random_checkpoint(source, seed, scratch)
    if path is None:
        config = config_from_dict(source.config, source.name)
        torch.manual_seed(seed)
        with torch.device("cuda" if cuda else "cpu"):  # init in place: a 7B model in seconds on a GPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=s.attn)
        _name_base(model, source.name)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        except (OSError, ValueError) as exc:
            raise VramfitError(f"cannot load the model from {path}: {str(exc).splitlines()[0][:300]}") from None
        if source.path:
            _name_base(model, source.path)  # the adapter's base: the original, not a full checkpoint
    model.config.use_cache = False
    if s.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.grad_ckpt,
                                                gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    return model


def _name_base(model, name: str) -> None:
    """What peft writes as the adapter's base_model_name_or_path (and `vramfit merge` loads)."""
    model.config._name_or_path = name
    model.name_or_path = name


def _random_checkpoint(source: ModelSource, seed: int, scratch: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from vramfit.spec import config_from_dict

    target = scratch / "random-init"
    if not (target / "config.json").is_file():
        config = config_from_dict(source.config, source.name)
        torch.manual_seed(seed)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(target)
        del model
        torch.cuda.empty_cache()
    return str(target)


def schedule(opts: RunOptions, max_steps: int, has_eval: bool) -> dict:
    """Eval, save and logging intervals; save steps must be a multiple of eval steps for early stopping."""
    eval_steps = opts.eval_steps or max(1, max_steps // 10)
    save_steps = opts.save_steps if opts.save_steps is not None else eval_steps
    for name, v in (("--eval-steps", eval_steps), ("--logging-steps", opts.logging_steps)):
        if v <= 0:
            raise VramfitError(f"{name} must be a positive integer, got {v}")
    if save_steps < 0:
        raise VramfitError(f"--save-steps must be a positive integer or 0 (no checkpoints), got {save_steps}")
    if has_eval and save_steps == 0:
        raise VramfitError("--save-steps 0 (no checkpoints) needs --val-split 0: early stopping keeps the best "
                           "checkpoint, so checkpoints are saved at evaluations")
    if has_eval and save_steps % eval_steps:
        raise VramfitError(f"--save-steps {save_steps} must be a multiple of --eval-steps {eval_steps} (early "
                           f"stopping keeps the best checkpoint, so checkpoints are saved at evaluations)")
    return {"eval_steps": eval_steps, "save_steps": save_steps}


def sft_config(s: Setup, opts: RunOptions, output_dir: Path, max_steps: int, has_eval: bool, cuda: bool,
               assistant_only: bool):
    from trl import SFTConfig

    sched = schedule(opts, max_steps, has_eval)
    kw = rename_checkpointing(training_arguments_kwargs(s), SFTConfig)  # what `vramfit plan` prints
    kw.update(output_dir=str(output_dir), max_steps=max_steps, per_device_eval_batch_size=s.micro_batch,
              learning_rate=opts.learning_rate or DEFAULT_LR[s.method], warmup_steps=opts.warmup,
              max_length=opts.max_seq_len, packing=False, assistant_only_loss=assistant_only,
              logging_steps=opts.logging_steps, save_strategy="steps" if sched["save_steps"] else "no",
              save_total_limit=opts.save_total_limit, report_to=[], seed=opts.seed, dataloader_num_workers=0,
              disable_tqdm=True, use_cpu=not cuda, include_num_input_tokens_seen="non_padding")
    if sched["save_steps"]:
        kw["save_steps"] = sched["save_steps"]
    if has_eval:
        kw.update(eval_strategy="steps", eval_steps=sched["eval_steps"], load_best_model_at_end=True,
                  metric_for_best_model="eval_loss", greater_is_better=False)
    return SFTConfig(**kw)


def assistant_only_loss(tokenizer) -> tuple[bool, str | None]:
    """Loss on the assistant turns needs `{% generation %}` markers (or trl's training version of
    the template); without them: loss on the whole conversation, and a note saying so."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )

    if has_generation_markers(tokenizer.chat_template):
        return True, None
    try:
        get_training_chat_template(tokenizer)
        return True, None
    except ValueError:
        return False, ("the chat template marks no assistant turns ({% generation %}) and trl has no training "
                       "version of it: the loss covers the whole conversation")


# --------------------------------------------------------------------------- the recipe


def train(model: str, data: str, options: RunOptions | None = None, setup_options: dict | None = None,
          callbacks=(), console=None) -> dict:
    """Fine-tune MODEL on DATA; returns the run report (also written to OUT/run_report.json).
    setup_options: method, precision, optim, lora_r, lora_alpha, lora_dropout, target_modules,
    micro_batch, grad_accum, grad_ckpt, seq_len, attn (None: the planner chooses)."""
    import torch
    from rich.console import Console

    from vramfit import report
    from vramfit.calibrate import load_local_constants

    opts = options or RunOptions()
    console = console or Console()
    say = lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    out = Path(opts.out_dir).expanduser()
    saved = _check_out_dir(out, opts.resume)
    cuda = torch.cuda.is_available()

    source = resolve_model(model, opts.init, opts.trust_remote_code)  # 1
    tokenizer = load_tokenizer(source, opts.tokenizer, opts.trust_remote_code)  # 2
    d = vdata.prepare(data, tokenizer, opts.data_format, opts.on_bad_row, opts.val_split, opts.val_file,  # 3
                      opts.max_seq_len, opts.seq_len_from, opts.seed)
    for line in report.data_report_lines(d):
        say(line)
    assistant_only, loss_note = assistant_only_loss(tokenizer) if d.train.format == "messages" else (False, None)
    if loss_note:
        say("note: " + loss_note)
    plan = None  # 4
    gpu = opts.gpu or (f"cuda:{nvml_index()}" if cuda else None)  # the GPU the Trainer will use
    if saved:
        s = Setup(**saved["setup"])
        say("resuming with the saved setup: " + report.setup_label(s))
    else:
        s, plan = choose_setup(source.spec, setup_options or {}, d.seq_len, gpu, opts.headroom, opts.effective_batch,
                               padded=data_is_padded(d))
        if plan is not None:
            console.print(report.plan_verdict(plan), highlight=False)
    problem = runtime_problem(s, cuda)
    if problem:
        raise VramfitError(problem)
    constants = load_local_constants()[0]
    seq_lens = None
    if opts.simulate_allocator is None:
        opts = replace(opts, simulate_allocator=cuda)  # the run report says what was done
    if opts.simulate_allocator:  # the data's own padded batch lengths, replayed through the allocator model
        seq_lens = batch_lengths(d.row_lengths, s.micro_batch, s.seq_len, SIMULATED_STEPS, opts.seed)
    predicted = predict(source.spec, s, constants, seq_lens)  # 5
    for note in predicted.pop("notes", []):
        say("note: " + note)
    budget = usable_bytes(gpu, opts.headroom) if cuda else None
    say(report.prediction_line(s, predicted, budget))
    enforced = enforce_budget(opts.gpu, opts.headroom, constants) if opts.enforce_budget else None
    if enforced:
        say(f"budget enforced: torch's allocator is capped at {report.fmt_bytes(enforced['allocator_cap_bytes'])} "
            f"({enforced['fraction']:.4f} of this GPU) to emulate --gpu {enforced['gpu']}")
    if opts.fit_check and budget is not None and predicted["device_bytes"] > budget and not saved:
        raise VramfitError(f"{report.setup_label(s)} is predicted to need {report.fmt_bytes(predicted['device_bytes'])}"
                           f" but {report.fmt_bytes(budget)} is usable: leave out some of --method/--micro-batch/"
                           f"--grad-ckpt/... to let the planner choose, or see `vramfit plan {model}`")
    max_steps = saved["max_steps"] if saved else (
        opts.max_steps or max(1, math.ceil(opts.epochs * len(d.train.rows) / (s.micro_batch * s.grad_accum))))
    if max_steps <= 0:
        raise VramfitError(f"--max-steps must be a positive integer, got {max_steps}")
    schedule(opts, max_steps, bool(d.eval_rows))

    # ---- 6-8: from here on, files are written and the model is loaded
    out.mkdir(parents=True, exist_ok=True)
    run = {"setup": _setup_json(s), "max_steps": max_steps, "step_offset": (saved or {}).get("step_offset", 0),
           "base_path": (saved or {}).get("base_path")}
    _write_json(out / SETUP_NAME, run)
    runner = _Runner(source, tokenizer, d, opts, out, run, cuda, constants, assistant_only, callbacks, console)
    try:
        status, failure = runner.run(s, predicted, resume_from=_last_checkpoint(out, s) if saved else None,
                                     resuming=bool(saved))
    except VramfitError:  # the model would not load: leave no half-written run behind
        if not saved and not runner.attempts:
            shutil.rmtree(out, ignore_errors=True)
        raise
    s, predicted, trainer = runner.setup, runner.predicted, runner.trainer
    outputs = {"timeline": str(out / TIMELINE_NAME), "plot": str(runner.tracker.plot_path),
               "report": str(out / REPORT_NAME)}
    shutil.rmtree(out / "random-init", ignore_errors=True)  # QLoRA's random weights, written to be quantized
    if trainer is not None and status != "aborted":
        target = out / ("model" if s.method == "full" else "adapter")
        trainer.save_model(str(target))
        outputs["model" if s.method == "full" else "adapter"] = str(target)
    outputs["checkpoint"] = _last_checkpoint(out, s)
    rep = _run_report(status, source, opts, d, s, plan, predicted, runner, max_steps, outputs, loss_note, cuda)
    rep["enforced_budget"] = enforced
    _write_json(out / REPORT_NAME, rep)
    console.print(report.memory_summary_table(rep["measured"]))
    for line in report.run_summary_lines(rep):
        say(line)
    if failure:
        raise VramfitError(failure)
    return rep


class _Runner:
    """Step 7: trainer attempts, one per setup, until one finishes (the OOM fall-back between them)."""

    def __init__(self, source, tokenizer, d, opts, out, run, cuda, constants, assistant_only, callbacks, console):
        from vramfit.tracker import MemoryTracker

        self.source, self.tokenizer, self.opts, self.out, self.run_state = source, tokenizer, opts, out, run
        self.cuda, self.constants, self.assistant_only, self.callbacks = cuda, constants, assistant_only, callbacks
        self.console = console
        self.train_ds = vdata.to_hf_dataset(d.train.rows)
        self.eval_ds = vdata.to_hf_dataset(d.eval_rows) if d.eval_rows else None
        self.tracker = MemoryTracker(out / TIMELINE_NAME, finish_on_train_end=False)
        GracefulStop, self.LiveView = _callback_classes()
        self.stopper = GracefulStop()
        self.attempts, self.fallbacks = [], []
        self.trainer = self.setup = self.predicted = None
        self.started = time.perf_counter()

    def say(self, line: str) -> None:
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def run(self, s: Setup, predicted: dict, resume_from: str | None, resuming: bool) -> tuple[str, str | None]:
        """-> (status, failure message or None)."""
        import torch

        self.setup, self.predicted = s, predicted
        if resuming and resume_from is None:
            self.say("no checkpoint to resume from yet: starting over")
        try:
            while True:
                oom = self.attempt(resume_from)
                if oom is None:
                    break
                resume_from, failure = self.after_oom(oom)
                if failure:
                    return "out of memory", failure
            steps = self.run_state["step_offset"] + self.trainer.state.global_step
            if self.stopper.requested:
                return "interrupted", None
            if steps < self.run_state["max_steps"]:
                return "stopped early (validation loss stopped improving)", None
            return "completed", None
        except KeyboardInterrupt:
            self.say("stopped at once: the last checkpoint and the memory timeline are kept")
            return "aborted", None
        finally:
            self.seconds = time.perf_counter() - self.started
            self.summary = self.tracker.finish()
            if self.cuda:
                torch.cuda.empty_cache()

    def attempt(self, resume_from: str | None) -> dict | None:
        """One Trainer on the current setup -> None when it finished, else what the OOM measured."""
        import torch

        s, run = self.setup, self.run_state
        steps = run["max_steps"] - run["step_offset"]
        apply_allocator(s, self.cuda)
        model = build_model(self.source, s, self.cuda, self.opts.seed, run["base_path"], self.out)
        live = self.LiveView(self.console, self.tracker, steps, self.opts.live)
        self.trainer = _trainer(model, self.tokenizer, s, self.opts, self.out, steps, self.train_ds, self.eval_ds,
                                self.cuda, self.assistant_only, [self.tracker, live, self.stopper, *self.callbacks])
        del model
        self.tracker.begin_attempt(_setup_json(s), self.predicted)
        oom, done = None, False
        try:
            with ctrl_c(self.stopper, self.say):
                self.trainer.train(resume_from_checkpoint=resume_from)
            done = True
        except torch.OutOfMemoryError as exc:
            self.tracker.event("out of memory", error=str(exc).splitlines()[0][:300] if str(exc) else "")
            oom = oom_measurement(exc, self.tracker, self.predicted)
        finally:
            live.close()
            history = self.trainer.state.log_history
            self.attempts.append({
                "setup": _setup_json(s), "predicted": self.predicted, "measured": self.tracker.attempt_peaks(),
                "outcome": "out of memory" if oom else "finished" if done else "aborted",
                "last_step": run["step_offset"] + self.trainer.state.global_step,
                "losses": [{"step": h["step"] + run["step_offset"], "loss": h["loss"]} for h in history if "loss" in h],
                "eval_losses": [{"step": h["step"] + run["step_offset"], "eval_loss": h["eval_loss"]}
                                for h in history if "eval_loss" in h]})
        return oom

    def after_oom(self, oom: dict) -> tuple[str | None, str | None]:
        """Free the failed attempt, pick the next setup -> (checkpoint to resume from, failure)."""
        from vramfit import report

        s, run = self.setup, self.run_state
        step = self.attempts[-1]["last_step"] + 1
        free_memory(self.trainer)
        self.trainer = None
        new, new_pred = fallback_setup(self.source.spec, s, oom["scale"], oom["cap_bytes"], self.cuda,
                                       self.constants) if self.opts.fallback else (None, None)
        if new is None:
            why = "the fall-back is off (--no-fallback)" if not self.opts.fallback else \
                "no cheaper setup is predicted to fit once scaled by the measured overshoot"
            return None, (f"out of memory at step {step} with {report.setup_label(s)} ({oom['error']}); {why}. "
                          f"The memory timeline is in {self.out / TIMELINE_NAME}")
        resume_from = _last_checkpoint(self.out, s)
        if new.method != s.method and s.method == "full":  # a LoRA on the last full weights, fresh optimizer
            done = int(resume_from.rsplit("-", 1)[1]) if resume_from else 0
            run["base_path"] = resume_from or run["base_path"]
            run["step_offset"] += done
            resume_from = None
        self.fallbacks.append({"step": step, "setup_before": _setup_json(s), "setup_after": _setup_json(new),
                               "resumed_from": resume_from, "base_path": run["base_path"],
                               "predicted_bytes": self.predicted["peak_allocated_bytes"],
                               **{k: oom[k] for k in ("measured_bytes", "tried_bytes", "scale", "cap_bytes", "error")}})
        self.say(report.fallback_line(self.fallbacks[-1]))
        self.tracker.event("re-planned", setup=_setup_json(new), predicted=new_pred)
        self.setup, self.predicted = new, new_pred
        run["setup"] = _setup_json(new)
        _write_json(self.out / SETUP_NAME, run)
        return resume_from, None


def _trainer(model, tokenizer, s, opts, out, max_steps, train_ds, eval_ds, cuda, assistant_only, callbacks):
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    args = sft_config(s, opts, _checkpoint_dir(out, s), max_steps, eval_ds is not None, cuda, assistant_only)
    if eval_ds is not None and opts.early_stopping_patience > 0:
        callbacks = [*callbacks, EarlyStoppingCallback(early_stopping_patience=opts.early_stopping_patience)]
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=lora_config(s, model), callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # our LiveView prints the progress
    return trainer


def _checkpoint_dir(out: Path, s: Setup) -> Path:
    """Checkpoints per method: a fall-back to another method starts a new series."""
    return out / "checkpoints" / s.method


def _last_checkpoint(out: Path, s: Setup) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    d = _checkpoint_dir(out, s)
    return get_last_checkpoint(str(d)) if d.is_dir() else None


def _check_out_dir(out: Path, resume: bool) -> dict | None:
    """A finished or started run is never overwritten; --resume needs one.  -> the saved run or None."""
    saved = out / SETUP_NAME
    if resume:
        if not saved.is_file():
            raise VramfitError(f"nothing to resume in {out}: it holds no {SETUP_NAME} from an earlier run")
        return json.loads(saved.read_text())
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VramfitError(f"{out} already exists and is not empty: choose another --out, or --resume the run in it")
    return None


def _setup_json(s: Setup) -> dict:
    d = asdict(s)
    d.pop("extras", None)
    return d


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def versions() -> dict:
    from vramfit.versions import installed

    return installed(*PACKAGES)


def _run_report(status, source, opts, d, s, plan, predicted, runner, max_steps, outputs, loss_note, cuda) -> dict:
    def merged(key: str) -> list:  # later attempts redo the steps after their checkpoint: theirs win
        by_step = {}
        for a in runner.attempts:
            by_step.update({x["step"]: x for x in a[key]})
        return [by_step[k] for k in sorted(by_step)]

    losses, evals = merged("losses"), merged("eval_losses")
    trainer = runner.trainer
    return {
        "status": status, "model": source.name, "model_path": source.path, "init": source.init,
        "data": d.to_json(), "loss_note": loss_note,
        "setup": _setup_json(s), "initial_setup": runner.attempts[0]["setup"] if runner.attempts else _setup_json(s),
        "plan": plan.to_json() if plan is not None else None,
        "predicted": predicted, "measured": runner.summary,
        "attempts": [{k: v for k, v in a.items() if k not in ("losses", "eval_losses")} for a in runner.attempts],
        "fallbacks": runner.fallbacks,
        "steps": runner.attempts[-1]["last_step"] if runner.attempts else runner.run_state["step_offset"],
        "max_steps": max_steps, "train_seconds": round(runner.seconds, 2),
        "tokens_seen": trainer.state.num_input_tokens_seen if trainer is not None else None,
        "losses": losses, "eval_losses": evals, "final_loss": losses[-1]["loss"] if losses else None,
        "best_eval_loss": min((e["eval_loss"] for e in evals), default=None),
        "options": asdict(opts), "cuda": cuda, "outputs": outputs, "versions": versions(),
    }


# --------------------------------------------------------------------------- merge


def merge(adapter_dir: str, out_dir: str, base: str | None = None, dtype: str = "auto",
          trust_remote_code: bool = False) -> dict:
    """Fold a LoRA adapter into its base model (peft merge_and_unload) and save a standard model
    (safetensors) with the tokenizer, loadable without peft."""
    adapter = Path(adapter_dir).expanduser()
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise VramfitError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VramfitError(f"{out} already exists and is not empty: choose another --out")
    base = base or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise VramfitError(f"{cfg_path} names no base model: give it with --base")
    base_path = Path(base).expanduser()
    if not base_path.is_dir() and (base.startswith((".", "/", "~")) or "/" not in base):
        raise VramfitError(f"the adapter's base '{base}' is not a model directory with weights (a random-init "
                           f"run has none to merge into); give the base with --base")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise VramfitError(f"unknown dtype '{dtype}'; use auto, bfloat16, float16 or float32")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise VramfitError(f"cannot load the base model {base}: {str(exc).splitlines()[0][:300]}") from None
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else base
    try:
        AutoTokenizer.from_pretrained(str(tok_src), trust_remote_code=trust_remote_code).save_pretrained(str(out))
    except (OSError, ValueError):
        pass  # a base without a tokenizer: the merged weights are still complete
    for extra in ("chat_template.jinja",):
        if (adapter / extra).is_file() and not (out / extra).is_file():
            shutil.copy(adapter / extra, out / extra)
    return {"base": base, "adapter": str(adapter), "out": str(out),
            "params": sum(p.numel() for p in merged.parameters())}
