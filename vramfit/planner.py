"""The planner: search over Setups for one model on one GPU -> Plan.

A recipe over the memory model: enumerate the knobs (method, precision, optimizer, gradient
checkpointing, allocator, micro-batch with the accumulation that keeps the effective batch),
predict each setup's device memory with `estimate_setup` (~0.1 ms each on a cached spec),
price each in seconds per training token with the cost model below, and keep the cheapest that
fits the budget (`prefer="speed"`) or the smallest (`prefer="memory"`).

Budget: the device's free memory (a probe's free memory, a profile's memory less the driver's
reservation, or the size given) minus the headroom; a setup fits when its predicted
`device_bytes` (what nvidia-smi shows for the process, CUDA context included) is within it.

The cost model (`CostModel`, `seconds_per_token`): matmul FLOPs per token for the architecture
over the GPU's dense tensor TFLOPS times an efficiency that grows with the micro-batch's tokens,
plus memory-bound traffic (4-bit dequantization, autocast weight casts, the loss over the
vocabulary, the optimizer step) over bandwidth, plus a fixed launch overhead per decoder layer
and pass.  Its constants are guesses until `fit_cost_model` calibrates them on measured tokens/s.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass, replace

from vramfit.convert import (
    bnb_config,
    bnb_config_kwargs,
    lora_config,
    lora_config_kwargs,
    model_kwargs,
    rename_checkpointing,
    training_arguments_kwargs,
)
from vramfit.errors import VramfitError
from vramfit.setup import DTYPE_BYTES, OPTIMIZERS, Setup, make_setup, resolve_targets

DEFAULT_EFFECTIVE_BATCH = 16
DEFAULT_SEQ_LEN = 2048
# 5% of the budget: larger than the memory model's typical error on the accuracy grid and than
# the allocator's run-to-run variation, small enough not to cost a micro-batch step on most cards.
DEFAULT_HEADROOM = "5%"
# One LoRA configuration for both LoRA and QLoRA, so the method is a memory/speed choice and not
# a quality one: rank 16 on every Linear but the LM head (the QLoRA paper, Dettmers et al. 2023,
# found adapters on all linear layers needed to match full fine-tuning; "all-linear" also names
# the right layers in every architecture), alpha = 2 x rank, dropout 0.05.
DEFAULT_LORA_R = 16
DEFAULT_TARGET_MODULES = "all-linear"
OPTIMS = ("adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
          "adafactor")
ALLOCATOR_CHOICES = ("default", "expandable")


def precisions_for(method: str, bf16: bool) -> tuple:
    """Precisions worth trying: bf16 where the GPU has it; else fp16 (never pure fp16 for full
    fine-tuning: AdamW's updates underflow in fp16 weights) and fp32."""
    if bf16:
        return ("bf16-true", "bf16-mixed")
    if method == "full":
        return ("16-mixed", "32-true")
    if method == "qlora":
        return ("16-true", "16-mixed")
    return ("16-true", "16-mixed", "32-true")


# --------------------------------------------------------------------------- cost model

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

    N matmul parameters, A attention forward FLOPs, a adapter parameters, H = vocab x hidden:
    full:  forward 2N + A, backward 4N (input and weight gradients) + 2.5 A
    LoRA:  forward 2N + A + 2a, backward 2N (input gradients: the base is frozen) + 2.5 A + 4a
    checkpointing: one more forward of the decoder layers (not of the LM head).
    In fp32: LoRA adapters without autocast (peft keeps them fp32 and casts their input up), and
    QLoRA's LM head without autocast (prepare_model_for_kbit_training casts it to fp32).
    """
    n = matmul_params(spec)
    head = 2.0 * spec.vocab_size * spec.hidden_size
    attn = attention_flops_per_token(spec, s.seq_len)
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
        if s.method == "qlora" and not s.autocast_dtype:
            main -= 2 * head  # forward and input gradient of the head
            fp32 += 2 * head
    if s.compute_dtype == "float32":
        main, fp32 = 0.0, main + fp32
    return main, fp32


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
    return step / (s.tokens * s.grad_accum)


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


# --------------------------------------------------------------------------- the search


def paging_bytes(bd, usable_bytes: int) -> int:
    """The paged optimizer states of breakdown `bd` that do not fit in `usable_bytes` beside the
    rest: torch's cache keeps its peak reserved for the whole run, so what the states find beside
    it is what they keep on the GPU; the rest migrates to host and back at every optimizer step."""
    paged = bd.components.get("optimizer_states_paged", 0)
    return max(0, min(paged, bd.device_bytes + paged - usable_bytes))


@dataclass(frozen=True)
class Candidate:
    setup: Setup
    device_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    seconds_per_token: float
    fits: bool
    # False: not evaluated, because a smaller micro-batch of the same setup already misses (memory
    # grows with the micro-batch); device_bytes is then that smaller one's, a lower bound.
    exact: bool = True
    # paged optimizer states (CUDA managed memory, outside device_bytes) and the part of them that
    # does not fit in the usable memory next to device_bytes, so pages to host at every step
    paged_bytes: int = 0
    paging_bytes: int = 0

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    def to_json(self) -> dict:
        return {**_setup_json(self.setup), "device_bytes": self.device_bytes,
                "peak_allocated_bytes": self.peak_allocated_bytes, "peak_reserved_bytes": self.peak_reserved_bytes,
                "tokens_per_s": round(self.tokens_per_s, 1), "fits": self.fits, "exact": self.exact,
                "paged_bytes": self.paged_bytes, "paging_bytes": self.paging_bytes}


@dataclass(frozen=True)
class Rejection:
    """A (method, precision) family that would run faster than the chosen setup but of which
    nothing fits: `candidate` is its smallest setup, `over_bytes` how far that misses."""

    candidate: Candidate
    over_bytes: int


@dataclass(frozen=True)
class Lever:
    """One knob of the chosen setup turned: what it would need and how fast it would run."""

    knob: str  # grad_ckpt | micro_batch | optim | precision | method | lora_r | seq_len | allocator
    candidate: Candidate
    delta_bytes: int  # candidate's device bytes minus the chosen one's
    speedup: float  # candidate's tokens/s over the chosen one's


def _setup_json(s: Setup) -> dict:
    d = asdict(s)
    d.pop("extras", None)
    if s.method == "full":
        for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules"):
            d[k] = None
    else:
        d["lora_alpha"] = s.lora_alpha or 2 * s.lora_r
    return d


def divisors(n: int) -> tuple:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


class Evaluator:
    """Memory and cost of setups for one spec, memoised: levers and find_gpu re-ask often."""

    def __init__(self, spec, constants=None, cost: CostModel = DEFAULT_COST):
        self.spec, self.constants, self.cost = spec, constants, cost
        self._memory: dict = {}
        self.evaluated = 0

    def memory(self, s: Setup):
        hit = self._memory.get(s)
        if hit is None:
            from vramfit.api import estimate_setup

            bd, targets = estimate_setup(self.spec, s, self.constants)
            hit = self._memory[s] = (bd, targets)
            self.evaluated += 1
        return hit

    def candidate(self, s: Setup, device, usable_bytes: int) -> Candidate:
        bd, targets = self.memory(s)
        paged, paging = bd.components.get("optimizer_states_paged", 0), paging_bytes(bd, usable_bytes)
        return Candidate(setup=s, device_bytes=bd.device_bytes, peak_allocated_bytes=bd.peak_allocated_bytes,
                         peak_reserved_bytes=bd.peak_reserved_bytes,
                         seconds_per_token=seconds_per_token(self.spec, s, device, targets, self.cost, paging),
                         fits=bd.device_bytes <= usable_bytes, paged_bytes=paged, paging_bytes=paging)

    def candidates(self, setups, device, usable_bytes: int, exhaustive: bool = False) -> list:
        """Candidates of `setups` (micro-batches ascending within a setup, as Space yields them).
        Unless exhaustive, micro-batches above the first that misses are not evaluated."""
        miss: dict = {}  # setup without its micro-batch -> the first candidate that misses
        out = []
        for s in setups:
            family = (s.method, s.precision, s.optim, s.grad_ckpt, s.allocator, s.lora_r, s.seq_len)
            first = miss.get(family)
            if first is not None and not exhaustive:
                targets = self.memory(first.setup)[1]
                out.append(replace(first, setup=s, fits=False, exact=False,
                                   seconds_per_token=seconds_per_token(self.spec, s, device, targets, self.cost)))
                continue
            c = self.candidate(s, device, usable_bytes)
            if not c.fits:
                miss.setdefault(family, c)
            out.append(c)
        return out


@dataclass(frozen=True)
class Space:
    """What the search may vary; None means "search it"."""

    seq_len: int = DEFAULT_SEQ_LEN
    effective_batch: int = DEFAULT_EFFECTIVE_BATCH
    micro_batch: int | None = None
    methods: tuple = ("full", "lora", "qlora")
    precision: str | None = None
    optim: str | None = None
    grad_ckpt: bool | None = None
    allocator: str | None = None
    lora_r: int = DEFAULT_LORA_R
    lora_alpha: int | None = None
    target_modules: str = DEFAULT_TARGET_MODULES
    attn: str = "sdpa"
    loss: str = "logits"
    padded: bool = False

    def setups(self, bf16: bool) -> list:
        """Every combination, micro-batches being the divisors of the effective batch."""
        def axis(fixed, default):
            return (fixed,) if fixed is not None else default

        out = []
        for method in self.methods:
            lora = {} if method == "full" else dict(lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                                                     target_modules=self.target_modules)
            for precision, optim, ckpt, alloc, mb in itertools.product(
                    axis(self.precision, precisions_for(method, bf16)), axis(self.optim, OPTIMS),
                    axis(self.grad_ckpt, (False, True)), axis(self.allocator, ALLOCATOR_CHOICES),
                    axis(self.micro_batch, divisors(self.effective_batch))):
                out.append(Setup(method=method, precision=precision, optim=optim, seq_len=self.seq_len,
                                 micro_batch=mb, grad_accum=self.effective_batch // mb, grad_ckpt=ckpt,
                                 allocator=alloc, attn=self.attn, loss=self.loss, padded=self.padded, **lora))
        return out


# Setups within 1% of each other in predicted speed are a tie (the cost model is not that
# precise): the tie goes to the plainer setup, then to the faster one.  Plain: torch's
# AdamW, then bitsandbytes' AdamW (same algorithm, quantized or paged states), then Adafactor
# (a different algorithm); the default allocator.
SPEED_TIE = 0.01
OPTIM_DEVIATION = {"adamw_torch_fused": 0, "adamw_torch": 0, "paged_adamw_32bit": 1, "adamw_bnb_8bit": 1,
                   "adamw_8bit": 1, "paged_adamw_8bit": 1, "adafactor": 2, "sgd": 3}


def _plainness(s: Setup) -> int:
    return OPTIM_DEVIATION.get(s.optim, 3) + int(s.allocator != "default")


def _rank_key(prefer: str):
    if prefer == "memory":
        return lambda c: (c.device_bytes, c.seconds_per_token)
    step = math.log1p(SPEED_TIE)
    return lambda c: (math.floor(math.log(c.seconds_per_token) / step), _plainness(c.setup), c.seconds_per_token,
                      c.device_bytes)


def parse_headroom(text, budget_bytes: int) -> int:
    """'5%' of the budget, or a size ('1GiB', '500MB'), or 0 -> bytes."""
    from vramfit.gpu import parse_size

    raw = str(text).strip()
    if raw.endswith("%"):
        try:
            pct = float(raw[:-1])
        except ValueError:
            pct = -1.0
        if not 0 <= pct < 100:
            raise VramfitError(f"headroom '{raw}' must be a percentage in [0, 100) or a size like 1GiB")
        return int(budget_bytes * pct / 100)
    if raw in ("0", "0.0"):
        return 0
    return parse_size(raw, "headroom")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    model: str
    device: object  # vramfit.gpu.Device
    budget_bytes: int  # the device's free memory: what the run may use before headroom
    headroom_bytes: int
    headroom: str  # as given ("5%", "1GiB")
    prefer: str  # speed | memory
    space: Space
    chosen: Candidate | None
    candidates: tuple  # those that fit, best first
    rejections: tuple  # faster (method, precision) families that do not fit
    levers: tuple  # the chosen setup's knobs turned one at a time
    closest: Candidate  # the smallest footprint searched, fitting or not
    longest_seq_len: int | None  # at the chosen setup (micro-batch kept): the longest that fits
    largest_micro_batch: int | None  # at the chosen setup, any micro-batch (not only divisors)
    searched: int  # setups considered
    evaluated: int  # of which the memory model predicted (the others are bounded by a smaller micro-batch)
    notes: tuple = ()
    cost_source: str = DEFAULT_COST.source
    replay: dict | None = None  # what the allocator recheck checked and changed (simulate_allocator)

    @property
    def usable_bytes(self) -> int:
        return self.budget_bytes - self.headroom_bytes

    @property
    def setup(self) -> Setup:
        return self._chosen().setup

    def _chosen(self) -> Candidate:
        if self.chosen is None:
            raise VramfitError(nothing_fits_message(self))
        return self.chosen

    # -- plain dicts a user's script can take
    def to_training_arguments_kwargs(self) -> dict:
        return training_arguments_kwargs(self.setup)

    def to_sft_config_kwargs(self) -> dict:
        return {**training_arguments_kwargs(self.setup), "max_length": self.setup.seq_len}

    def to_lora_config_kwargs(self) -> dict | None:
        return lora_config_kwargs(self.setup)

    def to_bnb_config_kwargs(self) -> dict | None:
        return bnb_config_kwargs(self.setup)

    def to_model_kwargs(self) -> dict:
        """from_pretrained kwargs (the quantization config as its kwargs under its key)."""
        return model_kwargs(self.setup)

    def env(self) -> dict:
        """Environment to set before CUDA starts."""
        return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if self.setup.allocator == "expandable" else {}

    # -- the real objects, built lazily (imports transformers / peft / trl)
    def training_arguments(self, output_dir: str, **overrides):
        from transformers import TrainingArguments

        kw = rename_checkpointing({**self.to_training_arguments_kwargs(), **overrides}, TrainingArguments)
        return TrainingArguments(output_dir=output_dir, **kw)

    def sft_config(self, output_dir: str, **overrides):
        from trl import SFTConfig

        return SFTConfig(output_dir=output_dir, **rename_checkpointing({**self.to_sft_config_kwargs(), **overrides},
                                                                       SFTConfig))

    def lora_config(self):
        return lora_config(self.setup)

    def bnb_config(self):
        return bnb_config(self.setup)

    def model_kwargs(self) -> dict:
        """`AutoModelForCausalLM.from_pretrained(name, **plan.model_kwargs())`."""
        import torch

        kw = {k: v for k, v in self.to_model_kwargs().items() if k != "quantization_config"}
        kw["dtype"] = getattr(torch, kw["dtype"])
        if self.setup.method == "qlora":
            kw["quantization_config"] = self.bnb_config()
        return kw

    def to_json(self) -> dict:
        chosen = self.chosen
        return {
            "model": self.model,
            "device": asdict(self.device),
            "budget_bytes": self.budget_bytes, "headroom_bytes": self.headroom_bytes, "headroom": self.headroom,
            "usable_bytes": self.usable_bytes, "prefer": self.prefer,
            "seq_len": self.space.seq_len, "effective_batch": self.space.effective_batch,
            "chosen": chosen.to_json() if chosen else None,
            "candidates": [c.to_json() for c in self.candidates[:20]],
            "fitting_count": len(self.candidates), "searched": self.searched, "evaluated": self.evaluated,
            "rejections": [{**r.candidate.to_json(), "over_bytes": r.over_bytes} for r in self.rejections],
            "levers": [{"knob": l.knob, **l.candidate.to_json(), "delta_bytes": l.delta_bytes,
                        "speedup": round(l.speedup, 3)} for l in self.levers],
            "closest": self.closest.to_json(),
            "longest_seq_len": self.longest_seq_len, "largest_micro_batch": self.largest_micro_batch,
            "training_arguments": training_arguments_kwargs(chosen.setup) if chosen else None,
            "lora_config": lora_config_kwargs(chosen.setup) if chosen else None,
            "bnb_config": bnb_config_kwargs(chosen.setup) if chosen else None,
            "model_kwargs": model_kwargs(chosen.setup) if chosen else None,
            "env": self.env() if chosen else {},
            "notes": list(self.notes), "cost_model": self.cost_source,
            "allocator_replay": self.replay,
        }


# Setup -> the kwargs of the real objects.  Precision mapping as the accuracy harness ran it
# (benchmarks/accuracy/cases.py): "-true" loads the weights in that dtype and leaves autocast off;
# "-mixed" loads fp32 weights and turns on Trainer's bf16/fp16 autocast.


# --------------------------------------------------------------------------- search and plan


def make_space(spec, device, method: str = "auto", seq_len: int = DEFAULT_SEQ_LEN,
               effective_batch: int = DEFAULT_EFFECTIVE_BATCH, micro_batch: int | None = None,
               lora_r: int | None = None, lora_alpha: int | None = None, target_modules: str | None = None,
               precision: str | None = None, optim: str | None = None, grad_ckpt: bool | None = None,
               allocator: str | None = None, attn: str = "sdpa", loss: str = "logits", padded: bool = False) -> Space:
    """Validate the user's restrictions against the model and the GPU -> Space."""
    methods = ("full", "lora", "qlora") if method == "auto" else (method,)
    if method == "auto" and spec.has_fused_experts:  # QLoRA of fused MoE experts is not modelled
        methods = ("full", "lora")
    if spec.has_fused_experts and not device.bf16:
        raise VramfitError(f"{spec.architecture}'s fused experts need bf16 (torch's grouped_mm), which the "
                           f"{device.name} does not have")
    if method != "auto":
        make_setup(method=method, lora_r=lora_r, lora_alpha=lora_alpha, target_modules=target_modules)
    elif precision is not None:  # keep the methods the precision applies to
        methods = tuple(m for m in methods if not (m == "qlora" and precision == "32-true")
                        and not (m == "full" and precision == "16-true"))
    for m in methods:  # names, ranges and LoRA targets, with make_setup's messages
        s = make_setup(method=m, precision=precision or precisions_for(m, device.bf16)[0], optim=optim or "adamw_torch",
                       lora_r=None if m == "full" else lora_r, lora_alpha=None if m == "full" else lora_alpha,
                       target_modules=None if m == "full" else (target_modules or DEFAULT_TARGET_MODULES),
                       seq_len=seq_len, micro_batch=micro_batch or 1, grad_accum=effective_batch,
                       allocator=allocator or "default", attn=attn, loss=loss)
        resolve_targets(spec, s)
    if precision and precision.startswith("bf16") and not device.bf16:
        raise VramfitError(f"the {device.name} has no bf16 (compute capability {device.compute_capability}); "
                           f"use --precision 16-mixed, 16-true or 32-true")
    if micro_batch is not None and effective_batch % micro_batch:
        raise VramfitError(f"micro-batch {micro_batch} does not divide the effective batch {effective_batch}")
    return Space(seq_len=seq_len, effective_batch=effective_batch, micro_batch=micro_batch, methods=methods,
                 precision=precision, optim=optim, grad_ckpt=grad_ckpt, allocator=allocator,
                 lora_r=lora_r or DEFAULT_LORA_R, lora_alpha=lora_alpha,
                 target_modules=target_modules or DEFAULT_TARGET_MODULES, attn=attn, loss=loss, padded=padded)


def search(spec, device, space: Space, headroom=DEFAULT_HEADROOM, prefer: str = "speed", constants=None,
           cost: CostModel | None = None, evaluator: Evaluator | None = None, details: bool = True,
           exhaustive: bool = False) -> Plan:
    """Every setup of `space` on `device` -> Plan (chosen is None when nothing fits).  `details`:
    rejections, levers and the inverse questions too; `exhaustive`: predict the memory of every
    setup, even micro-batches above one that already misses."""
    from vramfit.constants import DEFAULT

    c = constants or DEFAULT
    budget = device.free_bytes
    headroom_bytes = parse_headroom(headroom, budget)
    usable = budget - headroom_bytes
    context = c.cuda_context_bytes + c.kernel_growth_bytes
    if usable <= context:
        from vramfit.report import fmt_bytes

        raise VramfitError(f"the budget ({fmt_bytes(budget)} free - {fmt_bytes(headroom_bytes)} headroom = "
                           f"{fmt_bytes(usable)}) is smaller than the CUDA context alone ({fmt_bytes(context)})")
    ev = evaluator or Evaluator(spec, constants, cost or DEFAULT_COST)
    cands = ev.candidates(space.setups(device.bf16), device, usable, exhaustive)
    fitting = tuple(sorted((x for x in cands if x.fits), key=_rank_key(prefer)))
    chosen = fitting[0] if fitting else None
    closest = min((x for x in cands if x.exact), key=lambda x: (x.device_bytes, x.seconds_per_token))
    rejections = levers = ()
    longest = largest = None
    if chosen is not None and details:
        rejections = _rejections(cands, chosen, usable)
        levers = _levers(ev, chosen, device, usable, space)
        longest = max_seq_len(spec, chosen.setup, usable, evaluator=ev)
        largest = max_micro_batch(spec, chosen.setup, usable, evaluator=ev)
    return Plan(model=spec.name, device=device, budget_bytes=budget, headroom_bytes=headroom_bytes,
                headroom=str(headroom), prefer=prefer, space=space, chosen=chosen, candidates=fitting,
                rejections=rejections, levers=levers, closest=closest, longest_seq_len=longest,
                largest_micro_batch=largest, searched=len(cands), evaluated=sum(c.exact for c in cands),
                notes=_notes(spec, device, space, chosen), cost_source=ev.cost.source)


def plan(model, gpu="auto", *, headroom=DEFAULT_HEADROOM, method: str = "auto", prefer: str = "speed",
         seq_len: int = DEFAULT_SEQ_LEN, effective_batch: int = DEFAULT_EFFECTIVE_BATCH, micro_batch: int | None = None,
         lora_r: int | None = None, lora_alpha: int | None = None, target_modules: str | None = None,
         precision: str | None = None, optim: str | None = None, grad_ckpt: bool | None = None,
         allocator: str | None = None, attn: str = "sdpa", loss: str = "logits", padded: bool = False,
         constants=None, cost: CostModel | None = None, trust_remote_code: bool = False,
         simulate_allocator: bool = False) -> Plan:
    """The best setup of MODEL that fits GPU.  MODEL: profile, config.json, directory, hub id or a
    ModelSpec; GPU: "auto", a profile name, a size ("12GiB") or a Device.  Nothing fits: VramfitError
    naming the closest setup and by how much it misses.

    `simulate_allocator`: recheck the choice and its next-larger micro-batch by replaying two
    training steps through the allocator model capped at what the usable budget leaves torch's
    allocator (vramfit/recheck.py): seconds to a minute more; `Plan.replay` says what changed."""
    spec, device, constants = _resolve(model, gpu, constants, trust_remote_code)
    _check_choice("prefer", prefer, ("speed", "memory"))
    _check_choice("method", method, ("auto", "full", "lora", "qlora"))
    space = make_space(spec, device, method=method, seq_len=seq_len, effective_batch=effective_batch,
                       micro_batch=micro_batch, lora_r=lora_r, lora_alpha=lora_alpha, target_modules=target_modules,
                       precision=precision, optim=optim, grad_ckpt=grad_ckpt, allocator=allocator, attn=attn,
                       loss=loss, padded=padded)
    ev = Evaluator(spec, constants, cost or DEFAULT_COST)
    result = search(spec, device, space, headroom, prefer, constants, cost, evaluator=ev)
    if result.chosen is None:
        raise VramfitError(nothing_fits_message(result, spec, constants))
    if simulate_allocator:
        from vramfit.recheck import recheck

        result = recheck(result, spec, ev, constants)
    return result


def find_gpu(model, *, headroom=DEFAULT_HEADROOM, prefer: str = "speed", constants=None,
             cost: CostModel | None = None, trust_remote_code: bool = False, **restrictions) -> tuple:
    """A Plan per bundled GPU profile, smallest memory first (chosen None where nothing fits);
    the first with a chosen setup is the smallest GPU that fits."""
    from vramfit.gpu import load_profiles

    spec, _, constants = _resolve(model, None, constants, trust_remote_code)
    _check_choice("prefer", prefer, ("speed", "memory"))
    ev = Evaluator(spec, constants, cost or DEFAULT_COST)
    out = []
    for device in sorted(load_profiles().values(), key=lambda d: (d.free_bytes, -d.bf16_tflops)):
        try:
            space = make_space(spec, device, **restrictions)
        except VramfitError:
            if (restrictions.get("precision") or "").startswith("bf16") and not device.bf16:
                continue  # the asked precision does not exist on this card
            raise
        out.append(search(spec, device, space, headroom, prefer, constants, evaluator=ev, details=False))
    return tuple(out)


def _resolve(model, gpu, constants, trust_remote_code):
    from vramfit.gpu import Device, resolve_gpu
    from vramfit.spec import ModelSpec, load_spec

    spec = model if isinstance(model, ModelSpec) else load_spec(model, trust_remote_code=trust_remote_code)
    device = None if gpu is None else (gpu if isinstance(gpu, Device) else resolve_gpu(gpu))
    if constants is None:
        from vramfit.calibrate import load_local_constants

        constants = load_local_constants()[0]
    return spec, device, constants


def _check_choice(kind: str, value: str, valid: tuple) -> None:
    if value not in valid:
        raise VramfitError(f"unknown {kind} '{value}'; valid: {', '.join(valid)}")


def nothing_fits_message(p: Plan, spec=None, constants=None) -> str:
    from vramfit.report import nothing_fits_line

    longest = None
    if spec is not None:
        one = p.closest.setup.with_(micro_batch=1)
        longest = max_seq_len(spec, one, p.usable_bytes, constants=constants)
    return nothing_fits_line(p, longest)


def _rejections(cands, chosen: Candidate, usable: int) -> tuple:
    """(method, precision) families of which nothing fits although some setup would run faster
    than the chosen one: each with its smallest setup, fastest family first."""
    groups: dict = {}
    for x in cands:
        groups.setdefault((x.setup.method, x.setup.precision), []).append(x)
    out = []
    for members in groups.values():
        if any(x.fits for x in members):
            continue
        fastest = min(x.seconds_per_token for x in members)
        if fastest >= chosen.seconds_per_token:
            continue
        smallest = min((x for x in members if x.exact), key=lambda x: (x.device_bytes, x.seconds_per_token))
        out.append((fastest, Rejection(candidate=smallest, over_bytes=smallest.device_bytes - usable)))
    return tuple(r for _, r in sorted(out, key=lambda t: t[0]))


def _levers(ev: Evaluator, chosen: Candidate, device, usable: int, space: Space) -> tuple:
    """The chosen setup with one knob turned; biggest memory change first."""
    s = chosen.setup
    effective = s.micro_batch * s.grad_accum
    variants = [("grad_ckpt", s.with_(grad_ckpt=not s.grad_ckpt))]
    if effective % (2 * s.micro_batch) == 0:
        variants.append(("micro_batch", s.with_(micro_batch=2 * s.micro_batch, grad_accum=s.grad_accum // 2)))
    if s.micro_batch % 2 == 0:
        variants.append(("micro_batch", s.with_(micro_batch=s.micro_batch // 2, grad_accum=s.grad_accum * 2)))
    variants += [("optim", s.with_(optim=o)) for o in OPTIMS if o != s.optim]
    variants += [("precision", s.with_(precision=p)) for p in precisions_for(s.method, device.bf16) if p != s.precision]
    for m in ("full", "lora") if ev.spec.has_fused_experts else ("full", "lora", "qlora"):
        if m != s.method:
            variants.append(("method", s.with_(method=m, precision=precisions_for(m, device.bf16)[0],
                                               lora_r=space.lora_r, lora_alpha=space.lora_alpha,
                                               target_modules=None if m == "full" else space.target_modules)))
    if s.method != "full":
        variants.append(("lora_r", s.with_(lora_r=2 * s.lora_r)))
        if s.lora_r > 1:
            variants.append(("lora_r", s.with_(lora_r=s.lora_r // 2)))
    variants.append(("seq_len", s.with_(seq_len=2 * s.seq_len)))
    if s.seq_len > 1:
        variants.append(("seq_len", s.with_(seq_len=s.seq_len // 2)))
    variants.append(("allocator", s.with_(allocator="default" if s.allocator == "expandable" else "expandable")))
    out = []
    for knob, v in variants:
        c = ev.candidate(v, device, usable)
        out.append(Lever(knob=knob, candidate=c, delta_bytes=c.device_bytes - chosen.device_bytes,
                         speedup=chosen.seconds_per_token / c.seconds_per_token))
    return tuple(sorted(out, key=lambda l: -abs(l.delta_bytes)))


def _notes(spec, device, space: Space, chosen: Candidate | None) -> tuple:
    notes = []
    if device.note:
        notes.append(device.note)
    if device.source == "probe":
        notes.append(f"budget: the free memory of GPU {device.index} ({device.name})"
                     + (", which other processes also use" if device.used_by_others_bytes else ""))
    if chosen is None:
        return tuple(notes)
    s = chosen.setup
    if s.method == "qlora":
        notes.append("QLoRA: load with the BitsAndBytesConfig below, then peft.prepare_model_for_kbit_training"
                     "(model, use_gradient_checkpointing=...) before get_peft_model, as the memory model assumes")
    if s.method == "full" and s.precision in ("bf16-true", "16-true"):
        notes.append("pure bf16 weights and optimizer states (torchtune's default); --precision bf16-mixed keeps "
                     "fp32 master weights at more memory")
    if s.allocator == "expandable":
        notes.append("set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA starts (less fragmentation)")
    if OPTIMIZERS[s.optim].needs_bnb:
        notes.append(f"{s.optim} needs bitsandbytes")
    if chosen.paged_bytes:
        from vramfit.report import fmt_bytes

        if chosen.paging_bytes:
            notes.append(f"paged optimizer states: {fmt_bytes(chosen.paging_bytes)} of {fmt_bytes(chosen.paged_bytes)} "
                         "do not fit beside the rest and move between host and GPU at every optimizer step "
                         "(counted in tokens/s)")
        else:
            notes.append(f"paged optimizer states: {fmt_bytes(chosen.paged_bytes)} in CUDA managed memory, outside "
                         "the device figure; they fit beside the rest, so nothing pages")
    return tuple(notes)


# --------------------------------------------------------------------------- inverse questions


def max_seq_len(spec, setup: Setup, usable_bytes: int, constants=None, evaluator: Evaluator | None = None,
                upper: int | None = None) -> int:
    """The longest sequence that fits at `setup` (its micro-batch kept); 0 when not even 1 token does.
    Capped at the model's max_position_embeddings when it has one."""
    ev = evaluator or Evaluator(spec, constants)
    cap = upper or int(spec.config.get("max_position_embeddings") or spec.config.get("n_positions") or 1 << 20)
    fits = lambda n: ev.memory(setup.with_(seq_len=n))[0].device_bytes <= usable_bytes
    return _largest_true(fits, cap)


def max_micro_batch(spec, setup: Setup, usable_bytes: int, constants=None, evaluator: Evaluator | None = None,
                    upper: int = 4096) -> int:
    """The largest micro-batch that fits at `setup` (any integer, not only divisors of the
    effective batch); 0 when not even 1 does."""
    ev = evaluator or Evaluator(spec, constants)
    fits = lambda n: ev.memory(setup.with_(micro_batch=n, grad_accum=1))[0].device_bytes <= usable_bytes
    return _largest_true(fits, upper)


def _largest_true(pred, cap: int) -> int:
    """Largest n in [1, cap] with pred(n), for pred true up to some n and false after; 0 if none."""
    if not pred(1):
        return 0
    lo, hi = 1, 2
    while hi <= cap and pred(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        if pred(cap):
            return cap
        hi = cap
    while hi - lo > 1:  # pred(lo) true, pred(hi) false
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if pred(mid) else (lo, mid)
    return lo
