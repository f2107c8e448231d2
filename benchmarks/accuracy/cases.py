"""What a case is: a plain dict (JSON) with fixed key names, shared with the memory model.

A training case:
    model             profile name: profiles/models/<model>.json (an HF config.json plus `_` keys)
    config_overrides  dict applied to that config, e.g. {"num_hidden_layers": 4}
    method            full | lora | qlora
    precision         32-true | bf16-true | bf16-mixed | bf16-amp | 16-mixed | 16-true | 16-amp
                      (vramfit.memory.setup: bf16-amp = dtype bfloat16 + bf16=True, the guides' recipe)
    loss              only when "fused": trl's fused LM head (add_fused_lm_head, as SFTTrainer); absent:
                      the model's own loss from full logits (cases made before the key keep their ids)
    liger             only when true: TrainingArguments(use_liger_kernel=True), Trainer applies liger-kernel
                      to the (PEFT-unwrapped) model: fused linear cross-entropy, RMSNorm, SwiGLU/GEGLU, RoPE
    packing           only when true: trl's padding-free BFD packing (SFTConfig(packing=True,
                      packing_strategy="bfd")); `example_len` (with it, default 256) names the seeded
                      example-length distribution, see `packed_example_lengths`
    activation_offloading  only when true: trl's activation offloading context around each training
                      step, as SFTTrainer(activation_offloading=True) does
    optim             a transformers TrainingArguments.optim name
    lora_r, lora_alpha, lora_dropout, target_modules   (None for full fine-tuning)
    seq_len, micro_batch, grad_ckpt, attn, allocator, steps, memory_fraction
A context micro-case: {"kind": "context", "allocator": ...}.

Every key is filled in by `training_case` / `context_case`, so a case dict is complete and its
`case_id` (a hash of the dict) is stable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILES_DIR = REPO_ROOT / "profiles" / "models"
# Tests point this at a folder of tiny profiles; the child inherits it through fork.
PROFILES_ENV = "VRAMFIT_PROFILES_DIR"

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "bf16-amp", "16-mixed", "16-true", "16-amp")
ALLOCATORS = {"default": None, "expandable": "expandable_segments:True"}

# precision -> (dtype the weights are loaded in, TrainingArguments bf16, fp16)
PRECISION_SETUP = {
    "32-true": ("float32", False, False),
    "bf16-true": ("bfloat16", False, False),
    "bf16-mixed": ("float32", True, False),
    "16-mixed": ("float32", False, True),
    "16-true": ("float16", False, False),
    "bf16-amp": ("bfloat16", True, False),
    "16-amp": ("float16", False, True),
}


def training_case(
    model: str,
    method: str = "full",
    precision: str = "bf16-true",
    optim: str = "adamw_torch",
    seq_len: int = 512,
    micro_batch: int = 1,
    grad_ckpt: bool = False,
    attn: str = "sdpa",
    allocator: str = "default",
    lora_r: int | None = 16,
    lora_alpha: int | None = None,
    lora_dropout: float | None = 0.05,
    target_modules: list[str] | str | None = "all-linear",
    config_overrides: dict | None = None,
    steps: int = 3,
    memory_fraction: float | None = None,
    loss: str = "logits",
    liger: bool = False,
    packing: bool = False,
    example_len: int | None = None,
    activation_offloading: bool = False,
    kbit_prep: bool = True,
) -> dict:
    """A complete training case dict; LoRA keys are None for full fine-tuning.

    The levers (`loss="fused"`, `liger`, `packing` with `example_len`, `activation_offloading`) are
    keys only when on, so the cases made before them keep their ids."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} not in {METHODS}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {PRECISIONS}")
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator {allocator!r} not in {list(ALLOCATORS)}")
    lora = method != "full"
    extra: dict = {"loss": "fused"} if loss == "fused" else {}
    if liger:
        extra["liger"] = True
    if packing:
        extra["packing"] = True
        extra["example_len"] = int(example_len or DEFAULT_EXAMPLE_LEN)
    elif example_len is not None:
        raise ValueError("example_len is a packing key: pass packing=True")
    if activation_offloading:
        extra["activation_offloading"] = True
    if not kbit_prep:  # QLoRA without prepare_model_for_kbit_training (trl's and Unsloth's loading)
        extra["kbit_prep"] = False
    if method == "qlora" and loss == "fused":  # train_case casts the adapters to bf16 as SFTTrainer does
        extra["trl_adapter_cast"] = True
    return {**extra,
        "kind": "train",
        "model": model,
        "config_overrides": dict(config_overrides or {}),
        "method": method,
        "precision": precision,
        "optim": optim,
        "lora_r": lora_r if lora else None,
        "lora_alpha": (lora_alpha if lora_alpha is not None else 2 * lora_r) if lora else None,
        "lora_dropout": lora_dropout if lora else None,
        "target_modules": (list(target_modules) if isinstance(target_modules, (list, tuple))
                           else target_modules) if lora else None,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "grad_ckpt": grad_ckpt,
        "attn": attn,
        "allocator": allocator,
        "steps": steps,
        "memory_fraction": memory_fraction,
    }


def context_case(allocator: str = "default") -> dict:
    """The micro-case that measures CUDA context, cuBLAS workspace and allocator rounding."""
    return {"kind": "context", "allocator": allocator}


def case_id(case: dict) -> str:
    """Stable id: sha1 of the canonical JSON of the case (without any `id` key), 12 hex digits."""
    body = {k: v for k, v in case.items() if k != "id"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def case_label(case: dict) -> str:
    """Short human label for progress lines and `--only` matching."""
    if case.get("kind") == "context":
        return f"context/{case['allocator']}"
    parts = [case["model"]]
    if case["config_overrides"]:
        parts[0] += "[" + ",".join(f"{k}={v}" for k, v in sorted(case["config_overrides"].items())) + "]"
    method = case["method"]
    if method != "full":
        targets = case["target_modules"]
        targets = targets if isinstance(targets, str) else ",".join(targets)
        method += f"-r{case['lora_r']}-{targets}"
    parts += [method, case["precision"], case["optim"],
              f"s{case['seq_len']}xb{case['micro_batch']}", case["attn"]]
    if case["grad_ckpt"]:
        parts.append("ckpt")
    if case["allocator"] != "default":
        parts.append(case["allocator"])
    if case.get("memory_fraction"):
        parts.append(f"frac{case['memory_fraction']}")
    if case.get("memory_limit_bytes"):
        parts.append(f"cap{case['memory_limit_bytes']}")
    if case.get("loss") == "fused":
        parts.append("fused")
    if case.get("kbit_prep") is False:
        parts.append("no-kbit-prep")
    if case.get("liger"):
        parts.append("liger")
    if case.get("packing"):
        parts.append(f"packed{case['example_len']}")
    if case.get("activation_offloading"):
        parts.append("offload")
    return "/".join(parts)


# ---------------------------------------------------------------- packing

DEFAULT_EXAMPLE_LEN = 256
PACKING_LENGTH_SIGMA = 0.6  # log-normal spread of the example lengths


def packed_example_lengths(case: dict) -> list[list[int]]:
    """The example lengths of every packed row of a `packing` case, in the dataset's (= the
    training's) order: row r is micro-batch r // micro_batch, position r % micro_batch in it.

    Lengths are drawn, for each row in turn, from a log-normal of mean `example_len` tokens
    (sigma PACKING_LENGTH_SIGMA, rounded, clamped to [1, seq_len]) by `random.Random` seeded with a
    string named by the case's seq_len and example_len (stable across Python versions and machines),
    until the row holds `seq_len` tokens; the last example is TRUNCATED so that every packed row is
    exactly `seq_len` tokens long (and a micro-batch exactly micro_batch * seq_len). Within a row the
    lengths are in decreasing order, the order trl's BFD packing (pack_dataset) puts them in.

    The micro-batch the model sees (trl's DataCollatorForLanguageModeling(padding_free=True)) is ONE
    row of micro_batch * seq_len tokens: its rows concatenated, `position_ids` = concatenation of
    arange(length) over the examples of those rows in this order; labels = input_ids with -100 where
    position_ids == 0 (each example's first token).
    """
    seq, mean = case["seq_len"], case["example_len"]
    rows = case["steps"] * case["micro_batch"]
    mu = math.log(mean) - PACKING_LENGTH_SIGMA ** 2 / 2
    rng = random.Random(f"vramfit-packing-seq{seq}-len{mean}")
    out = []
    for _ in range(rows):
        lengths, total = [], 0
        while total < seq:
            n = max(1, min(seq, round(rng.lognormvariate(mu, PACKING_LENGTH_SIGMA))))
            n = min(n, seq - total)  # the row's last example is truncated to fill it exactly
            lengths.append(n)
            total += n
        out.append(sorted(lengths, reverse=True))
    return out


def packed_position_ids(case: dict, step: int = 0) -> list[int]:
    """The flat position_ids of micro-batch `step` (0-based) of a `packing` case."""
    rows = packed_example_lengths(case)[step * case["micro_batch"]:(step + 1) * case["micro_batch"]]
    return [p for row in rows for n in row for p in range(n)]


def profiles_dir() -> Path:
    return Path(os.environ.get(PROFILES_ENV) or PROFILES_DIR)


def load_profile(name: str) -> dict:
    """The profile file as stored, `_` keys included."""
    path = profiles_dir() / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no model profile {path}")
    return json.loads(path.read_text())


def model_config_dict(case: dict) -> dict:
    """The HF config dict the case trains: profile without `_` keys, overrides applied."""
    config = {k: v for k, v in load_profile(case["model"]).items() if not k.startswith("_")}
    config.update(case["config_overrides"])
    return config


def checkpoint_key(case: dict) -> str:
    """Cache key of the random-init checkpoint a QLoRA case loads: model and overrides only."""
    text = json.dumps([case["model"], case["config_overrides"]], sort_keys=True)
    return case["model"] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
