"""The field's memory levers in the allocation replay (vramfit.memory.events), issue 20: what each
allocates on the GPU, recorded as the real code runs it on the meta device.

- liger (`TrainingArguments(use_liger_kernel=True)`): transformers' `apply_liger_kernel` runs liger-kernel's
  own `_apply_liger_kernel_to_instance` on the (PEFT-unwrapped) model when training starts; here too.
  Liger's Python autograd Functions then run for real (RMSNorm, SwiGLU, RoPE, and under the model's own
  loss the fused linear cross-entropy forward `lce_forward`: no (tokens x vocab) logits; the input's
  gradient is computed IN THE FORWARD, chunk by chunk, and kept for the backward); only their Triton
  kernels are no-ops (they write into tensors the Python code allocated: nothing of theirs is
  allocated by torch).  Where liger asks the device what it is (`device.type == "cuda"`, the SM count,
  the compute capability) the meta device answers as an H100 would (`_CudaLike`).  Under trl's
  SFTTrainer (`loss="fused"`) the fused linear cross-entropy is off (trl keeps its own fused head)
  and only the layer kernels are applied, as SFTTrainer configures liger.  liger-kernel imports
  Triton when imported; a CPU machine has none, so a permissive stand-in module (`_triton_stub`) is
  put in `sys.modules` for the import only and taken out again: its `@triton.jit` kernels are
  no-ops, `triton.cdiv` / `next_power_of_2` compute.  With a real Triton (a GPU machine) the
  kernels are swapped for no-ops while recording.  Module-level patches liger makes to transformers
  (`modeling_llama.apply_rotary_pos_emb = liger_rotary_pos_emb`, the RMSNorm / MLP classes) are
  undone when the recording ends, so no later (lever-free) replay in the process sees them.
- packing (trl `SFTConfig(packing=True)`, BFD, padding-free): a micro-batch is ONE row of
  micro_batch x seq_len tokens (trl's DataCollatorForLanguageModeling(padding_free=True): input_ids,
  labels, position_ids restarting at each example, cu_seq_lens_q / _k, seq_idx; no attention_mask),
  examples of `example_len` tokens on average (`Setup.extras["example_len"]`, default 256).  From the
  position_ids transformers' masking_utils finds the packed sequences (`find_packed_sequence_indices`,
  recorded with its allocations; its data-dependent "one sequence only" test answered from the
  setup) and builds a block-diagonal causal (1, 1, T, T) bool mask for SDPA, shared by the layers.
  With a mask no flash kernel runs: torch's SDPA takes the memory-efficient kernel, after converting
  the bool mask into an additive one in the query's dtype (`at::where`, T x T, per layer call), which
  the kernel's autograd node keeps for the backward; transformers repeats grouped KV heads when a
  mask is given (real code).  `_mem_efficient_sdpa` records that.
- activation_offloading (trl `SFTConfig(activation_offloading=True)`): trl's
  `get_act_offloading_ctx_manager(model)` (run for real: its output-head no-op hooks) with its
  `OffloadActivations` replaced by `_OffloadEmulation`, the same logic (trl 1.16, streams on) with
  host copies as sizes: each saved tensor of >= 1024 bytes that is not a parameter is copied to pinned
  host memory (non-contiguous ones first made contiguous on the GPU) and its GPU storage is held only
  by the forward stash of the last 5 offloaded tensors; one whose storage is already tracked stays on
  the GPU; in the backward a tensor still in the stash is used as is, the others are brought back
  (a new GPU block on the copy stream), kept until the next autograd node that unpacks has run (or
  the end of the backward).  The context is entered per training step (SFTTrainer.training_step: an
  empty_cache, since bitsandbytes is imported) and exited after the backward.  Pinned host memory is
  counted as torch's CachingHostAllocator holds it (blocks rounded up to powers of two, cached and
  reused, never released): `host()`.
"""

from __future__ import annotations

import contextlib
import sys

EXAMPLE_LEN = 256  # average packed example length (tokens) where Setup.extras gives none
OFFLOAD_MIN_BYTES = 1024  # trl get_act_offloading_ctx_manager's min_offload_size
OFFLOAD_STASH = 5  # its max_fwd_stash_size
OFFLOAD_ADDRESSES = True  # trl's storage keys by the allocator model's addresses (see _OffloadEmulation)
H100_SMS = 132
H100_CAPABILITY = (9, 0)
TRITON_IMPL = "nvidia-triton"  # liger's op registry's choice on an H100 (its CUDA-DSL extras not installed)
MEM_EFF_ALIGN = 8  # SDPA's preprocess_mask: the bias's strides (but the last) multiples of this, else padded
LSE_ALIGN = 32  # its log-sum-exp rows are padded to this (kAlignLSE)
_LEVER_SOURCES = ("memory/levers.py",)


def any_lever(setup) -> bool:
    return bool(setup.liger or setup.packing or setup.activation_offloading)


def example_len(setup) -> int:
    value = (setup.extras or {}).get("example_len") or EXAMPLE_LEN
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        from vramfit.errors import VramfitError

        raise VramfitError(f"example_len must be a positive number of tokens, got {value!r}")
    return int(round(value))


def packed_sequences(setup) -> int:
    """Examples in one packed micro-batch (micro_batch rows of seq_len tokens, examples of example_len
    on average, each row's last one truncated to fill it)."""
    return setup.micro_batch * -(-setup.seq_len // example_len(setup))


def _digest() -> str:
    import hashlib
    from pathlib import Path

    global _DIGEST
    if _DIGEST is None:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for rel in _LEVER_SOURCES:
            h.update((root / rel).read_bytes())
        _DIGEST = h.hexdigest()[:16]
    return _DIGEST


_DIGEST = None


def cache_part(setup) -> tuple:
    """What in-process caches keyed by a Setup must add: its extras do not take part in its equality,
    and packing's example length is one of them."""
    return (example_len(setup),) if setup.packing else ()


def key_part(setup) -> tuple:
    """What an event template's key adds for the levers: nothing without one (the key of a lever-free
    setup is the same as before the levers existed); with one, the levers, packing's example length and
    whether the packed micro-batch is one sequence (no mask then), liger-kernel's version and this
    module's code (its edits rebuild only the lever templates)."""
    if not any_lever(setup):
        return ()
    from vramfit.versions import installed

    single = setup.packing and (packed_sequences(setup) == 1 or setup.attn == "flash_attention_2")
    return (("levers", setup.liger, setup.packing, setup.activation_offloading,
             example_len(setup) if setup.packing else 0, single,
             installed("liger-kernel") if setup.liger else {}, _digest()),)


# --------------------------------------------------------------------------- the recording's context


class Levers:
    """The levers of `setup` around `training_events`' steps (a context manager), its packed batches
    (`batch`), and activation offloading's per-step context (`step_begin` / `step_end`)."""

    def __init__(self, rec, model, setup, autocast_dtype=None):
        self.rec, self.model, self.setup, self.ac_dtype = rec, model, setup, autocast_dtype
        self.packed = setup.packing
        self.offload = None
        self.pinned = _PinnedHost()
        self._stack = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        try:
            if self.setup.liger:
                self._stack.enter_context(_liger(self.model, self.setup, self.ac_dtype))
            if self.setup.packing:
                self._stack.enter_context(_packing(self.setup, self.ac_dtype))
            if self.setup.activation_offloading:
                addresses = None
                if OFFLOAD_ADDRESSES:
                    addresses = _Addresses(self.rec, self.setup.allocator == "expandable")
                    addresses.events = self.rec.events
                self.offload = _make_offloading(self.model, self.rec, self.pinned, addresses)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def batch(self, B: int, S: int) -> tuple:
        """trl's padding-free collator's micro-batch on the GPU (Trainer._prepare_inputs moves its
        tensors in the collator's order): (input_ids, None, labels, {position_ids, cu_seq_lens_q,
        cu_seq_lens_k, max_length_q, max_length_k, seq_idx})."""
        import torch

        T = B * S
        n = B * -(-S // example_len(self.setup))
        ids = torch.zeros((1, T), dtype=torch.long, device="meta")
        labels = torch.zeros((1, T), dtype=torch.long, device="meta")
        pos = torch.zeros((1, T), dtype=torch.long, device="meta")
        cu_q = torch.zeros((n + 1,), dtype=torch.int32, device="meta")
        cu_k = torch.zeros((n + 1,), dtype=torch.int32, device="meta")
        seq_idx = torch.zeros((1, T), dtype=torch.int32, device="meta")
        longest = min(S, 4 * example_len(self.setup))
        return ids, None, labels, {"position_ids": pos, "cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k,
                                   "max_length_q": longest, "max_length_k": longest, "seq_idx": seq_idx}

    def step_begin(self) -> None:
        if self.offload is not None:
            # trl's bookkeeping compares storage reference counts (its backward hooks): Python's cyclic
            # garbage collector, run at moments that vary from process to process, would make the
            # recording vary with them; it runs between the steps instead
            import gc

            self._gc = gc.isenabled()
            gc.disable()
            self.offload.__enter__()

    def step_end(self) -> None:
        if self.offload is not None:
            import gc

            self.offload.__exit__(None, None, None)
            gc.collect()
            if self._gc:
                gc.enable()

    def host(self) -> dict | None:
        """Pinned host memory of activation offloading: {"pinned_bytes": what the caching host
        allocator holds at the end (its peak: it never releases), "peak_live_bytes": the largest
        sum of live host copies, "offloaded_bytes": bytes copied to the host over the run}; None
        without offloading."""
        return self.pinned.summary() if self.setup.activation_offloading else None


# --------------------------------------------------------------------------- liger-kernel


class _AnyStub:
    """Whatever a Triton attribute is asked for at liger's import (decorators, tl.constexpr, configs):
    callable, subscriptable ([grid] -> a no-op launcher), falsy."""

    def __init__(self, name="triton"):
        self._name = name

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return _NoKernel(args[0])
        return _AnyStub(self._name + "()")

    def __getitem__(self, grid):
        return _no_launch

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyStub(f"{self._name}.{name}")

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __repr__(self):
        return f"<triton stand-in {self._name}>"


def _no_launch(*args, **kwargs):
    return None


class _NoKernel:
    """A Triton kernel that does nothing: `kernel[grid](...)` launches nothing (its outputs were
    allocated by the Python code around it)."""

    def __init__(self, fn=None):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid):
        return _no_launch

    def __call__(self, *args, **kwargs):
        return None

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyStub(name)


def _triton_stub():
    """A meta-path finder making `triton` and every `triton.*` a stand-in module (`_AnyStub`
    attributes; `cdiv`, `next_power_of_2` and `__version__` real)."""
    import importlib.abc
    import importlib.machinery
    import types

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _AnyStub(f"{self.__name__}.{name}")

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "triton" or name.startswith("triton."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            m = _Module(spec.name)
            m.__path__ = []
            if spec.name == "triton":
                m.__version__ = "3.5.0"
                m.cdiv = lambda a, b: -(-a // b)
                m.next_power_of_2 = lambda n: 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
            return m

        def exec_module(self, module):
            pass

    return _Finder()


def import_liger():
    """liger_kernel.transformers' instance patcher, importing liger-kernel (with `_triton_stub`
    where Triton is not installed; the stand-in leaves sys.modules once liger is imported)."""
    import importlib.util

    if "liger_kernel.transformers.monkey_patch" in sys.modules:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        return _apply_liger_kernel_to_instance
    if importlib.util.find_spec("liger_kernel") is None:
        from vramfit.memory.kernels import Unsupported

        raise Unsupported("liger-kernel (not installed: pip install 'vramfit[levers]')")
    stub = None
    if importlib.util.find_spec("triton") is None:
        stub = _triton_stub()
        sys.meta_path.insert(0, stub)
    try:
        import logging
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            level = logging.getLogger("liger_kernel").level
            logging.getLogger("liger_kernel").setLevel(logging.ERROR)
            try:
                from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
                # the op registry imports its implementations on first use: import them all now, under
                # the stand-in (those needing CUDA-only packages fail and are skipped, as on a GPU without them)
                from liger_kernel.backends import registry

                for op in list(getattr(registry, "_DISCOVERY_MAP", {})):
                    try:
                        registry._discover(op)
                    except Exception:  # noqa: BLE001
                        pass
            finally:
                logging.getLogger("liger_kernel").setLevel(level)
    finally:
        if stub is not None:
            sys.meta_path.remove(stub)
            for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
                del sys.modules[name]
    return _apply_liger_kernel_to_instance


def _is_kernel(obj) -> bool:
    return type(obj).__name__ in ("JITFunction", "Autotuner", "Heuristics", "_NoKernel")


# liger's device checks, answered for the meta device as on an H100: (function, [(old, new)])
_CUDA_LIKE = {
    "liger_kernel.ops.fused_linear_cross_entropy": {
        "fused_linear_cross_entropy_forward": [
            ('grad_weight.device.type == "cuda"', 'grad_weight.device.type in ("cuda", "meta")'),
            ("target_mask.sum().item()", "_vramfit_item(target_mask.sum())"),
            ("ce_weight.sum().item()", "_vramfit_item(ce_weight.sum())"),
            (".sum().item()", ".sum().numel()"),
            ("torch.addmm(", "_vramfit_addmm("),
        ],
        "fused_linear_cross_entropy_backward": [("torch.equal(", "_vramfit_equal(")],
    },
    "liger_kernel.ops.rms_norm": {
        "rms_norm_backward": [('X.device.type == "cuda"', 'X.device.type in ("cuda", "meta")')],
    },
    "liger_kernel.ops.layer_norm": {
        "layer_norm_backward": [('X.device.type == "cuda"', 'X.device.type in ("cuda", "meta")')],
    },
}


def _rewrite(mod, fname: str, edits, saved: list) -> None:
    """`mod.fname` with its source edited (`edits`) and recompiled in its module, in place (its
    __code__, so every reference sees it); the original code kept in `saved` to put back."""
    import inspect
    import textwrap

    fn = getattr(mod, fname, None)
    if fn is None or not hasattr(fn, "__code__") or fn.__code__.co_freevars:
        return
    src = textwrap.dedent(inspect.getsource(fn))
    new = src
    for old, rep in edits:
        new = new.replace(old, rep)
    if new == src:
        return
    scope: dict = {}
    exec(compile(new, inspect.getsourcefile(fn) or "<liger>", "exec"), fn.__globals__, scope)  # noqa: S102
    saved.append((fn, fn.__code__))
    fn.__code__ = scope[fname].__code__


@contextlib.contextmanager
def _liger(model, setup, autocast_dtype):
    """liger-kernel applied to the model as transformers' Trainer applies it (its config: the fused
    linear cross-entropy off under trl's fused head), its kernels no-ops, its device checks answered
    as on an H100; the module-level patches it makes to transformers undone at the end."""
    import torch

    apply = import_liger()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modeling = sys.modules.get(type(base).__module__)
    import transformers.loss.loss_utils as loss_utils

    # liger patches names in transformers' modeling modules (apply_rotary_pos_emb, the norm and MLP
    # classes; its model type's module and, for some types, others) and may patch the loss's functions
    touched = [m for name, m in list(sys.modules.items())
               if m is not None and name.startswith("transformers.models.") and ".modeling_" in name]
    touched += [m for m in (modeling, loss_utils, torch.nn.functional) if m is not None and m not in touched]
    before = [(m, dict(vars(m))) for m in touched]
    saved_code: list = []
    swapped: list = []
    patched_torch: list = []
    try:
        for name, mod in list(sys.modules.items()):
            if not name.startswith("liger_kernel.ops") or mod is None:
                continue
            for attr, value in list(vars(mod).items()):
                if _is_kernel(value) and not isinstance(value, _NoKernel):
                    swapped.append((mod, attr, value))
                    setattr(mod, attr, _NoKernel(getattr(value, "fn", None)))
        on = autocast_dtype is not None

        def can_use_mm_out(_input, weight):
            # liger's _can_use_mm_out as CUDA answers it (grad off inside the Function's forward; the
            # Trainer's autocast on during the forward)
            if _input.device.type not in ("cuda", "meta") or torch.is_grad_enabled():
                return False
            if _input.dtype != weight.dtype or _input.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return False
            return _input.dtype == autocast_dtype if on else True

        def item(t):
            return t.numel() if t.device.type == "meta" else t.item()

        def addmm(inp, a, b, out_dtype=None, out=None, **kw):
            # addmm(out_dtype=float32, out=acc) accumulates 16-bit products into the fp32 gradient in place
            # (no allocation); torch's meta kernel refuses the fp32 `out`
            if out_dtype is not None and out is not None and out.device.type == "meta":
                return out
            if out_dtype is not None:
                kw["out_dtype"] = out_dtype
            return torch.addmm(inp, a, b, out=out, **kw) if out is not None else torch.addmm(inp, a, b, **kw)

        def equal(a, b):
            if a.device.type != "meta":
                return torch.equal(a, b)
            same = (a == b).all()  # at::cuda::equal: eq, then all (their blocks, then one bool read)
            del same
            return True  # the Trainer's loss gradient is 1 (gradient accumulation scales in place: no allocation)

        for modname, funcs in _CUDA_LIKE.items():
            mod = sys.modules.get(modname)
            if mod is None:
                continue
            for fname, edits in funcs.items():
                _rewrite(mod, fname, edits, saved_code)
            for helper, value in (("_vramfit_item", item), ("_vramfit_equal", equal), ("_vramfit_addmm", addmm)):
                mod.__dict__[helper] = value
            if hasattr(mod, "_can_use_mm_out"):
                swapped.append((mod, "_can_use_mm_out", mod._can_use_mm_out))
                mod._can_use_mm_out = can_use_mm_out
        cap, props = torch.cuda.get_device_capability, torch.cuda.get_device_properties

        def capability(device=None):
            return H100_CAPABILITY if getattr(device, "type", device) == "meta" else cap(device)

        class _Props:
            multi_processor_count = H100_SMS

        def properties(device=None):
            return _Props() if getattr(device, "type", device) == "meta" else props(device)

        torch.cuda.get_device_capability, torch.cuda.get_device_properties = capability, properties
        patched_torch.append((cap, props))
        # liger's op registry picks an implementation by the device's capabilities and the importable
        # packages (Triton): on an H100 without CuTe DSL / cuTile, the Triton one ("nvidia-triton")
        from liger_kernel.backends import registry

        liger_dispatch = sys.modules["liger_kernel.backends.dispatch"]  # the package exports a function by its name

        resolve = liger_dispatch.resolve_impl

        def resolve_impl(op_name, requested=None, device=None):
            impl = registry.get_registered(op_name, requested or TRITON_IMPL)
            return impl if impl is not None else resolve(op_name, requested=requested, device=device)

        swapped.append((liger_dispatch, "resolve_impl", resolve))
        liger_dispatch.resolve_impl = resolve_impl
        config = {} if setup.loss != "fused" else {"fused_linear_cross_entropy": False}
        import logging

        level = logging.getLogger("liger_kernel").level
        logging.getLogger("liger_kernel").setLevel(logging.ERROR)
        try:
            apply(model=base, **config)
        finally:
            logging.getLogger("liger_kernel").setLevel(level)
        yield
    finally:
        for cap, props in patched_torch:
            torch.cuda.get_device_capability, torch.cuda.get_device_properties = cap, props
        for fn, code in reversed(saved_code):
            fn.__code__ = code
        for mod, attr, value in reversed(swapped):
            setattr(mod, attr, value)
        for modname in _CUDA_LIKE:
            mod = sys.modules.get(modname)
            if mod is not None:
                for helper in ("_vramfit_item", "_vramfit_equal", "_vramfit_addmm"):
                    mod.__dict__.pop(helper, None)
        for m, old in before:
            for k in [k for k in vars(m) if k not in old]:
                delattr(m, k)
            for k, v in old.items():
                if vars(m).get(k, _MISSING) is not v:
                    setattr(m, k, v)


_MISSING = object()


# --------------------------------------------------------------------------- packing


@contextlib.contextmanager
def _packing(setup, autocast_dtype=None):
    """transformers' packed-sequence detection and SDPA with the packed mask, as on CUDA."""
    import torch
    from transformers import masking_utils

    # one example: transformers finds no packed sequences (no mask: flash attention); flash_attention_2
    # attends per example from cu_seq_lens and builds no mask either (vramfit replays it as sdpa's flash)
    single = packed_sequences(setup) == 1 or setup.attn == "flash_attention_2"

    def find_packed_sequence_indices(position_ids):
        first_dummy_value = position_ids[:, :1] - 1
        position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
        packed_sequence_mask = (position_diff != 1).cumsum(-1)
        # `(packed_sequence_mask[:, -1] == 0).all()`: its blocks, its value from the setup
        last = (packed_sequence_mask[:, -1] == 0).all()
        del last
        return None if single else packed_sequence_mask

    orig_find = masking_utils.find_packed_sequence_indices
    orig_sdpa = torch.nn.functional.scaled_dot_product_attention
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    torch.nn.functional.scaled_dot_product_attention = _mem_efficient_sdpa(orig_sdpa, autocast_dtype)
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig_find
        torch.nn.functional.scaled_dot_product_attention = orig_sdpa


def _mem_efficient_sdpa(inner, autocast_dtype=None):
    """F.scaled_dot_product_attention with a mask as CUDA runs it: the memory-efficient kernel
    (flash takes no mask); a bool mask first made additive in the query's dtype (`at::where(mask, 0,
    scalar_tensor(-inf))`: a 0-dim tensor, then T x T), padded to MEM_EFF_ALIGN columns where its last
    dimension is not a multiple; the kernel keeps q, k, v, the bias, its output and a float32
    log-sum-exp (rows padded to LSE_ALIGN) for the backward, which allocates dq, dk, dv like q, k, v,
    and one block for a float32 delta per row and, for 16-bit inputs, a float32 dq accumulator.
    Without a mask: `inner` (the flash-like stand-in).  Sizes and order as the H100 memory history of
    a packed llama-3.2-1b run records them (benchmarks/results/h100-2026-12-07d-levers-memory-history/
    5c5c59b45e58.json.gz)."""
    import torch

    class _MemEffAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, bias):
            # _efficient_attention_forward: the philox seed and offset (8 bytes each, on the GPU), the
            # output (B, M, H, Kv), the fp32 log-sum-exp (rows padded), a 256-byte scratch freed at once
            b, h, s, _ = q.shape
            seed = torch.empty((), dtype=torch.long, device=q.device)
            offset = torch.empty((), dtype=torch.long, device=q.device)
            out = q.new_empty((b, s, h, v.shape[-1])).transpose(1, 2)
            lse = torch.empty((b, h, -(-s // LSE_ALIGN) * LSE_ALIGN), dtype=torch.float32, device=q.device)
            scratch = torch.empty((256,), dtype=torch.uint8, device=q.device)
            del scratch
            ctx.save_for_backward(q, k, v, bias, out, lse, seed, offset)
            return out

        @staticmethod
        def backward(ctx, grad):
            # _efficient_attention_backward: grad_q, grad_k, grad_v (B, M, H, K), then ONE block for the
            # fp32 delta (B, H, M) and, for 16-bit inputs, the fp32 grad_q accumulator (rows and head dim
            # padded to 64), 256 bytes more (the H100 memory history of llama-3.2-1b packed: 65 MiB + 256 B
            # at 8192 tokens, 32 heads of 64); freed first, then the seed and offset, then the saved tensors
            q, k, v, bias, out, lse, seed, offset = ctx.saved_tensors
            b, h, s, d = q.shape
            dq, dk, dv = (torch.empty_like(t.transpose(1, 2)) for t in (q, k, v))
            nbytes = b * h * s * 4 + 256
            if q.dtype != torch.float32:
                nbytes += b * h * (-(-s // 64) * 64) * (-(-d // 64) * 64) * 4
            workspace = torch.empty((nbytes,), dtype=torch.uint8, device=q.device)
            del workspace
            del seed, offset
            del out, lse, q, k, v, bias
            return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is None or key.shape[1] != query.shape[1]:
            return inner(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
        if autocast_dtype is not None:  # sdpa is on autocast's low-precision list
            query, key, value = (t.to(autocast_dtype) for t in (query, key, value))
        bias = attn_mask
        if attn_mask.dtype == torch.bool:
            neg = torch.scalar_tensor(float("-inf"), dtype=query.dtype, device=query.device)
            bias = torch.where(attn_mask, 0.0, neg)
            del neg
        if any(st % MEM_EFF_ALIGN for st in bias.stride()[:-1]):
            cols = -(-bias.shape[-1] // MEM_EFF_ALIGN) * MEM_EFF_ALIGN
            padded = bias.new_empty(bias.shape[:-1] + (cols,))
            bias = padded[..., :bias.shape[-1]]
            del padded
        return _MemEffAttention.apply(query, key, value, bias)

    return sdpa


# --------------------------------------------------------------------------- activation offloading


class _PinnedHost:
    """torch's CachingHostAllocator for pinned memory: blocks rounded up to a power of two, freed
    ones cached per size and reused, none released."""

    def __init__(self):
        self.free: dict = {}
        self.reserved = 0
        self.live = 0
        self.peak_live = 0
        self.copied = 0

    def alloc(self, nbytes: int) -> int:
        size = 1 if nbytes <= 1 else 1 << (int(nbytes) - 1).bit_length()
        if self.free.get(size):
            self.free[size] -= 1
        else:
            self.reserved += size
        self.live += size
        self.peak_live = max(self.peak_live, self.live)
        self.copied += nbytes
        return size

    def release(self, size: int) -> None:
        self.free[size] = self.free.get(size, 0) + 1
        self.live -= size

    def summary(self) -> dict:
        return {"pinned_bytes": self.reserved, "peak_live_bytes": self.peak_live, "offloaded_bytes": self.copied}


class _Host:
    """A host copy (its pinned block), freed to the caching allocator when it dies."""

    __slots__ = ("pool", "size", "numel", "dtype", "__weakref__")

    def __init__(self, pool: _PinnedHost, numel: int, dtype, nbytes: int):
        self.pool, self.numel, self.dtype = pool, numel, dtype
        self.size = pool.alloc(nbytes)

    def __del__(self):
        self.pool.release(self.size)


def _offload_class():
    import torch
    from torch.autograd.graph import saved_tensors_hooks

    class _OffloadEmulation(saved_tensors_hooks):
        """trl.models.activation_offloading.OffloadActivations (trl 1.16, use_streams=True,
        use_pin_memory=True) on the meta device: the same bookkeeping, the host copies `_Host`
        records, the copies back to the GPU new meta tensors (recorded)."""

        def __init__(self, use_pin_memory=True, use_streams=True, min_offload_size=OFFLOAD_MIN_BYTES,
                     max_fwd_stash_size=OFFLOAD_STASH, pinned=None, rec=None, addresses=None):
            self.pinned, self.rec, self.addresses = pinned or _PinnedHost(), rec, addresses
            self.min_bytes, self.max_stash = min_offload_size, max_fwd_stash_size
            self.tracker: dict = {}
            self.tensor_id = 0
            self.is_first_forward_call = True
            self.is_first_backward_call = True
            self.storage_to_tensor_id: dict = {}
            self.key_by_id: dict = {}
            self.param_storages: set = set()
            self.fwd_stash: dict = {}
            self.bwd_tensor_stash: dict = {}
            self.bwd_ev_stash: set = set()
            self.curr_graph_id = None
            self.curr_autograd_node = None

            def where(t):
                """The storage's address (the allocator model's), or its allocation id, or its identity."""
                cdata = t.untyped_storage()._cdata
                owner = self.rec.live.get(cdata) if self.rec is not None else None
                addr = self.addresses.addr(owner) if self.addresses is not None and owner is not None else None
                if addr is not None:
                    return ("addr", addr)
                return ("id", owner) if owner is not None else ("cdata", cdata)

            self._where = where

            def storage_key(t):
                # trl keys a storage by its address (data_ptr + storage offset, dtype), and the key of
                # an offloaded tensor it made contiguous (a copy) is the original's, whose storage may
                # die while the key lingers (until its stash entry goes): a later saved tensor the
                # caching allocator puts at that address then matches it and stays on the GPU.  The
                # address is the allocator model's (`_Addresses`: the recording so far replayed);
                # without one, the recorder's allocation id (never reused: no such match)
                w = where(t)
                if w[0] == "addr":
                    return ("addr", w[1] + t.storage_offset(), t.dtype)
                return (w, t.storage_offset(), t.dtype)

            def track(key, tid):
                self.storage_to_tensor_id[key] = tid
                self.key_by_id[tid] = key

            def release(tid):
                key = self.key_by_id.pop(tid, None)
                if key is not None and self.storage_to_tensor_id.get(key) == tid:
                    del self.storage_to_tensor_id[key]

            def pack(activation):
                if self.is_first_forward_call:
                    self.is_first_forward_call = False
                    self.is_first_backward_call = True
                    self.storage_to_tensor_id, self.key_by_id = {}, {}
                num_bytes = activation.element_size() * activation.nelement()
                self.tensor_id += 1
                tid = self.tensor_id
                key = storage_key(activation)
                if key in self.storage_to_tensor_id:
                    self.tracker[tid] = (activation, False, None)
                    track(key, tid)
                    return tid
                if (activation.device.type != "meta" or num_bytes < self.min_bytes
                        or isinstance(activation, torch.nn.Parameter)
                        or (hasattr(torch.nn, "Buffer") and isinstance(activation, torch.nn.Buffer))
                        or where(activation) in self.param_storages):
                    self.tracker[tid] = (activation, False, None)
                    return tid
                has_broadcast = 0 in activation.stride()
                if not has_broadcast and (not activation.is_contiguous() or activation.storage_offset() != 0):
                    if activation.storage_offset() != 0:
                        activation = activation.clone(memory_format=torch.contiguous_format)
                    else:
                        activation = activation.contiguous()
                for old in list(self.fwd_stash):
                    if old <= tid - self.max_stash:
                        del self.fwd_stash[old]
                        release(old)
                    else:
                        break
                if has_broadcast:
                    nbytes = activation.untyped_storage().nbytes()
                    host = _Host(self.pinned, nbytes // activation.element_size(), activation.dtype, nbytes)
                else:
                    host = _Host(self.pinned, activation.numel(), activation.dtype, num_bytes)
                self.tracker[tid] = (host, True, (activation.stride(), activation.storage_offset(),
                                                  activation.size()))
                self.fwd_stash[tid] = activation
                track(key, tid)
                return tid

            def unpack(tid):
                if self.is_first_backward_call:
                    self.curr_graph_id = torch._C._current_graph_task_id()

                    def wait_and_del_remaining_references():
                        for old in list(self.bwd_tensor_stash):
                            del self.bwd_tensor_stash[old]

                    torch.autograd.variable.Variable._execution_engine.queue_callback(
                        wait_and_del_remaining_references)
                    self.is_first_backward_call = False
                if tid not in self.tracker:
                    raise ValueError(f"untracked tensor with id {tid}")
                held, modified, layout = self.tracker[tid]
                if modified:
                    graph_id = torch._C._current_graph_task_id()
                    node = torch._C._current_autograd_node()
                    prev_node_ids = []
                    if graph_id == self.curr_graph_id and self.curr_autograd_node != node:
                        self.curr_autograd_node = node
                        prev_node_ids = list(self.bwd_tensor_stash)
                    brought_back = True
                    refcount = 0
                    if tid in self.fwd_stash:
                        held = self.fwd_stash[tid]
                        brought_back = False
                    else:
                        stride, offset, shape = layout
                        back = torch.empty((held.numel,), dtype=held.dtype, device="meta")  # .to("cuda") on s1
                        back = torch.as_strided(back, size=shape, stride=stride, storage_offset=offset)
                        held = back
                        del back
                        self.bwd_tensor_stash[tid] = held
                        refcount = torch._C._storage_Use_Count(held.untyped_storage()._cdata)

                    def hook(outputs, inputs):
                        if brought_back and tid in self.bwd_tensor_stash:
                            count = torch._C._storage_Use_Count(self.bwd_tensor_stash[tid].untyped_storage()._cdata)
                            if count > refcount:  # record_stream(s0): freed with its last user
                                del self.bwd_tensor_stash[tid]
                            else:
                                self.bwd_ev_stash.add(tid)
                        for old in list(self.fwd_stash):
                            del self.fwd_stash[old]
                            release(old)
                        for old in prev_node_ids:
                            self.bwd_ev_stash.discard(old)
                            self.bwd_tensor_stash.pop(old, None)
                        return outputs

                    node.register_hook(hook)
                del self.tracker[tid]
                release(tid)
                if not self.tracker:
                    self.is_first_forward_call = True
                return held

            super().__init__(pack, unpack)

        def update_model_params(self, model):
            # trl: the parameters' data_ptrs when the context is made; a parameter replaced later (QLoRA's
            # bias cast at the first forward) leaves its address in the set, where a later activation
            # the caching allocator puts there is then taken for a parameter (kept on the GPU)
            self.param_storages = {self._where(p) for p in model.parameters()}

        def __enter__(self):
            self.tracker.clear()
            self.storage_to_tensor_id.clear()
            self.key_by_id.clear()
            self.tensor_id = 0
            self.is_first_forward_call = True
            self.is_first_backward_call = True
            self.bwd_tensor_stash.clear()
            self.bwd_ev_stash.clear()
            self.fwd_stash.clear()
            if self.rec is not None:  # "bitsandbytes" in sys.modules (peft / trl import it): empty_cache
                self.rec.events.append(("e",))
            return super().__enter__()

        def __exit__(self, *args):
            try:
                self.bwd_tensor_stash.clear()
                self.bwd_ev_stash.clear()
                self.fwd_stash.clear()
            finally:
                result = super().__exit__(*args)
            return result

    return _OffloadEmulation


class _Addresses:
    """Where the caching allocator model (vramfit.memory.allocator) puts each recorded allocation: the
    recorder's events so far replayed through it, on demand (the stream before the steps' gradient
    sums are made in place, `events._sum_in_place`: a few backward blocks apart)."""

    def __init__(self, rec, expandable: bool):
        from vramfit.memory.allocator import CachingAllocator

        self.rec, self.alloc, self.live, self.done, self.events = rec, CachingAllocator(expandable), {}, 0, None

    def addr(self, event_id: int) -> int | None:
        events = self.rec.events
        if events is not self.events:  # the recorder started another stream (the rest of the run)
            return None
        for ev in events[self.done:]:
            self.alloc.apply(ev, self.live)
        self.done = len(events)
        block = self.live.get(event_id)
        return None if block is None else block.addr


def _make_offloading(model, rec, pinned, addresses=None):
    """trl's get_act_offloading_ctx_manager(model) (its output-head no-op hooks for real) around
    `_OffloadEmulation`."""
    import functools
    import logging

    from trl.models import activation_offloading as ao

    cls = _offload_class()
    orig = ao.OffloadActivations
    ao.OffloadActivations = functools.partial(cls, pinned=pinned, rec=rec, addresses=addresses)
    level = logging.getLogger(ao.__name__).level
    logging.getLogger(ao.__name__).setLevel(logging.ERROR)
    try:
        return ao.get_act_offloading_ctx_manager(model=model, warn_if_no_head=False)
    finally:
        ao.OffloadActivations = orig
        logging.getLogger(ao.__name__).setLevel(level)
