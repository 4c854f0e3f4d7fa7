"""Prediction files in the GLUE submission format: `index<TAB>prediction` lines sorted by index.

`write_predictions` writes any split's predictions to a given path; `write_submission` writes the
file the GLUE server expects for a task's test split (SST-2.tsv, MNLI-m.tsv, ...) into a folder.
They differ only for regression: the server's file holds scores clipped to the task's range and
rounded to 3 decimals, a predictions file the scores exactly as they were scored, so that metrics
recomputed from it are the ones in metrics.json.
"""

from __future__ import annotations

import os

import numpy as np

from gptjax.errors import UserError
from gptjax.tasks.registry import get_task
from gptjax.tasks.task import SUBMISSION_HEADER, Task


def write_predictions(path: str | os.PathLike, idx, predictions, task: Task | str,
                      for_submission: bool = False) -> None:
    """Writes `SUBMISSION_HEADER` then one line per example, sorted by idx (batches and TFDS
    records arrive in any order). A label is spelled as `task.format_prediction` spells it; a
    regression score as the shortest text that reads back as the same number of its dtype
    (float32 stays float32), or, `for_submission`, as the GLUE server expects it."""
    task = get_task(task)
    idx, predictions = np.asarray(idx, np.int64), np.asarray(predictions)
    if idx.ndim != 1 or predictions.ndim != 1 or len(idx) != len(predictions):
        raise UserError(f"task {task.name}: got indices of shape {idx.shape} for predictions of "
                        f"shape {predictions.shape}; there must be one prediction per index")
    order = np.argsort(idx, kind="stable")
    idx, predictions = idx[order], predictions[order]
    repeated = idx[1:][idx[1:] == idx[:-1]]
    if repeated.size:
        raise UserError(f"task {task.name}: index {repeated[0]} has more than one prediction "
                        f"({np.unique(repeated).size} indices repeat); was an example evaluated twice?")
    # str of a numpy float is the shortest text that reads back as it; repr(float(x)) would spell
    # a float32 with 17 digits where 9 or fewer say the same.
    spell = str if task.is_regression and not for_submission else task.format_prediction
    # Formatted before the file is opened, so a bad label id leaves nothing behind.
    lines = [SUBMISSION_HEADER] + [f"{i}\t{spell(p)}" for i, p in zip(idx, predictions)]

    # Written beside the target and renamed over it: a crash leaves the old file or none, never
    # half a file that the server would reject (or, worse, score as missing predictions).
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_submission(directory: str | os.PathLike, task: Task | str, split: str, idx, predictions,
                     allow_partial: bool = False) -> str:
    """Writes `directory/<task.submission_file(split)>` and returns its path.

    A file with fewer (or more) lines than the official split is rejected by the GLUE server, so
    the count is checked against `task.num_examples` first; `allow_partial` skips the check for
    trial runs on a subset.
    """
    task = get_task(task)
    path = os.path.join(os.fspath(directory), task.submission_file(split))
    expected = dict(task.num_examples).get(split)
    got = len(predictions)
    if expected is not None and got != expected and not allow_partial:
        raise UserError(f"task {task.name}, split {split}: expected {expected} predictions (the "
                        f"official split size) but got {got}; pass allow_partial=True to write "
                        f"a partial file anyway")
    write_predictions(path, idx, predictions, task, for_submission=True)
    return path
