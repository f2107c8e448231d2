"""Recording for event templates (build time, torch inside the functions): `training_events` on a
model shrunk to a few decoder layers, every event tagged with its decoder layer (see
vramfit.memory.template_build for how the tags are found), `_foreach_norm`'s partials and CUDA
reductions kept as formulas."""

from __future__ import annotations

import contextlib
import re
import sys
import types

from vramfit.memory.template import FOREACH_CHUNK, NoTemplate

BNB_BLOCK = 256  # kernels._Bnb8bitEmulation: absmax per 256 elements

_NONE = -1  # "no information" (a tag is None: outside the decoder layers, or a layer index)


def shrunk_spec(spec, layers: int):
    from vramfit.model.spec import spec_from_config

    data = dict(spec.config)
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if k in data:
            data[k] = layers
    if isinstance(data.get("layer_types"), list):
        data["layer_types"] = data["layer_types"][:layers]
    return spec_from_config(f"{spec.name}@{layers}", data)


# --------------------------------------------------------------------------- recording with tags


def _cdata(t):
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def _tagging(n_layers: int):
    """Patches (build time only) the recorder class, the model builder (to hook the decoder layers),
    `_foreach_norm`, the gradient clipping and `reduce_buffers`; yields the state they fill."""
    import torch
    from torch.utils._pytree import tree_flatten

    from vramfit.memory import cuda_reduce, events, kernels
    from vramfit.model import trace

    st = types.SimpleNamespace(rec=None, pmap={}, prefix=None)
    orig = (events._recorder_class, trace._prepare_model, kernels._foreach_norm, events._clip_grad_norm,
            cuda_reduce.reduce_buffers)

    def prepare(config, key, spec, conv1d_4bit=False):
        model = orig[1](config, key, spec, conv1d_4bit=conv1d_4bit)
        layers = trace._decoder_layers(model, n_layers)
        if len(layers) != n_layers:
            raise NoTemplate("no list of decoder layers found")
        st.pmap = {_cdata(t): None for t in list(model.parameters()) + list(model.buffers())}
        for i, layer in enumerate(layers):
            for t in list(layer.parameters()) + list(layer.buffers()):
                st.pmap[_cdata(t)] = i
            layer.register_forward_pre_hook(lambda mod, args, i=i: _pre(i))
            layer.register_forward_hook(lambda mod, args, out, i=i: _post(i, out))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        st.prefix = next((n.rsplit(".", 1)[0] for n, mod in base.named_modules() if mod is layers[0]), "")
        return model

    def _pre(i):
        rec = st.rec
        if rec is not None:
            rec.stack.append(rec.ctx)
            rec.ctx = i
            rec.param_phase = False  # a forward: tags from the hooks, not from the ops' parameters

    def _post(i, out):
        rec = st.rec
        if rec is None:
            return
        rec.ctx = rec.stack.pop() if rec.backward else None  # a recompute nests in the backward
        y = out[0] if isinstance(out, (tuple, list)) else out
        if not rec.backward and isinstance(y, torch.Tensor) and y.requires_grad:
            y.register_hook(lambda g, i=i: setattr(rec, "ctx", i))

    def frame_layer():
        """_qlora_load's first loop quantizes the weights by name (no storage registered yet)."""
        f = sys._getframe(2)
        for _ in range(4):
            if f is None:
                break
            if f.f_code.co_name == "_qlora_load":
                n = f.f_locals.get("n")
                if isinstance(n, str) and st.prefix:
                    mt = re.match(re.escape(st.prefix) + r"\.(\d+)\.", n)
                    return int(mt.group(1)) if mt else None
                return _NONE
            f = f.f_back
        return _NONE

    def bnb_blocks(nbytes):
        """kernels._Bnb8bitEmulation.step's fp32 absmax of ceil(numel / 256) blocks: (the numel, the
        parameter's layer: the absmax is made from its size alone, so no op of it tags it), else (0, _NONE)."""
        f = sys._getframe(2)
        for _ in range(24):  # through the dispatch mode's frames
            if f is None:
                return 0, _NONE
            if f.f_code.co_name == "step" and "blocks" in f.f_locals and "p" in f.f_locals:
                p = f.f_locals["p"]
                if nbytes != 4 * f.f_locals["blocks"]:
                    return 0, _NONE
                rec = st.rec
                return p.numel(), (rec.smap.get(_cdata(p), _NONE) if rec is not None else _NONE)
            f = f.f_back
        return 0, _NONE

    class LiveDict(dict):
        def __setitem__(self, key, i):
            super().__setitem__(key, i)
            rec = st.rec
            if rec is not None and key in rec.pmap:
                rec.meta.setdefault(i, {})["set"] = rec.pmap[key]

    def recorder_class():
        Base = orig[0]()

        class Tagged(Base):
            def __init__(self):
                super().__init__()
                st.rec = self
                self.ctx, self.stack = None, []
                self.live = LiveDict()
                self.meta = {}
                self.pmap = dict(st.pmap)
                self.smap = dict(st.pmap)  # storage -> layer: parameters, then what ops on them make
                self.op, self.out_i = None, -1
                self.param_phase = True  # loading, clipping, the optimizer: ops tagged by their parameters

            def alloc(self, nbytes):
                i = super().alloc(nbytes)
                self.events[-1] = ("a", i, nbytes, self.ctx)
                if self.op is not None:
                    arg, per = self.op
                    lay = per[self.out_i] if per is not None and 0 <= self.out_i < len(per) else arg
                elif self.param_phase:
                    lay = frame_layer()
                else:
                    lay = _NONE
                if lay != _NONE:
                    self.meta.setdefault(i, {})["arg"] = lay
                if self.param_phase:
                    numel, owner = bnb_blocks(nbytes)
                    if numel:
                        self.meta.setdefault(i, {})["fn"] = (1, numel, BNB_BLOCK)
                        if lay == _NONE and owner != _NONE:
                            self.meta[i]["arg"] = owner
                return i

            def free(self, i):
                self.events.append(("f", i, self.ctx))

            def _dead(self, key, i):
                if self.live.get(key) == i:
                    del self.live[key]
                self.smap.pop(key, None)  # its address may serve a new storage
                self.pmap.pop(key, None)  # a parameter whose data was replaced (bias.data = ...)
                self.events.append(("f", i, self.ctx))

            def track(self, t):
                self.out_i += 1
                super().track(t)

            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                if not self.param_phase:
                    return super().__torch_dispatch__(func, types_, args, kwargs)
                arg = _NONE
                for a in tree_flatten((args, kwargs or {}))[0]:
                    if isinstance(a, torch.Tensor) and a.device.type == "meta" and _cdata(a) in self.smap:
                        arg = self.smap[_cdata(a)]
                        break
                per = None
                name = getattr(func, "__name__", "")
                if name.startswith("_foreach") and args and isinstance(args[0], (list, tuple)):
                    per = [self.smap.get(_cdata(a), _NONE) if isinstance(a, torch.Tensor) else _NONE
                           for a in args[0]]
                saved = self.op, self.out_i
                self.op, self.out_i = (arg, per), -1
                try:
                    out = super().__torch_dispatch__(func, types_, args, kwargs)
                finally:
                    self.op, self.out_i = saved
                for j, t in enumerate(tree_flatten(out)[0]):
                    lay = per[j] if per is not None and j < len(per) else arg
                    if lay != _NONE and isinstance(t, torch.Tensor) and t.device.type == "meta":
                        self.smap[_cdata(t)] = lay
                return out

        return Tagged

    def foreach_norm(grads):
        rec = st.rec
        start = len(rec.events)
        out = orig[2](grads)
        ids = [e[1] for e in rec.events[start:] if e[0] == "a"]
        rec.meta.setdefault(ids[0], {})["fn"] = (len(grads), max(g.numel() for g in grads), FOREACH_CHUNK)
        for g, i in zip(grads, ids[1:]):
            lay = rec.smap.get(_cdata(g), _NONE)
            if lay != _NONE:
                rec.meta.setdefault(i, {})["set"] = lay
        return out

    def clip(params, max_norm):
        rec = st.rec
        rec.ctx = None  # the backward is over
        rec.param_phase = True
        for p in params:
            if p.grad is not None:
                rec.smap[_cdata(p.grad)] = rec.pmap.get(_cdata(p), _NONE)
        return orig[3](params, max_norm)

    def reduce_buffers(shape, strides, reduce_dims, element_size, arg_size, vt0=4, input_vec_size=4,
                       num_sms=cuda_reduce.H100_SMS):
        out = orig[4](shape, strides, reduce_dims, element_size, arg_size, vt0=vt0, input_vec_size=input_vec_size,
                      num_sms=num_sms)
        rec = st.rec
        if rec is not None:
            if vt0 != 4:
                raise NoTemplate("a reduction with vt0 != 4")
            desc = (tuple(shape), tuple(strides), tuple(reduce_dims), element_size, arg_size, input_vec_size, num_sms)
            rec.events.append(("r", desc, len(out), rec.ctx))
        return out

    events._recorder_class, trace._prepare_model = recorder_class, prepare
    kernels._foreach_norm, events._clip_grad_norm, cuda_reduce.reduce_buffers = foreach_norm, clip, reduce_buffers
    try:
        yield st
    finally:
        (events._recorder_class, trace._prepare_model, kernels._foreach_norm, events._clip_grad_norm,
         cuda_reduce.reduce_buffers) = orig


def record(spec, setup, layers: int, grad_accum: int = 1) -> list:
    """The tagged events of `training_events(steps=2, grad_accum)` on `spec` shrunk to `layers`
    decoder layers: ("a", tag, id, values, kind, where), ("f", tag, id, where), ("e", tag, where),
    ("r", tag, reduction, where).  kind "s": values (bytes,); an int, a chunk: values (k, numel) of
    4 k ceil(numel / chunk) bytes (_foreach_norm's partials, bitsandbytes' absmax); where: (the
    accumulating micro-batch "stepN.microM" the event belongs to or None, the phase mark it follows)."""
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import resolve_targets

    small = shrunk_spec(spec, layers)
    with _tagging(layers) as st:
        res = training_events(small, setup, resolve_targets(small, setup), steps=2, grad_accum=grad_accum)
    return _tag(res["events"], res["marks"], st.rec.meta, layers - 1)


def _tag(events: list, marks: dict, meta: dict, last: int) -> list:
    bounds = sorted((at, name) for name, at in marks.items())
    first_fwd = marks["step0.forward"]
    out, tag_of, sticky, skip, b = [], {}, None, 0, 0
    phase, block, label = "load", None, "load"
    for k, e in enumerate(events):
        while b < len(bounds) and bounds[b][0] <= k:
            name = label = bounds[b][1]
            if ".micro" in name:
                block = name.rsplit(".", 1)[0]
            elif name.endswith((".forward", ".clip")):
                block = None
            new = "fb" if name.endswith((".forward", ".backward")) else "load" if k < first_fwd else "param"
            if name.endswith(".forward") or new != phase:
                sticky = None if new != "fb" or name.endswith(".forward") else sticky
            phase = new
            b += 1
        if skip:
            skip -= 1
            if e[0] not in "af":
                raise NoTemplate("a reduction's buffers interleaved")
            continue
        kind = e[0]
        ctx = e[-1] if kind in "afr" and len(e) > (3 if kind == "a" else 2) else None
        if kind == "a":
            m = meta.get(e[1], {})
            if m.get("set", _NONE) != _NONE:
                tag = m["set"]
            elif phase == "fb":
                tag = ctx if ctx is not None else sticky
            else:
                tag = m["arg"] if m.get("arg", _NONE) != _NONE else sticky
            sticky = tag
            tag_of[e[1]] = tag
            if "fn" in m:  # 4 x k x ceil(numel / chunk)
                out.append(("a", tag, e[1], m["fn"][:2], m["fn"][2], (block, label)))
            else:
                out.append(("a", tag, e[1], (e[2],), "s", (block, label)))
        elif kind == "f":
            if phase == "fb" and ctx is None and sticky in (None, last) and tag_of[e[1]] is not None:
                # outside the layers (before the first, after the last: the loss, the end of a
                # forward clearing autocast's weight casts): a layer's allocation freed as its own
                tag = tag_of[e[1]]
            elif phase == "fb":
                tag = ctx if ctx is not None else sticky
                sticky = tag
            else:
                tag = tag_of[e[1]]
            out.append(("f", tag, e[1], (block, label)))
        elif kind == "r":
            tag = (ctx if ctx is not None else sticky) if phase == "fb" else sticky
            out.append(("r", tag, e[1], (block, label)))
            skip = 4 * e[2]
        else:
            out.append(("e", sticky, (block, label)))
    return out
