"""Saved-for-backward tensors of a real forward vs vramfit's meta-device trace, tensor by tensor.

`python -m benchmarks.accuracy.saved_tensors CASE.json [--device cuda]` (or --grid NAME --only RE)
prints, per (shape, dtype), how many storages the real forward saved and how many the trace
predicts: the tool that finds which op a prediction gets wrong.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json


def _spy_sdpa(orig):
    """Wrap sdpa to print the inputs and the backend torch picks for them."""
    import torch

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        names = {0: "MATH", 1: "FLASH", 2: "EFFICIENT", 3: "CUDNN", 4: "OVERRIDEABLE"}
        print(f"    sdpa q{tuple(q.shape)} {q.dtype} k{tuple(k.shape)} mask={None if attn_mask is None else tuple(attn_mask.shape)}"
              f" causal={is_causal} gqa={enable_gqa} -> {names.get(int(choice), choice)}")
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    return spy


def _record(model, ids, device_sdpa_fake: bool, autocast_dtype=None):
    import torch

    def skey(t):
        st = t.untyped_storage()
        return st.data_ptr() if t.device.type != "meta" else st._cdata

    known = {skey(p) for p in model.parameters()} | {skey(b) for b in model.buffers()}
    seen = set()
    rec = collections.Counter()
    total = 0

    def pack(t):
        nonlocal total
        st = t.untyped_storage()
        key = skey(t)
        if key not in known and key not in seen:
            seen.add(key)
            rec[(tuple(t.shape), str(t.dtype))] += 1
            total += st.nbytes()
        return t

    from vramfit.model.emulate import _patched_sdpa

    orig = torch.nn.functional.scaled_dot_product_attention
    # off CUDA, emulate what CUDA does (sdpa kernels, bool dropout masks), as the trace does
    emulate = _patched_sdpa(device_sdpa_fake, autocast_dtype) if ids.device.type != "cuda" else contextlib.nullcontext()
    if ids.device.type == "cuda":
        torch.nn.functional.scaled_dot_product_attention = _spy_sdpa(orig)
    ac = torch.autocast(ids.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        with emulate, ac, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    return rec, total


def _real_model(case: dict, spec, key, traced: int, device: str):
    """The case's model with `traced` layers, built as the harness builds it (QLoRA on CUDA only)."""
    import tempfile

    import torch

    from benchmarks.accuracy import cases, train_case

    layer_key = next(k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in spec.config)
    full = cases.training_case(**{k: v for k, v in case.items() if k in cases.training_case.__code__.co_varnames})
    full["config_overrides"] = {**full["config_overrides"], layer_key: traced}
    full["grad_ckpt"] = False
    config_dict = cases.model_config_dict(full)
    ckpt = None
    if full["method"] == "qlora":
        ckpt = tempfile.mkdtemp()
        train_case.save_random_checkpoint(full, ckpt)
    if device == "cpu" or full["method"] == "qlora":
        model = train_case.build_model(full, config_dict, ckpt)
    else:
        with torch.device(device):
            model = train_case.build_model(full, config_dict, ckpt)
    model.train()
    return model


def compare(case: dict, device: str) -> None:
    import torch

    from benchmarks.accuracy.report import case_setup
    from vramfit.memory.estimate import trace_key
    from vramfit.memory.setup import resolve_targets
    from vramfit.model.spec import load_spec
    from vramfit.model import trace as T

    spec = load_spec(case["model"], overrides=case.get("config_overrides") or None)
    setup = case_setup(case)
    targets = resolve_targets(spec, setup)
    key = trace_key(spec, setup, targets)
    config, traced = T._traced_config(spec.config, spec.num_layers)
    meta_model = T._prepare_model(config, key, spec)
    seq, batch = 64, 1
    meta_ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    ac = getattr(torch, key.autocast_dtype) if key.autocast_dtype else None
    with T._patched_sdpa(key.attn != "eager", ac), (T._autocast_mode(ac) if ac else contextlib.nullcontext()):
        meta_rec, meta_total = _record(meta_model, meta_ids, False)

    model = _real_model(case, spec, key, traced, device)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), device=device)
    real_rec, real_total = _record(model, ids, device == "cpu" and key.attn != "eager", ac)
    print(f"{case['model']} {key.method} {key.param_dtype} autocast={key.autocast_dtype} {key.attn} on {device}: "
          f"real {real_total} B, trace {meta_total} B ({traced} layers, seq {seq})")
    for k in sorted(set(real_rec) | set(meta_rec), key=str):
        if real_rec[k] != meta_rec[k]:
            print(f"  {k}: real {real_rec[k]}  trace {meta_rec[k]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--json", help="inline JSON list of case dicts")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    cases = []
    for p in args.cases:
        data = json.load(open(p))
        cases += data if isinstance(data, list) else [data]
    if args.json:
        cases += json.loads(args.json)
    for c in cases:
        compare(c, args.device)


if __name__ == "__main__":
    main()
