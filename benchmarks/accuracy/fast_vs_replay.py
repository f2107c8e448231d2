"""The fast model's phase peaks against the allocator replay's, on the CPU: where they part.

    python -m benchmarks.accuracy.fast_vs_replay [--method qlora] [--precision bf16-true]

The replay (vramfit.memory.events: every allocation and free of two Trainer steps on the meta
device) matches measured per-phase peaks to a few MiB where its stream is complete (see
benchmarks/accuracy/replay_phases.py and memory_history.py), so on setups of that kind it is a
reference the fast model (vramfit.memory, the planner's) can be checked against without a GPU.
Printed per case and checkpointing on/off: the forward and backward allocated peaks of the second
step, and the fast model's backward error against the replay.
"""

from __future__ import annotations

import argparse

MiB = 1 << 20
CASES = (("phi-3-mini", {"num_hidden_layers": 8}, 1024, 4), ("tinyllama-1.1b", None, 1024, 4),
         ("llama-2-7b", {"num_hidden_layers": 8}, 1024, 2), ("mistral-7b-v0.1", {"num_hidden_layers": 8}, 2048, 2),
         ("qwen2.5-3b", None, 512, 4), ("llama-3.2-1b", None, 1024, 4))


def main(argv=None) -> None:
    from benchmarks.accuracy.replay_phases import phase_peaks
    from vramfit.memory.events import training_events
    from vramfit.memory.estimate import estimate_setup
    from vramfit.memory.setup import make_setup, resolve_targets
    from vramfit.model.spec import load_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="qlora")
    ap.add_argument("--precision", default="bf16-true")
    a = ap.parse_args(argv)
    print(f"{a.method} {a.precision}, all-linear r16, adamw_torch; MiB, step 2 of the replay")
    for model, overrides, seq, batch in CASES:
        spec = load_spec(model, overrides=overrides)
        for ckpt in (True, False):
            s = make_setup(a.method, precision=a.precision, optim="adamw_torch", seq_len=seq, micro_batch=batch,
                           grad_ckpt=ckpt, target_modules="all-linear", lora_r=16)
            r = training_events(spec, s, resolve_targets(spec, s), steps=2)
            peaks = phase_peaks(r["events"], r["marks"])
            fast = estimate_setup(spec, s)[0].phases
            rb, rf = peaks["step1.backward"], peaks["step1.forward"]
            name = model + (f"[{overrides}]" if overrides else "")
            print(f"{name:44s} ckpt={int(ckpt)} s{seq}xb{batch}  replay fwd {rf / MiB:7.0f} bwd {rb / MiB:7.0f} | "
                  f"fast fwd {fast['forward'] / MiB:7.0f} bwd {fast['backward'] / MiB:7.0f} | "
                  f"backward {(fast['backward'] - rb) / rb:+.1%}", flush=True)


if __name__ == "__main__":
    main()
