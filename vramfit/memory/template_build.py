"""Build an event template (vramfit.memory.template) for one discrete setup: record
`training_events` on the model shrunk to LB, LB + 1 and LB + 2 decoder layers at a grid of
(micro-batch, sequence, rank) points with every event tagged by its decoder layer, fit each size
exactly, and check the result against traces it was not fitted on (in the fused loss's regime of
every tile count >= 2, fitted at 2 and 3 token tiles, checked at 4 and 5).  Torch is imported inside.

Tags (build time only; the recorder of `training_events` is subclassed, nothing else changes):
- forward: a forward pre-hook on each decoder layer sets it, its forward hook restores the one
  before (a checkpointed layer's recompute inside the backward nests);
- backward: a hook on each layer's output tensor sets the layer when its gradient arrives, i.e.
  when the layer's backward starts; events between layers keep the last layer's tag;
- load, gradient clipping and the optimizer: the layer of the parameter an op reads (for a
  foreach op, per output), of the parameter whose storage is registered, of the 4-bit weight
  `_qlora_load` is quantizing; a free there takes its allocation's tag;
- `_foreach_norm`'s partial buffer and CUDA reductions are recorded as formulas (template.py).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from fractions import Fraction

from vramfit.memory.template import (FORMAT, MONOMIALS, TILES_GENERAL, NoTemplate, expand, monomials, regime,
                                     regime_info)
from vramfit.memory.template_record import record, shrunk_spec

LB, M = 6, 3  # layers traced; the representative middle layer (its runs repeat)
# the builder's version: an entry it could not build ({"exact": False}) records it, and a newer builder tries
# again (template_cache.setup_template); templates it built stay (checked against the real replay when kept)
BUILDER = 2  # 2: bitsandbytes absmax tagged by its parameter (full fine-tuning with paged 8-bit states)
R0, R1, R2 = 8, 16, 12  # LoRA ranks: fitted at R0, slope from R1, checked at R2


# --------------------------------------------------------------------------- structure


def _runs(tagged: list) -> list:
    runs = []
    for ev in tagged:
        if not runs or runs[-1][0] != ev[1] or (runs[-1][0] is None) != (ev[1] is None) or runs[-1][2] != ev[-1]:
            runs.append([ev[1], [], ev[-1]])  # (block, phase label): a new run at each phase
        runs[-1][1].append(ev)
    return runs


def skeleton(tagged: list, m: int) -> tuple:
    """-> (runs for the template with sizes as value positions, values): every alloc's values and
    every reduction's shape and strides, in order."""
    runs = _runs(tagged)
    # sweeps: consecutive runs whose layers step by +1 or -1
    sweep, direction = [0] * len(runs), {}
    sid = 0
    for j in range(1, len(runs)):
        a, b = runs[j - 1][0], runs[j][0]
        step = b - a if a is not None and b is not None else 0
        if abs(step) == 1 and direction.get(sid, step) == step:
            direction[sid] = step
        else:
            sid += 1
        sweep[j] = sid
    by_sweep = {}
    for j, (tag, _, _) in enumerate(runs):
        if tag is not None:
            by_sweep.setdefault(sweep[j], {})[tag] = j
    where = {}  # alloc id -> (run, ordinal, tag, accumulating micro-batch)
    values, out_runs, sibling = [], [], {}
    for j, (tag, evs, (block, label)) in enumerate(runs):
        d = direction.get(sweep[j], 0)
        if tag == m and not d:
            raise NoTemplate(f"a run of layer {m} outside a sweep of layers")
        o, out = 0, []
        for ev in evs:
            if ev[0] == "a":
                where[ev[2]] = (j, o, tag, (block, label))
                o += 1
                pos = list(range(len(values), len(values) + len(ev[3])))
                values.extend(ev[3])
                out.append(["a", pos[0] if ev[4] == "s" else ["n", pos[0], pos[1], ev[4]]])
            elif ev[0] == "f":
                tj, to, ttag, (tblock, _) = where[ev[2]]
                mc = 0 if tblock is None else 1 if tblock == block else 2
                if ttag is None:
                    off = None
                elif tag is None:
                    if ttag == m:
                        raise NoTemplate(f"a free outside the layers of an allocation of layer {m}")
                    off = None
                elif (tag - m) * (ttag - m) < 0 and abs(ttag - tag) > 2:
                    off = None  # across the repeated layers, far: the first and last layers' own (loss, embeddings)
                else:
                    off = ttag - tag
                if ttag is not None and tj not in sibling:
                    sibling[tj] = by_sweep.get(sweep[tj], {})
                out.append(["f", tj, to, off, mc])
            elif ev[0] == "r":
                shape, stride, dims, *rest = ev[2]
                n = len(shape) + len(stride)
                pos = list(range(len(values), len(values) + n))
                values.extend(list(shape) + list(stride))
                out.append(["a", ["r", [pos[:len(shape)], pos[len(shape):], list(dims), *rest]]])
            else:
                out.append(["e"])
        out_runs.append([tag, d if tag == m else 0, out, int(block is not None), label])
    return out_runs, values, sibling


def _shape_key(runs) -> str:
    """The skeleton without value positions: equal for two traces of the same structure."""
    import json

    def strip(e):
        if e[0] != "a":
            return e
        sz = e[1]
        if isinstance(sz, int):
            return ["a"]
        if sz[0] == "n":
            return ["a", "n", sz[3]]
        return ["a", "r", len(sz[1][0]), sz[1][2:]]

    return json.dumps([[t, d, [strip(e) for e in evs], blk, lab] for t, d, evs, blk, lab in runs])


# --------------------------------------------------------------------------- exact fitting


def _solve_all(points: list, columns: list, vectors: dict) -> dict:
    """Exact coefficients (Fractions) over `columns` of MONOMIALS for each value vector (one value
    per point), from a square system; None where singular."""
    n = len(columns)
    A = [[Fraction(monomials(B, S)[c]) for c in columns] for B, S in points]
    # invert A (Gauss-Jordan)
    inv = [[Fraction(int(i == j)) for j in range(n)] for i in range(n)]
    A = [row[:] for row in A]
    for c in range(n):
        p = next((i for i in range(c, n) if A[i][c] != 0), None)
        if p is None:
            raise NoTemplate("the fitting points are degenerate")
        A[c], A[p], inv[c], inv[p] = A[p], A[c], inv[p], inv[c]
        f = A[c][c]
        A[c] = [x / f for x in A[c]]
        inv[c] = [x / f for x in inv[c]]
        for i in range(n):
            if i != c and A[i][c] != 0:
                g = A[i][c]
                A[i] = [x - g * y for x, y in zip(A[i], A[c])]
                inv[i] = [x - g * y for x, y in zip(inv[i], inv[c])]
    out = {}
    for vec in vectors:
        coefs = [sum(inv[i][j] * vec[j] for j in range(n)) for i in range(n)]
        full = [Fraction(0)] * len(MONOMIALS)
        for c, v in zip(columns, coefs):
            full[c] = v
        out[vec] = full
    return out


def _evaluate(coefs, B, S) -> Fraction:
    return sum(c * x for c, x in zip(coefs, monomials(B, S)))


def _s_values(info, reg, B, count) -> list:
    """`count` sequence lengths at micro-batch B in regime `reg`, spread, not multiples of 128.  In the
    fused loss's general tile regime (TILES_GENERAL) they span 2 and 3 token tiles, the first two at
    different counts (a tile loop that allocates per tile changes the stream's shape there, found at
    the second trace); the checks add 4 and 5 tiles (`_tile_point`)."""
    from vramfit.memory.template import GEMM_4BIT_CUSTOM_MAX_M, TILES_GENERAL, TOKEN_TILE

    lo, hi = 200, 1700
    if reg[1]:
        lo, hi = 9, GEMM_4BIT_CUSTOM_MAX_M // B
    elif info["qlora"]:
        lo = max(lo, GEMM_4BIT_CUSTOM_MAX_M // B + 1)
    if info["window"]:
        if reg[2]:
            lo = max(lo, info["window"])
            hi = max(hi, lo + 1500)
        else:
            hi = min(hi, info["window"] - 1)
    if reg[3] == TILES_GENERAL:  # 2 and 3 tiles, on the window's side of the regime
        lo, hi = max(TOKEN_TILE // B + 2, 9), TOKEN_TILE * 3 // B + 1
        if info["window"] and reg[2]:
            lo = max(lo, info["window"])
            hi = max(hi, lo + 1500)
        elif info["window"]:
            hi = min(hi, info["window"] - 1)
    elif reg[3]:
        t = reg[3]
        tlo, thi = TOKEN_TILE * (t - 1) // B + 2, TOKEN_TILE * t // B + 1
        lo, hi = max(lo if t == 1 else 0, tlo, 9), min(thi, hi if t == 1 else thi)
        if hi - lo < 40:
            lo, hi = tlo, thi
    for jitter in (0, 1, 2, 3):
        out = []
        for k in range(count):
            s = lo + (hi - lo) * (2 * k + 1) // (2 * count) + (0, 37, 11, 53, 23)[k % 5] * jitter * (hi - lo) // 4000
            for cand in (s, s + 1, s - 1, s + 3):
                if lo <= cand <= hi and cand % 128 and cand not in out and regime(info, B, cand)[:4] == reg[:4]:
                    out.append(cand)
                    break
        if len(out) == count and (B != 1 and count < 4 or _independent(out[:4])):
            if reg[3] == TILES_GENERAL and count >= 4:
                out[1], out[3] = out[3], out[1]  # 2 tiles, then 3
            return out
    raise NoTemplate(f"too few independent sequence lengths in regime {reg} at micro-batch {B}")


def _tile_point(info, reg, tiles: int, batches) -> tuple:
    """(micro-batch, sequence length) of the first of `batches` with a length in regime `reg` at
    `tiles` token tiles of the fused loss (the general tile regime's checks)."""
    from vramfit.memory.template import TOKEN_TILE, token_tiles

    for b in batches:
        tlo, thi = TOKEN_TILE * (tiles - 1) // b + 2, TOKEN_TILE * tiles // b + 1
        mid = (tlo + thi) // 2
        for cand in sorted(range(tlo, thi + 1), key=lambda c: abs(c - mid)):
            if cand % 128 and token_tiles(b, cand) == tiles and regime(info, b, cand)[:4] == reg[:4]:
                return b, cand
    raise NoTemplate(f"no sequence length at {tiles} token tiles in regime {reg}")


def _ranks(info, reg, r: int) -> tuple:
    """Three LoRA ranks in the rank regime of `r` (8, 16, 12 where they are): fitted at the first,
    slope from the second, checked at the third."""
    same = [q for q in range(1, 1025) if regime(info, 2, 1000, 1, q)[5] == reg[5]]
    if all(q in same for q in (R0, R1, R2)):
        return R0, R1, R2
    lo, hi = min(same), max(same)
    if hi - lo < 2:
        raise NoTemplate(f"LoRA rank {r}: too few ranks with the optimizer's same state layout")
    return lo, hi, (lo + hi) // 2


def _independent(svals) -> bool:
    """1, S, S^2 and R independent over these sequence lengths (R, rounded up to 128, must not be
    affine in S over them, as it is for evenly spaced lengths)."""
    try:
        _solve_all([(1, s) for s in svals], [0, 2, 4, 6], [])
    except NoTemplate:
        return False
    return True


def build(spec, setup, B: int, S: int, grad_accum: int = 1, verbose: bool = False,
          exact_tiles: bool = False) -> dict:
    """The template of `setup` (its discrete fields) in the regime of (B, S, grad_accum), checked on
    the shrunk model; raises NoTemplate where the machinery does not cover it.  Traced with 2
    micro-batches where grad_accum > 1 (checked with 3).  With `exact_tiles`, the fused loss's tile
    count is the regime's even where `regime_info` says one template serves every count >= 2
    (TILES_GENERAL: fitted at 2 and 3 tiles, checked at 4 and 5)."""
    t0 = time.perf_counter()
    if spec.num_layers < LB + 2:
        raise NoTemplate(f"{spec.num_layers} layers: the replay itself is as fast")
    info = regime_info(spec, setup, exact_tiles)
    lora = setup.method != "full"
    reg = regime(info, B, S, grad_accum, setup.lora_r if lora else 0)
    A = 2 if grad_accum > 1 else 1
    R0, R1, R2 = _ranks(info, reg, setup.lora_r) if lora else (setup.lora_r,) * 3
    b1 = reg[0]
    Bs = [1] if b1 else [2, 3]
    B2 = 1 if b1 else 5
    while not b1 and B2 < 9:
        try:
            _s_values(info, reg, B2, 1)
            break
        except NoTemplate:
            B2 += 1
    svals = {b: _s_values(info, reg, b, 5) for b in dict.fromkeys(Bs + [B2])}
    columns = [0, 2, 4, 6] if b1 else list(range(len(MONOMIALS)))
    grid = [(b, s) for b in Bs for s in svals[b][:4]][:len(columns)]
    dgrid = [(b, s) for b in Bs for s in svals[b][:2]]  # the rank's slope over 1, B, S, BS
    dcols = [0, 2] if b1 else [0, 1, 2, 3]
    r0 = R0 if lora else setup.lora_r

    def at(b, s, r=r0, layers=LB):
        st = dataclasses.replace(setup, micro_batch=b, seq_len=s, lora_r=r)
        return record(spec, st, layers, A)

    traces = 0
    skel0 = None
    vals = []
    for b, s in grid:
        runs, v, sibling = skeleton(at(b, s), M)
        traces += 1
        if skel0 is None:
            skel0, key0, sib0 = runs, _shape_key(runs), sibling
        elif _shape_key(runs) != key0:
            raise NoTemplate(f"the stream's shape changes between sequence/batch points ({b}, {s})")
        vals.append(v)
    nvals = len(vals[0])
    vecs = {tuple(v[k] for v in vals) for k in range(nvals)}
    fit = _solve_all(grid, columns, vecs)
    base = [fit[tuple(v[k] for v in vals)] for k in range(nvals)]
    slope = [None] * nvals
    if lora:
        dvals = []
        for b, s in dgrid:
            runs, v, _ = skeleton(at(b, s, R1), M)
            traces += 1
            if _shape_key(runs) != key0:
                raise NoTemplate("the stream's shape changes with the LoRA rank")
            dvals.append(v)
        dvecs = {}
        for k in range(nvals):
            diff = tuple(Fraction(dv[k]) - _evaluate(base[k], b, s) for dv, (b, s) in zip(dvals, dgrid))
            dvecs.setdefault(diff, []).append(k)
        dfit = _solve_all(dgrid, dcols, list(dvecs))
        for diff, ks in dvecs.items():
            per_r = [c / (R1 - r0) for c in dfit[diff]]
            for k in ks:
                slope[k] = per_r
    # the per-layer change, from LB + 1 layers at the first grid point
    b, s = grid[0]
    big = at(b, s, layers=LB + 1)
    traces += 1
    per_layer = _per_layer(skel0, big, base, b, s)
    tpl = _assemble(skel0, sib0, base, slope, per_layer, r0, reg)
    # checks on points nothing was fitted on: LB layers at (B2, S, R2); LB + 2 layers
    checks = [(B2, svals[B2][4], R2 if lora else r0, LB), (Bs[-1], svals[Bs[-1]][4], R1 if lora else r0, LB + 2)]
    if reg[3] == TILES_GENERAL:  # at token tile counts it was not fitted on (2 and 3): 4 and 5
        more = [] if b1 else [2, 3, 4, 6, 8, 12, 16]  # where a sliding window leaves no length at B2's
        checks[0] = (*_tile_point(info, reg, 4, [B2] + more), *checks[0][2:])
        checks[1] = (*_tile_point(info, reg, 5, [Bs[-1]] + more), *checks[1][2:])
    for b, s, r, layers in checks:
        st = dataclasses.replace(setup, micro_batch=b, seq_len=s, lora_r=r)
        a = 3 if grad_accum > 1 else 1
        real = _real_events(spec, st, layers, a)
        traces += 1
        try:
            mine = expand(tpl, b, s, r, layers, a)
        except KeyError as exc:
            raise NoTemplate(f"the template does not expand to {layers} layers ({exc})") from None
        if not same_events(mine, real):
            raise NoTemplate(f"the template does not reproduce {layers} layers at micro-batch {b}, seq {s}, r {r}")
    tpl["build"] = {"traces": traces, "seconds": round(time.perf_counter() - t0, 2)}
    if verbose:
        print(f"template: {len(tpl['runs'])} runs, {len(tpl['exprs'])} sizes, {traces} traces, "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return tpl


def _per_layer(skel0, big_tagged, base, b, s) -> list:
    """Each value's change per added layer (zero for the repeated layer's own values)."""
    runs_big = _skeleton_loose(big_tagged)
    # expected run sequence of LB + 1 layers: the M runs twice, later layers moved up by one
    src = []
    for j, (tag, d, evs, _, _) in enumerate(skel0):
        if tag == M and d:
            src += [(j, M), (j, M + 1)] if d > 0 else [(j, M + 1), (j, M)]
        else:
            src.append((j, tag if tag is None or tag < M else tag + 1))
    if [t for _, t in src] != [t for t, _ in runs_big] or len(src) != len(runs_big):
        raise NoTemplate("one more layer does not add one run per sweep")
    per = [Fraction(0)] * len(base)
    for (j, _), (_, evs_big) in zip(src, runs_big):
        mine = [e for e in skel0[j][2]]
        if len(mine) != len(evs_big):
            raise NoTemplate("one more layer changes a run")
        for e, vb in zip(mine, evs_big):
            if e[0] != "a":
                continue
            pos = _positions(e[1])
            if len(pos) != len(vb):
                raise NoTemplate("one more layer changes a run")
            for p, v in zip(pos, vb):
                d = Fraction(v) - _evaluate(base[p], b, s)
                if d and skel0[j][0] == M and skel0[j][1]:
                    raise NoTemplate("a repeated layer's size changes with the layer count")
                if per[p] and per[p] != d:
                    raise NoTemplate("a size changes differently per layer")
                per[p] = d
    return per


def _skeleton_loose(tagged):
    """Runs of a tagged stream with each event's values (for the per-layer change)."""
    out = []
    for tag, evs, _ in _runs(tagged):
        vals = []
        for ev in evs:
            if ev[0] == "a":
                vals.append(list(ev[3]))
            elif ev[0] == "r":
                vals.append(list(ev[2][0]) + list(ev[2][1]))
            else:
                vals.append(None)
        out.append((tag, vals))
    return out


def _positions(sz) -> list:
    if isinstance(sz, int):
        return [sz]
    if sz[0] == "n":
        return [sz[1], sz[2]]
    return list(sz[1][0]) + list(sz[1][1])


def _assemble(skel0, sibling, base, slope, per_layer, r0, reg) -> dict:
    exprs, index = [], {}

    def expr(p):
        c, d, l = base[p], slope[p], per_layer[p]
        if all(x == 0 for x in c[1:]) and not (d and any(d)) and not l:
            key = c[0]
            if key.denominator != 1:
                raise NoTemplate("a constant size that is not an integer")
            key = int(key)
        else:
            key = ([str(x) for x in c], [str(x) for x in d] if d and any(d) else [], str(l))
            key = (tuple(key[0]), tuple(key[1]), key[2])
        k = index.get(key)
        if k is None:
            k = index[key] = len(exprs)
            exprs.append(key if isinstance(key, int) else [list(key[0]), list(key[1]), key[2]])
        return k

    def conv(sz):
        if isinstance(sz, int):
            return expr(sz)
        if sz[0] == "n":
            return ["n", expr(sz[1]), expr(sz[2]), sz[3]]
        shape, stride, dims, *rest = sz[1]
        return ["r", [[expr(p) for p in shape], [expr(p) for p in stride], dims, *rest]]

    runs = []
    for tag, d, evs, blk, label in skel0:
        runs.append([tag, d, [["a", conv(e[1])] if e[0] == "a" else e for e in evs], blk, label])
    return {"format": FORMAT, "lb": LB, "m": M, "r0": r0, "regime": reg, "exprs": exprs, "runs": runs,
            "sibling": {str(j): {str(t): k for t, k in v.items()} for j, v in sibling.items()}}


# --------------------------------------------------------------------------- checks


def _real_events(spec, setup, layers: int | None = None, grad_accum: int = 1) -> list:
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import resolve_targets

    s = spec if layers is None else shrunk_spec(spec, layers)
    return training_events(s, setup, resolve_targets(s, setup), steps=2, grad_accum=grad_accum)["events"]


def canonical(events) -> list:
    """Events with allocations numbered in order, each run of consecutive frees as a sorted set:
    frees with no allocation between them leave the allocator in the same state in any order."""
    ordinal, out, run = {}, [], []
    for ev in events:
        if ev[0] == "f":
            run.append(ordinal[ev[1]])
            continue
        if run:
            out.append(("f", tuple(sorted(run))))
            run = []
        if ev[0] == "a":
            ordinal[ev[1]] = len(ordinal)
            out.append(("a", ev[2]))
        else:
            out.append(("e",))
    if run:
        out.append(("f", tuple(sorted(run))))
    return out


def same_events(a, b) -> bool:
    return len(a) == len(b) and canonical(a) == canonical(b)


def check_full_size(tpl: dict, spec, setup, targets, grad_accum: int = 1) -> tuple:
    """The template against the real replay at `setup` itself, full size: -> (exact, the real
    replay's simulate result under the setup's allocator, its events (training_events' result),
    why not exact)."""
    from vramfit.memory.allocator import simulate
    from vramfit.memory.events import training_events
    from vramfit.memory.kernels import Unsupported

    try:
        res = training_events(spec, setup, targets, steps=2, grad_accum=grad_accum)
    except Unsupported as exc:
        return False, None, None, f"the replay does not cover {exc}"
    real = res["events"]
    B, S, r, L = setup.micro_batch, setup.seq_len, setup.lora_r, spec.num_layers
    try:
        mine = expand(tpl, B, S, r, L, grad_accum)
    except (NoTemplate, KeyError) as exc:
        mine, why = None, f"expanding it failed ({exc})"
    sims = {x: simulate(real, expandable_segments=x) for x in (False, True)}
    sim = sims[setup.allocator == "expandable"]
    if mine is None:
        return False, sim, res, why
    if not same_events(mine, real):
        return False, sim, res, "its events differ from the real replay's"
    for x, b in sims.items():
        a = simulate(mine, expandable_segments=x)
        if (a["peak_allocated"], a["peak_reserved"]) != (b["peak_allocated"], b["peak_reserved"]):
            return False, sim, res, "its peaks differ from the real replay's"
    return True, sim, res, ""
