"""The multi-GPU proof grid: (model, strategy, setup) cases run with 2 processes.

Models are bundled profiles built with random weights (no download); sizes chosen so every case
finishes in well under a minute on H100/H200 and the sharded terms are large against the noise
(1-1.5B full fine-tuning: fp32 master weights and AdamW states of several GiB).  `DRY` is the
same grid on a tiny model for the CPU dry run (DDP cases train for real over gloo; the others
write and load their configs).
"""

from __future__ import annotations

BASE = {"seq_len": 1024, "micro_batch": 2, "grad_accum": 1, "grad_ckpt": False, "optim": "adamw_torch",
        "lora_r": 16, "target_modules": "all-linear", "steps": 4, "gpus": 2}


def case(name, model, strategy, method, precision, **kw):
    c = {**BASE, "name": name, "model": model, "strategy": strategy, "method": method, "precision": precision, **kw}
    if method == "full":
        c["lora_r"] = c["target_modules"] = None
    return c


GRID = [
    # full fine-tuning with fp32 master weights (bf16-mixed): the states dominate, sharding shows
    case("ddp-full-1b", "llama-3.2-1b", "ddp", "full", "bf16-mixed"),
    case("fsdp-full-full-1b", "llama-3.2-1b", "fsdp-full", "full", "bf16-mixed"),
    case("fsdp-grad-op-full-1b", "llama-3.2-1b", "fsdp-grad-op", "full", "bf16-mixed"),
    # pure bf16 full fine-tuning with checkpointing, another architecture
    case("ddp-full-qwen1.5b-ckpt", "qwen2.5-1.5b", "ddp", "full", "bf16-true", grad_ckpt=True),
    case("fsdp-full-full-qwen1.5b-ckpt", "qwen2.5-1.5b", "fsdp-full", "full", "bf16-true", grad_ckpt=True),
    case("fsdp-grad-op-full-qwen1.5b-ckpt", "qwen2.5-1.5b", "fsdp-grad-op", "full", "bf16-true", grad_ckpt=True),
    # LoRA: frozen base weights sharded by FSDP, replicated by DDP
    case("ddp-lora-3b", "llama-3.2-3b", "ddp", "lora", "bf16-true"),
    case("fsdp-full-lora-3b", "llama-3.2-3b", "fsdp-full", "lora", "bf16-true"),
    case("fsdp-grad-op-lora-3b", "llama-3.2-3b", "fsdp-grad-op", "lora", "bf16-true"),
    # DeepSpeed, where it can be carried (skipped with the reason when deepspeed is not importable)
    case("zero1-full-1b", "llama-3.2-1b", "zero1", "full", "bf16-mixed"),
    case("zero2-full-1b", "llama-3.2-1b", "zero2", "full", "bf16-mixed"),
    case("zero3-full-1b", "llama-3.2-1b", "zero3", "full", "bf16-mixed"),
    case("zero2-offload-full-1b", "llama-3.2-1b", "zero2-offload", "full", "bf16-mixed"),
    case("zero3-full-qwen1.5b-ckpt", "qwen2.5-1.5b", "zero3", "full", "bf16-mixed", grad_ckpt=True),
]

# The CPU dry run: the same strategies on the smallest bundled profile, fp32, short sequences.
DRY = [{**c, "name": "dry-" + c["name"], "model": "smollm2-135m", "precision": "32-true", "seq_len": 64,
        "micro_batch": 1, "steps": 2, "grad_ckpt": False} for c in GRID]
