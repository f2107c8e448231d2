"""`vramfit train` with an out-of-memory error injected, for the CPU dry run of the OOM fall-back:

    python3 -m benchmarks.train_proof.inject --oom-above 320 -- train MODEL DATA ...

raises torch.OutOfMemoryError from the model's forward in the first step whose batch is wider than
--oom-above tokens, once: where a capped GPU allocator runs out with the same data, seed and
micro-batch.  A CPU has no allocator to exhaust; on a GPU the proof uses --enforce-budget instead.
"""

from __future__ import annotations

import sys


def main() -> None:
    import torch
    from transformers import TrainerCallback

    import vramfit.run.train as vt
    from vramfit.cli import main as cli_main

    argv = sys.argv[1:]
    split = argv.index("--")
    above = int(argv[argv.index("--oom-above") + 1])

    class OomOnWideBatch(TrainerCallback):
        def __init__(self):
            self.fired = False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def hook(module, args_, kwargs_):
                ids = kwargs_.get("input_ids", args_[0] if args_ else None)
                if not self.fired and ids is not None and ids.shape[-1] > above:
                    self.fired = True
                    raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 1.00 GiB. (injected: "
                                                 f"batch of {ids.shape[-1]} tokens > {above})")

            model.register_forward_pre_hook(hook, with_kwargs=True)

    real_train = vt.train
    injector = OomOnWideBatch()

    def train(*a, callbacks=(), **kw):
        return real_train(*a, callbacks=[*callbacks, injector], **kw)

    vt.train = train
    sys.argv = [sys.argv[0], *argv[split + 1:]]
    cli_main()


if __name__ == "__main__":
    main()
