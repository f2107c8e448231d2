"""`vramfit train`: MODEL + DATA -> a fine-tuned adapter or model, memory tracked against the prediction.

A recipe, read top to bottom in `train()`:
  1. the model: a directory with weights, a hub id, or `init="random"` from a config or profile
  2. the tokenizer: pad token set when missing, right padding
  3. the data (`vramfit.run.data.prepare`): format, bad rows, validation split, token lengths
  4. the setup: the user's options, or the planner's answer (`choose_setup`, the one place it is called)
  5. the prediction (`estimate_setup`) and the fit check
     ---- every user mistake above raises VramfitError; nothing is written or loaded on a GPU before here
  6. the model's objects: BitsAndBytesConfig + prepare_model_for_kbit_training (QLoRA), LoraConfig
  7. trl SFTTrainer with SFTConfig, a MemoryTracker, early stopping on validation loss, Ctrl-C
     handling, and the OOM fall-back (`fallback_setup`): free memory, a cheaper setup, continue
     from the last checkpoint
  8. the outputs: the adapter (safetensors) or the full model, the tokenizer, run_report.json,
     memory_timeline.jsonl and its plot
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from vramfit.errors import VramfitError
from vramfit.memory.setup import LEVERS, Setup, make_setup
from vramfit.planner.convert import lora_config, rename_checkpointing, training_arguments_kwargs
from vramfit.run import data as vdata
from vramfit.run.callbacks import _callback_classes, ctrl_c
from vramfit.run.fallback import (
    enforce_budget,
    fallback_setup,
    free_memory,
    load_oom_message,
    oom_measurement,
    usable_bytes,
)
from vramfit.run.model import LoadOutOfMemory, build_model, load_tokenizer, loading_phase, resolve_model
from vramfit.run.outputs import (
    REPORT_NAME,
    SETUP_NAME,
    _check_out_dir,
    _checkpoint_dir,
    _last_checkpoint,
    _run_report,
    _setup_json,
    throughput,
    _write_json,
)
from vramfit.run.predict import (
    SIMULATED_STEPS,
    apply_allocator,
    batch_lengths,
    env_allocator,
    predict,
    runtime_problem,
)
from vramfit.run.tracker import nvml_index

# The options that make a setup complete; with one missing, the planner chooses.
SETUP_FIELDS = ("method", "precision", "optim", "micro_batch", "grad_accum", "grad_ckpt")
# Learning rates that are the usual starting points: LoRA/QLoRA 2e-4 (the QLoRA paper's for
# 7B-13B), full fine-tuning 2e-5 (trl's SFTConfig default).
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
TIMELINE_NAME = "memory_timeline.jsonl"


@dataclass(frozen=True)
class RunOptions:
    """Everything about a run that is not the memory setup."""

    out_dir: str = "vramfit-run"
    init: str = "pretrained"  # pretrained | random
    tokenizer: str | None = None  # default: the model's
    data_format: str = "auto"
    on_bad_row: str = "skip"
    val_split: float = vdata.DEFAULT_VAL_SPLIT
    val_file: str | None = None
    max_seq_len: int = 2048
    seq_len_from: str = "max"  # max | p99 of the token lengths: the planner's seq_len
    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float | None = None  # default: DEFAULT_LR of the method
    warmup: float = 0.03  # a fraction of the steps (< 1) or a number of steps
    logging_steps: int = 1
    eval_steps: int | None = None  # default: a tenth of the steps
    save_steps: int | None = None  # default: eval_steps; 0: no checkpoints (nor one at the end)
    save_total_limit: int = 2
    early_stopping_patience: int = 3
    seed: int = 42
    # the order rows are trained in: transformers' TrainingArguments.train_sampling_strategy (>= 5.2),
    # "random" (a seeded shuffle per epoch) or "sequential" (the file's order: a curriculum)
    sampling: str = "random"
    # --init random with QLoRA: where the random checkpoint goes (kept, reused by runs of the same
    # config and seed); None: OUT/random-init, deleted at the end
    random_init_dir: str | None = None
    resume: bool = False
    fallback: bool = True
    fit_check: bool = True
    gpu: str | None = None  # for the planner and the fit check: auto, a profile, a size
    enforce_budget: bool = False  # cap torch's allocator so this process cannot use more than `gpu` (CUDA)
    # reserved/device peaks from a replay of the data's batch lengths; None: on a GPU (the H100
    # train proof of 2026-11-23 met the accuracy targets with it: benchmarks/results/h100-2026-11-23-train-proof-3.md)
    simulate_allocator: bool | None = None
    headroom: str = "5%"
    effective_batch: int | None = None
    trust_remote_code: bool = False
    live: bool = True  # the rich live view when the console is a terminal


# --------------------------------------------------------------------------- 4-5. setup and prediction


def trainer_loss() -> str:
    """How the run's trainer computes the loss (Setup.loss): trl's SFTTrainer scores tokens with its
    fused, chunked LM head where trl has one (`add_fused_lm_head`), else from full logits."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return "logits"
    return "fused" if hasattr(trl_utils, "add_fused_lm_head") else "logits"


def planner_restrictions(given: dict, effective_batch: int | None, gpus: int = 1) -> dict:
    """The options the user fixed, as the planner's keyword arguments; the effective batch is the
    given one, else micro-batch x accumulation x GPUs when both are fixed."""
    mb, ga = given.get("micro_batch"), given.get("grad_accum")
    effective = effective_batch or (mb * ga * gpus if mb and ga else None)
    kw = {k: given[k] for k in ("micro_batch", "lora_r", "lora_alpha", "target_modules", "precision", "optim",
                                "grad_ckpt", "attn", "allocator") if k in given}
    if effective:
        kw["effective_batch"] = effective
    return kw


LEVER_OPTIONS = (*LEVERS, "kbit_prep")  # the planner weighs kbit_prep (QLoRA) as a lever too


def packing_for(options: dict, rows_median: int | None, pack_len: int) -> bool:
    """Whether the run packs: --packing / --no-packing, else on where the planner chooses the setup and
    the rows are short (median under half of the packed row's length, `pack_len`)."""
    from vramfit.planner.levers import packing_by_default

    if options.get("packing") is not None:
        return bool(options["packing"])
    given = {k for k, v in options.items() if v is not None}
    if options.get("tokens_per_batch") is not None:
        given.add("micro_batch")
    complete = all(k in given for k in SETUP_FIELDS)
    return not complete and packing_by_default(rows_median, pack_len)


def choose_setup(spec, options: dict, seq_len: int, gpu: str | None = None, headroom: str = "5%",
                 effective_batch: int | None = None, padded: bool = False, rows_median: int | None = None):
    """The setup the run uses -> (Setup, Plan or None).  All of SETUP_FIELDS given: the user's,
    validated.  Any missing: `vramfit.planner.search.plan` chooses them, the given ones fixed.

    The memory levers (options liger, packing, activation_offloading; None: not given): with a complete
    setup, off unless given; for the planner, given ones fixed and the rest weighed by it.  With packing
    `seq_len` is the packed row's length, `tokens_per_batch` the micro-batch in tokens, and nothing is
    padded; `rows_median` (the data's, tokens) is what the plan's packing note explains itself with."""
    from vramfit.planner.levers import check_levers, micro_batch_for_tokens

    given = {k: v for k, v in options.items() if v is not None}
    tokens = given.pop("tokens_per_batch", None)
    given.setdefault("seq_len", seq_len)
    given.setdefault("loss", trainer_loss())
    given.setdefault("allocator", env_allocator())  # what this process's torch will really use
    if given.get("packing"):
        padded = False  # packed rows are flattened into one: no padding, no attention mask
    given.setdefault("padded", padded)  # rows of different lengths: batches padded, an attention mask
    check_levers(spec, liger=given.get("liger"), packing=given.get("packing"), padded=given["padded"])
    if tokens is not None:
        given["micro_batch"] = micro_batch_for_tokens(tokens, given["seq_len"], given.get("packing"),
                                                      given.get("micro_batch"))
    if given.get("packing") and rows_median:  # the memory model's packed example length: the data's
        given["extras"] = {"example_len": int(rows_median)}
    if all(k in given for k in SETUP_FIELDS):
        return make_setup(**given), None
    try:
        from vramfit.planner.search import plan
    except ImportError:
        missing = ", ".join("--" + k.replace("_", "-") for k in SETUP_FIELDS if k not in given)
        raise VramfitError(f"give {missing}: the planner that would choose them is not installed") from None
    given.pop("extras", None)  # the plan's packed setups carry rows_median themselves
    levers = {k: given.get(k) for k in LEVER_OPTIONS}
    if levers["packing"] is None:
        levers["packing"] = False  # the run decided (packing_for): the planner does not search it again
    p = plan(spec, gpu or "auto", headroom=headroom, method=given.get("method", "auto"), seq_len=given["seq_len"],
             loss=given["loss"], padded=given["padded"], rows_median=rows_median if levers["packing"] else None,
             **levers, **planner_restrictions(given, effective_batch))
    s = p.setup
    if s.method != "full" and "lora_dropout" in given:
        s = s.with_(lora_dropout=given["lora_dropout"])
    return s, p


def data_is_padded(d) -> bool:
    """Whether the trainer's batches get padding (and so an attention mask): some training row is
    shorter than the sequence length the rows are cut to, so a batch of several rows is padded to
    its longest.  (A micro-batch of one has no padding: the memory model checks that.)"""
    return d.lengths.over_max_seq_len < d.lengths.count



# --------------------------------------------------------------------------- 6-7. model and trainer



def schedule(opts: RunOptions, max_steps: int, has_eval: bool) -> dict:
    """Eval, save and logging intervals; save steps must be a multiple of eval steps for early stopping."""
    eval_steps = opts.eval_steps or max(1, max_steps // 10)
    save_steps = opts.save_steps if opts.save_steps is not None else eval_steps
    for name, v in (("--eval-steps", eval_steps), ("--logging-steps", opts.logging_steps)):
        if v <= 0:
            raise VramfitError(f"{name} must be a positive integer, got {v}")
    if save_steps < 0:
        raise VramfitError(f"--save-steps must be a positive integer or 0 (no checkpoints), got {save_steps}")
    if has_eval and save_steps == 0:
        raise VramfitError("--save-steps 0 (no checkpoints) needs --val-split 0: early stopping keeps the best "
                           "checkpoint, so checkpoints are saved at evaluations")
    if has_eval and save_steps % eval_steps:
        raise VramfitError(f"--save-steps {save_steps} must be a multiple of --eval-steps {eval_steps} (early "
                           f"stopping keeps the best checkpoint, so checkpoints are saved at evaluations)")
    return {"eval_steps": eval_steps, "save_steps": save_steps}


def sft_config(s: Setup, opts: RunOptions, output_dir: Path, max_steps: int, has_eval: bool, cuda: bool,
               assistant_only: bool):
    from trl import SFTConfig

    from vramfit.planner.levers import sft_lever_kwargs

    sched = schedule(opts, max_steps, has_eval)
    kw = rename_checkpointing(training_arguments_kwargs(s), SFTConfig)  # what `vramfit plan` prints
    kw.update(output_dir=str(output_dir), max_steps=max_steps, per_device_eval_batch_size=s.micro_batch,
              learning_rate=opts.learning_rate or DEFAULT_LR[s.method], warmup_steps=opts.warmup,
              max_length=opts.max_seq_len, packing=False, activation_offloading=False,
              assistant_only_loss=assistant_only,
              logging_steps=opts.logging_steps, save_strategy="steps" if sched["save_steps"] else "no",
              save_total_limit=opts.save_total_limit, report_to=[], seed=opts.seed, dataloader_num_workers=0,
              disable_tqdm=True, use_cpu=not cuda, include_num_input_tokens_seen="non_padding")
    if sched["save_steps"]:
        kw["save_steps"] = sched["save_steps"]
    kw.update(sft_lever_kwargs(s))  # packing (bfd, padding-free, rows of seq_len), activation offloading
    kw.update(sampling_kwargs(opts.sampling, SFTConfig))
    if has_eval:
        kw.update(eval_strategy="steps", eval_steps=sched["eval_steps"], load_best_model_at_end=True,
                  metric_for_best_model="eval_loss", greater_is_better=False)
    return SFTConfig(**kw)


SAMPLINGS = ("random", "sequential")


def sampling_kwargs(sampling: str, config_class) -> dict:
    """--sampling as TrainingArguments sees it: `train_sampling_strategy` (transformers >= 5.2); older
    versions always shuffle, so "sequential" needs a newer one."""
    if sampling not in SAMPLINGS:
        raise VramfitError(f"--sampling must be one of {', '.join(SAMPLINGS)}, got '{sampling}'")
    import dataclasses

    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(config_class)}:
        return {"train_sampling_strategy": sampling}
    if sampling != "random":
        raise VramfitError(f"--sampling {sampling} needs transformers >= 5.2 (TrainingArguments."
                           f"train_sampling_strategy); this one always shuffles")
    return {}


def assistant_only_loss(tokenizer) -> tuple[bool, str | None]:
    """Loss on the assistant turns needs `{% generation %}` markers (or trl's training version of
    the template); without them: loss on the whole conversation, and a note saying so."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )

    if has_generation_markers(tokenizer.chat_template):
        return True, None
    try:
        get_training_chat_template(tokenizer)
        return True, None
    except ValueError:
        return False, ("the chat template marks no assistant turns ({% generation %}) and trl has no training "
                       "version of it: the loss covers the whole conversation")


# --------------------------------------------------------------------------- the recipe


def train(model: str, data: str, options: RunOptions | None = None, setup_options: dict | None = None,
          callbacks=(), console=None) -> dict:
    """Fine-tune MODEL on DATA; returns the run report (also written to OUT/run_report.json).
    setup_options: method, precision, optim, lora_r, lora_alpha, lora_dropout, target_modules,
    micro_batch, grad_accum, grad_ckpt, seq_len, attn (None: the planner chooses), and the memory levers
    liger, packing, activation_offloading, tokens_per_batch (vramfit.planner.levers; packing: None packs
    where the planner chooses and the rows' median is under half of --max-seq-len, the packed row's length)."""
    import torch
    from rich.console import Console

    from vramfit import report
    from vramfit.planner.calibration import load_local_constants

    opts = options or RunOptions()
    console = console or Console()
    say = lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    out = Path(opts.out_dir).expanduser()
    saved = _check_out_dir(out, opts.resume)
    cuda = torch.cuda.is_available()

    source = resolve_model(model, opts.init, opts.trust_remote_code)  # 1
    tokenizer = load_tokenizer(source, opts.tokenizer, opts.trust_remote_code)  # 2
    d = vdata.prepare(data, tokenizer, opts.data_format, opts.on_bad_row, opts.val_split, opts.val_file,  # 3
                      opts.max_seq_len, opts.seq_len_from, opts.seed)
    for line in report.data_report_lines(d):
        say(line)
    assistant_only, loss_note = assistant_only_loss(tokenizer) if d.train.format == "messages" else (False, None)
    if loss_note:
        say("note: " + loss_note)
    plan = None  # 4
    gpu = opts.gpu or (f"cuda:{nvml_index()}" if cuda else None)  # the GPU the Trainer will use
    if saved:
        s = Setup(**saved["setup"])
        say("resuming with the saved setup: " + report.setup_label(s))
    else:
        options = dict(setup_options or {})
        if not cuda:  # Liger's kernels (triton) and activation offloading need CUDA: not weighed here
            options.update({k: False for k in ("liger", "activation_offloading") if options.get(k) is None})
        if options.get("liger") is None and importlib.util.find_spec("liger_kernel") is None:
            options["liger"] = False  # the planner may only choose what this machine can run
        pack_len = options.get("seq_len") or opts.max_seq_len
        packing = packing_for(options, d.lengths.p50, pack_len)
        if packing:
            options.update(packing=True, seq_len=pack_len)
        s, plan = choose_setup(source.spec, options, d.seq_len, gpu, opts.headroom, opts.effective_batch,
                               padded=data_is_padded(d), rows_median=d.lengths.p50)
        if plan is not None:
            console.print(report.plan_verdict(plan), highlight=False)
        if s.packing:
            say(report.packing_line(s, d))
    problem = runtime_problem(s, cuda)
    if problem:
        raise VramfitError(problem)
    constants = load_local_constants()[0]
    seq_lens = None
    if opts.simulate_allocator is None:
        opts = replace(opts, simulate_allocator=cuda)  # the run report says what was done
    if opts.simulate_allocator and not s.packing:  # the data's own padded batch lengths, replayed
        seq_lens = batch_lengths(d.row_lengths, s.micro_batch, s.seq_len, SIMULATED_STEPS, opts.seed)
    predicted = predict(source.spec, s, constants, seq_lens)  # 5
    for note in predicted.pop("notes", []):
        say("note: " + note)
    budget = usable_bytes(gpu, opts.headroom) if cuda else None
    say(report.prediction_line(s, predicted, budget))
    enforced = enforce_budget(opts.gpu, opts.headroom, constants) if opts.enforce_budget else None
    if enforced:
        say(f"budget enforced: torch's allocator is capped at {report.fmt_bytes(enforced['allocator_cap_bytes'])} "
            f"({enforced['fraction']:.4f} of this GPU) to emulate --gpu {enforced['gpu']}")
    over = budget is not None and predicted["device_bytes"] > budget
    if over and plan is not None and plan.replay is not None:  # the planner replayed it under the budget's cap
        say(f"note: the planner's allocator replay under the budget's cap fits this setup; the prediction above "
            f"(uncapped) is over it")
        over = False
    if opts.fit_check and over and not saved:
        raise VramfitError(f"{report.setup_label(s)} is predicted to need {report.fmt_bytes(predicted['device_bytes'])}"
                           f" but {report.fmt_bytes(budget)} is usable: leave out some of --method/--micro-batch/"
                           f"--grad-ckpt/... to let the planner choose, or see `vramfit plan {model}`")
    max_steps = saved["max_steps"] if saved else (
        opts.max_steps or max(1, math.ceil(opts.epochs * len(d.train.rows) / (s.micro_batch * s.grad_accum))))
    if max_steps <= 0:
        raise VramfitError(f"--max-steps must be a positive integer, got {max_steps}")
    schedule(opts, max_steps, bool(d.eval_rows))
    from trl import SFTConfig

    sampling_kwargs(opts.sampling, SFTConfig)  # --sampling sequential needs a newer transformers

    # ---- 6-8: from here on, files are written and the model is loaded
    out.mkdir(parents=True, exist_ok=True)
    run = {"setup": _setup_json(s), "max_steps": max_steps, "step_offset": (saved or {}).get("step_offset", 0),
           "base_path": (saved or {}).get("base_path")}
    _write_json(out / SETUP_NAME, run)
    runner = _Runner(source, tokenizer, d, opts, out, run, cuda, constants, assistant_only, callbacks, console,
                     budget=budget, enforced=enforced)
    try:
        status, failure = runner.run(s, predicted, resume_from=_last_checkpoint(out, s) if saved else None,
                                     resuming=bool(saved))
    except VramfitError:  # the model would not load (or ran out of memory loading): leave no half-written run behind
        if not saved and not runner.attempts:
            shutil.rmtree(out, ignore_errors=True)
        raise
    s, predicted, trainer = runner.setup, runner.predicted, runner.trainer
    outputs = {"timeline": str(out / TIMELINE_NAME), "plot": str(runner.tracker.plot_path),
               "report": str(out / REPORT_NAME)}
    if not opts.random_init_dir:
        shutil.rmtree(out / "random-init", ignore_errors=True)  # QLoRA's random weights, written to be quantized
    if trainer is not None and status != "aborted":
        target = out / ("model" if s.method == "full" else "adapter")
        trainer.save_model(str(target))
        outputs["model" if s.method == "full" else "adapter"] = str(target)
    outputs["checkpoint"] = _last_checkpoint(out, s)
    rep = _run_report(status, source, opts, d, s, plan, predicted, runner, max_steps, outputs, loss_note, cuda)
    rep["enforced_budget"] = enforced
    rep["throughput"] = throughput(source.spec, s, runner.attempts, cuda)
    _write_json(out / REPORT_NAME, rep)
    console.print(report.memory_summary_table(rep["measured"]))
    for line in report.run_summary_lines(rep):
        say(line)
    if failure:
        raise VramfitError(failure)
    return rep


class _Runner:
    """Step 7: trainer attempts, one per setup, until one finishes (the OOM fall-back between them)."""

    def __init__(self, source, tokenizer, d, opts, out, run, cuda, constants, assistant_only, callbacks, console,
                 budget: int | None = None, enforced: dict | None = None):
        from vramfit.run.tracker import MemoryTracker

        self.source, self.tokenizer, self.opts, self.out, self.run_state = source, tokenizer, opts, out, run
        self.cuda, self.constants, self.assistant_only, self.callbacks = cuda, constants, assistant_only, callbacks
        self.console, self.budget, self.enforced = console, budget, enforced
        self.train_ds = vdata.to_hf_dataset(d.train.rows)
        self.eval_ds = vdata.to_hf_dataset(d.eval_rows) if d.eval_rows else None
        self.tracker = MemoryTracker(out / TIMELINE_NAME, finish_on_train_end=False)
        GracefulStop, self.LiveView = _callback_classes()
        self.stopper = GracefulStop()
        self.attempts, self.fallbacks = [], []
        self.trainer = self.setup = self.predicted = None
        self.started = time.perf_counter()

    def say(self, line: str) -> None:
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def run(self, s: Setup, predicted: dict, resume_from: str | None, resuming: bool) -> tuple[str, str | None]:
        """-> (status, failure message or None)."""
        import torch

        self.setup, self.predicted = s, predicted
        if resuming and resume_from is None:
            self.say("no checkpoint to resume from yet: starting over")
        try:
            while True:
                try:
                    oom = self.attempt(resume_from)
                except LoadOutOfMemory as exc:
                    return self.load_failed(exc)
                if oom is None:
                    break
                resume_from, failure = self.after_oom(oom)
                if failure:
                    return "out of memory", failure
            steps = self.run_state["step_offset"] + self.trainer.state.global_step
            if self.stopper.requested:
                return "interrupted", None
            if steps < self.run_state["max_steps"]:
                return "stopped early (validation loss stopped improving)", None
            return "completed", None
        except KeyboardInterrupt:
            self.say("stopped at once: the last checkpoint and the memory timeline are kept")
            return "aborted", None
        finally:
            self.seconds = time.perf_counter() - self.started
            self.summary = self.tracker.finish()
            if self.cuda:
                torch.cuda.empty_cache()

    def attempt(self, resume_from: str | None) -> dict | None:
        """One Trainer on the current setup -> None when it finished, else what the OOM measured."""
        import torch

        s, run = self.setup, self.run_state
        steps = run["max_steps"] - run["step_offset"]
        apply_allocator(s, self.cuda)
        model = build_model(self.source, s, self.cuda, self.opts.seed, run["base_path"], self.out,
                            self.opts.random_init_dir)
        live = self.LiveView(self.console, self.tracker, steps, self.opts.live)
        what = {"full": "moving the model to the GPU", "lora": "moving the model to the GPU and adding the LoRA "
                "layers", "qlora": "adding the LoRA layers"}[s.method] if self.cuda else "setting up the trainer"
        try:
            with loading_phase(what + " (SFTTrainer)"):
                self.trainer = _trainer(model, self.tokenizer, s, self.opts, self.out, steps, self.train_ds,
                                        self.eval_ds, self.cuda, self.assistant_only,
                                        [self.tracker, live, self.stopper, *self.callbacks])
        except LoadOutOfMemory:
            live.close()
            raise
        finally:
            del model  # the trainer holds it; a failed attempt's frame must not
        self.tracker.begin_attempt(_setup_json(s), self.predicted)
        oom, done = None, False
        try:
            with ctrl_c(self.stopper, self.say):
                self.trainer.train(resume_from_checkpoint=resume_from)
            done = True
        except torch.OutOfMemoryError as exc:
            self.tracker.event("out of memory", error=str(exc).splitlines()[0][:300] if str(exc) else "")
            oom = oom_measurement(exc, self.tracker, self.predicted)
        finally:
            live.close()
            history = self.trainer.state.log_history
            self.attempts.append({
                "setup": _setup_json(s), "predicted": self.predicted, "measured": self.tracker.attempt_peaks(),
                "outcome": "out of memory" if oom else "finished" if done else "aborted",
                "last_step": run["step_offset"] + self.trainer.state.global_step, "step_clock": live.clock(),
                "losses": [{"step": h["step"] + run["step_offset"], "loss": h["loss"]} for h in history if "loss" in h],
                "eval_losses": [{"step": h["step"] + run["step_offset"], "eval_loss": h["eval_loss"]}
                                for h in history if "eval_loss" in h]})
        return oom

    def load_failed(self, exc: LoadOutOfMemory) -> tuple[str, str]:
        """Out of memory before the first step of an attempt: freed, explained (phase, budget, the next
        setup to try).  The first attempt: a user error, nothing written; a fall-back's: the run's failure."""
        free_memory(self.trainer)
        self.trainer = None
        msg = load_oom_message(self.source.spec, self.setup, exc.phase, exc.error, self.predicted, self.budget,
                               self.enforced, self.cuda, self.constants,
                               self.source.local_dir or self.source.path or self.source.name, self.opts.gpu)
        if not self.attempts:
            raise VramfitError(msg) from None
        self.tracker.event("out of memory", phase=exc.phase, error=exc.error)
        return "out of memory", msg

    def after_oom(self, oom: dict) -> tuple[str | None, str | None]:
        """Free the failed attempt, pick the next setup -> (checkpoint to resume from, failure)."""
        from vramfit import report

        s, run = self.setup, self.run_state
        step = self.attempts[-1]["last_step"] + 1
        free_memory(self.trainer)
        self.trainer = None
        new, new_pred = fallback_setup(self.source.spec, s, oom["scale"], oom["cap_bytes"], self.cuda,
                                       self.constants) if self.opts.fallback else (None, None)
        if new is None:
            why = "the fall-back is off (--no-fallback)" if not self.opts.fallback else \
                "no cheaper setup is predicted to fit once scaled by the measured overshoot"
            return None, (f"out of memory at step {step} with {report.setup_label(s)} ({oom['error']}); {why}. "
                          f"The memory timeline is in {self.out / TIMELINE_NAME}")
        resume_from = _last_checkpoint(self.out, s)
        if new.method != s.method and s.method == "full":  # a LoRA on the last full weights, fresh optimizer
            done = int(resume_from.rsplit("-", 1)[1]) if resume_from else 0
            run["base_path"] = resume_from or run["base_path"]
            run["step_offset"] += done
            resume_from = None
        self.fallbacks.append({"step": step, "setup_before": _setup_json(s), "setup_after": _setup_json(new),
                               "resumed_from": resume_from, "base_path": run["base_path"],
                               "predicted_bytes": self.predicted["peak_allocated_bytes"],
                               **{k: oom[k] for k in ("measured_bytes", "tried_bytes", "scale", "cap_bytes", "error")}})
        self.say(report.fallback_line(self.fallbacks[-1]))
        self.tracker.event("re-planned", setup=_setup_json(new), predicted=new_pred)
        self.setup, self.predicted = new, new_pred
        run["setup"] = _setup_json(new)
        _write_json(self.out / SETUP_NAME, run)
        return resume_from, None


def _trainer(model, tokenizer, s, opts, out, max_steps, train_ds, eval_ds, cuda, assistant_only, callbacks):
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    args = sft_config(s, opts, _checkpoint_dir(out, s), max_steps, eval_ds is not None, cuda, assistant_only)
    if eval_ds is not None and opts.early_stopping_patience > 0:
        callbacks = [*callbacks, EarlyStoppingCallback(early_stopping_patience=opts.early_stopping_patience)]
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=lora_config(s, model), callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # our LiveView prints the progress
    return trainer


