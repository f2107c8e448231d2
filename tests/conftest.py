
import json

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session gets its own spec/profile cache: tests never read a user's cache."""
    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "vramfit-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the fitted estimate unless a test asks for the replay (replay=True): a template build per setup
    # would take the suite from minutes to an hour (tests/test_template.py covers the replay)
    monkeypatch.setenv("VRAMFIT_REPLAY", "0")
    # templates built before answering, never by a detached process (tests/test_template_bg.py tries that)
    monkeypatch.setenv("VRAMFIT_TEMPLATE_BUILD", "now")
    # no pinned streams (vramfit.memory.pinned): a test that changes the replay's code in-process would read
    # a stream an earlier test kept (tests/test_pinned.py turns them on)
    monkeypatch.setenv("VRAMFIT_PIN_STREAMS", "off")


TINY_LLAMA = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=176,
    num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=512,
    max_position_embeddings=256, tie_word_embeddings=False,
)
# GPT-2 (Conv1D, tied head, learned positions) and GPT-NeoX (partial rotary, parallel residual) as small
TINY_GPT2 = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_head=4, n_layer=10,
                 n_positions=4096, vocab_size=512, activation_function="gelu_new")
TINY_NEOX = dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=64, intermediate_size=256,
                 num_attention_heads=4, num_hidden_layers=10, vocab_size=512, max_position_embeddings=4096,
                 rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)


def wide_tiny_spec(tmp_dir, **overrides):
    """TINY_LLAMA at hidden 128 / intermediate 512 (the per-rank tests' model), loaded from a config.json."""
    from vramfit.model.spec import load_spec

    cfg = tmp_dir / "config.json"
    cfg.write_text(json.dumps({**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 512, **overrides}))
    return load_spec(str(cfg))


@pytest.fixture(scope="module")
def llama8b():
    from vramfit.model.spec import load_spec

    return load_spec("llama-3.1-8b")


@pytest.fixture(scope="module")
def llama1b():
    from vramfit.model.spec import load_spec

    return load_spec("llama-3.2-1b")


# the GPU harness's tiny profile (benchmarks/accuracy), trained on the CPU by the harness tests
HARNESS_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "tie_word_embeddings": True, "_params": 90432,
}


def harness_profiles(tmp_path, monkeypatch):
    """A profiles folder holding `tiny-llama` (HARNESS_LLAMA), where benchmarks.accuracy.cases looks."""
    from benchmarks.accuracy import cases

    directory = tmp_path / "models"
    directory.mkdir()
    (directory / "tiny-llama.json").write_text(json.dumps(HARNESS_LLAMA))
    monkeypatch.setenv(cases.PROFILES_ENV, str(directory))
    return directory
