"""Named grids: lists of case dicts (see cases.py).

- `smoke`  : two small cases and the context micro-case (first check of a new machine).
- `issue2` : 36 configurations, 8 architectures, ~135M to ~7B, all methods; under ~8 min on an H100.
- `full`   : the issue 3 grid (>=160 configurations, >=10 architectures, a shrunk MoE, configurations
             that do not fit in 80 GB); run it in shards of <= 9 minutes (`--shard i/4`).
- `recipes`: the standard guides' recipes (issue 19): bfloat16 weights under bf16 autocast
             (`from_pretrained(dtype=bfloat16)` + `bf16=True`) for full / LoRA / QLoRA (QLoRA through
             prepare_model_for_kbit_training), float32 weights under bf16, with and without
             checkpointing, LoRA q,v and all-linear up to r64, both losses (the model's own and trl's
             fused head), 7 architectures.
- `levers` : issue 20's memory levers, each >= 6 cases over >= 3 architectures next to its baseline
             twin (the same case without the lever; some twins shared between levers): liger-kernel,
             trl's padding-free BFD packing, trl's activation offloading; 4 steps, bf16-amp; ~6 min on
             an H100 (see LEVER_SECONDS).
- `levers_history`: one lever case per lever (llama-3.2-1b) to re-run with torch's
             memory history.
- `levers_offload`: 7 more activation offloading cases (both losses, full / LoRA / QLoRA, 5
             architectures); `levers_offload_history`: the fused-loss full offloading case to re-run
             with torch's memory history (device_levers.sh MODE=offload).

Large architectures are shrunk with `config_overrides` (fewer layers) where the aim is the shape
of the model, not its size. Paged optimizers use CUDA managed memory: they appear only in cases
whose optimizer state is far below the card's free memory.
"""

from __future__ import annotations

from .cases import case_id, context_case
from .cases import training_case as T

QV = {  # the attention projections usually called "q,v" in each family
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "phi3": ["qkv_proj"],
    "falcon": ["query_key_value"],
}
QV_DEFAULT = ["q_proj", "v_proj"]

# model type of each profile used here (for the q,v target names)
MODEL_TYPES = {
    "gpt2": "gpt2", "gpt2-medium": "gpt2", "pythia-410m": "gpt_neox", "pythia-1b": "gpt_neox",
    "phi-3-mini": "phi3", "falcon-7b": "falcon",
}


def qv(model: str) -> list[str]:
    return QV.get(MODEL_TYPES.get(model, ""), QV_DEFAULT)


def smoke() -> list[dict]:
    return [
        context_case("default"),
        T("smollm2-135m", "full", "bf16-mixed", "adamw_torch", seq_len=512, micro_batch=4),
        T("qwen2.5-0.5b", "qlora", "bf16-true", "paged_adamw_8bit", seq_len=512, micro_batch=2,
          grad_ckpt=True, lora_r=16, target_modules="all-linear"),
    ]


def issue2() -> list[dict]:
    full = [
        T("smollm2-135m", "full", "bf16-mixed", "adamw_torch", seq_len=512, micro_batch=4),
        T("smollm2-135m", "full", "32-true", "adamw_torch", seq_len=1024, micro_batch=2, attn="eager"),
        T("gpt2", "full", "32-true", "adamw_torch", seq_len=1024, micro_batch=4),
        T("gpt2", "full", "bf16-mixed", "adamw_torch_fused", seq_len=1024, micro_batch=8, grad_ckpt=True),
        T("pythia-410m", "full", "bf16-mixed", "adamw_torch", seq_len=2048, micro_batch=2),
        T("pythia-410m", "full", "bf16-true", "sgd", seq_len=512, micro_batch=8, attn="eager"),
        T("opt-350m", "full", "32-true", "adafactor", seq_len=1024, micro_batch=4),
        T("opt-350m", "full", "bf16-mixed", "adamw_bnb_8bit", seq_len=2048, micro_batch=2,
          grad_ckpt=True, allocator="expandable"),
        T("qwen2.5-0.5b", "full", "bf16-true", "adamw_torch_fused", seq_len=2048, micro_batch=4, grad_ckpt=True),
        T("qwen2.5-0.5b", "full", "bf16-mixed", "adamw_torch", seq_len=1024, micro_batch=2,
          allocator="expandable"),
        T("llama-3.2-1b", "full", "bf16-true", "adamw_torch", seq_len=1024, micro_batch=4),
        T("llama-3.2-1b", "full", "bf16-mixed", "paged_adamw_8bit", seq_len=2048, micro_batch=2, grad_ckpt=True),
        T("tinyllama-1.1b", "full", "32-true", "adamw_torch", seq_len=256, micro_batch=8, grad_ckpt=True),
        T("gemma-2b", "full", "bf16-true", "adamw_bnb_8bit", seq_len=1024, micro_batch=2, grad_ckpt=True),
        T("phi-3-mini", "full", "bf16-true", "adafactor", seq_len=1024, micro_batch=1, grad_ckpt=True),
        T("mistral-7b-v0.1", "full", "bf16-true", "adamw_bnb_8bit", seq_len=512, micro_batch=1, grad_ckpt=True),
    ]
    lora = [
        T("smollm2-135m", "lora", "bf16-true", "adamw_torch", seq_len=512, micro_batch=8,
          lora_r=8, target_modules=qv("smollm2-135m")),
        T("qwen2.5-0.5b", "lora", "bf16-mixed", "adamw_torch", seq_len=2048, micro_batch=4,
          attn="eager", lora_r=16),
        T("gpt2", "lora", "bf16-mixed", "adamw_torch", seq_len=1024, micro_batch=8, lora_r=8),
        T("pythia-410m", "lora", "32-true", "adamw_torch", seq_len=1024, micro_batch=4,
          lora_r=32, target_modules=qv("pythia-410m")),
        T("opt-350m", "lora", "bf16-true", "sgd", seq_len=2048, micro_batch=2, lora_r=16,
          target_modules=qv("opt-350m")),
        T("llama-3.2-1b", "lora", "bf16-true", "adamw_torch", seq_len=2048, micro_batch=8,
          grad_ckpt=True, allocator="expandable", lora_r=16),
        T("llama-3.2-1b", "lora", "bf16-mixed", "adamw_torch_fused", seq_len=1024, micro_batch=4,
          lora_r=64, target_modules=qv("llama-3.2-1b")),
        T("tinyllama-1.1b", "lora", "bf16-mixed", "paged_adamw_32bit", seq_len=512, micro_batch=4,
          attn="eager", lora_r=128),
        T("gemma-2b", "lora", "bf16-true", "adamw_torch", seq_len=2048, micro_batch=2, grad_ckpt=True, lora_r=16),
        T("phi-3-mini", "lora", "bf16-true", "adamw_torch", seq_len=1024, micro_batch=2,
          grad_ckpt=True, attn="eager", lora_r=32),
        T("mistral-7b-v0.1", "lora", "bf16-true", "adamw_torch", seq_len=2048, micro_batch=1,
          grad_ckpt=True, lora_r=16),
        T("mistral-7b-v0.1", "lora", "bf16-true", "adamw_torch", seq_len=1024, micro_batch=2,
          lora_r=8, target_modules=qv("mistral-7b-v0.1")),
    ]
    qlora = [
        T("qwen2.5-0.5b", "qlora", "bf16-mixed", "adamw_torch", seq_len=512, micro_batch=8,
          lora_r=8, target_modules=qv("qwen2.5-0.5b")),
        T("pythia-410m", "qlora", "bf16-true", "adamw_torch", seq_len=1024, micro_batch=4,
          grad_ckpt=True, lora_r=16),
        T("llama-3.2-1b", "qlora", "bf16-true", "paged_adamw_8bit", seq_len=1024, micro_batch=4,
          grad_ckpt=True, lora_r=16),
        T("tinyllama-1.1b", "qlora", "bf16-true", "adamw_bnb_8bit", seq_len=2048, micro_batch=2,
          grad_ckpt=True, allocator="expandable", lora_r=64),
        T("gemma-2b", "qlora", "bf16-mixed", "adamw_torch", seq_len=512, micro_batch=2,
          grad_ckpt=True, attn="eager", lora_r=16),
        T("phi-3-mini", "qlora", "bf16-true", "paged_adamw_8bit", seq_len=2048, micro_batch=1,
          grad_ckpt=True, lora_r=16),
        T("mistral-7b-v0.1", "qlora", "bf16-true", "paged_adamw_8bit", seq_len=1024, micro_batch=2,
          grad_ckpt=True, lora_r=16),
    ]
    return [context_case("default"), context_case("expandable")] + full + lora + qlora


# ---------------------------------------------------------------- the issue 3 grid

# Every architecture family, at a size that keeps a case to seconds: big ones are shrunk.
ARCHITECTURES = {
    "gpt2": {},
    "pythia-410m": {},
    "opt-350m": {},
    "smollm2-135m": {},
    "qwen2.5-0.5b": {},
    "llama-3.2-1b": {},
    "tinyllama-1.1b": {},
    "olmo-1b-hf": {},
    "gemma-2b": {},
    "gemma-2-2b": {},
    "phi-3-mini": {"num_hidden_layers": 8},
    "mistral-7b-v0.1": {"num_hidden_layers": 8},
    "llama-2-7b": {"num_hidden_layers": 8},
    "qwen2.5-7b": {"num_hidden_layers": 6},
    "falcon-7b": {"num_hidden_layers": 8},
    "qwen1.5-moe-a2.7b": {"num_hidden_layers": 4},
    "mixtral-8x7b": {"num_hidden_layers": 2},
}
# Gemma-2 has no sdpa path in transformers (attention logit soft-capping): eager only.
ATTN = {"gemma-2-2b": "eager"}
# Positions the model can take: learned position tables cap the sequence.
MAX_SEQ = {"gpt2": 1024, "gpt2-medium": 1024, "tinyllama-1.1b": 2048, "opt-350m": 2048, "olmo-1b-hf": 2048}

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "adafactor", "sgd")


def _architecture_sweep() -> list[dict]:
    out = []
    for model, overrides in ARCHITECTURES.items():
        seq, attn = min(1024, MAX_SEQ.get(model, 8192)), ATTN.get(model, "sdpa")
        out += [
            T(model, "full", "bf16-mixed", "adamw_torch", seq_len=seq, micro_batch=4,
              attn=attn, config_overrides=overrides),
            T(model, "lora", "bf16-true", "adamw_torch", seq_len=seq, micro_batch=4,
              attn=attn, lora_r=16, config_overrides=overrides),
            T(model, "qlora", "bf16-true", "adamw_torch", seq_len=seq, micro_batch=4,
              attn=attn, grad_ckpt=True, lora_r=16, config_overrides=overrides),
        ]
    return out


def _precision_optimizer_sweep() -> list[dict]:
    out = [T("llama-3.2-1b", "full", precision, optim, seq_len=512, micro_batch=4)
           for precision in ("32-true", "bf16-true", "bf16-mixed") for optim in OPTIMIZERS]
    out += [T("qwen2.5-0.5b", "full", precision, "adamw_torch", seq_len=512, micro_batch=4)
            for precision in ("16-mixed", "16-true")]
    out += [T("qwen2.5-0.5b", "lora", precision, "adamw_torch", seq_len=512, micro_batch=4, lora_r=16)
            for precision in ("32-true", "bf16-mixed", "16-mixed", "16-true")]
    return out


def _shape_sweep() -> list[dict]:
    out = []
    shapes = ((128, 32), (512, 16), (1024, 8), (2048, 4), (4096, 2), (8192, 1))
    for seq, batch in shapes:
        for ckpt in (False, True):
            out.append(T("llama-3.2-1b", "full", "bf16-mixed", "adamw_torch", seq_len=seq,
                         micro_batch=batch, grad_ckpt=ckpt))
        out.append(T("qwen2.5-0.5b", "lora", "bf16-true", "adamw_torch", seq_len=seq,
                     micro_batch=batch, grad_ckpt=True, lora_r=16))
    for seq, batch in ((512, 8), (2048, 2), (4096, 1)):
        out.append(T("llama-3.2-1b", "full", "bf16-mixed", "adamw_torch", seq_len=seq,
                     micro_batch=batch, attn="eager"))
        out.append(T("smollm2-135m", "lora", "bf16-true", "adamw_torch", seq_len=seq,
                     micro_batch=batch, attn="eager", lora_r=8))
    for seq, batch in ((512, 8), (2048, 4), (8192, 1)):
        out.append(T("gemma-2b", "lora", "bf16-true", "adamw_torch", seq_len=seq,
                     micro_batch=batch, grad_ckpt=True, lora_r=16))
    for seq, batch in ((256, 32), (1024, 16), (1024, 32)):
        out.append(T("pythia-410m", "full", "bf16-mixed", "adamw_torch_fused", seq_len=seq,
                     micro_batch=batch, grad_ckpt=True))
    return out


def _lora_sweep() -> list[dict]:
    out = []
    for r in (4, 8, 16, 32, 64, 128, 256):
        for targets in (qv("llama-3.2-1b"), "all-linear"):
            out.append(T("llama-3.2-1b", "lora", "bf16-true", "adamw_torch", seq_len=1024,
                         micro_batch=4, lora_r=r, target_modules=targets))
    for r in (4, 16, 64, 256):
        for targets in (qv("tinyllama-1.1b"), "all-linear"):
            out.append(T("tinyllama-1.1b", "qlora", "bf16-true", "paged_adamw_8bit", seq_len=1024,
                         micro_batch=4, grad_ckpt=True, lora_r=r, target_modules=targets))
    for model in ("gpt2", "pythia-410m", "phi-3-mini", "falcon-7b"):
        overrides = ARCHITECTURES[model]
        out.append(T(model, "lora", "bf16-true", "adamw_torch", seq_len=1024, micro_batch=4,
                     lora_r=64, target_modules=qv(model), config_overrides=overrides))
    return out


def _allocator_and_fraction_sweep() -> list[dict]:
    base = [
        T("llama-3.2-1b", "full", "bf16-mixed", "adamw_torch", seq_len=2048, micro_batch=4),
        T("qwen2.5-0.5b", "full", "bf16-true", "adamw_bnb_8bit", seq_len=1024, micro_batch=8),
        T("gemma-2b", "lora", "bf16-true", "adamw_torch", seq_len=2048, micro_batch=4, lora_r=16),
        T("mistral-7b-v0.1", "lora", "bf16-true", "adamw_torch", seq_len=2048, micro_batch=2,
          grad_ckpt=True, lora_r=16),
        T("tinyllama-1.1b", "qlora", "bf16-true", "adamw_torch", seq_len=2048, micro_batch=4, lora_r=16),
        T("phi-3-mini", "full", "bf16-true", "adamw_bnb_8bit", seq_len=1024, micro_batch=2, grad_ckpt=True),
        T("smollm2-135m", "full", "32-true", "adamw_torch", seq_len=4096, micro_batch=4),
        T("llama-3.2-1b", "lora", "bf16-mixed", "adamw_torch", seq_len=4096, micro_batch=4,
          attn="eager", lora_r=16),
    ]
    out = [dict(c, allocator="expandable") for c in base] + base[:4]
    # A 24 GB and a 40 GB card, emulated with set_per_process_memory_fraction.
    for fraction in (0.3, 0.5):
        out += [
            T("llama-3.2-1b", "full", "bf16-mixed", "adamw_torch", seq_len=2048, micro_batch=4,
              memory_fraction=fraction),
            T("mistral-7b-v0.1", "qlora", "bf16-true", "paged_adamw_8bit", seq_len=2048,
              micro_batch=2, grad_ckpt=True, lora_r=16, memory_fraction=fraction),
        ]
    return out


def _large_and_oom() -> list[dict]:
    """Full-size large models; several do not fit in 80 GB and must OOM cleanly."""
    return [
        T("mistral-7b-v0.1", "full", "bf16-true", "adamw_bnb_8bit", seq_len=1024, micro_batch=1, grad_ckpt=True),
        T("mistral-7b-v0.1", "lora", "bf16-true", "adamw_torch", seq_len=4096, micro_batch=2,
          grad_ckpt=True, lora_r=16),
        T("mistral-7b-v0.1", "qlora", "bf16-true", "paged_adamw_8bit", seq_len=2048, micro_batch=4,
          grad_ckpt=True, lora_r=64),
        T("llama-3.1-8b", "lora", "bf16-true", "adamw_torch", seq_len=2048, micro_batch=4, lora_r=16),
        T("phi-3-mini", "full", "bf16-mixed", "adamw_torch", seq_len=1024, micro_batch=2, grad_ckpt=True),
        # do not fit in 80 GB
        T("mistral-7b-v0.1", "full", "32-true", "adamw_torch", seq_len=512, micro_batch=1),
        T("llama-3.1-8b", "full", "bf16-mixed", "adamw_torch", seq_len=512, micro_batch=1, grad_ckpt=True),
        T("llama-2-13b", "full", "bf16-true", "adamw_torch", seq_len=512, micro_batch=1, grad_ckpt=True),
        T("qwen2.5-14b", "full", "bf16-true", "adamw_bnb_8bit", seq_len=512, micro_batch=1, grad_ckpt=True),
        T("qwen2.5-32b", "lora", "bf16-true", "adamw_torch", seq_len=2048, micro_batch=4, lora_r=16),
        T("llama-3.2-1b", "full", "bf16-mixed", "adamw_torch", seq_len=8192, micro_batch=32),
        T("gemma-2b", "full", "bf16-mixed", "adamw_torch", seq_len=4096, micro_batch=16),
        T("phi-3-mini", "full", "32-true", "adamw_torch", seq_len=2048, micro_batch=4),
    ]


def _size_sweep() -> list[dict]:
    out = []
    for model in ("gpt2-medium", "smollm2-360m", "pythia-1b", "qwen2.5-1.5b", "smollm2-1.7b"):
        seq = min(2048, MAX_SEQ.get(model, 8192))
        out += [
            T(model, "full", "bf16-true", "adamw_torch_fused", seq_len=seq, micro_batch=2, grad_ckpt=True),
            T(model, "lora", "bf16-mixed", "adamw_torch", seq_len=seq, micro_batch=2, lora_r=32,
              target_modules=qv(model)),
        ]
    return out


def full() -> list[dict]:
    return ([context_case("default"), context_case("expandable")] + _architecture_sweep()
            + _precision_optimizer_sweep() + _shape_sweep() + _lora_sweep() + _size_sweep()
            + _allocator_and_fraction_sweep() + _large_and_oom())


RECIPE_MODELS = {
    "llama-3.2-1b": {}, "qwen2.5-0.5b": {}, "smollm2-360m": {}, "gemma-2b": {}, "pythia-410m": {},
    "phi-3-mini": {"num_hidden_layers": 8}, "mistral-7b-v0.1": {"num_hidden_layers": 8},
}


def recipes() -> list[dict]:
    out = []
    for model, ov in RECIPE_MODELS.items():
        seq = 1024
        out += [
            T(model, "lora", "bf16-amp", "adamw_torch", seq_len=seq, micro_batch=4, lora_r=16,
              target_modules=qv(model), config_overrides=ov),
            T(model, "lora", "bf16-amp", "adamw_torch_fused", seq_len=seq, micro_batch=4, grad_ckpt=True,
              lora_r=64, target_modules="all-linear", config_overrides=ov),
            T(model, "qlora", "bf16-amp", "paged_adamw_8bit", seq_len=seq, micro_batch=4, grad_ckpt=True,
              lora_r=16, target_modules="all-linear", config_overrides=ov),
            T(model, "full", "bf16-amp", "adamw_torch_fused", seq_len=seq, micro_batch=2, config_overrides=ov),
            T(model, "lora", "bf16-amp", "adamw_torch", seq_len=seq, micro_batch=4, grad_ckpt=True, lora_r=16,
              target_modules="all-linear", config_overrides=ov, loss="fused"),
        ]
    for model in ("llama-3.2-1b", "qwen2.5-0.5b", "mistral-7b-v0.1"):  # float32 weights under bf16
        ov = RECIPE_MODELS[model]
        out += [
            T(model, "lora", "bf16-mixed", "adamw_torch", seq_len=1024, micro_batch=2, lora_r=16,
              target_modules=qv(model), config_overrides=ov),
            T(model, "qlora", "bf16-amp", "paged_adamw_8bit", seq_len=1024, micro_batch=4, grad_ckpt=True,
              lora_r=16, target_modules="all-linear", config_overrides=ov, loss="fused"),
            T(model, "full", "bf16-amp", "adamw_torch_fused", seq_len=1024, micro_batch=2, grad_ckpt=True,
              config_overrides=ov, loss="fused"),
        ]
    # full-size QLoRA at 2,048 tokens, as SFTTrainer runs it: the load phase (quantization,
    # prepare_model_for_kbit_training) and the 12 GB question of the README
    for model in ("qwen2.5-3b", "llama-3.1-8b"):
        out.append(T(model, "qlora", "bf16-amp", "paged_adamw_8bit", seq_len=2048, micro_batch=1, grad_ckpt=True,
                     lora_r=16, target_modules="all-linear", loss="fused"))
    return out


# ---------------------------------------------------------------- issue 20: the levers

SHRUNK = {"mistral-7b-v0.1": {"num_hidden_layers": 8}, "phi-3-mini": {"num_hidden_layers": 8}}
LEVER_STEPS = 4  # tokens/s from steps 2-4


def _lever_base(model: str, method: str, seq: int, batch: int, ckpt: bool, targets="qv",
                optim: str | None = None) -> dict:
    """A bf16-amp case (bfloat16 weights, bf16=True): the base a lever is switched on in."""
    if optim is None:
        optim = "paged_adamw_8bit" if method == "qlora" else "adamw_torch"
    lora = {"lora_r": 16, "target_modules": qv(model) if targets == "qv" else targets}
    return T(model, method, "bf16-amp", optim, seq_len=seq, micro_batch=batch, grad_ckpt=ckpt,
             config_overrides=SHRUNK.get(model), steps=LEVER_STEPS, **lora)


def with_lever(base: dict, lever: str, example_len: int | None = None) -> dict:
    """`base` with one lever on: what training_case(..., lever) makes (tests check it)."""
    if lever == "packing":
        return dict(base, packing=True, example_len=example_len or 256)
    if lever not in ("liger", "activation_offloading"):
        raise ValueError(f"no lever {lever!r}")
    return dict(base, **{lever: True})


def lever_pairs() -> dict[str, list[tuple[dict, dict]]]:
    """(baseline, lever case) per lever; a baseline may serve several levers."""
    B = _lever_base
    # liger: long sequences x big vocabularies (llama 128k, qwen2 152k, gemma 256k; mistral's 32k)
    liger = [
        B("llama-3.2-1b", "full", 2048, 4, True, optim="adamw_torch_fused"),
        B("llama-3.2-1b", "lora", 4096, 2, False),
        B("qwen2.5-0.5b", "full", 4096, 2, True),
        B("qwen2.5-1.5b", "qlora", 2048, 4, True, targets="all-linear"),
        B("gemma-2b", "lora", 2048, 2, False),
        B("gemma-2b", "qlora", 1024, 4, True, targets="all-linear"),
        B("mistral-7b-v0.1", "lora", 2048, 4, True, targets="all-linear"),
    ]
    # packing: 4-8 rows of 512-2048 tokens packed into one row; example lengths 128-512 on average
    packing = [
        (B("llama-3.2-1b", "lora", 1024, 8, True), 256),
        (B("llama-3.2-1b", "full", 512, 8, False), 128),
        (B("qwen2.5-0.5b", "qlora", 2048, 4, True, targets="all-linear"), 512),
        (B("qwen2.5-0.5b", "lora", 1024, 4, False, targets="all-linear"), 256),
        (B("mistral-7b-v0.1", "lora", 2048, 4, True), 256),
        (B("phi-3-mini", "lora", 1024, 8, True, targets="all-linear"), 256),
    ]
    # activation offloading: with and without checkpointing, on bases the other levers measure too
    offload = [
        B("llama-3.2-1b", "full", 512, 8, False),
        B("gemma-2b", "qlora", 1024, 4, True, targets="all-linear"),
        B("mistral-7b-v0.1", "lora", 2048, 4, True),
        B("qwen2.5-0.5b", "full", 2048, 2, False),
        B("gemma-2b", "lora", 2048, 2, False),
        B("qwen2.5-0.5b", "qlora", 2048, 4, True, targets="all-linear"),
    ]
    return {
        "liger": [(b, with_lever(b, "liger")) for b in liger],
        "packing": [(b, with_lever(b, "packing", n)) for b, n in packing],
        "activation_offloading": [(b, with_lever(b, "activation_offloading")) for b in offload],
    }


def levers_fused() -> list[dict]:
    """The levers as `vramfit train` runs them, under trl's fused LM head (SFTTrainer's loss): Liger's
    layer kernels (trl turns liger's fused cross-entropy off), packing and offloading, each next to
    its baseline twin."""
    B = _lever_base
    pairs = [
        (B("llama-3.2-1b", "lora", 4096, 2, False), "liger"),
        (B("qwen2.5-0.5b", "full", 4096, 2, True), "liger"),
        (B("gemma-2b", "lora", 2048, 2, False), "liger"),
        (B("mistral-7b-v0.1", "lora", 2048, 4, True, targets="all-linear"), "liger"),
        (B("llama-3.2-1b", "lora", 2048, 2, False), "packing"),
        (B("qwen2.5-0.5b", "lora", 1024, 4, False, targets="all-linear"), "packing"),
        (B("mistral-7b-v0.1", "lora", 2048, 2, True), "packing"),
        (B("qwen2.5-0.5b", "full", 2048, 2, False), "activation_offloading"),
    ]
    out = []
    for base, lever in pairs:
        base = dict(base, loss="fused")
        out += [base, with_lever(base, lever, 150 if lever == "packing" else None)]
    return out


def levers() -> list[dict]:
    """Baseline then lever case, the levers interleaved (liger 1, packing 1, offloading 1, liger 2,
    ...), so a run cut at its time limit leaves every lever with about as many pairs."""
    pairs = lever_pairs()
    out = []
    for k in range(max(len(v) for v in pairs.values())):
        for lever in ("liger", "packing", "activation_offloading"):
            if k < len(pairs[lever]):
                out += list(pairs[lever][k])
    return out


# seconds per case on an H100 (wall, fork to line), from the committed results of like cases
# (benchmarks/results/h100-2026-12-0[67]-*.jsonl: 4.5-8 s full / LoRA at these sizes, 7-13 s QLoRA,
# the first use of a QLoRA checkpoint 1.5-5 s more) plus each lever's own cost (liger: triton
# compiles, cached on disk after the first case; packing: trl + datasets imports and the packing;
# offloading: pinned-memory allocation and the copies); lever_seconds sums them (a test keeps
# the grid under 420 s).
LEVER_SECONDS = {"baseline": 7.0, "baseline_qlora": 10.0, "liger": 12.0, "packing": 9.0,
                 "activation_offloading": 12.0, "checkpoint": 4.0}


def lever_seconds(case_list: list[dict]) -> float:
    total, checkpoints = 0.0, set()
    for case in case_list:
        lever = next((k for k in ("liger", "packing", "activation_offloading") if case.get(k)), None)
        if lever:
            total += LEVER_SECONDS[lever] + (3.0 if case["method"] == "qlora" else 0.0)
        else:
            total += LEVER_SECONDS["baseline_qlora" if case["method"] == "qlora" else "baseline"]
        if case["method"] == "qlora":
            checkpoints.add((case["model"], str(case["config_overrides"])))
    return total + LEVER_SECONDS["checkpoint"] * len(checkpoints)


def qlora_trl() -> list[dict]:
    """QLoRA as trl's SFTTrainer runs it (2026-12-07): the recipes' QLoRA cases under trl's fused head, re-run
    now that the harness casts the adapters to bf16 as SFTTrainer does, each beside its twin without
    prepare_model_for_kbit_training (the non-quantized weights left bf16: trl's own QLoRA path, Unsloth's)."""
    out = []
    for case in recipes():
        if case["method"] == "qlora" and case.get("loss") == "fused":
            out.append(case)
            out.append({**case, "kbit_prep": False})
    return out


def lever_history_cases() -> list[dict]:
    """One lever case per lever (llama-3.2-1b) to re-run with VRAMFIT_MEMORY_HISTORY."""
    pairs = lever_pairs()
    return [pairs["liger"][0][1], pairs["packing"][0][1], pairs["activation_offloading"][0][1]]


def offload_history_cases() -> list[dict]:
    """trl's activation offloading under its fused head, full fine-tuning (qwen2.5-0.5b, levers_fused's
    offloading case, under-predicted by 2.2% reserved on 2026-12-07d): to re-run with
    VRAMFIT_MEMORY_HISTORY (device_levers.sh MODE=offload also keeps each block's stream)."""
    return [c for c in levers_fused() if c.get("activation_offloading")]


def levers_offload() -> list[dict]:
    """More activation offloading cases (2026-12-07h), no twins: both losses, full / LoRA / QLoRA, with
    and without checkpointing, five architectures; full fine-tuning under the fused head first (its
    optimizer peak meets the copy stream's cached blocks, which the default stream cannot take)."""
    B = _lever_base
    cases = [
        dict(B("llama-3.2-1b", "full", 1024, 4, False), loss="fused"),
        dict(B("qwen2.5-0.5b", "lora", 1024, 4, False, targets="all-linear"), loss="fused"),
        dict(B("gemma-2b", "lora", 2048, 2, False), loss="fused"),
        B("phi-3-mini", "lora", 1024, 8, True, targets="all-linear"),
        dict(B("mistral-7b-v0.1", "lora", 2048, 4, True, targets="all-linear"), loss="fused"),
        B("llama-3.2-1b", "qlora", 2048, 4, True, targets="all-linear"),
        dict(B("qwen2.5-0.5b", "full", 4096, 2, True), loss="fused"),
    ]
    return [with_lever(c, "activation_offloading") for c in cases]


GRIDS = {"smoke": smoke, "issue2": issue2, "full": full, "recipes": recipes, "levers": levers, "levers_fused": levers_fused,
         "levers_history": lever_history_cases, "qlora_trl": qlora_trl,
         "levers_offload": levers_offload, "levers_offload_history": offload_history_cases}


def get(name: str) -> list[dict]:
    if name not in GRIDS:
        raise KeyError(f"no grid {name!r}; have {sorted(GRIDS)}")
    unique: dict[str, dict] = {}
    for case in GRIDS[name]():  # sweeps overlap: keep the first of equal cases
        unique.setdefault(case_id(case), case)
    return list(unique.values())
