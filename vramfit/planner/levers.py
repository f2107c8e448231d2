"""The field's memory levers as setup axes (issue 20): Liger's kernels, trl's packing, trl's activation
offloading, in their own switches, and how fast each one runs.

- `liger`: `TrainingArguments(use_liger_kernel=True)`.  Only on the model types liger-kernel patches
  (`LIGER_MODEL_TYPES`).  Under trl's SFTTrainer (what `vramfit train` runs, trl >= 1.x) trl turns
  liger's fused linear cross-entropy off (`liger_kernel_config={"fused_linear_cross_entropy": False}`:
  its own fused LM head scores the tokens): the RMSNorm, SwiGLU and RoPE kernels remain.
- `packing`: trl `SFTConfig(packing=True, packing_strategy="bfd")`, which turns `padding_free` on: a
  micro-batch is `micro_batch` rows of `seq_len` tokens filled best-fit-decreasing with whole examples,
  flattened into one row with position_ids restarting per example.  With sdpa or eager attention
  transformers builds a block-diagonal mask over the whole flattened row (masking_utils'
  packed-sequence detection); flash_attention_2 attends per example (cu_seq_lens).
- `activation_offloading`: trl `SFTConfig(activation_offloading=True)`: saved activations go to
  pinned host memory in the forward and come back for the backward (CUDA only).

Speed: `lever_speeds()`, the one place the cost model reads a lever's tokens/s factor from, is
`profiles/lever_speed.json`, written by `python -m benchmarks.speed.lever_speed` from measured runs
(benchmarks/results/*levers*.jsonl: every lever case and its baseline twin, the same case without the
lever, each with `tokens_per_second`).  A lever that file does not cover runs at 1.0x and the plan says
"speed not measured".
"""

from __future__ import annotations

import functools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from vramfit.errors import VramfitError
from vramfit.model.spec import PROFILES_DIR


from vramfit.memory.setup import LEVERS, LIGER_MODEL_TYPES, LIGER_VERSION, liger_supported  # noqa: E402,F401

# Words for people, one per lever: the plan's lines and labels.
LEVER_NAMES = {"liger": "Liger's kernels", "packing": "packing", "activation_offloading": "activation offloading",
               "kbit_prep": "QLoRA without prepare_model_for_kbit_training"}
LEVER_SWITCHES = {"liger": "TrainingArguments(use_liger_kernel=True)",
                  "packing": "SFTConfig(packing=True, packing_strategy='bfd', padding_free=True)",
                  "activation_offloading": "SFTConfig(activation_offloading=True)"}

# Where rows are shorter than this fraction of --seq-len (their median), packing is what the plan
# proposes by default: an unpacked micro-batch would then be mostly padding.
PACKING_SHORT_ROWS = 0.5

SPEED_FILE = PROFILES_DIR / "lever_speed.json"


# --------------------------------------------------------------------------- checks


def liger_problem(spec) -> str | None:
    """Why `use_liger_kernel=True` would do nothing for `spec`; None where liger-kernel patches it."""
    if liger_supported(spec.model_type):
        return None
    common = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "granite")
    return (f"--liger: liger-kernel {LIGER_VERSION} has no kernels for model type '{spec.model_type}' "
            f"({spec.architecture}): use_liger_kernel=True would patch nothing; it patches {', '.join(common)} and "
            f"{len(LIGER_MODEL_TYPES) - len(common)} more (liger_kernel.transformers.monkey_patch)")


def check_levers(spec, liger: bool | None = False, packing: bool | None = False,
                 activation_offloading: bool | None = False, padded: bool = False) -> None:
    """The bad lever combinations, with their reasons (VramfitError)."""
    if liger and spec is not None:
        problem = liger_problem(spec)
        if problem:
            raise VramfitError(problem)
    if packing and padded:
        raise VramfitError("--packing and --padded: packed micro-batches are never padded (trl flattens the "
                           "packed rows into one, padding-free); drop one of them")


def micro_batch_for_tokens(tokens_per_batch: int | None, seq_len: int, packing: bool | None,
                           micro_batch: int | None = None) -> int | None:
    """--tokens-per-batch N with packing: the micro-batch is N tokens, i.e. N / seq_len packed rows of
    `seq_len` tokens -> that micro-batch (or `micro_batch` when N is not given)."""
    if tokens_per_batch is None:
        return micro_batch
    if isinstance(tokens_per_batch, bool) or not isinstance(tokens_per_batch, int) or tokens_per_batch <= 0:
        raise VramfitError(f"--tokens-per-batch must be a positive integer, got {tokens_per_batch!r}")
    if not packing:
        raise VramfitError(f"--tokens-per-batch {tokens_per_batch} counts the tokens of a packed micro-batch: "
                           f"add --packing (without it, give --micro-batch, rows of --seq-len {seq_len})")
    if tokens_per_batch % seq_len:
        lo = max(seq_len, tokens_per_batch // seq_len * seq_len)
        raise VramfitError(f"--tokens-per-batch {tokens_per_batch} is not a multiple of --seq-len {seq_len}: a "
                           f"packed micro-batch is whole rows of {seq_len} tokens (try {lo:,} or {lo + seq_len:,})")
    mb = tokens_per_batch // seq_len
    if micro_batch is not None and micro_batch != mb:
        raise VramfitError(f"--tokens-per-batch {tokens_per_batch} is micro-batch {mb} at --seq-len {seq_len}, "
                           f"not --micro-batch {micro_batch}: give one of them")
    return mb


def packing_by_default(rows_median: int | None, seq_len: int) -> bool:
    """Whether the data's rows are short enough that packing is the plan's default."""
    return rows_median is not None and rows_median < PACKING_SHORT_ROWS * seq_len


# --------------------------------------------------------------------------- the switches


def sft_lever_kwargs(s) -> dict:
    """trl `SFTConfig` kwargs of the setup's packing and activation offloading (empty when both are off).
    `max_length` is the packed row's length: SFTConfig packs to it."""
    kw = {}
    if s.packing:
        kw.update(packing=True, packing_strategy="bfd", padding_free=True, max_length=s.seq_len)
    if s.activation_offloading:
        kw["activation_offloading"] = True
    return kw


# --------------------------------------------------------------------------- speed


# Levers whose speed depends on how the loss is computed: liger's kernel set differs (its fused linear
# cross-entropy runs under the model's own loss only; trl's SFTTrainer turns it off), so a ratio measured
# under one loss says nothing about the other.
LOSS_DEPENDENT = ("liger",)
LOSS_WORDS = {"fused": "trl's fused loss", "logits": "the model's own loss"}


@dataclass(frozen=True)
class LeverSpeed:
    """A lever's measured tokens/s over its baseline twin's (the same run without the lever)."""

    lever: str
    ratio: float = 1.0  # median over the measured twins; 1.0 where not measured
    cases: int = 0  # twins measured
    low: float | None = None
    high: float | None = None
    by_loss: dict | None = None  # {"fused": ratio, "logits": ratio}
    source: str = "speed not measured"

    @property
    def measured(self) -> bool:
        return self.cases > 0

    def measured_for(self, loss: str | None = None) -> bool:
        if not self.measured:
            return False
        if self.lever in LOSS_DEPENDENT and self.by_loss and loss is not None:
            return loss in self.by_loss
        return True

    def ratio_for(self, loss: str | None = None) -> float:
        """The factor for a setup computing its loss so: 1.0 where not measured (liger: under that loss)."""
        if not self.measured_for(loss):
            return 1.0
        if self.by_loss and loss in self.by_loss:
            return float(self.by_loss[loss])
        return self.ratio

    def text(self, loss: str | None = None) -> str:
        if not self.measured:
            return "speed not measured"
        if not self.measured_for(loss):
            other = ", ".join(f"{v:.2f}x under {LOSS_WORDS.get(k, k)}" for k, v in sorted(self.by_loss.items()))
            return f"speed not measured under {LOSS_WORDS.get(loss, loss)} ({other}; {self.source})"
        return f"{self.ratio_for(loss):.2f}x tokens/s measured ({self.evidence()})"

    def evidence(self) -> str:
        """'6 twin runs, 0.24-0.84x; h100-....jsonl': what the factor is the median of."""
        spread = f", {self.low:.2f}-{self.high:.2f}x" if self.cases > 1 and self.low is not None else ""
        return f"{self.cases} twin run{'s' if self.cases > 1 else ''}{spread}; {self.source}"


@functools.lru_cache(maxsize=4)
def load_lever_speeds(path: str | None = None) -> dict:
    """{lever: LeverSpeed} from the committed speed file (`SPEED_FILE`); unmeasured levers at 1.0."""
    p = Path(path) if path else SPEED_FILE
    data = {}
    if p.is_file():
        try:
            data = json.loads(p.read_text()).get("levers", {})
        except (OSError, ValueError):
            data = {}
    out = {}
    for lever in LEVERS:
        d = data.get(lever) or {}
        if d.get("cases"):
            out[lever] = LeverSpeed(lever=lever, ratio=float(d["ratio"]), cases=int(d["cases"]), low=d.get("low"),
                                    high=d.get("high"), by_loss=d.get("by_loss") or None,
                                    source=d.get("source", p.name))
        else:
            out[lever] = LeverSpeed(lever=lever)
    return out


def lever_speeds() -> dict:
    """The table of lever speed factors the cost model uses: {lever: LeverSpeed} (module docstring)."""
    return load_lever_speeds(None)


def speed_factor(s) -> float:
    """tokens/s of setup `s` over the same setup with its levers off: the product of the measured
    ratios of the levers it turns on (1.0 for those not measured)."""
    if not (s.liger or s.packing or s.activation_offloading):
        return 1.0
    table = lever_speeds()
    f = 1.0
    for lever in LEVERS:
        # packing's cost is modelled, not a factor (cost.train_flops_per_token: the packed row's masked
        # attention square); its measured ratio stays in the table, the model's check
        if getattr(s, lever) and lever != "packing":
            f *= table[lever].ratio_for(s.loss)
    return f


# --------------------------------------------------------------------------- deriving the factors


def _case(row: dict) -> dict | None:
    case = row.get("case") or row.get("setup")
    return case if isinstance(case, dict) else None


def _levers_on(case: dict) -> tuple:
    return tuple(l for l in LEVERS if case.get(l))


def _normal(case: dict) -> dict:
    """The case with its levers as the harness writes them: keys only when on (example_len with packing)."""
    out = {k: v for k, v in case.items() if not (k in LEVERS and not v)}
    if not out.get("packing"):
        out.pop("example_len", None)
    return out


def _key(case: dict, row: dict) -> str:
    gpu = (row.get("environment") or {}).get("gpu_name")
    return json.dumps([_normal(case), gpu], sort_keys=True, default=str)


def lever_twins(rows) -> list:
    """(lever, lever row, twin row) for every measured run with a lever on whose twin was measured too:
    the same case without that lever (any other lever kept) on the same GPU, or the row its `baseline_id`
    names."""
    ok = [r for r in rows if _case(r) is not None and r.get("status", "ok") == "ok"
          and isinstance(r.get("tokens_per_second"), (int, float)) and r["tokens_per_second"] > 0]
    by_key, by_id = {}, {}
    for r in ok:
        by_key.setdefault(_key(_case(r), r), r)
        if r.get("id"):
            by_id.setdefault(r["id"], r)
    out = []
    for r in ok:
        case = _case(r)
        on = _levers_on(case)
        named = by_id.get(r.get("baseline_id") or r.get("twin_id"))
        if named is not None:
            gone = set(on) - set(_levers_on(_case(named)))
            if len(gone) == 1:
                out.append((gone.pop(), r, named))
            continue
        for lever in on:
            twin = by_key.get(_key({**case, lever: False}, r))
            if twin is not None:
                out.append((lever, r, twin))
    return out


def derive_lever_speeds(rows, source: str = "") -> dict:
    """{lever: {"ratio", "cases", "low", "high", "by_loss", "source"}}: per lever, the median of
    tokens/s (lever) / tokens/s (twin) over its twins; by_loss: the same per the case's loss (liger's
    fused cross-entropy only works under the model's own loss)."""
    ratios: dict = {}
    for lever, r, twin in lever_twins(rows):
        loss = _case(r).get("loss", "logits")
        ratios.setdefault(lever, []).append((r["tokens_per_second"] / twin["tokens_per_second"], loss))
    out = {}
    for lever, got in ratios.items():
        values = [x for x, _ in got]
        by_loss = {}
        for loss in sorted({l for _, l in got}):
            vs = [x for x, l in got if l == loss]
            by_loss[loss] = round(statistics.median(vs), 4)
        out[lever] = {"ratio": round(statistics.median(values), 4), "cases": len(values),
                      "low": round(min(values), 4), "high": round(max(values), 4), "by_loss": by_loss,
                      "source": source}
    return out

