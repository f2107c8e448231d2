"""liger-kernel in the allocation replay (`TrainingArguments(use_liger_kernel=True)`; see
vramfit.memory.levers): its own Python autograd Functions on the meta device, its Triton kernels no-ops,
the meta device answering liger's device questions as an H100 would."""

from __future__ import annotations

import contextlib
import sys

from vramfit.memory.cuda_reduce import H100_SMS
H100_CAPABILITY = (9, 0)
TRITON_IMPL = "nvidia-triton"  # liger's op registry's choice on an H100 (its CUDA-DSL extras not installed)


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


@contextlib.contextmanager
def quiet_logger(name: str):
    """The library logger `name` at ERROR for the block (a lever's own set-up chatter is not the user's)."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
        import warnings

        with warnings.catch_warnings(), quiet_logger("liger_kernel"):
            warnings.simplefilter("ignore")
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
def liger(model, setup, autocast_dtype):
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
        with quiet_logger("liger_kernel"):
            apply(model=base, **config)
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
