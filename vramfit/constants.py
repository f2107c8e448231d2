"""Constants that are not derived from shapes: each named, sourced and measured.

Measurements: benchmarks/results/*context*.jsonl (the harness's `context` micro-case) and the
issue-2 grid; `vramfit calibrate` replaces them with the local stack's values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MiB = 1 << 20


@dataclass(frozen=True)
class Constants:
    # CUDA context + kernels loaded by torch, as nvidia-smi shows a process that has only
    # initialised CUDA and run a first matmul (lazy module loading on).  Measured on H100,
    # torch 2.11 + CUDA 13 (benchmarks/results, `context` case); replaced by `vramfit calibrate`.
    cuda_context_bytes: int = 530 * MiB
    # Extra device memory the process holds outside torch's allocator once training kernels
    # (cuBLASLt, cuDNN, NCCL-free) have been loaded: context growth during the first step.
    kernel_growth_bytes: int = 0
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
    # Backward working set of one decoder layer, in units of its largest saved tensor
    # (gradients of that tensor and of its producer held at once); fitted on the issue-2 grid.
    layer_backward_factor: float = 2.0
    # Caching allocator: reserved = allocated + fragmentation.  The default allocator keeps freed
    # blocks of activations that later, differently sized requests cannot reuse; modelled as a
    # fraction of the step's transient bytes (activations + loss buffers).  Fitted on a declared
    # subset of the grid (see benchmarks/accuracy/report.py).
    frag_fraction_default: float = 0.10
    frag_fraction_expandable: float = 0.02
    # Allocator rounding: blocks > 1 MiB are rounded up to 2 MiB (kRoundLarge); segments of
    # 20 MiB serve 1-10 MiB requests (kLargeBuffer).  Per-step floor of unusable reserve.
    alloc_floor_bytes: int = 20 * MiB

    def with_(self, **kw) -> "Constants":
        return replace(self, **kw)


DEFAULT = Constants()
