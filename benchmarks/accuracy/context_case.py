"""The context micro-case, in a fresh process: the constants the memory model needs that do not
come from shapes.

- the CUDA context: NVML bytes after `torch.cuda.init(); torch.empty(1)`;
- cuBLAS/cuBLASLt workspaces and lazily loaded kernels: how allocated, reserved and NVML grow on
  the first bf16 and the first fp32 matmul (and on a first SDPA forward+backward);
- the caching allocator's rounding: reserved growth for one allocation of a few sizes, each
  after `empty_cache()` so it starts from no free blocks.
"""

from __future__ import annotations

import os
import time
import traceback

from . import cases, probe

MIB = 1 << 20
ROUNDING_SIZES = (1, 512, MIB + 1, 10 * MIB + 1, 100 * MIB + 1)
MATMUL_N = 4096


def _reading(torch, sampler) -> dict:
    return {**probe.torch_memory(torch), **sampler.read()}


def _growth(before: dict, after: dict) -> dict:
    return {k.replace("_bytes", "_growth_bytes"): (after[k] - before[k])
            if after[k] is not None and before[k] is not None else None for k in before}


def _first_matmul(torch, sampler, dtype) -> dict:
    a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=dtype)
    b = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=dtype)
    before = _reading(torch, sampler)
    c = a @ b
    torch.cuda.synchronize()
    after = _reading(torch, sampler)
    out = {"dtype": str(dtype), "n": MATMUL_N, "output_bytes": c.numel() * c.element_size(),
           "before": before, "after": after, **_growth(before, after)}
    # growth of allocated beyond the output tensor is the library workspace held by torch
    out["workspace_allocated_bytes"] = out["allocated_growth_bytes"] - out["output_bytes"]
    del a, b, c
    return out


def _first_sdpa(torch, sampler) -> dict:
    q, k, v = (torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.empty_cache()
    before = _reading(torch, sampler)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.sum().backward()
    torch.cuda.synchronize()
    del out, q, k, v
    torch.cuda.empty_cache()
    after = _reading(torch, sampler)
    return {"before": before, "after": after, **_growth(before, after)}


def _rounding(torch) -> list[dict]:
    rows = []
    for size in ROUNDING_SIZES:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        a0, r0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        t = torch.empty(size, dtype=torch.uint8, device="cuda")
        a1, r1 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        rows.append({"request_bytes": size, "allocated_growth_bytes": a1 - a0,
                     "reserved_growth_bytes": r1 - r0})
        del t
    torch.cuda.empty_cache()
    return rows


def run(case: dict, report=lambda partial: None) -> dict:
    started = time.perf_counter()
    conf = cases.ALLOCATORS[case["allocator"]]
    if conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device", "seconds": 0.0}
    result: dict = {"status": "error"}
    sampler = probe.NvmlSampler()  # no thread: single readings, in order
    try:
        result["before_cuda_init"] = sampler.read()
        torch.cuda.init()
        torch.empty(1, device="cuda")
        result["after_cuda_init"] = _reading(torch, sampler)
        result["environment"] = probe.environment(torch, sampler)
        result["mem_get_info"] = dict(zip(("free_bytes", "total_bytes"), torch.cuda.mem_get_info()))
        result["first_matmul_bf16"] = _first_matmul(torch, sampler, torch.bfloat16)
        result["first_matmul_fp32"] = _first_matmul(torch, sampler, torch.float32)
        result["first_sdpa_bf16_fwd_bwd"] = _first_sdpa(torch, sampler)
        result["allocator_rounding"] = _rounding(torch)
        result["end"] = _reading(torch, sampler)
        result["nvml_minus_reserved_end_bytes"] = (
            result["end"]["nvml_process_bytes"] - result["end"]["reserved_bytes"]
            if result["end"]["nvml_process_bytes"] is not None else None)
        result["status"] = "ok"
    except Exception:
        result["traceback"] = traceback.format_exc()[-3000:]
    result.update(sampler.stop())
    result["seconds"] = time.perf_counter() - started
    return result
