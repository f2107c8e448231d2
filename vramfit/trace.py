"""Activation bytes read off the real model: a forward pass on the meta device.

Every tensor autograd saves for backward passes through `saved_tensors_hooks`; on the meta
device the forward costs no memory, yet the saved set is exactly what the real ops keep on a
GPU (dropout masks, fp32 norm upcasts, peft's adapter casts, the fp32 log-softmax of the loss).
Storages are de-duplicated (views and tensors saved twice count once) and parameters excluded.

Three things differ on the meta device (and the CPU) and are emulated as CUDA runs them:
- `scaled_dot_product_attention` would take the math path there, keeping seq x seq scores.  On a
  GPU with no mask it runs flash / memory-efficient attention, which keeps q, k, v, the output
  and a float32 log-sum-exp per row.  `_FlashLikeAttention` saves exactly those.
- autocast (bf16-mixed, 16-mixed) does not act on meta tensors.  `_AutocastEmulation`, a
  TorchFunctionMode, casts the inputs of the ops autocast runs in low precision (linear, matmul,
  bmm, baddbmm, sdpa; not grouped_mm, which CUDA autocast leaves alone), caching the casts of
  trainable leaf weights as autocast does, and upcasts the inputs of the ops it runs in fp32
  (pow, exp, softmax, layer_norm, sum, ...).
- dropout on the CPU keeps a float mask; CUDA's `native_dropout` keeps a bool one.
SDPA in fp32 with grouped KV heads has no fused CUDA kernel and runs the math path, which the
trace then runs for real (measured: benchmarks/accuracy/saved_tensors.py on an H200).

Bytes scale as c + batch * (a * seq + b * seq^2); three traces at short sequence lengths give
c, a and b per region (outside the decoder layers, each decoder layer).  The 4-bit base layers
of QLoRA are stood in for by `_Meta4bitLinear`, which mirrors bitsandbytes' `Linear4bit` +
`MatMul4Bit` (input cast to the compute dtype, output cast back, nothing saved but the packed
weight).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass

TRACE_SEQ_LENS = (16, 32, 64)
# Config keys that make decoder layers differ from each other (dense vs MoE layers):
# with any of them set, every layer is traced instead of two.
_IRREGULAR_LAYER_KEYS = ("mlp_only_layers", "first_k_dense_replace", "decoder_sparse_step", "moe_layer_freq")


@dataclass(frozen=True)
class TraceKey:
    """What changes the set of saved tensors (everything else is a shape)."""

    method: str  # full | lora | qlora
    param_dtype: str  # float32 | bfloat16 | float16
    autocast_dtype: str | None  # None | bfloat16 | float16
    attn: str  # sdpa | eager  (flash_attention_2 saves what sdpa's flash kernel saves)
    lora_r: int = 0
    lora_dropout: bool = False
    target_modules: tuple = ()  # resolved module paths
    # an attention mask reaches SDPA (padded batches of more than one row) on a model with grouped
    # KV heads: transformers repeats the KV heads (saved for backward at full head count)
    kv_repeated: bool = False


@dataclass(frozen=True)
class Region:
    """Saved bytes of one region: const + batch * (lin * seq + quad * seq^2)."""

    const: float
    lin: float
    quad: float
    max_tensor_lin: float  # largest per-token saved storage: batch * lin * seq bytes
    max_tensor_quad: float = 0.0  # largest seq x seq saved storage: batch * quad * seq^2 bytes

    def bytes(self, batch: int, seq: int) -> int:
        return int(round(self.const + batch * (self.lin * seq + self.quad * seq * seq)))


@dataclass(frozen=True)
class ActivationProfile:
    outside: Region  # embeddings, final norm, LM head input, loss
    layers: tuple  # Region per decoder layer (all N, extrapolated from the traced ones)
    layer_input_lin: float  # bytes/token of one layer's hidden_states input (kept under checkpointing)
    shared_input_lin: float  # bytes/token of inputs shared by all layers (rotary cos/sin)
    residual_dtype_bytes: int

    def saved_bytes(self, batch: int, seq: int) -> int:
        return self.outside.bytes(batch, seq) + sum(r.bytes(batch, seq) for r in self.layers)

    def checkpointed_bytes(self, batch: int, seq: int) -> int:
        """What checkpointing keeps: the outside region and each layer's input."""
        kept = batch * seq * (self.layer_input_lin * len(self.layers) + self.shared_input_lin)
        return self.outside.bytes(batch, seq) + int(kept)


# --------------------------------------------------------------------------- emulations


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
            # what torch's flash backward allocates (the allocator replay, vramfit.alloc_events, runs
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


# --------------------------------------------------------------------------- building


def _decoder_layers(model, n_layers: int):
    import torch

    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers:
            if best is None or sum(1 for _ in mod.parameters()) > sum(1 for _ in best.parameters()):
                best = mod
    return list(best) if best is not None else []


def _traced_config(config_dict: dict, n_layers: int):
    from vramfit.spec import config_from_dict

    data = copy.deepcopy(config_dict)
    config = config_from_dict(data)
    config.use_cache = False  # training runs build no KV cache (the launcher sets this too)
    irregular = any(getattr(config, k, None) not in (None, 0, 1, [], ()) for k in _IRREGULAR_LAYER_KEYS)
    traced = n_layers if irregular else min(n_layers, 2)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, name) and isinstance(getattr(config, name), int):
            setattr(config, name, traced)
    lt = getattr(config, "layer_types", None)
    if isinstance(lt, (list, tuple)) and len(lt) > traced:
        config.layer_types = list(lt[:traced])
    return config, traced


def _prepare_model(config, key: TraceKey, spec, conv1d_4bit: bool = False):
    import torch

    from vramfit.spec import build_meta_model

    dtype = getattr(torch, key.param_dtype)
    attn = "eager" if key.attn == "eager" else "sdpa"
    model = build_meta_model(config, dtype=dtype, attn_implementation=attn)
    model.train()
    if key.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if key.method == "qlora":
        cls = _meta_4bit_linear_class()
        out_name = spec.output_layer
        for name, mod in list(model.named_modules()):
            if type(mod) is torch.nn.Linear and name != out_name and name:  # transformers' own test
                mod.__class__ = cls  # same parameters, bitsandbytes' forward
            elif conv1d_4bit and type(mod).__name__ == "Conv1D" and name != out_name:
                # transformers quantizes GPT-2's Conv1D too (its weight transposed to out x in)
                nx, nf = mod.weight.shape
                new = cls(nx, nf, bias=mod.bias is not None, device="meta", dtype=mod.weight.dtype)
                model.set_submodule(name, new)
        quantized = {id(m.weight) for m in model.modules() if isinstance(m, cls)}
        for p in model.parameters():  # prepare_model_for_kbit_training: non-quantized params to fp32
            if p.dtype in (torch.float16, torch.bfloat16) and id(p) not in quantized:
                p.data = p.data.to(torch.float32)
    import logging

    # peft imports bitsandbytes where installed; on a CPU machine it logs a kernel warning that is
    # not the user's business
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=key.lora_r, lora_alpha=key.lora_r * 2, lora_dropout=0.1 if key.lora_dropout else 0.0,
                      target_modules=list(key.target_modules), task_type="CAUSAL_LM")
    with _quiet():
        model = get_peft_model(model, lcfg)
    model.train()
    return model


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


def _run_trace(model, key: TraceKey, n_layers: int, seq: int, needs_input_grad: bool) -> dict:
    """One forward with labels on a (1, seq) batch; saved bytes by region."""
    import torch

    layers = _decoder_layers(model, n_layers)
    known = {p.untyped_storage()._cdata for p in model.parameters()}
    known |= {b.untyped_storage()._cdata for b in model.buffers()}
    state = {"region": "outside"}
    totals = {"outside": [0, 0, 0]}  # bytes, largest per-token storage, largest seq x seq storage
    for i in range(len(layers)):
        totals[i] = [0, 0, 0]
    layer_inputs = {}
    seen = set()

    def pack(t):
        st = t.untyped_storage()
        sid = st._cdata
        if sid not in known and sid not in seen:
            seen.add(sid)
            rec = totals[state["region"]]
            rec[0] += st.nbytes()
            n_seq = sum(1 for d in t.shape if d == seq)  # weight-sized autocast copies have none
            if n_seq == 1:
                rec[1] = max(rec[1], st.nbytes())
            elif n_seq >= 2:  # seq x seq scores (eager or math-path attention)
                rec[2] = max(rec[2], st.nbytes())
        return t

    def pre_hook(idx):
        def hook(mod, args, kwargs):
            state["region"] = idx
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
            hs = kwargs.get("hidden_states", args[0] if args else None)
            layer_inputs[idx] = (hs.untyped_storage().nbytes() if hs is not None else 0,
                                 {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                                  for t in tensors if t is not hs and t.is_floating_point()})
        return hook

    def post_hook(mod, args, output):
        state["region"] = "outside"

    handles = [l.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, l in enumerate(layers)]
    handles += [l.register_forward_hook(post_hook) for l in layers]
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    autocast = _autocast_mode(getattr(torch, key.autocast_dtype)) if key.autocast_dtype else contextlib.nullcontext()
    emb_hook = None
    if needs_input_grad:  # what enable_input_require_grads does under checkpointing
        emb = model.get_input_embeddings()
        emb_hook = emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    try:
        ac_dtype = getattr(torch, key.autocast_dtype) if key.autocast_dtype else None
        with _patched_sdpa(key.attn != "eager", ac_dtype, key.kv_repeated), autocast, _quiet():  # noqa: SIM117
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(input_ids=ids, labels=ids)
    finally:
        for h in handles:
            h.remove()
        if emb_hook is not None:
            emb_hook.remove()
    shared = {}
    for _, (_, others) in layer_inputs.items():
        shared.update(others)
    hs_bytes = [v[0] for v in layer_inputs.values()]
    return dict(totals=totals, layer_input=hs_bytes[-1] if hs_bytes else 0, shared=sum(shared.values()))


def _solve_region(points) -> Region:
    """points: [(seq, bytes, max per-token, max seq x seq)] at TRACE_SEQ_LENS -> c + a*s + b*s^2."""
    (s1, y1, _, _), (s2, y2, _, _), (s3, y3, m3, q3) = points
    # divided differences for the quadratic through three points
    d12 = (y2 - y1) / (s2 - s1)
    d23 = (y3 - y2) / (s3 - s2)
    b = (d23 - d12) / (s3 - s1)
    a = d12 - b * (s1 + s2)
    c = y1 - a * s1 - b * s1 * s1
    return Region(const=c, lin=a, quad=b, max_tensor_lin=m3 / s3, max_tensor_quad=q3 / (s3 * s3))


@functools.lru_cache(maxsize=256)
def _profile_cached(spec, key: TraceKey, needs_input_grad: bool) -> ActivationProfile:
    config, traced = _traced_config(spec.config, spec.num_layers)
    with _quiet():
        model = _prepare_model(config, key, spec)
    runs = [_run_trace(model, key, traced, s, needs_input_grad) for s in TRACE_SEQ_LENS]
    outside = _solve_region([(s, *r["totals"]["outside"]) for s, r in zip(TRACE_SEQ_LENS, runs)])
    traced_layers = [_solve_region([(s, *r["totals"][i]) for s, r in zip(TRACE_SEQ_LENS, runs)])
                     for i in range(traced)]
    if traced < spec.num_layers:  # identical layers: the last traced one stands for the rest
        layers = tuple(traced_layers[:-1]) + (traced_layers[-1],) * (spec.num_layers - traced + 1)
    else:
        layers = tuple(traced_layers)
    last = runs[-1]
    s = TRACE_SEQ_LENS[-1]
    res_bytes = int(round(last["layer_input"] / (s * spec.hidden_size))) if spec.hidden_size else 2
    return ActivationProfile(outside=outside, layers=layers, layer_input_lin=last["layer_input"] / s,
                             shared_input_lin=last["shared"] / s, residual_dtype_bytes=res_bytes)


# LoRA ranks that are traced; every other rank is interpolated from these two (see below)
RANK_ANCHORS = (8, 16)


def shared_regions(regions) -> tuple:
    """The layers' regions with equal ones as one object: the memory model computes each distinct
    region once per setup, which keeps the planner's search fast on deep models."""
    seen: dict = {}
    return tuple(seen.setdefault(r, r) for r in regions)


def _interpolate_rank(anchors, ranks, r: int) -> ActivationProfile:
    """Saved bytes are linear in the LoRA rank (the A output each B saves, the adapters' autocast
    copies: all r x something), so two traced ranks give any other exactly."""
    (p1, p2), (r1, r2) = anchors, ranks
    w = (r - r1) / (r2 - r1)

    def lerp(a, b):
        return a if a == b else a + w * (b - a)

    def region(a: Region, b: Region) -> Region:
        return Region(const=lerp(a.const, b.const), lin=lerp(a.lin, b.lin), quad=lerp(a.quad, b.quad),
                      max_tensor_lin=max(0.0, lerp(a.max_tensor_lin, b.max_tensor_lin)),
                      max_tensor_quad=max(0.0, lerp(a.max_tensor_quad, b.max_tensor_quad)))

    return ActivationProfile(outside=region(p1.outside, p2.outside),
                             layers=shared_regions(region(a, b) for a, b in zip(p1.layers, p2.layers)),
                             layer_input_lin=p2.layer_input_lin, shared_input_lin=p2.shared_input_lin,
                             residual_dtype_bytes=p2.residual_dtype_bytes)


def activation_profile(spec, key: TraceKey, grad_ckpt: bool = False) -> ActivationProfile:
    """Saved-activation profile for `spec` under `key` (cached in memory and on disk).  LoRA ranks
    other than RANK_ANCHORS come from the anchors' profiles, so a new rank needs no new trace."""
    import dataclasses

    from vramfit import cache

    needs_input_grad = grad_ckpt and key.method != "full"
    hit = cache.load_profile(spec, key, needs_input_grad)
    if hit is not None:
        return hit
    if key.method != "full" and key.lora_r not in RANK_ANCHORS:
        anchors = [activation_profile(spec, dataclasses.replace(key, lora_r=r), grad_ckpt) for r in RANK_ANCHORS]
        prof = _interpolate_rank(anchors, RANK_ANCHORS, key.lora_r)
    else:
        prof = _profile_cached(spec, key, needs_input_grad)
    cache.store_profile(spec, key, needs_input_grad, prof)
    return prof
