"""Templates composed along the optimizer axis (vramfit.memory.template_compose): a setup with no template of
its own, answered from the template of another optimizer (the body) and the optimizer phases of another
setup with the same parameters (the donor), must give the events of its own real recording, with its marks,
and the allocator's peaks to the byte; streams that load other parameters do not compose."""

import pytest

from conftest import TINY_LLAMA

TINY = dict(TINY_LLAMA, num_hidden_layers=12)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny Llama's templates: LoRA under adamw_torch (the body, with its post-training template) and the
    donors: checkpointed at another micro-batch under adamw_torch_fused and paged_adamw_8bit, under trl's
    fused loss with paged_adamw_32bit; full fine-tuning under adamw_torch."""
    import os

    from vramfit.memory.replay import post_template
    from vramfit.memory.template_cache import setup_template
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.model.spec import spec_from_config

    old = os.environ.get("VRAMFIT_CACHE_DIR")
    os.environ["VRAMFIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("compose-cache"))
    spec = spec_from_config("tiny-llama-compose", TINY)
    made = {}
    for name, kw in (("body", dict(method="lora", micro_batch=2, seq_len=300)),
                     ("fused", dict(method="lora", optim="adamw_torch_fused", micro_batch=1, seq_len=300,
                                    grad_ckpt=True)),
                     ("paged", dict(method="lora", optim="paged_adamw_8bit", micro_batch=1, seq_len=300,
                                    grad_ckpt=True)),
                     ("trl", dict(method="lora", optim="paged_adamw_32bit", micro_batch=1, seq_len=300, loss="fused")),
                     ("full", dict(method="full", micro_batch=2, seq_len=300))):
        s = make_setup(**kw)
        got = setup_template(spec, s, resolve_targets(spec, s), build=True, compose=False)
        assert got["template"] is not None, (name, got["note"])
        made[name] = got["template"]
        if name == "body":  # and its post-training template
            assert post_template(spec, s, resolve_targets(spec, s), build=True)["template"] is not None
    yield spec, made
    if old is None:
        os.environ.pop("VRAMFIT_CACHE_DIR", None)
    else:
        os.environ["VRAMFIT_CACHE_DIR"] = old


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_composed_equals_the_recording(built, optim):
    from vramfit.memory import template_build as tb
    from vramfit.memory.allocator import simulate
    from vramfit.memory.events import training_events
    from vramfit.memory.template_cache import setup_template
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.memory.template_compose import expand_any

    spec, _ = built
    for B, S, r in ((3, 700, 16), (2, 1100, 40)):
        s = make_setup(method="lora", optim=optim, micro_batch=B, seq_len=S, lora_r=r)
        targets = resolve_targets(spec, s)
        got = setup_template(spec, s, targets, build=False)
        assert got["template"] is not None and "composed" in got["template"], got["note"]
        marks = {}
        mine = expand_any(got["template"], B, S, r, spec.num_layers, 1, marks)
        real = training_events(spec, s, targets, steps=2)
        assert tb.same_events(mine, real["events"]), (optim, B, S, r)
        assert marks == real["marks"]
        for expandable in (False, True):
            a, b = simulate(mine, expandable_segments=expandable), simulate(real["events"], expandable_segments=expandable)
            assert (a["peak_allocated"], a["peak_reserved"]) == (b["peak_allocated"], b["peak_reserved"])


def test_composed_estimate_and_the_post_stream(built):
    """The estimate answers from the composition (no build) with the real replay's peaks; the rest of the run
    comes from the body's post-training template (it never steps the optimizer)."""
    from vramfit.memory.constants import DEFAULT
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.replay import post_stream, simulated_breakdown, template_replay, with_phases
    from vramfit.memory.setup import make_setup, resolve_targets

    spec, _ = built
    s = make_setup(method="lora", optim="adamw_torch_fused", micro_batch=2, seq_len=500)
    targets = resolve_targets(spec, s)
    post = post_stream(spec, s, targets, build=False)
    assert post["source"] == "template"
    sim, note = template_replay(spec, s, targets, build=False)
    assert sim is not None, note
    assert "composed from the template of this setup under adamw_torch" in note
    bd, _ = estimate_setup(spec, s, DEFAULT)
    mine = with_phases(bd, sim, DEFAULT, note)
    real = simulated_breakdown(spec, s, targets, bd, DEFAULT)
    assert (mine.peak_allocated_bytes, mine.peak_reserved_bytes, mine.device_bytes) == (
        real.peak_allocated_bytes, real.peak_reserved_bytes, real.device_bytes)


def test_other_parameters_do_not_compose(built):
    from vramfit.memory.template import expand
    from vramfit.memory.template_compose import NotComposable, splice

    spec, made = built
    bm, dm = {}, {}
    body = expand(made["full"], 2, 300, 16, spec.num_layers, 1, bm)
    donor = expand(made["fused"], 1, 300, 16, spec.num_layers, 1, dm)
    with pytest.raises(NotComposable, match="other parameters"):
        splice(body, bm, donor, dm)
    # a stream whose optimizer phase frees what another phase made does not compose
    lmm = {}
    lora = expand(made["body"], 2, 300, 16, spec.num_layers, 1, lmm)
    broken = list(lora)
    a = lmm["step0.optimizer"]
    first = next(ev[1] for ev in lora[:lmm["after_load"]] if ev[0] == "a")
    broken.insert(a + 1, ("f", first))
    broken = [ev for i, ev in enumerate(broken) if not (ev[0] == "f" and ev[1] == first and i != a + 1)]
    with pytest.raises(NotComposable):
        splice(broken, dict(lmm, **{k: v + 1 for k, v in lmm.items() if v > a}), donor, dm)
