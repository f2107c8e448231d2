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

from vramfit.model.emulate import _autocast_mode, _meta_4bit_linear_class, _patched_sdpa, _quiet

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
    kbit_prep: bool = True  # QLoRA: prepare_model_for_kbit_training's fp32 casts (Setup.kbit_prep)
    adapter_dtype: str | None = None  # None: peft's fp32 adapters; else trl's cast (Setup.adapter_dtype)


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
    from vramfit.model.spec import config_from_dict

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

    from vramfit.model.spec import build_meta_model

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
            if key.kbit_prep and p.dtype in (torch.float16, torch.bfloat16) and id(p) not in quantized:
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
    if key.adapter_dtype:  # trl's SFTTrainer on a quantized model
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(getattr(torch, key.adapter_dtype))
    model.train()
    return model



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


def _profile_from_stored(data: dict) -> ActivationProfile:
    """An ActivationProfile from the fields vramfit.model.cache stored."""
    data["outside"] = Region(**data["outside"])
    data["layers"] = shared_regions(Region(**r) for r in data["layers"])
    return ActivationProfile(**data)


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

    from vramfit.model import cache

    needs_input_grad = grad_ckpt and key.method != "full"
    hit = cache.load_profile(spec, key, needs_input_grad, _profile_from_stored)
    if hit is not None:
        return hit
    if key.method != "full" and key.lora_r not in RANK_ANCHORS:
        anchors = [activation_profile(spec, dataclasses.replace(key, lora_r=r), grad_ckpt) for r in RANK_ANCHORS]
        prof = _interpolate_rank(anchors, RANK_ANCHORS, key.lora_r)
    else:
        prof = _profile_cached(spec, key, needs_input_grad)
    cache.store_profile(spec, key, needs_input_grad, prof)
    return prof
