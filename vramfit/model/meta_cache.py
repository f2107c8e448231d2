"""A memo cache of meta-device op outputs, for the allocation replay (vramfit.memory.events).

The replay runs ~10^4-10^5 aten ops on meta tensors; their meta kernels (mostly torch's Python
decompositions and prims wrappers) cost 20-400 us each, and almost every op repeats with the same
input metadata (each decoder layer runs the same ops on the same shapes).  On meta tensors an op's
result depends only on the op, its arguments' metadata and its non-tensor arguments, so `call` runs
the kernel once per such key and afterwards answers without it:
- a fresh output (no alias in the schema) is rebuilt with `torch.empty_strided`, only for keys whose
  real outputs that rebuild reproduces exactly (its own storage, of the size empty_strided gives, at
  offset 0, not a view, same dispatch keys and flags; checked on the first call);
- an in-place / out= op (its written arguments aliased by its returns) returns those arguments, only
  for keys where the kernel left every tensor argument's metadata and storage as it found it (a
  meta in-place kernel does nothing else: no data; version counters are bumped above the dispatch
  modes, in ADInplaceOrView).
Left out: view ops (outputs share an input's storage), ops with data-dependent outputs or non-tensor
returns (nonzero, _local_scalar_dense, ...), non-aten ops, and a few whose meta kernel is faster than a
cache hit.  FakeTensorMode's dispatch cache (torch/_subclasses/fake_tensor.py) makes the same bargain.
A float argument of an in-place or `_foreach_` op is keyed by its type only: its value (Adam's
per-step bias corrections) never changes what such an op returns on meta tensors.

`VRAMFIT_META_CACHE=0` (read at import) or `ENABLED = False` turns it off: every op runs its kernel.
Torch is imported by the functions that use it.
"""

from __future__ import annotations

import os

ENABLED = os.environ.get("VRAMFIT_META_CACHE", "1") != "0"
MAX_ENTRIES = 100_000  # keys; past it new keys just run their kernel

_entries: dict = {}  # key -> recipe (see _recipe), or _BYPASS: this key's outputs are not reproducible
_ops: dict = {}  # OpOverload -> 0 (never cached), 1 (cached, floats by value), 2 (floats by type)
_BYPASS = object()
stats = {"hits": 0, "misses": 0, "bypass": 0, "direct": 0}

# non-tensor arguments go into a key as (type, value): 1 == 1.0 == True hash alike but promote apart
_PLAIN = (type(None), bool, int, float, str)
_TORCH_TYPES: tuple = ()  # dtype, device, layout, memory_format (set by _init)
_TENSORS: tuple = ()
_SEQS: tuple = ()
_strided = None
_excluded: set = set()


class _NoKey(Exception):
    """An argument a key cannot describe (a non-meta or subclass tensor, a generator, a SymInt...)."""


def clear() -> None:
    """Forget every entry and reset the counters."""
    _entries.clear()
    _ops.clear()
    for k in stats:
        stats[k] = 0


def _init() -> None:
    global _TENSORS, _SEQS, _TORCH_TYPES, _strided, _excluded
    import torch

    aten = torch.ops.aten
    _TENSORS = (torch.Tensor, torch.nn.Parameter)
    _SEQS = (list, tuple, torch.Size)
    _TORCH_TYPES = (torch.dtype, torch.device, torch.layout, torch.memory_format)
    _strided = torch.strided
    # the storage is the input's without the schema saying so; or the output is data, not metadata
    # (FakeTensorMode's bypass list); or it changes what a tensor is (set_, resize_: caught by the
    # metadata check too); or the meta kernel beats a cache hit (C++, 2-6 us)
    _excluded = {
        aten._unsafe_view.default, aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.lift.default,
        aten._local_scalar_dense.default, aten.item.default, aten.equal.default, aten.is_nonzero.default,
        aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default,
        aten.set_.source_Storage, aten.set_.source_Storage_storage_offset, aten.set_.source_Tensor,
        aten.set_.default, aten.resize_.default, aten.resize_as_.default,
        aten._to_copy.default, aten.clone.default, aten.copy_.default, aten.empty.memory_format,
        aten.empty_strided.default,
    }


def _op_kind(func) -> int:
    """0: never cached.  Else an aten op whose every return is a Tensor, Tensor? or Tensor[], fresh
    (no alias in the schema) or one of its written arguments (in-place and out= ops; no argument merely
    aliased: views), not tagged data-dependent, dynamic-shape or inplace-view: 2 for in-place, out=
    and _foreach_ ops (their float arguments keyed by type only), 1 for the rest."""
    import torch

    kind = _ops.get(func)
    if kind is not None:
        return kind
    kind = 0
    if isinstance(func, torch._ops.OpOverload) and func.namespace == "aten" and func not in _excluded:
        schema = func._schema
        tags = set(func.tags)
        fine = (all(a.alias_info is None or a.alias_info.is_write for a in schema.arguments)
                and all(r.alias_info is None or r.alias_info.is_write for r in schema.returns)
                and all(_tensor_type(r.type) for r in schema.returns)
                and (schema.returns or schema.is_mutable)
                and not tags & {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape,
                                torch.Tag.inplace_view})
        if fine:
            kind = 2 if schema.is_mutable or func.__name__.startswith("_foreach_") else 1
    _ops[func] = kind
    return kind


def _tensor_type(t) -> bool:
    import torch

    C = torch._C
    if isinstance(t, C.OptionalType):
        t = t.getElementType()
    if isinstance(t, C.ListType):
        t = t.getElementType()
    return isinstance(t, C.TensorType)


def _key(func, args, kwargs, kind):
    """(op, default dtype, inference mode, each argument: a tensor's shape, stride, dtype, storage
    offset, view-ness, conj / neg bits (meta strided tensors and parameters only); anything else as
    (type, value), a float as its type alone for kind 2; lists and tuples flattened with their type and
    length); raises _NoKey."""
    import torch

    parts = [func, torch.get_default_dtype(), torch.is_inference_mode_enabled()]
    _walk(args, parts, kind == 2)
    if kwargs:
        for name, v in kwargs.items():
            parts.append(name)
            _walk((v,), parts, kind == 2)
    return tuple(parts)


def _walk(seq, parts, float_type_only):
    add = parts.append
    for a in seq:
        tp = type(a)
        if tp in _TENSORS:
            if not a.is_meta or a.layout is not _strided:
                raise _NoKey
            add((a.shape, a.stride(), a.dtype, a.storage_offset(), a._is_view(), a.is_conj(), a.is_neg()))
        elif tp is float and float_type_only:
            add(tp)
        elif tp in _PLAIN or tp in _TORCH_TYPES:
            add(tp)
            add(a)
        elif tp in _SEQS:
            add(tp)
            add(len(a))
            _walk(a, parts, float_type_only)
        else:
            raise _NoKey


def _state(t):
    """What an in-place kernel must leave unchanged for a cache hit to skip it."""
    st = t.untyped_storage()
    return (t.shape, t.stride(), t.dtype, t.storage_offset(), st._cdata, st.nbytes(), t._is_view(),
            t.requires_grad)


def _describe(t):
    """Everything about a fresh meta tensor a cache hit must reproduce."""
    import torch

    return (type(t), t.shape, t.stride(), t.dtype, t.device, t.layout, t.storage_offset(),
            t.untyped_storage().nbytes(), t._is_view(), t.requires_grad, t.is_conj(), t.is_neg(),
            t.is_inference(), torch._C._dispatch_key_set(t))


def _tensors(args, kwargs):
    import torch
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]


def _recipe(out, args, kwargs, mutable: bool):
    """How to answer this key again without the kernel, or None where that answer could differ:
    (container type or None for a bare leaf, leaves); a leaf is None, ("arg", i) / ("kw", name): that
    argument itself (what an in-place op returns; `mutable` ops only), or (shape, stride, dtype): a
    fresh tensor."""
    import torch

    Tensor = torch.Tensor
    if out is None or type(out) is Tensor:
        container, leaves = None, [out]
    elif type(out) in (tuple, list) and all(o is None or type(o) is Tensor for o in out):
        container, leaves = type(out), list(out)
    else:
        return None
    inputs = {t.untyped_storage()._cdata for t in _tensors(args, kwargs)}
    seen = set()
    recipe = []
    for t in leaves:
        if t is None:
            recipe.append(None)
            continue
        where = next((("arg", i) for i, a in enumerate(args) if a is t), None)
        if where is None:
            where = next((("kw", k) for k, a in kwargs.items() if a is t), None)
        if where is not None and not mutable:
            return None
        if where is not None:
            recipe.append(where)
            continue
        if not t.is_meta:
            return None
        st = t.untyped_storage()._cdata
        if st in inputs or st in seen:  # shares an input's or another output's storage
            return None
        seen.add(st)
        m = (tuple(t.shape), tuple(t.stride()), t.dtype)
        if _describe(_fresh(m)) != _describe(t):
            return None
        recipe.append(m)
    return (container, tuple(recipe))


def _fresh(m):
    import torch

    return torch.empty_strided(m[0], m[1], dtype=m[2], device="meta")


def _answer(recipe, args, kwargs):
    from torch import empty_strided

    container, leaves = recipe
    outs = []
    for m in leaves:
        if m is None:
            outs.append(None)
        elif m[0] == "arg":
            outs.append(args[m[1]])
        elif m[0] == "kw":
            outs.append(kwargs[m[1]])
        else:
            outs.append(empty_strided(m[0], m[1], dtype=m[2], device="meta"))
    if container is None:
        return outs[0]
    return outs if container is list else tuple(outs)


def call(func, args, kwargs):
    """func(*args, **kwargs) as the meta kernel would return it, from the cache where it can be.
    Call it where the kernel itself would run, below every TorchDispatchMode (a mode below would not
    see the op, and would see the rebuilt outputs' empty_strided)."""
    kwargs = kwargs or {}
    if not ENABLED:
        return func(*args, **kwargs)
    if not _TENSORS:
        _init()
    kind = _op_kind(func)
    if not kind:
        stats["direct"] += 1
        return func(*args, **kwargs)
    import torch

    if torch._C._len_torch_dispatch_stack():
        stats["bypass"] += 1
        return func(*args, **kwargs)
    try:
        key = _key(func, args, kwargs, kind)
        entry = _entries.get(key)
    except (_NoKey, TypeError):  # TypeError: an unhashable value
        stats["bypass"] += 1
        return func(*args, **kwargs)
    if entry is not None:
        if entry is _BYPASS:
            stats["bypass"] += 1
            return func(*args, **kwargs)
        stats["hits"] += 1
        return _answer(entry, args, kwargs)
    stats["misses"] += 1
    if len(_entries) >= MAX_ENTRIES:
        return func(*args, **kwargs)
    tensors = _tensors(args, kwargs)
    before = [_state(t) for t in tensors]
    out = func(*args, **kwargs)
    same = all(_state(t) == b for t, b in zip(tensors, before))
    recipe = _recipe(out, args, kwargs, func._schema.is_mutable) if same else None
    _entries[key] = _BYPASS if recipe is None else recipe
    return out
