"""The model and tokenizer of a run (vramfit train): resolve MODEL (weights, hub id, or random init
from a config), load it as the setup loads it (dtype, attention, 4-bit NF4 + prepare_model_for_kbit_training
for QLoRA), and the tokenizer with its pad token."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vramfit.errors import VramfitError
from vramfit.memory.setup import Setup
from vramfit.planner.convert import CHECKPOINTING_KWARGS, bnb_config

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")



@dataclass(frozen=True)
class ModelSource:
    name: str
    path: str | None  # a local directory or hub id with weights; None for random init
    config: dict
    init: str
    spec: object  # vramfit.model.spec.ModelSpec
    local_dir: str | None = None  # MODEL as a local directory (its tokenizer is the default one)
    trust_remote_code: bool = False



def resolve_model(model: str, init: str = "pretrained", trust_remote_code: bool = False) -> ModelSource:
    from vramfit.model.spec import MODEL_PROFILES_DIR, resolve_config_dict, spec_from_config

    if init not in ("pretrained", "random"):
        raise VramfitError(f"--init must be pretrained or random, got '{init}'")
    name, config = resolve_config_dict(model, trust_remote_code)
    path = Path(str(model)).expanduser()
    profile = MODEL_PROFILES_DIR / f"{str(model).strip().lower()}.json"
    local_dir = str(path.resolve()) if path.is_dir() and not profile.is_file() else None
    weights = None
    if init == "pretrained":
        if local_dir:
            if not any(any(path.glob(p)) for p in WEIGHT_FILES):
                raise VramfitError(f"{path} has a config but no weights (*.safetensors or *.bin); give a model "
                                   f"directory with weights, or --init random to train from random weights")
            weights = local_dir
        elif profile.is_file() or path.is_file():
            hub = json.loads(profile.read_text()).get("_hub_id") if profile.is_file() else None
            hint = f"its weights are on the hub as {hub}, or " if hub else ""
            raise VramfitError(f"'{model}' is a config without weights: {hint}use --init random for a random-init run")
        else:
            weights = str(model)  # a hub id: from_pretrained downloads it
    return ModelSource(name=name, path=weights, config=config, init=init, spec=spec_from_config(name, config),
                       local_dir=local_dir, trust_remote_code=trust_remote_code)


def load_tokenizer(source: ModelSource, tokenizer: str | None, trust_remote_code: bool = False):
    """The model's tokenizer (or --tokenizer), with a pad token and right padding for training."""
    from transformers import AutoTokenizer

    where = tokenizer or source.path or source.local_dir
    if where is None:
        raise VramfitError(f"--init random from '{source.name}' has no tokenizer: give one with --tokenizer "
                           f"(a model directory or hub id)")
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing files, offline hub: the user's to fix
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise VramfitError(f"cannot load a tokenizer from {where} ({msg}); give one with --tokenizer") from None
    if tok.pad_token is None:
        if tok.eos_token is None and tok.unk_token is None:
            raise VramfitError(f"the tokenizer of {where} has no pad, eos or unk token to pad with")
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    if len(tok) > source.spec.vocab_size:
        raise VramfitError(f"the tokenizer has {len(tok):,} tokens but the model's vocabulary only "
                           f"{source.spec.vocab_size:,}: they do not belong together")
    return tok


def build_model(source: ModelSource, s: Setup, cuda: bool, seed: int, base_path: str | None, scratch: Path):
    """The base model as `s` loads it: dtype, attention, 4-bit NF4 + prepare_model_for_kbit_training
    for QLoRA.  LoRA layers are added by SFTTrainer from `lora_config(s)`."""
    import torch
    from transformers import AutoModelForCausalLM

    from vramfit.model.spec import config_from_dict

    dtype = getattr(torch, s.param_dtype)
    path = base_path or source.path
    kw = {"dtype": dtype, "attn_implementation": s.attn, "trust_remote_code": source.trust_remote_code}
    if s.method == "qlora":
        kw["quantization_config"] = bnb_config(s)
        kw["device_map"] = {"": torch.cuda.current_device()}
        if path is None:  # bitsandbytes quantizes while loading: write the random weights first
            path = _random_checkpoint(source, seed, scratch)
    if path is None:
        config = config_from_dict(source.config, source.name)
        torch.manual_seed(seed)
        with torch.device("cuda" if cuda else "cpu"):  # init in place: a 7B model in seconds on a GPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=s.attn)
        _name_base(model, source.name)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        except (OSError, ValueError) as exc:
            raise VramfitError(f"cannot load the model from {path}: {str(exc).splitlines()[0][:300]}") from None
        if source.path:
            _name_base(model, source.path)  # the adapter's base: the original, not a full checkpoint
    model.config.use_cache = False
    if s.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.grad_ckpt,
                                                gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    return model


def _name_base(model, name: str) -> None:
    """What peft writes as the adapter's base_model_name_or_path (and `vramfit merge` loads)."""
    model.config._name_or_path = name
    model.name_or_path = name


def _random_checkpoint(source: ModelSource, seed: int, scratch: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from vramfit.model.spec import config_from_dict

    target = scratch / "random-init"
    if not (target / "config.json").is_file():
        config = config_from_dict(source.config, source.name)
        torch.manual_seed(seed)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(target)
        del model
        torch.cuda.empty_cache()
    return str(target)
