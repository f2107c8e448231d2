"""The model and tokenizer of a run (vramfit train): resolve MODEL (weights, hub id, or random init
from a config), load it as the setup loads it (dtype, attention, 4-bit NF4 + prepare_model_for_kbit_training
for QLoRA), and the tokenizer with its pad token."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vramfit.errors import VramfitError
from vramfit.memory.setup import Setup
from vramfit.planner.convert import CHECKPOINTING_KWARGS, bnb_config

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
# the largest safetensors file of a random checkpoint (decimal, as save_pretrained reads sizes)
SHARD_SIZE = "2GB"
# the most bytes of modules drawn at once (a larger leaf module, an embedding, is drawn whole)
UNIT_BYTES = 256 * 2**20



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


def build_model(source: ModelSource, s: Setup, cuda: bool, seed: int, base_path: str | None, scratch: Path,
                random_init_dir: str | None = None):
    """The base model as `s` loads it: dtype, attention, 4-bit NF4 + prepare_model_for_kbit_training
    for QLoRA.  LoRA layers are added by SFTTrainer from `lora_config(s)`.  An out-of-memory error
    raises LoadOutOfMemory, naming the phase it happened in."""
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
            path = _random_checkpoint(source, seed, scratch, random_init_dir)
    if path is None:
        config = config_from_dict(source.config, source.name)
        torch.manual_seed(seed)
        with loading_phase("initializing the random model" + (" on the GPU" if cuda else "")), \
                torch.device("cuda" if cuda else "cpu"):  # init in place: a 7B model in seconds on a GPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=s.attn)
        _name_base(model, source.name)
    else:
        phase = "loading the weights" + (" and quantizing them to 4-bit" if s.method == "qlora" else "")
        try:
            with loading_phase(phase + " (from_pretrained)"):
                model = AutoModelForCausalLM.from_pretrained(path, **kw)
        except VramfitError:
            raise
        except (OSError, ValueError) as exc:
            raise VramfitError(f"cannot load the model from {path}: {str(exc).splitlines()[0][:300]}") from None
        if source.path:
            _name_base(model, source.path)  # the adapter's base: the original, not a full checkpoint
    model.config.use_cache = False
    if s.method == "qlora" and s.kbit_prep:
        from peft import prepare_model_for_kbit_training

        with loading_phase("preparing the 4-bit model for training (prepare_model_for_kbit_training)"):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.grad_ckpt,
                                                    gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    return model


class LoadOutOfMemory(VramfitError):
    """Out of memory before the first step: while the checkpoint is written, the model loads or is
    quantized, or the trainer moves it to the GPU.  `phase` says which; `error` is torch's first line."""

    def __init__(self, phase: str, error: str):
        self.phase, self.error = phase, error
        super().__init__(f"out of memory while {phase}: {error}")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or a CUDA runtime error of the same cause (raised by kernels such as
    bitsandbytes' quantization, which do not go through torch's allocator)."""
    import torch

    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


@contextmanager
def loading_phase(phase: str):
    """Turn an out-of-memory error inside into LoadOutOfMemory(phase); the original's traceback is
    dropped (its frames would keep the half-loaded tensors alive)."""
    try:
        yield
    except LoadOutOfMemory:
        raise
    except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are turned; the rest go on as they were
        if not is_out_of_memory(exc):
            raise
        exc.__traceback__ = None
        raise LoadOutOfMemory(phase, str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__) from None


def _name_base(model, name: str) -> None:
    """What peft writes as the adapter's base_model_name_or_path (and `vramfit merge` loads)."""
    model.config._name_or_path = name
    model.name_or_path = name


def _random_checkpoint(source: ModelSource, seed: int, scratch: Path, shared: str | Path | None = None) -> str:
    """`--init random` for QLoRA (bitsandbytes quantizes while loading): SCRATCH/random-init, the random
    bf16 checkpoint of `source`'s config, written once (`write_random_checkpoint`: on the CPU, shard by
    shard, no GPU).  `shared` (--random-init-dir): that folder instead, kept after the run and reused
    by any run of the same config and seed (RANDOM_INIT_MARK says which); another one's is refused."""
    import torch

    from vramfit.model.spec import config_from_dict

    target = Path(shared).expanduser() if shared else scratch / "random-init"
    mark = _random_init_mark(source, seed)
    if (target / "config.json").is_file():
        if shared and _read_mark(target) != mark:
            raise VramfitError(f"--random-init-dir {target} holds the random checkpoint of another model, config or "
                               f"seed ({_read_mark(target) or 'unmarked'}; this run's: {mark}): give another folder")
        return str(target)
    if shared and target.exists() and any(target.iterdir()):
        raise VramfitError(f"--random-init-dir {target} is not empty and holds no checkpoint: give an empty or new "
                           f"folder")
    with loading_phase("writing the random checkpoint (on the CPU)"):
        write_random_checkpoint(config_from_dict(source.config, source.name), target, seed, torch.bfloat16,
                                mark=mark)
    return str(target)


RANDOM_INIT_MARK = "vramfit_random_init.json"


def _random_init_mark(source: ModelSource, seed: int) -> dict:
    """What a random checkpoint was drawn from: the model's config (its hash), the seed, the dtype."""
    from vramfit.model.spec import config_hash

    return {"model": source.name, "config_sha256": config_hash(source.config), "seed": seed, "dtype": "bfloat16"}


def _read_mark(target: Path) -> dict | None:
    try:
        return json.loads((target / RANDOM_INIT_MARK).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the random checkpoint


def write_random_checkpoint(config, target: Path, seed: int, dtype=None, max_shard_size: int | str = SHARD_SIZE,
                            unit_bytes: int = UNIT_BYTES, mark: dict | None = None) -> dict:
    """Write a randomly initialized checkpoint of `config` to `target` as `save_pretrained` writes one
    (safetensors shards of at most `max_shard_size` + model.safetensors.index.json, config.json,
    generation_config.json; tied weights once; on-disk names as transformers reverts them), without
    a GPU and without the model in host memory: the model is built on the meta device, each shard
    file is laid out from the tensors' shapes, and the tensors are drawn on the CPU by the model's
    own `_init_weights`, one unit of modules (`unit_bytes`, or one larger leaf) at a time, seeded by
    `seed` and the unit's name, and written to their place in their shard.  Host memory: about one
    unit; the same seed writes the same bytes.  Written into a temporary directory renamed to
    `target` at the end, so `target` only ever holds a complete checkpoint (with `mark` written to
    RANDOM_INIT_MARK in it when given).  -> {"shards": n, "total_size": bytes, "seconds": s}."""
    import json
    import os
    import shutil
    import time

    import torch
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from vramfit.model.spec import build_meta_model

    t0 = time.perf_counter()
    target = Path(target)
    dtype = dtype or torch.bfloat16
    model = build_meta_model(config, dtype=dtype)
    state = model.state_dict()  # meta tensors: names, shapes and dtypes, no memory
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)  # tied weights once, the one from_pretrained keeps
    disk, origin = _disk_tensors(model, state)
    split = _split(disk, max_shard_size)
    total_parameters = model.num_parameters()  # before any unit is drawn (drawing unties the meta tensors)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    try:
        model.config.dtype = str(dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        files = {f: _ShardFile(tmp / f, {n: disk[n] for n in names}) for f, names in split.filename_to_tensors.items()}
        shard_of = {n: files[f] for f, names in split.filename_to_tensors.items() for n in names}
        needed = set(origin.values())
        for prefix, module, recurse in _init_units(model, unit_bytes):
            if not needed.intersection(_unit_tensor_names(prefix, module, recurse)):
                continue
            values = _draw_unit(model, prefix, module, recurse, seed)
            for name, tensor in _revert(model, {m: t for m, t in values.items() if m in needed}).items():
                shard_of[name].write(name, tensor)
            del values
        for f in files.values():
            f.close()
        if split.is_sharded:
            index = {"metadata": {"total_parameters": total_parameters, **split.metadata},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if mark is not None:
            (tmp / RANDOM_INIT_MARK).write_text(json.dumps(mark) + "\n")
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target)  # an incomplete one, from an older vramfit that wrote in place
        try:
            tmp.rename(target)
        except OSError:  # another process (a rank of the same run) wrote it first
            if not (target / "config.json").is_file():
                raise
    finally:
        for f in files.values():
            f.file.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"shards": len(split.filename_to_tensors), "total_size": split.metadata["total_size"],
            "seconds": round(time.perf_counter() - t0, 2)}


# safetensors' dtype names, in the order its files store tensors (larger alignment first, then by name)
_SAFETENSORS_DTYPES = ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3",
                       "F8_E5M2", "I8", "U8", "BOOL")


class _ShardFile:
    """One safetensors file written in place: the header and size from the tensors' meta shapes
    first (laid out as safetensors' save_file lays them out), each tensor's bytes at its offset when
    it is drawn."""

    def __init__(self, path: Path, metas: dict):
        import json
        import struct

        from safetensors.torch import _TYPES

        code = {v: k for k, v in _TYPES.items()}
        order = sorted(metas, key=lambda n: (_SAFETENSORS_DTYPES.index(code[metas[n].dtype]), n))
        header, offset, self.spans = {"__metadata__": {"format": "pt"}}, 0, {}
        for n in order:
            size = metas[n].numel() * metas[n].element_size()
            header[n] = {"dtype": code[metas[n].dtype], "shape": list(metas[n].shape),
                         "data_offsets": [offset, offset + size]}
            self.spans[n] = (offset, size)
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.start, self.todo = 8 + len(text), set(metas)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.file.truncate(self.start + offset)

    def write(self, name: str, tensor) -> None:
        import torch

        offset, size = self.spans[name]
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != size:
            raise RuntimeError(f"{name}: {data.numel()} bytes drawn for a place of {size}")
        self.file.seek(self.start + offset)
        self.file.write(data.numpy().data)
        self.todo.discard(name)

    def close(self) -> None:
        if self.todo:
            raise RuntimeError(f"{self.file.name}: no values drawn for {sorted(self.todo)[:5]}")
        self.file.close()


def _split(disk: dict, max_shard_size):
    """huggingface_hub's `split_torch_state_dict_into_shards`, as save_pretrained calls it, for meta
    tensors: views of one tensor (the experts a fused MoE tensor is reverted to) share its storage,
    so they go to one shard and count its size once, as they do when save_pretrained splits them."""
    from huggingface_hub import split_state_dict_into_shards_factory

    def root(t):
        while t._base is not None:
            t = t._base
        return t

    return split_state_dict_into_shards_factory(
        disk, get_storage_size=lambda t: root(t).numel() * root(t).element_size(),
        get_storage_id=lambda t: id(root(t)), filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size)


def _nbytes(module, recurse: bool = True) -> int:
    seen, total = set(), 0
    for t in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _init_units(model, limit: int) -> list:
    """The model cut into units drawn one at a time: the largest subtrees of at most `limit` bytes
    (a decoder layer, or its attention and MLP), each leaf module however large (an embedding),
    and a larger module's own tensors apart from its children's.  -> [(prefix, module, recurse)]."""
    units = []

    def walk(module, prefix):
        children = list(module.named_children())
        if not children or _nbytes(module) <= limit:
            units.append((prefix, module, True))
            return
        if _nbytes(module, recurse=False):
            units.append((prefix, module, False))
        for name, child in children:
            walk(child, f"{prefix}{name}.")

    walk(model, "")
    return units


def _unit_tensor_names(prefix: str, module, recurse: bool) -> list:
    return [prefix + n for n, _ in (*module.named_parameters(recurse=recurse, remove_duplicate=False),
                                    *module.named_buffers(recurse=recurse, remove_duplicate=False))]


def _draw_unit(model, prefix: str, module, recurse: bool, seed: int) -> dict:
    """The unit's tensors on the CPU, drawn by the model's own init (`_init_weights`, dispatched to
    the innermost PreTrainedModel as transformers' `initialize_weights` does, children before their
    parents, the unit's ancestors included: GPT-2's attention scales its c_proj child), from the
    global generator seeded by `seed` and the unit's name.  The unit goes back to the meta device;
    -> {full name: CPU tensor}."""
    import hashlib

    import torch
    from transformers import PreTrainedModel
    from transformers import initialization as hf_init

    chain, owners, node, owner = [], [], model, model
    for part in (prefix.rstrip(".").split(".") if prefix else []):  # the unit's ancestors, root first
        chain.append(node)
        owners.append(owner)
        node = getattr(node, part)
        owner = node if isinstance(node, PreTrainedModel) else owner  # whose _init_weights applies

    def walk(m, own):
        if recurse:
            for child in m.children():
                walk(child, child if isinstance(child, PreTrainedModel) else own)
        own._init_weights(m)

    module.to_empty(device="cpu", recurse=recurse)
    try:
        unit_seed = int.from_bytes(hashlib.sha256(f"{seed}:{prefix}".encode()).digest()[:8], "little")
        with torch.random.fork_rng(devices=[]), torch.no_grad(), hf_init.guard_torch_init_functions():
            torch.manual_seed(unit_seed)
            walk(module, owner)
            for m, own in zip(reversed(chain), reversed(owners)):  # parents last, as transformers: their init
                own._init_weights(m)  # may reach into the unit (GPT-2's c_proj); their own tensors stay meta
        return {prefix + n: t.detach() for n, t in (*module.named_parameters(recurse=recurse, remove_duplicate=False),
                                                     *module.named_buffers(recurse=recurse, remove_duplicate=False))}
    finally:
        module.to_empty(device="meta", recurse=recurse)


def _revert(model, tensors: dict) -> dict:
    """The model's tensors under their on-disk names (transformers' reverted weight conversions:
    a fused MoE expert tensor back to one tensor per expert); most models have none."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def _disk_tensors(model, state: dict) -> tuple[dict, dict]:
    """-> ({on-disk name: meta tensor} in the order save_pretrained writes them, {on-disk name: the
    model's tensor it is reverted from})."""
    whole = _revert(model, state)
    if whole is state or list(whole) == list(state):
        return state, {n: n for n in state}
    origin = {d: n for n, t in state.items() for d in _revert(model, {n: t})}
    return whole, {d: origin[d] for d in whole}
