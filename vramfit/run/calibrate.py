"""`vramfit calibrate`: measure the local stack's constants and keep them per GPU and versions.

What depends on the local stack rather than on shapes is measured in well under a minute:
- the CUDA context (nvidia-smi's figure for this process right after CUDA is initialised),
- the kernels a training step loads on top (cuBLAS/cuBLASLt, attention, optimizer kernels),
- the cuBLAS workspace the first matmul allocates through torch's allocator,
- optionally, for one model (`--model`), the bytes the real forward saves for backward at two
  short sequence lengths against the meta-device trace, kept as a per-model activation scale.
Stored in <cache>/calibration/<key>.json, key = GPU, driver, torch and transformers versions;
later estimates on the same machine use them and say so.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from vramfit.errors import VramfitError
from vramfit.planner.calibration import calibration_dir, local_key


def _process_device_bytes(pid: int) -> int | None:
    import pynvml

    pynvml.nvmlInit()  # reference-counted: cheap when already initialised
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
        if p.pid == pid and p.usedGpuMemory is not None:
            return int(p.usedGpuMemory)
    return None


def measure_stack() -> dict:
    """Context, kernel growth and cuBLAS workspace on GPU 0, in bytes."""
    import os

    import torch

    pid = os.getpid()
    torch.cuda.init()
    x = torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    context = _process_device_bytes(pid)
    if context is None:
        raise VramfitError("NVML does not report this process's memory here; cannot calibrate the context")
    context -= torch.cuda.memory_reserved()
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    before = torch.cuda.memory_allocated()
    out = a @ a
    torch.cuda.synchronize()
    workspace_one = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    # one small training step loads the rest: attention, cross-entropy, AdamW, the autograd thread's
    # own cuBLAS handle (and workspace)
    lin = torch.nn.Linear(1024, 1024, device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.AdamW(lin.parameters())
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
    y = y + torch.nn.functional.cross_entropy(lin(a).float(), torch.zeros(1024, dtype=torch.long, device="cuda"))
    y.backward()
    opt.step()
    torch.cuda.synchronize()
    workspaces = workspace_one * 2  # forward thread + autograd thread
    growth = _process_device_bytes(pid) - torch.cuda.memory_reserved() - context
    del x, a, out, lin, opt, q, y
    return {"cuda_context_bytes": int(context), "kernel_growth_bytes": int(max(growth, 0)),
            "cublas_workspace_bytes": int(max(workspaces, 0))}


def measure_activation_scale(model: str) -> tuple[str, float]:
    """Real saved-for-backward bytes / traced bytes for MODEL (2 layers, bf16, LoRA-free full)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vramfit.memory.estimate import trace_key
    from vramfit.memory.setup import make_setup
    from vramfit.model.spec import config_from_dict, load_spec
    from vramfit.model.trace import activation_profile

    spec = load_spec(model)
    setup = make_setup("full", precision="bf16-true")
    prof = activation_profile(spec, trace_key(spec, setup, ()))
    cfg = config_from_dict(spec.config)
    layers = min(spec.num_layers, 2)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, layers)
    cfg.use_cache = False
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.train()
    known = {p.untyped_storage().data_ptr() for p in m.parameters()}
    ratios = []
    for seq in (128, 256):
        seen: dict = {}  # storage -> bytes, saved tensors de-duplicated

        def pack(t, seen=seen):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in known:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, spec.vocab_size, (1, seq), device="cuda")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids, labels=ids)
        total = sum(seen.values())
        traced = prof.outside.bytes(1, seq) + sum(r.bytes(1, seq) for r in prof.layers[:layers])
        ratios.append(total / traced)
    del m
    torch.cuda.empty_cache()
    return spec.config_hash, sum(ratios) / len(ratios)


def calibrate(model: str | None = None) -> dict:
    """Measure, store, and return what was stored.  VramfitError without a usable GPU."""
    try:
        import torch
    except ImportError:
        raise VramfitError("calibration needs torch with CUDA; nothing was changed") from None
    if not torch.cuda.is_available():
        raise VramfitError("no CUDA GPU is visible to torch here: nothing to calibrate, nothing was changed "
                           "(estimates keep the bundled H100/H200 constants)")
    key = local_key()
    if key is None:
        raise VramfitError("NVML (nvidia-ml-py) cannot see the GPU: nothing was changed")
    started = time.perf_counter()
    data = {"key": key, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "constants": measure_stack(), "activation_scale": {}}
    path = calibration_dir() / f"{key}.json"
    try:
        old = json.loads(path.read_text())
        data["activation_scale"] = old.get("activation_scale", {})
    except (OSError, ValueError):
        pass
    if model:
        h, scale = measure_activation_scale(model)
        data["activation_scale"][h] = round(scale, 6)
        data["model"] = model
    data["seconds"] = round(time.perf_counter() - started, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    data["path"] = str(path)
    return data
