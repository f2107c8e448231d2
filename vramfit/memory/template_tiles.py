"""Event templates composed torch-free along trl's fused-loss tile axis: where the loss's token tiles
allocate (QLoRA's fp32 head after prepare_model_for_kbit_training, fp32 weights under autocast, a
LayerNorm's fp32 output under autocast), every tile count is a regime of its own (vramfit.memory.template),
so a setup at 4 or more tiles borrows the templates of the same setup at 2 and 3 tiles.

trl's `ChunkedLogProbFunction` runs one loop body per tile of TOKEN_TILE tokens (the hidden states' cast,
each LM-head chunk's cast, the projection into one buffer), the last tile with the rows left.  So the
stream at 3 tiles is the stream at 2 with one full tile's events inserted in each run of the loss
(`_insertion`: the prefix equal event for event, sizes included; the inserted block the loop body of the
last tile after it, up to its sizes and its references to the tile before; the rest equal in shape, with the frees of later
allocations of the run moved by the block's allocations), and the stream at t tiles repeats that block
t - 3 more times, the frees of each copy into the tile before it following, and each size after it (the
last tile's rows, the loop's outputs) moved linearly in t: s_t = s_3 + (t - 3)(s_3 - s_2).  What does not
fit that shape raises NotComposable and the caller replays for real.  Tested against the recorded stream
of the setup at 4 and 5 tiles (tests/test_template_tile_compose.py) and checked at full size on bundled
profiles (benchmarks/speed/tile_compose_check.py).
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

from vramfit.memory.template import TOKEN_TILE, NoTemplate, expand, regime, regime_info, token_tiles

BASES = (2, 3)  # the tile counts composed from

_COMPOSED: dict = {}  # (template key) -> composed template
_KEPT = 16


class NotComposable(NoTemplate):
    """The two templates do not compose along the tile axis."""


# --------------------------------------------------------------------------- sizes


def _expr(tpl: dict, k: int) -> tuple:
    """Expression k of `tpl` as (coefficients at r0, per unit of rank, per layer), Fractions."""
    e = tpl["exprs"][k]
    if isinstance(e, int):
        return (Fraction(e),) + (Fraction(0),) * 7, (Fraction(0),) * 8, Fraction(0)
    p, d, l = e
    return (tuple(Fraction(x) for x in p), tuple(Fraction(x) for x in d) if d else (Fraction(0),) * 8,
            Fraction(l))


def _json(e: tuple):
    p, d, l = e
    if not any(p[1:]) and not any(d) and not l:
        if p[0].denominator != 1:
            raise NotComposable("a constant size that is not an integer")
        return int(p[0])
    return [[str(x) for x in p], [str(x) for x in d] if any(d) else [], str(l)]


class _Sizes:
    """The composed template's expressions: s_3 + n (s_3 - s_2), deduplicated."""

    def __init__(self, t2: dict, t3: dict, n: int):
        self.t2, self.t3, self.n = t2, t3, n
        self.exprs, self.index = [], {}

    def add(self, e) -> int:
        key = repr(e)
        k = self.index.get(key)
        if k is None:
            k = self.index[key] = len(self.exprs)
            self.exprs.append(e)
        return k

    def same(self, k3: int) -> int:
        return self.add(self.t3["exprs"][k3])

    def moved(self, k3: int, k2: int) -> int:
        a, b = _expr(self.t3, k3), _expr(self.t2, k2)
        if a == b:
            return self.same(k3)
        n = self.n
        return self.add(_json(tuple(tuple(x + n * (x - y) for x, y in zip(u, v)) if isinstance(u, tuple)
                                    else u + n * (u - v) for u, v in zip(a, b))))

    def size(self, sz3, sz2, moved: bool):
        """An alloc's size field (an index, ["n", k, numel, chunk], ["r", desc]) in the composed template."""
        one = (lambda k3, k2: self.moved(k3, k2)) if moved else (lambda k3, k2: self.same(k3))
        if isinstance(sz3, int):
            return one(sz3, sz2)
        if sz3[0] == "n":
            return ["n", one(sz3[1], sz2[1]), one(sz3[2], sz2[2]), sz3[3]]
        shape, stride, *rest = sz3[1]
        return ["r", [[one(a, b) for a, b in zip(shape, sz2[1][0])], [one(a, b) for a, b in zip(stride, sz2[1][1])],
                      *rest]]


def _shape(sz):
    """An alloc's size field without its sizes (what must agree between the two templates)."""
    if isinstance(sz, int):
        return "s"
    if sz[0] == "n":
        return ("n", sz[3])
    shape, stride, *rest = sz[1]
    return ("r", len(shape), len(stride), repr(rest))


def _sized(tpl: dict, sz):
    """An alloc's size field with its expressions (exact equality across templates)."""
    if isinstance(sz, int):
        return repr(tpl["exprs"][sz])
    if sz[0] == "n":
        return ("n", repr(tpl["exprs"][sz[1]]), repr(tpl["exprs"][sz[2]]), sz[3])
    shape, stride, *rest = sz[1]
    return ("r", [repr(tpl["exprs"][k]) for k in shape], [repr(tpl["exprs"][k]) for k in stride], repr(rest))


# --------------------------------------------------------------------------- the inserted tile


def _allocs(events) -> int:
    """Allocations that take an ordinal (a reduction's buffers do not)."""
    return sum(1 for e in events if e[0] == "a" and not (isinstance(e[1], list) and e[1][0] == "r"))


def _insertion(j: int, e2: list, e3: list, t2: dict, t3: dict, shift: dict) -> tuple:
    """(p, q, n_ev, n_a, rel, own): run j of the 3-tile template is run j of the 2-tile one with a block of
    n_ev events (n_a allocations) inserted at event p (allocation ordinal q), see the module; rel and own
    (`_periodic`): the block's frees into the tile before it and of its own allocations.  `shift`: the runs
    already aligned (`_map`)."""
    n_ev = len(e3) - len(e2)
    if n_ev <= 0:
        raise NotComposable(f"run {j}: no tile inserted")
    p_exact = 0
    while p_exact < len(e2) and _same_event(t3, e3[p_exact], t2, e2[p_exact], shift):
        p_exact += 1
    for p in range(min(p_exact, len(e2)), -1, -1):
        q = _allocs(e2[:p])
        block, after = e3[p:p + n_ev], e3[p + n_ev:p + 2 * n_ev]
        n_a = _allocs(block)
        got = _periodic(t3, block, after, j, q, n_a)
        if got is None:
            continue
        rel, own = got
        mine = {**shift, j: (q, n_a, {block[i][2]: o for i, o in rel.items()})}
        if all(x[0] == y[0] and (x[0] != "a" or _shape(x[1]) == _shape(y[1])) and (
                x[0] != "f" or tuple(x) == _map(y, mine)) for x, y in zip(e3[p + n_ev:], e2[p:])):
            return p, q, n_ev, n_a, rel, own
    raise NotComposable(f"run {j}: the inserted tile is not found")


def _map(y, shift) -> tuple:
    """A free of the 2-tile stream after the inserted blocks, in the 3-tile stream's ordinals."""
    tj, o = y[1], y[2]
    if tj in shift:
        q, n_a, rel = shift[tj]
        o = rel[o] if o in rel else o + n_a if o >= q else o
    return ("f", tj, o, y[3], y[4])


def _same_event(t3, x, t2, y, shift) -> bool:
    if x[0] != y[0]:
        return False
    if x[0] == "a":
        return _sized(t3, x[1]) == _sized(t2, y[1])
    if x[0] == "f":
        return tuple(x) == _map(y, shift)
    return True


def _periodic(tpl, block, after, j, q, n_a) -> tuple | None:
    """The inserted block (a full tile) against the tile after it (the last one): the same loop body, its
    frees into the tile before it (rel: event index -> the ordinal in the block the last tile's same
    free references), of its own allocations (own: event indices) or of allocations outside the loop
    (the same); None where not."""
    if len(after) != len(block):
        return None
    rel, own = {}, set()
    for i, (x, y) in enumerate(zip(block, after)):
        if x[0] != y[0] or (x[0] == "a" and _shape(x[1]) != _shape(y[1])):
            return None
        if x[0] == "f":
            if (x[1], x[3], x[4]) != (y[1], y[3], y[4]):
                return None
            if y[1] == j and q <= y[2] < q + n_a and x[2] < q:
                rel[i] = y[2]
            elif y[1] == j and q <= x[2] < q + n_a and y[2] == x[2] + n_a:
                own.add(i)
            elif x[2] != y[2] or y[1] == j and x[2] >= q:
                return None
    return rel, own


# --------------------------------------------------------------------------- composing


def extend(t2: dict, t3: dict, tiles: int) -> dict:
    """The template at `tiles` token tiles (>= 3) from the same setup's templates at 2 and 3 tiles."""
    if tiles < 3:
        raise NotComposable(f"{tiles} token tiles: a base of its own")
    for k in ("lb", "m", "r0"):
        if t2[k] != t3[k]:
            raise NotComposable(f"the templates differ in {k}")
    if t2["regime"][3] != 2 or t3["regime"][3] != 3 or t2["regime"][:3] + t2["regime"][4:] != \
            t3["regime"][:3] + t3["regime"][4:]:
        raise NotComposable("the templates are not the same setup's at 2 and 3 tiles")
    r2, r3 = t2["runs"], t3["runs"]
    if len(r2) != len(r3) or t2["sibling"] != t3["sibling"] or any(
            a[0] != b[0] or a[1] != b[1] or a[3] != b[3] or a[4] != b[4] for a, b in zip(r2, r3)):
        raise NotComposable("the templates' runs differ")
    shift = {}  # grown run -> (q, n_a, {ordinal of the tile before: its copy's in the block}), 3-tile stream
    where = {}  # grown run -> (p, n_ev, rel)
    for j, (a, b) in enumerate(zip(r2, r3)):
        if len(a[2]) != len(b[2]):
            p, q, n_ev, n_a, rel, own = _insertion(j, a[2], b[2], t2, t3, shift)
            shift[j] = (q, n_a, {b[2][p + i][2]: o for i, o in rel.items()})
            where[j] = (p, n_ev, rel, own)
    if not where:
        raise NotComposable("no run grows with the tiles")
    n = tiles - 3
    sizes = _Sizes(t2, t3, n)

    def moved_ref(e):  # a free after the inserted blocks: later allocations of a grown run move
        tj, o = e[1], e[2]
        if tj in shift and o >= shift[tj][0]:
            o += n * shift[tj][1]
        return ["f", tj, o, e[3], e[4]]

    def ref_check(x, y):  # a free of the 3-tile stream against the 2-tile one's (already aligned)
        if tuple(x) != _map(y, shift):
            raise NotComposable("a free differs between the templates")

    runs = []
    for j, (a, b) in enumerate(zip(r2, r3)):
        e2, e3 = a[2], b[2]
        out = []
        if j in where:
            p, n_ev, rel, own = where[j]
            q, n_a = shift[j][:2]
            pairs = list(zip(e3[:p], e2[:p]))
            head = [(x, y, False) for x, y in pairs]
            block = e3[p:p + n_ev]
            tail = [(x, y, True) for x, y in zip(e3[p + n_ev:], e2[p:])]
        else:
            head, block, tail = [(x, y, True) for x, y in zip(e3, e2)], [], []
        for item in head + ([None] if block else []) + tail:
            if item is None:  # the inserted block, then its n more copies
                for c in range(n + 1):
                    for i, e in enumerate(block):
                        if e[0] == "a":
                            out.append(["a", sizes.size(e[1], e[1], False)])
                        elif e[0] == "f" and i in own:
                            out.append(["f", e[1], e[2] + c * n_a, e[3], e[4]])
                        elif e[0] == "f":  # into the tile before: the copy before's (the block itself first)
                            out.append(["f", e[1], rel[i] + (c - 1) * n_a, e[3], e[4]] if i in rel and c else
                                       moved_ref(e))
                        else:
                            out.append(list(e))
                continue
            x, y, moved = item
            if x[0] != y[0]:
                raise NotComposable("the templates' events differ")
            if x[0] == "a":
                if _shape(x[1]) != _shape(y[1]):
                    raise NotComposable("an allocation differs between the templates")
                out.append(["a", sizes.size(x[1], y[1], moved)])
            elif x[0] == "f":
                ref_check(x, y)
                out.append(moved_ref(x))
            else:
                out.append(list(x))
        runs.append([b[0], b[1], out, b[3], b[4]])
    reg = list(t3["regime"])
    reg[3] = tiles
    return {"format": t3["format"], "lb": t3["lb"], "m": t3["m"], "r0": t3["r0"], "regime": reg,
            "exprs": sizes.exprs, "runs": runs, "sibling": t3["sibling"],
            "note": f"the fused loss's {tiles} token tiles composed from this setup's templates at 2 and 3 tiles"}


def base_seq(spec, setup, grad_accum: int, tiles: int) -> int | None:
    """A sequence length at the setup's micro-batch with `tiles` token tiles and its regime otherwise."""
    B = setup.micro_batch
    info = regime_info(spec, setup, exact_tiles=True)
    r = setup.lora_r if setup.method != "full" else 0
    want = regime(info, B, setup.seq_len, grad_accum, r)
    want[3] = tiles
    lo, hi = TOKEN_TILE * (tiles - 1) // B + 2, TOKEN_TILE * tiles // B + 1
    mid = (lo + hi) // 2
    for s in sorted(range(max(lo, 2), hi + 1), key=lambda c: abs(c - mid)):
        if token_tiles(B, s) == tiles and regime(info, B, s, grad_accum, r) == want:
            return s
    return None


def from_bases(spec, setup, grad_accum: int, lookup) -> dict | None:
    """`setup`'s template at >= 4 token tiles of the fused loss, extended from `lookup(seq_len)`: the cached
    plain template of the same setup at that sequence length (at 2 and 3 tiles, `base_seq`), or None; None
    where a base is missing or they do not compose."""
    if setup.loss != "fused" or setup.liger or setup.packing or setup.activation_offloading:
        return None
    tiles = token_tiles(setup.micro_batch, setup.seq_len)
    if tiles < 4:
        return None
    bases = []
    for tt in BASES:
        s = base_seq(spec, setup, grad_accum, tt)
        tpl = lookup(s) if s is not None else None
        if tpl is None or "runs" not in tpl:
            return None
        bases.append(tpl)
    try:
        return extend(bases[0], bases[1], tiles)
    except NoTemplate:
        return None


def tile_composed(spec, setup, grad_accum: int, key: str, cached) -> dict | None:
    """`setup`'s template (its key `key`) at >= 4 token tiles of the fused loss where each tile count is a
    regime of its own, composed from `cached(setup at 2 and 3 tiles, grad_accum)` (plain templates or None);
    checked to expand at the setup's own shape; None where it does not compose."""
    hit = _COMPOSED.get(key)
    if hit is not None:
        return hit
    out = from_bases(spec, setup, grad_accum, lambda s: cached(replace(setup, seq_len=s), grad_accum))
    if out is None:
        return None
    try:
        expand(out, setup.micro_batch, setup.seq_len, setup.lora_r, spec.num_layers, grad_accum)
    except (NoTemplate, KeyError, IndexError, TypeError, ValueError):
        return None
    _COMPOSED[key] = out
    while len(_COMPOSED) > _KEPT:
        _COMPOSED.pop(next(iter(_COMPOSED)))
    return out
