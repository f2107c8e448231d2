"""One rank of one proof case, started by `accelerate launch` (or torch.distributed.run on CPU).

    python -m benchmarks.distributed.case CASE.json RESULT_DIR

Builds the model on the CPU with random weights from a bundled profile (the engine moves or
shards it), LoRA by peft where asked, and trains `steps` steps with transformers.Trainer on random
tokens under the engine accelerate set up from vramfit's generated config.  Measured per rank,
over the training steps only (the peaks are reset, and the cache emptied, at on_train_begin, after
the engine has wrapped the model): torch max_memory_allocated / max_memory_reserved, and NVML's
per-process device memory sampled every 5 ms (nvidia-smi's figure: CUDA context and NCCL
included).  Each rank writes RESULT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

SEED = 1234



def step_peaks(torch, cuda: bool, step: int, started: float) -> dict:
    """One Trainer step's record: its number, seconds since `started`, and (on CUDA) torch's peaks so far."""
    rec = {"step": step, "seconds": round(time.perf_counter() - started, 4)}
    if cuda:
        torch.cuda.synchronize()
        rec.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved())
    return rec

def build_model(case: dict, cuda: bool):
    import torch
    import transformers

    from vramfit.model.spec import config_from_dict, resolve_config_dict

    name, cfg = resolve_config_dict(case["model"], False)
    config = config_from_dict(cfg, name)
    config.use_cache = False
    dtype = torch.bfloat16 if case["precision"] == "bf16-true" else torch.float32
    torch.manual_seed(SEED)  # identical weights on every rank
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if case["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=case["lora_r"], lora_alpha=2 * case["lora_r"],
                                                 lora_dropout=0.05, target_modules=case["target_modules"],
                                                 task_type="CAUSAL_LM"))
    return model, config


def random_tokens(torch, n: int, seq_len: int, vocab: int):
    ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(SEED))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i].clone()}

    return Tokens()


def run(case: dict, result_dir: Path) -> dict:
    import torch
    import transformers

    from benchmarks.accuracy import probe
    from vramfit.memory.distributed import get_strategy

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not case.get("cpu")
    if cuda:
        torch.cuda.set_device(local)
    out = {"case": case, "rank": rank, "local_rank": local, "world_size": world, "status": "error"}
    t0 = time.perf_counter()
    sampler = None
    if cuda:
        from vramfit.run.tracker import nvml_index

        probe.nvml_index = nvml_index  # this rank's GPU, not cuda:0's
        sampler = probe.start_sampler()
    from benchmarks.distributed import history

    recording = history.start(torch) if cuda else False
    hist_marks = []
    model, config = build_model(case, cuda)
    st = get_strategy(case["strategy"])
    bf16 = case["precision"] == "bf16-mixed"
    kw = {"output_dir": str(result_dir / f"trainer-rank{rank}"), "max_steps": case["steps"],
          "per_device_train_batch_size": case["micro_batch"], "gradient_accumulation_steps": case["grad_accum"],
          "optim": case["optim"], "bf16": bf16, "report_to": [], "save_strategy": "no", "logging_strategy": "no",
          "eval_strategy": "no", "dataloader_num_workers": 0, "disable_tqdm": True, "seed": SEED,
          "use_cpu": not cuda, "ddp_find_unused_parameters": False}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in \
        transformers.TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
    kw[ckpt] = case["grad_ckpt"]
    if case["grad_ckpt"]:
        kw[ckpt + "_kwargs"] = {"use_reentrant": False}
    if st.engine == "fsdp":  # as vramfit's run: reduce-scatter every micro-batch
        kw["accelerator_config"] = {"gradient_accumulation_kwargs": {"sync_each_batch": True}}
    args = transformers.TrainingArguments(**kw)
    steps: list = []

    class Peaks(transformers.TrainerCallback):
        def on_train_begin(self, a, state, control, **k):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                out["after_wrap_allocated_bytes"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            hist_marks.append(("train_begin", history.now_us()))
            if sampler is not None:
                sampler.process_peak, sampler.device_delta_peak = None, 0  # from here on
            self.t = time.perf_counter()

        def on_step_begin(self, a, state, control, **k):
            hist_marks.append((f"step{state.global_step + 1}_begin", history.now_us()))

        def on_step_end(self, a, state, control, **k):
            steps.append(step_peaks(torch, cuda, state.global_step, self.t))
            hist_marks.append((f"step{state.global_step}_end", history.now_us()))
            self.t = time.perf_counter()

    trainer = transformers.Trainer(model=model, args=args, callbacks=[Peaks()],
                                   train_dataset=random_tokens(torch, case["steps"] * case["micro_batch"]
                                                               * case["grad_accum"] * world * 2,
                                                               case["seq_len"], config.vocab_size))
    trainer.train()
    out.update(status="ok", steps=steps, seconds=round(time.perf_counter() - t0, 2))
    if cuda:
        out.update(peak_allocated_bytes=max(s["peak_allocated_bytes"] for s in steps),
                   peak_reserved_bytes=max(s["peak_reserved_bytes"] for s in steps))
    if sampler is not None:
        out.update(sampler.stop())
        out["device_bytes"] = out.get("nvml_peak_bytes")
    out["environment"] = probe.environment(torch, sampler) if cuda else {"cuda": False}
    out["versions"] = probe.package_versions()
    if recording:  # VRAMFIT_MEMORY_HISTORY=<dir>: the trace, for benchmarks.distributed.history
        out["memory_history"] = history.dump(torch, os.environ["VRAMFIT_MEMORY_HISTORY"],
                                             f"{case['name']}-rank{rank}", hist_marks, {"case": case, "steps": steps})
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    case = json.loads(Path(argv[0]).read_text())
    result_dir = Path(argv[1])
    rank = int(os.environ.get("RANK", "0"))
    try:
        res = run(case, result_dir)
    except Exception as exc:  # noqa: BLE001 - recorded, not raised: the driver reports it per case
        res = {"case": case, "rank": rank, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
               "traceback": traceback.format_exc()[-4000:]}
        if "out of memory" in str(exc).lower():
            res["status"] = "oom"
    (result_dir / f"rank{rank}.json").write_text(json.dumps(res, default=str) + "\n")
    return 0 if res["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
