"""(ModelSpec, Setup, ActivationProfile) -> Breakdown, in bytes.  Pure: no torch, no I/O.

A training step is walked phase by phase (forward to the loss, backward layer by layer, the
optimizer step) and the peak is the largest phase, not the sum of component maxima.
Optimizer states exist from the first optimizer step on, so later steps' forward and backward
carry them; gradients are freed after each step (`zero_grad(set_to_none=True)`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from vramfit.memory.constants import DEFAULT, Constants
from vramfit.memory.setup import DTYPE_BYTES, Setup

FP32 = 4


@dataclass(frozen=True)
class Breakdown:
    """Every byte of one training step, by component, and the three peaks a user sees."""

    components: dict  # name -> bytes (what is held at the peak phase, plus context)
    phases: dict  # forward / backward / optimizer -> torch allocated bytes at that phase's peak
    peak_phase: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_bytes: int
    params_total: int  # as peft's print_trainable_parameters counts: adapters included
    params_trainable: int
    params_packed: int  # the base model's raw element count, 4-bit weights as packed uint8 (half)
    notes: tuple = field(default=())
    # pinned host memory the run holds besides the GPU's (activation offloading's copies): not in any
    # of the GPU figures above
    host_bytes: int = 0


# --------------------------------------------------------------------------- parameters


def _lora_params(spec, targets, r: int) -> tuple[int, list]:
    """(total adapter params, per-tensor sizes) for LoRA A (r x in) and B (out x r) per target."""
    by_name = {l.name: l for l in spec.linears}
    sizes = []
    for t in targets:
        l = by_name[t]
        sizes += [r * l.in_features, l.out_features * r]
    return sum(sizes), sizes


def _nf4_bytes(numel: int, c: Constants, double_quant: bool) -> int:
    blocks = math.ceil(numel / c.nf4_blocksize)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + FP32 * blocks
    return packed + blocks + FP32 * math.ceil(blocks / c.nf4_dq_blocksize) + 256 * FP32


@functools.lru_cache(maxsize=1024)
def _quant_totals(spec, c: Constants, double_quant: bool) -> tuple[int, int, int]:
    """(quantized elements, their NF4 bytes, largest quantized layer) for the model."""
    quant = spec.quantizable_linears()
    return (sum(l.numel for l in quant), sum(_nf4_bytes(l.numel, c, double_quant) for l in quant),
            max((l.numel for l in quant), default=0))


@functools.lru_cache(maxsize=4096)
def _lora_total(spec, targets: tuple, r: int) -> int:
    return _lora_params(spec, targets, r)[0]


def weight_bytes(spec, s: Setup, targets, c: Constants = DEFAULT) -> dict:
    """Bytes of the base weights by storage dtype, and of the LoRA adapters."""
    pbytes = DTYPE_BYTES[s.param_dtype]
    out = {}
    if s.method == "qlora":
        q_numel, q_bytes, _ = _quant_totals(spec, c, s.double_quant)
        # prepare_model_for_kbit_training casts every non-quantized parameter (embeddings, norms,
        # LM head, biases) to fp32; without it they stay as loaded (16-bit).
        out["weights_4bit"] = q_bytes
        ub = _unquantized_bytes(s)
        out[f"weights_{'fp32' if ub == FP32 else '16bit'}_unquantized"] = (spec.params_total - q_numel) * ub
    else:
        out[f"weights_{s.param_dtype}"] = spec.params_total * pbytes
    if s.method != "full":
        # peft's autocast_adapter_dtype=True keeps adapters in fp32 over bf16/fp16 bases (trl casts QLoRA's back)
        out["lora_adapters"] = _lora_total(spec, tuple(targets), s.lora_r) * DTYPE_BYTES[s.adapter_dtype]
    return out


class _Tensors(tuple):
    """A tuple that hashes once: the caches below are keyed by a model's whole tensor list, and the
    planner looks them up for every candidate."""

    def __hash__(self):
        h = self.__dict__.get("hash")
        if h is None:
            h = self.__dict__["hash"] = tuple.__hash__(self)
        return h

    def __reduce__(self):  # never carry a hash into another process (string hashes are salted per process)
        return _Tensors, (tuple(self),)


def _as_tensors(tensors) -> tuple:
    return tensors if isinstance(tensors, tuple) else tuple(tensors)


def _unquantized_bytes(s: Setup) -> int:
    """Bytes per element of QLoRA's non-quantized weights: fp32 after prepare_model_for_kbit_training."""
    return FP32 if s.kbit_upcast else 2


def _head_weight_bytes(s: Setup) -> int:
    """Bytes per element of the LM head's weight (QLoRA's: as prepare_model_for_kbit_training left it)."""
    return _unquantized_bytes(s) if s.method == "qlora" else DTYPE_BYTES[s.param_dtype]


def trainable_tensors(spec, s: Setup, targets) -> tuple:
    """[(numel, dtype_bytes, role, shape)] of the parameters the optimizer sees."""
    return _trainable_tensors(spec, s.method, s.param_dtype, tuple(targets), s.lora_r, DTYPE_BYTES[s.adapter_dtype])


@functools.lru_cache(maxsize=4096)
def _trainable_tensors(spec, method: str, param_dtype: str, targets: tuple, lora_r: int, ab: int = FP32) -> tuple:
    if method == "full":
        pb = DTYPE_BYTES[param_dtype]
        out = []
        for shape, count, role in spec.param_shapes:
            n = math.prod(shape)
            out += [(n, pb, role, tuple(shape))] * count
        return _Tensors(out)
    by_name = {l.name: l for l in spec.linears}
    out = []
    for t in targets:
        l = by_name[t]
        out.append((lora_r * l.in_features, ab, "lora", (lora_r, l.in_features)))
        out.append((l.out_features * lora_r, ab, "lora", (l.out_features, lora_r)))
    return _Tensors(out)


def optimizer_state_bytes(tensors, s: Setup, c: Constants = DEFAULT) -> int:
    """States as each optimizer really stores them."""
    return _state_bytes(_as_tensors(tensors), s.optimizer, c)


@functools.lru_cache(maxsize=4096)
def _state_bytes(tensors: tuple, o, c: Constants) -> int:
    total = 0
    for numel, pb, role, shape in tensors:
        if o.states == 0:
            continue
        if o.factored:  # Adafactor: row and column second moments for matrices, fp32
            if len(shape) >= 2:
                total += (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) * o.state_bytes
            else:
                total += numel * o.state_bytes
            continue
        if o.eight_bit:
            # Trainer registers nn.Embedding weights for 32-bit states; small tensors stay 32-bit.
            if role == "embeddings" or numel < c.bnb_min_8bit_size:
                total += o.states * numel * FP32
            else:
                blocks = math.ceil(numel / c.bnb_optim_blocksize)
                total += o.states * (numel + FP32 * blocks)
            continue
        total += o.states * numel * (o.state_bytes or pb)
    return total


def optimizer_step_temp_bytes(tensors, s: Setup, spec) -> int:
    """Temporaries of one optimizer step beyond states and gradients."""
    return _step_temp(_as_tensors(tensors), s.optimizer)


@functools.lru_cache(maxsize=4096)
def _step_temp(tensors: tuple, o) -> int:
    if o.foreach_temp:  # _multi_tensor_adamw: exp_avg_sq.sqrt() for all tensors at once
        return sum(n * (o.state_bytes or pb) for n, pb, _, _ in tensors)
    if o.factored and tensors:  # transformers Adafactor works per tensor, in fp32
        n, pb, _, _ = max(tensors)
        upcasts = 2 if pb < FP32 else 0  # fp32 copies of grad and param
        return n * FP32 * (3 + upcasts)
    return 0


@functools.lru_cache(maxsize=4096)
def _grad_totals(tensors: tuple) -> tuple[int, int]:
    """(all gradient bytes, those outside the decoder layers: embeddings and LM head)."""
    total = sum(n * pb for n, pb, _, _ in tensors)
    outside = sum(n * pb for n, pb, role, _ in tensors if role in ("embeddings", "lm_head"))
    return total, outside


# --------------------------------------------------------------------------- activations


def logits_dtype_bytes(s: Setup) -> int:
    if s.autocast_dtype:
        return DTYPE_BYTES[s.autocast_dtype]
    if s.kbit_upcast:  # LM head and final norm were cast to fp32
        return FP32
    return DTYPE_BYTES[s.param_dtype]


def loss_transients(spec, s: Setup) -> tuple[int, int]:
    """Bytes beyond the saved log-softmax at the loss: (forward, backward).

    Forward: the logits in their dtype plus transformers' fp32 upcast (`logits.float()`).
    Backward: the gradient of the log-probabilities (nll) and of the logits (log-softmax), fp32.
    """
    t = s.tokens * spec.vocab_size
    lb = logits_dtype_bytes(s)
    fwd = t * lb + (t * FP32 if lb != FP32 else 0)
    bwd = 2 * t * FP32
    return fwd, bwd


# trl's fused LM head (trl.kernels.chunked_logprob): TOKEN_CHUNK_SIZE rows by
# trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE vocabulary columns per tile
TRL_TOKEN_CHUNK = 4096
TRL_VOCAB_CHUNK = 32768


@dataclass(frozen=True)
class HeadTerms:
    """The LM head and the loss, by how the loss is computed (Setup.loss)."""

    saved_delta: int  # change to the traced saved bytes outside the layers (traced: the logits path)
    saved_head: int  # saved bytes the head's backward frees (the log-softmax output; the fused head's inputs)
    fwd: int  # transient bytes at the loss in the forward
    bwd: int  # transient bytes at the loss in the backward
    dlogits: int  # the logits' gradient, held through the LM head's backward
    largest_block: int  # the largest transient block: what the allocator caches after the loss


def head_terms(spec, s: Setup, profile) -> HeadTerms:
    T, V, H = s.tokens, spec.vocab_size, spec.hidden_size
    logprobs = T * V * FP32  # saved by log_softmax: inside the traced outside-layers bytes
    if s.loss != "fused" and liger_applies(spec, s):
        return _liger_head_terms(spec, s, profile, logprobs)
    if s.loss != "fused":
        fwd, bwd = loss_transients(spec, s)
        return HeadTerms(0, logprobs, fwd, bwd, T * V * logits_dtype_bytes(s), logprobs)
    # trl's ChunkedLogProbFunction on CUDA (compact: only positions with a label; every position is
    # counted here, an upper bound when prompts are masked).  Forward: the masked hidden states
    # (a copy), seven fp32 statistics per token and one tile; saved: the hidden copy, log_z, the
    # entropy and the labels (as the logits path's nll_loss saves them).  Backward: fp32 gradients of the hidden states (and of the head's
    # weight when it trains), cast back to their dtypes on return, and the tile again.
    hb = profile.residual_dtype_bytes  # the final norm's output dtype
    cb = DTYPE_BYTES[s.autocast_dtype] if s.autocast_dtype else hb
    wb = _head_weight_bytes(s)
    trainable = s.method == "full"
    rows, cols = min(T, TRL_TOKEN_CHUNK), min(V, TRL_VOCAB_CHUNK)
    tile = rows * TRL_VOCAB_CHUNK * cb  # allocated at the full chunk width, whatever the vocabulary
    copies = (rows * H * cb if hb != cb else 0) + (cols * H * cb if wb != cb else 0)
    hidden_copy = T * H * hb
    small = T * (FP32 + FP32)  # log_z and the entropy (the int64 labels are saved on both paths)
    # the logits path's LM head saved its input only when its weight trains: the copy replaces it then
    saved = small + hidden_copy
    delta = saved - logprobs - (hidden_copy if trainable else 0)
    if s.autocast_dtype:  # no autocast copy of the head's weight (the traced constant outside the layers)
        delta -= min(max(0, int(profile.outside.const)), V * H * cb)
    fwd = tile + copies + 10 * T * FP32  # statistics, log-probs, entropy, is_top1
    grad_w = (V * H * FP32 + (V * H * wb if wb != FP32 else 0)) if trainable else 0
    bwd = T * H * FP32 + (T * H * hb if hb != FP32 else 0) + grad_w + tile + copies + T * FP32
    return HeadTerms(delta, saved, fwd, bwd, 0, max(tile, V * H * FP32 if trainable else 0))


def liger_applies(spec, s: Setup) -> bool:
    """liger-kernel patches this model (vramfit.memory.setup.LIGER_MODEL_TYPES, liger-kernel 0.8.5)."""
    from vramfit.memory.setup import liger_supported

    return s.liger and liger_supported(spec.model_type)


def _liger_head_terms(spec, s: Setup, profile, logprobs: int) -> HeadTerms:
    """liger's fused linear cross-entropy (the model's own loss under use_liger_kernel, liger-kernel
    0.8.5 `fused_linear_cross_entropy_forward`, vramfit.memory.levers): no logits; in the forward,
    chunks of `chunk` tokens x vocabulary logits (one buffer, mm out=) turned into their gradient in
    place, the input's gradient (tokens x hidden, kept for the backward, where it is scaled in place)
    and, when the head trains, its weight's gradient (kept too)."""
    T, V, H = s.tokens, spec.vocab_size, spec.hidden_size
    hb = profile.residual_dtype_bytes
    cb = DTYPE_BYTES[s.autocast_dtype] if s.autocast_dtype else hb
    wb = _head_weight_bytes(s)
    inc = -(-V // H)
    chunk = min(T, 1 << max(0, (-(-T // inc) - 1).bit_length()))
    grad_w = V * H * wb if s.method == "full" else 0
    saved = T * H * hb + grad_w
    delta = saved - logprobs - (T * H * hb if s.method == "full" else 0)
    if s.autocast_dtype:  # no autocast copy of the head's weight kept
        delta -= min(max(0, int(profile.outside.const)), V * H * cb)
    casts = (V * H * cb if wb != cb else 0) + (chunk * H * cb if hb != cb else 0)  # mixed precision's per-chunk casts
    fwd = chunk * V * cb + casts + 2 * T * FP32
    return HeadTerms(delta, saved, fwd, 0, 0, chunk * V * cb + casts)


def packed_mask_terms(spec, s: Setup) -> tuple[int, int]:
    """(bytes per layer, bytes for the forward) of packing's block-diagonal mask under sdpa
    (vramfit.memory.levers): each layer's SDPA call makes the (T x T) bool mask additive in the
    query's dtype for the memory-efficient kernel, which keeps it for the backward; the bool mask
    itself lives through the forward.  (0, 0) without packing, for eager attention (traced) or a
    micro-batch of one example."""
    from vramfit.memory.levers import single_sequence

    if not s.packing or s.attn == "eager" or single_sequence(s):  # eager's mask is traced
        return 0, 0
    T = s.tokens
    qb = DTYPE_BYTES[s.compute_dtype]
    return T * T * qb, T * T


# --------------------------------------------------------------------------- the step


def breakdown(spec, s: Setup, targets, profile, c: Constants = DEFAULT, sharding=None) -> Breakdown:
    """`sharding`: one GPU's terms under a distributed strategy (`vramfit.memory.distributed.Sharding`):
    its weights, gradients and optimizer bytes replace the single-GPU ones, and its buffers
    (all-gathered layers, gradient buckets) are added to the phases they live in."""
    B, S, T = s.micro_batch, s.seq_len, s.tokens
    notes = []
    weights = weight_bytes(spec, s, targets, c)
    W = sum(weights.values())
    tensors = trainable_tensors(spec, s, targets)
    G, G_out = _grad_totals(tensors)
    O = optimizer_state_bytes(tensors, s, c)
    paged = O if s.optimizer.paged else 0
    O_torch = O - paged
    opt_temp = optimizer_step_temp_bytes(tensors, s, spec)
    ws = c.cublas_workspace_bytes
    G_step, extra = G, {}
    if sharding is not None:
        weights, G, G_out, G_step = dict(sharding.weights), sharding.grads, sharding.grads_outside, sharding.grads_step
        W, O_torch, opt_temp, paged, extra = sum(weights.values()), sharding.optimizer, sharding.optimizer_temp, 0, \
            sharding.extra

    n_layers = len(profile.layers)
    # a sharded engine gathers params in the compute dtype: autocast makes no weight copies then
    drop = sharding is not None and sharding.no_weight_copies
    # the layers share a few Region objects (the last traced one stands for the untraced rest)
    regions = {id(r): r for r in profile.layers}.values()
    per_region = {id(r): int(c.activation_scale * (r.bytes(B, S) - (r.const if drop else 0))) for r in regions}
    layer_saved = [per_region[id(r)] for r in profile.layers]
    ht = head_terms(spec, s, profile)
    outside_saved = int(c.activation_scale * profile.outside.bytes(B, S)) + ht.saved_delta
    fwd_loss, bwd_loss = ht.fwd, ht.bwd
    logprobs = ht.saved_head  # inside outside_saved, freed by the LM head's backward
    max_tensor = max((int(B * r.max_tensor_lin * S) for r in regions), default=0)
    # the largest saved tensor is per token, or seq x seq (eager or math-path attention scores)
    max_sq = max((int(B * r.max_tensor_quad * S * S) for r in regions), default=0)
    layer_transient = int(c.layer_backward_factor * max(max_tensor, max_sq) + 2 * profile.layer_input_lin * T)
    if s.method == "qlora":  # dequantize_4bit(W) in bf16 for the input gradient of each 4-bit layer
        layer_transient += _quant_totals(spec, c, s.double_quant)[2] * 2

    mask_layer, mask_fwd = packed_mask_terms(spec, s)
    if mask_layer and not s.grad_ckpt:
        layer_saved = [b + mask_layer for b in layer_saved]
    elif mask_layer:  # recomputed per layer in the backward; the bool mask is a checkpointed input
        layer_transient += mask_layer
    if s.grad_ckpt:
        kept_per_layer = int(profile.layer_input_lin * T)
        kept_shared = int(profile.shared_input_lin * T) + mask_fwd
        A_fwd = outside_saved + kept_per_layer * n_layers + kept_shared
    else:
        A_fwd = outside_saved + sum(layer_saved)

    host = 0
    if s.activation_offloading:
        # trl's activation offloading (vramfit.memory.levers), roughly: the saved tensors go to pinned host
        # memory; the GPU keeps the last few of the forward and, in the backward, two layers' worth
        host = _pow2(A_fwd)
        l_top = max(layer_saved, default=0) if not s.grad_ckpt else int(profile.layer_input_lin * T)
        A_fwd = min(A_fwd, 2 * l_top + (logprobs if s.loss != "fused" else 0))
        layer_saved = [min(b, l_top) for b in layer_saved]
    G_layers = G - G_out
    g_layer = G_layers / max(n_layers, 1)

    persist = W + O_torch + ws
    # autocast keeps bf16 copies of trainable weights until the forward ends; without
    # checkpointing they are saved for backward anyway (inside layer_saved), with it they are not
    weight_copies = sum(r.const for r in profile.layers) if s.grad_ckpt and not drop else 0
    layer_fwd = int(c.layer_backward_factor * max_tensor) if s.grad_ckpt else 0  # one layer, unsaved
    forward = persist + A_fwd + weight_copies + max(fwd_loss, layer_fwd) + extra.get("forward", 0) \
        + (mask_fwd if not s.grad_ckpt else 0)
    # Backward, walked from the loss down to the first layer; every term is linear in the layer
    # index, so the two ends bound the walk.
    at_loss = persist + A_fwd + bwd_loss
    dlogits = ht.dlogits
    head_copy = max(0, int(profile.outside.const)) if s.loss != "fused" else 0
    head_freed = logprobs + head_copy  # log-probs (or the fused head's inputs), LM-head weight copy
    l_max = max(layer_saved, default=0)
    # the logits' gradient (dlogits) is freed once the LM head's backward is done, before the top
    # layer's: it belongs to at_loss and to the head, not to the layers' walk
    head = persist + A_fwd - logprobs + dlogits + G_out
    if s.grad_ckpt:
        top = A_fwd - head_freed + l_max + G_out + g_layer + layer_transient
        bottom = kept_shared + kept_per_layer + l_max + G + layer_transient
    else:
        top = A_fwd - head_freed + G_out + g_layer + layer_transient
        bottom = (layer_saved[0] if layer_saved else 0) + G + layer_transient
    top_extra = extra.get("backward_top", 0)
    backward = max(at_loss + top_extra, head + top_extra, persist + top + top_extra,
                   persist + bottom + extra.get("backward_bottom", 0))
    optimizer = W + G_step + O_torch + opt_temp + ws + extra.get("optimizer", 0)
    phases = {"forward": int(forward), "backward": int(backward), "optimizer": int(optimizer)}
    peak_phase = max(phases, key=phases.get)
    peak_alloc = phases[peak_phase]

    reserve = max(c.reserve_floor_bytes, int(c.reserve_const_bytes + c.reserve_per_logits_byte * ht.largest_block
                                             + c.reserve_per_activation_byte * (A_fwd - logprobs)
                                             + c.reserve_per_optimizer_temp_byte * opt_temp))
    peak_reserved = peak_alloc + reserve
    # paged optimizer states live in CUDA managed memory: nvidia-smi does not count them for the
    # process (measured: device - reserved is the same with and without them)
    device = peak_reserved + c.cuda_context_bytes + c.kernel_growth_bytes
    if sharding is not None:
        device += sharding.device_extra  # NCCL's buffers: outside torch's allocator

    comps = dict(weights)
    comps["gradients"] = G if peak_phase != "forward" else 0
    comps["optimizer_states"] = O_torch
    if paged:
        comps["optimizer_states_paged"] = paged
        notes.append("paged optimizer states live in CUDA managed memory: counted neither by torch nor by "
                     "nvidia-smi for the process, and moved to host memory when the GPU runs short")
    if peak_phase == "forward":
        comps["activations"] = A_fwd - logprobs
        comps["logits_and_loss"] = logprobs + fwd_loss
    elif peak_phase == "backward":
        comps["activations"] = A_fwd - logprobs
        comps["logits_and_loss"] = logprobs + bwd_loss
        comps["gradients"] = G
        comps["backward_transients"] = max(0, backward - persist - A_fwd - bwd_loss - G)
    else:
        comps["activations"] = 0
        comps["gradients"] = G_step
        comps["optimizer_step_temporaries"] = opt_temp
    if sharding is not None:
        buffers = sharding.components(peak_phase)
        comps.update(buffers)
        if "backward_transients" in comps:
            comps["backward_transients"] = max(0, comps["backward_transients"] - sum(buffers.values()))
    comps["cublas_workspace"] = ws
    comps["allocator_reserve"] = reserve
    comps["cuda_context"] = c.cuda_context_bytes + c.kernel_growth_bytes
    if sharding is not None and sharding.device_extra:
        comps["nccl_buffers"] = sharding.device_extra
    comps = {k: int(v) for k, v in comps.items()}

    lora_n = _lora_total(spec, tuple(targets), s.lora_r) if s.method != "full" else 0
    total = spec.params_total + lora_n
    trainable = spec.params_total if s.method == "full" else lora_n
    packed = spec.params_total  # the base model alone, as model.num_parameters() shows it
    if s.method == "qlora":
        packed -= _quant_totals(spec, c, s.double_quant)[0] // 2
    return Breakdown(components=comps, phases=phases, peak_phase=peak_phase,
                     peak_allocated_bytes=int(peak_alloc), peak_reserved_bytes=int(peak_reserved),
                     device_bytes=int(device), params_total=total, params_trainable=trainable,
                     params_packed=packed, notes=tuple(notes), host_bytes=int(host))


def _pow2(n: int) -> int:
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()
