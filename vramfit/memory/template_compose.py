"""Event templates composed torch-free along the optimizer axis: a setup whose own template is not cached
borrows the template of the same setup under another optimizer (the body: load, forwards, backwards,
clipping, every phase but the optimizer's) and the optimizer phases of a template of the same
parameters under its own optimizer (the donor: the same method, precision, adapters and rank, another
checkpointing, micro-batch, loss or accumulation).

Why it is exact: between `training_events`' marks `stepN.optimizer` and `stepN.post_step` the recorder
sees only `optimizer.step()`, whose allocations depend on the trainable parameters (their sizes, dtypes
and order) and the optimizer alone, not on how the gradients were made.  So the expansion checks, every
time, that the two streams load the same parameters (their load phases are equal, event for event) and
that each stream's optimizer phases are closed (nothing made there is freed elsewhere, nothing made
elsewhere is freed there; the optimizer's states, made there and never freed, are allowed), and then
replaces the body's optimizer phases by the donor's, step for step, with fresh ids.  Anything else
(levers, activation offloading) is not composed.  Tested against the recorded stream of the setup itself
(tests/test_template_compose.py) and checked at full size on the bundled profiles
(benchmarks/speed/compose_check.py).
"""

from __future__ import annotations

from dataclasses import replace

# the body's optimizer, in the order tried (the bundle's body templates are adamw_torch's)
BODY_OPTIMS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit",
               "paged_adamw_32bit", "adafactor", "sgd")
DONOR_MICRO_BATCHES = (1, 4, 2)  # a donor's micro-batch, after the setup's own
DONOR_SEQ = (2048, 512, 4096)  # a donor's sequence where the setup's own is another tile regime's

_COMPOSED: dict = {}  # template key -> composed template (its identity keeps replay's expansion cache)
_KEPT = 16


class NotComposable(Exception):
    """The two streams do not compose (the caller looks further, or replays for real)."""


def _phases(marks: dict) -> list:
    """[(step, optimizer start, post_step start)] of an expansion's marks (an expansion has no mark for a
    phase without events: such a phase starts where the next one does)."""
    out, k = [], 0
    while f"step{k}.forward" in marks:
        after = (f"step{k}.post_step", f"step{k + 1}.forward", "end")
        post = next(marks[n] for n in after if n in marks)
        out.append((k, marks.get(f"step{k}.optimizer", post), post))
        k += 1
    return out


def _load_end(marks: dict) -> int:
    return marks.get("after_load", marks.get("step0.forward", 0))


def _closed(events: list, spans: list) -> None:
    """Raise NotComposable unless the optimizer spans of `events` are closed (see the module)."""
    inside = [False] * len(events)
    for _, a, b in spans:
        for i in range(a, b):
            inside[i] = True
    where = {}
    for i, ev in enumerate(events):
        if ev[0] == "a":
            where[ev[1]] = inside[i]
        elif ev[0] == "f" and where.pop(ev[1]) != inside[i]:
            raise NotComposable("an allocation crosses the optimizer phase's border")


def splice(body: list, body_marks: dict, donor: list, donor_marks: dict, marks: dict | None = None) -> list:
    """The body's events with each step's optimizer phase replaced by the donor's (fresh ids); `marks`
    gets the phases' new starts.  NotComposable where the streams do not compose (see the module)."""
    from vramfit.memory.template_build import canonical

    bs, ds = _phases(body_marks), _phases(donor_marks)
    if [k for k, _, _ in bs] != [k for k, _, _ in ds] or not bs:
        raise NotComposable("the streams have other optimizer steps")
    if canonical(body[:_load_end(body_marks)]) != canonical(donor[:_load_end(donor_marks)]):
        raise NotComposable("the donor loads other parameters")
    _closed(body, bs)
    _closed(donor, ds)
    nxt = 1 + max((ev[1] for ev in body if ev[0] == "a"), default=-1)
    fresh, out, at, starts, deltas = {}, [], 0, [], []
    for (_, a, b), (_, da, db) in zip(bs, ds):
        out.extend(body[at:a])
        starts.append(len(out))
        for ev in donor[da:db]:
            if ev[0] == "a":
                fresh[ev[1]] = nxt
                out.append(("a", nxt, ev[2]))
                nxt += 1
            elif ev[0] == "f":
                out.append(("f", fresh.pop(ev[1])))
            else:
                out.append(ev)
        deltas.append((b, (db - da) - (b - a)))
        at = b
    out.extend(body[at:])
    if marks is not None:
        for name, pos in body_marks.items():
            if any(a < pos < b for _, a, b in bs):  # no phase of ours starts inside the optimizer's
                raise NotComposable(f"a mark ({name}) inside the optimizer phase")
            marks[name] = pos + sum(d for b, d in deltas if b <= pos)
        for (k, _, _), start in zip(bs, starts):  # the optimizer phases' starts, also where the body's was empty
            marks[f"step{k}.optimizer"] = start
    return out


def expand_any(tpl: dict, B: int, S: int, r: int, L: int, grad_accum: int = 1, marks: dict | None = None) -> list:
    """`template.expand` of a template or of a composed one (`composed`); NoTemplate where it does not."""
    from vramfit.memory.template import NoTemplate, expand

    if "composed" not in tpl:
        return expand(tpl, B, S, r, L, grad_accum, marks)
    c = tpl["composed"]
    first = c.get("first")
    if first is not None and first[0] == (B, S, r, L, grad_accum):  # spliced when it was composed
        if marks is not None:
            marks.update(first[2])
        return list(first[1])
    bm, dm = {}, {}
    body = expand(c["body"], B, S, r, L, grad_accum, bm)
    donor = expand(c["donor"], c["donor_shape"][0], c["donor_shape"][1], r, L, 1, dm)
    try:
        return splice(body, bm, donor, dm, marks)
    except (NotComposable, KeyError) as exc:
        raise NoTemplate(f"the composed template does not compose here ({exc})") from exc


def _donors(setup):
    """The donor setups tried, nearest first: the setup's own parameters and optimizer, another
    checkpointing, micro-batch or loss (QLoRA: the same loss, as trl's adapter cast follows it)."""
    losses = (setup.loss,) if setup.method == "qlora" else (setup.loss, "fused" if setup.loss == "logits" else "logits")
    seen = set()
    for loss in losses:
        for mb in (setup.micro_batch,) + DONOR_MICRO_BATCHES:
            for ckpt in (setup.grad_ckpt, not setup.grad_ckpt):
                for seq in (setup.seq_len,) + DONOR_SEQ:  # the sequence only picks the regime (the key's)
                    d = replace(setup, loss=loss, micro_batch=mb, grad_ckpt=ckpt, seq_len=seq, grad_accum=1)
                    if d not in seen:
                        seen.add(d)
                        yield d


def composed(spec, setup, grad_accum: int, key: str, cached):
    """A composed template of `setup` (its template key `key`) from cached templates (see the module), checked
    to expand at the setup's own shape; None where none composes.  `cached(setup, grad_accum)`: that setup's
    cached exact template or None (template_cache.setup_template without building or composing)."""
    from vramfit.memory.template import TILES_GENERAL, NoTemplate, expand, regime, regime_info

    if setup.liger or setup.packing or setup.activation_offloading:
        return None
    hit = _COMPOSED.get(key)
    if hit is not None:
        return hit
    B, S, r, L = setup.micro_batch, setup.seq_len, setup.lora_r, spec.num_layers
    body = None
    for opt in BODY_OPTIMS:
        if opt == setup.optim:
            continue
        tpl = cached(replace(setup, optim=opt), grad_accum)
        if tpl is None:
            continue
        bm = {}
        try:
            body_events = expand(tpl, B, S, r, L, grad_accum, bm)
        except (NoTemplate, KeyError, IndexError, TypeError, ValueError):
            continue
        body, body_optim = tpl, opt
        break
    if body is None:
        return None
    for d in _donors(setup):
        tpl = cached(d, 1)
        if tpl is None:
            continue
        s, dm = d.seq_len, {}
        try:  # the donor is expanded at a shape of its own regime
            if regime(regime_info(spec, d, tpl["regime"][3] not in (0, TILES_GENERAL)), d.micro_batch, s, 1,
                      r if d.method != "full" else 0) != tpl["regime"]:
                continue
            donor_events = expand(tpl, d.micro_batch, s, r, L, 1, dm)
            marks = {}
            events = splice(body_events, bm, donor_events, dm, marks)
        except (NoTemplate, NotComposable, KeyError, IndexError, TypeError, ValueError):
            continue
        out = {"composed": {"body": body, "donor": tpl, "donor_shape": [d.micro_batch, s],
                            "first": ((B, S, r, L, grad_accum), events, marks)},  # the setup's own expansion
               "note": f"composed from the template of this setup under {body_optim} and the optimizer phases of its "
                       f"template at micro-batch {d.micro_batch} x {s} tokens"
                       + (", checkpointed" if d.grad_ckpt else "") + f", {d.loss} loss"}
        _COMPOSED[key] = out
        while len(_COMPOSED) > _KEPT:
            _COMPOSED.pop(next(iter(_COMPOSED)))
        return out
    return None
