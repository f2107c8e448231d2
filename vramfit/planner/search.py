"""The planner: search over Setups for one model on one GPU -> Plan.

A recipe over the memory model: enumerate the knobs (method, precision, optimizer, gradient
checkpointing, allocator, micro-batch with the accumulation that keeps the effective batch),
predict each setup's device memory with `estimate_setup` (~0.1 ms each on a cached spec),
price each in seconds per training token with the cost model below, and keep the cheapest that
fits the budget (`prefer="speed"`) or the smallest (`prefer="memory"`).

Budget: the device's free memory (a probe's free memory, a profile's memory less the driver's
reservation, or the size given) minus the headroom; a setup fits when its predicted
`device_bytes` (what nvidia-smi shows for the process, CUDA context included) is within it.
The cost model is vramfit.planner.cost, the Space searched vramfit.planner.space.
"""

from __future__ import annotations

import math
from dataclasses import replace

from vramfit.errors import VramfitError
from vramfit.memory.setup import OPTIMIZERS, Setup
from vramfit.planner.cost import DEFAULT_COST, CostModel, paging_bytes, seconds_per_token
from vramfit.planner.result import Candidate, Lever, Plan, Rejection
from vramfit.planner.space import (
    DEFAULT_EFFECTIVE_BATCH,
    DEFAULT_HEADROOM,
    DEFAULT_SEQ_LEN,
    OPTIMS,
    Space,
    make_space,
    precisions_for,
)


class Evaluator:
    """Memory and cost of setups for one spec, memoised: levers and find_gpu re-ask often."""

    def __init__(self, spec, constants=None, cost: CostModel = DEFAULT_COST):
        self.spec, self.constants, self.cost = spec, constants, cost
        self._memory: dict = {}
        self.evaluated = 0

    def memory(self, s: Setup):
        hit = self._memory.get(s)
        if hit is None:
            from vramfit.memory.estimate import estimate_setup

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
                         fits=bd.device_bytes <= usable_bytes, paged_bytes=paged, paging_bytes=paging,
                         host_bytes=bd.host_bytes)

    def candidates(self, setups, device, usable_bytes: int, exhaustive: bool = False) -> list:
        """Candidates of `setups` (micro-batches ascending within a setup, as Space yields them).
        Unless exhaustive, micro-batches above the first that misses are not evaluated."""
        miss: dict = {}  # setup without its micro-batch -> the first candidate that misses
        out = []
        for s in setups:
            family = (s.method, s.precision, s.optim, s.grad_ckpt, s.allocator, s.lora_r, s.seq_len, s.liger,
                      s.packing, s.activation_offloading, s.padded, s.kbit_prep)
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


SPEED_TIE = 0.01
OPTIM_DEVIATION = {"adamw_torch_fused": 0, "adamw_torch": 0, "paged_adamw_32bit": 1, "adamw_bnb_8bit": 1,
                   "adamw_8bit": 1, "paged_adamw_8bit": 1, "adafactor": 2, "sgd": 3}


def _plainness(s: Setup) -> int:
    """Deviations from the plain recipe: a tie in speed goes to fewer (Liger's kernels and activation
    offloading are each one: patched kernels, host traffic)."""
    return OPTIM_DEVIATION.get(s.optim, 3) + int(s.allocator != "default") + int(s.liger) + int(s.activation_offloading)


def _rank_key(prefer: str):
    if prefer == "memory":
        return lambda c: (c.device_bytes, c.seconds_per_token)
    step = math.log1p(SPEED_TIE)
    return lambda c: (math.floor(math.log(c.seconds_per_token) / step), _plainness(c.setup), c.seconds_per_token,
                      c.device_bytes)


def parse_headroom(text, budget_bytes: int) -> int:
    """'5%' of the budget, or a size ('1GiB', '500MB'), or 0 -> bytes."""
    from vramfit.planner.gpu import parse_size

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


def search(spec, device, space: Space, headroom=DEFAULT_HEADROOM, prefer: str = "speed", constants=None,
           cost: CostModel | None = None, evaluator: Evaluator | None = None, details: bool = True,
           exhaustive: bool = False) -> Plan:
    """Every setup of `space` on `device` -> Plan (chosen is None when nothing fits).  `details`:
    rejections, levers and the inverse questions too; `exhaustive`: predict the memory of every
    setup, even micro-batches above one that already misses."""
    from vramfit.memory.constants import DEFAULT

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
    lever_note = None
    if space.when_nothing_fits and not any(x.fits for x in cands):
        extra, lever_note = _lever_stage(ev, space, cands, device, usable, exhaustive)
        cands += extra
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
                notes=((lever_note,) if lever_note else ()) + _notes(spec, device, space, chosen),
                cost_source=ev.cost.source)


def _lever_stage(ev: Evaluator, space: Space, cands: list, device, usable: int, exhaustive: bool) -> tuple:
    """Nothing fits without the levers the search holds back (Liger's kernels, activation offloading):
    the setups with them on -> (candidates, a note).  A lever the memory model finds no smaller at the
    closest setup cannot make anything fit, and is not searched."""
    from vramfit.planner.levers import LEVER_NAMES
    from vramfit.planner.space import LEVER_ON

    closest = min((x for x in cands if x.exact), key=lambda x: x.device_bytes)
    useful = tuple(k for k in space.when_nothing_fits
                   if ev.memory(closest.setup.with_(**{k: LEVER_ON[k]}))[0].device_bytes < closest.device_bytes)
    if not useful:
        return [], None
    wider = replace(space, when_nothing_fits=useful).with_levers()
    extra = [s for s in wider.setups(device.bf16) if any(getattr(s, k) == LEVER_ON[k] for k in useful)]
    got = ev.candidates(extra, device, usable, exhaustive)
    names = " and ".join(LEVER_NAMES[k] for k in useful)
    fits = any(x.fits for x in got)
    return got, (f"nothing fits without {names}: the search tried them" + ("" if fits else ", and nothing fits "
                                                                                         "with them either"))


def plan(model, gpu="auto", *, headroom=DEFAULT_HEADROOM, method: str = "auto", prefer: str = "speed",
         seq_len: int = DEFAULT_SEQ_LEN, effective_batch: int = DEFAULT_EFFECTIVE_BATCH, micro_batch: int | None = None,
         lora_r: int | None = None, lora_alpha: int | None = None, target_modules: str | None = None,
         precision: str | None = None, optim: str | None = None, grad_ckpt: bool | None = None,
         allocator: str | None = None, attn: str = "sdpa", loss: str = "fused", padded: bool = False,
         liger: bool | None = None, packing: bool | None = None, activation_offloading: bool | None = None,
         kbit_prep: bool | None = None,
         tokens_per_batch: int | None = None, rows_median: int | None = None,
         constants=None, cost: CostModel | None = None, trust_remote_code: bool = False,
         simulate_allocator: bool | None = None, replay: bool | None = None) -> Plan:
    """The best setup of MODEL that fits GPU.  MODEL: profile, config.json, directory, hub id or a
    ModelSpec; GPU: "auto", a profile name, a size ("12GiB") or a Device.  Nothing fits: VramfitError
    naming the closest setup and by how much it misses.

    The fast model searches; its choice and next-larger micro-batch are then rechecked by replaying
    two training steps through the allocator model capped at what the usable budget leaves torch's
    allocator (vramfit/planner/recheck.py), and the chosen setup's figures are the replay's.  A
    setup's first replay builds its event template (~20-60 s once, cached).  `replay=False` (or
    VRAMFIT_REPLAY=0, or the CLI's --fast) keeps the fast model's answer; `simulate_allocator` is
    the old name of `replay`.  `Plan.replay` says what was checked and what changed.

    The memory levers (`liger`, `packing`, `activation_offloading`: vramfit.planner.levers): True or
    False fixes one, None (the default) lets the search weigh it (see `make_space`); `tokens_per_batch`
    fixes a packed micro-batch in tokens; `rows_median`: the data's median row length, in tokens."""
    spec, device, constants = _resolve(model, gpu, constants, trust_remote_code)
    _check_choice("prefer", prefer, ("speed", "memory"))
    _check_choice("method", method, ("auto", "full", "lora", "qlora"))
    space = make_space(spec, device, method=method, seq_len=seq_len, effective_batch=effective_batch,
                       micro_batch=micro_batch, lora_r=lora_r, lora_alpha=lora_alpha, target_modules=target_modules,
                       precision=precision, optim=optim, grad_ckpt=grad_ckpt, allocator=allocator, attn=attn,
                       loss=loss, padded=padded, liger=liger, packing=packing,
                       activation_offloading=activation_offloading, tokens_per_batch=tokens_per_batch,
                       rows_median=rows_median, kbit_prep=kbit_prep)
    ev = Evaluator(spec, constants, cost or DEFAULT_COST)
    result = search(spec, device, space, headroom, prefer, constants, cost, evaluator=ev)
    if result.chosen is None:
        raise VramfitError(nothing_fits_message(result, spec, constants))
    if replay is None:
        replay = simulate_allocator
    if replay is None:
        from vramfit.memory.template_bg import replay_default

        replay = replay_default()
    if replay:
        from vramfit.planner.recheck import recheck

        result = recheck(result, spec, ev, constants)
    return result


def find_gpu(model, *, headroom=DEFAULT_HEADROOM, prefer: str = "speed", constants=None,
             cost: CostModel | None = None, trust_remote_code: bool = False, **restrictions) -> tuple:
    """A Plan per bundled GPU profile, smallest memory first (chosen None where nothing fits);
    the first with a chosen setup is the smallest GPU that fits."""
    from vramfit.planner.gpu import load_profiles

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
    from vramfit.planner.gpu import Device, resolve_gpu
    from vramfit.model.spec import ModelSpec, load_spec

    spec = model if isinstance(model, ModelSpec) else load_spec(model, trust_remote_code=trust_remote_code)
    device = None if gpu is None else (gpu if isinstance(gpu, Device) else resolve_gpu(gpu))
    if constants is None:
        from vramfit.planner.calibration import load_local_constants

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
    variants += lever_variants(ev.spec, s, space)
    out = []
    for knob, v in variants:
        c = ev.candidate(v, device, usable)
        out.append(Lever(knob=knob, candidate=c, delta_bytes=c.device_bytes - chosen.device_bytes,
                         speedup=chosen.seconds_per_token / c.seconds_per_token))
    return tuple(sorted(out, key=lambda l: -abs(l.delta_bytes)))


def lever_variants(spec, s: Setup, space: Space) -> list:
    """The chosen setup with each memory lever turned: (knob, setup).  Liger's kernels only on the model
    types liger-kernel patches; packing off means padded batches where the data's rows are shorter."""
    from vramfit.planner.levers import liger_supported

    out = []
    if s.liger or liger_supported(spec.model_type):
        out.append(("liger", s.with_(liger=not s.liger)))
    if s.packing:
        out.append(("packing", s.with_(packing=False, padded=space.padded, extras={})))
    else:
        out.append(("packing", s.with_(packing=True, padded=False, extras=space._extras(True))))
    out.append(("activation_offloading", s.with_(activation_offloading=not s.activation_offloading)))
    if s.method == "qlora":
        out.append(("kbit_prep", s.with_(kbit_prep=not s.kbit_prep)))
    return out


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
    if s.method == "qlora" and s.kbit_prep:
        notes.append("QLoRA: load with the BitsAndBytesConfig below, then peft.prepare_model_for_kbit_training"
                     "(model, use_gradient_checkpointing=...) before get_peft_model, as the memory model assumes")
    elif s.method == "qlora":
        notes.append("QLoRA without prepare_model_for_kbit_training: load with the BitsAndBytesConfig below and "
                     "hand the 4-bit model and the LoraConfig to trl's SFTTrainer as loaded (embeddings, norms and "
                     "LM head stay bf16, as trl and Unsloth do), as the memory model assumes")
    if s.method == "full" and s.precision in ("bf16-true", "16-true", "bf16-amp"):
        notes.append("pure bf16 weights and optimizer states (torchtune's default); --precision bf16-mixed keeps "
                     "fp32 master weights at more memory")
    if s.allocator == "expandable":
        notes.append("set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA starts (less fragmentation)")
    if OPTIMIZERS[s.optim].needs_bnb:
        notes.append(f"{s.optim} needs bitsandbytes")
    notes += lever_notes(spec, s, space)
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


def lever_notes(spec, s: Setup, space: Space) -> list:
    """What a chosen setup's levers mean in practice."""
    from vramfit.planner.levers import PACKING_SHORT_ROWS, packing_by_default

    notes = []
    if s.packing:
        why = (f"the rows' median ({space.rows_median:,} tokens) is under {PACKING_SHORT_ROWS:.0%} of seq_len "
               f"{s.seq_len:,}, so packing is the default: " if packing_by_default(space.rows_median, s.seq_len)
               else "")
        notes.append(f"packing: {why}a micro-batch is {s.micro_batch} rows of {s.seq_len:,} tokens filled with whole "
                     f"examples (best-fit decreasing) and flattened into one row of {s.tokens:,} tokens "
                     f"(--tokens-per-batch {s.tokens})")
        if s.attn != "flash_attention_2" and s.micro_batch > 1:
            notes.append(f"packing with {s.attn}: transformers masks the flattened row block-diagonally and the "
                         f"kernel attends over all {s.tokens:,} tokens; --attn flash_attention_2 attends per example")
    elif space.rows_median is not None and space.rows_median < s.seq_len:
        notes.append(f"rows of median {space.rows_median:,} tokens: unpacked batches are padded to their longest "
                     "row (predicted so)")
    if s.liger:
        notes.append("Liger's kernels: needs the liger-kernel package (triton, CUDA); under trl's SFTTrainer its "
                     "fused linear cross-entropy is off (trl's own fused loss scores the tokens): its RMSNorm, "
                     "SwiGLU and RoPE kernels remain")
    if s.activation_offloading:
        notes.append("activation offloading: saved activations live in pinned host memory between the forward "
                     "and the backward (SFTTrainer only; CUDA)")
    return notes


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
