"""The run's trainer callbacks (the live view, a graceful stop) and Ctrl-C handling: the first
Ctrl-C finishes the step and saves, a second stops at once."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager



def _callback_classes():
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        """First Ctrl-C: finish the step, save a checkpoint, stop.  Second: stop now."""

        def __init__(self):
            self.requested = False

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True

    class LiveView(TrainerCallback):
        """Progress and memory against the prediction: a rich live view in a terminal, plain lines
        (one per logging step) in a pipe."""

        def __init__(self, console, tracker, max_steps, enabled):
            self.console, self.tracker, self.max_steps = console, tracker, max_steps
            self.use_live = enabled and console.is_terminal
            self.live = None
            self.loss = self.eval_loss = None
            self.t0 = time.perf_counter()
            self.tokens0 = None
            # the training steps' own clock (MFU): from the second step on, each step's wall between its
            # on_step_begin and on_step_end and its real tokens; evaluation and saving fall outside
            self.step_begin = None
            self.steps = self.step_tokens = 0
            self.step_seconds = 0.0

        def status(self, state):
            from vramfit.report import train_status

            elapsed = time.perf_counter() - self.t0
            if self.tokens0 is None:
                self.tokens0 = state.num_input_tokens_seen
            tokens = (state.num_input_tokens_seen - self.tokens0) / elapsed if elapsed > 0 else None
            return train_status(state.global_step, self.max_steps, elapsed, tokens, self.loss, self.eval_loss,
                                self.tracker.last, self.tracker.predicted)

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
            if self.use_live and self.live is None:
                from rich.live import Live

                self.live = Live(console=self.console, refresh_per_second=2, transient=False)
                self.live.start()

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_begin = (time.perf_counter(), state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            if self.step_begin is not None and state.global_step >= 2:
                t, tokens = self.step_begin
                self.steps += 1
                self.step_seconds += time.perf_counter() - t
                self.step_tokens += state.num_input_tokens_seen - tokens
            if self.live is not None:
                from vramfit.report import train_live

                self.live.update(train_live(self.status(state), self.tracker.capacity_bytes))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            self.loss = logs.get("loss", self.loss)
            self.eval_loss = logs.get("eval_loss", self.eval_loss)
            if self.live is None and ("loss" in logs or "eval_loss" in logs):
                from vramfit.report import train_status_line

                self.console.print(train_status_line(self.status(state)), highlight=False, markup=False,
                                   soft_wrap=True)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def clock(self) -> dict:
            """{"steps", "seconds", "tokens"} of the timed steps (the second on)."""
            return {"steps": self.steps, "seconds": round(self.step_seconds, 4), "tokens": self.step_tokens}

        def close(self):
            if self.live is not None:
                self.live.stop()
                self.live = None

    return GracefulStop, LiveView


@contextmanager
def ctrl_c(stopper, say):
    """SIGINT -> stopper.requested (the run stops after the step, with a checkpoint); a second
    SIGINT raises KeyboardInterrupt.  Only the main thread can take signals: elsewhere, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stopper.requested:
            raise KeyboardInterrupt
        stopper.requested = True
        say("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
