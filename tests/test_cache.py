"""The bundled cache (profiles/cache.zip) holds what the code computes today, and is only read back
for the library versions it was made with."""

import dataclasses
import json

import pytest

from vramfit.model import cache
from vramfit.api import estimate


def _fresh(monkeypatch, tmp_path, name, **kw):
    monkeypatch.setattr(cache, "BUNDLED_ZIP", tmp_path / "no-bundled-cache.zip")
    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path / "fresh"))
    cache._specs.clear()
    cache._profiles.clear()
    from vramfit.model import spec
    from vramfit.model import trace

    spec._spec_from_json.cache_clear()
    trace._profile_cached.cache_clear()
    return estimate(name, use_calibration=False, **kw)


@pytest.mark.parametrize("name, kw", [("llama-3.1-8b", {}), ("gemma-2-2b", {}),
                                      ("mistral-7b-v0.1", {"method": "qlora", "grad_ckpt": True})])
def test_bundled_entries_equal_a_fresh_computation(monkeypatch, tmp_path, name, kw):
    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path / "empty"))
    cache._specs.clear()
    cache._profiles.clear()
    from_bundle = estimate(name, use_calibration=False, **kw)
    hit = (tmp_path / "empty").exists() is False  # nothing had to be computed and written
    if not hit:
        pytest.skip("installed transformers/peft differ from the bundled cache's: it is not used")
    fresh = _fresh(monkeypatch, tmp_path, name, **kw)
    assert dataclasses.asdict(from_bundle) == dataclasses.asdict(fresh)


def test_bundled_cache_is_keyed_by_library_versions(monkeypatch, tmp_path):
    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "_versions", lambda: "transformers=0.0,peft=0.0,format=0")
    cache._specs.clear()
    cache._profiles.clear()
    from vramfit.model import spec

    spec._spec_from_json.cache_clear()
    spec.load_spec("gpt2")
    written = list((tmp_path / "specs").glob("*.json"))
    assert len(written) == 1  # computed and written: the bundled entry was not taken
    assert json.loads(written[0].read_text())["params_total"] == 124_439_808
