"""`--init random`'s checkpoint (vramfit.run.model.write_random_checkpoint): written on the CPU, shard by
shard, from a model on the meta device, by the model's own init, exactly as save_pretrained lays it out,
and loaded by from_pretrained with no weight missing or unexpected.  Tiny configs, no network."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from vramfit.run.model import _random_checkpoint, resolve_model, write_random_checkpoint

SHARD = 40_000  # bytes: the tiny models below are written in several shards
UNIT = 5_000  # bytes: and drawn a module or two at a time
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.05)
CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True),  # q/k/v biases, lm_head tied
    "mixtral": dict(model_type="mixtral", num_local_experts=4),  # fused experts, written one per expert
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=1, eos_token_id=2),
}


def config(name):
    kw = {**BASE, **CONFIGS[name]}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def write(tmp_path, name, seed=0, sub="ckpt"):
    target = tmp_path / f"{name}-{sub}-{seed}"
    info = write_random_checkpoint(config(name), target, seed, torch.bfloat16, max_shard_size=SHARD, unit_bytes=UNIT)
    return target, info


def load(target):
    model, info = AutoModelForCausalLM.from_pretrained(target, output_loading_info=True)
    return model, info


def index(target):
    return json.loads((target / "model.safetensors.index.json").read_text())


def digest(target):
    return {f: (target / f).read_bytes() for f in sorted(os.listdir(target))}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_checkpoint_loads_with_no_weight_missing_or_unexpected_in_bf16(tmp_path, name):
    target, info = write(tmp_path, name)
    model, loading = load(target)
    assert {k: v for k, v in loading.items() if v} == {}  # missing, unexpected, mismatched keys, errors
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    shards = sorted(f for f in os.listdir(target) if f.endswith(".safetensors"))
    assert info["shards"] == len(shards) > 2 and index(target)["metadata"]["total_size"] == info["total_size"]
    assert set(index(target)["weight_map"].values()) == set(shards)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


@pytest.mark.parametrize("name", ["llama", "qwen2-tied", "mixtral"])
def test_files_index_and_config_are_those_save_pretrained_writes(tmp_path, name):
    target, _ = write(tmp_path, name)
    ref = tmp_path / "save_pretrained"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config(name), dtype=torch.bfloat16).save_pretrained(ref, max_shard_size=SHARD)
    assert sorted(os.listdir(target)) == sorted(os.listdir(ref))
    assert index(target) == index(ref)
    for f in ("config.json", "generation_config.json"):
        assert json.loads((target / f).read_text()) == json.loads((ref / f).read_text())
    for f in index(target)["weight_map"].values():  # each file as safetensors' save_file writes its tensors
        resaved = tmp_path / "resaved.safetensors"
        save_file(load_file(target / f), resaved, metadata={"format": "pt"})
        assert (target / f).read_bytes() == resaved.read_bytes()


def test_tied_weights_are_written_once_and_tied_again_on_loading(tmp_path):
    target, _ = write(tmp_path, "qwen2-tied")
    assert "lm_head.weight" not in index(target)["weight_map"]
    assert "model.embed_tokens.weight" in index(target)["weight_map"]
    model, _ = load(target)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_weights(tmp_path):
    a, _ = write(tmp_path, "llama", seed=3, sub="a")
    b, _ = write(tmp_path, "llama", seed=3, sub="b")
    c, _ = write(tmp_path, "llama", seed=4, sub="c")
    assert digest(a) == digest(b)
    ma, mc = load(a)[0], load(c)[0]
    assert not torch.equal(ma.model.layers[0].self_attn.q_proj.weight, mc.model.layers[0].self_attn.q_proj.weight)


def test_weights_follow_the_models_init_convention(tmp_path):
    """transformers' _init_weights: Linear and Embedding weights normal(0, initializer_range), the
    padding token's embedding row zero, norm weights one, biases zero; GPT-2 scales the residual
    projections (c_proj) by 1/sqrt(2 x layers)."""
    std = BASE["initializer_range"]
    llama = load(write(tmp_path, "llama")[0])[0].float()
    for w in (llama.model.layers[1].mlp.down_proj.weight, llama.lm_head.weight, llama.model.embed_tokens.weight[1:]):
        assert abs(w.mean().item()) < 0.1 * std and w.std().item() == pytest.approx(std, rel=0.1)
    assert torch.all(llama.model.embed_tokens.weight[BASE["pad_token_id"]] == 0)
    assert all(torch.all(m.weight == 1) for n, m in llama.named_modules() if "norm" in type(m).__name__.lower())
    qwen = load(write(tmp_path, "qwen2-tied")[0])[0]
    assert torch.all(qwen.model.layers[0].self_attn.q_proj.bias == 0)
    gpt2 = load(write(tmp_path, "gpt2")[0])[0].float()
    assert gpt2.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(std / 2, rel=0.15)
    assert gpt2.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(std, rel=0.1)


def test_init_random_writes_its_checkpoint_once_under_the_scratch_directory(tmp_path):
    from tiny_lm import llama_config, make_tokenizer

    cfg_dir = tmp_path / "config"
    llama_config(make_tokenizer()).save_pretrained(cfg_dir)
    source = resolve_model(str(cfg_dir), "random")
    (tmp_path / "run" / "random-init").mkdir(parents=True)  # an incomplete one, left by an older vramfit
    (tmp_path / "run" / "random-init" / "model-00001-of-00002.safetensors").write_bytes(b"")
    path = _random_checkpoint(source, 0, tmp_path / "run")
    assert path == str(tmp_path / "run" / "random-init")
    stamp = os.stat(os.path.join(path, "config.json")).st_mtime_ns
    assert _random_checkpoint(source, 0, tmp_path / "run") == path
    assert os.stat(os.path.join(path, "config.json")).st_mtime_ns == stamp  # written once
    _, loading = load(path)
    assert {k: v for k, v in loading.items() if v} == {}
