"""Templates composed along trl's fused-loss tile axis (vramfit.memory.template_tiles): where the loss's tiles
allocate (fp32 weights under bf16 autocast here), a setup at 4 or more tiles answered from the same setup's
templates at 2 and 3 tiles must give the events of its own real recording, and the allocator's peaks to the
byte; a gap in the bases composes nothing."""

import dataclasses

import pytest

from conftest import TINY_LLAMA

TINY = dict(TINY_LLAMA, num_hidden_layers=12)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny Llama, LoRA r8 in bf16-mixed under trl's fused loss, checkpointed: its templates at 2 and 3
    token tiles (micro-batch 2), built and cached in a fresh cache."""
    import os

    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.memory.template import regime, regime_info
    from vramfit.memory.template_cache import setup_template
    from vramfit.model.spec import spec_from_config

    old = os.environ.get("VRAMFIT_CACHE_DIR")
    os.environ["VRAMFIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("tile-compose-cache"))
    spec = spec_from_config("tiny-llama-tiles", TINY)
    setup = make_setup(method="lora", precision="bf16-mixed", loss="fused", grad_ckpt=True, lora_r=8,
                       micro_batch=2, seq_len=3000)
    made = {}
    for seq in (3000, 5000):  # 2 and 3 tiles of 4,096 tokens
        s = dataclasses.replace(setup, seq_len=seq)
        got = setup_template(spec, s, resolve_targets(spec, s), build=True, compose=False)
        assert got["template"] is not None, got["note"]
        made[regime(regime_info(spec, s), 2, seq)[3]] = got["template"]
    assert sorted(made) == [2, 3]
    yield spec, setup, made
    if old is None:
        os.environ.pop("VRAMFIT_CACHE_DIR", None)
    else:
        os.environ["VRAMFIT_CACHE_DIR"] = old


@pytest.mark.parametrize("B,S,r", [(2, 7000, 8), (2, 9500, 16), (3, 9000, 8), (5, 8000, 4)])
def test_composed_tiles_equal_the_recording(bases, B, S, r):
    from vramfit.memory import template as T
    from vramfit.memory import template_build as tb
    from vramfit.memory.allocator import simulate
    from vramfit.memory.template_tiles import extend

    spec, setup, made = bases
    tiles = T.token_tiles(B, S)
    assert tiles >= 4
    tpl = extend(made[2], made[3], tiles)
    s = dataclasses.replace(setup, micro_batch=B, seq_len=S, lora_r=r)
    mine = T.expand(tpl, B, S, r, spec.num_layers)
    real = tb._real_events(spec, s)
    assert tb.same_events(mine, real), (B, S, r, tiles)
    for expandable in (False, True):
        a, b = simulate(mine, expandable_segments=expandable), simulate(real, expandable_segments=expandable)
        assert (a["peak_allocated"], a["peak_reserved"]) == (b["peak_allocated"], b["peak_reserved"])


def test_lookup_composes_and_says_so(bases):
    """setup_template answers a 5-tile setup without building (build=False) from the cached bases."""
    from vramfit.memory.setup import resolve_targets
    from vramfit.memory.template import expand
    from vramfit.memory.template_build import _real_events, same_events
    from vramfit.memory.template_cache import setup_template

    spec, setup, _ = bases
    s = dataclasses.replace(setup, seq_len=10000)  # 5 tiles at micro-batch 2
    got = setup_template(spec, s, resolve_targets(spec, s), build=False)
    tpl = got["template"]
    assert tpl is not None and tpl["regime"][3] == 5 and "composed from" in tpl["note"]
    assert same_events(expand(tpl, 2, 10000, 8, spec.num_layers), _real_events(spec, s))
    # another micro-batch regime (1) has no bases: nothing composes, nothing is built
    one = dataclasses.replace(setup, micro_batch=1, seq_len=17000)
    assert setup_template(spec, one, resolve_targets(spec, one), build=False)["template"] is None


def test_bases_that_differ_do_not_compose(bases):
    from vramfit.memory.template_tiles import NotComposable, extend

    _, _, made = bases
    with pytest.raises(NotComposable):
        extend(made[3], made[2], 5)  # the wrong way round
    with pytest.raises(NotComposable):
        extend(made[2], made[2], 5)
    broken = dict(made[3], runs=[list(r) for r in made[3]["runs"]])
    j = next(i for i, (a, b) in enumerate(zip(made[2]["runs"], made[3]["runs"])) if len(a[2]) != len(b[2]))
    broken["runs"][j] = [*broken["runs"][j][:2], broken["runs"][j][2][:-1], *broken["runs"][j][3:]]
    with pytest.raises(NotComposable):
        extend(made[2], broken, 5)


def test_accumulating_setup_composes(bases):
    """Gradient accumulation (the planner's setups): the accumulating regime's bases at 2 and 3 tiles
    compose to 4 tiles at accumulation 3, equal to the recording."""
    from vramfit.memory import template as T
    from vramfit.memory import template_build as tb
    from vramfit.memory.setup import resolve_targets
    from vramfit.memory.template_cache import setup_template, template_key
    from vramfit.memory.template_tiles import tile_composed

    spec, setup, _ = bases
    s = dataclasses.replace(setup, grad_ckpt=False)
    for seq in (3000, 5000):
        b = dataclasses.replace(s, seq_len=seq)
        assert setup_template(spec, b, resolve_targets(spec, b), 2, build=True, compose=False)["template"] is not None
    four = dataclasses.replace(s, seq_len=7000)

    def plain(x, ga):
        return setup_template(spec, x, resolve_targets(spec, x), ga, False, compose=False)["template"]

    tpl = tile_composed(spec, four, 3, template_key(spec, four, 3), plain)
    assert tpl is not None and tpl["regime"][3] == 4 and tpl["regime"][4]
    assert tb.same_events(T.expand(tpl, 2, 7000, 8, spec.num_layers, 3), tb._real_events(spec, four, None, 3))



def test_post_training_stream_composes(bases):
    """The evaluation and checkpoint save after the steps (replay.post_stream) at 4 tiles: composed from the
    post-training templates at 2 and 3 tiles, equal to its recording."""
    from vramfit.memory.events import training_events
    from vramfit.memory.replay import post_stream, post_template
    from vramfit.memory.setup import resolve_targets
    from vramfit.memory.template_build import canonical

    spec, setup, _ = bases
    for seq in (3000, 5000):
        b = dataclasses.replace(setup, seq_len=seq)
        assert post_template(spec, b, resolve_targets(spec, b), build=True)["template"] is not None
    four = dataclasses.replace(setup, seq_len=7000)
    got = post_stream(spec, four, resolve_targets(spec, four), build=False)
    assert got["source"] == "template"
    real = training_events(spec, four, resolve_targets(spec, four), steps=0, after=True)["after"]
    assert canonical(got["events"]) == canonical(real["events"])
