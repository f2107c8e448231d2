"""The parameter census against published counts and against peft on real tiny models."""

import json

import pytest

from vramfit import VramfitError
from vramfit.api import estimate
from vramfit.memory.setup import make_setup, resolve_targets
from vramfit.model.spec import load_spec

from conftest import TINY_LLAMA


def test_llama2_7b_has_published_parameter_count():
    assert load_spec("llama-2-7b").params_total == 6_738_415_616


def test_mistral_7b_has_published_parameter_count():
    assert load_spec("mistral-7b-v0.1").params_total == 7_241_732_096


def test_lora_qv_r8_on_llama2_matches_peft_print():
    e = estimate("llama-2-7b", method="lora", lora_r=8, target_modules="q_proj,v_proj")
    assert (e.params_trainable, e.params_total) == (4_194_304, 6_742_609_920)


def test_lora_qv_r16_on_mistral_trains_published_count():
    e = estimate("mistral-7b-v0.1", method="lora", lora_r=16, target_modules="q_proj,v_proj")
    assert e.params_trainable == 6_815_744


def test_qlora_mistral_reports_true_and_packed_counts():
    e = estimate("mistral-7b-v0.1", method="qlora", lora_r=16, target_modules="q_proj,v_proj")
    assert e.params_packed == 3_752_071_168  # 4-bit weights counted as packed uint8 pairs
    assert e.params_total - e.params_trainable == 7_241_732_096


def test_tied_embeddings_counted_once():
    spec = load_spec("qwen2.5-0.5b")
    assert spec.tied_embeddings
    assert spec.params_total == 494_032_768
    assert spec.params_by_role["lm_head"] == 0


def test_roles_add_up_to_total():
    for name in ("llama-3.1-8b", "gpt2", "phi-3-mini", "pythia-160m", "opt-125m"):
        spec = load_spec(name)
        assert sum(spec.params_by_role.values()) == spec.params_total, name


def test_all_linear_skips_output_layer_like_peft():
    spec = load_spec("llama-3.2-1b")
    targets = resolve_targets(spec, make_setup("lora", target_modules="all-linear"))
    assert len(targets) == 7 * 16 and "lm_head" not in targets


def test_gpt2_conv1d_and_phi3_fused_projections_are_linears():
    gpt2 = load_spec("gpt2")
    c_attn = [l for l in gpt2.linears if l.name.endswith("h.0.attn.c_attn")][0]
    assert (c_attn.in_features, c_attn.out_features, c_attn.kind) == (768, 2304, "conv1d")
    phi = load_spec("phi-3-mini")
    qkv = [l for l in phi.linears if l.name.endswith("layers.0.self_attn.qkv_proj")][0]
    assert qkv.out_features == 3 * 3072


def test_regex_targets_use_fullmatch():
    spec = load_spec("llama-3.2-1b")
    targets = resolve_targets(spec, make_setup("lora", target_modules=r".*layers\.0\.self_attn\.(q|k)_proj"))
    assert targets == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj")


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "all-linear"])
def test_lora_count_matches_peft_on_a_real_tiny_model(tmp_path, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets if targets == "all-linear"
                                                  else targets.split(","), task_type="CAUSAL_LM"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    e = estimate(str(tmp_path), method="lora", lora_r=4, target_modules=targets)
    assert (e.params_trainable, e.params_total) == (trainable, total)


def test_model_directory_and_config_file_resolve_the_same(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    a = load_spec(str(tmp_path))
    b = load_spec(str(tmp_path / "config.json"))
    assert a.params_total == b.params_total > 0


def test_unknown_profile_suggests_close_matches():
    with pytest.raises(VramfitError, match="llama-2-7b"):
        load_spec("llama-2-7")


def test_config_without_model_type_names_the_key(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(VramfitError, match="model_type"):
        load_spec(str(p))


def test_non_causal_lm_is_rejected(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(VramfitError, match="causal"):
        load_spec(str(p))


def test_offline_hub_id_names_the_alternatives():
    with pytest.raises(VramfitError, match="profile"):
        load_spec("some-org/some-model-that-is-not-here")


def test_only_plain_linears_are_4bit_quantized_like_transformers():
    # transformers' replace_with_bnb_linear tests `type(module) is nn.Linear`: Falcon's
    # FalconLinear subclass stays in its dtype (measured: a Falcon QLoRA run held no uint8 weights)
    falcon = load_spec("falcon-7b")
    kinds = {l.kind for l in falcon.linears}
    assert "FalconLinear" in kinds
    assert all(l.kind in ("linear", "conv1d") for l in falcon.quantizable_linears())
    assert len(load_spec("gpt2").quantizable_linears()) == 4 * 12  # Conv1D layers are quantized
