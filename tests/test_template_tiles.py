"""trl's fused loss (setup.loss == "fused") and event templates: one template serves every token
tile count >= 2 where the tile loops allocate nothing per tile (template.tiles_general: bf16 weights
under bf16 autocast with an RMSNorm, or no autocast), checked against the real replay at tile counts
it was not fitted on; setups whose tiles allocate (fp32 weights under autocast, a LayerNorm's fp32
output under autocast) keep a template per tile count, and where the rule says general wrongly the
builder refuses and the lookup falls back to the tile count's own template."""

import dataclasses

import pytest

from conftest import TINY_GPT2, TINY_LLAMA

TINY = dict(TINY_LLAMA, num_hidden_layers=12)


def _spec(cfg=TINY, name="tiny-llama"):
    from vramfit.model.spec import spec_from_config

    return spec_from_config(name, cfg)


def test_tile_regime_rule():
    """Torch-free: which setups share one template over tile counts >= 2, which keep their count."""
    from vramfit.memory import template as T
    from vramfit.memory.setup import make_setup

    llama, gpt2 = _spec(), _spec(TINY_GPT2, "tiny-gpt2")

    def comp(spec, B, S, **kw):
        return T.regime(T.regime_info(spec, make_setup(**kw)), B, S)[3]

    # bf16 weights under bf16 autocast (the standard recipe), LoRA or full; or no autocast at all
    for kw in ({"method": "lora", "loss": "fused"}, {"method": "full", "loss": "fused"},
               {"method": "lora", "loss": "fused", "precision": "bf16-true"},
               {"method": "full", "loss": "fused", "precision": "32-true"}):
        assert comp(llama, 2, 1000, **kw) == 1  # one tile: mm_buf is N x chunk, a regime of its own
        assert [comp(llama, 2, S, **kw) for S in (2100, 4100, 10000)] == [T.TILES_GENERAL] * 3
        assert comp(llama, 1, 9000, **kw) == T.TILES_GENERAL
    assert comp(gpt2, 2, 10000, method="lora", loss="fused", precision="bf16-true") == T.TILES_GENERAL
    # the tiles allocate: casts of fp32 weights (bf16-mixed, QLoRA's fp32 head) or of fp32 hidden
    # states (GPT-2's LayerNorm under autocast): each tile count its own regime, as before
    for spec, kw in ((llama, {"method": "lora", "loss": "fused", "precision": "bf16-mixed"}),
                     (llama, {"method": "qlora", "loss": "fused"}),
                     (gpt2, {"method": "lora", "loss": "fused"})):
        assert [comp(spec, 2, S, **kw) for S in (1000, 2100, 4100, 10000)] == [1, 2, 3, 5]
    assert comp(llama, 2, 10000, method="lora") == 0  # not the fused loss: unchanged


def test_tile_grid_points():
    """The general tile regime's fitting points span 2 and 3 tiles (the first two at different
    counts), its checks 4 and 5; all in the regime."""
    from vramfit.memory import template as T
    from vramfit.memory import template_build as tb
    from vramfit.memory.setup import make_setup

    spec = _spec()
    info = T.regime_info(spec, make_setup(method="lora", loss="fused"))
    for B in (1, 2, 3, 5, 7):
        reg = T.regime(info, B, 9000)
        assert reg[3] == T.TILES_GENERAL
        svals = tb._s_values(info, reg, B, 5)
        tiles = [T.token_tiles(B, s) for s in svals]
        assert set(tiles) == {2, 3} and tiles[0] != tiles[1], (B, svals, tiles)
        assert all(s % 128 and T.regime(info, B, s)[:4] == reg[:4] for s in svals)
        for t in (4, 5):
            b, s = tb._tile_point(info, reg, t, [B])
            assert b == B and T.token_tiles(b, s) == t and s % 128
    # a sliding window (transformers' mask from S >= window): the points stay on the regime's side
    mistral = _spec(dict(TINY, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=3000),
                    "tiny-mistral")
    info = T.regime_info(mistral, make_setup(method="lora", loss="fused"))
    for B, S in ((2, 2100), (2, 5000), (1, 5000)):
        reg = T.regime(info, B, S)
        assert reg[3] == T.TILES_GENERAL
        for b in (1,) if B == 1 else (2, 3, 5):
            assert all(T.regime(info, b, s)[:4] == reg[:4] for s in tb._s_values(info, reg, b, 5))
        for t, first in ((4, 1 if B == 1 else 5), (5, 1 if B == 1 else 3)):
            b, s = tb._tile_point(info, reg, t, [first] + ([] if B == 1 else [2, 3, 4, 6, 8]))
            assert T.token_tiles(b, s) == t and T.regime(info, b, s)[:4] == reg[:4]


def test_one_template_for_every_tile_count():
    """Built once at 2 tiles, the expansion equals the real replay's events (and the allocator's
    peaks) at 2, 3, 5 and 9 tiles, other micro-batches and ranks; 1 tile is another template's."""
    from vramfit.memory import template as T
    from vramfit.memory import template_build as tb
    from vramfit.memory.allocator import simulate
    from vramfit.memory.setup import make_setup

    spec = _spec()
    setup = make_setup(method="lora", loss="fused", micro_batch=2, seq_len=2100)
    tpl = tb.build(spec, setup, 2, 2100)
    assert tpl["regime"][3] == T.TILES_GENERAL
    for B, S, r in ((2, 2100, 16), (3, 3000, 8), (2, 10000, 32), (4, 9000, 4)):
        s = dataclasses.replace(setup, micro_batch=B, seq_len=S, lora_r=r)
        assert T.regime(T.regime_info(spec, s), B, S) == tpl["regime"]
        mine = T.expand(tpl, B, S, r, spec.num_layers)
        real = tb._real_events(spec, s)
        assert tb.same_events(mine, real), (B, S, r, T.token_tiles(B, S))
        for expandable in (False, True):
            a, b = simulate(mine, expandable_segments=expandable), simulate(real, expandable_segments=expandable)
            assert (a["peak_allocated"], a["peak_reserved"]) == (b["peak_allocated"], b["peak_reserved"])
    with pytest.raises(T.NoTemplate):
        T.expand(tpl, 2, 1000, 16, spec.num_layers)  # one tile


def test_tiles_that_allocate_fall_back_to_their_count(monkeypatch):
    """Where the rule wrongly says one template serves every tile count (forced here for fp32
    weights under bf16 autocast, whose tiles cast the LM head per chunk), the builder refuses (its
    points at 2 and 3 tiles differ in shape) and setup_template answers with the template of the
    setup's own tile count, remembering the refusal in the general key's entry."""
    from vramfit.memory import template as T
    from vramfit.memory import template_build as tb
    from vramfit.memory.template_cache import setup_template, template_key
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.model import cache

    spec = _spec()
    setup = make_setup(method="lora", loss="fused", precision="bf16-mixed", micro_batch=2, seq_len=2100)
    assert T.regime(T.regime_info(spec, setup), 2, 2100)[3] == 2
    monkeypatch.setattr(T, "tiles_general", lambda spec, setup: True)
    assert T.regime(T.regime_info(spec, setup), 2, 2100)[3] == T.TILES_GENERAL
    with pytest.raises(T.NoTemplate, match="shape changes"):
        tb.build(spec, setup, 2, 2100)
    got = setup_template(spec, setup, resolve_targets(spec, setup))
    assert got["template"] is not None, got["note"]
    assert got["template"]["regime"][3] == 2
    assert cache.load_template(template_key(spec, setup))["tiles"] == "exact"
    again = setup_template(spec, setup, resolve_targets(spec, setup), build=False)
    assert again["template"] == got["template"]
