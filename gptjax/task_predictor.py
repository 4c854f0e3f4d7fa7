"""A task model's predictions for encoded examples: its jitted forward pass on a mesh, run over
padded batches by batched_forward. The predictor holds no parameters: each call brings the ones
to predict with, so fine-tuning predicts with its current ones and evaluation with a run's best
checkpoint (evaluate.load_finetuned), through the same code.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
from flax import nnx

from gptjax import sharding
from gptjax.batched_forward import forward_in_batches, padded_batch_size
from gptjax.errors import UserError
from gptjax.tasks import transforms


def predict_step(graphdef, params, batch):
    logits, _ = nnx.merge(graphdef, params)(batch["tokens"], batch["extract"])
    return logits


def predictions(task, logits: np.ndarray) -> np.ndarray:
    """The predicted score (regression) or label id of each row of task logits."""
    return logits[:, 0] if task.type == "regression" else logits.argmax(-1)


def check_batch_size(batch_size: int, mesh) -> None:
    """A prediction batch must split evenly over the devices of the batch axis."""
    if padded_batch_size(batch_size, mesh) != batch_size:
        rows = padded_batch_size(1, mesh)
        raise UserError(f"finetune.eval_batch_size ({batch_size}) must be divisible "
                        f"by the {rows} devices the batch is split over (mesh.data x mesh.fsdp)")


class TaskPredictor:
    """Task logits and predictions of a TaskModel (model.py) on `mesh`, `batch_size` examples per
    forward pass; no parameters and no optimizer state of its own."""

    def __init__(self, graphdef, task, mesh, batch_size: int):
        """`graphdef`: the TaskModel's, built for `task`'s head (init_task_model); `task`: what the
        logits predict (a label or a score)."""
        check_batch_size(batch_size, mesh)
        self.task, self.mesh, self.batch_size = task, mesh, batch_size
        # Replicated logits: every process reads the whole batch's, however the rows were split.
        self._predict = jax.jit(partial(predict_step, graphdef), out_shardings=sharding.replicated(mesh))

    def logits(self, encoded: transforms.Encoded, params) -> np.ndarray:
        """Task logits [n, ...] of every example under `params` (laid out on this mesh)."""
        rows = {"tokens": encoded.tokens, "extract": encoded.extract}
        return forward_in_batches(partial(self._predict, params), rows, self.batch_size, self.mesh)

    def predict(self, encoded: transforms.Encoded, params) -> np.ndarray:
        """The predicted label id (or score, for regression) of every example under `params`."""
        return predictions(self.task, self.logits(encoded, params))
