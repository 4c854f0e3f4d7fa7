"""Task metrics (Matthews, accuracy, F1, Pearson, Spearman) in plain numpy, and the GLUE average.

Scores are fractions (accuracy 0.9, not 90). Every metric returns a finite number where its
textbook definition is undefined, because a NaN would poison the GLUE average and make every
"is this checkpoint better?" comparison false.
"""

from __future__ import annotations

import numpy as np

from gptjax.errors import UserError
from gptjax.tasks.registry import get_task
from gptjax.tasks.task import Task

GLUE_AVERAGE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
# MNLI is scored on two dev/test halves; they are one task's two numbers (PAPER_FACTS, "GLUE").
MNLI_HALVES = ("mnli_matched", "mnli_mismatched")


def _pair(labels, predictions, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    labels, predictions = np.asarray(labels, dtype), np.asarray(predictions, dtype)
    if labels.ndim != 1 or predictions.ndim != 1:
        raise UserError(f"labels and predictions must be flat sequences, got shapes {labels.shape} "
                        f"and {predictions.shape}")
    if len(labels) != len(predictions):
        raise UserError(f"cannot score {len(predictions)} predictions against {len(labels)} labels: "
                        f"there must be one prediction per labelled example")
    if labels.size == 0:
        raise UserError("cannot score an empty split: there are no examples")
    return labels, predictions


def matthews(labels, predictions) -> float:
    """Matthews' correlation; for K > 2 classes Gorodkin's R_K, the GLUE diagnostic's R3.

    With C the confusion matrix, t_k / p_k the true / predicted counts of class k, c = trace(C)
    and s = sum(C): (c*s - sum t_k p_k) / sqrt((s^2 - sum p_k^2) (s^2 - sum t_k^2)); for two
    classes this is the usual (tp*tn - fp*fn) / sqrt(...). 0.0 when a side is constant.
    """
    labels, predictions = _pair(labels, predictions)
    _, ids = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    k = ids.max() + 1
    confusion = np.bincount(ids[:labels.size] * k + ids[labels.size:], minlength=k * k).reshape(k, k)
    confusion = confusion.astype(np.float64)  # s^2 overflows nothing in float64 at QQP's size
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def accuracy(labels, predictions) -> float:
    labels, predictions = _pair(labels, predictions)
    return float(np.mean(labels == predictions))


def f1(labels, predictions, positive=1) -> float:
    """F1 of the `positive` class, 2tp / (2tp + fp + fn); 0.0 with no true and no predicted positives."""
    labels, predictions = _pair(labels, predictions)
    tp = np.sum((predictions == positive) & (labels == positive))
    fp = np.sum((predictions == positive) & (labels != positive))
    fn = np.sum((predictions != positive) & (labels == positive))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def pearson(labels, predictions) -> float:
    """Pearson's r; 0.0 when either side is constant.

    r is 0/0 there (scipy returns NaN). A constant predictor carries no information about the
    labels, so 0 — no linear relation — is its fair score, and it keeps averages finite.
    """
    labels, predictions = _pair(labels, predictions, np.float64)
    x, y = labels - labels.mean(), predictions - predictions.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(np.clip(x @ y / denominator, -1.0, 1.0)) if denominator > 0 else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span (scipy's "average")."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], values.size)  # exclusive
    mean_rank = (starts + 1 + ends) / 2  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(values.size)
    ranks[order] = mean_rank[np.cumsum(starts_group) - 1]
    return ranks


def spearman(labels, predictions) -> float:
    """Spearman's rho: Pearson's r of the ranks; 0.0 when a side is constant (see `pearson`)."""
    labels, predictions = _pair(labels, predictions, np.float64)
    return pearson(_ranks(labels), _ranks(predictions))


_METRICS = {"matthews": matthews, "accuracy": accuracy, "f1": f1, "pearson": pearson, "spearman": spearman}


def task_scores(task: Task | str, labels, predictions) -> dict[str, float]:
    """The task's metrics, in `task.metrics` order; predictions are label ids, or floats for regression."""
    task = get_task(task)
    dtype = np.float64 if task.is_regression else np.int64
    labels, predictions = _pair(labels, predictions, dtype)
    # Test splits carry label -1 (TFDS) or none; scoring them would report a meaningless number.
    if not task.is_regression and (labels.min() < 0 or labels.max() >= task.num_labels):
        raise UserError(f"task {task.name}: labels must be ids 0..{task.num_labels - 1}, found "
                        f"{labels.min()}..{labels.max()}; test splits have no labels to score")
    return {m: _METRICS[m](labels, predictions) for m in task.metrics}


def main_score(task: Task | str, scores: dict[str, float]) -> float:
    """What the task contributes to the GLUE average: the mean of its metrics."""
    return float(np.mean([scores[m] for m in get_task(task).metrics]))


def glue_average(results: dict[str, float]) -> tuple[float, list[str]]:
    """(mean main score over the GLUE tasks in `results`, the GLUE tasks missing from it).

    `results` maps an entry (a task name, or an MNLI half) to its main score. The MNLI halves are
    averaged into one MNLI number first, so MNLI weighs as one task, not two. AX is a diagnostic,
    not a task of the average, and other entries (synthetic_*) are not GLUE: both are ignored.
    NaN when no GLUE task is present.
    """
    by_task: dict[str, list[float]] = {}
    for entry, score in results.items():
        name = entry.lower()
        name = "mnli" if name in MNLI_HALVES else name
        if name in GLUE_AVERAGE_TASKS:
            by_task.setdefault(name, []).append(float(score))
    missing = [t for t in GLUE_AVERAGE_TASKS if t not in by_task]
    if not by_task:
        return float("nan"), missing
    return float(np.mean([np.mean(scores) for scores in by_task.values()])), missing
