"""Constants that are not derived from shapes: each named, sourced and measured.

Measurements: benchmarks/results/*context*.jsonl (the harness's `context` micro-case) and the
issue-2 grid; `vramfit calibrate` replaces them with the local stack's values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MiB = 1 << 20


@dataclass(frozen=True)
class Constants:
    # CUDA context as nvidia-smi shows a process right after torch initialised CUDA: 520 MiB
    # (545,259,520 B) on an H200, driver 580.159, CUDA 13.0, torch 2.11 (context micro-case).
    cuda_context_bytes: int = 520 * MiB
    # What the context grows by once a training step has loaded its kernels (cuBLAS/cuBLASLt,
    # attention, optimizer): device - reserved was 742 or 758 MiB in all 41 measured training
    # runs (benchmarks/results/h200-2026-11-23-*.jsonl); the larger value is kept.
    kernel_growth_bytes: int = 238 * MiB
    # cuBLAS workspace, allocated through the caching allocator once per (handle, stream): torch
    # uses 32 MiB per handle on Hopper (CUBLAS_WORKSPACE_CONFIG default :4096:8); the forward
    # thread and the autograd thread each hold a handle.
    cublas_workspace_bytes: int = 2 * 32 * MiB
    # bitsandbytes 8-bit optimizers quantize tensors with at least this many elements
    # (bnb.optim.Optimizer8bit min_8bit_size); smaller ones keep 32-bit states.
    bnb_min_8bit_size: int = 4096
    # Block size of bitsandbytes' blockwise 8-bit optimizer states (one fp32 absmax per block).
    bnb_optim_blocksize: int = 256
    # bitsandbytes 4-bit weights: one absmax per 64 weights; double quantization stores those as
    # uint8 with one fp32 absmax per 256 of them (BitsAndBytesConfig defaults).
    nf4_blocksize: int = 64
    nf4_dq_blocksize: int = 256
    # Backward working set of one decoder layer, in units of its largest saved tensor (the
    # gradient of that tensor and of its producer held at once).  Swept over the 80 H200 runs:
    # 1.0 / 1.5 / 2.0 / 2.5 / 3.0 give allocated-peak median errors 0.11 / 0.11 / 0.08 / 0.11 /
    # 0.11% and p90 9.4 / 5.6 / 5.9 / 7.4 / 10.2%; 2.0 is kept.
    layer_backward_factor: float = 2.0
    # Caching allocator: reserved - allocated at the peak.  Freed blocks of the loss buffers
    # (fp32 logits-sized), of activations and of the optimizer step's temporaries are cached and
    # only partly reusable.  A linear fit
    #   reserve = const + a * fp32_logits_bytes + b * activation_bytes + c * optimizer_temp_bytes,
    # least squares on the llama, qwen2, gpt2 and opt runs measured on an H200 on 2026-11-23
    # (54 runs), reported on the other architectures (26 runs): `python -m
    # benchmarks.accuracy.fit_reserve` prints both.  Floor: one 2 MiB small-block segment plus
    # one 20 MiB large-buffer segment (kLargeBuffer), the least a training step leaves.
    reserve_const_bytes: int = 64 * MiB
    reserve_per_logits_byte: float = 0.7043
    reserve_per_activation_byte: float = 0.0113
    reserve_per_optimizer_temp_byte: float = 0.2983
    reserve_floor_bytes: int = 22 * MiB

    # Per-model correction of the traced saved-activation bytes, measured by `vramfit calibrate
    # --model` (real CUDA forward / trace); 1.0 where the trace is exact, as on the 9 models
    # compared tensor by tensor (benchmarks/results/h200-2026-11-23-saved-tensors.txt).
    activation_scale: float = 1.0

    def with_(self, **kw) -> "Constants":
        return replace(self, **kw)


DEFAULT = Constants()
