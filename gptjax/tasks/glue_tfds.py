"""Task examples from a prepared TFDS `glue/<task>` dataset, read through `tfds.data_source`.

`tfds.data_source` reads the ArrayRecord files directly and needs no TensorFlow. It never downloads
here: a missing dataset is an error that says how to prepare it on a machine with network access.
"""

from __future__ import annotations

import importlib

from gptjax.errors import UserError
from gptjax.tasks.example import Example
from gptjax.tasks.registry import get_task
from gptjax.tasks.task import Task

# The array_record reader answers a batch of keys far faster than one key at a time (QQP's test
# split alone has 390k records).
_CHUNK = 4096


def prepare_hint(task: Task, data_dir) -> str:
    target = f"{data_dir}/{task.tfds_name}" if data_dir else f"$TFDS_DATA_DIR/{task.tfds_name}"
    return (f"prepare it on a machine with network access with `tfds build {task.tfds_name} "
            f"--file_format=array_record --data_dir DIR` (random access needs the array_record "
            f"format), copy DIR/{task.tfds_name} to {target}, and point data.tfds_data_dir or "
            f"TFDS_DATA_DIR at the folder that holds glue/")


def read_tfds_split(task: str | Task, split: str, data_dir: str | None = None) -> list[Example]:
    """Every example of one split, sorted by idx (the prepared records are shuffled)."""
    task = get_task(task)
    task.check_split(split)
    if task.tfds_name is None:
        raise UserError(f"task {task.name} has no TFDS dataset; read it from JSONL instead")
    tfds = _import_tfds()
    try:
        source = tfds.data_source(task.tfds_name, split=split, data_dir=data_dir, download=False)
    except (NotImplementedError, OSError, tfds.core.registered.DatasetNotFoundError) as e:
        # tfds reports a missing dataset as "TFRECORD is not supported", since that is the format
        # of a builder that was never prepared; say what actually happened.
        prepared = _is_prepared(tfds, task, data_dir)
        what = (f"is prepared in a format without random access [tfds: {str(e).splitlines()[0]}]"
                if prepared else "is not prepared")
        raise UserError(f"TFDS dataset {task.tfds_name} {what} under "
                        f"{data_dir or '$TFDS_DATA_DIR'}; {prepare_hint(task, data_dir)}") from None
    examples = [_example(record, task) for record in _records(source)]
    examples.sort(key=lambda ex: ex.idx)
    return examples


def _records(source, chunk: int = _CHUNK):
    """Every record of `source` in key order, read `chunk` keys at a time where it can batch."""
    batched = hasattr(source, "__getitems__")
    for start in range(0, len(source), chunk):
        keys = list(range(start, min(start + chunk, len(source))))
        if batched:
            try:
                records = source.__getitems__(keys)
            except Exception:  # noqa: BLE001 - a real read error recurs below, one key at a time
                # e.g. tfds.testing.mock_data installs a batch method that cannot be called.
                batched = False
            else:
                if len(records) == len(keys):
                    yield from records
                    continue
                batched = False
        yield from (source[k] for k in keys)


def _import_tfds():
    try:
        tfds = importlib.import_module("tensorflow_datasets")
        # tfds registers a builder only when its module is imported, and importing the whole
        # `tensorflow_datasets.text` package pulls in builders that need TensorFlow.
        importlib.import_module("tensorflow_datasets.text.glue")
    except ImportError as e:
        raise UserError(f"reading GLUE from TFDS needs tensorflow_datasets ({e}); install it with "
                        f"`pip install tensorflow-datasets` or read the official TSV folder instead") from None
    return tfds


def _is_prepared(tfds, task: Task, data_dir) -> bool:
    try:
        return tfds.builder(task.tfds_name, data_dir=data_dir).is_prepared()
    except Exception:  # noqa: BLE001 - only refines the message of an error already being raised
        return False


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _example(record: dict, task: Task) -> Example:
    label = record["label"]
    if task.is_regression:
        label = float(label)
    else:
        label = int(label)
    # TFDS writes -1 where GLUE withholds the label (every test split).
    if label == -1:
        label = None
    texts = tuple(_text(record[f]) for f in task.text_fields)
    return Example(int(record["idx"]), texts, label)
