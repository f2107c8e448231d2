"""config -> ModelSpec: an exact parameter census of the real architecture.

The model is built on the meta device (no memory, no weights), the way accelerate's
`estimate-memory` does, and every parameter and every `nn.Linear` / GPT-2 `Conv1D` is read off
the real module tree.  Nothing here is a per-family formula, so any causal LM that
transformers can build is counted exactly.

Resolution of MODEL (profile name, config.json, model directory, hub id) lives here too.
Heavy imports (torch, transformers) happen inside the functions that need them.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from vramfit.errors import VramfitError

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"
MODEL_PROFILES_DIR = PROFILES_DIR / "models"

# Keys a causal-LM config must have for us to size it (checked before building).
REQUIRED_CONFIG_KEYS = ("model_type",)

ROLES = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")

_ATTENTION_WORDS = ("attn", "attention", "self_attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn", "experts", "moe", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class LinearLayer:
    """One `nn.Linear` (or GPT-2 `Conv1D`) of the model, by its module path."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    kind: str = "linear"  # "linear" (exactly nn.Linear), "conv1d" (GPT-2), or a subclass's name

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelSpec:
    """What the memory model needs to know about one architecture, all exact counts."""

    name: str
    model_type: str
    architecture: str
    config: dict = field(repr=False, compare=False)
    params_total: int
    params_by_role: dict
    linears: tuple
    output_layer: str | None  # module path of the LM head (peft's all-linear skips it)
    tied_embeddings: bool
    largest_param_numel: int
    num_param_tensors: int
    param_shapes: tuple  # ((shape, count, role), ...) of every parameter tensor, tied ones once
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int
    experts_per_token: int
    config_hash: str
    supports_sdpa: bool = True  # transformers can run this architecture with sdpa attention

    def __hash__(self) -> int:  # one spec per config: the hash of its config is its identity
        return hash(self.config_hash)

    @property
    def has_grouped_kv(self) -> bool:
        """Fewer KV heads than query heads (GQA or multi-query)."""
        return 0 < self.num_kv_heads < self.num_heads

    @property
    def has_fused_experts(self) -> bool:
        """MoE experts stored as 3-D parameters (transformers 5), which are not nn.Linear layers."""
        return any(len(shape) >= 3 for shape, _, _ in self.param_shapes)

    def quantizable_linears(self) -> tuple:
        """The layers bitsandbytes turns into Linear4bit: every plain nn.Linear (transformers checks
        `type(module) is nn.Linear`, so subclasses such as FalconLinear stay unquantized) and
        Conv1D, but the LM head."""
        return tuple(l for l in self.linears if l.kind in ("linear", "conv1d") and l.name != self.output_layer)


# --------------------------------------------------------------------------- resolution


def list_profiles() -> list[str]:
    return sorted(p.stem for p in MODEL_PROFILES_DIR.glob("*.json"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VramfitError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except OSError as exc:
        raise VramfitError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise VramfitError(f"{path} must hold a JSON object (a Hugging Face config.json)")
    return data


def _strip_private(data: dict) -> dict:
    return {k: v for k, v in data.items() if not k.startswith("_")}


def resolve_config_dict(model: str, trust_remote_code: bool = False) -> tuple[str, dict]:
    """MODEL -> (display name, config dict).  Profiles and local paths never touch the network."""
    if not model or not str(model).strip():
        raise VramfitError("MODEL is empty: give a profile name, a config.json, a model directory or a hub id")
    model = str(model).strip()
    profile = MODEL_PROFILES_DIR / f"{model.lower()}.json"
    if profile.is_file():
        return model.lower(), _strip_private(_read_json(profile))
    path = Path(model).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise VramfitError(f"{path} is a directory without a config.json")
        return path.name, _strip_private(_read_json(cfg))
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise VramfitError(f"no such file: {path}")
        return path.stem if path.name != "config.json" else path.parent.name or "model", _strip_private(_read_json(path))
    if "/" in model and not model.startswith((".", "/")):
        return model, _hub_config(model, trust_remote_code)
    close = difflib.get_close_matches(model.lower(), list_profiles(), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise VramfitError(
        f"unknown model '{model}': not a bundled profile, a config.json or a model directory, "
        f"and not a hub id (owner/name).{hint} `vramfit profiles` lists the bundled ones."
    )


def _hub_config(model_id: str, trust_remote_code: bool) -> dict:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as exc:  # offline, gated, missing: all user-facing
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise VramfitError(
            f"could not fetch the config of '{model_id}' from the hub ({msg}). Offline? Use a bundled "
            f"profile (`vramfit profiles`), a local config.json, or a local model directory instead."
        ) from None
    return cfg.to_dict()


def config_from_dict(data: dict, source: str = "config"):
    """dict -> transformers PretrainedConfig, with clear errors for malformed input."""
    from transformers import AutoConfig

    for key in REQUIRED_CONFIG_KEYS:
        if key not in data:
            raise VramfitError(f"{source}: missing key '{key}' (a Hugging Face config.json names its model_type)")
    try:
        return AutoConfig.for_model(**copy.deepcopy(data))  # transformers edits nested dicts (rope)
    except (ValueError, KeyError, TypeError) as exc:
        raise VramfitError(f"{source}: {str(exc).splitlines()[0][:300]}") from None


def config_hash(data: dict) -> str:
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- census


def build_meta_model(config, dtype=None, attn_implementation: str | None = None):
    """Instantiate the causal LM for `config` on the meta device (no memory is used)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    except ValueError as exc:
        first = str(exc).splitlines()[0][:200]
        raise VramfitError(
            f"'{getattr(config, 'model_type', '?')}' is not a causal language model transformers can build "
            f"({first})"
        ) from None
    except (TypeError, AttributeError, KeyError) as exc:
        raise VramfitError(f"config is incomplete or malformed for '{getattr(config, 'model_type', '?')}': {exc}") from None


def _is_linear(module) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _role(module_path: str, module, param_name: str, input_emb, output_emb) -> str:
    import torch

    if module is input_emb or isinstance(module, torch.nn.Embedding):
        return "embeddings"
    if output_emb is not None and module is output_emb:
        return "lm_head"
    if "norm" in type(module).__name__.lower() or re.search(r"(^|[._])(ln|norm|layernorm)[_\w]*$", module_path):
        return "norms"
    words = module_path.lower().split(".") + [param_name.lower()]
    if any(w in part for part in words for w in _ATTENTION_WORDS):
        return "attention"
    if any(w in part for part in words for w in _MLP_WORDS) or "gate" in module_path.lower():
        return "mlp"
    if "." in module_path and _is_linear(module):
        return "other"
    return "other"


def census(model) -> dict:
    """Exact counts off a built model: totals by role, every Linear, the output layer."""
    input_emb = model.get_input_embeddings()
    output_emb = model.get_output_embeddings()
    modules = dict(model.named_modules())
    by_role = dict.fromkeys(ROLES, 0)
    total = 0
    largest = 0
    count = 0
    shapes: dict = {}
    for name, param in model.named_parameters():  # tied weights are yielded once
        mod_path, _, pname = name.rpartition(".")
        role = _role(mod_path, modules[mod_path], pname, input_emb, output_emb)
        k = (tuple(param.shape), role)
        shapes[k] = shapes.get(k, 0) + 1
        by_role[role] += param.numel()
        total += param.numel()
        largest = max(largest, param.numel())
        count += 1
    out_name = None
    linears = []
    for path, module in modules.items():
        if module is output_emb:
            out_name = path
        if _is_linear(module):
            w = module.weight
            if type(module).__name__ == "Conv1D":  # GPT-2 stores weight as (in, out)
                linears.append(LinearLayer(path, w.shape[0], w.shape[1], module.bias is not None, "conv1d"))
            else:
                import torch

                kind = "linear" if type(module) is torch.nn.Linear else type(module).__name__
                linears.append(LinearLayer(path, module.in_features, module.out_features, module.bias is not None,
                                           kind))
    tied = output_emb is not None and input_emb is not None and output_emb.weight is input_emb.weight
    return dict(params_total=total, params_by_role=by_role, linears=tuple(linears), output_layer=out_name,
                tied_embeddings=tied, largest_param_numel=largest, num_param_tensors=count,
                param_shapes=tuple((shape, n, role) for (shape, role), n in sorted(shapes.items())))


def _cfg_get(cfg, *names, default=0):
    sub = getattr(cfg, "text_config", None)
    for c in (cfg, sub):
        if c is None:
            continue
        for n in names:
            v = getattr(c, n, None)
            if v is not None:
                return v
    return default


def _shape_facts(cfg) -> dict:
    hidden = int(_cfg_get(cfg, "hidden_size", "n_embd", "d_model"))
    heads = int(_cfg_get(cfg, "num_attention_heads", "n_head"))
    kv = int(_cfg_get(cfg, "num_key_value_heads", "num_kv_heads", default=0) or 0)
    if not kv:
        kv = 1 if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False) else heads
    head_dim = int(_cfg_get(cfg, "head_dim", default=0) or (hidden // heads if heads else 0))
    inter = int(_cfg_get(cfg, "intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size", default=0) or 4 * hidden)
    return dict(
        hidden_size=hidden,
        num_layers=int(_cfg_get(cfg, "num_hidden_layers", "n_layer", "num_layers")),
        vocab_size=int(_cfg_get(cfg, "vocab_size")),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        num_experts=int(_cfg_get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0),
        experts_per_token=int(_cfg_get(cfg, "num_experts_per_tok", "moe_top_k", default=0) or 0),
    )


@functools.lru_cache(maxsize=64)
def _spec_from_json(name: str, blob: str) -> ModelSpec:
    data = json.loads(blob)
    config = config_from_dict(data, source=name)
    for key in ("num_hidden_layers", "vocab_size"):
        v = getattr(config, key, 1)
        if isinstance(v, int) and v <= 0:
            raise VramfitError(f"{name}: '{key}' must be positive, got {v}")
    model = build_meta_model(config)
    supports_sdpa = bool(getattr(type(model), "_supports_sdpa", True))  # Gemma 2: False (soft-capping)
    facts = census(model)
    arch = type(model).__name__
    return ModelSpec(name=name, model_type=config.model_type, architecture=arch, config=data,
                     config_hash=config_hash(data), supports_sdpa=supports_sdpa, **facts, **_shape_facts(config))


def load_spec(model: str, trust_remote_code: bool = False, overrides: dict | None = None) -> ModelSpec:
    """MODEL -> ModelSpec, cached in memory (and on disk by vramfit.model.cache) per config.

    `overrides` replaces config keys (e.g. {"num_hidden_layers": 4} for a shrunk model).
    """
    name, data = resolve_config_dict(model, trust_remote_code)
    if overrides:
        data = {**data, **overrides}
    return spec_from_config(name, data)


def spec_from_config(name: str, data: dict) -> ModelSpec:
    """A config dict -> ModelSpec, through the same caches."""
    from vramfit.model import cache

    hit = cache.load_spec(config_hash(data), lambda stored: _spec_from_stored(stored, data))
    if hit is not None:
        return hit
    spec = _spec_from_json(name, json.dumps(data, sort_keys=True))
    cache.store_spec(spec)
    return spec


def _spec_from_stored(stored: dict, config: dict) -> ModelSpec:
    """A ModelSpec from the fields vramfit.model.cache stored (config kept apart)."""
    stored["linears"] = tuple(LinearLayer(**l) for l in stored["linears"])
    stored["param_shapes"] = tuple((tuple(sh), n, r) for sh, n, r in stored["param_shapes"])
    return ModelSpec(**stored, config=config)
