"""One training case, run inside a fresh (forked) child process.

Builds the model as a user's run would (random init, no download), applies the method, trains
`steps` steps with transformers.Trainer on random token ids, and records peak memory for the
whole run and per phase of each step. Phases of a step, each closed by a callback or a Trainer
override (synchronize, read the peaks, reset them):
    forward    on_step_begin -> end of compute_loss (loss included)
    backward   -> end of training_step (accelerator.backward)
    clip       -> on_pre_optimizer_step (gradient-norm clipping)
    optimizer  -> on_optimizer_step (optimizer.step; states are created in the first one)
    post_step  -> on_step_end (lr scheduler, zero_grad)
    idle       -> next on_step_begin
Outside the steps: `load` (CUDA init to model built, LoRA applied) and `setup` (Trainer init,
optimizer creation, first batch) up to the first on_step_begin; with the case's `after` (a list of
"eval", "save") the phases after train() returns (the last step's `idle` ends there), each its
own entry of phases_outside_steps:
    eval       trainer.evaluate() on `eval_rows` rows (default 2 batches) at `eval_batch` (default
               the training micro-batch, vramfit train's per_device_eval_batch_size), loss only
    save       trainer._save_checkpoint: the model (the adapter for LoRA / QLoRA), optimizer,
               scheduler, RNG states, as a checkpoint of vramfit train's run
    load_best  LoRA / QLoRA: the checkpoint's adapter loaded back (model.load_adapter), as
               load_best_model_at_end does
    save_model trainer.save_model(): vramfit train's final save

The levers (case keys, absent when off; see cases.py):
    liger      TrainingArguments(use_liger_kernel=True): Trainer applies liger-kernel to the model
               (through a PeftModel to its base model) when train() starts; the loss stays the model's
               own (liger's forward fuses lm_head and cross-entropy); with `loss: fused` as trl's
               SFTTrainer runs it: liger_kernel_config={"fused_linear_cross_entropy": False}, liger's
               layer kernels under trl's fused head. `liger_applied` says what it patched.
    packing    trl's padding-free BFD packing: each packed row built by trl.data_utils.pack_dataset
               ("bfd") from seeded random-token examples (cases.packed_example_lengths: every row exactly
               seq_len tokens, the last example of a row truncated), batched by trl's
               DataCollatorForLanguageModeling(padding_free=True): a micro-batch is ONE row of
               micro_batch * seq_len tokens with position_ids restarting at each example, labels -100 on
               each example's first token, cu_seq_lens / max_length / seq_idx as trl makes them, no
               attention_mask. Rows are taken in order (SequentialSampler), so step k trains rows
               k*micro_batch .. (k+1)*micro_batch-1. `packing` in the result records step 1's batch.
    activation_offloading  trl's get_act_offloading_ctx_manager(model=trainer.model), made at the end of
               the Trainer's __init__ and entered around each Trainer.training_step (forward and
               backward), as SFTTrainer does. `host_memory` records the pinned host memory
               (torch.cuda.host_memory_stats) and the process RSS around train().
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
import traceback

from . import cases, probe

QLORA_COMPUTE_DTYPE = "bfloat16"
SEED = 1234
MEMORY_STAT_KEYS = ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free",
                    "segment.all.peak", "active_bytes.all.peak", "inactive_split_bytes.all.peak")


class PhaseRecorder:
    """Splits the run into phases and keeps each phase's peak allocated/reserved bytes."""

    def __init__(self, torch):
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.phase = "load"
        self.outside_steps: dict[str, dict] = {}
        self.steps: list[dict] = []
        self.peak_allocated = 0 if self.cuda else None
        self.peak_reserved = 0 if self.cuda else None
        self._t0 = 0.0
        self.after_steps = False  # phases from here on are the run's, outside the steps

    def close(self, next_phase: str) -> dict:
        """End the current phase: record its peaks, reset the counters, start `next_phase`."""
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            record = {
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                "allocated_end_bytes": torch.cuda.memory_allocated(),
                "reserved_end_bytes": torch.cuda.memory_reserved(),
            }
            torch.cuda.reset_peak_memory_stats()
            self.peak_allocated = max(self.peak_allocated, record["peak_allocated_bytes"])
            self.peak_reserved = max(self.peak_reserved, record["peak_reserved_bytes"])
        else:
            record = dict.fromkeys(("peak_allocated_bytes", "peak_reserved_bytes",
                                    "allocated_end_bytes", "reserved_end_bytes"))
        if self.steps and not self.after_steps:
            self.steps[-1]["phases"][self.phase] = record
        else:
            self.outside_steps[self.phase] = record
        self.phase = next_phase
        return record

    def begin_step(self) -> None:
        self.close("forward")
        allocated = self.torch.cuda.memory_allocated() if self.cuda else None
        self.steps.append({"step": len(self.steps), "allocated_start_bytes": allocated,
                           "phases": {}, "seconds": None, "loss": None})
        self._t0 = time.perf_counter()

    def end_step(self) -> None:
        self.close("idle")
        self.steps[-1]["seconds"] = time.perf_counter() - self._t0


def make_trainer_class(transformers, recorder: PhaseRecorder, fused: bool = False,
                       activation_offloading: bool = False, sequential: bool = False):
    class MeasuredTrainer(transformers.Trainer):
        maybe_activation_offload_context = contextlib.nullcontext()

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if activation_offloading:  # as SFTTrainer.__init__ ends
                from trl.models import get_act_offloading_ctx_manager

                self.maybe_activation_offload_context = get_act_offloading_ctx_manager(model=self.model)

        def _get_train_sampler(self, *args, **kwargs):
            if sequential:  # packed rows in the dataset's order: step k's position_ids are known
                import torch

                return torch.utils.data.SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if fused:  # SFTTrainer's path: per-token log-probs from the fused head, no logits
                outputs = model(**inputs, fused_lm_head=True)
                loss = outputs.loss
                out = (loss, outputs) if return_outputs else loss
            else:
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            if not model.training:  # evaluation: no step phase to close
                return out
            loss = out[0] if return_outputs else out
            if recorder.steps:
                recorder.steps[-1]["loss"] = float(loss.detach().float())
            recorder.close("backward")
            return out

        def training_step(self, *args, **kwargs):
            with self.maybe_activation_offload_context:  # SFTTrainer.training_step
                loss = super().training_step(*args, **kwargs)
            recorder.close("clip")
            return loss

    return MeasuredTrainer


def make_callback(transformers, recorder: PhaseRecorder, result: dict):
    class PhaseCallback(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if not recorder.steps:
                result["gradient_checkpointing"] = checkpointing_info(model)
                if args.use_liger_kernel:
                    result["liger_applied"] = liger_info(model)
            recorder.begin_step()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            recorder.close("optimizer")
            if len(recorder.steps) == 1:
                # LoRA + checkpointing without input grads would train nothing: check it did.
                result["trainable_params_without_grad"] = sum(
                    1 for p in model.parameters() if p.requires_grad and p.grad is None)

        def on_optimizer_step(self, args, state, control, **kwargs):
            recorder.close("post_step")

        def on_step_end(self, args, state, control, **kwargs):
            recorder.end_step()

    return PhaseCallback()


def checkpointing_info(model) -> dict | None:
    """Which checkpoint function and kwargs (use_reentrant) transformers ended up using."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and getattr(module, "gradient_checkpointing", False):
            inner = getattr(func, "func", func)
            return {"function": f"{inner.__module__}.{getattr(inner, '__qualname__', inner)}",
                    "kwargs": {k: repr(v) if not isinstance(v, (bool, int, float, str, type(None)))
                               else v for k, v in getattr(func, "keywords", {}).items()}}
    return None


def liger_info(model) -> dict:
    """What liger-kernel patched: modules whose forward comes from liger_kernel, by class, and the
    causal LM's forward (liger's fused linear cross-entropy forward when applied)."""
    patched: dict[str, int] = {}
    causal_lm_forward = None
    for module in model.modules():
        forward = getattr(module, "forward", None)
        name = getattr(getattr(forward, "__func__", forward), "__module__", "") or ""
        if name.startswith("liger_kernel"):
            patched[type(module).__name__] = patched.get(type(module).__name__, 0) + 1
        kind = type(module).__name__
        if causal_lm_forward is None and kind.endswith("ForCausalLM") and not kind.startswith("Peft"):
            causal_lm_forward = name
    return {"patched_modules": patched, "causal_lm_forward": causal_lm_forward}


def packed_dataset(torch, case: dict, vocab_size: int):
    """trl's packing of seeded random-token examples (see the module docstring and
    cases.packed_example_lengths): a Dataset of packed rows (input_ids, labels, seq_lengths, as
    pack_dataset returns them) in training order."""
    import datasets
    from trl.data_utils import pack_dataset

    datasets.disable_progress_bars()
    generator = torch.Generator().manual_seed(SEED)
    rows = []
    for lengths in cases.packed_example_lengths(case):
        examples = [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]
        # one pack_dataset call per row: examples summing to seq_len make exactly one BFD bin
        packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": examples, "labels": examples}),
                              case["seq_len"], "bfd")
        if len(packed) != 1 or list(packed[0]["seq_lengths"]) != lengths:
            raise RuntimeError(f"trl packed {lengths} into {packed['seq_lengths']}")
        rows.append(packed[0])

    class PackedRows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    return PackedRows()


class RecordingCollator:
    """trl's padding-free collator; the first batch it makes (step 1's) is described in `record`."""

    def __init__(self, collator, case: dict, record: dict):
        self.collator, self.case, self.record = collator, case, record

    def __call__(self, examples):
        batch = self.collator(examples)
        if not self.record:
            position_ids = batch["position_ids"][0]
            starts = (position_ids == 0).nonzero().flatten().tolist()
            self.record.update({
                "strategy": "bfd", "example_len": self.case["example_len"], "padding_free": True,
                "step1_example_lengths": [list(e["seq_lengths"]) for e in examples],
                "step1_position_ids_starts": starts,
                "step1_shape": list(batch["input_ids"].shape),
                "step1_label_tokens": int((batch["labels"] != -100).sum()),
                "step1_keys": sorted(batch),
                "step1_matches_cases": position_ids.tolist() == cases.packed_position_ids(self.case, 0),
            })
        return batch


def packing_collator(config_dict: dict, case: dict, record: dict):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad = config_dict.get("pad_token_id")
    collator = DataCollatorForLanguageModeling(pad_token_id=pad if isinstance(pad, int) else 0,
                                               padding_free=True)
    return RecordingCollator(collator, case, record)


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_memory(torch, cuda: bool) -> dict:
    """Pinned host memory of torch's caching host allocator (torch.cuda.host_memory_stats, where
    this torch has it) and the process's resident set (VmRSS, and VmHWM its peak)."""
    out: dict = {"rss_bytes": _proc_status_bytes("VmRSS"), "rss_peak_bytes": _proc_status_bytes("VmHWM")}
    if cuda and hasattr(torch.cuda, "host_memory_stats"):
        try:
            stats = torch.cuda.host_memory_stats()
        except Exception as error:  # noqa: BLE001 - recorded, not fatal
            out["pinned_error"] = repr(error)[:200]
        else:
            out["pinned_stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and (
                "bytes" in k or k.startswith(("allocations", "allocated.", "segment", "num_host")))}
            # pinned memory held from CUDA (in use + cached): "reserved_bytes" in torch's first host
            # statistics (<= 2.10 docs), "allocated_bytes" once they were renamed ("active_bytes" in use)
            held = "reserved_bytes" if "reserved_bytes.peak" in stats else "allocated_bytes"
            used = "active_bytes" if held == "allocated_bytes" else "allocated_bytes"
            out["pinned_schema"] = held
            out["pinned_peak_bytes"] = stats.get(f"{held}.peak")
            out["pinned_current_bytes"] = stats.get(f"{held}.current")
            out["pinned_in_use_peak_bytes"] = stats.get(f"{used}.peak")
    return out


def lever_versions(case: dict) -> dict:
    from vramfit.versions import installed

    return installed("trl", "datasets", *(("liger_kernel", "triton") if case.get("liger") else ()))


def random_tokens_dataset(torch, n: int, seq_len: int, vocab_size: int):
    """`n` samples of exactly `seq_len` random ids; labels = input_ids, no padding."""
    ids = torch.randint(0, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(SEED))

    class RandomTokens(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]),
                    "labels": ids[i].clone()}

    return RandomTokens()


def build_config(transformers, config_dict: dict):
    rest = dict(config_dict)
    config = transformers.AutoConfig.for_model(rest.pop("model_type"), **rest)
    config.use_cache = False
    return config


def build_model(case: dict, config_dict: dict, checkpoint_dir: str | None):
    import torch
    import transformers

    dtype = getattr(torch, cases.PRECISION_SETUP[case["precision"]][0])
    if case["method"] == "qlora":
        import peft

        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, QLORA_COMPUTE_DTYPE))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint_dir, quantization_config=quant, dtype=dtype,
            attn_implementation=case["attn"], device_map={"": 0})
        model.config.use_cache = False
        if case.get("kbit_prep", True):
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=case["grad_ckpt"])
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(SEED)
        with torch.device(device):  # init straight on the GPU: a 7B model in seconds
            model = transformers.AutoModelForCausalLM.from_config(
                build_config(transformers, config_dict), dtype=dtype,
                attn_implementation=case["attn"])
    if case.get("loss") == "fused":  # what trl's SFTTrainer does to the model, before LoRA
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    if case["method"] in ("lora", "qlora"):
        import peft

        from vramfit.planner.convert import linear_targets

        targets = case["target_modules"]
        if targets == "all-linear":  # as the launcher does (peft's all-linear reaches fused experts)
            targets = linear_targets(model) or targets
        lora = peft.LoraConfig(r=case["lora_r"], lora_alpha=case["lora_alpha"],
                               lora_dropout=case["lora_dropout"],
                               target_modules=targets, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lora)
        if case.get("trl_adapter_cast"):  # QLoRA under trl's loss: SFTTrainer casts the adapters to bf16
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        if case["method"] == "qlora" and not case.get("kbit_prep", True) and case["grad_ckpt"]:
            model.enable_input_require_grads()  # SFTTrainer, with a peft model and checkpointing
    return model


def param_census(model) -> dict:
    """Parameter counts (as peft prints them for LoRA) and bytes per dtype of params and buffers."""
    by_dtype: dict[str, int] = {}
    for p in model.parameters():
        by_dtype[str(p.dtype)] = by_dtype.get(str(p.dtype), 0) + p.numel() * p.element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"total_params": int(total), "trainable_params": int(trainable),
            "trainable_bytes": int(trainable_bytes), "param_bytes_by_dtype": by_dtype,
            "buffer_bytes": int(buffers), "model_class": type(model).__name__,
            "param_device": str(next(model.parameters()).device)}


def training_arguments(transformers, case: dict, output_dir: str, cuda: bool):
    _, bf16, fp16 = cases.PRECISION_SETUP[case["precision"]]
    return transformers.TrainingArguments(
        output_dir=output_dir, max_steps=case["steps"],
        per_device_train_batch_size=case["micro_batch"], gradient_accumulation_steps=1,
        per_device_eval_batch_size=eval_batch(case),
        optim=case["optim"], bf16=bf16, fp16=fp16, gradient_checkpointing=case["grad_ckpt"],
        report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, seed=SEED, use_cpu=not cuda,
        **lever_arguments(case))


def lever_arguments(case: dict) -> dict:
    """TrainingArguments of the levers, only those switched on (older cases build the same args)."""
    out = {}
    if case.get("liger"):
        out["use_liger_kernel"] = True
        if case.get("loss") == "fused":  # as trl's SFTTrainer: liger's layer kernels only, trl's fused head the loss
            out["liger_kernel_config"] = {"fused_linear_cross_entropy": False}
    if case.get("packing"):  # keep seq_lengths for trl's collator (the model never sees it)
        out["remove_unused_columns"] = False
    return out


def eval_batch(case: dict) -> int:
    return case.get("eval_batch") or case["micro_batch"]


def after_steps(trainer, case: dict, recorder: PhaseRecorder, out_dir: str, result: dict) -> None:
    """The case's phases after train() (`after`: "eval", "save"), each closed with its peaks into
    phases_outside_steps; the adapter's reload (load_best) and the final save_model with "save"."""
    after = case.get("after") or []
    recorder.close("eval" if "eval" in after else "save")  # the last step's idle, the rest of train() with it
    recorder.after_steps = True
    seconds = {}
    if "eval" in after:
        t = time.perf_counter()
        metrics = trainer.evaluate()
        seconds["eval"] = time.perf_counter() - t
        result["eval_loss"] = metrics.get("eval_loss")
        recorder.close("save" if "save" in after else "done")
    if "save" in after:
        t = time.perf_counter()
        trainer._save_checkpoint(trainer.model, trial=None)
        seconds["save"] = time.perf_counter() - t
        checkpoint = os.path.join(out_dir, f"checkpoint-{trainer.state.global_step}")
        result["checkpoint_files"] = sorted(os.listdir(checkpoint))
        model = trainer.model
        if case["method"] != "full":  # a PeftModel
            recorder.close("load_best")
            t = time.perf_counter()
            model.load_adapter(checkpoint, model.active_adapters[0])  # as Trainer._load_best_model
            seconds["load_best"] = time.perf_counter() - t
        recorder.close("save_model")
        t = time.perf_counter()
        trainer.save_model(os.path.join(out_dir, "final"))
        seconds["save_model"] = time.perf_counter() - t
        recorder.close("done")
    result["after_seconds"] = seconds


def cuda_stats(torch) -> dict | None:
    if not torch.cuda.is_available():
        return None
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k) for k in MEMORY_STAT_KEYS}


def run(case: dict, report=lambda partial: None, checkpoint_dir: str | None = None) -> dict:
    """Run one training case in this (fresh) process; returns the result dict. Never raises."""
    started = time.perf_counter()
    conf = cases.ALLOCATORS[case["allocator"]]
    if conf:  # before CUDA is initialised in this process
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
    import torch
    import transformers

    result: dict = {"status": "error", "phase": "init"}
    sampler = probe.start_sampler() if torch.cuda.is_available() else None
    recorder = PhaseRecorder(torch)
    try:
        if recorder.cuda:
            torch.cuda.init()
            torch.empty(1, device="cuda")
            if case.get("memory_fraction"):
                torch.cuda.set_per_process_memory_fraction(case["memory_fraction"], 0)
            elif case.get("memory_limit_bytes"):  # a cap in bytes, as the plan proof enforces a budget
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(case["memory_limit_bytes"] / total, 0)
            if os.environ.get("VRAMFIT_MEMORY_HISTORY"):  # every allocation and free, for memory_history.py
                # VRAMFIT_MEMORY_HISTORY_STACKS=none: no Python frames (gpt2-medium's checkpointed dropout
                # failed with a SystemError while they were gathered on the autograd thread)
                frames = os.environ.get("VRAMFIT_MEMORY_HISTORY_STACKS", "python") != "none"
                torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python",
                                                         context="all" if frames else None)
            result["after_cuda_init"] = {**probe.torch_memory(torch), **sampler.read()}
        result["environment"] = probe.environment(torch, sampler)
        config_dict = cases.model_config_dict(case)
        result["config"] = config_dict
        t = time.perf_counter()
        model = build_model(case, config_dict, checkpoint_dir)
        result["load_seconds"] = time.perf_counter() - t
        result["params"] = param_census(model)
        recorder.close("setup")
        load = recorder.outside_steps["load"]
        result["after_load"] = {**probe.torch_memory(torch), **(sampler.read() if sampler else {}),
                                "peak_allocated_bytes": load["peak_allocated_bytes"],
                                "peak_reserved_bytes": load["peak_reserved_bytes"]}
        report(dict(result, phase="setup"))

        n = case["steps"] * case["micro_batch"]
        collator = None
        if case.get("packing"):
            dataset = packed_dataset(torch, case, config_dict["vocab_size"])
            result["packing"] = {}
            collator = packing_collator(config_dict, case, result["packing"])
        else:
            dataset = random_tokens_dataset(torch, n, case["seq_len"], config_dict["vocab_size"])
        if any(case.get(k) for k in ("liger", "packing", "activation_offloading")):
            result["lever_versions"] = lever_versions(case)
        eval_dataset = None
        if "eval" in (case.get("after") or []):
            rows = case.get("eval_rows") or 2 * eval_batch(case)
            eval_dataset = random_tokens_dataset(torch, rows, case["seq_len"], config_dict["vocab_size"])
        with tempfile.TemporaryDirectory() as out_dir:
            args = training_arguments(transformers, case, out_dir, recorder.cuda)
            trainer_class = make_trainer_class(
                transformers, recorder, fused=case.get("loss") == "fused",
                activation_offloading=bool(case.get("activation_offloading")),
                sequential=bool(case.get("packing")))
            trainer = trainer_class(
                model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                data_collator=collator, callbacks=[make_callback(transformers, recorder, result)])
            if recorder.cuda and hasattr(torch.cuda, "reset_peak_host_memory_stats"):
                torch.cuda.reset_peak_host_memory_stats()
            result["host_memory"] = {"before_train": host_memory(torch, recorder.cuda)}
            t = time.perf_counter()
            trainer.train()
            result["train_seconds"] = time.perf_counter() - t
            result["host_memory"]["after_train"] = after = host_memory(torch, recorder.cuda)
            result["host_pinned_peak_bytes"] = after.get("pinned_peak_bytes")
            before_rss = result["host_memory"]["before_train"]["rss_bytes"]
            if after["rss_peak_bytes"] is not None and before_rss is not None:
                result["host_rss_growth_bytes"] = after["rss_peak_bytes"] - before_rss
            if case.get("after"):
                after_steps(trainer, case, recorder, out_dir, result)
        if not case.get("after"):
            recorder.close("done")
        result["status"] = "ok"
    except torch.OutOfMemoryError as error:
        result["status"] = "oom"
        result["oom_phase"] = recorder.phase
        result["oom_step"] = len(recorder.steps) - 1 if recorder.steps else None
        message = str(error)
        result["oom_message"] = message[:600]
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", message)
        result["oom_tried_to_allocate"] = asked.group(1) if asked else None
        recorder.close("after_oom")
    except Exception:
        result["status"] = "error"
        result["error_phase"] = recorder.phase
        result["traceback"] = traceback.format_exc()[-3000:]
    result.pop("phase", None)
    if recorder.cuda and os.environ.get("VRAMFIT_MEMORY_HISTORY"):
        from . import memory_history

        result["memory_history"] = memory_history.dump(torch, os.environ["VRAMFIT_MEMORY_HISTORY"], case)
    result.update(summary(torch, recorder, case))
    if sampler:
        result.update(sampler.stop())
    result["seconds"] = time.perf_counter() - started
    return result


def summary(torch, recorder: PhaseRecorder, case: dict) -> dict:
    step_seconds = [s["seconds"] for s in recorder.steps if s["seconds"] is not None]
    later = step_seconds[1:]
    tokens = case["seq_len"] * case["micro_batch"]
    return {
        "peak_allocated_bytes": recorder.peak_allocated,
        "peak_reserved_bytes": recorder.peak_reserved,
        "phases_outside_steps": recorder.outside_steps,
        "steps": recorder.steps,
        "step_seconds": step_seconds,
        "tokens_per_second": tokens * len(later) / sum(later) if later else None,
        "cuda_memory_stats": cuda_stats(torch),
    }


def save_random_checkpoint(case: dict, directory: str) -> dict:
    """Random-init bf16 checkpoint of the case's model (built on the GPU), for QLoRA to load.

    Runs in its own child, so the QLoRA case loads it the way a user loads a Hub checkpoint.
    """
    import torch
    import transformers

    started = time.perf_counter()
    config = build_config(transformers, cases.model_config_dict(case))
    # a checkpoint, not a training model (the QLoRA load turns the cache off again): transformers 5.17
    # refuses to save Gemma-2's generation config (cache_implementation "hybrid") with use_cache off
    config.use_cache = True
    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="20GB")
    open(os.path.join(directory, "COMPLETE"), "w").close()
    return {"status": "ok", "seconds": time.perf_counter() - started}
