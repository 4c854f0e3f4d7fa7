"""Task examples from JSON Lines files with TFDS's field names, one file per split.

    <folder>/train.jsonl:  {"idx": 0, "premise": "...", "hypothesis": "...", "label": "neutral"}

The label may be its id (1) or its name ("neutral"); STS-B-style tasks take a number. A missing or
null label, or TFDS's -1, marks an unlabelled (test) example. Without an "idx" the example's idx is
its 0-based position among the file's records.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptjax.errors import UserError
from gptjax.tasks.example import Example
from gptjax.tasks.registry import get_task
from gptjax.tasks.task import Task


def jsonl_path(folder: str | Path, split: str) -> Path:
    return Path(folder).expanduser() / f"{split}.jsonl"


def read_jsonl_split(folder: str | Path, task: str | Task, split: str) -> list[Example]:
    task = get_task(task)
    task.check_split(split)
    path = jsonl_path(folder, split)
    if not path.is_file():
        fields = ", ".join(f'"{f}"' for f in ("idx", *task.text_fields, "label"))
        raise UserError(f"{path} not found: task {task.name} split {split} is read from "
                        f"<folder>/{split}.jsonl, one JSON object per line with fields {fields}")
    try:
        with open(path, encoding="utf-8") as f:
            return _parse(f, str(path), task)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); "
                        f"write JSONL files as UTF-8") from None


def _parse(lines, path: str, task: Task) -> list[Example]:
    examples: list[Example] = []
    first_line_of: dict[int, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                            f"each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}")
        texts = []
        for name in task.text_fields:
            value = record.get(name)
            if not isinstance(value, str):
                found = "it is missing" if name not in record else f"found {value!r}"
                raise UserError(f"{path}:{lineno}: field \"{name}\" must be a string ({found}); "
                                f"task {task.name} needs {', '.join(task.text_fields)}")
            texts.append(value)
        idx = record.get("idx", len(examples))
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise UserError(f"{path}:{lineno}: field \"idx\" must be an integer, found {idx!r}")
        if idx in first_line_of:
            raise UserError(f"{path}:{lineno}: idx {idx} was already used on line {first_line_of[idx]}; "
                            f"each example needs its own idx for the submission file")
        first_line_of[idx] = lineno
        examples.append(Example(idx, tuple(texts), _label(record.get("label"), path, lineno, task)))
    return examples


def _label(value, path: str, lineno: int, task: Task) -> int | float | None:
    if value is None or (not isinstance(value, bool) and value == -1):
        return None
    try:
        return task.parse_label(value)
    except ValueError as e:
        raise UserError(f"{path}:{lineno}: field \"label\": {e} (task {task.name}; "
                        f"null or -1 for an unlabelled example)") from None
