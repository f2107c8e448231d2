"""The allocator replay fed the proof data's own batch lengths, against the H100 train-proof runs.

    python -m benchmarks.train_proof.replay_lengths [--steps 50]

The `vramfit train` runs of the proof pad each batch to its longest row.  Here, on the CPU:
1. the trainer's real batch order: a tiny random Llama trained by `vramfit train` on the proof's data,
   seed and micro-batch (the sampler does not depend on the model; its logged token counts equal the
   H100 run's), recording each batch's padded length;
2. the two-step meta replay of vramfit.memory.events with those lengths, fed to vramfit.memory.allocator
   under both allocator settings, for Mistral-7B LoRA and full fine-tuning (the runs' setups);
3. the same with two other shuffles of the rows (`vramfit.run.predict.batch_lengths`, which is what
   `vramfit train --simulate-allocator` uses), and with the first 25 steps only.
Measured on the H100 (benchmarks/results/h100-2026-11-23-train-proof{,-2}): 7B LoRA allocated
35.49 GiB, reserved 39.14 (default allocator) and 35.66 (expandable); 7B full 41.95 and 49.30 (default).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

G = 2 ** 30
RUNS = (("7b-lora", "mistral-7b-v0.1", dict(method="lora", precision="bf16-true", optim="adamw_torch_fused",
                                             lora_r=16, target_modules="all-linear")),
        ("7b-full", "mistral-7b-v0.1", dict(method="full", precision="bf16-true", optim="adamw_bnb_8bit")))
MEASURED = {"7b-lora": (35.49, 39.14, 35.66), "7b-full": (41.95, 49.30, None)}


def trainer_lengths(work: Path, micro_batch: int, steps: int) -> list:
    from transformers import TrainerCallback

    import vramfit.run.train as vt
    from benchmarks.train_proof import run as proof

    inputs = proof.build_inputs(work)
    lens = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            def hook(m, a, k):
                ids = k.get("input_ids", a[0] if a else None)
                if ids is not None and m.training:
                    lens.append(int(ids.shape[-1]))
            model.register_forward_pre_hook(hook, with_kwargs=True)

    import io

    import datasets
    from rich.console import Console

    datasets.disable_progress_bars()
    shutil.rmtree(work / "out", ignore_errors=True)
    opts = vt.RunOptions(out_dir=str(work / "out"), init="random", tokenizer=inputs["tokenizer"],
                         max_seq_len=proof.MAX_SEQ_LEN, val_split=0, save_steps=0, max_steps=steps, seed=42,
                         live=False)
    setup = dict(method="lora", precision="32-true", optim="adamw_torch", micro_batch=micro_batch, grad_accum=1,
                 grad_ckpt=False)
    vt.train(inputs["tiny"], inputs["data"], opts, setup, callbacks=[Record()], console=Console(file=io.StringIO()))
    return lens, inputs


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    from vramfit.run import data as vdata
    from vramfit.memory.events import training_events
    from vramfit.memory.allocator import simulate
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.model.spec import load_spec
    from vramfit.run.predict import batch_lengths

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--work", default="/tmp/vramfit-replay-lengths")
    a = ap.parse_args(argv)
    import os
    import platform

    from vramfit.versions import installed

    versions = installed("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes")
    print(f"# CPU replay (no GPU): {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
          + "; measured peaks from the H100 runs in benchmarks/results/h100-2026-11-23-train-proof{,-2}", flush=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    real, inputs = trainer_lengths(work, 4, a.steps)
    tok = AutoTokenizer.from_pretrained(inputs["tokenizer"])
    d = vdata.prepare(inputs["data"], tok, max_seq_len=512, val_split=0)
    rows = d.row_lengths
    orders = {"trainer's order": real, "shuffle seed 1": batch_lengths(rows, 4, 512, a.steps, 1),
              "shuffle seed 2": batch_lengths(rows, 4, 512, a.steps, 2), "trainer's order, 25 steps": real[:25]}
    print(f"trainer's padded batch lengths ({len(real)} steps): {real}", flush=True)
    for name, model, kw in RUNS:
        spec = load_spec(model)
        s = make_setup(seq_len=512, micro_batch=4, loss="fused", padded=True, **kw)
        alloc_m, default_m, exp_m = MEASURED[name]
        print(f"\n{name} ({model}, {s.method} {s.precision} {s.optim}, micro-batch 4): measured allocated {alloc_m}, "
              f"reserved {default_m} (default) / {exp_m or '-'} (expandable) GiB", flush=True)
        for label, lens in orders.items():
            t = time.perf_counter()
            ev = training_events(spec, s, resolve_targets(spec, s), seq_lens=lens)["events"]
            res = {exp: simulate(ev, expandable_segments=exp) for exp in (False, True)}
            print(f"  {label:28s} allocated {res[False]['peak_allocated'] / G:6.2f}  reserved "
                  f"{res[False]['peak_reserved'] / G:6.2f} (default) / {res[True]['peak_reserved'] / G:6.2f} "
                  f"(expandable) GiB  [{time.perf_counter() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
