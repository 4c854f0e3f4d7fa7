"""Where a task's examples come from: `source` strings (the config's `source` field) -> readers."""

from __future__ import annotations

from gptjax.errors import UserError
from gptjax.tasks.example import Example
from gptjax.tasks.registry import Task, get_task

SOURCE_FORMS = "auto, synthetic, tfds, tfds:<data_dir>, tsv:<GLUE folder>, jsonl:<folder>"


def resolve_source(task: Task, source: str) -> str:
    """`auto` -> synthetic for the synthetic tasks, tfds for GLUE; other values are checked."""
    source = source.strip()
    synthetic = task.name.startswith("synthetic_")
    if source == "auto":
        return "synthetic" if synthetic else "tfds"
    kind = source.split(":", 1)[0]
    if kind not in ("synthetic", "tfds", "tsv", "jsonl") or (kind in ("tsv", "jsonl") and ":" not in source):
        raise UserError(f"source '{source}' is not one of: {SOURCE_FORMS}")
    if (kind == "synthetic") != synthetic and kind != "jsonl":
        raise UserError(f"task {task.name} cannot be read from source '{source}'; use "
                        f"{'synthetic' if synthetic else 'tfds, tsv:<GLUE folder> or jsonl:<folder>'}")
    return source


def read_split(task: str | Task, split: str, source: str = "auto", seed: int = 0,
               tfds_data_dir: str = "") -> list[Example]:
    """Every example of one split, in idx order. `tfds` reads from `tfds_data_dir` (empty:
    TFDS_DATA_DIR or TFDS's default) unless the source names a folder (tfds:<dir>)."""
    from gptjax import tasks

    task = get_task(task)
    task.check_split(split)
    source = resolve_source(task, source)
    kind, _, where = source.partition(":")
    if kind == "synthetic":
        return tasks.synthetic_split(task, split, seed=seed)
    if kind == "tsv":
        return tasks.read_tsv_split(where, task, split)
    if kind == "jsonl":
        return tasks.read_jsonl_split(where, task, split)
    return tasks.read_tfds_split(task, split, where or tfds_data_dir or None)
