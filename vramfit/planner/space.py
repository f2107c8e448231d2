"""What the planner searches: the setup axes, their defaults and the `Space` of one search."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from vramfit.errors import VramfitError
from vramfit.memory.setup import Setup, check_kbit_prep, make_setup, resolve_targets
from vramfit.planner.levers import check_levers, liger_supported, micro_batch_for_tokens, packing_by_default

# The value of each lever's Setup field that turns the lever on (less memory), and the plain recipe's.
# kbit_prep: QLoRA without prepare_model_for_kbit_training (its fp32 casts) is the lever.
LEVER_ON = {"liger": True, "packing": True, "activation_offloading": True, "kbit_prep": False}
LEVER_OFF = {k: not v for k, v in LEVER_ON.items()}

DEFAULT_EFFECTIVE_BATCH = 16
DEFAULT_SEQ_LEN = 2048
# 5% of the budget: larger than the memory model's typical error on the accuracy grid and than
# the allocator's run-to-run variation, small enough not to cost a micro-batch step on most cards.
DEFAULT_HEADROOM = "5%"
# One LoRA configuration for both LoRA and QLoRA, so the method is a memory/speed choice and not
# a quality one: rank 16 on every Linear but the LM head (the QLoRA paper, Dettmers et al. 2023,
# found adapters on all linear layers needed to match full fine-tuning; "all-linear" also names
# the right layers in every architecture), alpha = 2 x rank, dropout 0.05.
DEFAULT_LORA_R = 16
DEFAULT_TARGET_MODULES = "all-linear"
OPTIMS = ("adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
          "adafactor")
ALLOCATOR_CHOICES = ("default", "expandable")


def precisions_for(method: str, bf16: bool) -> tuple:
    """Precisions worth trying: bf16 where the GPU has it (first the standard guides' recipe,
    bfloat16 weights under bf16 autocast); else fp16 (never fp16 weights for full fine-tuning:
    AdamW's updates underflow in them, and the Trainer's GradScaler refuses their gradients) and fp32."""
    if bf16:
        return ("bf16-amp", "bf16-true", "bf16-mixed")
    if method == "full":
        return ("16-mixed", "32-true")
    if method == "qlora":
        return ("16-amp", "16-true", "16-mixed")
    return ("16-amp", "16-true", "16-mixed", "32-true")


def divisors(n: int) -> tuple:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class Space:
    """What the search may vary; None means "search it"."""

    seq_len: int = DEFAULT_SEQ_LEN
    effective_batch: int = DEFAULT_EFFECTIVE_BATCH
    micro_batch: int | None = None
    methods: tuple = ("full", "lora", "qlora")
    precision: str | None = None
    optim: str | None = None
    grad_ckpt: bool | None = None
    allocator: str | None = None
    lora_r: int = DEFAULT_LORA_R
    lora_alpha: int | None = None
    target_modules: str = DEFAULT_TARGET_MODULES
    attn: str = "sdpa"
    loss: str = "fused"
    padded: bool = False  # of the unpacked setups (packed micro-batches are never padded)
    # the memory levers (vramfit.planner.levers): the values each takes in the search
    liger: tuple = (False,)
    packing: tuple = (False,)
    activation_offloading: tuple = (False,)
    kbit_prep: tuple = (True,)  # QLoRA's prepare_model_for_kbit_training (False: the 4-bit model as loaded)
    # levers the search adds only when nothing fits without them (their setups need new event templates)
    when_nothing_fits: tuple = ()
    rows_median: int | None = None  # the data's median row length in tokens, where known

    def setups(self, bf16: bool) -> list:
        """Every combination, micro-batches being the divisors of the effective batch."""
        def axis(fixed, default):
            return (fixed,) if fixed is not None else default

        out = []
        for method in self.methods:
            lora = {} if method == "full" else dict(lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                                                     target_modules=self.target_modules)
            for precision, optim, ckpt, alloc, pack, liger, offload, prep, mb in itertools.product(
                    axis(self.precision, precisions_for(method, bf16)), axis(self.optim, OPTIMS),
                    axis(self.grad_ckpt, (False, True)), axis(self.allocator, ALLOCATOR_CHOICES),
                    self.packing, self.liger, self.activation_offloading,
                    self.kbit_prep if method == "qlora" else (True,),
                    axis(self.micro_batch, divisors(self.effective_batch))):
                out.append(Setup(method=method, precision=precision, optim=optim, seq_len=self.seq_len,
                                 micro_batch=mb, grad_accum=self.effective_batch // mb, grad_ckpt=ckpt,
                                 allocator=alloc, attn=self.attn, loss=self.loss,
                                 padded=self.padded and not pack, liger=liger, packing=pack,
                                 activation_offloading=offload, kbit_prep=prep, extras=self._extras(pack),
                                 **lora))
        return out

    def _extras(self, packing: bool) -> dict:
        """Packed setups carry the data's example length (the memory model's `example_len`: the examples
        a packed row holds), where the rows are known."""
        return {"example_len": self.rows_median} if packing and self.rows_median else {}

    def with_levers(self) -> "Space":
        """This space with the `when_nothing_fits` levers searched on and off."""
        from dataclasses import replace

        return replace(self, **{k: (LEVER_OFF[k], LEVER_ON[k]) for k in self.when_nothing_fits},
                       when_nothing_fits=())


# Setups within 1% of each other in predicted speed are a tie (the cost model is not that
# precise): the tie goes to the plainer setup, then to the faster one.  Plain: torch's
# AdamW, then bitsandbytes' AdamW (same algorithm, quantized or paged states), then Adafactor


def make_space(spec, device, method: str = "auto", seq_len: int = DEFAULT_SEQ_LEN,
               effective_batch: int = DEFAULT_EFFECTIVE_BATCH, micro_batch: int | None = None,
               lora_r: int | None = None, lora_alpha: int | None = None, target_modules: str | None = None,
               precision: str | None = None, optim: str | None = None, grad_ckpt: bool | None = None,
               allocator: str | None = None, attn: str = "sdpa", loss: str = "fused", padded: bool = False,
               liger: bool | None = None, packing: bool | None = None, activation_offloading: bool | None = None,
               tokens_per_batch: int | None = None, rows_median: int | None = None,
               kbit_prep: bool | None = None) -> Space:
    """Validate the user's restrictions against the model and the GPU -> Space.

    The levers: True or False fixes one; None lets the planner weigh it: packing is searched where the
    data's rows are known (`rows_median`, tokens) and is the default where they are short (median below
    half of seq_len); Liger's kernels (on the model types liger-kernel patches) and activation offloading
    are tried when nothing fits without them (they need event templates of their own), and every lever
    is shown among the chosen setup's levers either way."""
    axes = lever_axes(spec, seq_len, padded, liger, packing, activation_offloading, rows_median, kbit_prep)
    micro_batch = micro_batch_for_tokens(tokens_per_batch, seq_len, axes["packing"] == (True,), micro_batch)
    if rows_median is not None and rows_median < seq_len:
        padded = True  # rows shorter than seq_len: unpacked batches are padded to their longest
    methods = ("full", "lora", "qlora") if method == "auto" else (method,)
    if method == "auto" and spec.has_fused_experts:  # QLoRA of fused MoE experts is not modelled
        methods = ("full", "lora")
    if spec.has_fused_experts and not device.bf16:
        raise VramfitError(f"{spec.architecture}'s fused experts need bf16 (torch's grouped_mm), which the "
                           f"{device.name} does not have")
    if method != "auto":
        make_setup(method=method, lora_r=lora_r, lora_alpha=lora_alpha, target_modules=target_modules)
    elif precision is not None:  # keep the methods the precision applies to
        methods = tuple(m for m in methods if not (m == "qlora" and precision == "32-true")
                        and not (m == "full" and precision in ("16-true", "16-amp")))
    for m in methods:  # names, ranges and LoRA targets, with make_setup's messages
        s = make_setup(method=m, precision=precision or precisions_for(m, device.bf16)[0], optim=optim or "adamw_torch",
                       lora_r=None if m == "full" else lora_r, lora_alpha=None if m == "full" else lora_alpha,
                       target_modules=None if m == "full" else (target_modules or DEFAULT_TARGET_MODULES),
                       seq_len=seq_len, micro_batch=micro_batch or 1, grad_accum=effective_batch,
                       allocator=allocator or "default", attn=attn, loss=loss)
        resolve_targets(spec, s)
    if precision and precision.startswith("bf16") and not device.bf16:
        raise VramfitError(f"the {device.name} has no bf16 (compute capability {device.compute_capability}); "
                           f"use --precision 16-amp, 16-mixed, 16-true or 32-true")
    check_kbit_prep(kbit_prep, methods)
    if micro_batch is not None and effective_batch % micro_batch:
        raise VramfitError(f"micro-batch {micro_batch} does not divide the effective batch {effective_batch}")
    return Space(seq_len=seq_len, effective_batch=effective_batch, micro_batch=micro_batch, methods=methods,
                 precision=precision, optim=optim, grad_ckpt=grad_ckpt, allocator=allocator,
                 lora_r=lora_r or DEFAULT_LORA_R, lora_alpha=lora_alpha,
                 target_modules=target_modules or DEFAULT_TARGET_MODULES, attn=attn, loss=loss, padded=padded,
                 rows_median=rows_median, **axes)


def lever_axes(spec, seq_len: int, padded: bool, liger: bool | None, packing: bool | None,
               activation_offloading: bool | None, rows_median: int | None, kbit_prep: bool | None = None) -> dict:
    """The lever fields of a Space: each one's values in the search, and the levers tried only when
    nothing fits without them."""
    check_levers(spec, liger=liger, packing=packing, activation_offloading=activation_offloading, padded=padded)
    if rows_median is not None and (isinstance(rows_median, bool) or not isinstance(rows_median, int)
                                    or rows_median <= 0):
        raise VramfitError(f"--rows-median must be a positive number of tokens, got {rows_median!r}")
    if packing is None:
        if padded and rows_median is None:
            packing = False  # --padded: the user's batches are padded, not packed
        elif packing_by_default(rows_median, seq_len):
            packing = True
    axes = {"packing": (packing,) if packing is not None else ((False, True) if rows_median else (False,)),
            "liger": (bool(liger),), "activation_offloading": (bool(activation_offloading),),
            "kbit_prep": (kbit_prep is not False,)}
    later = []
    if liger is None and liger_supported(spec.model_type):
        later.append("liger")
    if activation_offloading is None:
        later.append("activation_offloading")
    if kbit_prep is None:
        later.append("kbit_prep")
    axes["when_nothing_fits"] = tuple(later)
    return axes

