"""The loop's step records: every log interval, the means of the step metrics since the last
record (their one host sync), plus what the objective's extras add (throughput.py), written to
metrics.jsonl and TensorBoard (metrics.py). A non-finite loss stops the run there."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from gptjax.errors import UserError
from gptjax.loop import Every, Hook, Run


def summarise(metrics: list[dict], nan_message: str) -> dict:
    """One record from the step metrics of a log interval: the loss, then the other means by
    name, the last learning rate, the summed target tokens."""
    host = jax.device_get(metrics)
    names = ["loss"] + sorted(k for k in host[0] if k not in ("loss", "lr", "tokens"))
    out = {key: float(np.mean([r[key] for r in host])) for key in names}
    out["lr"] = float(host[-1]["lr"])
    if "tokens" in host[0]:
        out["loss_tokens"] = int(float(sum(r["tokens"] for r in host)))
    if not np.isfinite(out["loss"]):
        raise UserError(nan_message.format(out["loss"]))
    return out


class LogRecords(Hook):
    """`nan_message`: "the ... loss became {}; <what to change>". Each of `extras(done, run,
    steps)` adds its fields to the record of the `steps` steps up to `done`."""

    training_time = True  # its host sync waits for the steps themselves

    def __init__(self, every: Every, nan_message: str, extras: list[Callable[[int, Run, int], dict]] = ()):
        self.every, self.nan_message, self.extras = every, nan_message, list(extras)

    def after(self, done: int, run: Run) -> None:
        record = {"step": done, **summarise(run.pending, self.nan_message)}
        for extra in self.extras:
            record.update(extra(done, run, len(run.pending)))
        run.pending = []
        run.history.append(record)
        run.write(record)
