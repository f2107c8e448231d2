"""Setup: one fine-tuning configuration, validated, in the field's own names.

A precision is a pair in transformers' own words: `dtype`, what `from_pretrained(dtype=...)` loads,
and `amp`, the autocast `TrainingArguments(bf16=/fp16=)` turns on.  Lightning's names are shorthand
for the pairs they name (bf16-true = bfloat16 weights, no autocast; bf16-mixed = float32 weights
under bf16 autocast); the pairs Lightning has no name for get one here: bf16-amp is the standard
guides' recipe (dtype=bfloat16 and bf16=True), 16-amp its fp16 twin.  Optimizer names are
`TrainingArguments.optim`'s, LoRA fields are `peft.LoraConfig`'s.  Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass, field, replace

from vramfit.errors import VramfitError

METHODS = ("full", "lora", "qlora")

# precision -> (dtype the parameters are stored in, autocast dtype or None)
PRECISIONS = {
    "32-true": ("float32", None),
    "bf16-true": ("bfloat16", None),
    "bf16-mixed": ("float32", "bfloat16"),
    "bf16-amp": ("bfloat16", "bfloat16"),
    "16-mixed": ("float32", "float16"),
    "16-true": ("float16", None),
    "16-amp": ("float16", "float16"),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES = ("float32", "bfloat16", "float16")  # from_pretrained(dtype=...)
AMPS = {"none": None, "bf16": "bfloat16", "fp16": "float16"}  # TrainingArguments(bf16=True / fp16=True)


def precision_of(dtype: str, amp: str) -> str:
    """The precision name of a (dtype, amp) pair, in transformers' words."""
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16",
             "float": "float32"}.get(dtype, dtype)
    _choice("dtype", dtype, DTYPES)
    _choice("amp", amp, AMPS)
    for name, pair in PRECISIONS.items():
        if pair == (dtype, AMPS[amp]):
            return name
    raise VramfitError(f"dtype {dtype} with amp {amp} is not a recipe transformers trains: autocast to "
                       f"{AMPS[amp]} over {dtype} weights; use --amp none or the matching --amp")


@dataclass(frozen=True)
class Optimizer:
    """How an optimizer stores its state, per trainable parameter."""

    name: str
    states: int  # number of state tensors of the parameter's size
    state_bytes: int | None  # bytes per state element; None: the parameter's own dtype
    eight_bit: bool = False  # bitsandbytes blockwise 8-bit (small tensors stay 32-bit)
    paged: bool = False  # states in CUDA managed memory (outside torch's allocator)
    factored: bool = False  # Adafactor: row + column second moments for matrices
    foreach_temp: bool = False  # torch foreach AdamW: one temporary copy of the states (sqrt)
    needs_bnb: bool = False


OPTIMIZERS = {
    o.name: o
    for o in (
        Optimizer("adamw_torch", 2, None, foreach_temp=True),
        Optimizer("adamw_torch_fused", 2, None),
        Optimizer("adamw_bnb_8bit", 2, 1, eight_bit=True, needs_bnb=True),
        Optimizer("adamw_8bit", 2, 1, eight_bit=True, needs_bnb=True),
        Optimizer("paged_adamw_8bit", 2, 1, eight_bit=True, paged=True, needs_bnb=True),
        Optimizer("paged_adamw_32bit", 2, 4, paged=True, needs_bnb=True),
        Optimizer("adafactor", 1, 4, factored=True),  # states follow the fp32 upcast grad
        Optimizer("sgd", 0, None),
    )
}

ATTENTION = ("sdpa", "flash_attention_2", "eager")
# How the loss is computed from the last hidden states:
# - "logits": the model's own loss (transformers Trainer, `model(labels=...)`): the (tokens x vocab)
#   logits are materialised, upcast to fp32 and log-softmaxed;
# - "fused": trl's SFTTrainer (`trl.trainer.utils.add_fused_lm_head`, trl >= 1.x) scores tokens in
#   4,096 x 32,768 tiles and never materialises the logits (what `vramfit train` runs).
# The model types liger-kernel patches: the keys of liger_kernel.transformers.monkey_patch.
# MODEL_TYPE_TO_APPLY_LIGER_FN in liger-kernel 0.8.5 (what transformers' use_liger_kernel calls:
# `_apply_liger_kernel_to_instance` looks the model's config.model_type up there and patches nothing
# for any other type).  A static list, so vramfit needs no liger-kernel (nor triton) to plan with it.
LIGER_VERSION = "0.8.5"
LIGER_MODEL_TYPES = frozenset((
    "deepseek_v2", "deepseek_v3", "deepseek_v4", "exaone4", "falcon_h1", "gemma", "gemma2", "gemma3",
    "gemma3_text", "gemma4", "gemma4_text", "glm4", "glm4v", "glm4v_moe", "gpt_oss", "granite",
    "hunyuan_v1_dense", "hunyuan_v1_moe", "internvl", "llama", "llama4", "llama4_text", "llava", "ministral",
    "mistral", "mixtral", "mllama", "mllama_text_model", "muse_glimmer", "nemotron", "olmo2", "olmo3",
    "paligemma", "phi3", "pixtral", "qwen2", "qwen2_5_vl", "qwen2_5_vl_text", "qwen2_vl", "qwen2_vl_text",
    "qwen3", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe", "qwen3_next",
    "qwen3_vl", "qwen3_vl_moe", "qwen3_vl_moe_text", "qwen3_vl_text", "smollm3", "smolvlm",
))



def liger_supported(model_type: str | None) -> bool:
    return model_type in LIGER_MODEL_TYPES


LEVERS = ("liger", "packing", "activation_offloading")  # the Setup fields of the field's memory levers (issue 20)
LOSSES = ("logits", "fused")
ALLOCATORS = ("default", "expandable")
DEFAULT_LORA_TARGETS = {"lora": "q_proj,v_proj", "qlora": "all-linear"}
# peft's own default LoRA targets for architectures whose attention projections are not named
# q_proj / v_proj (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
PEFT_DEFAULT_TARGETS = {
    "gpt2": "c_attn", "gpt_neox": "query_key_value", "falcon": "query_key_value", "bloom": "query_key_value",
    "phi3": "qkv_proj", "gptj": "q_proj,v_proj", "gpt_bigcode": "c_attn", "mpt": "Wqkv", "chatglm": "query_key_value",
    "phi": "q_proj,v_proj", "stablelm": "q_proj,v_proj", "gpt_neo": "q_proj,v_proj",
}


@dataclass(frozen=True)
class Setup:
    method: str = "lora"
    precision: str = "bf16-amp"  # the guides' recipe: from_pretrained(dtype=bfloat16), bf16=True
    optim: str = "adamw_torch"
    lora_r: int = 16
    lora_alpha: int | None = None  # default: 2 * r
    lora_dropout: float = 0.05
    target_modules: str | None = None  # comma list, "all-linear", or a regex; default per method
    seq_len: int = 2048
    micro_batch: int = 1
    grad_accum: int = 1
    grad_ckpt: bool = False
    attn: str = "sdpa"
    allocator: str = "default"
    double_quant: bool = True
    quant_type: str = "nf4"
    # QLoRA: peft's prepare_model_for_kbit_training after loading (the standard recipe: it casts the
    # non-quantized weights -- embeddings, norms, LM head -- to fp32, and with them the residual stream);
    # False: the 4-bit model as loaded, all else in the load dtype (what trl's SFTTrainer does with a
    # quantized model and a peft_config, and what Unsloth does)
    kbit_prep: bool = True
    # QLoRA under trl's SFTTrainer (loss "fused"): trl casts the adapters to bf16 (`adapter_dtype`).  False
    # only to replay runs that did not (the accuracy harness's Trainer with trl's fused head, before
    # 2026-12-07); no option sets it
    trl_adapter_cast: bool = True
    loss: str = "logits"
    # batches padded to their longest row (real data of varying lengths): transformers then passes
    # an attention mask, and with one it repeats grouped KV heads before SDPA instead of
    # enable_gqa (CUDA's fused kernels take no mask with grouped heads)
    padded: bool = False
    # the field's memory levers, in their own switches (issue 20):
    # - liger: `TrainingArguments(use_liger_kernel=True)`: liger-kernel's fused linear cross-entropy (no
    #   logits), RMSNorm, SwiGLU and RoPE kernels patched into the model;
    # - packing: trl `SFTConfig(packing=True)` (bfd, padding-free): a micro-batch is `micro_batch` packed
    #   rows of `seq_len` tokens, flattened into one row of `tokens` with position_ids restarting per example;
    # - activation_offloading: trl `SFTConfig(activation_offloading=True)`: saved activations go to
    #   pinned host memory during the forward and come back for the backward.
    liger: bool = False
    packing: bool = False
    activation_offloading: bool = False
    extras: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def param_dtype(self) -> str:
        return PRECISIONS[self.precision][0]

    @property
    def autocast_dtype(self) -> str | None:
        return PRECISIONS[self.precision][1]

    @property
    def dtype(self) -> str:
        """What `from_pretrained(dtype=...)` loads (QLoRA: the dtype its non-quantized weights load in)."""
        return self.param_dtype

    @property
    def amp(self) -> str:
        """`TrainingArguments`' autocast: none | bf16 | fp16."""
        return {v: k for k, v in AMPS.items()}[self.autocast_dtype]

    @property
    def compute_dtype(self) -> str:
        return self.autocast_dtype or self.param_dtype

    @property
    def kbit_upcast(self) -> bool:
        """QLoRA's non-quantized weights in fp32 (prepare_model_for_kbit_training ran)."""
        return self.method == "qlora" and self.kbit_prep

    @property
    def adapter_dtype(self) -> str:
        """The LoRA adapters' dtype: peft upcasts them to fp32 (autocast_adapter_dtype=True); trl's
        SFTTrainer (the fused loss, what vramfit train runs) casts a quantized model's trainable
        parameters back to bf16 (trl/trainer/sft_trainer.py: "When using QLoRA, the PEFT adapter
        weights are converted to bf16"), and with them their gradients and the optimizer's states."""
        cast = self.method == "qlora" and self.loss == "fused" and self.trl_adapter_cast
        return "bfloat16" if cast else "float32"

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def optimizer(self) -> Optimizer:
        return OPTIMIZERS[self.optim]

    @property
    def targets(self) -> str:
        return self.target_modules or DEFAULT_LORA_TARGETS.get(self.method, "")

    def with_(self, **changes) -> "Setup":
        return replace(self, **changes)


def _choice(kind: str, value: str, valid) -> str:
    if value in valid:
        return value
    close = difflib.get_close_matches(str(value), list(valid), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise VramfitError(f"unknown {kind} '{value}'{hint}; valid: {', '.join(valid)}")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise VramfitError(f"{name} must be a positive integer, got {value!r}")


def resolve_precision(precision: str | None, dtype: str | None, amp: str | None) -> str | None:
    """--precision, or --dtype and --amp (either alone keeps the other's default: bfloat16, bf16)."""
    if dtype is None and amp is None:
        return precision
    pair = precision_of(dtype or "bfloat16", amp or "bf16")
    if precision is not None and precision != pair:
        raise VramfitError(f"--precision {precision} is dtype {PRECISIONS[precision][0]} with amp "
                           f"{ {v: k for k, v in AMPS.items()}.get(PRECISIONS[precision][1])}, not what "
                           f"--dtype/--amp say ({pair}): give one or the other")
    return pair


def make_setup(method: str = "lora", precision: str | None = None, lora_r: int | None = None,
               lora_alpha: int | None = None, lora_dropout: float | None = None,
               target_modules: str | None = None, dtype: str | None = None, amp: str | None = None,
               **kwargs) -> Setup:
    """Build a validated Setup; LoRA options with method=full are an error, not ignored.
    `dtype` / `amp` (transformers' words) name the precision instead of `precision`."""
    if precision is not None:
        _choice("precision", precision, PRECISIONS)
    precision = resolve_precision(precision, dtype, amp)
    method = _choice("method", method, METHODS)
    if method == "full":
        given = [n for n, v in (("--lora-r", lora_r), ("--lora-alpha", lora_alpha),
                                ("--lora-dropout", lora_dropout), ("--target-modules", target_modules)) if v is not None]
        if given:
            raise VramfitError(f"{', '.join(given)} only apply to --method lora/qlora, not to full fine-tuning")
    if precision is None:
        precision = "bf16-amp"
    check_kbit_prep(kwargs.get("kbit_prep"), (method,))
    setup = Setup(method=method, precision=precision,
                  lora_r=16 if lora_r is None else lora_r,
                  lora_alpha=lora_alpha,
                  lora_dropout=0.05 if lora_dropout is None else lora_dropout,
                  target_modules=target_modules, **kwargs)
    validate(setup)
    return setup


def validate(s: Setup) -> None:
    _choice("method", s.method, METHODS)
    _choice("precision", s.precision, PRECISIONS)
    _choice("optimizer", s.optim, OPTIMIZERS)
    _choice("attention implementation", s.attn, ATTENTION)
    _choice("allocator", s.allocator, ALLOCATORS)
    _choice("loss", s.loss, LOSSES)
    for name in ("padded", "kbit_prep", "trl_adapter_cast", *LEVERS):
        if not isinstance(getattr(s, name), bool):
            raise VramfitError(f"{name} must be true or false, got {getattr(s, name)!r}")
    for name in ("seq_len", "micro_batch", "grad_accum"):
        _positive(name.replace("_", "-"), getattr(s, name))
    if s.method != "full":
        _positive("lora-r", s.lora_r)
        if s.lora_alpha is not None and (not isinstance(s.lora_alpha, (int, float)) or s.lora_alpha <= 0):
            raise VramfitError(f"lora-alpha must be positive, got {s.lora_alpha!r}")
        if not 0.0 <= s.lora_dropout < 1.0:
            raise VramfitError(f"lora-dropout must be in [0, 1), got {s.lora_dropout}")
    if s.method == "qlora":
        if s.precision in ("32-true",):
            raise VramfitError("QLoRA computes in bf16 or fp16: use --precision bf16-amp, bf16-true, bf16-mixed, "
                               "16-amp, 16-true or 16-mixed")
    if s.method == "full" and s.precision == "16-amp":
        raise VramfitError("full fine-tuning of float16 weights under fp16 autocast does not train: the Trainer's "
                           "GradScaler refuses fp16 gradients; use --dtype float32 --amp fp16 (16-mixed)")
        if s.quant_type not in ("nf4", "fp4"):
            raise VramfitError(f"unknown 4-bit quant type '{s.quant_type}'; valid: nf4, fp4")


def resolve_targets(spec, setup: Setup) -> tuple:
    if setup.method == "full":
        return ()
    raw = setup.targets.strip()
    if setup.target_modules is None and setup.method == "lora":
        raw = PEFT_DEFAULT_TARGETS.get(spec.model_type, raw)
    return _resolve_targets(spec, raw)


@functools.lru_cache(maxsize=1024)
def _resolve_targets(spec, raw: str) -> tuple:
    """peft's matching of target_modules against the model's Linear layers -> module paths.

    A comma list matches a module whose path equals a name or ends with '.name'; a single
    string with regex characters is matched with re.fullmatch (as peft does); 'all-linear'
    is every Linear but the output layer.
    """
    names = [l.name for l in spec.linears]
    if raw == "all-linear":
        chosen = [n for n in names if n != spec.output_layer]
    elif re.search(r"[\\\[\]\(\)\*\+\?\|\^\$]", raw):
        try:
            rx = re.compile(raw)
        except re.error as exc:
            raise VramfitError(f"target-modules regex '{raw}' is invalid: {exc}") from None
        chosen = [n for n in names if rx.fullmatch(n)]
    else:
        wanted = [t.strip() for t in raw.split(",") if t.strip()]
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise VramfitError(f"target module(s) {', '.join(missing)} not found in {spec.name}; "
                               f"its Linear layers are named: {', '.join(leaves)}")
    if not chosen:
        raise VramfitError(f"target-modules '{raw}' matches no Linear layer of {spec.name}")
    return tuple(chosen)


SHOWN_FAMILIES = 8  # the best fitting setups a plan shows: one per family


def family(s: Setup) -> tuple:
    """What tells a plan's shown alternatives apart (one row each)."""
    return (s.method, s.precision, s.grad_ckpt, s.liger, s.packing, s.activation_offloading)


def check_kbit_prep(kbit_prep: bool | None, methods) -> None:
    """--no-kbit-prep is QLoRA's: refused where none of `methods` is QLoRA."""
    if kbit_prep is False and "qlora" not in methods:
        raise VramfitError("--no-kbit-prep (no prepare_model_for_kbit_training) only applies to --method qlora")
