"""Templates traced under another library stack (vramfit.memory.stack_alias): used where the installed stack
records the same events, refused where it does not, the verdict kept."""

import json

import pytest
from conftest import TINY_LLAMA

TINY = dict(TINY_LLAMA, num_hidden_layers=12)
NEWER = {"peft": "99.0.0"}  # a release the templates were not traced under


@pytest.fixture
def traced(tmp_path, monkeypatch):
    """A tiny model's LoRA template (training steps and the post-training stream) built under the installed
    stack, then the installed stack made a newer one, with stacks.json naming the one they were traced under."""
    from vramfit import versions
    from vramfit.memory import stack_alias
    from vramfit.memory.replay import post_template
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.memory.template_cache import setup_template
    from vramfit.model import cache
    from vramfit.model.spec import spec_from_config

    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "BUNDLED_ZIP", tmp_path / "none.zip")
    monkeypatch.setattr(cache, "_templates", {})  # built here, not remembered from another test
    spec = spec_from_config("tiny-llama-stacks", TINY)
    s = make_setup(method="lora", micro_batch=2, seq_len=300)
    targets = resolve_targets(spec, s)
    built = setup_template(spec, s, targets, build=True, compose=False)["template"]
    post = post_template(spec, s, targets, build=True)["template"]
    assert built is not None and post is not None
    old = versions.installed(*stack_alias.STACK)
    (tmp_path / "stacks.json").write_text(json.dumps({"traced": [old]}))
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda *names: {**real(*names), **{
        k: v for k, v in NEWER.items() if k in names}})
    monkeypatch.setattr(cache, "_templates", {})
    monkeypatch.setattr(stack_alias, "_verdicts", {})
    return spec, s, targets, built, post, tmp_path


def test_a_template_of_another_stack_answers_where_the_installed_records_the_same(traced, monkeypatch):
    from vramfit.memory import stack_alias
    from vramfit.memory import template_build as tb
    from vramfit.memory.replay import post_template
    from vramfit.memory.template_cache import NOT_CACHED, setup_template, template_key

    spec, s, targets, built, post, tmp = traced
    assert stack_alias.traced_stacks() and template_key(spec, s) != template_key(
        spec, s, versions=stack_alias.traced_stacks()[0])
    monkeypatch.setenv("VRAMFIT_STACK_ALIAS", "off")
    assert setup_template(spec, s, targets, build=False, compose=False)["note"] == NOT_CACHED
    monkeypatch.delenv("VRAMFIT_STACK_ALIAS")
    assert setup_template(spec, s, targets, build=False, compose=False)["template"] == built
    assert post_template(spec, s, targets, build=False)["template"] == post
    kept = [json.loads(p.read_text()) for p in (tmp / "stacks").glob("*.json")]
    assert len(kept) == 2 and all(v["same"] and v["stack"]["peft"] == "99.0.0" for v in kept)
    # the verdicts are read back: no recording again (a new process: nothing in memory)
    monkeypatch.setattr(stack_alias, "_verdicts", {})
    monkeypatch.setattr(tb, "_real_events", lambda *a, **k: pytest.fail("recorded again"))
    assert setup_template(spec, s, targets, build=False)["template"] == built


def test_a_stack_that_records_otherwise_gets_no_template(traced, monkeypatch):
    from vramfit.memory import template_build as tb
    from vramfit.memory.template_cache import NOT_CACHED, setup_template

    spec, s, targets, built, post, tmp = traced
    real = tb._real_events

    def bigger(*args, **kwargs):  # the newer release allocates one buffer a byte larger
        events = list(real(*args, **kwargs))
        i = next(i for i, ev in enumerate(events) if ev[0] == "a" and ev[2] > 4096)
        events[i] = (*events[i][:2], events[i][2] + 1, *events[i][3:])
        return events

    monkeypatch.setattr(tb, "_real_events", bigger)
    assert setup_template(spec, s, targets, build=False, compose=False)["note"] == NOT_CACHED
    [verdict] = [json.loads(p.read_text()) for p in (tmp / "stacks").glob("*.json")]
    assert verdict["same"] is False
    monkeypatch.setattr(tb, "_real_events", real)  # kept: not checked again
    assert setup_template(spec, s, targets, build=False, compose=False)["note"] == NOT_CACHED

