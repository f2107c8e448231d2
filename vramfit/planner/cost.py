"""The cost model: seconds per training token of a setup on a GPU.

Matmul FLOPs per token for the architecture over the GPU's dense tensor TFLOPS times an efficiency
that grows with the micro-batch's tokens, plus memory-bound traffic (4-bit dequantization,
autocast weight casts, the loss over the vocabulary, the optimizer step) over bandwidth, plus a
fixed launch overhead per decoder layer and pass.  Its constants are guesses until
`fit_cost_model` calibrates them on measured tokens/s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from vramfit.errors import VramfitError
from vramfit.memory.setup import DTYPE_BYTES, OPTIMIZERS, Setup, resolve_targets
from vramfit.planner.levers import speed_factor


# Memory traffic of one optimizer step relative to one fused pass over params, grads and states.
# torch's foreach AdamW runs ~a dozen foreach kernels (each a pass); Adafactor works per tensor in
# Python.  Guesses until calibrated.
OPTIM_TRAFFIC_FACTOR = {"adamw_torch_fused": 1.0, "adamw_torch": 2.5, "adamw_bnb_8bit": 1.0, "adamw_8bit": 1.0,
                        "paged_adamw_8bit": 1.2, "paged_adamw_32bit": 1.2, "adafactor": 4.0, "sgd": 1.0}


@dataclass(frozen=True)
class CostModel:
    """Named constants of the cost model.  Three are fitted on measured tokens/s (below), the
    rest are priors; `fit_cost_model` refits them on another GPU's measurements."""

    # Best fraction of the dense peak a transformers Trainer step reaches on big matmuls (MFU).
    # mfu_max, layer_overhead_s, adapter_overhead_s and dequant_bytes_per_param are fitted (relative
    # least squares) on tokens/s of 88 Trainer runs: the H100 plan proof's Qwen2.5 trials
    # (0.5B-14B, micro-batches of 2,048 tokens and less, 2026-11-23) and the accuracy harness runs
    # with an even case id (H200/H100); held out, the plan proof's Llama trials and the odd ids (63
    # runs): median |error| 25% (29% before this fit, which had only the H200 runs).  Ranking is
    # what the planner needs: among the setups the plan proof ran at each budget, the one this fit
    # ranks first is within 10% of the fastest measured in 18 of 18 (7 before).
    # `python -m benchmarks.plan_proof.fit_cost benchmarks/results/h100-2026-11-23-plan-proof-2.jsonl`.
    mfu_max: float = 0.657
    # Micro-batch tokens at which the efficiency is half of mfu_max: eff = mfu_max * T / (T + T_half).
    half_efficiency_tokens: float = 512.0
    # Fixed time per decoder layer per pass (forward, 2 x backward, recompute): an eager layer
    # launches ~15-25 kernels per pass at ~5 us each, plus Python; small models at small
    # micro-batches are bound by it.
    layer_overhead_s: float = 1.105e-3  # fitted; also absorbs the Trainer's per-step work
    # Fixed time per adapted module per layer pass (LoRA/QLoRA): peft's Python forward and the
    # adapter's own kernels (dropout, A, B, scale, add) and their backward.  Small LoRA models at
    # small micro-batches are bound by it: on the H100 plan proof (2026-11-23) LoRA ran 1.5-2x
    # slower than full fine-tuning of the same model and micro-batch.
    adapter_overhead_s: float = 7.4e-6  # fitted
    # FlashAttention-2's backward runs 5 matmuls to the forward's 2 (Dao 2023).
    attention_backward_factor: float = 2.5
    # Packed rows under SDPA (trl's padding-free packing): transformers gives the one flattened row a
    # block-diagonal causal mask, and SDPA's masked kernel computes the whole (tokens x tokens) square,
    # at this many times flash attention's cost per FLOP.  Fitted on the 6 packing twins of the H100
    # levers grid (benchmarks/results/h100-2026-12-07d-levers.jsonl): predicted packed / unpacked
    # tokens/s within 0.08 of the measured ratio on average (0.18 with one flat factor for packing).
    masked_attention_cost: float = 1.5
    # fp32 matmuls without TF32 run at ~1/8 (T4, V100) to ~1/15 (A100, H100) of the fp16 peak.
    fp32_matmul_fraction: float = 1 / 12
    # Effective bytes per 4-bit weight per dequantization (forward, backward, recompute).  The ideal
    # traffic is 4.5 (0.5 read + 2 written + 2 read by the matmul); QLoRA's reported cost, +39%
    # runtime over LoRA for a 7B on an A100 (Raschka, "Practical Tips for Finetuning LLMs Using
    # LoRA", 2023), implies ~16-19: bitsandbytes' kernels run far below bandwidth.
    dequant_bytes_per_param: float = 56.5  # fitted: absorbs all of QLoRA's extra work (fp32 adapters, casts)
    # Autocast's weight cast per forward: 4 bytes read + 2 written per fp32 weight.
    autocast_bytes_per_param: float = 6.0
    # The loss over the vocabulary: logits, fp32 upcast, log-softmax and their gradients, read and
    # written ~6 times in fp32, per vocabulary entry and token.
    loss_bytes_per_logit: float = 24.0
    # Fraction of peak bandwidth that memory-bound kernels reach.
    bandwidth_efficiency: float = 0.7
    # Host <-> GPU migration of CUDA managed memory: the paged optimizers' states that do not fit
    # next to torch's reserved memory are evicted to host RAM and brought back at every optimizer
    # step (about their size each way).  PCIe 4.0 / 5.0 x16 peak at 32 / 64 GB/s; fault-driven
    # migration reaches well under that.  A prior: the plan proof measures it with a ballast.
    host_link_bytes_per_s: float = 12e9
    source: str = "fitted on 88 H100/H200 runs (median |error| 25% on 63 held-out runs)"

    def efficiency(self, tokens: int) -> float:
        return self.mfu_max * tokens / (tokens + self.half_efficiency_tokens)


DEFAULT_COST = CostModel()


@functools.lru_cache(maxsize=64)
def matmul_params(spec) -> float:
    """Parameters a token meets in matmuls: everything but embeddings and norms, the LM head
    counted once even when tied to the embeddings, MoE experts scaled by k/E routed per token."""
    roles = spec.params_by_role
    n = spec.params_total - roles.get("embeddings", 0) - roles.get("norms", 0)
    if spec.tied_embeddings:
        n += spec.vocab_size * spec.hidden_size
    if spec.num_experts and spec.experts_per_token:  # shared experts are scaled too: an approximation
        n -= roles.get("mlp", 0) * (1 - spec.experts_per_token / spec.num_experts)
    return float(n)


@functools.lru_cache(maxsize=64)
def quantized_params(spec) -> int:
    """Weights bitsandbytes stores in 4 bits: every Linear but the LM head."""
    return sum(l.numel for l in spec.quantizable_linears())


@functools.lru_cache(maxsize=1024)
def adapter_params(spec, targets: tuple, r: int) -> int:
    """LoRA A (r x in) and B (out x r) of every target layer."""
    by_name = {l.name: l for l in spec.linears}
    return sum(r * (by_name[t].in_features + by_name[t].out_features) for t in targets)


def attention_flops_per_token(spec, seq_len: int) -> float:
    """Forward FLOPs of QK^T and AV per token, causal: 2 * 2 * (S/2) * heads * head_dim per layer."""
    return 2.0 * seq_len * spec.num_heads * spec.head_dim * spec.num_layers


def train_flops_per_token(spec, s: Setup, targets: tuple, cost: CostModel = DEFAULT_COST) -> tuple[float, float]:
    """Matmul FLOPs of one training token: (at the compute dtype, in fp32).

    N matmul parameters, A attention forward FLOPs (packed rows: the masked square of the flattened
    micro-batch under SDPA, the examples under flash attention), a adapter parameters, H = vocab x hidden:
    full:  forward 2N + A, backward 4N (input and weight gradients) + 2.5 A
    LoRA:  forward 2N + A + 2a, backward 2N (input gradients: the base is frozen) + 2.5 A + 4a
    checkpointing: one more forward of the decoder layers (not of the LM head).
    In fp32: LoRA adapters without autocast (peft keeps them fp32 and casts their input up), and
    QLoRA's LM head without autocast (prepare_model_for_kbit_training casts it to fp32).
    """
    n = matmul_params(spec)
    head = 2.0 * spec.vocab_size * spec.hidden_size
    attn = attention_flops_per_token(spec, s.seq_len)
    if s.packing and s.attn == "flash_attention_2":  # varlen: each example attends within itself
        attn = attention_flops_per_token(spec, min(s.seq_len, int(s.extras.get("example_len") or s.seq_len)))
    elif s.packing:  # the flattened row's whole masked square (2 x tokens: no causal half skipped)
        attn = attention_flops_per_token(spec, 2 * s.tokens) * cost.masked_attention_cost
    layers_fwd = 2.0 * n - head + attn
    main = 2.0 * n + attn * (1 + cost.attention_backward_factor) + (layers_fwd if s.grad_ckpt else 0.0)
    fp32 = 0.0
    if s.method == "full":
        main += 4.0 * n
    else:
        main += 2.0 * n
        ad = 2.0 * adapter_params(spec, tuple(targets), s.lora_r)
        adapters = ad * (3 + int(s.grad_ckpt))
        if s.autocast_dtype or s.param_dtype == "float32":
            main += adapters
        else:
            fp32 += adapters
        if s.kbit_upcast and not s.autocast_dtype:
            main -= 2 * head  # forward and input gradient of the head
            fp32 += 2 * head
    if s.compute_dtype == "float32":
        main, fp32 = 0.0, main + fp32
    return main, fp32


def model_flops_per_token(spec, s: Setup, targets: tuple) -> float:
    """The FLOPs a training token needs by the model's arithmetic (what MFU divides by the peak): the
    matmuls of `train_flops_per_token` without checkpointing's recompute and with causal attention over
    the sequence (packed rows: over the examples, not the masked square SDPA computes).  Full
    fine-tuning ~6 N per token, LoRA ~4 N (no weight gradients of the frozen base), plus attention."""
    plain = s.with_(grad_ckpt=False, packing=False)
    if s.packing:
        plain = plain.with_(seq_len=min(s.seq_len, int(s.extras.get("example_len") or s.seq_len)))
    main, fp32 = train_flops_per_token(spec, plain, targets)
    return main + fp32


def micro_step_traffic_bytes(spec, s: Setup, cost: CostModel = DEFAULT_COST) -> tuple[float, float]:
    """Memory-bound bytes of one micro-step that the FLOP count misses: (4-bit dequantization,
    everything else: the loss over the vocabulary and autocast's weight casts)."""
    quant = quantized_params(spec)
    other = s.tokens * spec.vocab_size * cost.loss_bytes_per_logit
    dequant = 0.0
    if s.method == "qlora":  # forward, backward (input grads), recompute
        dequant = (2 + int(s.grad_ckpt)) * quant * cost.dequant_bytes_per_param
    elif s.autocast_dtype and s.param_dtype == "float32":  # cast per forward (and recompute)
        other += (1 + int(s.grad_ckpt)) * quant * cost.autocast_bytes_per_param
    return dequant, other


def optimizer_step_bytes(spec, s: Setup, targets: tuple) -> float:
    """Bytes one optimizer step reads and writes: params, grads (clipping reads them once more),
    states; scaled by how many passes the optimizer's implementation makes."""
    if s.method == "full":
        n, pb = spec.params_total, DTYPE_BYTES[s.param_dtype]
    else:
        n, pb = adapter_params(spec, tuple(targets), s.lora_r), 4
    o = OPTIMIZERS[s.optim]
    state = 2 * o.states * (1 if o.eight_bit else (o.state_bytes or pb))
    if o.factored:
        state = 0.1  # row and column moments: a sliver of the parameter size
    return n * (4 * pb + state) * OPTIM_TRAFFIC_FACTOR.get(s.optim, 1.0)


def _peak_flops(device, s: Setup, cost: CostModel) -> tuple[float, float]:
    """(compute dtype, fp32) dense peaks in FLOP/s."""
    low = device.tflops("float16" if s.compute_dtype == "float32" else s.compute_dtype) * 1e12
    return low, max(device.bf16_tflops, device.fp16_tflops) * 1e12 * cost.fp32_matmul_fraction


def adapted_modules_per_layer(spec, s: Setup, targets) -> int:
    """The LoRA adapters one decoder layer runs (0 for full fine-tuning)."""
    return 0 if s.method == "full" else len(tuple(targets))


def _micro_step_terms(spec, s: Setup, device, targets, cost: CostModel) -> tuple[float, float, float, float, float]:
    """One micro-step: (compute seconds at mfu 1, layer passes, adapter passes, dequant seconds,
    other traffic seconds)."""
    bw = device.bandwidth_bytes_per_s * cost.bandwidth_efficiency
    main, fp32 = train_flops_per_token(spec, s, targets, cost)
    peak, peak32 = _peak_flops(device, s, cost)
    shape = cost.efficiency(s.tokens) / cost.mfu_max
    compute = s.tokens * (main / peak + fp32 / peak32) / shape
    dequant, other = micro_step_traffic_bytes(spec, s, cost)
    passes = spec.num_layers * (3 + int(s.grad_ckpt))
    return compute, passes, passes * adapted_modules_per_layer(spec, s, targets), dequant / bw, other / bw


def seconds_per_token(spec, s: Setup, device, targets: tuple = (), cost: CostModel = DEFAULT_COST,
                      paging_bytes: float = 0.0) -> float:
    """Wall seconds per training token of one optimizer step (grad_accum micro-steps + the step).
    paging_bytes: paged optimizer states that do not fit on the GPU next to the rest
    (`paging_bytes`): moved in and out over the host link at every optimizer step."""
    compute, passes, adapter_passes, dequant, other = _micro_step_terms(spec, s, device, targets, cost)
    micro = (compute / cost.mfu_max + passes * cost.layer_overhead_s + adapter_passes * cost.adapter_overhead_s
             + dequant + other)
    bw = device.bandwidth_bytes_per_s * cost.bandwidth_efficiency
    step = s.grad_accum * micro + optimizer_step_bytes(spec, s, targets) / bw
    step += 2 * paging_bytes / cost.host_link_bytes_per_s
    # the memory levers' measured tokens/s factors (vramfit.planner.levers: 1.0 where not measured)
    return step / (s.tokens * s.grad_accum) / speed_factor(s)


def fit_cost_model(samples, base: CostModel = DEFAULT_COST) -> CostModel:
    """Calibrate the cost model on measured throughput: the calibration hook.

    samples: [(spec, setup, device, measured tokens/s)].  Per micro-step, measured time - other
    traffic - the optimizer's share = compute / mfu_max + passes * layer_overhead_s
    [+ adapter passes * adapter_overhead_s] [+ k * dequant], least squares without intercept on
    the relative error.
    The adapter term is fitted when both full fine-tuning and LoRA/QLoRA samples are given (else
    `base`'s value is kept); k, fitted only when QLoRA samples are given, scales
    dequant_bytes_per_param.  The other constants keep `base`'s values.
    """
    rows = []
    for spec, s, device, tps in samples:
        targets = resolve_targets(spec, s)
        compute, passes, adapter_passes, dequant, other = _micro_step_terms(spec, s, device, targets, base)
        bw = device.bandwidth_bytes_per_s * base.bandwidth_efficiency
        t = s.tokens / tps - other - optimizer_step_bytes(spec, s, targets) / bw / s.grad_accum
        rows.append(({"compute": compute, "passes": passes, "adapter": adapter_passes, "dequant": dequant}, t))
    cols = ["compute", "passes"]
    fit_adapter = any(f["adapter"] > 0 for f, _ in rows) and any(f["adapter"] == 0 for f, _ in rows)
    if fit_adapter:
        cols.append("adapter")
    if any(f["dequant"] > 0 for f, _ in rows):
        cols.append("dequant")
    known = 0.0 if fit_adapter else base.adapter_overhead_s
    # relative least squares: each row divided by its measured time, so a 30 ms step counts as
    # much as a 3 s one (the errors that matter are relative)
    coef = _least_squares([([f[c] / t for c in cols], (t - f["adapter"] * known) / t) for f, t in rows if t > 0])
    if coef is None or coef[0] <= 0:
        raise VramfitError(f"fit_cost_model needs at least {len(cols)} measurements that differ in size "
                           f"(and in method when LoRA or QLoRA are among them)")
    got = dict(zip(cols, coef))
    fitted = replace(base, mfu_max=1 / got["compute"], layer_overhead_s=max(got["passes"], 0.0),
                     source=f"fitted on {len(rows)} measurements")
    if fit_adapter:
        fitted = replace(fitted, adapter_overhead_s=max(got["adapter"], 0.0))
    if "dequant" in got:
        fitted = replace(fitted, dequant_bytes_per_param=max(got["dequant"], 0.0) * base.dequant_bytes_per_param)
    return fitted


def _least_squares(rows) -> list | None:
    """Solve min sum (f . c - t)^2 by the normal equations (Gauss-Jordan); None if singular."""
    k = len(rows[0][0])
    if len(rows) < k:
        return None
    a = [[sum(f[i] * f[j] for f, _ in rows) for j in range(k)] + [sum(f[i] * t for f, t in rows)] for i in range(k)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-30:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    return [a[i][k] / a[i][i] for i in range(k)]



def paging_bytes(bd, usable_bytes: int) -> int:
    """The paged optimizer states of breakdown `bd` that do not fit in `usable_bytes` beside the
    rest: torch's cache keeps its peak reserved for the whole run, so what the states find beside
    it is what they keep on the GPU; the rest migrates to host and back at every optimizer step."""
    paged = bd.components.get("optimizer_states_paged", 0)
    return max(0, min(paged, bd.device_bytes + paged - usable_bytes))

