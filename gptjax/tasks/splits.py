"""Where a task's examples come from: the config's `task_data` strings -> readers."""

from __future__ import annotations

from gptjax.errors import UserError
from gptjax.tasks.example import Example
from gptjax.tasks.registry import Task, get_task

SOURCE_FORMS = "auto, synthetic, tfds, tfds:<data_dir>, tsv:<GLUE folder>, jsonl:<folder>"


def resolve_source(task: Task, task_data: str) -> str:
    """`auto` -> synthetic for the synthetic tasks, tfds for GLUE; other values are checked."""
    task_data = task_data.strip()
    synthetic = task.name.startswith("synthetic_")
    if task_data == "auto":
        return "synthetic" if synthetic else "tfds"
    kind = task_data.split(":", 1)[0]
    if kind not in ("synthetic", "tfds", "tsv", "jsonl") or (kind in ("tsv", "jsonl") and ":" not in task_data):
        raise UserError(f"task_data '{task_data}' is not one of: {SOURCE_FORMS}")
    if (kind == "synthetic") != synthetic and kind != "jsonl":
        raise UserError(f"task {task.name} cannot be read from task_data '{task_data}'; use "
                        f"{'synthetic' if synthetic else 'tfds, tsv:<GLUE folder> or jsonl:<folder>'}")
    return task_data


def read_split(task: str | Task, split: str, task_data: str = "auto", seed: int = 0,
               tfds_data_dir: str = "") -> list[Example]:
    """Every example of one split, in idx order. `tfds` reads from `tfds_data_dir` (empty:
    TFDS_DATA_DIR or TFDS's default) unless task_data names a folder (tfds:<dir>)."""
    from gptjax import tasks

    task = get_task(task)
    task.check_split(split)
    kind, _, where = resolve_source(task, task_data).partition(":")
    if kind == "synthetic":
        return tasks.synthetic_split(task, split, seed=seed)
    if kind == "tsv":
        return tasks.read_tsv_split(where, task, split)
    if kind == "jsonl":
        return tasks.read_jsonl_split(where, task, split)
    return tasks.read_tfds_split(task, split, where or tfds_data_dir or None)
