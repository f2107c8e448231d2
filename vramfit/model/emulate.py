"""What a CUDA training step does where the meta device (and the CPU) does otherwise, emulated
for the meta-device traces (vramfit.model.trace) and the allocation replay (vramfit.memory.events):
- `scaled_dot_product_attention` would take the math path there, keeping seq x seq scores.  On a
  GPU with no mask it runs flash / memory-efficient attention, which keeps q, k, v, the output
  and a float32 log-sum-exp per row: `_flash_like_sdpa` saves exactly those.
- autocast (bf16-mixed, 16-mixed) does not act on meta tensors: `_autocast_mode`, a
  TorchFunctionMode, casts the inputs of the ops autocast runs in low precision and upcasts those
  it runs in fp32.
- dropout on the CPU keeps a float mask; CUDA's `native_dropout` keeps a bool one.
- bitsandbytes' 4-bit layers: `_meta_4bit_linear_class` mirrors `Linear4bit` + `MatMul4Bit`.
Heavy imports (torch, transformers) happen inside the functions.
"""

from __future__ import annotations

import contextlib


def _flash_like_sdpa(autocast_dtype=None):
    """A stand-in for F.scaled_dot_product_attention saving what the flash kernel saves.

    Under autocast, sdpa is on the low-precision list: q, k, v are cast first (new tensors).
    """
    import torch

    _InplaceMaskAdd = _inplace_mask_add_class()

    class _FlashLikeAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            # the kernels write the output as (B, S, H, D) and return it transposed to (B, H, S, D)
            b, h, s, _ = q.shape
            if q.dtype != torch.float32 and v.shape[-1] == q.shape[-1]:
                # flash allocates it like q as it sees it, (B, S, H, D): when q is contiguous as
                # (B, H, S, D) (a partial rotary's torch.cat: GPT-NeoX, Phi-3) the output is too, and
                # transformers' transpose(1, 2).contiguous() copies it (else that is a no-op)
                out = torch.empty_like(q.transpose(1, 2)).transpose(1, 2)
            else:  # the memory-efficient kernel (fp32) always writes (B, S, H, D)
                out = q.new_empty((b, s, h, v.shape[-1])).transpose(1, 2)
            lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            # what torch's flash backward allocates (the allocator replay, vramfit.memory.events, runs
            # this on meta): dq, dk, dv laid out like q, k, v; softmax_d (B, H, S rounded to 128)
            # fp32; dq_accum (B, S rounded, H, D rounded) fp32 for the flash kernel; with grouped KV
            # heads, dk and dv expanded to H heads before they are summed
            # the kernel reads the output and its log-sum-exp too: under checkpointing these are the
            # recomputed tensors' last references, held until the backward returns (the H100 memory
            # history of pythia-1b frees the 16 MiB output after the scratch, not before dq)
            q, k, v, out, lse = ctx.saved_tensors
            b, h, s, d = q.shape
            hk, sk = k.shape[1], k.shape[2]
            dq, dk, dv = (torch.empty_like(t.transpose(1, 2)) for t in (q, k, v))  # like q, k, v
            s_r = -(-s // 128) * 128
            d_r = -(-d // 32) * 32 if d <= 192 else 256
            scratch = b * h * s_r * 4  # softmax_d, fp32
            if q.dtype != torch.float32:  # the flash kernel's dq_accum, fp32
                scratch += b * s_r * h * d_r * 4
            if hk != h:
                scratch += b * sk * h * (d + v.shape[-1]) * k.element_size()
            if q.dtype != torch.float32:
                # torch's flash backward takes these as ONE allocation, 256 bytes more than their sum
                # (H100 memory histories: pythia-410m 130 MiB + 256 B for 2 + 128 MiB; llama-3.2-1b
                # 129 MiB + 256 B for 1 + 64 + 32 + 32 MiB, grouped KV heads)
                workspace = torch.empty(scratch + 256, dtype=torch.uint8, device=q.device)
                del workspace
            else:
                softmax_d = torch.empty((b, h, s_r), dtype=torch.float32, device=q.device)
                if hk != h:
                    dk_exp = k.new_empty((b, sk, h, d))
                    dv_exp = v.new_empty((b, sk, h, v.shape[-1]))
                    del dk_exp, dv_exp
                del softmax_d
            del out, lse, v, q, k  # released in this order (the histories of pythia-410m and -1b)
            return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if autocast_dtype is not None:
            query, key, value = (t.to(autocast_dtype) for t in (query, key, value))
        if key.shape[1] != query.shape[1] and (query.dtype == torch.float32 or not enable_gqa):
            # No fused CUDA kernel takes fp32 with grouped KV heads, nor KV heads broadcast without
            # enable_gqa (Falcon's multi-query attention with its always-materialised mask): torch
            # falls back to the math path (seq x seq probabilities kept).  QLoRA's fp32 residual
            # stream meets the first on every GQA model.
            with _InplaceMaskAdd():
                return torch.ops.aten._scaled_dot_product_attention_math(
                    query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]
        return _FlashLikeAttention.apply(query, key, value)

    return sdpa


def _inplace_mask_add_class():
    """The math path adds the mask to the scores in place on CUDA (`attn.add_(mask)`), but out of
    place on meta tensors, which ATen counts as tensor-subclass-like: one seq x seq score tensor
    too many per layer forward.  This mode, active only inside the math path, makes that add in
    place again (autograd above it still sees the out-of-place add, which saves nothing)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _InplaceMaskAdd(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (func is torch.ops.aten.add.Tensor and not kwargs and len(args) == 2
                    and isinstance(args[1], torch.Tensor) and args[0].dim() >= 2 and args[0].is_contiguous()
                    and torch.broadcast_shapes(args[0].shape, args[1].shape) == args[0].shape
                    and torch.promote_types(args[0].dtype, args[1].dtype) == args[0].dtype):
                return args[0].add_(args[1])
            return func(*args, **(kwargs or {}))

    return _InplaceMaskAdd


def _grouped_mm_any_dtype_class():
    """aten::_grouped_mm as CUDA runs it for operands that are not bf16.

    CUDA autocast has no kernel for `_grouped_mm` (torch 2.11 to 2.13), and transformers' grouped_mm
    experts cast the input to the weight's dtype, so fp32 experts under bf16-mixed multiply in fp32:
    `_grouped_mm_cuda` (torch >= 2.10) runs a per-group mm fallback into an output it creates as for
    bf16, in the operands' dtype.  The meta kernel accepts bf16 only; this mode, above the meta
    kernel, answers a non-bf16 `_grouped_mm` with that output tensor (the backward's two
    `_grouped_mm` calls, through torch's own derivative formulas, included)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    op = torch.ops.aten._grouped_mm.default

    def output(a, b, offs=None, bias=None, out_dtype=None):
        # create_grouped_gemm_output_tensor: the last dimension's stride padded to 16 bytes
        dtype = out_dtype or a.dtype
        if a.dim() == 2:
            size = [offs.size(0), a.size(0), b.size(1)] if b.dim() == 2 else [a.size(0), b.size(-1)]
        else:
            size = [a.size(1), b.size(1)] if b.dim() == 2 else [a.size(0), a.size(1), b.size(-1)]
        align = max(1, 16 // dtype.itemsize)
        padded = -(-size[-1] // align) * align
        stride = [size[1] * padded, padded, 1] if (a.dim() == 2) == (b.dim() == 2) else [padded, 1]
        return torch.empty_strided(size, stride, dtype=dtype, device=a.device)

    class _GroupedMMAnyDtype(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (func is op and args[0].device.type == "meta"
                    and (args[0].dtype != torch.bfloat16 or args[1].dtype != torch.bfloat16)):
                return output(*args, **kwargs)
            return func(*args, **kwargs)

    return _GroupedMMAnyDtype


def _cuda_dropout():
    """F.dropout as CUDA's native_dropout keeps it: a bool mask, not a float one."""
    import torch

    class _NativeDropout(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p):
            mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
            if x.device.type != "meta":
                mask = torch.rand(x.shape, device=x.device) >= p
            ctx.save_for_backward(mask)
            ctx.scale = 1.0 / (1.0 - p)
            return x * mask * ctx.scale if x.device.type != "meta" else torch.empty_like(x)

        @staticmethod
        def backward(ctx, grad):
            (mask,) = ctx.saved_tensors
            return torch.ops.aten.native_dropout_backward(grad, mask, ctx.scale), None

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return input
        return _NativeDropout.apply(input, p)

    return dropout


def _autocast_mode(dtype):
    import torch
    from torch.overrides import TorchFunctionMode

    low_ops = {
        torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.mm, torch.bmm,
        torch.baddbmm, torch.addmm, torch.Tensor.__matmul__,
    }
    # torch._grouped_mm / F.grouped_mm (transformers' grouped_mm experts) are not in this list: CUDA
    # autocast has no kernel for aten::_grouped_mm (torch 2.11 to 2.13), and transformers' moe.py
    # casts the input to the weight's dtype itself, so fp32 experts under bf16-mixed run fp32
    # grouped GEMMs with no bf16 weight copy.  Recorded on an H100 (benchmarks/results/h100-2026-11-
    # 23-memory-history/6290571de71b.json.gz, Mixtral bf16-mixed): each MoE layer's forward has an
    # fp32 gate_up output (896 MiB at 4 x 1024) and no 1792 / 896 MiB casts of the expert weights.

    # CUDA autocast's "ops that can autocast to float32": low-precision inputs are upcast (e.g.
    # GPT-2's tanh GELU goes fp32 at torch.pow and stays fp32 to the end of the activation)
    T, F = torch.Tensor, torch.nn.functional
    fp32_ops = {
        torch.pow, T.pow, T.__pow__, T.__rpow__, torch.exp, T.exp, torch.expm1, torch.log, T.log, torch.log1p,
        torch.log2, torch.log10, torch.rsqrt, T.rsqrt, torch.reciprocal, T.reciprocal, torch.tan, torch.sinh,
        torch.cosh, torch.acos, torch.asin, torch.erfinv, torch.sum, T.sum, torch.prod, T.prod, torch.cumsum,
        T.cumsum, torch.cumprod, torch.norm, T.norm, torch.softmax, T.softmax, torch.log_softmax, T.log_softmax,
        F.softmax, F.log_softmax, F.softmin, F.softplus, F.layer_norm, F.group_norm, F.normalize, F.cross_entropy,
        F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.kl_div, F.cosine_similarity, torch.cdist,
        torch.dist, torch.renorm,
    }

    def _up(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t

    class _AutocastEmulation(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.weight_cache = {}

        def _cast(self, t):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
                return t
            if t.requires_grad and t.is_leaf:  # autocast caches casts of trainable leaf weights
                key = id(t)
                if key not in self.weight_cache:
                    self.weight_cache[key] = t.to(dtype)
                return self.weight_cache[key]
            return t.to(dtype)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in low_ops:
                # CUDA autocast casts an op's arguments in one C++ call (cached_cast(args)...),
                # whose arguments GCC evaluates last to first: F.linear's bias, then its weight,
                # then its input (the H100 memory history of pythia-410m bf16-mixed shows 6 KiB,
                # 6 MiB, 64 MiB in that order in every query_key_value forward)
                kwargs = dict(reversed([(k, self._cast(v)) for k, v in reversed(kwargs.items())]))
                args = tuple(reversed([self._cast(a) for a in reversed(args)]))
            elif func in fp32_ops:
                args = tuple(_up(a) for a in args)
                kwargs = {k: _up(v) for k, v in kwargs.items()}
            return func(*args, **kwargs)

    return _AutocastEmulation()


def _meta_4bit_linear_class():
    import torch

    class _MatMul4Bit(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):  # saves only the packed weight, a parameter
            ctx.save_for_backward(weight)
            return x.new_empty(x.shape[:-1] + (weight.shape[0],))

        @staticmethod
        def backward(ctx, grad):  # pragma: no cover
            (w,) = ctx.saved_tensors
            return grad.new_empty(grad.shape[:-1] + (w.shape[1],)), None

    class _Meta4bitLinear(torch.nn.Linear):
        compute_dtype = torch.bfloat16

        def forward(self, x):
            inp_dtype = x.dtype
            x = x.to(self.compute_dtype)
            out = _MatMul4Bit.apply(x, self.weight)
            if self.bias is not None:
                out = out + self.bias.to(self.compute_dtype)
            return out.to(inp_dtype)

    return _Meta4bitLinear


@contextlib.contextmanager
def _quiet():
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def _patched_sdpa(enabled: bool, autocast_dtype=None, kv_repeated: bool = False):
    """What a CUDA run does where the meta device differs: flash-like sdpa (or the math path),
    CUDA's bool dropout masks, and no data-dependent packed-sequence check (it reads values,
    which the meta device has not; our batches are never packed).  kv_repeated: what transformers
    does when an attention mask reaches SDPA (padded batches) on CUDA: repeat the grouped KV
    heads rather than pass enable_gqa (`use_gqa_in_sdpa` is false with a mask)."""
    import torch
    from transformers import masking_utils

    sdpa_mod = None
    if kv_repeated:
        try:
            from transformers.integrations import sdpa_attention as sdpa_mod
        except ImportError:  # pragma: no cover - an older transformers repeats them anyway
            sdpa_mod = None
    orig_gqa = getattr(sdpa_mod, "use_gqa_in_sdpa", None)
    if orig_gqa is not None:
        sdpa_mod.use_gqa_in_sdpa = lambda *a, **k: False

    orig_find = getattr(masking_utils, "find_packed_sequence_indices", None)
    if orig_find is not None:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    # whether a padding mask is all ones reads its values (transformers 5.17 asks it of OPT's
    # all-ones mask before skipping the causal mask): the replayed batches are never padded
    orig_all = getattr(masking_utils, "fast_all", None)
    if orig_all is not None:
        masking_utils.fast_all = lambda t: True if t.device.type == "meta" else orig_all(t)
    orig = torch.nn.functional.scaled_dot_product_attention
    orig_dropout = torch.nn.functional.dropout
    if enabled:
        torch.nn.functional.scaled_dot_product_attention = _flash_like_sdpa(autocast_dtype)
    torch.nn.functional.dropout = _cuda_dropout()
    grouped_mm = _grouped_mm_any_dtype_class()() if hasattr(torch.ops.aten, "_grouped_mm") else contextlib.nullcontext()
    try:
        with grouped_mm:
            yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
        torch.nn.functional.dropout = orig_dropout
        if orig_find is not None:
            masking_utils.find_packed_sequence_indices = orig_find
        if orig_all is not None:
            masking_utils.fast_all = orig_all
        if orig_gqa is not None:
            sdpa_mod.use_gqa_in_sdpa = orig_gqa

