"""CUDA reductions' global buffers (vramfit/cuda_reduce.py) and the replay events around them."""

import json

from vramfit.memory.cuda_reduce import reduce_buffers, reduction_layout, set_reduce_config


def test_column_mean_of_8192x2048_fp32_stages_128_mib_on_132_sms():
    """Adafactor's update.mean(dim=-2) of an up/gate projection's gradient: outputs along the
    contiguous dim (vectorized by 4 -> dim0 512, max threads 128), block 32 x 4, warps split the
    8192 inputs (2048 values a thread), grid.x = 2048 / 4 / 32 = 16 < 132 x 16, ctas_per_output
    = max(min(132, 128), 8) = 128; staging = 4 x 2048 x 128 x 32 x 4 bytes, semaphores 4 x 16."""
    c = set_reduce_config(*_layout([8192, 2048], [0]), element_size=4, arg_size=4)
    assert (c.block_width, c.block_height, c.output_vec_size, c.ctas_per_output) == (32, 4, 4, 128)
    assert reduce_buffers([8192, 2048], [2048, 1], [0], 4, 4) == [(4 * 2048 * 128 * 32 * 4, 4 * 16)]


def test_column_mean_of_the_llama_1b_embedding_is_capped_by_the_target_grid():
    """128256 x 2048: 32064 values a thread after the warp split, ctas = max(min(2112 / 16, 2004), 126)
    = 132: 132 MiB of staging."""
    assert reduce_buffers([128256, 2048], [2048, 1], [0], 4, 4) == [(4 * 2048 * 132 * 128, 64)]


def test_row_mean_and_small_reductions_stay_in_one_block():
    """Reducing the contiguous dim of 2048 (vectorized: 512 -> block 32 x 16): 64 values a thread,
    under the warp-split threshold of 256, so no global reduction; likewise a 2048-vector's sum."""
    assert reduce_buffers([128256, 2048], [2048, 1], [1], 4, 4) == []
    assert reduce_buffers([2048], [1], [0], 4, 4) == []


def test_full_norm_stages_one_float_per_cta():
    """The norm of a 128256 x 2048 fp32 tensor: one coalesced dim, block 512 x 1 (vectorized input),
    513,024 values a thread, ctas = max(min(528, 32064), 2004) = 2004; block.x reduces, so the
    staging holds one fp32 per CTA."""
    assert reduce_buffers([128256, 2048], [2048, 1], [0, 1], 4, 4) == [(4 * 2004, 4)]


def test_layout_puts_reduced_dims_first_and_coalesces():
    assert reduction_layout([4, 8, 16], [128, 16, 1], [0, 1, 2]) == ([512], [1], 1)
    assert reduction_layout([4, 8, 16], [128, 16, 1], [2]) == ([16, 32], [1, 16], 1)
    assert reduction_layout([4, 1, 16], [16, 16, 1], [0]) == ([4, 16], [16, 1], 1)


def _layout(shape, dims):
    strides, s = [], 1
    for n in reversed(shape):
        strides.insert(0, s)
        s *= n
    it_shape, it_strides, nred = reduction_layout(shape, strides, dims)
    return it_shape, it_strides, nred


def _events(tmp_path, optim="adamw_torch", tie=False, precision="bf16-mixed"):
    from vramfit.memory.events import training_events
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.model.spec import load_spec

    from conftest import TINY_LLAMA

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY_LLAMA, "tie_word_embeddings": tie}))
    spec = load_spec(str(cfg))
    setup = make_setup("full", precision, seq_len=64, micro_batch=2, optim=optim)
    return spec, training_events(spec, setup, resolve_targets(spec, setup), steps=1)


def test_tied_embedding_gradients_are_summed_in_place_under_autocast(tmp_path):
    """lm_head's and the embedding's gradients of a shared fp32 weight meet in autograd's InputBuffer;
    under bf16-mixed lm_head's is autocast's fresh fp32 copy and CUDA adds the embedding's into it in
    place (H100 memory history of llama-3.2-1b bf16-mixed): as many weight-sized allocations as the
    untied model's two weights' gradients, where the recorder alone (out of place) has one more."""
    from conftest import TINY_LLAMA

    w_bytes = TINY_LLAMA["vocab_size"] * TINY_LLAMA["hidden_size"] * 4
    counts = []
    for tie in (True, False):
        (tmp_path / str(tie)).mkdir()
        _, ev = _events(tmp_path / str(tie), tie=tie)
        bwd = ev["events"][ev["marks"]["step0.backward"]:ev["marks"]["step0.clip"]]
        counts.append(sum(1 for e in bwd if e[0] == "a" and e[2] == w_bytes))
    assert counts[0] == counts[1]


def test_mixed_precision_outputs_copied_to_fp32(tmp_path):
    """accelerate's convert_outputs_to_fp32 (the Trainer under bf16/fp16 mixed precision): one more
    fp32 logits-sized allocation in the forward than bf16-true, freed before the backward."""
    from conftest import TINY_LLAMA

    logits_fp32 = 2 * 64 * TINY_LLAMA["vocab_size"] * 4
    counts = []
    for precision in ("bf16-mixed", "bf16-true"):
        (tmp_path / precision).mkdir()
        _, ev = _events(tmp_path / precision, precision=precision)
        fwd = ev["events"][ev["marks"]["step0.forward"]:ev["marks"]["step0.backward"]]
        ids = {e[1] for e in fwd if e[0] == "a" and e[2] == logits_fp32}
        counts.append(len(ids))
        if precision == "bf16-mixed":
            freed = {e[1] for e in fwd if e[0] == "f"}
            assert len(ids - freed) == 1  # only the loss's log-softmax output lives on into backward
    assert counts[0] == counts[1] + 1


def test_cublas_workspaces_forward_before_backward_after_first_matmul_output(tmp_path):
    """The forward thread's 32 MiB workspace comes before its first gemm's output; the autograd
    thread's is taken inside its first gemm, after the output (H100 history: lm_head's weight
    gradient, then 32 MiB)."""
    from vramfit.memory.kernels import CUBLAS_WORKSPACE
    from conftest import TINY_LLAMA

    _, ev = _events(tmp_path)
    events = ev["events"]
    fwd, bwd = [i for i, e in enumerate(events) if e[0] == "a" and e[2] == CUBLAS_WORKSPACE]
    h, v = TINY_LLAMA["hidden_size"], TINY_LLAMA["vocab_size"]
    # q_proj under autocast: weight cast (h x h bf16), input cast (last to first, as CUDA's), the
    # workspace, then the bf16 output
    assert events[fwd - 2][0] == "a" and events[fwd - 2][2] == h * h * 2
    assert events[fwd - 1][0] == "a" and events[fwd - 1][2] == 2 * 64 * h * 2
    assert events[fwd + 1][0] == "a" and events[fwd + 1][2] == 2 * 64 * h * 2
    # backward: lm_head's bf16 weight gradient (v x h), then the workspace
    assert ev["marks"]["step0.backward"] < bwd < ev["marks"]["step0.clip"]
    assert events[bwd - 1][0] == "a" and events[bwd - 1][2] == v * h * 2


def test_training_starts_from_an_emptied_cache(tmp_path):
    """Trainer._inner_training_loop's accelerator.free_memory(): empty_cache before the first step."""
    _, ev = _events(tmp_path)
    assert ev["events"][ev["marks"]["after_load"]] == ("e",)


def test_clip_allocates_foreach_norms_chunk_buffer(tmp_path):
    """_foreach_norm over the fp32 gradients: one fp32 partial per tensor per 65536-element chunk."""
    spec, ev = _events(tmp_path)
    events, marks = ev["events"], ev["marks"]
    clip = events[marks["step0.clip"]:marks["step0.optimizer"]]
    n_params = spec.config["num_hidden_layers"] * 9 + 3  # 7 linears + 2 norms a layer; embed, norm, head
    assert clip[0] == ("a", clip[0][1], n_params * 1 * 4)  # every tiny tensor fits one chunk
