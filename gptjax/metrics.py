"""WORKDIR/metrics.jsonl: one JSON object per logged step (and one per evaluation), and the same
numbers as TensorBoard scalars under WORKDIR/tensorboard (`tensorboard --logdir WORKDIR`)."""

from __future__ import annotations

import json
import math
import os

from gptjax.tensorboard import SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps every line
        self._board = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        # "eval_loss" -> eval/loss; everything else numeric -> train/<name>.
        scalars = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._board.scalars(record["step"], scalars)
        self._board.flush()

    def close(self) -> None:
        self._file.close()
        self._board.close()


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
