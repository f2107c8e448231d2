"""What a plan shows besides its choice (recheck.replay_shown): replayed like the choice where an event
template is cached, within VRAMFIT_PLAN_REPLAY_S; the rest keeps the fast model's figures, marked."""

from conftest import TINY_LLAMA

TINY = dict(TINY_LLAMA, num_hidden_layers=12)


def test_shown_alternatives_are_replayed_where_a_template_is_cached(monkeypatch):
    from vramfit.memory.replay import capped_replay
    from vramfit.memory.template_cache import setup_template
    from vramfit.memory.setup import family
    from vramfit.model.spec import spec_from_config
    from vramfit.planner.gpu import resolve_gpu
    from vramfit.planner.recheck import recheck
    from vramfit.planner.search import Evaluator, search
    from vramfit.planner.space import make_space
    from vramfit.report import plan_candidates_table

    spec = spec_from_config("tiny-llama-alternatives", TINY)
    device = resolve_gpu("2GiB")
    ev = Evaluator(spec)
    p = search(spec, device, make_space(spec, device, seq_len=256, effective_batch=4), evaluator=ev)
    other = next(c for c in p.candidates if family(c.setup) != family(p.chosen.setup))  # its family's best
    _, targets = ev.memory(other.setup)
    assert setup_template(spec, other.setup, targets, other.setup.grad_accum, build=True)["template"] is not None

    monkeypatch.setenv("VRAMFIT_PLAN_REPLAY_S", "0")  # no time: only the choice is replayed
    r0 = recheck(p, spec, ev)
    assert r0.chosen.replayed
    assert not any(c.replayed for c in r0.candidates if c is not r0.chosen)
    assert "~" in str(plan_candidates_table(r0).columns[-3]._cells)

    monkeypatch.setenv("VRAMFIT_PLAN_REPLAY_S", "1000")
    r = recheck(p, spec, ev)
    got = next(c for c in r.candidates if c.setup == other.setup)
    assert got.replayed
    want = capped_replay(spec, other.setup, targets, 1 << 62)
    assert (got.device_bytes, got.peak_allocated_bytes, got.peak_reserved_bytes) == (
        want["device_bytes"], want["peak_allocated_bytes"], want["peak_reserved_bytes"])
    assert got.device_bytes != other.device_bytes  # the fast model's figure was another
