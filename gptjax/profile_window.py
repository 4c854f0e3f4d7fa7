"""train.profile_steps: a JAX profiler trace of steps [from, to] (counted from 1) into
WORKDIR/profile, for TensorBoard's profile plugin or Perfetto."""

from __future__ import annotations

import os

import jax

from gptjax.loop import Hook, Run


class ProfileWindow(Hook):
    def __init__(self, steps: tuple[int, int]):
        self.first, self.last = steps
        self.tracing = False

    def before(self, step: int, run: Run) -> None:
        # The window's first step, or the first step of a run resumed inside the window.
        if self.first and not self.tracing and self.first <= step + 1 <= self.last:
            jax.profiler.start_trace(os.path.join(run.workdir, "profile"))
            self.tracing = True

    def after(self, done: int, run: Run) -> None:
        if self.tracing and done == min(self.last, run.total):
            jax.block_until_ready(run.pending[-1])
            jax.profiler.stop_trace()
            self.tracing = False

    def end(self, run: Run, finished: bool) -> None:
        if self.tracing:  # stopped early (an error, SIGTERM): the trace so far is still written
            jax.profiler.stop_trace()
            self.tracing = False
