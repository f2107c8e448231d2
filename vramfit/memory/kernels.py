"""What a training step allocates besides the ops' outputs, as CUDA and the libraries do it, for the
allocation replay (vramfit.memory.events): CUDA kernels' own temporaries and reduction buffers,
the cuBLAS workspace, bitsandbytes' 4-bit load and matmuls and 8-bit optimizer states, trl's fused
loss kernels, the optimizer and gradient clipping as the Trainer runs them.  Torch is imported
inside the functions.
"""

from __future__ import annotations

import contextlib


class Unsupported(Exception):
    """What the replay does not cover (the caller falls back or says so)."""


CUBLAS_WORKSPACE = 32 << 20
_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "matmul")


def _internal_temporaries(name: str, args) -> list:
    """Bytes a CUDA kernel allocates inside one op, below the dispatcher a TorchDispatchMode sees,
    live (beside the op's output) until the op returns.

    `_safe_softmax` (SDPA's math path: on CUDA for fp32 with grouped KV heads, and for multi-query
    attention without enable_gqa) zeroes fully masked rows through x.eq(-inf) over the whole score
    tensor: a bool tensor of the scores' size, beside its input and result.  Recorded on an H100
    (benchmarks/results/h100-2026-11-23-memory-history): Falcon-7B's 284 MiB and Qwen2.5-0.5B's
    14 MiB bool allocations, one per layer and forward, which the replay lacked.

    `_softmax_backward_data` on CUDA (softmax_backward_cuda_out) first forms `tmp = grad * output`,
    a tensor of the gradient's size, beside its input gradient and the saved probabilities: on SDPA's
    math path and in eager attention one more seq x seq score tensor in every layer's backward.
    Recorded on the H100 (Qwen2.5-0.5B fp32 LoRA, Falcon-7B bf16-mixed): three score-sized
    allocations per layer backward where the replay had two; with checkpointing the peak of QLoRA
    on a grouped-KV model (fp32 q, k, v: the math path) is that layer backward, so the replay was one
    fp32 B x H x S x S under (1024 MiB for TinyLlama at 2 x 2048)."""
    if name == "_safe_softmax" and args:
        return [args[0].numel()]
    if name == "_softmax_backward_data" and len(args) >= 2:
        import torch

        grad, output = args[0], args[1]
        return [grad.numel() * torch.promote_types(grad.dtype, output.dtype).itemsize]
    return []


_REDUCTIONS = {"sum", "mean", "linalg_vector_norm", "norm", "amax", "amin", "max", "min", "prod"}


def _reduction_buffers(name: str, args, num_sms: int) -> list:
    """(staging, semaphore) bytes of each launch of a CUDA reduction (see vramfit/cuda_reduce.py)
    that reduces across thread blocks: allocated after the op's output, freed when it returns."""
    import torch

    from vramfit.memory.cuda_reduce import reduce_buffers

    if name not in _REDUCTIONS or not args or not isinstance(args[0], torch.Tensor):
        return []
    x = args[0]
    if not x.dtype.is_floating_point or x.numel() == 0:
        return []
    dim = None
    if name in ("sum", "mean", "amax", "amin", "max", "min", "prod") and len(args) > 1:
        dim = args[1]
    elif name in ("linalg_vector_norm", "norm") and len(args) > 2:
        dim = args[2]
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        dims = list(range(x.dim()))
    elif isinstance(dim, int):
        dims = [dim]
    else:
        dims = list(dim)
    arg_size = 8 if x.dtype == torch.float64 else 4  # acc_t: float for half/bfloat16/float
    # sum_functor: 16-bit inputs use vt0=4, input_vec_size=8 (so no input vectorization)
    input_vec_size = 8 if name == "sum" and x.element_size() == 2 else 4
    return reduce_buffers(list(x.shape), list(x.stride()), dims, x.element_size(), arg_size,
                          input_vec_size=input_vec_size, num_sms=num_sms)



NF4_BLOCK = 64  # bnb_4bit blocksize
DQ_BLOCK = 256  # double quant: the absmax quantized in blocks of 256
GEMM_4BIT_CUSTOM_MAX_M = 512  # above this many rows gemm_4bit dequantizes + F.linear on sm90 (any weight)


def _quantize_4bit_events(rec, numel: int, first: list) -> list:
    """Params4bit._quantize of a bf16 weight already on the GPU (bitsandbytes 0.50.2,
    quantize_4bit with compress_statistics): returns the ids of the storages it keeps."""
    blocks = -(-numel // NF4_BLOCK)
    absmax = rec.alloc(4 * blocks)  # bitsandbytes::quantize_4bit: absmax, then the packed weight
    packed = rec.alloc((numel + 1) // 2)
    code = rec.alloc(16 * 4)  # get_4bit_type("nf4", device): the 16-value code, per weight
    offset = rec.alloc(4)  # _absmax.mean()
    centred = rec.alloc(4 * blocks)  # _absmax - offset
    if not first:  # quantize_blockwise: name2qmap["dynamic"], built once, global
        first.append(rec.alloc(256 * 4))
    absmax2 = rec.alloc(4 * -(-blocks // DQ_BLOCK))  # quantize_blockwise: absmax, then out
    qabsmax = rec.alloc(blocks)
    code2 = rec.alloc(256 * 4)  # code.to(A.device, copy=True)
    rec.free(centred)  # quantize_blockwise returns
    rec.free(absmax)  # del _absmax
    return [packed, code, offset, absmax2, qabsmax, code2]


def _qlora_linear_forward(rec, compute_dtype):
    """peft's bnb LoRA Linear4bit.forward over bitsandbytes' Linear4bit.forward + MatMul4Bit:
    the base output cloned, gemm_4bit's dequantize + F.linear path for more than 512 rows
    (absmax dequantized to fp32 plus the offset, the weight dequantized to the compute dtype,
    freed after the matmul), and in backward the weight dequantized again for the input gradient."""
    import torch
    from torch.overrides import _get_current_function_mode_stack

    class _MatMul4Bit(torch.autograd.Function):
        @staticmethod
        def forward(ctx, A, weight, bias):
            N, K = weight.shape
            ctx.wshape = (N, K)
            M = A.numel() // K
            if M > GEMM_4BIT_CUSTOM_MAX_M:  # _dequant_linear_fallback
                absmax_dq = torch.empty((-(-N * K // NF4_BLOCK),), dtype=torch.float32, device=A.device)
                absmax = absmax_dq + 1.0
                B_dq = torch.empty((N, K), dtype=A.dtype, device=A.device)
                out = torch.nn.functional.linear(A, B_dq, bias)
                del absmax, absmax_dq, B_dq  # the frame's locals, in order
                return out
            A = A.contiguous()  # the fused kernel
            return torch.empty((*A.shape[:-1], N), dtype=A.dtype, device=A.device)

        @staticmethod
        def backward(ctx, grad):
            if not ctx.needs_input_grad[0]:
                return None, None, None
            N, K = ctx.wshape
            absmax = torch.empty((-(-N * K // NF4_BLOCK),), dtype=torch.float32, device=grad.device)
            absmax += 1.0
            W = torch.empty((N, K), dtype=grad.dtype, device=grad.device)  # dequantize_4bit
            del absmax
            grad_A = torch.matmul(grad, W)
            del W
            return grad_A, None, None

    def base_forward(layer, x):
        inp_dtype = x.dtype
        x = x.to(compute_dtype)
        bias = layer.bias
        if bias is not None and bias.dtype != x.dtype:  # bias.data = bias.data.to(x.dtype), once
            st = bias.untyped_storage()
            old = rec.live.pop(st._cdata, None)
            bias.data = bias.data.to(x.dtype)
            if old is not None:
                rec.free(old)
            bias = layer.bias
        return _MatMul4Bit.apply(x, layer.weight, bias).to(inp_dtype)

    def forward(self, x, *args, **kwargs):
        result = base_forward(self.base_layer, x)
        result = result.clone()  # peft: "defensively clone"
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dropout, scaling = self.lora_dropout[name], self.scaling[name]
            # the Trainer's autocast is on here on the GPU; the replay's is an emulation (a
            # TorchFunctionMode) that torch.is_autocast_enabled() does not see: without this, one
            # more fp32 copy of the output per call (H100 histories 07ebba766325 / 1bd91886c747)
            requires_conversion = not (torch.is_autocast_enabled() or any(
                type(m).__name__ == "_AutocastEmulation" for m in _get_current_function_mode_stack()))
            if requires_conversion:
                expected_dtype = result.dtype
                x = self._cast_input_dtype(x, lora_A.weight.dtype)
            output = lora_B(lora_A(dropout(x))) * scaling
            if requires_conversion:
                output = output.to(expected_dtype)
            result = result + output
        return result

    return base_forward, forward


def _qlora_load(rec, model, base_model, quantized: dict, unused_reserved: int = 0, kbit_prep: bool = True) -> None:
    """from_pretrained(quantization_config=nf4 + double quant, dtype=bf16, device_map GPU) of a
    bf16 checkpoint, then prepare_model_for_kbit_training: checkpoint tensors one at a time in
    natural key order (transformers loads synchronously when it quantizes on the fly), each on the
    GPU in bf16, the quantized ones quantized and their bf16 copy freed; buffers; then (`kbit_prep`)
    every non-quantized param cast to fp32 (new storage, old freed) and torch.cuda.empty_cache().
    peft's adapters follow, in fp32; where the meta model holds them in bf16 (trl's SFTTrainer,
    trace.TraceKey.adapter_dtype) each is then cast: the bf16 copy made, the fp32 one freed."""
    from transformers.core_model_loading import dot_natural_key

    named = {}
    for n, p in base_model.named_parameters():
        if "lora_" in n:
            continue
        named[n.replace(".base_layer.", ".")] = p
    # from_pretrained with a device map on the GPU first runs caching_allocator_warmup: one torch.empty of
    # the bytes the model will take (4-bit weights at half a byte an element, the rest as the checkpoint
    # stores them, tied weights once), freed at once, so the load is carved from one cached segment and
    # prepare_model_for_kbit_training's empty_cache releases nothing (H100 memory history of llama-2-7b
    # QLoRA, benchmarks/results/h100-2026-12-06-memory-history-2/4f194d722f55.json.gz: 1331830784 bytes
    # first, then the weights; the 12 recipes' QLoRA runs kept their load's reserved memory to the byte).
    # transformers subtracts what is reserved and unused at that moment (the harness's 2 MiB from its
    # torch.empty(1)): `unused_reserved`, 0 in a fresh process (gemma-2b QLoRA, 1bd91886c747: 19240 ->
    # 18998 MiB reserved with it, as measured).  Replayed on the 52 measured QLoRA runs (2026-12-07, each
    # under its own transformers), device error p90 2.60% -> 1.57%, max 6.52% -> 3.82%, under by > 2%: 4 -> 2.
    warm = sum(p.numel() // 2 if id(p) in quantized else p.numel() * 2 for p in named.values())
    warm = max(0, warm - unused_reserved)  # caching_allocator_warmup: minus what is reserved and unused
    rec.free(rec.alloc(warm))
    first = []
    bf16_ids = {}
    for n in sorted(named, key=dot_natural_key):
        p = named[n]
        if id(p) in quantized:
            w = rec.alloc(p.numel() * 2)
            quantized[id(p)] = _quantize_4bit_events(rec, p.numel(), first)
            rec.free(w)
        else:
            bf16_ids[id(p)] = rec.alloc(p.numel() * 2)
    for b in base_model.buffers():
        if b.device.type == "meta" and b.untyped_storage().nbytes():
            st = b.untyped_storage()
            if st._cdata not in rec.live:
                rec.live[st._cdata] = rec.alloc(st.nbytes())
    for p in base_model.parameters():  # prepare_model_for_kbit_training
        if id(p) not in bf16_ids:
            continue
        if kbit_prep:
            new = rec.alloc(p.untyped_storage().nbytes())  # already fp32 in the meta model
            rec.free(bf16_ids.pop(id(p)))
        else:
            new = bf16_ids.pop(id(p))
        rec.live[p.untyped_storage()._cdata] = new
    if kbit_prep:
        rec.events.append(("e",))
    cast = {id(p) for n, p in model.named_parameters() if "lora_" in n and p.element_size() < 4 and p.requires_grad}
    for n, p in model.named_parameters():  # peft: adapters built on the CPU, moved to the GPU (fp32)
        if "lora_" in n:
            rec.live[p.untyped_storage()._cdata] = rec.alloc(p.numel() * 4 if id(p) in cast else
                                                             p.untyped_storage().nbytes())
    for n, p in model.named_parameters():  # trl's SFTTrainer: param.data = param.data.to(torch.bfloat16)
        if id(p) in cast:
            st = p.untyped_storage()
            old = rec.live[st._cdata]
            rec.live[st._cdata] = rec.alloc(st.nbytes())
            rec.free(old)


@contextlib.contextmanager
def _trl_fused_kernels(autocast_dtype=None):
    """trl's fused LM head as it runs on a GPU, on the meta device: its Triton kernels fold each
    tile in place (nothing allocated) and the fp32 gradient GEMMs accumulate in place.  Under
    autocast (`autocast_dtype`, the Trainer's bf16 / fp16) the head computes its tiles in that
    dtype, casting the hidden states and each weight tile to it: the forward asks
    `torch.is_autocast_enabled(device)`, which the meta device answers as the CUDA run would."""
    import types

    from trl.kernels import chunked_logprob as kern

    class _NoKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = {name: getattr(kern, name, None) for name in ("_use_triton", "_forward_kernel", "_backward_kernel",
                                                          "_addmm_fp32", "triton")}
    import torch

    is_autocast, autocast_of = torch.is_autocast_enabled, torch.get_autocast_dtype
    # the kernel asks autocast about the tensors' device, which has no autocast on meta: answer as
    # CUDA would under the Trainer's autocast (on during the forward, where the kernel asks)
    on = autocast_dtype is not None
    torch.is_autocast_enabled = lambda *a: on if a and a[0] == "meta" else is_autocast(*a)
    torch.get_autocast_dtype = lambda *a: autocast_dtype if a and a[0] == "meta" else autocast_of(*a)
    kern._use_triton = lambda device: True
    kern._forward_kernel = kern._backward_kernel = _NoKernel()
    kern._addmm_fp32 = lambda acc, a, b: None
    if saved["triton"] is None:
        kern.triton = types.SimpleNamespace(cdiv=lambda a, b: -(-a // b))
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_dtype = is_autocast, autocast_of
        for name, value in saved.items():
            if value is None:
                if hasattr(kern, name):
                    delattr(kern, name)
            else:
                setattr(kern, name, value)


# --------------------------------------------------------------------------- optimizers


class _Bnb8bitEmulation:
    """bitsandbytes Optimizer8bit.step: states created per parameter at its first update, in place."""

    def __init__(self, groups, paged: bool, bits: int, embeddings: set):
        self.groups = groups
        self.paged = paged
        self.bits = bits
        self.embeddings = embeddings
        self.state = {}

    def _buffer(self, p, dtype):
        import torch

        if self.paged and p.numel() >= 1e5:
            return None  # cudaMallocManaged: outside torch's allocator
        return torch.zeros_like(p, dtype=dtype)

    def step(self):
        import torch

        for group in self.groups:
            for p in group:
                if p.grad is None or id(p) in self.state:
                    continue
                st = {}
                bits = 32 if id(p) in self.embeddings else self.bits
                if bits == 32 or p.numel() < 4096:
                    st["s1"] = self._buffer(p, torch.float32)
                    st["s2"] = self._buffer(p, torch.float32)
                else:
                    if "qmap" not in self.state:
                        self.state["qmap"] = (torch.empty(256, device=p.device), torch.empty(256, device=p.device))
                    st["s1"] = self._buffer(p, torch.uint8)
                    st["s2"] = self._buffer(p, torch.uint8)
                    blocks = (p.numel() + 255) // 256
                    st["a1"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
                    st["a2"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
                self.state[id(p)] = st


def _trainer_groups(model):
    """Trainer.create_optimizer's two groups: decay and no-decay (biases, norms), trainable only."""
    import re

    import torch

    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    ln_params = set()
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            ln_params |= {id(p) for p in mod.parameters(recurse=False)}
    decay, nodecay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in ln_params or any(re.search(f, n.lower()) for f in forbidden):
            nodecay.append(p)
        else:
            decay.append(p)
    return [g for g in (decay, nodecay) if g]


def _make_optimizer(model, optim: str):
    import torch

    groups = _trainer_groups(model)
    pg = [{"params": g, "weight_decay": 0.0} for g in groups]
    if optim == "adamw_torch":
        return torch.optim.AdamW(pg, lr=5e-5, foreach=True)
    if optim == "adamw_torch_fused":
        opt = torch.optim.AdamW(pg, lr=5e-5, foreach=False)
        for g in opt.param_groups:
            g["fused"] = True
            g["foreach"] = False
        return opt
    if optim == "sgd":
        return torch.optim.SGD(pg, lr=5e-5, foreach=True)
    if optim in ("adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        return _Bnb8bitEmulation(groups, paged=optim.startswith("paged"), bits=32 if "32bit" in optim else 8,
                                 embeddings=emb)
    if optim == "adafactor":  # Trainer: scale_parameter=False, relative_step=False
        from transformers.optimization import Adafactor

        return Adafactor(pg, lr=5e-5, scale_parameter=False, relative_step=False)
    raise Unsupported(f"optimizer {optim}")


# --------------------------------------------------------------------------- the run


FOREACH_CHUNK = 65536  # multi_tensor_apply's kChunkSize (ForeachReduceOp.cu's chunked norm)


def _foreach_norm(grads):
    """torch._foreach_norm(grads, 2) on CUDA (ForeachReduceOp.cu): an fp32 intermediate of
    ntensors x max_chunks_per_tensor partial norms (at::zeros), then one 0-dim result per tensor in
    the gradients' dtype; the intermediate freed when the op returns."""
    import torch

    chunks = max(-(-g.numel() // FOREACH_CHUNK) for g in grads)
    partial = torch.zeros((len(grads) * chunks,), dtype=torch.float32, device=grads[0].device)
    norms = [torch.empty((), dtype=g.dtype, device=g.device) for g in grads]
    del partial
    return norms


def _clip_grad_norm(params, max_norm):
    """clip_grad_norm_'s CUDA path (Trainer -> accelerate -> torch.nn.utils.clip_grad_norm_, foreach
    by default on CUDA): _foreach_norm per (device, dtype) group, their stacked norm, the clamped
    coefficient, _foreach_mul_ of the gradients in place."""
    import torch

    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        groups = {}
        for g in grads:  # _group_tensors_by_device_and_dtype: first-seen order
            groups.setdefault(g.dtype, []).append(g)
        norms = [n for group in groups.values() for n in _foreach_norm(group)]
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        del norms
        coef = max_norm / (total + 1e-6)
        clamped = torch.clamp(coef, max=1.0)
        for g in grads:
            g.mul_(clamped)


def _outputs_to_fp32(out):
    """accelerate's convert_outputs_to_fp32, which Accelerator.prepare_model wraps around the model's
    forward under mixed precision (native_amp: the Trainer's bf16/fp16): after autocast exits, every
    fp16/bf16 tensor of the output (the logits) is copied to fp32 (`tensor.float()`) into a new
    output object; the 16-bit originals die with the old one, the fp32 copies when compute_loss
    drops the outputs.  A transient fp32 logits tensor beside the loss's own fp32 copy and
    log-softmax, seen in the H100 memory history of llama-3.2-1b bf16-mixed
    (benchmarks/results/h100-2026-11-23-memory-history/b099647bb0f0.json.gz: one 1002 MiB
    allocation per step from the Trainer's model call)."""
    from accelerate.utils import convert_to_fp32

    return convert_to_fp32(out)


def _fused_ok():
    """Let torch's fused AdamW run on meta tensors (its constructor rejects the device)."""
    import torch.optim.adam as adam_mod  # noqa: F401
    import torch.optim.optimizer as opt_mod

    orig = opt_mod._get_fused_kernels_supported_devices
    opt_mod._get_fused_kernels_supported_devices = lambda: list(orig()) + ["meta"]
    return orig


# --------------------------------------------------------------------------- evaluation and saving

QUANT_STATE_CODE = 256 * 4  # bitsandbytes' nested (double-quant) code: 256 fp32 values


@contextlib.contextmanager
def _no_writes():
    """transformers' and peft's safetensors writers replaced by no-ops for `save_pretrained` on the
    meta device: the writer only copies each tensor to the host (safetensors' `_tobytes`:
    `tensor.to("cpu")`), so what a save allocates on the GPU is what the code before it does to the
    state dict (transformers' `tensor.contiguous()` per shard and the MoE experts' reverted weight
    conversions, peft's clones of shared tensors and `contiguous()`), all of which runs for real.
    Their `id_tensor_storage` tells storages apart by address, and every meta storage has address 0
    (all same-sized tensors would look shared, and peft would clone them): here by the storage itself."""
    import importlib

    def storage_id(tensor):
        from transformers.pytorch_utils import storage_size

        return tensor.device, tensor.untyped_storage()._cdata, storage_size(tensor)

    patched = []
    for name in ("transformers.modeling_utils", "peft.peft_model"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr, value in (("safe_save_file", lambda *args, **kwargs: None), ("id_tensor_storage", storage_id)):
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, value)
    try:
        yield
    finally:
        for mod, attr, value in reversed(patched):
            setattr(mod, attr, value)


def _save_checkpoint(rec, model, quantized: int, marks: dict) -> None:
    """A Trainer checkpoint as vramfit train saves them (trl's SFTTrainer: `_save_checkpoint`), then
    `load_best_model_at_end`:
    - `save_model` -> `save_pretrained` (the adapter for LoRA / QLoRA, else the model), run for real on
      the meta device without the file writes (`_no_writes`); QLoRA: the base model's state dict that
      peft filters the adapter from holds, per 4-bit layer, bitsandbytes' `QuantState.as_dict(packed=True)`
      with `state2.code.clone()` (1 KiB on the GPU each, freed with the state dict, in its order);
    - the optimizer's and scheduler's state dicts through `torch.save`, which copies each storage to
      the host (nothing on the GPU), and the RNG states (host tensors): nothing recorded;
    - LoRA / QLoRA at the end of training: `_load_best_model` -> peft's `load_adapter` loads the best
      checkpoint's adapter onto the GPU (safetensors `load_file(device="cuda")`), copies it into the
      model and frees it (the dict dies in its order); a full model's best checkpoint is loaded on the
      host and copied in place (nothing on the GPU).  The adapter is loaded here layer by layer
      (safetensors sorts the names, layers.10 before layers.2): the same blocks in another order.
    The allocations are ops on the parameters (new_empty / empty_like), so the template builder's
    recorder tags them by layer (`param_phase`, as for the optimizer)."""
    import tempfile

    import torch
    from transformers.core_model_loading import dot_natural_key
    from transformers.utils import logging as hf_logging

    marks["save"] = len(rec.events)
    if hasattr(rec, "param_phase"):  # vramfit.memory.template_record's recorder: tag ops by their parameters
        rec.ctx, rec.param_phase = None, True
    if quantized:
        clones = [m.weight.new_empty((QUANT_STATE_CODE // 4,), dtype=torch.float32) for m in model.modules()
                  if type(m).__name__ == "_Meta4bitLinear"]
        while clones:
            clones.pop(0)
    # state_dict() detaches every tensor: a view, no allocation, also of a storage the recorder holds
    # under another id (a 4-bit layer's stand-in weight: its packed bytes were recorded at the load)
    held = [t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())]
    held = [k for k in dict.fromkeys(held) if k not in rec.live]
    for k in held:
        rec.live[k] = -1
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards"
    try:
        with tempfile.TemporaryDirectory() as out, _no_writes():
            model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        for k in held:
            if rec.live.get(k) == -1:
                del rec.live[k]
    adapters = sorted(((n, p) for n, p in model.named_parameters() if "lora_" in n),
                      key=lambda item: dot_natural_key(item[0]))
    if adapters:
        marks["save.load_best"] = len(rec.events)
        loaded = [torch.empty_like(p) for _, p in adapters]
        while loaded:
            loaded.pop(0)
