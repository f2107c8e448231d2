"""The meta-op cache (vramfit.model.meta_cache) must not change what the replay records:
`training_events` gives identical events and marks (and post-training stream) with it on and off,
on tiny Llama / GPT-2 / GPT-NeoX models over full / LoRA / QLoRA, the three bf16 precisions,
checkpointing, both losses, gradient accumulation and `after=True`; and its rules hold on single ops
(fresh outputs rebuilt alike, in-place ops answered with their argument, views never cached)."""

import os
import subprocess
import sys

import pytest

from conftest import TINY_GPT2, TINY_LLAMA, TINY_NEOX

TINY = dict(TINY_LLAMA, num_hidden_layers=2)
TINY_GPT2 = dict(TINY_GPT2, n_layer=2, n_positions=512)
TINY_NEOX = dict(TINY_NEOX, num_hidden_layers=2, max_position_embeddings=512)

CASES = [
    (TINY, dict(method="full", precision="bf16-mixed", grad_ckpt=True), dict(after=True)),
    (TINY, dict(method="lora", precision="bf16-amp", loss="fused"), dict(grad_accum=2)),
    (TINY, dict(method="qlora", precision="bf16-amp", grad_ckpt=True), dict(after=True)),
    (TINY_GPT2, dict(method="full", precision="bf16-true"), dict(grad_accum=2)),
    (TINY_GPT2, dict(method="lora", precision="bf16-mixed", grad_ckpt=True, loss="fused"), dict(after=True)),
    (TINY_NEOX, dict(method="qlora", precision="bf16-mixed", loss="fused"), dict(grad_accum=2)),
    (TINY_NEOX, dict(method="lora", precision="bf16-true", grad_ckpt=True), dict(after=True)),
]


def _events(spec, setup, on: bool, kw: dict) -> dict:
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import resolve_targets
    from vramfit.model import meta_cache

    meta_cache.ENABLED = on
    try:
        return training_events(spec, setup, resolve_targets(spec, setup), steps=2, **kw)
    finally:
        meta_cache.ENABLED = True


@pytest.mark.parametrize("cfg,setup_kw,kw", CASES)
def test_replay_identical_with_and_without_cache(cfg, setup_kw, kw):
    from vramfit.memory.setup import make_setup
    from vramfit.model import meta_cache
    from vramfit.model.spec import spec_from_config

    spec = spec_from_config(f"tiny-{cfg['model_type']}", cfg)
    setup = make_setup(seq_len=48, micro_batch=1, **setup_kw)
    off = _events(spec, setup, False, kw)
    meta_cache.clear()
    on = _events(spec, setup, True, kw)  # fills the cache
    again = _events(spec, setup, True, kw)  # answers from it
    assert meta_cache.stats["hits"] > meta_cache.stats["misses"]
    for res in (on, again):
        assert res["events"] == off["events"]
        assert res["marks"] == off["marks"]
        if "after" in kw:
            assert res["after"]["events"] == off["after"]["events"]
            assert res["after"]["marks"] == off["after"]["marks"]


def test_single_ops():
    import torch

    from vramfit.model import meta_cache as mc

    aten = torch.ops.aten
    mc.clear()
    a = torch.empty(8, 6, dtype=torch.bfloat16, device="meta")
    b = torch.empty(6, 4, dtype=torch.bfloat16, device="meta")

    def meta(t):
        return (t.shape, t.stride(), t.dtype, t.storage_offset(), t.untyped_storage().nbytes(), t._is_view())

    for _ in range(2):  # a miss, then a hit: alike, each with its own storage
        out = mc.call(aten.mm.default, (a, b), {})
        assert meta(out) == meta(a @ b)
    assert mc.stats["hits"] == 1 and mc.stats["misses"] == 1
    outs = [mc.call(aten.native_layer_norm.default, (a, [6], None, None, 1e-5), {}) for _ in range(2)]
    assert type(outs[1]) is type(outs[0]) and [meta(t) for t in outs[1]] == [meta(t) for t in outs[0]]
    assert len({t.untyped_storage()._cdata for o in outs for t in o}) == 6
    # in place: the argument itself; a float's value does not matter, its type does
    f = torch.empty(8, 6, device="meta")
    assert mc.call(aten.add_.Tensor, (f, f), {"alpha": 0.5}) is f
    hits = mc.stats["hits"]
    assert mc.call(aten.add_.Tensor, (f, f), {"alpha": 0.25}) is f
    assert mc.stats["hits"] == hits + 1
    assert mc.call(aten._foreach_mul_.Scalar, ([f, f], 0.3), {}) is None
    assert mc.call(aten._foreach_mul_.Scalar, ([f, f], 0.7), {}) is None
    # views and data-dependent ops run their kernel every time
    assert mc._op_kind(aten.view.default) == 0 and mc._op_kind(aten.t.default) == 0
    assert mc._op_kind(aten.nonzero.default) == 0 and mc._op_kind(aten._local_scalar_dense.default) == 0
    v = mc.call(aten.view.default, (a, [48]), {})
    assert v.untyped_storage()._cdata == a.untyped_storage()._cdata
    # an output a rebuild would not reproduce (a view at an offset) is not cached
    assert mc._recipe(torch.empty(10, device="meta")[2:], (), {}, False) is None
    # 1 and 1.0 promote apart
    i = torch.empty(3, dtype=torch.long, device="meta")
    assert mc.call(aten.mul.Tensor, (i, 2), {}).dtype == torch.long
    assert mc.call(aten.mul.Tensor, (i, 2.0), {}).dtype == torch.float32
    mc.ENABLED = False
    try:
        mc.clear()
        mc.call(aten.mm.default, (a, b), {})
        assert mc.stats["hits"] == mc.stats["misses"] == 0
    finally:
        mc.ENABLED = True


def test_switch_off_by_environment():
    code = "import vramfit.model.meta_cache as m, sys; assert not m.ENABLED; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, VRAMFIT_META_CACHE="0"))
