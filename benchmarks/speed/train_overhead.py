"""`vramfit train`'s own overhead (issue 20, item 3): the same LoRA run through `vramfit train` and
through a plain trl `SFTTrainer` script, side by side, each in its own process.

    python -m benchmarks.speed.train_overhead --out DIR                        # Llama-3.2-1B, 60 steps, 2 pairs
    python -m benchmarks.speed.train_overhead --out DIR --models llama-3.2-1b mistral-7b-v0.1 --budget-s 560
    python -m benchmarks.speed.train_overhead --out DIR --tiny                 # CPU: a tiny Llama, a few steps
    python -m benchmarks.speed.train_overhead --tracker-bench [--out DIR]      # what one tracker reading costs
    bash benchmarks/speed/train_overhead_device.sh                             # on the GPU machine, results in $OUT

The setup (MODELS): random-init weights from vramfit's bundled config, bf16 weights + `bf16=True` (the
bf16-amp recipe), LoRA r=16 on q_proj,v_proj (alpha 32, dropout 0.05), adamw_torch_fused, no
checkpointing, micro-batch 8 at up to 512 tokens (1B) or 4 at up to 2,048 (7-8B), no eval, no
checkpoint; rows Alpaca-like of log-normal length (median ~160 tokens for 1B, ~1,000 for 7-8B),
written by a seeded generator with the tests' offline word-level tokenizer (tests/tiny_lm.py), as
benchmarks/train_proof does.  Both processes get PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
(`vramfit train`'s allocator, which it would set itself) and run offline.

(a) `vramfit train`: its real CLI (`vramfit.cli.main`) in a subprocess with every option the setup
    fixes (so no planner runs) and its default tracking on: the MemoryTracker (readings at every step's
    start and end, the 10 Hz sampler thread, NVML, the timeline flushed per reading), the live view's
    status line per logging step, the Ctrl-C handler.  `--no-simulate-allocator` skips the allocator
    replay of the prediction (start-up only, never in the timed window).
(b) the plain script (`plain_script`): the same tokenizer, data rows, config, seed, LoraConfig and
    SFTConfig values, written out as a user would write them from `vramfit plan`'s printout.

Both trainers get the same measuring callback (`StepClock`), added last by a hook on
`transformers.Trainer.__init__` installed in the child process before anything runs (for (a) before
`vramfit.cli.main`): nothing else of either run is changed.  It records, per step, the wall time at the
step's end (after every other callback, the tracker's reading included) and `num_input_tokens_seen`
(the real, non-padding tokens: both configs count them, `include_num_input_tokens_seen="non_padding"`),
the host time each callback spends per step, the effective trainer arguments, LoRA config and model
facts (dtype, parameter counts, checkpointing, a checksum of the initial weights).

Timed window: steps warmup+1 .. steps (the first `--warmup` steps are the warm-up), tokens/s = real
tokens of those steps / wall from the end of step `warmup` to the end of step `steps`; the GPU is
synchronised at those two step ends only.  After the window: `--profile-steps` steps under torch.profiler
(one more step before them as its warm-up), synchronised at each step end: GPU busy share = union of the
CUDA kernel / memcpy / memset intervals inside each step / the step's wall; the rest of the wall is the
GPU waiting on the host (host overhead); the top host ops by self CPU time.  For (a) the tokens/s are
also taken from vramfit's own timeline (its step_end readings and logged num_input_tokens_seen) as a
cross-check.  Order alternates by pair (vramfit first, then plain first; `--plain-first` the other way); `--budget-s` guards the whole
command: a pair starts only when the time it is expected to take is left.

Output (DIR/train_overhead.jsonl, one JSON line per record, flushed as written): `environment`,
`inputs` (per model: data statistics), `run` (per process), `comparison` (per model: both effective
configs and their differences, whether they agree on batch size, precision, checkpointing, optimizer,
max length, packing/padding, whether both runs saw the same tokens per step, tokens/s, the ratio
vramfit/plain against the 0.97 target, the profiles), `tracker_bench`.  Per run: DIR/runs/<name>/
(clock.json, run.log, profile.txt; for vramfit its run_report.json and memory timeline; weights removed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULT_NAME = "train_overhead.jsonl"
DATA_SEED, SEED = 1234, 42
TARGET_RATIO = 0.97
# Setups.  rows: how many (never an epoch boundary inside the run); median/sigma: log-normal token
# lengths of the rows (a long tail as instruction data has), cut at max_seq_len by the trainer.
MODELS = {
    "llama-3.2-1b": dict(micro_batch=8, max_seq_len=512, median=160, sigma=0.7, rows=2000, grad_ckpt=False,
                         expected_s=75),
    "mistral-7b-v0.1": dict(micro_batch=4, max_seq_len=2048, median=1000, sigma=0.5, rows=1000, grad_ckpt=False,
                            expected_s=150),
    "llama-3.1-8b": dict(micro_batch=4, max_seq_len=2048, median=1000, sigma=0.5, rows=1000, grad_ckpt=False,
                         expected_s=160),
}
TINY = dict(micro_batch=4, max_seq_len=96, median=40, sigma=0.5, rows=200, grad_ckpt=False, expected_s=90)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
# precision / optimizer: the bf16-amp recipe on a GPU; on the CPU (--tiny) fp32 and the unfused AdamW
GPU_RECIPE = dict(precision="bf16-amp", dtype="bfloat16", bf16=True, optim="adamw_torch_fused")
CPU_RECIPE = dict(precision="32-true", dtype="float32", bf16=False, optim="adamw_torch")
LEARNING_RATE, WARMUP = 2e-4, 0.03  # vramfit train's defaults for LoRA (DEFAULT_LR, --warmup)
# What the two configs must agree on (the comparison fails otherwise); every other difference is listed.
MUST_AGREE = ("per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "optim",
              "activation_checkpointing", "gradient_checkpointing", "max_length", "packing", "padding_free",
              "model.dtype", "model.checkpointing", "model.parameters", "model.trainable", "model.attn_implementation",
              "lora.r", "lora.lora_alpha", "lora.target_modules", "lora.lora_dropout")
IGNORED_ARGS = ("output_dir", "logging_dir", "run_name", "hub_token", "push_to_hub_token")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}
# --tiny: one torch thread (the tiny model's steps are ~ms; on a small shared CPU, threads that
# oversubscribe the cores make the steps' times noise)
TINY_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- the measuring callback


def install_clock(path: str, warmup: int, steps: int, profile_steps: int) -> None:
    """In this (child) process: the first transformers Trainer made gets a StepClock as its last
    callback; its record is written to `path` at the end of training."""
    import transformers

    real_init = transformers.Trainer.__init__
    made = []

    def __init__(self, *a, **kw):
        real_init(self, *a, **kw)
        if not made:
            made.append(1)
            clock = _step_clock_class()(path, warmup, steps, profile_steps, self)
            self.add_callback(clock)
            clock.wrap_callbacks()

    transformers.Trainer.__init__ = __init__


def _json_safe(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple, set)):
        return [_json_safe(x) for x in (sorted(v, key=str) if isinstance(v, set) else v)]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    return str(v)


def _step_clock_class():
    """StepClock, defined where transformers is imported (the child processes)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Step-end times and tokens of the timed window, per-callback host time, a profile after it."""

        EVENTS = ("on_step_begin", "on_step_end", "on_log", "on_substep_end", "on_pre_optimizer_step",
                  "on_optimizer_step")

        def __init__(self, path, warmup, steps, profile_steps, trainer):
            import torch

            self.path, self.warmup, self.steps, self.profile_steps = Path(path), warmup, steps, profile_steps
            self.trainer = trainer
            self.cuda = torch.cuda.is_available()
            self.ends = []  # (global_step, perf_counter at its end, num_input_tokens_seen)
            self.timing = False
            self.callback_s = {}
            self.prof = None
            self.profile = None
            self.info = {}

        # the host time of every callback (this one too) inside the timed window
        def wrap_callbacks(self):
            for cb in self.trainer.callback_handler.callbacks:
                name = type(cb).__name__
                for event in self.EVENTS:
                    fn = getattr(cb, event, None)
                    if fn is None:
                        continue
                    setattr(cb, event, self._timed(fn, name))

        def _timed(self, fn, name):
            clock = self

            def timed(*a, **kw):
                if not clock.timing:
                    return fn(*a, **kw)
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    clock.callback_s[name] = clock.callback_s.get(name, 0.0) + time.perf_counter() - t
            return timed

        def _sync(self):
            if self.cuda:
                import torch

                torch.cuda.synchronize()

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.info = {"args": _json_safe(args.to_dict()), "callbacks": [type(c).__name__ for c in
                                                                          self.trainer.callback_handler.callbacks],
                         "model": model_facts(model), "lora": lora_facts(model),
                         "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                         "train_rows": len(self.trainer.train_dataset) if self.trainer.train_dataset is not None
                         else None}

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == self.steps + 1 and self.profile_steps > 0 and self.prof is None:
                self.prof = StepProfiler(self.path.parent, self.profile_steps, self.cuda)

        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            if step == self.warmup or step == self.steps:
                self._sync()
            if self.warmup <= step <= self.steps:
                self.ends.append((step, time.perf_counter(), state.num_input_tokens_seen))
            self.timing = self.warmup <= step < self.steps
            if self.prof:
                self._sync()
                self.prof.step()
                if step == self.steps + 1 + self.profile_steps:
                    self.prof.__exit__(None, None, None)
                    self.profile = self.prof.summary
                    self.prof = False

        def on_train_end(self, args, state, control, **kw):
            if self.prof:
                self.prof.__exit__(None, None, None)
                self.profile = self.prof.summary
                self.prof = False
            self.write(state)

        def write(self, state):
            rec = {"cuda": self.cuda, "warmup": self.warmup, "steps": self.steps, "last_step": state.global_step,
                   "step_ends": [{"step": s, "t": round(t, 6), "tokens_seen": n} for s, t, n in self.ends],
                   "callback_s": {k: round(v, 6) for k, v in self.callback_s.items()},
                   "profile": self.profile, **self.info}
            if self.cuda:
                import torch

                rec["gpu"] = torch.cuda.get_device_name()
                rec["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            self.path.write_text(json.dumps(rec, indent=1))

    return StepClock


def model_facts(model) -> dict:
    import torch

    if model is None:
        return {}
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen = [p for p in params if not p.requires_grad]
    with torch.no_grad():  # the same initial weights: a checksum of the first frozen tensors
        checksum = float(sum(p.detach().float().sum().item() for p in frozen[:4]))
    return {"class": type(base).__name__, "parameters": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in trainable),
            "dtype": str(frozen[0].dtype if frozen else params[0].dtype),
            "trainable_dtype": str(trainable[0].dtype) if trainable else None,
            "checkpointing": bool(getattr(base, "is_gradient_checkpointing", False)),
            "attn_implementation": getattr(base.config, "_attn_implementation", None),
            "use_cache": getattr(base.config, "use_cache", None), "weights_checksum": round(checksum, 3),
            "device": str(params[0].device)}


def lora_facts(model) -> dict:
    cfg = getattr(model, "peft_config", None)
    if not cfg:
        return {}
    c = next(iter(cfg.values()))
    d = c.to_dict() if hasattr(c, "to_dict") else vars(c)
    keep = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "bias", "use_rslora", "use_dora",
            "modules_to_save", "init_lora_weights")
    return {k: _json_safe(d.get(k)) for k in keep}


class StepProfiler:
    """torch.profiler over `active` steps after one warm-up step; `summary` once it has run."""

    def __init__(self, out: Path, active: int, cuda: bool):
        import torch

        self.out, self.cuda, self.summary = out, cuda, None
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        self.prof = torch.profiler.profile(activities=acts, on_trace_ready=self._ready,
                                           schedule=torch.profiler.schedule(wait=0, warmup=1, active=active, repeat=1))
        self.prof.__enter__()

    def step(self):
        self.prof.step()

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)

    def _ready(self, prof):
        trace = self.out / "trace.json"
        try:
            prof.export_chrome_trace(str(trace))
            self.summary = trace_split(json.loads(trace.read_text()), self.cuda)
        except Exception as exc:  # noqa: BLE001 - a failed profile must not fail the run
            self.summary = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            return
        finally:
            trace.unlink(missing_ok=True)
        try:  # the host's time by op, and the tables
            ka = prof.key_averages()
            steps = max(1, self.summary.get("steps") or 1)
            self.summary["top_host_ops"] = [
                {"name": e.key, "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                 "calls_per_step": round(e.count / steps, 1)}
                for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:12]]
            tables = [ka.table(sort_by="self_cpu_time_total", row_limit=30)]
            if self.cuda:
                tables.append(ka.table(sort_by="self_device_time_total", row_limit=20))
        except Exception as exc:  # noqa: BLE001
            self.summary["tables_error"] = f"{type(exc).__name__}: {exc}"[:300]
            tables = []
        head = json.dumps({k: v for k, v in self.summary.items() if k != "top_host_ops"})
        (self.out / "profile.txt").write_text("\n\n".join([head, *tables]) + "\n")


def _union(intervals: list) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def trace_split(trace: dict, cuda: bool) -> dict:
    """A chrome trace of profiled steps -> per-step wall, GPU busy time (the union of the kernel,
    memcpy and memset intervals inside the step) and the rest (the GPU waiting on the host)."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    steps, gpu = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        ts, dur = float(e["ts"]), float(e["dur"])
        if str(e.get("name", "")).startswith("ProfilerStep#") and e.get("cat") in ("user_annotation", "cpu_op", None):
            steps.append((ts, ts + dur))
        elif e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            gpu.append((ts, ts + dur))
    steps = sorted(set(steps))
    wall = sum(b - a for a, b in steps)
    busy = sum(_union([(max(a, s), min(b, t)) for a, b in gpu if b > s and a < t]) for s, t in steps)
    kernels = sum(1 for a, b in gpu if any(b > s and a < t for s, t in steps))
    n = len(steps)
    if not n:
        return {"steps": 0, "note": "no ProfilerStep ranges in the trace"}
    if cuda and not gpu:  # CUPTI gave nothing: no split rather than a GPU idle 100% of the time
        return {"steps": n, "wall_s_per_step": round(wall / n / 1e6, 5), "gpu_busy_s_per_step": None,
                "gpu_busy_share": None, "host_overhead_s_per_step": None, "host_overhead_share": None,
                "gpu_ops_per_step": None, "note": "no CUDA kernels in the trace (CUPTI unavailable?)"}
    return {"steps": n, "wall_s_per_step": round(wall / n / 1e6, 5),
            "gpu_busy_s_per_step": round(busy / n / 1e6, 5) if cuda else None,
            "gpu_busy_share": round(busy / wall, 4) if cuda and wall else None,
            "host_overhead_s_per_step": round((wall - busy) / n / 1e6, 5) if cuda else None,
            "host_overhead_share": round(1 - busy / wall, 4) if cuda and wall else None,
            "gpu_ops_per_step": round(kernels / n, 1) if cuda else None}


# --------------------------------------------------------------------------- the two programs


def random_checkpoint(model: str, seed: int, folder: str | Path) -> str:
    """The random bf16 checkpoint `vramfit train MODEL --init random --seed SEED --random-init-dir FOLDER`
    loads for QLoRA, written the way it writes it (vramfit.run.model._random_checkpoint: the model
    profile's config as `build_inputs` resolves it, `write_random_checkpoint` on the CPU, the same mark
    file, so either side reuses the other's; a folder holding another config's or seed's is refused).
    Nothing is written when FOLDER already holds it.  -> FOLDER."""
    from vramfit.run.model import _random_checkpoint, resolve_model

    source = resolve_model(model, "random")
    return _random_checkpoint(source, seed, Path(folder).parent, folder)


def plain_script(spec: dict) -> None:
    """(b): a plain trl SFTTrainer script with the values `vramfit train` uses.

    spec["method"] "lora" (the default): the bf16 model built from spec["config"] on the GPU
    (from_config, random weights seeded by spec["seed"]).  "qlora" (benchmarks/speed/lever_proof.py,
    where LoRA's bf16 weights cannot fit the budget): the standard QLoRA recipe -- from_pretrained of
    the random bf16 checkpoint in spec["random_init_dir"] with BitsAndBytesConfig NF4, double
    quantization, bf16 compute, then peft's prepare_model_for_kbit_training; the checkpoint is written
    first if that folder has none (`random_checkpoint`, exactly as `vramfit train` writes it, on the
    CPU, minutes for an 8B model): before the trainer exists, so outside the step clock's timed window."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    if cuda and spec.get("memory_limit_bytes"):  # an enforced budget (benchmarks/speed/lever_proof.py)
        torch.cuda.set_per_process_memory_fraction(
            spec["memory_limit_bytes"] / torch.cuda.get_device_properties(0).total_memory, 0)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)  # {"prompt", "completion"}: the Alpaca prompt, the response

    if spec.get("method", "lora") == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        path = spec["random_init_dir"]
        if not (Path(path) / "config.json").is_file():
            t = time.perf_counter()
            random_checkpoint(spec["model"], spec["seed"], path)
            print(f"[plain] wrote the random checkpoint {path} in {time.perf_counter() - t:.0f} s (untimed)",
                  flush=True)
        torch.manual_seed(spec["seed"])
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", device_map={"": 0})
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["grad_ckpt"],
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        config = AutoConfig.from_pretrained(spec["config"])
        torch.manual_seed(spec["seed"])
        with torch.device("cuda" if cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]),
                                                     attn_implementation="sdpa")
        model.config.use_cache = False

    # trl's SFTConfig turns checkpointing on by default: say it (under the name this version has)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ \
        else "gradient_checkpointing"
    checkpointing = {ckpt: spec["grad_ckpt"]}
    if spec["grad_ckpt"]:
        checkpointing[ckpt + "_kwargs"] = {"use_reentrant": False}
    args = SFTConfig(
        output_dir=spec["output_dir"], max_steps=spec["max_steps"],
        per_device_train_batch_size=spec["micro_batch"], per_device_eval_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1, **checkpointing,
        bf16=spec["bf16"], fp16=False, optim=spec["optim"], learning_rate=LEARNING_RATE, warmup_steps=WARMUP,
        max_length=spec["max_seq_len"], packing=False, assistant_only_loss=False,
        logging_steps=1, save_strategy="no", save_total_limit=2, report_to=[], seed=spec["seed"],
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not cuda,
        include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(**spec["lora"]))
    trainer.train()


def vramfit_args(model: str, inputs: dict, m: dict, recipe: dict, out: Path, max_steps: int) -> list:
    """(a): `vramfit train`'s command line (every setup option given: no planner)."""
    return ["train", model, inputs["alpaca"], "--init", "random", "--tokenizer", inputs["tokenizer"],
            "--out", str(out), "--max-seq-len", str(m["max_seq_len"]), "--val-split", "0", "--save-steps", "0",
            "--max-steps", str(max_steps), "--seed", str(SEED), "--method", "lora", "--precision", recipe["precision"],
            "--optim", recipe["optim"], "--micro-batch", str(m["micro_batch"]), "--grad-accum", "1",
            "--grad-ckpt" if m["grad_ckpt"] else "--no-grad-ckpt", "--lora-r", str(LORA["r"]),
            "--lora-alpha", str(LORA["lora_alpha"]), "--lora-dropout", str(LORA["lora_dropout"]),
            "--target-modules", ",".join(LORA["target_modules"]), "--attn", "sdpa", "--no-simulate-allocator"]


def child_main(argv: list) -> int:
    """`--child vramfit|plain CLOCK_JSON -- ...`: one run, with the step clock installed."""
    kind, clock = argv[0], json.loads(argv[1])
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    install_clock(clock["path"], clock["warmup"], clock["steps"], clock["profile_steps"])
    if kind == "plain":
        plain_script(json.loads(rest[0]))
        return 0
    from vramfit.cli import main

    sys.argv = ["vramfit", *rest]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


# --------------------------------------------------------------------------- inputs


def build_inputs(work: Path, name: str, m: dict, tiny: bool) -> dict:
    """The tokenizer (tests/tiny_lm's word-level one), the rows as Alpaca JSONL (vramfit's input) and
    the same rows as prompt/completion JSONL (Stanford Alpaca's prompt, what vramfit makes of them: the
    plain script's input), the model's config directory."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tiny_lm import WORDS, llama_config, make_tokenizer

    from vramfit.run.data import ALPACA_PROMPT_NO_INPUT, prepare

    work.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    tok_dir = work / "tokenizer"
    if not tok_dir.is_dir():
        tok.save_pretrained(tok_dir)
    rng = random.Random(DATA_SEED)
    rows = []
    for _ in range(m["rows"]):  # ~40 tokens of each row go to the prompt template and <eos>
        n = max(24, min(4 * m["max_seq_len"], round(rng.lognormvariate(math.log(m["median"]), m["sigma"]))))
        ws = [rng.choice(WORDS) for _ in range(max(8, n - 40))]
        k = max(4, min(40, len(ws) // 4))
        rows.append({"instruction": " ".join(ws[:k]), "input": "", "output": " ".join(ws[k:])})
    alpaca, plain = work / f"{name}-alpaca.jsonl", work / f"{name}-prompt-completion.jsonl"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain.write_text("".join(json.dumps({"prompt": ALPACA_PROMPT_NO_INPUT.format(instruction=r["instruction"]),
                                         "completion": r["output"]}) + "\n" for r in rows))
    config_dir = work / f"{name}-config"
    if tiny:
        cfg = llama_config(tok)
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, m["max_seq_len"])
    else:
        from vramfit.model.spec import config_from_dict, resolve_config_dict

        profile_name, config = resolve_config_dict(name)
        cfg = config_from_dict(config, profile_name)  # what vramfit train builds the model from
    cfg.save_pretrained(config_dir)
    if tiny:
        tok.save_pretrained(config_dir)
    d = prepare(str(alpaca), tok, max_seq_len=m["max_seq_len"], val_split=0)
    if d.train.rows != json_rows(plain):
        raise SystemExit("the prompt/completion rows are not what vramfit makes of the Alpaca rows")
    lengths = d.lengths
    info = {"rows": len(rows), "seed": DATA_SEED, "length_design": f"log-normal, median {m['median']} tokens, "
            f"sigma {m['sigma']}", "token_lengths": {k: v for k, v in vars(lengths).items()
                                                        if isinstance(v, (int, float))},
            "max_seq_len": m["max_seq_len"]}
    return {"tokenizer": str(tok_dir), "alpaca": str(alpaca), "plain_data": str(plain), "config": str(config_dir),
            "model_arg": str(config_dir) if tiny else name, "data_info": info}


def json_rows(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def environment() -> dict:
    from benchmarks.train_proof.run import environment as env

    return env()


# --------------------------------------------------------------------------- one run


# --gpu-warmup-s: bf16 GEMMs on the GPU for argv[1] seconds (clocks and the driver's state as a warm run's)
GPU_WARMUP = ("import sys, time, torch\n"
              "x = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)\n"
              "t = time.time()\n"
              "while time.time() - t < float(sys.argv[1]):\n"
              "    for _ in range(20):\n"
              "        y = x @ x\n"
              "    torch.cuda.synchronize()\n")


def run_child(cmd: list, log: Path, timeout: float, env: dict | None = None) -> tuple[int | str, float]:
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, **ENV, **(env or {})}, cwd=str(Path(__file__).resolve().parents[2]))
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            rc = "timeout"
    return rc, time.perf_counter() - t0


def window_rate(ends: list) -> dict:
    """Tokens/s over the timed window from the step ends [(step, t, tokens_seen)]."""
    if len(ends) < 2:
        return {}
    (s0, t0, n0), (s1, t1, n1) = ends[0], ends[-1]
    walls = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    toks = [b[2] - a[2] for a, b in zip(ends, ends[1:])]
    return {"window": [s0 + 1, s1], "steps_timed": s1 - s0, "seconds": round(t1 - t0, 4), "tokens": n1 - n0,
            "tokens_per_s": round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else None,
            "step_s_median": round(statistics.median(walls), 5),
            "step_s_p90": round(sorted(walls)[int(0.9 * (len(walls) - 1))], 5),
            "tokens_per_step_mean": round(statistics.mean(toks), 1), "tokens_per_step": toks}


def timeline_rate(path: Path, first: int, last: int) -> dict:
    """The same window from vramfit's own timeline: step_end readings' times and the logged
    num_input_tokens_seen (the tracker writes both)."""
    if not path.is_file():
        return {}
    t, tokens = {}, {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("kind") == "step_end":
            t[r["step"]] = r["t"]
        elif r.get("kind") == "log" and "num_input_tokens_seen" in r:
            tokens[r["step"]] = r["num_input_tokens_seen"]
    if not all(k in t and k in tokens for k in (first, last)) or t[last] <= t[first]:
        return {"note": "the timeline lacks the window's step ends or token counts"}
    readings = sum(1 for line in path.read_text().splitlines() if '"kind": "sample"' in line)
    return {"tokens_per_s": round((tokens[last] - tokens[first]) / (t[last] - t[first]), 1),
            "seconds": round(t[last] - t[first], 4), "timeline_lines": len(path.read_text().splitlines()),
            "sampler_readings": readings}


def one_run(side: str, model: str, inputs: dict, m: dict, recipe: dict, out: Path, a, repeat: int,
            timeout: float) -> dict:
    name = f"{Path(model).name}-{side}-{repeat}"
    rdir = out / "runs" / name
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True)
    max_steps = a.steps + (1 + a.profile_steps if a.profile_steps else 0)
    clock = {"path": str(rdir / "clock.json"), "warmup": a.warmup, "steps": a.steps, "profile_steps": a.profile_steps}
    me = [sys.executable, "-m", "benchmarks.speed.train_overhead", "--child", side, json.dumps(clock), "--"]
    if side == "vramfit":
        cmd = me + vramfit_args(inputs["model_arg"], inputs, m, recipe, rdir / "vramfit-out", max_steps)
    else:
        spec = {"tokenizer": inputs["tokenizer"], "data": inputs["plain_data"], "config": inputs["config"],
                "seed": SEED, "dtype": recipe["dtype"], "output_dir": str(rdir / "plain-out"), "max_steps": max_steps,
                "micro_batch": m["micro_batch"], "grad_ckpt": m["grad_ckpt"], "bf16": recipe["bf16"],
                "optim": recipe["optim"], "max_seq_len": m["max_seq_len"], "lora": LORA}
        cmd = me + [json.dumps(spec)]
    rc, wall = run_child(cmd, rdir / "run.log", timeout, TINY_ENV if a.tiny else None)
    rec = {"kind": "run", "name": name, "model": model, "side": side, "repeat": repeat, "rc": rc,
           "wall_s": round(wall, 1), "max_steps": max_steps}
    cl = json.loads(Path(clock["path"]).read_text()) if Path(clock["path"]).is_file() else None
    rec["status"] = "completed" if rc == 0 and cl and cl.get("last_step") == max_steps else "failed"
    if rec["status"] != "completed":
        rec["log_tail"] = (rdir / "run.log").read_text()[-1500:]
    if cl:
        ends = [(e["step"], e["t"], e["tokens_seen"]) for e in cl["step_ends"]]
        rec.update(window_rate(ends))
        steps = max(1, rec.get("steps_timed") or 1)
        rec["callbacks_ms_per_step"] = {k: round(v * 1e3 / steps, 3) for k, v in
                                        sorted(cl["callback_s"].items(), key=lambda kv: -kv[1])}
        rec["profile"] = cl.get("profile")
        rec["gpu"] = cl.get("gpu")
        rec["peak_allocated_bytes"] = cl.get("peak_allocated_bytes")
        rec["config"] = {"args": cl.get("args"), "model": cl.get("model"), "lora": cl.get("lora"),
                         "callbacks": cl.get("callbacks"), "allocator_conf": cl.get("allocator_conf"),
                         "train_rows": cl.get("train_rows")}
    if side == "vramfit":
        vout = rdir / "vramfit-out"
        if rec.get("window"):
            rec["timeline"] = timeline_rate(vout / "memory_timeline.jsonl", rec["window"][0] - 1, rec["window"][1])
        rep = vout / "run_report.json"
        if rep.is_file():
            r = json.loads(rep.read_text())
            rec["vramfit_report"] = {"status": r.get("status"), "measured": r.get("measured"),
                                     "setup": r.get("setup")}
    for w in ("vramfit-out/adapter", "vramfit-out/checkpoints", "vramfit-out/model", "plain-out"):
        shutil.rmtree(rdir / w, ignore_errors=True)
    return rec


# --------------------------------------------------------------------------- comparison


def flat_config(c: dict) -> dict:
    out = {k: v for k, v in (c.get("args") or {}).items() if k not in IGNORED_ARGS}
    out.update({f"model.{k}": v for k, v in (c.get("model") or {}).items() if k != "device"})
    out.update({f"lora.{k}": v for k, v in (c.get("lora") or {}).items()})
    out["allocator_conf"] = c.get("allocator_conf")
    out["train_rows"] = c.get("train_rows")
    return out


def _norm(v):
    return sorted(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v


def compare(model: str, runs: list, inputs: dict) -> dict:
    done = {s: [r for r in runs if r["side"] == s and r["status"] == "completed"] for s in ("vramfit", "plain")}
    rec = {"kind": "comparison", "model": model, "target_ratio": TARGET_RATIO,
           "runs": {s: len(v) for s, v in done.items()}, "data": inputs["data_info"]}
    if not done["vramfit"] or not done["plain"]:
        rec["verdict"] = "incomplete: a side has no completed run"
        return rec
    cv, cp = flat_config(done["vramfit"][0]["config"]), flat_config(done["plain"][0]["config"])
    diffs = {k: {"vramfit": cv.get(k), "plain": cp.get(k)} for k in sorted(set(cv) | set(cp))
             if _norm(cv.get(k)) != _norm(cp.get(k))}
    rec["config_vramfit"], rec["config_plain"] = cv, cp
    rec["must_agree"] = {k: cv.get(k) for k in MUST_AGREE}
    rec["disagree"] = {k: diffs[k] for k in MUST_AGREE if k in diffs}
    rec["other_differences"] = {k: v for k, v in diffs.items() if k not in MUST_AGREE}
    rec["configs_agree"] = not rec["disagree"]
    per = {s: [r["tokens_per_s"] for r in v if r.get("tokens_per_s")] for s, v in done.items()}
    toks = {s: [r.get("tokens_per_step") for r in v] for s, v in done.items()}
    rec["tokens_identical"] = all(t == toks["vramfit"][0] for t in toks["vramfit"] + toks["plain"])
    rec["tokens_per_s"] = per
    if per["vramfit"] and per["plain"]:
        rec["ratio"] = round(statistics.mean(per["vramfit"]) / statistics.mean(per["plain"]), 4)
        rec["ratio_per_repeat"] = [round(v["tokens_per_s"] / p["tokens_per_s"], 4)
                                   for v, p in zip(done["vramfit"], done["plain"])
                                   if v.get("tokens_per_s") and p.get("tokens_per_s")]
        rec["meets_target"] = rec["ratio"] >= TARGET_RATIO
    rec["step_s_median"] = {s: [r.get("step_s_median") for r in v] for s, v in done.items()}
    rec["callbacks_ms_per_step"] = {s: v[0].get("callbacks_ms_per_step") for s, v in done.items()}
    rec["profile"] = {s: v[0].get("profile") for s, v in done.items()}
    rec["timeline_tokens_per_s"] = [r.get("timeline", {}).get("tokens_per_s") for r in done["vramfit"]]
    rec["verdict"] = ("configs differ: " + ", ".join(rec["disagree"]) if rec["disagree"] else
                      "tokens per step differ between the runs" if not rec["tokens_identical"] else
                      f"vramfit/plain = {rec.get('ratio')} (target >= {TARGET_RATIO})")
    return rec


# --------------------------------------------------------------------------- the tracker's reading


def fake_stats() -> dict:
    """The shape of torch._C._cuda_memoryStats (torch 2.11-2.13): 123 values once flattened."""
    core = ("allocation", "segment", "active", "inactive_split", "allocated_bytes", "reserved_bytes", "active_bytes",
            "inactive_split_bytes", "requested_bytes")
    d = {k: {p: {"current": 1 << 30, "peak": 2 << 30, "allocated": 3 << 30, "freed": 4 << 30}
             for p in ("all", "large_pool", "small_pool")} for k in core}
    z = {"current": 0, "peak": 0, "allocated": 0, "freed": 0}
    d.update(num_alloc_retries=0, num_ooms=0, num_sync_all_streams=0, num_device_alloc=5, num_device_free=1,
             num_oom_rejections=0, max_split_size=-1, oversize_allocations=dict(z), oversize_segments=dict(z),
             reserved_bytes_by_private_pools={})
    return d


def old_reading_figures() -> dict:
    """The tracker's torch figures before 2026-12 (four calls, each flattening every statistic)."""
    import torch

    return {"allocated_bytes": torch.cuda.memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved(),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def _per_call_us(fn, n: int) -> float:
    for _ in range(min(50, n)):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - t) / n * 1e6, 2)


def tracker_bench(out: Path | None, n: int = 2000) -> dict:
    """Microseconds per call of what the MemoryTracker does per reading (four readings per ~0.2 s step:
    step_begin, step_end and ~2 of the 10 Hz sampler thread, whose Python holds the GIL too).  On a CUDA
    machine the real calls; without one, torch's statistics come from `fake_stats` (what the C call
    returns, so the Python flattening the four old calls do is measured; the C call itself, 1 vs 4 of
    them, only adds to the old way's cost)."""
    import tempfile

    import torch
    import torch.cuda.memory as tcm

    from vramfit.run.tracker import MemoryTracker, torch_figures

    cuda = torch.cuda.is_available()
    patched = []
    if cuda:
        keep = [torch.empty(1 << 20, device="cuda") for _ in range(8)]  # noqa: F841 - live allocations
        del keep[::2]
    else:
        for mod in (tcm, torch.cuda):
            patched.append((mod, mod.memory_stats_as_nested_dict))
            mod.memory_stats_as_nested_dict = lambda device=None: fake_stats()
    try:
        new = lambda: torch_figures(torch.cuda.memory_stats_as_nested_dict())  # noqa: E731
        res = {"kind": "tracker_bench", "cuda": cuda, "stats": "torch's" if cuda else "fake_stats (no CUDA here)",
               "same_values": new() == old_reading_figures(),
               "old_four_calls_us": _per_call_us(old_reading_figures, n), "new_one_call_us": _per_call_us(new, n)}
        with tempfile.TemporaryDirectory() as d:
            tr = MemoryTracker(Path(d) / "t.jsonl", interval_s=3600, plot_path=None).start()
            res["sample_us"] = _per_call_us(tr.sample, n // 4)
            if tr._nvml is not None:
                res["nvml_read_us"] = _per_call_us(tr._nvml.read, n // 4)
                res["nvml_source"] = tr._nvml.source
            tr.finish()
        res["old_to_new_saving_ms_per_step"] = round(4 * (res["old_four_calls_us"] - res["new_one_call_us"]) / 1e3, 3)
        res["old_to_new_saving_share_at_0.2s"] = round(res["old_to_new_saving_ms_per_step"] / 200, 4)
    finally:
        for mod, fn in patched:
            mod.memory_stats_as_nested_dict = fn
    if out is not None:
        append(out / RESULT_NAME, res)
    return res


# --------------------------------------------------------------------------- the driver


def append(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="result directory (train_overhead.jsonl, runs/)")
    ap.add_argument("--model", default=None, help="one model profile (default llama-3.2-1b)")
    ap.add_argument("--models", nargs="+", default=None, help="several, in order: " + ", ".join(MODELS))
    ap.add_argument("--steps", type=int, default=None, help="last timed step (default 60; --tiny 12)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps before the window (default 5; --tiny 3)")
    ap.add_argument("--profile-steps", type=int, default=3, help="profiled steps after the window (0: none)")
    ap.add_argument("--repeats", type=int, default=2, help="pairs per model, order alternating")
    ap.add_argument("--plain-first", action="store_true", help="the first pair runs the plain script first")
    ap.add_argument("--budget-s", type=float, default=560.0, help="wall budget of the whole command (seconds)")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU, a few steps: the pipeline's check")
    ap.add_argument("--gpu-warmup-s", type=float, default=0.0,
                    help="before the pairs, a process of bf16 GEMMs for this long: a fresh machine's first training "
                         "process ran 16-30%% slower than the later ones (2026-12-07), whichever side it was")
    ap.add_argument("--tracker-bench", action="store_true", help="only time the tracker's reading (old vs new)")
    ap.add_argument("--no-tracker-bench", action="store_true", help="skip the tracker bench after the runs")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + a.budget_s
    if a.tracker_bench:
        print(json.dumps(tracker_bench(a.out)))
        return 0
    if a.out is None:
        ap.error("--out is needed")
    a.steps = a.steps or (12 if a.tiny else 60)
    a.warmup = a.warmup if a.warmup is not None else (3 if a.tiny else 5)
    if a.warmup < 1 or a.steps - a.warmup < 2:
        ap.error("--steps must exceed --warmup by 2 or more, and --warmup be >= 1")
    models = ["tiny"] if a.tiny else (a.models or [a.model or "llama-3.2-1b"])
    unknown = [m for m in models if m != "tiny" and m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    result = out / RESULT_NAME

    def say(msg):
        print(f"[train_overhead {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    env = environment()
    env.update(kind="environment", argv=sys.argv[1:] if argv is None else argv, budget_s=a.budget_s, steps=a.steps,
               warmup=a.warmup, profile_steps=a.profile_steps, lora=LORA, allocator_env=ENV["PYTORCH_CUDA_ALLOC_CONF"])
    append(result, env)
    say(f"environment: {env.get('nvidia_smi')}; {env.get('versions')}")
    recipe = CPU_RECIPE if a.tiny else GPU_RECIPE
    failed = False
    if a.gpu_warmup_s > 0:
        rc, wall = run_child([sys.executable, "-c", GPU_WARMUP, str(a.gpu_warmup_s)], out / "gpu_warmup.log",
                             a.gpu_warmup_s + 60)
        append(result, {"kind": "gpu_warmup", "rc": rc, "wall_s": round(wall, 1), "seconds": a.gpu_warmup_s})
        say(f"GPU warm-up: rc {rc} in {wall:.0f} s")
    for model in models:
        m = TINY if model == "tiny" else MODELS[model]
        inputs = build_inputs(out / "inputs", model, m, model == "tiny")
        append(result, {"kind": "inputs", "model": model, "recipe": recipe, "setup": m, **inputs["data_info"]})
        say(f"{model}: data {inputs['data_info']['token_lengths']}")
        runs = []
        for rep in range(a.repeats):
            walls = [r["wall_s"] for r in runs if r["status"] == "completed"]
            expected = 1.15 * max(walls) if walls else float(m["expected_s"])
            left = deadline - time.perf_counter()
            if left < 2 * expected + 10:
                say(f"{model}: pair {rep + 1} skipped, {left:.0f} s left, ~{2 * expected:.0f} s needed")
                append(result, {"kind": "skipped", "model": model, "repeat": rep, "left_s": round(left, 1),
                                "needed_s": round(2 * expected, 1)})
                break
            for side in (("vramfit", "plain") if (rep + a.plain_first) % 2 == 0 else ("plain", "vramfit")):
                timeout = deadline - time.perf_counter() - 5
                rec = one_run(side, model, inputs, m, recipe, out, a, rep, timeout)
                runs.append(rec)
                append(result, rec)
                say(f"{rec['name']}: {rec['status']} in {rec['wall_s']} s, {rec.get('tokens_per_s')} tokens/s, "
                    f"step {rec.get('step_s_median')} s, callbacks {rec.get('callbacks_ms_per_step')} ms/step")
            if any(r["status"] != "completed" for r in runs):
                break
        cmp = compare(model, runs, inputs)
        append(result, cmp)
        say(f"{model}: {cmp['verdict']}")
        failed |= bool(cmp.get("disagree")) or cmp["runs"]["vramfit"] == 0 or cmp["runs"]["plain"] == 0
    if not a.no_tracker_bench and deadline - time.perf_counter() > 30:
        rc, _ = run_child([sys.executable, "-m", "benchmarks.speed.train_overhead", "--tracker-bench", "--out",
                           str(out)], out / "tracker_bench.log", min(120.0, deadline - time.perf_counter() - 5))
        say(f"tracker bench: rc {rc}; " + (out / "tracker_bench.log").read_text().strip().splitlines()[-1][:400])
    say(f"done: {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
