"""The planner's allocator recheck (`vramfit plan`'s default; --fast skips it): the fast search's
choice and its micro-batch boundary replayed through the allocator model under a memory cap.

The fast model's device figure is the unconstrained reserved peak plus what lives outside torch's
allocator.  Under a cap (torch.cuda.set_per_process_memory_fraction, or a card that is simply
full) torch's allocator releases its cached blocks and retries before it gives up, so a setup can
run where that unconstrained peak would not fit (plan proof 3: 4 of the 26 rejected next-larger
micro-batches ran).  The recheck caps the replay at what the usable budget leaves torch's
allocator (usable - CUDA context - kernels) and
- steps down the ranking while the chosen setup runs out of memory in the replay;
- takes the next-larger micro-batch of the chosen setup (the first the fast model rejects among
  the effective batch's divisors) when the replay fits it and it is predicted faster; beyond the
  effective batch (at accumulation 1) it only says so: the user's effective batch is kept.
A setup the replay does not cover (`Unsupported`) keeps the fast verdict.
"""

from __future__ import annotations

from dataclasses import replace

from vramfit.memory.constants import DEFAULT

MAX_STEP_DOWNS = 8  # replays of the ranking below an OOMing choice before trusting the fast verdict
ALT_REPLAY_S = 0.5  # seconds for replaying what a plan shows besides its choice (VRAMFIT_PLAN_REPLAY_S)


def replay_limit(usable_bytes: int, constants=None) -> int:
    """What the usable budget leaves torch's allocator: the cap the replay runs under."""
    c = constants or DEFAULT
    return usable_bytes - c.cuda_context_bytes - c.kernel_growth_bytes


def replay_verdict(spec, ev, setup, usable_bytes: int, constants=None) -> tuple:
    """(fits, replay dict or None): the capped replay's verdict, or the fast model's where the
    replay does not cover the setup (the dict then says why, under `unsupported`)."""
    from vramfit.memory.kernels import Unsupported
    from vramfit.memory.replay import capped_replay

    bd, targets = ev.memory(setup)
    _ensure_template(spec, setup, targets)
    try:
        r = capped_replay(spec, setup, targets, replay_limit(usable_bytes, constants), constants)
    except Unsupported as exc:
        return bd.device_bytes <= usable_bytes, {"unsupported": str(exc)}
    return r["fits"], r


def _ensure_template(spec, setup, targets) -> None:
    """Build and cache `setup`'s event template when none is (capped_replay only reads the cache):
    the first plan of a setup pays its build once (~20-60 s), every later one replays in ~1 s."""
    import sys
    import warnings

    from vramfit.memory.template_cache import NOT_CACHED, setup_template

    got = setup_template(spec, setup, targets, setup.grad_accum, build=False)
    if got["template"] is not None or got["note"] != NOT_CACHED:
        return  # cached (or cached as not covered: the meta-device replay answers)
    print(f"vramfit: building the allocator replay's event template of micro-batch {setup.micro_batch} x "
          f"{setup.grad_accum} (once; cached)...", file=sys.stderr, flush=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setup_template(spec, setup, targets, setup.grad_accum, build=True)
    except Exception:  # noqa: BLE001 - no template: capped_replay replays on the meta device
        pass


def next_larger(ev, setup, device, usable_bytes: int, fits, limit: int = 1024):
    """The first micro-batch above `setup`'s that `fits(candidate)` rejects, as a Candidate: among
    the effective batch's divisors (accumulation adjusted), else beyond the effective batch at
    accumulation 1 (by bisection: the boundary for this setup).  None where even `limit` fits."""
    effective = setup.micro_batch * setup.grad_accum

    def cand(mb, ga):
        return ev.candidate(setup.with_(micro_batch=mb, grad_accum=ga), device, usable_bytes)

    for d in range(setup.micro_batch + 1, effective + 1):
        if effective % d == 0:
            c = cand(d, effective // d)
            if not fits(c):
                return c
    lo, hi = max(effective, setup.micro_batch), None  # lo fits (or was the search's), hi does not
    m = lo
    while m < limit:
        m = min(2 * m, limit)
        if not fits(cand(m, 1)):
            hi = m
            break
        lo = m
    if hi is None:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(cand(mid, 1)) else (lo, mid)
    return cand(hi, 1)


def _before_optimizer(phase) -> bool:
    """Whether a replay that ran out of memory in `phase` did so before the first optimizer step: in the
    load or in step 0's forwards, backwards or clipping, which no optimizer takes part in (its states are
    made by its first step; vramfit.memory.template_compose rests on the same fact)."""
    if not phase:
        return False
    if not phase.startswith("step"):
        return phase != "end"
    head, _, rest = phase.partition(".")
    return head == "step0" and rest not in ("optimizer", "post_step")


def _optimizer_twin(setup, other) -> bool:
    """`setup` is `other` under another optimizer (and nothing else differs)."""
    return setup.optim != other.optim and replace(setup, optim=other.optim) == other


def _next_to_try(spec, ev, fitting: list, k: int, r: dict, usable: int, constants, ruled: tuple = ()) -> tuple:
    """After the replay of fitting[k] ran out of memory: the index of the next setup worth replaying,
    and how many were skipped.  The failed setup's uncapped replay over its fast figure is the fast
    model's shortfall there; a setup below it in the ranking with the same allocator settings whose
    fast figure, scaled by that ratio, is still over the budget is skipped (each replay of a new setup
    costs a template build).  Setups with other allocator settings are tried unless `ruled` rules them
    out: setups whose replay ran out of memory before the first optimizer step, where the same setup
    under any other optimizer runs out of memory the same way (`_before_optimizer`)."""
    from vramfit.memory.kernels import Unsupported
    from vramfit.memory.replay import capped_replay

    failed = fitting[k]
    try:
        bd, targets = ev.memory(failed.setup)
        unc = capped_replay(spec, failed.setup, targets, 1 << 62, constants)
        ratio = unc["device_bytes"] / max(failed.device_bytes, 1)
    except Unsupported:
        ratio = 0.0
    j, overshoot = k + 1, ratio > 0
    while j < len(fitting):
        c = fitting[j]
        if overshoot and c.setup.allocator == failed.setup.allocator and c.device_bytes * ratio > usable:
            j += 1
            continue
        overshoot = False
        if any(_optimizer_twin(c.setup, f) for f in ruled):
            j += 1
            continue
        break
    return j, j - k - 1


def _row(role: str, cand, fits: bool, r: dict) -> dict:
    from vramfit.planner.result import setup_json as _setup_json

    row = {"role": role, "setup": _setup_json(cand.setup), "fast_device_bytes": cand.device_bytes,
           "fast_fits": cand.fits, "replay_fits": fits}
    if "unsupported" in r:
        row["unsupported"] = r["unsupported"]
    else:
        row.update({k: r[k] for k in ("peak_allocated_bytes", "peak_reserved_bytes", "device_bytes",
                                      "num_alloc_retries", "oom_phase", "seconds")})
    return row


def recheck(p, spec, ev, constants=None):
    """Plan `p` (from `search`) rechecked with the capped replay -> a Plan whose `replay` says what
    was checked and what changed (and whose notes say it in words)."""
    from vramfit.report import fmt_bytes

    usable = p.usable_bytes
    limit = replay_limit(usable, constants)
    rows, notes, changed = [], [], []
    fitting = list(p.candidates)
    chosen = p.chosen
    i = k = 0
    ruled = []  # setups that ran out of memory before their first optimizer step
    while chosen is not None:
        ok, r = replay_verdict(spec, ev, chosen.setup, usable, constants)
        rows.append(_row("chosen", chosen, ok, r))
        if ok or i >= MAX_STEP_DOWNS:
            if not ok:
                notes.append(f"allocator replay: the first {i + 1} setups of the ranking run out of memory under "
                             f"the cap; kept the fast model's choice")
            break
        i += 1
        changed.append("stepped_down")
        if _before_optimizer(r.get("oom_phase")):
            ruled.append(chosen.setup)
        k, skipped = _next_to_try(spec, ev, fitting, k, r, usable, constants, tuple(ruled))
        nxt = fitting[k] if k < len(fitting) else None
        notes.append(f"allocator replay: {_text(chosen.setup)} runs out of memory under a "
                     f"{fmt_bytes(limit)} allocator cap ({r.get('oom_phase')}): "
                     + (f"stepped down to {_text(nxt.setup)}" if nxt else "nothing below it in the ranking")
                     + (f" (skipped {skipped} setups its replay's overshoot or its optimizer-free phase rules out)"
                        if skipped else ""))
        chosen = nxt
    if chosen is None:
        from vramfit.errors import VramfitError

        raise VramfitError("the allocator replay runs out of memory for every setup the fast model fits "
                           f"(allocator cap {fmt_bytes(limit)}); try a larger budget or less headroom")
    if chosen is not p.chosen:
        fitting = fitting[fitting.index(chosen):]
    # the boundary the fast model draws above the choice: its first rejected micro-batch
    nl = next_larger(ev, chosen.setup, p.device, usable, lambda c: c.fits)
    if nl is not None:
        ok, r = replay_verdict(spec, ev, nl.setup, usable, constants)
        rows.append(_row("next_larger", nl, ok, r))
        eff_old = chosen.setup.micro_batch * chosen.setup.grad_accum
        eff_new = nl.setup.micro_batch * nl.setup.grad_accum
        if ok and nl.tokens_per_s > chosen.tokens_per_s and "unsupported" not in r:
            fits_text = (f"micro-batch {nl.setup.micro_batch} fits under a {fmt_bytes(limit)} allocator cap "
                         f"({r['num_alloc_retries']} cache releases; unconstrained the fast model predicts "
                         f"{fmt_bytes(nl.device_bytes)} > {fmt_bytes(usable)})")
            if eff_new == eff_old:
                notes.append(f"allocator replay: {fits_text} and is predicted faster "
                             f"({nl.tokens_per_s:,.0f} vs {chosen.tokens_per_s:,.0f} tokens/s): taken")
                changed.append("stepped_up")
                chosen = replace(nl, fits=True)
                fitting = [chosen] + fitting
            else:  # the search keeps the user's effective batch; a larger one is the user's call
                notes.append(f"allocator replay: {fits_text}, beyond the effective batch {eff_old}: "
                             f"--effective-batch {eff_new} would use it")
                changed.append("larger_batch_fits")
    chosen = with_replay_peaks(chosen, rows)
    fitting = [chosen] + list(fitting[1:])
    replay = {"limit_bytes": limit, "usable_bytes": usable, "changed": changed or ["nothing"],
              "fast_choice": p.chosen.to_json() if p.chosen else None, "checks": rows}
    if not changed:
        notes.append(f"allocator replay: the fast model's choice fits under a {fmt_bytes(limit)} allocator cap"
                     + ("; its next-larger micro-batch does not" if nl is not None and not rows[-1]["replay_fits"]
                        else ""))
    return replay_shown(replace(p, chosen=chosen, candidates=tuple(fitting), notes=p.notes + tuple(notes),
                                replay=replay), spec, ev, constants)


def replay_shown(p, spec, ev, constants=None, budget_s: float | None = None):
    """Plan `p` (rechecked) with what it shows besides the chosen setup replayed as the chosen one is: the
    best fitting setup of each family (the capped replay; one that runs out of memory there is left out and
    the next of its family shown), the rejected families' smallest setups and the levers (the capped replay
    where it fits, else the uncapped one's figure).  Only setups whose event template is cached (their own or
    composed: milliseconds each), within `budget_s` (VRAMFIT_PLAN_REPLAY_S, default ALT_REPLAY_S); the others
    keep the fast model's figures (`Candidate.replayed` False; the report marks them)."""
    import os
    import time

    from vramfit.memory.kernels import Unsupported
    from vramfit.memory.replay import capped_replay, template_events
    from vramfit.memory.setup import SHOWN_FAMILIES, family
    from vramfit.planner.result import Lever, Rejection

    budget = float(os.environ.get("VRAMFIT_PLAN_REPLAY_S", ALT_REPLAY_S)) if budget_s is None else budget_s
    deadline = time.perf_counter() + budget
    usable, limit = p.usable_bytes, replay_limit(p.usable_bytes, constants)
    # a replay's time grows with the micro-batches it expands: the chosen setup's, per micro-batch, says how
    # long another's would take, and one that would end past the deadline is not started
    first = next((r for r in (p.replay or {}).get("checks", ()) if r.get("seconds") is not None), None)
    per_micro = first["seconds"] / max(1, first["setup"]["grad_accum"]) if first else 0.0

    def replayed(c, capped: bool = True):
        if time.perf_counter() + per_micro * c.setup.grad_accum >= deadline:
            return None
        try:
            _, targets = ev.memory(c.setup)
            if template_events(spec, c.setup, targets) is None:
                return None
            r = capped_replay(spec, c.setup, targets, 1 << 62, constants)
            r = dict(r, fits=r["device_bytes"] <= usable)  # the same as under the cap where it fits uncapped
            if capped and not r["fits"]:  # under the cap the allocator may release its cache and fit
                under = capped_replay(spec, c.setup, targets, limit, constants)
                r = under if under["fits"] else r
        except Unsupported:
            return None
        return replace(c, device_bytes=r["device_bytes"], peak_allocated_bytes=r["peak_allocated_bytes"],
                       peak_reserved_bytes=r["peak_reserved_bytes"], fits=r["fits"], replayed=True)

    chosen, out, seen, dropped = p.chosen, [], {family(p.chosen.setup)}, 0
    for c in p.candidates:
        if c is not chosen and family(c.setup) not in seen and len(seen) < SHOWN_FAMILIES:
            got = replayed(c)
            if got is not None and not got.fits:
                dropped += 1
                continue
            c = got or c
            seen.add(family(c.setup))
        out.append(c)
    rejections = []
    for rj in p.rejections:
        got = replayed(rj.candidate, capped=False)
        rejections.append(rj if got is None or got.device_bytes <= usable else
                          Rejection(candidate=got, over_bytes=got.device_bytes - usable))
    levers = []
    for lv in p.levers:
        got = replayed(lv.candidate)
        levers.append(lv if got is None else
                      Lever(knob=lv.knob, candidate=got, delta_bytes=got.device_bytes - chosen.device_bytes,
                            speedup=lv.speedup))
    notes = ((f"allocator replay: {dropped} of the next-best setups shown by the fast model run out of memory "
              f"under the cap and are left out",) if dropped else ())
    return replace(p, candidates=tuple(out), rejections=tuple(rejections), levers=tuple(levers),
                   notes=p.notes + notes)


def fitting_check(rows: list, setup: dict) -> dict | None:
    """The last of a plan's replay checks (`Plan.replay["checks"]`) of `setup` (its JSON form) that
    found it fits, with its peaks; None where no replay passed it."""
    return next((row for row in reversed(rows)
                 if row["setup"] == setup and row["replay_fits"] and "device_bytes" in row), None)


def with_replay_peaks(cand, rows: list):
    """`cand` with the peaks of the replay that checked it (and found that it fits), where one did:
    what the plan then says it needs is the replay's figure, not the fast model's.  On plan proof 4
    (26 plans, H100) the replay's device figure missed the measured peak by a median 0.3% (fast
    model: 2.3%); the fast model does not tell the allocator settings apart at all."""
    from vramfit.planner.result import setup_json as _setup_json

    row = fitting_check(rows, _setup_json(cand.setup))
    if row is None:
        return cand
    return replace(cand, device_bytes=row["device_bytes"], peak_allocated_bytes=row["peak_allocated_bytes"],
                   peak_reserved_bytes=row["peak_reserved_bytes"], replayed=True)


def _text(s) -> str:
    from vramfit.report import lever_words

    return (f"{s.method} {s.precision} {s.optim} {s.micro_batch}x{s.grad_accum}"
            + (" ckpt" if s.grad_ckpt else "") + (" expandable" if s.allocator == "expandable" else "")
            + "".join(" " + w for w in lever_words(s, short=True)))
