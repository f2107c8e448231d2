"""Per-rank memory of DDP and FSDP at N GPUs, measured on ONE GPU through torch's fake process group.

    python -m benchmarks.distributed.fake_pg --grid issue21 --out $OUT/fake.jsonl [--jobs 4] [--skip-done]
    python -m benchmarks.distributed.fake_pg --grid issue21 --list
    python -m benchmarks.distributed.fake_pg --grid cpu --out /tmp/fake.jsonl    # CPU: the same code path

One fresh process per case runs as rank r of N: `dist.init_process_group("fake", rank=r, world_size=N,
store=FakeStore())` (torch.testing._internal.distributed.fake_pg, what torch's own FSDP2 memory
tracker is tested with).  Every collective returns at once without moving data, and every buffer
DDP and FSDP allocate for it (gradient buckets, all-gather and reduce-scatter buffers, the sharded
parameters, gradients and optimizer states) is a real allocation, so rank r's torch peaks are the
real ones.  NCCL's own buffers are not: they are outside torch's allocator and outside the fake
group (vramfit.memory.distributed.NCCL_DEVICE_BYTES, a sourced constant, prices them).

The case trains through `vramfit train --gpus N`'s own code path as far as one process can follow
it: vramfit.run.launch.write_configs writes the accelerate config, accelerate's own launcher code
turns it into the environment (`launch_env`), the model is vramfit.run.model.build_model's (QLoRA:
vramfit.run.launch._rank_model's), the LoRA config and SFTConfig are vramfit.run.train's, and
trl's SFTTrainer trains it (loss "fused": trl's fused LM head).  Loss "logits" is transformers'
Trainer on the same model and arguments (the model's own loss from full logits).

Independent cases run side by side (--jobs, packed under --gpu-budget-gib by their predicted device
bytes): each process's torch peaks and NVML's per-process figure are its own.  A case that fails
with an OOM while others ran is retried alone at the end.  Every line is flushed and fsynced.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30
SEED = 42
CASE_TIMEOUT_S = 420


# --------------------------------------------------------------------------- cases


def case(model, method, precision, strategy, world_size, grad_ckpt, loss, rank=0, overrides=None,
         seq_len=1024, micro_batch=2, grad_accum=1, steps=3, optim="adamw_torch", **kw) -> dict:
    c = {"model": model, "overrides": dict(overrides or {}), "method": method, "precision": precision,
         "strategy": strategy, "world_size": world_size, "rank": rank, "grad_ckpt": grad_ckpt, "loss": loss,
         "seq_len": seq_len, "micro_batch": micro_batch, "grad_accum": grad_accum, "steps": steps, "optim": optim,
         **kw}
    c["name"] = case_name(c)
    return c


def case_name(c: dict) -> str:
    ov = "".join(f"[{k}={v}]" for k, v in sorted(c["overrides"].items()))
    return (f"{c['model']}{ov}-{c['method']}-{c['precision']}-{c['strategy']}-n{c['world_size']}r{c['rank']}"
            f"-{'ckpt' if c['grad_ckpt'] else 'nockpt'}-{c['loss']}-s{c['seq_len']}b{c['micro_batch']}")


# 3 architectures; the >= 7B one is Llama-3.1-8B's layers and 128k-vocabulary head with 8 of its 32
# decoder layers (time: a random 8B model is initialised on the CPU and, for QLoRA, written to disk
# per run; the per-layer and head terms are the 8B's own).
MODELS = (("llama-3.2-1b", {}), ("qwen2.5-1.5b", {}), ("llama-3.1-8b", {"num_hidden_layers": 8}))
FULL_PRECISION = {"llama-3.2-1b": "bf16-mixed", "qwen2.5-1.5b": "bf16-true", "llama-3.1-8b": "bf16-true"}


def issue21_grid() -> list:
    """3 models x full / LoRA / QLoRA x N in {2, 4, 8} x {ddp, fsdp-full}: 54 runs, plus fsdp-grad-op
    at N=4 for each model and method (9).  Checkpointing and the loss alternate so that every
    (strategy, method, N) meets both settings of each across the models."""
    out = []
    for mi, (model, ov) in enumerate(MODELS):
        for ki, method in enumerate(("full", "lora", "qlora")):
            precision = FULL_PRECISION[model] if method == "full" else "bf16-true"
            for ni, n in enumerate((2, 4, 8)):
                for si, strategy in enumerate(("ddp", "fsdp-full")):
                    k = mi + ki + ni + si
                    # QLoRA under FSDP runs only with autocast (transformers#30914; the launcher says so)
                    prec = "bf16-amp" if method == "qlora" and strategy != "ddp" else precision
                    out.append(case(model, method, prec, strategy, n, grad_ckpt=bool(k % 2),
                                    loss=("fused", "logits")[(k // 2 + mi) % 2], overrides=ov))
            k = mi + ki
            out.append(case(model, method, "bf16-amp" if method == "qlora" else precision, "fsdp-grad-op", 4, grad_ckpt=bool(k % 2),
                            loss=("logits", "fused")[k % 2], overrides=ov))
    return out


def cpu_grid() -> list:
    """The same path on the CPU with a tiny model, fp32 (no GPU: no peaks, only that it trains)."""
    ov = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 256, "head_dim": 16}
    return [case("llama-3.2-1b", m, "32-true", st, n, grad_ckpt=ck, loss=loss, overrides=ov, seq_len=32,
                 micro_batch=1, steps=2, cpu=True)
            for m, st, n, ck, loss in (("full", "ddp", 2, False, "logits"), ("lora", "ddp", 4, True, "fused"),
                                       ("full", "fsdp-full", 2, False, "fused"),
                                       ("lora", "fsdp-grad-op", 4, True, "logits"))]


def zero_grid() -> list:
    """DeepSpeed ZeRO through the fake group, where deepspeed imports (its own AdamW, bf16-mixed)."""
    m, p = "llama-3.2-1b", "bf16-mixed"
    return [case(m, "full", p, "zero2", 4, False, "logits"), case(m, "full", p, "zero3", 4, False, "fused"),
            case(m, "full", p, "zero3", 8, True, "logits"), case(m, "lora", p, "zero3", 4, True, "fused")]


def recipe_grid() -> list:
    """The standard recipe (bf16 weights + bf16 autocast, bf16-amp) under DDP and FSDP2 at N = 4, and
    the last rank of uneven FSDP shards (N = 8: 1,235,814,400 / 8 and the 8B's 128,256-row head
    split unevenly by rows)."""
    out = []
    for model, ov in MODELS:
        for method in ("full", "lora", "qlora"):
            for strategy in ("ddp", "fsdp-full"):
                out.append(case(model, method, "bf16-amp", strategy, 4, grad_ckpt=True, loss="fused", overrides=ov))
        out.append(case(model, "full", "bf16-amp", "fsdp-full", 8, grad_ckpt=True, loss="logits", overrides=ov, rank=7))
    return out


# the runs whose memory history the device script records (benchmarks/distributed/history_device.sh):
# the four ZeRO runs and the FSDP runs with the worst reserved error of 2026-12-07 (QLoRA's FSDP1 under,
# full fine-tuning over)
HISTORY = ("llama-3.2-1b-full-bf16-mixed-zero2-n4r0-nockpt-logits-s1024b2",
           "llama-3.2-1b-full-bf16-mixed-zero3-n4r0-nockpt-fused-s1024b2",
           "llama-3.2-1b-full-bf16-mixed-zero3-n8r0-ckpt-logits-s1024b2",
           "llama-3.2-1b-lora-bf16-mixed-zero3-n4r0-ckpt-fused-s1024b2",
           "llama-3.2-1b-full-bf16-mixed-fsdp-full-n4r0-nockpt-logits-s1024b2",
           "llama-3.2-1b-qlora-bf16-amp-fsdp-full-n4r0-ckpt-fused-s1024b2")


# FSDP2 LoRA, the worst of the 2026-12-07 runs: the untied 8B over by 8% allocated / 33% reserved, the 1B under
HISTORY_LORA = ("llama-3.1-8b[num_hidden_layers=8]-lora-bf16-amp-fsdp-full-n4r0-ckpt-fused-s1024b2",
                "llama-3.2-1b-lora-bf16-amp-fsdp-full-n4r0-ckpt-fused-s1024b2",
                "llama-3.1-8b[num_hidden_layers=8]-lora-bf16-true-fsdp-full-n2r0-nockpt-fused-s1024b2",
                "llama-3.1-8b[num_hidden_layers=8]-lora-bf16-true-fsdp-grad-op-n4r0-ckpt-fused-s1024b2",
                "qwen2.5-1.5b-lora-bf16-true-fsdp-full-n2r0-ckpt-fused-s1024b2")


# DDP full fine-tuning, reserved over by 5-16% (the wrap's broadcast and gradient buckets against the step's reuse)
HISTORY_DDP = ("qwen2.5-1.5b-full-bf16-true-ddp-n2r0-ckpt-logits-s1024b2",
               "qwen2.5-1.5b-full-bf16-amp-ddp-n4r0-ckpt-fused-s1024b2",
               "llama-3.2-1b-full-bf16-amp-ddp-n4r0-ckpt-fused-s1024b2")


# FSDP2 full fine-tuning, the worst reserved errors after the 07h re-report (qwen N = 4 ckpt +7.4%, 8B N = 2 +5.8%,
# qwen N = 2 +4.2%, 8B N = 4 no ckpt -4.0%: where the step's gathered parameters, unsharded gradients and the optimizer
# step's buffers go), and FSDP2 LoRA at N = 8 without checkpointing (-2.6%)
HISTORY_FSDP_FULL = ("qwen2.5-1.5b-full-bf16-true-fsdp-full-n4r0-ckpt-fused-s1024b2",
                     "llama-3.1-8b[num_hidden_layers=8]-full-bf16-true-fsdp-full-n2r0-ckpt-logits-s1024b2",
                     "llama-3.1-8b[num_hidden_layers=8]-full-bf16-true-fsdp-full-n4r0-nockpt-fused-s1024b2",
                     "qwen2.5-1.5b-full-bf16-true-fsdp-full-n2r0-nockpt-fused-s1024b2",
                     "llama-3.2-1b-lora-bf16-true-fsdp-full-n8r0-nockpt-fused-s1024b2")


# FSDP QLoRA / LoRA N = 8, the worst reserved errors of the 07i re-report (-9.7%, -7.2%, +6.7%, +5.2%, -3.5%)
HISTORY_QLORA = ("llama-3.1-8b[num_hidden_layers=8]-qlora-bf16-amp-fsdp-full-n8r0-ckpt-logits-s1024b2",
                 "qwen2.5-1.5b-qlora-bf16-amp-fsdp-full-n4r0-ckpt-logits-s1024b2",
                 "llama-3.1-8b[num_hidden_layers=8]-qlora-bf16-amp-fsdp-grad-op-n4r0-nockpt-logits-s1024b2",
                 "llama-3.1-8b[num_hidden_layers=8]-qlora-bf16-amp-fsdp-full-n4r0-nockpt-logits-s1024b2",
                 "llama-3.1-8b[num_hidden_layers=8]-lora-bf16-true-fsdp-full-n8r0-nockpt-logits-s1024b2")


def history_grid(names=HISTORY) -> list:
    every = {c["name"]: c for c in issue21_grid() + recipe_grid() + zero_grid()}
    return [every[n] for n in names]


GRIDS = {"issue21": issue21_grid, "cpu": cpu_grid, "zero": zero_grid, "recipe": recipe_grid,
         "history": history_grid, "history-lora": lambda: history_grid(HISTORY_LORA),
         "history-ddp": lambda: history_grid(HISTORY_DDP), "history-qlora": lambda: history_grid(HISTORY_QLORA),
         "history-fsdp-full": lambda: history_grid(HISTORY_FSDP_FULL)}


def setup_of(c: dict):
    from vramfit.memory.setup import make_setup

    lora = {} if c["method"] == "full" else {"lora_r": c.get("lora_r", 16)}
    if c.get("target_modules"):
        lora["target_modules"] = c["target_modules"]
    return make_setup(method=c["method"], precision=c["precision"], optim=c["optim"], seq_len=c["seq_len"],
                      micro_batch=c["micro_batch"], grad_accum=c["grad_accum"], grad_ckpt=c["grad_ckpt"],
                      loss=c["loss"], padded=False, **lora)


def predicted(c: dict) -> dict:
    """The current model's per-rank figures for a case."""
    from vramfit.memory.distributed import estimate_distributed
    from vramfit.model.spec import load_spec

    spec = load_spec(c["model"], overrides=c["overrides"] or None)
    return estimate_distributed(spec, setup_of(c), c["strategy"], c["world_size"]).to_json()


# --------------------------------------------------------------------------- one case (child process)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<bos>", "<eos>", "<pad>"] + [f"w{i}" for i in range(60)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def _rows(c: dict, vocab: int) -> list:
    import torch

    n = c["steps"] * c["micro_batch"] * c["grad_accum"] * c["world_size"] * 2
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(4, vocab, (n, c["seq_len"]), generator=g).tolist()


def _source(c: dict):
    from dataclasses import replace

    from vramfit.model.spec import load_spec
    from vramfit.run.model import resolve_model

    src = resolve_model(c["model"], "random")
    if c["overrides"]:
        src = replace(src, config={**src.config, **c["overrides"]}, spec=load_spec(c["model"], overrides=c["overrides"]))
    return src


def make_checkpoint(c: dict, scratch: Path) -> str:
    """QLoRA loads 4-bit weights from a checkpoint (bitsandbytes quantizes while loading): write the
    random bf16 one once per model, as vramfit train --init random does; the other methods load it
    too (on the CPU, in their own dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vramfit.model.spec import config_from_dict

    source = _source(c)
    target = scratch / "random-init"
    if not (target / "config.json").is_file():  # on the lent GPU: a random 8B model in seconds
        torch.manual_seed(SEED)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config_from_dict(source.config, source.name), dtype=torch.bfloat16)
        model.save_pretrained(target)
    return str(target)


def run_one(c: dict, work: Path, scratch: Path | None) -> dict:
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from vramfit.memory.distributed import get_strategy
    from vramfit.run.launch import launch_env, write_configs

    cuda = torch.cuda.is_available() and not c.get("cpu")
    n, r = c["world_size"], c["rank"]
    st = get_strategy(c["strategy"])
    s = setup_of(c)
    out = {"name": c["name"], "case": c, "status": "error", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # what `accelerate launch --config_file <vramfit's config>` puts in each process's environment
    config = write_configs(work / "launch", c["strategy"], n, s, cpu=False)
    env = launch_env(config)
    out["launch_env"] = env
    env.update(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29999")
    os.environ.update(env)
    sampler = None
    if cuda:
        torch.cuda.set_device(0)
        from benchmarks.accuracy import probe

        sampler = probe.start_sampler()
    from benchmarks.distributed import history

    recording = history.start(torch) if cuda else False
    hist_marks = []
    dist.init_process_group("fake", rank=r, world_size=n, store=FakeStore())
    _ddp_local_hook(torch)
    source = _source(c)
    t0 = time.perf_counter()
    if s.method == "qlora":
        from vramfit.run.launch import _rank_model

        model = _rank_model(source, s, c["strategy"], 0, cuda, SEED, scratch)
    else:
        from vramfit.run.model import build_model

        # on the CPU, as run_rank (the engine moves it), from the per-model random checkpoint when the
        # driver wrote one (from_pretrained of it is what --init random's from_config does, in seconds)
        ckpt = scratch / "random-init" if scratch else None
        base = str(ckpt) if ckpt and (ckpt / "config.json").is_file() else None
        model = build_model(source, s, False, SEED, base, work)
    out["load_seconds"] = round(time.perf_counter() - t0, 2)
    import transformers

    from vramfit.run.train import RunOptions, lora_config, sft_config

    opts = RunOptions(out_dir=str(work), init="random", max_steps=c["steps"], warmup=0, save_steps=0, val_split=0,
                      max_seq_len=c["seq_len"], live=False)
    args = sft_config(s, opts, work / "checkpoints", c["steps"], False, cuda, False)
    if st.engine == "fsdp":  # as run_rank
        args.accelerator_config.gradient_accumulation_kwargs = {"sync_each_batch": True}
    args.save_strategy = "no"
    args.ddp_find_unused_parameters = False
    args.logging_steps = 1
    steps, marks = [], {}
    from benchmarks.distributed.case import step_peaks

    class Peaks(transformers.TrainerCallback):
        def on_train_begin(self, a, state, control, **k):
            if cuda:
                torch.cuda.synchronize()
                marks.update(before_train_peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                             before_train_peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                             after_wrap_allocated_bytes=torch.cuda.memory_allocated(),
                             after_wrap_reserved_bytes=torch.cuda.memory_reserved())
                torch.cuda.reset_peak_memory_stats()
            hist_marks.append(("train_begin", history.now_us()))
            self.t = time.perf_counter()

        def on_step_begin(self, a, state, control, **k):
            hist_marks.append((f"step{state.global_step + 1}_begin", history.now_us()))

        def on_step_end(self, a, state, control, **k):
            steps.append(step_peaks(torch, cuda, state.global_step, self.t))
            hist_marks.append((f"step{state.global_step}_end", history.now_us()))
            self.t = time.perf_counter()

    vocab = source.spec.vocab_size if hasattr(source.spec, "vocab_size") else source.config["vocab_size"]
    rows = _rows(c, vocab)
    tokenizer = _tokenizer()
    if c["loss"] == "fused":
        import datasets
        from trl import SFTTrainer

        ds = datasets.Dataset.from_dict({"input_ids": rows})
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                             peft_config=lora_config(s, model), callbacks=[Peaks()])
    else:
        trainer = _logits_trainer(transformers, model, args, rows, s, Peaks())
    out["trainer"] = type(trainer).__name__
    trainer.train()
    out.update(marks)
    out.update(status="ok", steps=steps)
    if cuda:
        out.update(peak_allocated_bytes=max(x["peak_allocated_bytes"] for x in steps),
                   peak_reserved_bytes=max(x["peak_reserved_bytes"] for x in steps))
    if sampler is not None:
        out.update(sampler.stop())
        out["device_bytes"] = out.get("nvml_peak_bytes")
    from benchmarks.accuracy import probe

    out["environment"] = probe.environment(torch, sampler) if cuda else {"cuda": False,
                                                                         "versions": probe.package_versions()}
    out["environment"]["versions"].update(_more_versions())
    out["engine"] = _engine_of(trainer)
    if recording:  # VRAMFIT_MEMORY_HISTORY=<dir>: the trace, for benchmarks.distributed.history
        out["memory_history"] = history.dump(torch, os.environ["VRAMFIT_MEMORY_HISTORY"], c["name"], hist_marks,
                                             {"case": c, "steps": steps, "launch_env": out.get("launch_env")})
    return out


def _ddp_local_hook(torch) -> None:
    """DDP's default comm hook waits on the all-reduce's future for the reduced bucket, and the fake
    group's future carries none ("expected the hook result is either a Tensor or a TensorList found
    None", torch/csrc/distributed/c10d/comm.cpp).  Every DDP built in this process gets a hook that
    averages the bucket in place and returns it: what NCCL's in-place all-reduce and the default
    hook's div_ leave in memory (no allocation in either)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    if getattr(ddp, "_fake_pg_hooked", False):
        return
    init = ddp.__init__

    def hook(state, bucket):
        buf = bucket.buffer()
        buf.div_(state)
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut

    def patched(self, *a, **k):
        init(self, *a, **k)
        self.register_comm_hook(self.process_group.size() if self.process_group else 1, hook)

    ddp.__init__ = patched
    ddp._fake_pg_hooked = True


def _more_versions() -> dict:
    from vramfit.versions import installed

    return installed("datasets", "deepspeed", "bitsandbytes")


def _engine_of(trainer) -> dict:
    """What the engine really was: the wrapper class and, for FSDP, its version."""
    m = trainer.model_wrapped if hasattr(trainer, "model_wrapped") else trainer.model
    state = trainer.accelerator.state
    return {"wrapper": type(m).__name__, "distributed_type": str(state.distributed_type),
            "num_processes": state.num_processes, "process_index": state.process_index,
            "fsdp_version": getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", None)}


def _logits_trainer(transformers, model, args, rows, s, callback):
    """transformers' Trainer, the model's own loss from full logits, on the same model and arguments."""
    import torch

    if s.method != "full":
        from peft import get_peft_model

        from vramfit.run.train import lora_config

        if s.grad_ckpt and s.method == "qlora":
            model.enable_input_require_grads()
        model = get_peft_model(model, lora_config(s, model))
    ids = torch.tensor(rows)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i].clone()}

    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])


def child_main(case_json: str, result_json: str, scratch: str | None) -> int:
    c = json.loads(Path(case_json).read_text())
    work = Path(tempfile.mkdtemp(prefix="fakepg-"))
    try:
        if c.get("kind") == "checkpoint":
            res = {"status": "ok", "path": make_checkpoint(c, Path(scratch))}
        else:
            res = run_one(c, work, Path(scratch) if scratch else None)
    except BaseException as exc:  # noqa: BLE001 - recorded
        import traceback

        res = {"name": c.get("name"), "case": c, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
               "traceback": traceback.format_exc()[-4000:]}
        if "out of memory" in str(exc).lower():
            res["status"] = "oom"
    Path(result_json).write_text(json.dumps(res, default=str) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no teardown of the fake group / CUDA


# --------------------------------------------------------------------------- the driver


def append_line(out: Path, rec: dict) -> None:
    with out.open("a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _spawn(c: dict, tmp: Path, scratch: Path, tag: str):
    cj, rj, log = tmp / f"{tag}.case.json", tmp / f"{tag}.result.json", tmp / f"{tag}.log"
    cj.write_text(json.dumps(c))
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.distributed.fake_pg", "--child", str(cj), str(rj),
                             str(scratch)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={"OMP_NUM_THREADS": "3", **os.environ, "PYTHONUNBUFFERED": "1",
                                 "TOKENIZERS_PARALLELISM": "false"})
    return proc, rj, log, time.monotonic()


def _collect(proc, rj: Path, log: Path, started: float) -> dict:
    res = json.loads(rj.read_text()) if rj.is_file() else {"status": "crash" if proc.returncode != -9 else "timeout",
                                                           "returncode": proc.returncode}
    res["wall_seconds"] = round(time.monotonic() - started, 1)
    if res.get("status") != "ok":
        res["log_tail"] = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    return res


def drive(cases: list, out: Path, jobs: int, budget: int, deadline: float, scratch: Path,
          hard: float | None = None) -> int:
    """Run `cases` side by side; none starts after `deadline`; at `hard` the running ones are killed
    and recorded as timeout (so an outer time limit loses no finished line)."""
    tmp = Path(tempfile.mkdtemp(prefix="fakepg-driver-"))
    # QLoRA checkpoints first, one per model (serially: they write the same folder)
    need = {}
    for c in cases:  # every method loads it: a random 1-8B model initialised on the CPU takes 50-90 s
        if not c.get("cpu"):
            need.setdefault((c["model"], json.dumps(c["overrides"], sort_keys=True)), c)
    procs = []
    for k, c in need.items():  # one folder per model: side by side
        sub = scratch / (c["model"] + "".join(f"-{a}{b}" for a, b in sorted(c["overrides"].items())))
        sub.mkdir(parents=True, exist_ok=True)
        procs.append((sub, *_spawn({**c, "kind": "checkpoint"}, tmp, sub, "ckpt-" + sub.name)))
    for sub, proc, rj, log, t in procs:
        proc.wait()
        res = _collect(proc, rj, log, t)
        print(f"checkpoint {sub.name}: {res['status']} {res['wall_seconds']} s {res.get('error', '')[:300]}", flush=True)
    for c in cases:
        c["_scratch"] = str(scratch / (c["model"] + "".join(f"-{a}{b}" for a, b in sorted(c["overrides"].items()))))
        try:
            c["_need"] = int(predicted(c)["per_gpu"]["device_bytes"] * 1.15) + GiB
        except Exception:  # noqa: BLE001 - the model refuses it: a guess
            c["_need"] = 24 * GiB
    pending = sorted(cases, key=lambda c: -c["_need"])
    running, retry, failed, k = [], [], 0, 0
    while pending or running:
        now = time.monotonic()
        used = sum(x[0]["_need"] for x in running)
        for c in list(pending):
            if now > deadline or len(running) >= jobs:
                break
            if used + c["_need"] <= budget or not running:
                pending.remove(c)
                k += 1
                running.append((c, *_spawn(_clean(c), tmp, Path(c["_scratch"]), f"c{k}"), len(running) > 0))
                used += c["_need"]
        if now > deadline and not running:
            break
        time.sleep(0.5)
        for item in list(running):
            c, proc, rj, log, t, shared = item
            if proc.poll() is None:
                if time.monotonic() - t > CASE_TIMEOUT_S or (hard is not None and time.monotonic() > hard):
                    proc.kill()
                    proc.wait()
                continue
            running.remove(item)
            res = _collect(proc, rj, log, t)
            res.setdefault("name", c["name"])
            res.setdefault("case", _clean(c))
            if res["status"] == "oom" and shared and c["name"] not in retry:  # another process took the memory
                retry.append(c["name"])
                c["_need"] = budget
                pending.append(c)
                print(f"{c['name']}: oom beside others, retried alone", flush=True)
                continue
            res["ran_beside_others"] = shared
            failed += res["status"] != "ok"
            append_line(out, res)
            print(f"{c['name']}: {res['status']} {res['wall_seconds']} s "
                  f"{_gib(res.get('peak_allocated_bytes'))} / {_gib(res.get('peak_reserved_bytes'))} / "
                  f"{_gib(res.get('device_bytes'))} GiB {res.get('error', '')[:200]}", flush=True)
        if now > deadline:
            for c in pending:
                print(f"{c['name']}: not started (time)", flush=True)
            pending = []
    return 1 if failed else 0


def _gib(b) -> str:
    return "-" if b is None else f"{b / GiB:.2f}"


def _clean(c: dict) -> dict:
    return {k: v for k, v in c.items() if not k.startswith("_")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1], argv[2], argv[3] if len(argv) > 3 else None)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="issue21", choices=sorted(GRIDS))
    ap.add_argument("--out")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", default=None, help="substring of the case names to run")
    ap.add_argument("--jobs", type=int, default=4, help="cases side by side on the one GPU")
    ap.add_argument("--gpu-budget-gib", type=float, default=74.0, help="their predicted device bytes together")
    ap.add_argument("--max-seconds", type=float, default=560.0, help="no case starts after this")
    ap.add_argument("--hard-seconds", type=float, default=None, help="running cases are killed after this")
    ap.add_argument("--skip-done", action="store_true")
    ap.add_argument("--scratch", default=None, help="QLoRA checkpoints (default: a temporary folder)")
    a = ap.parse_args(argv)
    cases = GRIDS[a.grid]()
    if a.only:
        cases = [c for c in cases if a.only in c["name"]]
    if a.list:
        for c in cases:
            print(c["name"])
        print(f"{len(cases)} cases")
        return 0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.skip_done and out.is_file():
        from benchmarks.jsonl import records as read_jsonl

        done = {r.get("name") for r in read_jsonl(out) if r.get("status") == "ok"}
        cases = [c for c in cases if c["name"] not in done]
    scratch = Path(a.scratch or tempfile.mkdtemp(prefix="fakepg-ckpt-"))
    budget = int(a.gpu_budget_gib * GiB)
    if any(c.get("cpu") for c in cases):
        a.jobs = 1
    t0 = time.monotonic()
    return drive(cases, out, a.jobs, budget, t0 + a.max_seconds, scratch,
                 t0 + a.hard_seconds if a.hard_seconds else None)


if __name__ == "__main__":
    sys.exit(main())
