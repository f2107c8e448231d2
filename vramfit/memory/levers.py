"""The field's memory levers in the allocation replay (vramfit.memory.events), issue 20: what each
allocates on the GPU, recorded as the real code runs it on the meta device.

- liger (`TrainingArguments(use_liger_kernel=True)`): transformers' `apply_liger_kernel` runs liger-kernel's
  own `_apply_liger_kernel_to_instance` on the (PEFT-unwrapped) model when training starts; here too.
  Liger's Python autograd Functions then run for real (RMSNorm, SwiGLU, RoPE, and under the model's own
  loss the fused linear cross-entropy forward `lce_forward`: no (tokens x vocab) logits; the input's
  gradient is computed IN THE FORWARD, chunk by chunk, and kept for the backward); only their Triton
  kernels are no-ops (they write into tensors the Python code allocated: nothing of theirs is
  allocated by torch).  Where liger asks the device what it is (`device.type == "cuda"`, the SM count,
  the compute capability) the meta device answers as an H100 would (`_CudaLike`).  Under trl's
  SFTTrainer (`loss="fused"`) the fused linear cross-entropy is off (trl keeps its own fused head)
  and only the layer kernels are applied, as SFTTrainer configures liger.  liger-kernel imports
  Triton when imported; a CPU machine has none, so a permissive stand-in module (`vramfit.memory.liger`'s `_triton_stub`) is
  put in `sys.modules` for the import only and taken out again: its `@triton.jit` kernels are
  no-ops, `triton.cdiv` / `next_power_of_2` compute.  With a real Triton (a GPU machine) the
  kernels are swapped for no-ops while recording.  Module-level patches liger makes to transformers
  (`modeling_llama.apply_rotary_pos_emb = liger_rotary_pos_emb`, the RMSNorm / MLP classes) are
  undone when the recording ends, so no later (lever-free) replay in the process sees them.
- packing (trl `SFTConfig(packing=True)`, BFD, padding-free): a micro-batch is ONE row of
  micro_batch x seq_len tokens (trl's DataCollatorForLanguageModeling(padding_free=True): input_ids,
  labels, position_ids restarting at each example, cu_seq_lens_q / _k, seq_idx; no attention_mask),
  examples of `example_len` tokens on average (`Setup.extras["example_len"]`, default 256).  From the
  position_ids transformers' masking_utils finds the packed sequences (`find_packed_sequence_indices`,
  recorded with its allocations; its data-dependent "one sequence only" test answered from the
  setup) and builds a block-diagonal causal (1, 1, T, T) bool mask for SDPA, shared by the layers.
  With a mask no flash kernel runs: torch's SDPA takes the memory-efficient kernel, after converting
  the bool mask into an additive one in the query's dtype (`at::where`, T x T, per layer call), which
  the kernel's autograd node keeps for the backward; transformers repeats grouped KV heads when a
  mask is given (real code).  `_mem_efficient_sdpa` records that.
- activation_offloading (trl `SFTConfig(activation_offloading=True)`): trl's
  `get_act_offloading_ctx_manager(model)` (run for real: its output-head no-op hooks) with its
  `OffloadActivations` replaced by `_OffloadEmulation`, the same logic (trl 1.16, streams on) with
  host copies as sizes: each saved tensor of >= 1024 bytes that is not a parameter is copied to pinned
  host memory (non-contiguous ones first made contiguous on the GPU) and its GPU storage is held only
  by the forward stash of the last 5 offloaded tensors; one whose storage is already tracked stays on
  the GPU; in the backward a tensor still in the stash is used as is, the others are brought back
  (a new GPU block on the copy stream: a block of that stream's own pool in torch's caching
  allocator, which the default stream never reuses, `streams()`), kept until the next autograd node
  that unpacks has run (or the end of the backward).  The context is entered per training step
  (SFTTrainer.training_step: an empty_cache, since bitsandbytes is imported) and exited after the
  backward.  Pinned host memory is
  counted as torch's CachingHostAllocator holds it (blocks rounded up to powers of two, cached and
  reused, never released): `host()`.
"""

from __future__ import annotations

import contextlib

EXAMPLE_LEN = 256  # average packed example length (tokens) where Setup.extras gives none
MEM_EFF_ALIGN = 8  # SDPA's preprocess_mask: the bias's strides (but the last) multiples of this, else padded
LSE_ALIGN = 32  # its log-sum-exp rows are padded to this (kAlignLSE)
_LEVER_SOURCES = ("memory/levers.py", "memory/liger.py", "memory/offload.py")


def single_sequence(setup) -> bool:
    """The packed micro-batch is one sequence to the model: one example (transformers finds no packed
    sequences), or flash_attention_2 (its varlen kernel attends per example): no block-diagonal mask."""
    return packed_sequences(setup) == 1 or setup.attn == "flash_attention_2"


def any_lever(setup) -> bool:
    return bool(setup.liger or setup.packing or setup.activation_offloading)


def example_len(setup) -> int:
    value = (setup.extras or {}).get("example_len") or EXAMPLE_LEN
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        from vramfit.errors import VramfitError

        raise VramfitError(f"example_len must be a positive number of tokens, got {value!r}")
    return int(round(value))


def packed_sequences(setup) -> int:
    """Examples in one packed micro-batch (micro_batch rows of seq_len tokens, examples of example_len
    on average, each row's last one truncated to fill it)."""
    return setup.micro_batch * -(-setup.seq_len // example_len(setup))


def _digest() -> str:
    from vramfit.versions import source_digest

    return source_digest(*_LEVER_SOURCES)


def cache_part(setup) -> tuple:
    """What in-process caches keyed by a Setup must add: its extras do not take part in its equality,
    and packing's example length is one of them."""
    return (example_len(setup),) if setup.packing else ()


def key_part(setup) -> tuple:
    """What an event template's key adds for the levers: nothing without one (the key of a lever-free
    setup is the same as before the levers existed); with one, the levers, packing's example length and
    whether the packed micro-batch is one sequence (no mask then), liger-kernel's version and this
    module's code (its edits rebuild only the lever templates)."""
    if not any_lever(setup):
        return ()
    from vramfit.versions import installed

    single = setup.packing and single_sequence(setup)
    return (("levers", setup.liger, setup.packing, setup.activation_offloading,
             example_len(setup) if setup.packing else 0, single,
             installed("liger-kernel") if setup.liger else {}, _digest()),)


# --------------------------------------------------------------------------- the recording's context


class Levers:
    """The levers of `setup` around `training_events`' steps (a context manager), its packed batches
    (`batch`), and activation offloading's per-step context (`step_begin` / `step_end`)."""

    def __init__(self, rec, model, setup, autocast_dtype=None):
        self.rec, self.model, self.setup, self.ac_dtype = rec, model, setup, autocast_dtype
        self.packed = setup.packing
        self.offload = None
        from vramfit.memory.offload import PinnedHost

        self.pinned = PinnedHost()
        self.copy_stream: dict = {}  # offloading: allocation id -> its CUDA stream (offload.COPY_STREAM)
        self._stack = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        try:
            if self.setup.liger:
                from vramfit.memory.liger import liger

                self._stack.enter_context(liger(self.model, self.setup, self.ac_dtype))
            if self.setup.packing:
                self._stack.enter_context(_packing(self.setup, self.ac_dtype))
            if self.setup.activation_offloading:
                from vramfit.memory.offload import Addresses, make_offloading

                # trl keys storages by address: the allocator model's (see offload._OffloadEmulation)
                addresses = Addresses(self.rec, self.setup.allocator == "expandable", self.copy_stream)
                addresses.events = self.rec.events
                self.offload = make_offloading(self.model, self.rec, self.pinned, addresses, self.copy_stream)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def batch(self, B: int, S: int) -> tuple:
        """trl's padding-free collator's micro-batch on the GPU (Trainer._prepare_inputs moves its
        tensors in the collator's order): (input_ids, None, labels, {position_ids, cu_seq_lens_q,
        cu_seq_lens_k, max_length_q, max_length_k, seq_idx})."""
        import torch

        T = B * S
        n = B * -(-S // example_len(self.setup))
        ids = torch.zeros((1, T), dtype=torch.long, device="meta")
        labels = torch.zeros((1, T), dtype=torch.long, device="meta")
        pos = torch.zeros((1, T), dtype=torch.long, device="meta")
        cu_q = torch.zeros((n + 1,), dtype=torch.int32, device="meta")
        cu_k = torch.zeros((n + 1,), dtype=torch.int32, device="meta")
        seq_idx = torch.zeros((1, T), dtype=torch.int32, device="meta")
        longest = min(S, 4 * example_len(self.setup))
        return ids, None, labels, {"position_ids": pos, "cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k,
                                   "max_length_q": longest, "max_length_k": longest, "seq_idx": seq_idx}

    def step_begin(self) -> None:
        if self.offload is not None:
            # trl's bookkeeping compares storage reference counts (its backward hooks): Python's cyclic
            # garbage collector, run at moments that vary from process to process, would make the
            # recording vary with them; it runs between the steps instead
            import gc

            self._gc = gc.isenabled()
            gc.disable()
            self.offload.__enter__()

    def step_end(self) -> None:
        if self.offload is not None:
            import gc

            self.offload.__exit__(None, None, None)
            gc.collect()
            if self._gc:
                gc.enable()

    def streams(self) -> dict:
        """The allocations made on a CUDA stream other than the default one (id -> stream): activation
        offloading's copies brought back in the backward, on trl's copy stream.  Replay the events with
        `vramfit.memory.offload.simulate_streams(events, streams)`: torch keeps a freed block for the
        stream that allocated it."""
        return dict(self.copy_stream)

    def host(self) -> dict | None:
        """Pinned host memory of activation offloading: {"pinned_bytes": what the caching host
        allocator holds at the end (its peak: it never releases), "peak_live_bytes": the largest
        sum of live host copies, "offloaded_bytes": bytes copied to the host over the run, "streams": the
        copies brought back on trl's copy stream (`streams`)}; None without offloading."""
        return dict(self.pinned.summary(), streams=self.streams()) if self.setup.activation_offloading else None


# --------------------------------------------------------------------------- packing


@contextlib.contextmanager
def _packing(setup, autocast_dtype=None):
    """transformers' packed-sequence detection and SDPA with the packed mask, as on CUDA."""
    import torch
    from transformers import masking_utils

    # one example: transformers finds no packed sequences (no mask: flash attention); flash_attention_2
    # attends per example from cu_seq_lens and builds no mask either (vramfit replays it as sdpa's flash)
    single = single_sequence(setup)

    def find_packed_sequence_indices(position_ids):
        first_dummy_value = position_ids[:, :1] - 1
        position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
        packed_sequence_mask = (position_diff != 1).cumsum(-1)
        # `(packed_sequence_mask[:, -1] == 0).all()`: its blocks, its value from the setup
        last = (packed_sequence_mask[:, -1] == 0).all()
        del last
        return None if single else packed_sequence_mask

    orig_find = masking_utils.find_packed_sequence_indices
    orig_sdpa = torch.nn.functional.scaled_dot_product_attention
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    torch.nn.functional.scaled_dot_product_attention = _mem_efficient_sdpa(orig_sdpa, autocast_dtype)
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig_find
        torch.nn.functional.scaled_dot_product_attention = orig_sdpa


def _mem_efficient_sdpa(inner, autocast_dtype=None):
    """F.scaled_dot_product_attention with a mask as CUDA runs it: the memory-efficient kernel
    (flash takes no mask); a bool mask first made additive in the query's dtype (`at::where(mask, 0,
    scalar_tensor(-inf))`: a 0-dim tensor, then T x T), padded to MEM_EFF_ALIGN columns where its last
    dimension is not a multiple; the kernel keeps q, k, v, the bias, its output and a float32
    log-sum-exp (rows padded to LSE_ALIGN) for the backward, which allocates dq, dk, dv like q, k, v,
    and one block for a float32 delta per row and, for 16-bit inputs, a float32 dq accumulator.
    Without a mask: `inner` (the flash-like stand-in).  Sizes and order as the H100 memory history of
    a packed llama-3.2-1b run records them (benchmarks/results/h100-2026-12-07d-levers-memory-history/
    5c5c59b45e58.json.gz)."""
    import torch

    class _MemEffAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, bias):
            # _efficient_attention_forward: the philox seed and offset (8 bytes each, on the GPU), the
            # output (B, M, H, Kv), the fp32 log-sum-exp (rows padded), a 256-byte scratch freed at once
            b, h, s, _ = q.shape
            seed = torch.empty((), dtype=torch.long, device=q.device)
            offset = torch.empty((), dtype=torch.long, device=q.device)
            out = q.new_empty((b, s, h, v.shape[-1])).transpose(1, 2)
            lse = torch.empty((b, h, -(-s // LSE_ALIGN) * LSE_ALIGN), dtype=torch.float32, device=q.device)
            scratch = torch.empty((256,), dtype=torch.uint8, device=q.device)
            del scratch
            ctx.save_for_backward(q, k, v, bias, out, lse, seed, offset)
            return out

        @staticmethod
        def backward(ctx, grad):
            # _efficient_attention_backward: grad_q, grad_k, grad_v (B, M, H, K), then ONE block for the
            # fp32 delta (B, H, M) and, for 16-bit inputs, the fp32 grad_q accumulator (rows and head dim
            # padded to 64), 256 bytes more (the H100 memory history of llama-3.2-1b packed: 65 MiB + 256 B
            # at 8192 tokens, 32 heads of 64); freed first, then the seed and offset, then the saved tensors
            q, k, v, bias, out, lse, seed, offset = ctx.saved_tensors
            b, h, s, d = q.shape
            dq, dk, dv = (torch.empty_like(t.transpose(1, 2)) for t in (q, k, v))
            nbytes = b * h * s * 4 + 256
            if q.dtype != torch.float32:
                nbytes += b * h * (-(-s // 64) * 64) * (-(-d // 64) * 64) * 4
            workspace = torch.empty((nbytes,), dtype=torch.uint8, device=q.device)
            del workspace
            del seed, offset
            del out, lse, q, k, v, bias
            return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is None or key.shape[1] != query.shape[1]:
            return inner(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
        if autocast_dtype is not None:  # sdpa is on autocast's low-precision list
            query, key, value = (t.to(autocast_dtype) for t in (query, key, value))
        bias = attn_mask
        if attn_mask.dtype == torch.bool:
            neg = torch.scalar_tensor(float("-inf"), dtype=query.dtype, device=query.device)
            bias = torch.where(attn_mask, 0.0, neg)
            del neg
        if any(st % MEM_EFF_ALIGN for st in bias.stride()[:-1]):
            cols = -(-bias.shape[-1] // MEM_EFF_ALIGN) * MEM_EFF_ALIGN
            padded = bias.new_empty(bias.shape[:-1] + (cols,))
            bias = padded[..., :bias.shape[-1]]
            del padded
        return _MemEffAttention.apply(query, key, value, bias)

    return sdpa
