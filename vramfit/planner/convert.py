"""A Setup as the kwargs and objects of transformers / peft / bitsandbytes / trl.

The plan's converters (`Plan.to_*_kwargs`, `Plan.lora_config()`, ...) and the launcher both use
these, so what `vramfit plan` tells a user to write and what `vramfit train` runs are the same.
The kwargs functions are plain data (no imports); the object builders import lazily.
"""

from __future__ import annotations

import re

from vramfit.memory.setup import Setup

# gradient checkpointing as transformers recommends it (the non-reentrant autograd variant, which
# works with frozen inputs such as LoRA's and with torch.compile)
CHECKPOINTING_KWARGS = {"use_reentrant": False}


def training_arguments_kwargs(s: Setup) -> dict:
    """`TrainingArguments` / `SFTConfig` kwargs (classic names; see `rename_checkpointing`)."""
    kw = {"per_device_train_batch_size": s.micro_batch, "gradient_accumulation_steps": s.grad_accum,
          "gradient_checkpointing": s.grad_ckpt, "bf16": s.autocast_dtype == "bfloat16",
          "fp16": s.autocast_dtype == "float16", "optim": s.optim}
    if s.grad_ckpt:
        kw["gradient_checkpointing_kwargs"] = dict(CHECKPOINTING_KWARGS)
    if s.liger:  # liger-kernel's RMSNorm / SwiGLU / RoPE (trl keeps its own fused loss: see planner/levers.py)
        kw["use_liger_kernel"] = True
    return kw


def sft_config_kwargs(s: Setup) -> dict:
    """trl `SFTConfig` kwargs: `training_arguments_kwargs`, the sequence length, and the trl-only levers
    (packing: bfd, padding-free, rows of seq_len; activation offloading)."""
    from vramfit.planner.levers import sft_lever_kwargs

    return {**training_arguments_kwargs(s), "max_length": s.seq_len, **sft_lever_kwargs(s)}


def rename_checkpointing(kw: dict, args_class) -> dict:
    """transformers 5.x renamed `gradient_checkpointing[_kwargs]` to `activation_checkpointing[_kwargs]`
    (the old names still work, with a warning): use the names `args_class` has."""
    fields = getattr(args_class, "__dataclass_fields__", {})
    if "activation_checkpointing" not in fields:
        return dict(kw)
    return {k.replace("gradient_checkpointing", "activation_checkpointing"): v for k, v in kw.items()}


def lora_config_kwargs(s: Setup) -> dict | None:
    if s.method == "full":
        return None
    t = s.targets  # "all-linear" and regexes go to peft as strings, comma lists as lists
    regex = re.search(r"[\\\[\]()*+?|^$]", t) is not None
    targets = t if t == "all-linear" or regex else [x.strip() for x in t.split(",") if x.strip()]
    return {"r": s.lora_r, "lora_alpha": s.lora_alpha or 2 * s.lora_r, "lora_dropout": s.lora_dropout,
            "target_modules": targets, "task_type": "CAUSAL_LM"}


def bnb_config_kwargs(s: Setup) -> dict | None:
    if s.method != "qlora":
        return None
    return {"load_in_4bit": True, "bnb_4bit_quant_type": s.quant_type, "bnb_4bit_use_double_quant": s.double_quant,
            "bnb_4bit_compute_dtype": "float16" if s.precision.startswith("16") else "bfloat16"}


def model_kwargs(s: Setup) -> dict:
    out = {"dtype": s.param_dtype, "attn_implementation": s.attn}
    if s.method == "qlora":
        out["quantization_config"] = bnb_config_kwargs(s)
    return out


def linear_targets(model) -> list[str] | None:
    """What vramfit means by "all-linear" for `model`, as peft target names, where peft means more.

    peft (>= 0.18) takes "all-linear" on a model with fused MoE experts (3-D expert weights, as
    transformers 5 builds Mixtral and Qwen-MoE) to cover those parameters too, through its
    ParamWrapper, which also refuses lora_dropout != 0.  vramfit's memory model (and its traces)
    put LoRA on the Linear layers only, every one but the output layer, so the launcher names
    them. None where the model has no such parameters: "all-linear" then means the same to both."""
    import torch

    if not any(p.dim() == 3 for p in model.parameters()):
        return None
    output = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not output})


def lora_config(s: Setup, model=None):
    """peft's LoraConfig of setup `s`; `model` given, "all-linear" is pinned to vramfit's meaning
    (`linear_targets`)."""
    kw = lora_config_kwargs(s)
    if kw is None:
        return None
    from peft import LoraConfig

    if model is not None and kw["target_modules"] == "all-linear":
        kw["target_modules"] = linear_targets(model) or "all-linear"
    return LoraConfig(**kw)


def bnb_config(s: Setup):
    kw = bnb_config_kwargs(s)
    if kw is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**{**kw, "bnb_4bit_compute_dtype": getattr(torch, kw["bnb_4bit_compute_dtype"])})
