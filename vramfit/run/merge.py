"""`vramfit merge`: fold a LoRA adapter into its base model and save a standard model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vramfit.errors import VramfitError



def merge(adapter_dir: str, out_dir: str, base: str | None = None, dtype: str = "auto",
          trust_remote_code: bool = False) -> dict:
    """Fold a LoRA adapter into its base model (peft merge_and_unload) and save a standard model
    (safetensors) with the tokenizer, loadable without peft."""
    adapter = Path(adapter_dir).expanduser()
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise VramfitError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VramfitError(f"{out} already exists and is not empty: choose another --out")
    base = base or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise VramfitError(f"{cfg_path} names no base model: give it with --base")
    base_path = Path(base).expanduser()
    if not base_path.is_dir() and (base.startswith((".", "/", "~")) or "/" not in base):
        raise VramfitError(f"the adapter's base '{base}' is not a model directory with weights (a random-init "
                           f"run has none to merge into); give the base with --base")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise VramfitError(f"unknown dtype '{dtype}'; use auto, bfloat16, float16 or float32")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise VramfitError(f"cannot load the base model {base}: {str(exc).splitlines()[0][:300]}") from None
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else base
    try:
        AutoTokenizer.from_pretrained(str(tok_src), trust_remote_code=trust_remote_code).save_pretrained(str(out))
    except (OSError, ValueError):
        pass  # a base without a tokenizer: the merged weights are still complete
    for extra in ("chat_template.jinja",):
        if (adapter / extra).is_file() and not (out / extra).is_file():
            shutil.copy(adapter / extra, out / extra)
    return {"base": base, "adapter": str(adapter), "out": str(out),
            "params": sum(p.numel() for p in merged.parameters())}
