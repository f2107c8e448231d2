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
    base = (tc._DIGEST.clear(), tc._code_digest())[1]

    def edited(name):
        def read(self):
            return real(self) + b"\n# edited\n" if self.name == name else real(self)
        return read

    for name, same in (("template_build.py", True), ("template_record.py", True), ("events.py", False),
                       ("template.py", False)):
        monkeypatch.setattr(pathlib.Path, "read_bytes", edited(name))
        tc._DIGEST.clear()
        assert (tc._code_digest() == base) is same, name
    monkeypatch.setattr(pathlib.Path, "read_bytes", real)
    tc._DIGEST.clear()
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
    got = setup_template(spec, s, resolve_targets(spec, s), build=False, compose=False)
    assert got["note"] == NOT_CACHED
