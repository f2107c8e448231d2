"""Torch-free event templates: the allocation events `vramfit.memory.events.training_events` records
for two Trainer steps, at any micro-batch B, sequence S, LoRA rank r and layer count L, from a
template built once per discrete setup (`vramfit.memory.template_build`), in milliseconds.

A template is the event stream of the model shrunk to `lb` decoder layers, every event tagged with
its decoder layer (forward and backward by module and tensor hooks, the load and optimizer phases
by the parameter an op works on; see template_build), cut into runs of one tag.  Expanding to L
layers repeats each run of the representative middle layer `m` L - lb + 1 times (in its sweep's
direction) and moves the runs of later layers up; a free names its allocation by (run, ordinal,
layer offset from the free's own layer), so it finds the same allocation of the right copy.

Sizes are exact: each is a polynomial over MONOMIALS (R: S rounded up to 128, flash attention's
padded rows) with rational coefficients, linear in r, plus a per-layer change; the sizes that are
not polynomials are computed as the kernels do: `_foreach_norm`'s partials (4 x tensors x chunks),
bitsandbytes' absmax (4 x ceil(numel / 256)) and CUDA reductions' staging buffers
(`cuda_reduce.reduce_buffers` on the symbolic shape).  What changes the stream's shape is a regime
(`regime`), part of the template's key: micro-batch 1, QLoRA's fused 4-bit kernel (B x S <= 512
rows), a sliding-window mask, trl's fused-loss tiles, gradient accumulation, a bitsandbytes
optimizer's size thresholds crossed by the LoRA matrices.  Gradient accumulation: the template of
two micro-batches repeats the second one grad_accum - 1 times.  Fused-loss tiles: one token tile
(its buffer is N x chunk) is a regime of its own; from two tiles on, where the tile loops allocate
nothing per tile (the hidden states and the LM head already in the compute dtype: `regime_info`'s
"tiles_general", decided without torch), one template ("2+") covers every tile count: its buffer
is then 4096 x chunk and the per-token sizes polynomials in B and S, the tiles only views (the
builder fits at 2 and 3 tiles and checks at 4 and 5); elsewhere (casts per tile, e.g. fp32 weights
under autocast, QLoRA's fp32 head, a LayerNorm's fp32 output under autocast) each tile count is a
regime of its own.

Format (JSON): {"format", "lb", "m", "r0", "regime" (`regime`'s list; its tile component 0 without
the fused loss, the tile count, or "2+"), "exprs": [expr], "runs": [run, ...], "sibling": {run:
{tag: run}}, "build": {traces, seconds}}; an expr is an int, or [p, d, l] (coefficients of MONOMIALS as
"num/den" strings at r0, per unit of r - r0, and the change per layer); an event is ["a", size]
(size: an expr's index; ["n", k, numel, chunk]: 4 k ceil(numel / chunk); ["r", reduction]),
["f", run, ordinal, layer offset, micro-batch: 0 outside the accumulating ones, 1 the same, 2 the
last], ["e"]; a run is [tag, sweep direction, events, in an accumulating micro-batch (repeated
grad_accum - 1 times), the phase mark (training_events' marks) it follows].
"""

from __future__ import annotations

from fractions import Fraction

from vramfit.memory.cuda_reduce import reduce_buffers

FORMAT = 2  # 2: the fused loss's tile regime "2+" (TILES_GENERAL)
MONOMIALS = ("1", "B", "S", "BS", "SS", "BSS", "R", "BR")
FOREACH_CHUNK = 65536  # multi_tensor_apply's kChunkSize (kernels._foreach_norm)
TOKEN_TILE = 4096  # trl's fused loss: tokens per projection tile
GEMM_4BIT_CUSTOM_MAX_M = 512  # kernels: gemm_4bit's fused kernel up to this many rows
TILES_GENERAL = "2+"  # the regime's tile component of a template serving every tile count >= 2
# model types whose final norm is an RMSNorm returning the residual stream's dtype under autocast (their
# configs have rms_norm_eps, where written): the fused loss's hidden states need no cast per tile
RMS_NORM_TYPES = frozenset(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                            "gemma2", "phi3", "smollm3"))


class NoTemplate(Exception):
    """The template machinery cannot cover this setup (the caller replays for real)."""


def monomials(B: int, S: int) -> tuple:
    R = -(-S // 128) * 128
    return (1, B, S, B * S, S * S, B * S * S, R, B * R)


def regime(info: dict, B: int, S: int, grad_accum: int = 1, r: int = 0) -> list:
    """What changes the stream's shape, not only its sizes: [micro-batch 1, QLoRA's fused 4-bit
    kernel (B x S <= 512 rows), a sliding-window mask (transformers makes one from S >= window),
    trl's fused-loss token tiles (TILES_GENERAL for every count >= 2 where `info["tiles_general"]`),
    gradient accumulation (its micro-batches after the first repeat),
    how many LoRA matrices (r x features) reach each size threshold of a bitsandbytes optimizer
    (8-bit states from 4096 elements, paged ones outside torch's allocator from 1e5)]."""
    window = info.get("window")
    tiles = token_tiles(B, S) if info.get("fused") else 0
    if tiles >= 2 and info.get("tiles_general"):
        tiles = TILES_GENERAL
    thresholds, dims = info.get("rank_thresholds") or ([], [])
    return [B == 1, bool(info.get("qlora")) and B * S <= GEMM_4BIT_CUSTOM_MAX_M,
            bool(window) and S >= window, tiles, grad_accum > 1,
            [sum(1 for f in dims if r * f >= t) for t in thresholds]]


def token_tiles(B: int, S: int) -> int:
    """trl's fused loss: token tiles of the B x (S - 1) scored tokens."""
    return -(-(B * (S - 1)) // TOKEN_TILE)


def tiles_general(spec, setup) -> bool:
    """Whether trl's fused-loss tile loops allocate nothing per tile, so that one template serves every
    tile count >= 2: `hidden[tile].to(compute_dtype)` and `weight[chunk].to(compute_dtype)` are views
    when the final hidden states and the LM head are already in the compute dtype (the autocast dtype,
    or without autocast the hidden states').  The weights are in the setup's dtype except QLoRA's
    after prepare_model_for_kbit_training (Setup.kbit_upcast: its LM head and norms in fp32); without
    autocast the final norm returns that dtype; under autocast an RMSNorm returns the residual
    stream's (the weights') dtype while torch's layer_norm autocasts to fp32.  A wrong True costs a
    failed build (template_build checks the template at tile counts it was not fitted on, and
    replay.setup_template then builds the tile count's own), never a wrong template."""
    from vramfit.memory.setup import PRECISIONS

    if setup.loss != "fused" or getattr(setup, "kbit_upcast", setup.method == "qlora"):
        return False
    dtype, amp = PRECISIONS[setup.precision]
    if amp is None:
        return True
    cfg = spec.config
    return amp == dtype and ("rms_norm_eps" in cfg or cfg.get("model_type") in RMS_NORM_TYPES)


def regime_info(spec, setup, exact_tiles: bool = False) -> dict:
    """What of the model and the setup the regime depends on; `exact_tiles`: the fused loss's tile
    count in the regime even where `tiles_general` (one template for every count >= 2)."""
    from vramfit.memory.setup import resolve_targets

    cfg = spec.config
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    thresholds = []
    if setup.method != "full" and setup.optim in ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"):
        thresholds.append(4096)  # kernels._Bnb8bitEmulation: smaller tensors keep 32-bit states
    if setup.method != "full" and setup.optim.startswith("paged"):
        thresholds.append(100000)  # paged states of >= 1e5 elements: managed memory
    dims = []
    if thresholds:
        targets = set(resolve_targets(spec, setup))
        dims = sorted({d for lin in spec.linears if lin.name in targets for d in (lin.in_features, lin.out_features)})
    return {"qlora": setup.method == "qlora", "fused": setup.loss == "fused",
            "tiles_general": not exact_tiles and tiles_general(spec, setup),
            "window": window if isinstance(window, int) else None, "rank_thresholds": [thresholds, dims]}


class Evaluator:
    """Evaluates a template's expressions at one (B, S, r, L)."""

    def __init__(self, tpl: dict, B: int, S: int, r: int, L: int):
        self.mono = monomials(B, S)
        self.dr = r - tpl["r0"]
        self.dl = L - tpl["lb"]
        self.exprs = tpl["exprs"]
        self.cache = {}

    def expr(self, k: int) -> int:
        v = self.cache.get(k)
        if v is not None:
            return v
        e = self.exprs[k]
        if isinstance(e, int):
            v = e
        else:
            p, d, l = e
            x = sum(Fraction(c) * m for c, m in zip(p, self.mono) if c != "0")
            if self.dr and d:
                x += self.dr * sum(Fraction(c) * m for c, m in zip(d, self.mono) if c != "0")
            x += Fraction(l) * self.dl
            if x.denominator != 1:
                raise NoTemplate(f"size {x} is not an integer")
            v = int(x)
        self.cache[k] = v
        return v

    def reduction(self, desc) -> list:
        shape, stride, dims, elem, arg, vec, sms = desc
        return reduce_buffers([self.expr(k) for k in shape], [self.expr(k) for k in stride], list(dims), elem, arg,
                              input_vec_size=vec, num_sms=sms)


def expand(tpl: dict, B: int, S: int, r: int, L: int, grad_accum: int = 1, marks: dict | None = None) -> list:
    """The events ("a", id, bytes) / ("f", id) / ("e",) of `training_events(steps=2, grad_accum)`
    at micro-batch B, sequence S, rank r (ignored for full fine-tuning) and L decoder layers;
    `marks` (a dict) gets where each phase starts, as training_events' marks."""
    lb, m = tpl["lb"], tpl["m"]
    E = L - lb
    if E < 0:
        raise NoTemplate(f"{L} layers: fewer than the template's {lb}")
    if (grad_accum > 1) != bool(tpl["regime"][4]):
        raise NoTemplate("gradient accumulation is another template's")
    t = tpl["regime"][3]
    if t and (token_tiles(B, S) < 2 if t == TILES_GENERAL else token_tiles(B, S) != t):
        raise NoTemplate(f"{token_tiles(B, S)} token tiles of the fused loss are another template's")
    ev = Evaluator(tpl, B, S, r, L)
    sizes = {}
    A = grad_accum

    def size_of(sz):
        if isinstance(sz, int):
            v = sizes.get(sz)
            if v is None:
                v = sizes[sz] = ev.expr(sz)
            return v
        n, numel = ev.expr(sz[1]), ev.expr(sz[2])
        return 4 * n * -(-numel // sz[3])

    def psi(lam):  # an expanded layer -> the traced layer whose runs it copies
        return lam if lam < m else m if lam <= m + E else lam - E

    def phi(tag):
        return tag if tag is None or tag < m else tag + E

    runs = tpl["runs"]
    sib = {int(k): {int(t): j for t, j in v.items()} for k, v in tpl["sibling"].items()}
    out, ids = [], {}
    append = out.append
    nxt = 0

    def emit(j, k):
        nonlocal nxt
        tag, direction, events = runs[j][0], runs[j][1], runs[j][2]
        if marks is not None and runs[j][4] != "load":
            label = runs[j][4].replace(".micro1.", f".micro{k}.") if k else runs[j][4]
            marks.setdefault(label, len(out))
        if tag == m and direction:
            layers = range(m, m + E + 1) if direction > 0 else range(m + E, m - 1, -1)
        else:
            layers = (phi(tag),)
        for lam in layers:
            o = 0
            for e in events:
                kind = e[0]
                if kind == "a":
                    sz = e[1]
                    if isinstance(sz, list) and sz[0] == "r":
                        for staging, sem in ev.reduction(sz[1]):
                            append(("a", nxt, staging))
                            append(("a", nxt + 1, sem))
                            append(("f", nxt + 1))
                            append(("f", nxt))
                            nxt += 2
                        continue
                    ids[(j, lam, o, k)] = nxt
                    append(("a", nxt, size_of(sz)))
                    nxt += 1
                    o += 1
                elif kind == "f":
                    tj, to, d, mc = e[1], e[2], e[3], e[4]
                    ttag = runs[tj][0]
                    ka = 0 if not mc else k if mc == 1 else A - 1
                    if ttag is None:
                        key = (tj, None, to, ka)
                    else:
                        lam_a = phi(ttag) if d is None else lam + d
                        src = psi(lam_a)
                        key = (tj if src == ttag else sib[tj][src], lam_a, to, ka)
                    append(("f", ids.pop(key)))
                else:
                    append(("e",))

    j = 0
    while j < len(runs):
        if not runs[j][3]:
            emit(j, 0)
            j += 1
            continue
        j2 = j
        while j2 < len(runs) and runs[j2][3]:
            j2 += 1
        for k in range(1, A):  # the accumulating micro-batches: the traced one, repeated
            for jj in range(j, j2):
                emit(jj, k)
        j = j2
    if marks is not None:
        marks["end"] = len(out)
    return out


def replay(tpl: dict, B: int, S: int, r: int, L: int, expandable: bool = False, limit_bytes=None,
           initial_allocated: int = 0, grad_accum: int = 1) -> dict:
    """`allocator.simulate` over the expanded events -> its result, plus "events"."""
    from vramfit.memory.allocator import simulate

    marks = {}
    events = expand(tpl, B, S, r, L, grad_accum, marks)
    sim = simulate(events, expandable_segments=expandable, limit_bytes=limit_bytes,
                   initial_allocated=initial_allocated)
    sim["events"] = len(events)
    sim["marks"] = marks
    return sim
