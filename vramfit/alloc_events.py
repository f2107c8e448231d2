"""The allocation events of a real training run, at full size, on the meta device.

A `TorchDispatchMode` sees every op a training step runs (forward with labels, backward,
gradient clipping, the optimizer step, zero_grad) and records each new output storage as an
allocation ("a", id, nbytes); a `weakref.finalize` on the storage records its free ("f", id)
when the last reference dies, in the order the real run frees it.  What the meta device does
not do as CUDA does is emulated:
- model load: every parameter and buffer allocated in creation order; a tied LM head's own
  weight allocated and freed (transformers builds it, then ties it to the embeddings);
- scaled_dot_product_attention: the flash kernel's forward (output laid out like q, fp32
  log-sum-exp) and backward (dq, dk, dv like q, k, v; then fp32 softmax_d and dq_accum and GQA's
  expanded dk/dv as one block) as torch's flash attention allocates them; fp32 runs the
  memory-efficient kernel, approximated by the same buffers without dq_accum; fp32 with grouped
  KV heads runs the math path for real (as trace.py);
- autocast (trace.py's emulation: an op's arguments cast last to first, as CUDA's; its
  weight-cast cache cleared at the end of each forward);
- CUDA's bool dropout masks;
- cuBLAS: one 32 MiB workspace for the forward thread's handle at the first matmul (before its
  output) and one for the autograd thread's at the first matmul of the first backward (after that
  matmul's output), never freed;
- bitsandbytes 8-bit / paged optimizers: their states as `Optimizer8bit.init_state` allocates them
  (paged tensors of >= 1e5 elements live in managed memory, outside torch's allocator) and no
  temporaries (the update kernels work in place);
- torch's fused AdamW on a device the constructor does not accept (the meta device).
- QLoRA (bitsandbytes 0.50.2, transformers 5.23, peft 0.21): the 4-bit load (each bf16 weight
  quantized on the GPU with its transient buffers), prepare_model_for_kbit_training's fp32 casts
  and empty_cache, gemm_4bit's dequantize + F.linear forward and dequantize + matmul backward, and
  peft's Linear4bit LoRA forward (base output cloned); see `_qlora_load`, `_qlora_linear_forward`.
Left out: GradScaler's scalars under 16-mixed.
"""

from __future__ import annotations

import contextlib
import weakref

from vramfit.cuda_reduce import H100_SMS

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

    from vramfit.cuda_reduce import reduce_buffers

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


class Unsupported(Exception):
    pass


def _same_dense(args) -> bool:
    """Two tensors alike (shape, dtype, each its storage's only, dense contents): an InputBuffer sum."""
    import torch

    if len(args) != 2 or not all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in args):
        return False
    a, b = args
    return (a.shape == b.shape and a.dtype == b.dtype and all(
        t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        for t in (a, b)))


def _sum_in_place(events: list, sums: list, marks: dict) -> list:
    """Autograd's gradient accumulation as CUDA runs it.  InputBuffer::accumulate adds in place
    (old_var.add_(var)) when it holds the last reference to the first gradient; under a Python
    dispatch mode (the recorder) every tensor counts as a subclass and it always adds out of place.
    So: a backward add of two alike tensors whose first operand dies before the next allocation
    (the engine dropped its last reference) is replayed as that operand's block taking the sum --
    no new block -- and the sum's later free frees that block.  Only the first operand: CUDA's
    other branch (var.add_(old_var)) would also take a tied LM head's embedding gradient, and the
    replays of llama-3.2-1b bf16-true Adafactor and 32-true fused AdamW (exact out of place) then
    miss by -7.6% and -3.6%.  Replayed on all 197 measured runs (2026-12-06): under-predictions
    over 2% 8 -> 5 (llama-3.2-1b bf16-mixed Adafactor -5.3% -> 0.0% on the H100 and the H200, phi-3
    Adafactor -2.0% -> -1.2%, llama-3.2-1b bf16-mixed fused / 8-bit AdamW +3.8% / +5.0% -> 0.0%);
    one over-prediction grew: qwen2.5-7b (6 layers) bf16-mixed AdamW -0.9% -> +3.7%."""
    drop, rename = set(), {}
    size = {ev[1]: ev[2] for ev in events if ev[0] == "a"} if sums else {}
    for at, out_id, first in sums:
        if events[at][:2] != ("a", out_id):
            continue
        freed = {}
        for j in range(at + 1, len(events)):
            if events[j][0] != "f":
                break
            freed[events[j][1]] = j
        j = freed.get(first)
        if j is not None and j not in drop and size.get(first) == events[at][2]:
            drop.update((at, j))
            rename[out_id] = first
    if not drop:
        return events
    out, shift, new_index = [], 0, {}
    for i, ev in enumerate(events):
        new_index[i] = i - shift
        if i in drop:
            shift += 1
            continue
        if ev[0] == "f" and ev[1] in rename:
            target = ev[1]
            while target in rename:
                target = rename[target]
            ev = ("f", target)
        out.append(ev)
    for k, v in marks.items():
        marks[k] = new_index.get(v, len(out))
    return out


def _recorder_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.events = []
            self.live = {}
            self.next_id = 0
            self.backward = False
            self.workspaces = set()
            self._finalizers = []
            self.num_sms = H100_SMS
            self.sums = []  # backward adds that may be autograd's gradient accumulation (see _sum_in_place)

        def alloc(self, nbytes):
            i = self.next_id
            self.next_id += 1
            self.events.append(("a", i, nbytes))
            return i

        def free(self, i):
            self.events.append(("f", i))

        def track(self, t):
            if not isinstance(t, torch.Tensor) or t.device.type != "meta":
                return
            st = t.untyped_storage()
            key = st._cdata
            if key in self.live:
                return
            n = st.nbytes()
            if n == 0:
                return
            i = self.alloc(n)
            self.live[key] = i
            weakref.finalize(st, self._dead, key, i)

        def _dead(self, key, i):
            if self.live.get(key) == i:
                del self.live[key]
            self.events.append(("f", i))

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0] if hasattr(func, "__name__") else ""
            if name in _MATMULS and not self.backward and "fwd" not in self.workspaces:
                # the forward thread's handle: its workspace comes before the first matmul's output
                self.workspaces.add("fwd")
                self.alloc(CUBLAS_WORKSPACE)
            first = None  # the block a gradient sum may go into (_sum_in_place)
            # the engine sums without grad (checkpoint's recompute, a forward, runs with it); a view
            # keeps its base, and so its storage, alive: never summed into
            if (self.backward and func is torch.ops.aten.add.Tensor and not kwargs and not torch.is_grad_enabled()
                    and _same_dense(args) and not args[0]._is_view()):
                first = self.live.get(args[0].untyped_storage()._cdata)
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                self.track(t)
            if first is not None and out.untyped_storage()._cdata in self.live:
                self.sums.append((len(self.events) - 1, self.live[out.untyped_storage()._cdata], first))
            if name in _MATMULS and self.backward and "bwd" not in self.workspaces:
                # the autograd thread's handle: its workspace is taken inside the first backward gemm,
                # after the op allocated its output (the H100 memory histories: lm_head's weight
                # gradient, then 32 MiB).  The histories show the forward's first workspace after
                # its output too (the first q_proj's bf16 output, then 32 MiB), but replaying that
                # order moves pythia-410m and tinyllama-1.1b QLoRA runs (no history) from -1.17% to
                # -2.55% and from +2.42% to -3.63% device error, so the forward keeps the old order.
                self.workspaces.add("bwd")
                self.alloc(CUBLAS_WORKSPACE)
            for staging, semaphores in _reduction_buffers(name, args, self.num_sms):
                b, s = self.alloc(staging), self.alloc(semaphores)
                self.free(s)  # the DataPtrs die in reverse order
                self.free(b)
            # the kernel's own temporaries come after its output (a structured op allocates its
            # output first; _safe_softmax's softmax before its mask), as the H100 recordings order them
            for i in [self.alloc(n) for n in _internal_temporaries(name, args)]:
                self.free(i)
            return out

    return Recorder


# --------------------------------------------------------------------------- QLoRA (bitsandbytes 4-bit)

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
            requires_conversion = not torch.is_autocast_enabled()
            if requires_conversion:
                expected_dtype = result.dtype
                x = self._cast_input_dtype(x, lora_A.weight.dtype)
            output = lora_B(lora_A(dropout(x))) * scaling
            if requires_conversion:
                output = output.to(expected_dtype)
            result = result + output
        return result

    return base_forward, forward


def _qlora_load(rec, model, base_model, quantized: dict) -> None:
    """from_pretrained(quantization_config=nf4 + double quant, dtype=bf16, device_map GPU) of a
    bf16 checkpoint, then prepare_model_for_kbit_training: checkpoint tensors one at a time in
    natural key order (transformers loads synchronously when it quantizes on the fly), each on the
    GPU in bf16, the quantized ones quantized and their bf16 copy freed; buffers; then every
    non-quantized param cast to fp32 (new storage, old freed) and torch.cuda.empty_cache()."""
    from transformers.core_model_loading import dot_natural_key

    named = {}
    for n, p in base_model.named_parameters():
        if "lora_" in n:
            continue
        named[n.replace(".base_layer.", ".")] = p
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
        if id(p) in bf16_ids:
            new = rec.alloc(p.untyped_storage().nbytes())  # already fp32 in the meta model
            rec.free(bf16_ids.pop(id(p)))
            rec.live[p.untyped_storage()._cdata] = new
    rec.events.append(("e",))
    for n, p in model.named_parameters():  # peft: adapters built on the CPU, moved to the GPU
        if "lora_" in n:
            rec.live[p.untyped_storage()._cdata] = rec.alloc(p.untyped_storage().nbytes())


@contextlib.contextmanager
def _trl_fused_kernels():
    """trl's fused LM head as it runs on a GPU, on the meta device: its Triton kernels fold each
    tile in place (nothing allocated) and the fp32 gradient GEMMs accumulate in place."""
    import types

    from trl.kernels import chunked_logprob as kern

    class _NoKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = {name: getattr(kern, name, None) for name in ("_use_triton", "_forward_kernel", "_backward_kernel",
                                                          "_addmm_fp32", "triton")}
    import torch

    is_autocast = torch.is_autocast_enabled
    # the kernel asks autocast about the tensors' device, which has no autocast on meta: no autocast
    # is what a run without mixed precision has (mixed precision is refused before this)
    torch.is_autocast_enabled = lambda *a: False if a and a[0] == "meta" else is_autocast(*a)
    kern._use_triton = lambda device: True
    kern._forward_kernel = kern._backward_kernel = _NoKernel()
    kern._addmm_fp32 = lambda acc, a, b: None
    if saved["triton"] is None:
        kern.triton = types.SimpleNamespace(cdiv=lambda a, b: -(-a // b))
    try:
        yield
    finally:
        torch.is_autocast_enabled = is_autocast
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


def training_events(spec, setup, targets=(), steps: int = 3, seq_lens=None, grad_accum: int = 1) -> dict:
    """Allocation events of `steps` Trainer steps of `setup` on `spec`, and where each phase starts.
    `seq_lens`: each step's padded batch length (real data: the longest row of each batch); default
    `setup.seq_len` for every step.  `grad_accum`: micro-batches per
    optimizer step, each a forward and a backward whose gradients add into the ones kept from the
    micro-batch before (marks `stepN.microM.forward` / `.backward` from the second on)."""
    import copy

    import torch

    from vramfit import trace
    from vramfit.api import trace_key
    from vramfit.spec import config_from_dict

    # 16-mixed: GradScaler's own tensors (scale, found_inf: a few scalars) are left out
    key = trace_key(spec, setup, targets)
    config = config_from_dict(copy.deepcopy(spec.config))
    config.use_cache = False
    qlora = setup.method == "qlora"
    with trace._quiet():
        model = trace._prepare_model(config, key, spec, conv1d_4bit=True)
    Recorder = _recorder_class()
    rec = Recorder()
    marks = {}
    in_emb = model.get_input_embeddings()

    if qlora:
        import types

        base_model = model.get_base_model()
        quantized = {id(m.weight): None for m in base_model.modules() if type(m).__name__ == "_Meta4bitLinear"}
        _qlora_load(rec, model, base_model, quantized)
        base_fwd, lora_fwd = _qlora_linear_forward(rec, torch.bfloat16)  # bnb_4bit_compute_dtype
        for m in base_model.modules():
            base = getattr(m, "base_layer", None)
            if base is not None and id(getattr(base, "weight", None)) in quantized and hasattr(m, "lora_A"):
                m.forward = types.MethodType(lora_fwd, m)
            elif id(getattr(m, "weight", None)) in quantized and not hasattr(m, "base_layer"):
                m.forward = types.MethodType(base_fwd, m)
    # ---- load: parameters and buffers in creation order
    lora = [] if qlora else [p for n, p in model.named_parameters() if "lora_" in n]
    lora_ids = {id(p) for p in lora}
    base = [] if qlora else [p for p in model.parameters() if id(p) not in lora_ids]
    out_emb = model.get_output_embeddings()
    tied = not qlora and out_emb is not None and out_emb.weight is in_emb.weight
    for t in base + ([] if qlora else [b for b in model.buffers() if b.device.type == "meta"]):
        st = t.untyped_storage()
        if st._cdata not in rec.live and st.nbytes():
            rec.live[st._cdata] = rec.alloc(st.nbytes())
    if tied:  # the LM head's own weight, built then replaced by the tie
        rec.free(rec.alloc(out_emb.weight.untyped_storage().nbytes()))
    # A tied weight's two gradients (lm_head's, then the embedding's) meet in autograd's InputBuffer:
    # under mixed precision lm_head's is autocast's fresh fp32 copy and the embedding's is added into
    # it in place (the H100 memory history of llama-3.2-1b bf16-mixed, benchmarks/results/h100-2026-11-23-
    # memory-history/b099647bb0f0.json.gz, frees the embedding's 1002 MiB gradient right after it is
    # made); _sum_in_place replays that, with every other accumulation of the backward.
    for p in lora:  # peft: adapters built on the CPU, moved to the base layer's device
        st = p.untyped_storage()
        rec.live[st._cdata] = rec.alloc(st.nbytes())
    marks["after_load"] = len(rec.events)
    # Trainer.train -> _inner_training_loop begins with accelerator.free_memory(): gc.collect() and
    # torch.cuda.empty_cache(), releasing the segments load left free (a tied LM head's discarded
    # weight: 1002 MiB of llama-3.2-1b's 6008 MiB reserved after load, 4958 MiB after setup, measured)
    rec.events.append(("e",))

    if setup.grad_ckpt:
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # torch's checkpoint re-enters autocast for the recompute: a fresh emulation (its own cache)
        import functools

        from torch.utils.checkpoint import checkpoint

        ckpt_dtype = getattr(torch, key.autocast_dtype) if key.autocast_dtype else None

        def ctx_fn():
            recompute = trace._autocast_mode(ckpt_dtype) if ckpt_dtype is not None else contextlib.nullcontext()
            return contextlib.nullcontext(), recompute

        for mod in base_model.modules():
            if getattr(mod, "_gradient_checkpointing_func", None) is not None:
                mod._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False, context_fn=ctx_fn)
        if setup.method != "full":
            in_emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    fused_loss = setup.loss == "fused"
    if fused_loss:  # what trl's SFTTrainer does to the model (vramfit train)
        if key.autocast_dtype:
            raise Unsupported("trl's fused loss under autocast (its tile dtype follows CUDA autocast)")
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # trl imports it: its CPU-kernel notice
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model,
                          outputs=("log_probs", "entropy", "is_top1"))
    model.train()

    orig_fused = _fused_ok() if setup.optim == "adamw_torch_fused" else None
    try:
        opt = _make_optimizer(model, setup.optim)
        ac_dtype = getattr(torch, key.autocast_dtype) if key.autocast_dtype else None
        B, S = setup.micro_batch, setup.seq_len
        params = [p for p in model.parameters() if p.requires_grad]
        kernels = _trl_fused_kernels() if fused_loss else contextlib.nullcontext()
        with rec, trace._patched_sdpa(key.attn != "eager", ac_dtype, key.kv_repeated), trace._quiet(), kernels:
            accum = max(1, grad_accum)
            for step in range(len(seq_lens) if seq_lens else steps):
                S = seq_lens[step] if seq_lens else setup.seq_len
                for micro in range(accum):
                    at = f"step{step}" if micro == 0 else f"step{step}.micro{micro}"
                    marks[f"{at}.forward"] = len(rec.events)
                    ids = torch.zeros((B, S), dtype=torch.long, device="meta")
                    # the batch's attention_mask, moved to the GPU with it; all ones, so with sdpa the
                    # model (given none) builds the same causal attention; eager joins it to the causal
                    # mask as a (B, 1, S, S) bool (H100 memory history of smollm2-135m eager), so it
                    # gets it
                    mask = torch.ones((B, S), dtype=torch.long, device="meta")
                    labels = torch.zeros((B, S), dtype=torch.long, device="meta")
                    rec.backward = False
                    ac = trace._autocast_mode(ac_dtype) if ac_dtype is not None else contextlib.nullcontext()
                    with ac:
                        extra = {"fused_lm_head": True} if fused_loss else {}
                        if key.attn == "eager":  # the padding mask joins the causal one: a (B, 1, S, S) bool
                            extra["attention_mask"] = mask
                        out = model(input_ids=ids, labels=labels, **extra)
                    if ac_dtype is not None:
                        out = _outputs_to_fp32(out)
                    loss = out.loss if accum == 1 else out.loss / accum  # the Trainer's scaling
                    del out, ac
                    marks[f"{at}.backward"] = len(rec.events)
                    rec.backward = True
                    loss.backward()
                    del loss, ids, mask, labels
                    rec.backward = False
                marks[f"step{step}.clip"] = len(rec.events)
                _clip_grad_norm(params, 1.0)
                marks[f"step{step}.optimizer"] = len(rec.events)
                opt.step()
                marks[f"step{step}.post_step"] = len(rec.events)
                for p in params:
                    p.grad = None
        marks["end"] = len(rec.events)
    finally:
        if orig_fused is not None:
            import torch.optim.optimizer as opt_mod

            opt_mod._get_fused_kernels_supported_devices = orig_fused
    return {"events": _sum_in_place(rec.events, rec.sums, marks), "marks": marks}
