"""When the loop saves: a checkpoint at its cadence, and one at a stop signal if that step has
none yet; a save that failed in the background stops the run at the next step, not at the
next save. checkpoint.py does the writing (in the background: the loop waits only while the
arrays are copied off the devices)."""

from __future__ import annotations

import os
import time
from typing import Callable

from gptjax import checkpoint
from gptjax.loop import Every, Hook, Run


class Checkpoints(Hook):
    """`meta(step)`: the checkpoint's metadata; `tokenizer_bytes` are saved beside every one."""

    def __init__(self, checkpointer: checkpoint.Checkpointer, every: Every, meta: Callable[[int], dict],
                 tokenizer_bytes: bytes | None):
        self.checkpointer, self.every, self.meta, self.tokenizer_bytes = checkpointer, every, meta, tokenizer_bytes
        self.saved = None  # the newest step on disk (or being written)
        self.blocked: list[float] = []  # seconds each save held up the loop

    def begin(self, run: Run) -> None:
        self.saved = run.start

    def before(self, step: int, run: Run) -> None:
        self.checkpointer.check()

    def after(self, done: int, run: Run) -> None:
        self.save(done, run)

    def save(self, step: int, run: Run) -> None:
        state, began = run.runner.state, time.perf_counter()
        self.checkpointer.save(step, state.params, state.opt_state, self.meta(step), self.tokenizer_bytes)
        self.blocked.append(round(time.perf_counter() - began, 4))  # the loop's wait; writing goes on behind it
        self.saved = step
        run.checkpoint = os.path.join(self.checkpointer.directory, str(step))

    def stopping(self, done: int, run: Run) -> None:
        if self.saved != done:
            self.save(done, run)
        self.checkpointer.wait()

    def end(self, run: Run, finished: bool) -> None:
        if finished:
            self.checkpointer.wait()
