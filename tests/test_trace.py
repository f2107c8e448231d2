"""The meta-device trace against a real forward of the same tiny model on the CPU."""

import json

import pytest

from vramfit.memory.estimate import trace_key
from vramfit.memory.setup import make_setup, resolve_targets
from vramfit.model.spec import load_spec
from vramfit.model.trace import activation_profile

from conftest import TINY_LLAMA


def _real_saved_bytes(model, batch, seq):
    import torch

    known = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = set()
    total = 0

    def pack(t):
        nonlocal total
        st = t.untyped_storage()
        if st.data_ptr() not in known and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
        return t

    from vramfit.model.emulate import _patched_sdpa

    ids = torch.randint(0, 512, (batch, seq))
    # the real CPU run with CUDA's dropout (bool masks), as the trace emulates it
    with _patched_sdpa(False), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return total


@pytest.mark.parametrize("method", ["full", "lora"])
def test_eager_trace_matches_real_cpu_forward_at_untraced_shape(tmp_path, method):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    spec = load_spec(str(tmp_path))
    setup = make_setup(method, precision="32-true", attn="eager", seq_len=40, micro_batch=3,
                       **({} if method == "full" else dict(lora_r=4, lora_dropout=0.1, target_modules="q_proj,v_proj")))
    targets = resolve_targets(spec, setup)
    prof = activation_profile(spec, trace_key(spec, setup, targets))

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA, use_cache=False),
                                             attn_implementation="eager")
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    real = _real_saved_bytes(model, 3, 40)
    predicted = prof.saved_bytes(3, 40)
    assert abs(predicted - real) <= 0.01 * real, (predicted, real)


def test_checkpointing_keeps_one_hidden_state_per_layer():
    spec = load_spec("llama-3.2-1b")
    setup = make_setup("full", precision="bf16-true", seq_len=1024)
    prof = activation_profile(spec, trace_key(spec, setup, ()))
    assert prof.layer_input_lin == 2 * spec.hidden_size  # bf16 residual stream
    outside = prof.outside.bytes(1, 1024)
    assert prof.checkpointed_bytes(1, 1024) - outside < (prof.saved_bytes(1, 1024) - outside) / 5


def test_eager_attention_adds_a_quadratic_term_and_sdpa_does_not():
    spec = load_spec("qwen2.5-0.5b")
    eager = activation_profile(spec, trace_key(spec, make_setup("full", attn="eager"), ()))
    sdpa = activation_profile(spec, trace_key(spec, make_setup("full", attn="sdpa"), ()))
    assert sdpa.layers[-1].quad == pytest.approx(0, abs=1e-6)
    # bf16 softmax output + fp32 softmax + dropout-free matmul input, per head
    assert eager.layers[-1].quad >= 2 * spec.num_heads


def test_bf16_mixed_keeps_bf16_copies_of_trainable_weights():
    spec = load_spec("smollm2-135m")
    mixed = activation_profile(spec, trace_key(spec, make_setup("full", precision="bf16-mixed"), ()))
    layer_params = sum(n * __import__("math").prod(s) for s, n, r in spec.param_shapes
                       if r in ("attention", "mlp")) / spec.num_layers
    assert mixed.layers[-1].const == pytest.approx(2 * layer_params, rel=0.01)


def test_qlora_residual_stream_is_fp32_after_kbit_preparation():
    spec = load_spec("llama-3.2-1b")
    setup = make_setup("qlora", grad_ckpt=True)
    prof = activation_profile(spec, trace_key(spec, setup, resolve_targets(spec, setup)), grad_ckpt=True)
    assert prof.residual_dtype_bytes == 4


def test_qlora_gqa_in_fp32_takes_the_math_path_with_seq_squared_memory():
    # measured on an H200: fp32 q with grouped KV heads has no fused kernel (saved_tensors.py)
    spec = load_spec("tinyllama-1.1b")
    setup = make_setup("qlora", precision="bf16-true", grad_ckpt=False)  # no autocast: q stays fp32
    prof = activation_profile(spec, trace_key(spec, setup, resolve_targets(spec, setup)))
    assert prof.layers[-1].quad >= 4 * spec.num_heads  # one fp32 seq x seq tensor per head


def test_dropout_keeps_bool_masks_like_cuda():
    spec = load_spec("opt-125m")  # dropout 0.1 in its config
    prof = activation_profile(spec, trace_key(spec, make_setup("full", precision="32-true"), ()))
    with_fp32_masks = prof.layers[-1].lin + 3 * 2 * spec.hidden_size  # two residual dropouts
    assert prof.layers[-1].lin < with_fp32_masks


@pytest.mark.parametrize("method, precision, dropout", [("lora", "bf16-true", 0.05), ("lora", "bf16-mixed", 0.0),
                                                         ("qlora", "bf16-true", 0.05), ("lora", "32-true", 0.1)])
@pytest.mark.parametrize("r", [1, 4, 64])
def test_other_lora_ranks_are_interpolated_exactly(method, precision, dropout, r):
    """Ranks outside RANK_ANCHORS come from the two anchors' traces; a direct trace agrees."""
    import dataclasses

    from vramfit.memory.estimate import trace_key
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.model.spec import spec_from_config
    from vramfit.model.trace import RANK_ANCHORS, _interpolate_rank, _profile_cached

    spec = spec_from_config("tiny-llama", TINY_LLAMA)
    s = make_setup(method, precision=precision, lora_r=r, lora_dropout=dropout, target_modules="all-linear")
    key = trace_key(spec, s, resolve_targets(spec, s))
    direct = _profile_cached(spec, key, False)
    anchors = [_profile_cached(spec, dataclasses.replace(key, lora_r=a), False) for a in RANK_ANCHORS]
    got = _interpolate_rank(anchors, RANK_ANCHORS, r)
    for a, b in zip((got.outside, *got.layers), (direct.outside, *direct.layers)):
        for f in ("const", "lin", "quad", "max_tensor_lin", "max_tensor_quad"):
            assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-9, abs=1e-6), f
