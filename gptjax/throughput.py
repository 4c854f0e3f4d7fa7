"""Throughput fields of a pretraining step record: tokens/s, step time, device memory, MFU, and
how long the last checkpoint save held up the loop.

The window of a record runs from the previous record, less the time the loop spent in hooks
that are not training (evaluation, saving, the progress bar). The first window includes
compilation, so it reports `first_step_s` and no MFU. Fine-tuning records carry none of these:
they hold numbers alone, so two runs of the same job compare exactly.
"""

from __future__ import annotations

import time

import jax

from gptjax.loop import Run
from gptjax.mfu import mfu


class Throughput:
    """An extra of records.LogRecords. `tokens_per_step`: every token a step processes, padding
    and all; `saves`: the saving.Checkpoints hook whose blocking times it reports."""

    def __init__(self, tokens_per_step: int, flops_per_token: float | None, saves=None):
        self.tokens_per_step, self.flops_per_token, self.saves = tokens_per_step, flops_per_token, saves
        self._since = None  # (wall clock, run.hook_seconds) at the start of the window
        self._reported = 0  # saves already in a record

    def __call__(self, done: int, run: Run, steps: int) -> dict:
        now = time.perf_counter()
        began, hooks_then = self._since or (run.began, 0.0)
        elapsed = now - began - (run.hook_seconds - hooks_then)
        self._since = (now, run.hook_seconds)
        tokens_per_sec = self.tokens_per_step * steps / elapsed
        out = {"tokens_per_sec": round(tokens_per_sec, 1), "step_ms": round(1000 * elapsed / steps, 2)}
        memory = jax.local_devices()[0].memory_stats()  # None where the backend keeps no count
        if memory and "bytes_in_use" in memory:
            out["memory_gib"] = round(memory["bytes_in_use"] / 2**30, 3)
        if done == run.start + 1:
            out["first_step_s"] = round(elapsed, 3)  # compilation included: not throughput
        else:
            util = mfu(self.flops_per_token, tokens_per_sec)
            if util is not None:
                out["mfu"] = round(util, 4)
        blocked = self.saves.blocked if self.saves is not None else []
        if len(blocked) > self._reported:  # a save since the last record
            out["checkpoint_blocked_s"], self._reported = blocked[-1], len(blocked)
        return out
