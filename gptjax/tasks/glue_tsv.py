"""Reading the official GLUE folder (as `download_glue_data.py` writes it) into Examples.

    glue_data/CoLA/{train,dev,test}.tsv        train/dev: no header; source, label, star, sentence
    glue_data/SST-2/{train,dev,test}.tsv       ... one folder per task ...
    glue_data/MNLI/{train,dev_matched,dev_mismatched,test_matched,test_mismatched}.tsv
    glue_data/diagnostic/diagnostic.tsv        AX, test only

The files are not CSV: a double quote is literal text ("the so-called \"expert\"" has no escaping),
so rows are split on tabs alone, never through the csv module's quote handling, which would glue
rows together at an unbalanced quote. Columns are found by header name, since the same task's
files differ in width (MNLI dev has five annotator labels, train one).
"""

from __future__ import annotations

from pathlib import Path

from gptjax.errors import UserError
from gptjax.tasks.example import Example
from gptjax.tasks.registry import get_task
from gptjax.tasks.task import Task, TsvFile

LAYOUT_HINT = ("the official GLUE layout is <root>/CoLA/train.tsv, <root>/SST-2/dev.tsv, ..., "
               "<root>/MNLI/dev_matched.tsv, <root>/diagnostic/diagnostic.tsv (as written by "
               "download_glue_data.py)")


def task_folder(folder: str | Path, task: str | Task) -> Path:
    """The task's own folder: `folder` may be the GLUE root or already the task's folder."""
    task = get_task(task)
    if task.tsv_folder is None:
        task.tsv_file(task.splits[0])  # raises the explanation
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"GLUE folder {root} does not exist or is not a folder; {LAYOUT_HINT}")
    if root.name == task.tsv_folder and not (root / task.tsv_folder).is_dir():
        return root
    return root / task.tsv_folder


def tsv_path(folder: str | Path, task: str | Task, split: str) -> Path:
    task = get_task(task)
    return task_folder(folder, task) / task.tsv_file(split).path


def read_tsv_split(folder: str | Path, task: str | Task, split: str) -> list[Example]:
    """Every example of one split, in file order, with the file's idx and labels (None in test)."""
    task = get_task(task)
    tsv = task.tsv_file(split)
    path = task_folder(folder, task) / tsv.path
    if not path.is_file():
        files = ", ".join(f.path for f in task.tsv_files)
        raise UserError(f"{path} not found: task {task.name} split {split} is read from "
                        f"{task.tsv_folder}/{tsv.path} under the GLUE root (its folder holds {files}); "
                        f"{LAYOUT_HINT}")
    return read_tsv_file(path, task, tsv)

# The first QQP release split some questions across lines; the file names did not change.
_BROKEN_ROWS = {"qqp": " (or use QQP-clean.zip, the re-release of QQP without broken rows)"}


def read_tsv_file(path: str | Path, task: str | Task, tsv: TsvFile) -> list[Example]:
    task = get_task(task)
    try:
        # newline="\n": a stray carriage return inside a sentence must not end the row; "utf-8-sig"
        # drops the byte-order mark that MRPC's header inherits from Microsoft's original file.
        with open(path, encoding="utf-8-sig", newline="\n") as f:
            return _parse(f, str(path), task, tsv)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); GLUE files are "
                        f"UTF-8: re-download or re-encode it") from None


def _parse(lines, path: str, task: Task, tsv: TsvFile) -> list[Example]:
    lineno = 0
    if tsv.columns is None:
        header = next(lines, None)
        lineno = 1
        if header is None or not header.strip():
            raise UserError(f"{path}:1: the file is empty but should start with a header line naming "
                            f"its columns ({_wanted(tsv)}); {LAYOUT_HINT}")
        names = [c.strip() for c in _strip(header).split("\t")]
        where = f"{path}:1: header columns are {', '.join(names)}"
    else:
        names = list(tsv.columns)
        where = f"{path} has no header line; its columns are {', '.join(names)}"
    missing = [c for c in _wanted(tsv) if c not in names]
    if missing:
        raise UserError(f"{where}, which lack {', '.join(missing)}; "
                        f"is this the {task.name} file for split {tsv.split}?")
    text_at = [names.index(c) for c in tsv.text_columns]
    label_at = names.index(tsv.label_column) if tsv.label_column else None
    index_at = names.index(tsv.index_column) if tsv.index_column else None

    examples: list[Example] = []
    first_line_of: dict[int, int] = {}
    for lineno, line in enumerate(lines, lineno + 1):
        line = _strip(line)
        if not line:
            continue  # a blank line (usually the last) is not a row, as for csv.DictReader and TFDS
        fields = line.split("\t")
        if len(fields) != len(names):
            raise UserError(
                f"{path}:{lineno}: expected {len(names)} tab-separated columns ({', '.join(names)}), "
                f"found {len(fields)}; GLUE files are not quoted, so a tab or line break inside a text "
                f"splits its row: repair or delete line {lineno}{_BROKEN_ROWS.get(task.name, '')}")
        idx = _index(fields[index_at], path, lineno, tsv) if index_at is not None else len(examples)
        if idx in first_line_of:
            raise UserError(f"{path}:{lineno}: idx {idx} was already used on line {first_line_of[idx]}; "
                            f"each example needs its own idx for the submission file")
        first_line_of[idx] = lineno
        label = None
        if label_at is not None:
            try:
                label = task.parse_label(fields[label_at].strip())
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: column {tsv.label_column}: {e} "
                                f"(task {task.name})") from None
        examples.append(Example(idx, tuple(fields[i] for i in text_at), label))
    return examples


def _strip(line: str) -> str:
    return line.removesuffix("\n").removesuffix("\r")


def _wanted(tsv: TsvFile) -> list[str]:
    return [c for c in (tsv.index_column, *tsv.text_columns, tsv.label_column) if c]


def _index(value: str, path: str, lineno: int, tsv: TsvFile) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{path}:{lineno}: column {tsv.index_column} should hold an integer index, "
                        f"found {value!r}") from None

