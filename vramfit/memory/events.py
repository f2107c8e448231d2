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
- QLoRA (bitsandbytes 0.50.2, transformers 5.23, peft 0.21): from_pretrained's caching-allocator
  warm-up, the 4-bit load (each bf16 weight quantized on the GPU with its transient buffers),
  prepare_model_for_kbit_training's fp32 casts and empty_cache, gemm_4bit's dequantize + F.linear
  forward and dequantize + matmul backward, and peft's Linear4bit LoRA forward (base output cloned);
  see `_qlora_load`, `_qlora_linear_forward`.
Left out: GradScaler's scalars under 16-mixed.
With `after=True`, the rest of the run as a stream of its own: evaluation (`_record_eval`: no_grad
forwards at the eval micro-batch, the loss, the Trainer's loss container) and a checkpoint save
(`kernels._save_checkpoint`: save_pretrained run for real without the file writes, QLoRA's quant-state
clones, the best adapter's reload), replayed from the allocator state the steps leave.
"""

from __future__ import annotations

import contextlib
import weakref

from vramfit.memory.cuda_reduce import H100_SMS
from vramfit.memory.kernels import (  # noqa: F401  (Unsupported: raised here for the callers)
    _MATMULS,
    CUBLAS_WORKSPACE,
    Unsupported,
    _clip_grad_norm,
    _fused_ok,
    _internal_temporaries,
    _make_optimizer,
    _outputs_to_fp32,
    _qlora_linear_forward,
    _qlora_load,
    _reduction_buffers,
    _save_checkpoint,
    _trl_fused_kernels,
)


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

    from vramfit.model.meta_cache import call as meta_call

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
            out = meta_call(func, args, kwargs)  # func(*args, **kwargs), its meta outputs memoized
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


def _step_batch(B: int, S: int, lever=None) -> tuple:
    """A micro-batch on the GPU: (input_ids, attention_mask, labels, more model kwargs); a packed one
    (vramfit.memory.levers) where the setup packs."""
    import torch

    if lever is not None and lever.packed:
        return lever.batch(B, S)
    ids = torch.zeros((B, S), dtype=torch.long, device="meta")
    mask = torch.ones((B, S), dtype=torch.long, device="meta")
    labels = torch.zeros((B, S), dtype=torch.long, device="meta")
    return ids, mask, labels, {}


# --------------------------------------------------------------------------- after the steps

EVAL_BATCHES = 2  # the second finds the first's blocks cached; the Trainer's loss container grows by one


def _record_eval(rec, model, key, ac_dtype, B: int, S: int, fused_loss: bool, marks: dict, lever=None) -> None:
    """Trainer.evaluate as vramfit train runs it (trl's SFTTrainer, no compute_metrics, so
    prediction_loss_only): model.eval() (no dropout, no checkpointing), per eval micro-batch of B rows
    padded to S: the batch on the GPU, the forward with labels under no_grad and the Trainer's
    autocast, accelerate's fp32 copy of 16-bit outputs, the loss (trl's fused head: its per-token
    log-probs; else the model's loss over the full logits, `.detach().mean()` while the outputs live);
    then evaluation_loop's `loss.repeat(batch_size)`, concatenated to the losses before it on the GPU
    (EvalLoopContainer's nested_concat) until the loop ends."""
    import torch

    from vramfit.model import trace

    model.eval()
    losses = None
    try:
        for k in range(EVAL_BATCHES):
            marks[f"eval{k}"] = len(rec.events)
            ids, mask, labels, more = _step_batch(B, S, lever)
            rec.backward = False
            with torch.no_grad():
                ac = trace._autocast_mode(ac_dtype) if ac_dtype is not None else contextlib.nullcontext()
                with ac:
                    extra = {"fused_lm_head": True} if fused_loss else {}
                    if key.attn == "eager" and mask is not None:
                        extra["attention_mask"] = mask
                    out = model(input_ids=ids, labels=labels, **extra, **more)
                if ac_dtype is not None:
                    out = _outputs_to_fp32(out)
                loss = out.loss.detach()
                if not fused_loss:  # Trainer.prediction_step
                    loss = loss.mean()
                del out, ac
                rep = loss.repeat(B)
                del loss
                losses = rep if losses is None else torch.cat((losses, rep))
                del rep, ids, mask, labels, more
        del losses  # all_losses.get_arrays(): to the host
    finally:
        model.train()


def _own_ids(events: list, first_id: int) -> tuple:
    """The post-training stream with ids of its own (0, 1, ...), so it can follow any training stream
    (a template's expansion numbers its ids differently); -> (events, frees of earlier allocations
    dropped: none where the rest of the run frees nothing of the training's)."""
    ids, out, foreign = {}, [], 0
    for ev in events:
        if ev[0] == "a":
            ids[ev[1]] = len(ids)
            out.append((ev[0], ids[ev[1]]) + tuple(ev[2:]))
        elif ev[0] == "f":
            if ev[1] in ids:
                out.append((ev[0], ids[ev[1]]) + tuple(ev[2:]))
            elif ev[1] < first_id:
                foreign += 1
            else:
                raise AssertionError(f"free of {ev[1]} before its allocation")
        else:
            out.append(ev)
    return out, foreign


def _record_after(rec, model, setup, key, ac_dtype, eval_batch: int, fresh: bool, quantized: int,
                  lever=None) -> dict:
    """The rest of the run after the training steps, into `rec.events` (a fresh list): evaluation, then a
    checkpoint save.  `fresh`: no step ran; first make the model as the steps leave it, silently."""
    import torch

    first_id = rec.next_id
    if fresh:
        rec.workspaces.update(("fwd", "bwd"))
        silent, rec.events = rec.events, []
        for m in model.modules():  # _qlora_linear_forward casts a 4-bit layer's bias once, in the first forward
            bias = getattr(m, "bias", None)
            if type(m).__name__ == "_Meta4bitLinear" and bias is not None and bias.dtype != torch.bfloat16:
                rec.live.pop(bias.untyped_storage()._cdata, None)
                m.bias.data = bias.data.to(torch.bfloat16)
        rec.events = silent
    marks = {}
    _record_eval(rec, model, key, ac_dtype, eval_batch, setup.seq_len, setup.loss == "fused", marks, lever)
    _save_checkpoint(rec, model, quantized, marks)
    marks["end"] = len(rec.events)
    events, foreign = _own_ids(rec.events, first_id)
    # "raw": the recorder's own events (ids, and the template builder's tags) for vramfit.memory.replay's post template
    return {"events": events, "marks": marks, "foreign_frees": foreign, "eval_batch": eval_batch, "raw": rec.events}


# --------------------------------------------------------------------------- QLoRA (bitsandbytes 4-bit)

def training_events(spec, setup, targets=(), steps: int = 3, seq_lens=None, grad_accum: int = 1,
                    after: bool = False, eval_batch: int | None = None, unused_reserved: int = 0) -> dict:
    """Allocation events of `steps` Trainer steps of `setup` on `spec`, and where each phase starts.
    `seq_lens`: each step's padded batch length (real data: the longest row of each batch); default
    `setup.seq_len` for every step.  `grad_accum`: micro-batches per
    optimizer step, each a forward and a backward whose gradients add into the ones kept from the
    micro-batch before (marks `stepN.microM.forward` / `.backward` from the second on).
    `after`: also the rest of the run after the steps, as a stream of its own (`result["after"]`:
    {"events", "marks"}, its ids its own, to be replayed from the allocator state the steps leave;
    the training stream is the same with or without it): evaluation (`_record_eval`, micro-batch
    `eval_batch`, default the training one, as vramfit train's per_device_eval_batch_size) and a
    checkpoint save (`kernels._save_checkpoint`); with `steps=0` it is recorded right after the load as
    it would run after the steps (the cuBLAS handles' workspaces taken, QLoRA's biases cast)."""
    import copy

    import torch

    from vramfit.model import trace
    from vramfit.memory.estimate import trace_key
    from vramfit.model.spec import config_from_dict

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
        quantized_count = len(quantized)
        _qlora_load(rec, model, base_model, quantized, unused_reserved, key.kbit_prep)
        base_fwd, lora_fwd = _qlora_linear_forward(rec, torch.bfloat16)  # bnb_4bit_compute_dtype
        for m in base_model.modules():
            base = getattr(m, "base_layer", None)
            if base is not None and id(getattr(base, "weight", None)) in quantized and hasattr(m, "lora_A"):
                m.forward = types.MethodType(lora_fwd, m)
            elif id(getattr(m, "weight", None)) in quantized and not hasattr(m, "base_layer"):
                m.forward = types.MethodType(base_fwd, m)
    else:
        quantized_count = 0
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
    # peft: adapters built on the CPU and moved to the base layer's device and float dtype
    # (_move_adapter_to_device_of_base_layer), all of them; then PeftModel.__init__'s _cast_adapter_dtype
    # upcasts each 16-bit one to fp32 (the fp32 copy, then the 16-bit one freed).  H100 histories of
    # gemma-2b / mistral-7b[8] LoRA r64 bf16 (d805f3afa23f, 4cc977a8cec5): 54 x 2 MiB, 24 x 1.75 MiB.
    # The 16-bit copy is registered under the adapter's storage (an event template tags it by its layer).
    upcast = key.param_dtype in ("bfloat16", "float16")
    half = {}
    for p in lora:
        st = p.untyped_storage()
        if upcast and p.dtype == torch.float32:
            half[st._cdata] = rec.live[st._cdata] = rec.alloc(st.nbytes() // 2)
    for p in lora:
        st = p.untyped_storage()
        rec.live[st._cdata] = rec.alloc(st.nbytes())
        if st._cdata in half:
            rec.free(half[st._cdata])
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
        kernels = _trl_fused_kernels(ac_dtype) if fused_loss else contextlib.nullcontext()
        lever = None
        if setup.liger or setup.packing or setup.activation_offloading:  # the levers (vramfit.memory.levers)
            from vramfit.memory.levers import Levers

            lever = Levers(rec, model, setup, ac_dtype)
        with rec, trace._patched_sdpa(key.attn != "eager", ac_dtype, key.kv_repeated), trace._quiet(), kernels, \
                (lever if lever is not None else contextlib.nullcontext()):
            accum = max(1, grad_accum)
            for step in range(len(seq_lens) if seq_lens else steps):
                S = seq_lens[step] if seq_lens else setup.seq_len
                for micro in range(accum):
                    at = f"step{step}" if micro == 0 else f"step{step}.micro{micro}"
                    marks[f"{at}.forward"] = len(rec.events)
                    if lever is not None:  # trl's training_step: activation offloading's context
                        lever.step_begin()
                    # the batch's attention_mask, moved to the GPU with it; all ones, so with sdpa the
                    # model (given none) builds the same causal attention; eager joins it to the causal
                    # mask as a (B, 1, S, S) bool (H100 memory history of smollm2-135m eager), so it
                    # gets it
                    ids, mask, labels, more = _step_batch(B, S, lever)
                    rec.backward = False
                    ac = trace._autocast_mode(ac_dtype) if ac_dtype is not None else contextlib.nullcontext()
                    with ac:
                        extra = {"fused_lm_head": True} if fused_loss else {}
                        if key.attn == "eager" and mask is not None:  # the padding mask joins the causal one
                            extra["attention_mask"] = mask
                        out = model(input_ids=ids, labels=labels, **extra, **more)
                    if ac_dtype is not None:
                        out = _outputs_to_fp32(out)
                    loss = out.loss if accum == 1 else out.loss / accum  # the Trainer's scaling
                    del out, ac
                    marks[f"{at}.backward"] = len(rec.events)
                    rec.backward = True
                    loss.backward()
                    del loss, ids, mask, labels, more
                    rec.backward = False
                    if lever is not None:
                        lever.step_end()
                marks[f"step{step}.clip"] = len(rec.events)
                _clip_grad_norm(params, 1.0)
                marks[f"step{step}.optimizer"] = len(rec.events)
                opt.step()
                marks[f"step{step}.post_step"] = len(rec.events)
                for p in params:
                    p.grad = None
            if after:
                train, rec.events = rec.events, []
                post = _record_after(rec, model, setup, key, ac_dtype, eval_batch or B, steps == 0, quantized_count,
                                     lever)
                rec.events = train
        marks["end"] = len(rec.events)
    finally:
        if orig_fused is not None:
            import torch.optim.optimizer as opt_mod

            opt_mod._get_fused_kernels_supported_devices = orig_fused
    host = {"host": lever.host()} if lever is not None else {}  # activation offloading's pinned host memory
    if after:
        train = list(rec.events)  # what dies later is not the run's
        return {"events": _sum_in_place(train, rec.sums, marks), "marks": marks, "after": post, **host}
    return {"events": _sum_in_place(rec.events, rec.sums, marks), "marks": marks, **host}
