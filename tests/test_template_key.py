"""The event templates' cache key (vramfit.memory.template_cache): what it hashes, and how entries the
builder could not build are retried by a newer builder."""

from conftest import TINY_LLAMA

TINY = dict(TINY_LLAMA, num_hidden_layers=12)


def test_builder_edits_keep_the_keys(monkeypatch):
    """The templates' key hashes what the replay records and how a template expands, not the builder: an
    edit to template_build / template_record keeps every key (their sources as frozen stand in), an edit to
    the recorder changes it; an entry an older builder could not build is tried again by a newer one."""
    import pathlib

    from vramfit.memory import template_cache as tc

    real = pathlib.Path.read_bytes
    base = (tc._code_digest.cache_clear(), tc._code_digest())[1]

    def edited(name):
        def read(self):
            return real(self) + b"\n# edited\n" if self.name == name else real(self)
        return read

    for name, same in (("template_build.py", True), ("template_record.py", True), ("events.py", False),
                       ("template.py", False)):
        monkeypatch.setattr(pathlib.Path, "read_bytes", edited(name))
        tc._code_digest.cache_clear()
        assert (tc._code_digest() == base) is same, name
    monkeypatch.setattr(pathlib.Path, "read_bytes", real)
    tc._code_digest.cache_clear()
    assert tc._code_digest() == base


def test_an_older_builders_failure_is_retried(tmp_path, monkeypatch):
    from vramfit.memory import template_build as tb
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.memory.template_cache import NOT_CACHED, setup_template, template_key
    from vramfit.model import cache
    from vramfit.model.spec import spec_from_config

    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    spec = spec_from_config("tiny-llama-builder", TINY)
    s = make_setup(method="lora", micro_batch=2, seq_len=300)
    cache.store_template(template_key(spec, s), {"exact": False, "reason": "an old builder's failure"})
    got = setup_template(spec, s, resolve_targets(spec, s), build=False, compose=False)
    assert got["note"] == "no event template: an old builder's failure"
    monkeypatch.setattr(tb, "BUILDER", tb.BUILDER + 1)
    again = setup_template(spec, s, resolve_targets(spec, s), build=False, compose=False)
    assert again["note"] == got["note"]  # a lookup alone keeps the old answer
    built = setup_template(spec, s, resolve_targets(spec, s), build=True, compose=False)
    assert built["template"] is not None, built["note"]  # a build tries again
    assert setup_template(spec, s, resolve_targets(spec, s), build=False)["template"] == built["template"]
    assert NOT_CACHED != built["note"]


def test_full_fine_tuning_with_paged_8bit_states_builds(tmp_path, monkeypatch):
    """bitsandbytes' absmax buffers are tagged by their parameter's layer (BUILDER 2): with paged states
    (>= 1e5 elements, outside torch's allocator: every linear here) they are the optimizer phase's only
    allocations of a large parameter, and untagged they made one run that grows with the layers (no template)."""
    import dataclasses

    from vramfit.memory import template as T
    from vramfit.memory import template_build as tb
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.memory.template_cache import setup_template
    from vramfit.model.spec import spec_from_config

    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    spec = spec_from_config("tiny-llama-paged", dict(TINY, hidden_size=512, intermediate_size=1408))
    s = make_setup(method="full", optim="paged_adamw_8bit", micro_batch=2, seq_len=300)
    got = setup_template(spec, s, resolve_targets(spec, s), build=True, compose=False)
    assert got["template"] is not None, got["note"]
    other = dataclasses.replace(s, micro_batch=3, seq_len=420)
    assert tb.same_events(T.expand(got["template"], 3, 420, s.lora_r, spec.num_layers), tb._real_events(spec, other))


def test_a_build_through_the_lookup_retries(tmp_path, monkeypatch):
    """setup_template with composition (what estimate and plan call) builds again where the entry is an older
    builder's failure, and answers from the cache after."""
    from vramfit.memory import template_build as tb
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.memory.template_cache import setup_template, template_key
    from vramfit.model import cache
    from vramfit.model.spec import spec_from_config

    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    spec = spec_from_config("tiny-llama-retry", TINY)
    s = make_setup(method="lora", micro_batch=2, seq_len=300)
    cache.store_template(template_key(spec, s), {"exact": False, "reason": "an old builder's failure",
                                                 "builder": tb.BUILDER - 1})
    assert setup_template(spec, s, resolve_targets(spec, s), build=False)["template"] is None
    assert setup_template(spec, s, resolve_targets(spec, s), build=True)["template"] is not None
    assert cache.load_template(template_key(spec, s))["exact"]
