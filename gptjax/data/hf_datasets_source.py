"""Pretraining documents from Hugging Face `datasets`, named `hf:<folder, file or Hub name>[:<split>]`:
one document per row of a split (default train), from the text column `data.text_field`.

A `save_to_disk` folder is memory-mapped and read in place; a data file, a folder of them or a Hub
name is streamed by `load_dataset(..., streaming=True)`. Rows come a batch at a time, so memory stays
flat. datasets is imported only when an hf: source is read: sources.py imports this module lazily,
and the commands that read no datasets never load it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

from gptjax.errors import UserError

# Rows read at once: memory stays flat, and per-row Python work stays small.
_BATCH_ROWS = 1024
# A split is a plain name (train, validation, test, ...): slices such as train[:10%] are not taken,
# which is what lets a path keep its colons.
_SPLIT_NAME = re.compile(r"[\w.\-]+")
_HUB_NAME = re.compile(r"[\w.\-]+(/[\w.\-]+)?")
# Data files that `hf:` reads through datasets' own builders, by extension.
_HF_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text",
                ".arrow": "arrow"}


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"data.source hf:... needs datasets ({e}); install it with "
                        f"`pip install datasets`") from None
    return datasets


def _texts(values, field: str, where: str):
    """The documents among a column's values: nulls and blank strings are none. A column that
    datasets types only from its rows (csv) may hold numbers: one line says so."""
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise UserError(f"{where}: column '{field}' holds {type(value).__name__} values, not text; "
                            f"set data.text_field to the column that holds the documents")
        if value.strip():
            yield value


def parse_hf_spec(arg: str) -> tuple[str, str | None]:
    """The argument of `hf:` -> (folder, file or Hub name; split, None when not given).

    Paths may hold colons, so: the whole argument is the target when it names an existing file or
    folder; otherwise a split is what follows the last colon, when that is a plain name (letters,
    digits, _ . -). `hf:/data/a:b:validation` is split `validation` of `/data/a:b`."""
    if os.path.exists(os.path.expanduser(arg)):
        return arg, None
    target, colon, split = arg.rpartition(":")
    if colon and target and _SPLIT_NAME.fullmatch(split):
        return target, split
    return arg, None


def hf_local_files(arg: str) -> list[str]:
    """The local files behind one hf: source, sorted ([] for a Hub name): what
    sources.source_fingerprint watches."""
    path = os.path.expanduser(parse_hf_spec(arg)[0])
    if not os.path.exists(path):
        return []
    if os.path.isfile(path):
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        # Hidden files (.DS_Store, editor leftovers) are no part of a dataset; datasets skips them too.
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(root, name) for name in names if not name.startswith(".")]
    return sorted(files)


@contextlib.contextmanager
def _quiet(datasets):
    """While a dataset opens, datasets draws progress bars and the Hub client logs every retry of an
    unreachable Hub; the run's log keeps only the one error that follows (or nothing)."""
    shown = datasets.utils.logging.is_progress_bar_enabled()
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    datasets.disable_progress_bars()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if shown:
            datasets.enable_progress_bars()


def _pick_split(arg: str, splits, split: str | None):
    name = split or "train"
    if name not in splits:
        hint = "" if split else f" (the default); name one as hf:{arg}:<split>"
        raise UserError(f"hf:{arg} has no split '{name}'{hint}; its splits are {sorted(splits)}")
    return splits[name]


def _hf_from_disk(datasets, arg: str, path: str, split: str | None):
    """A folder written by save_to_disk: memory-mapped Arrow files, read in place."""
    try:
        data = datasets.load_from_disk(path)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise UserError(f"hf:{arg}: {path} is not a readable save_to_disk folder ({_first_line(e)})") from None
    if isinstance(data, datasets.DatasetDict):
        return _pick_split(arg, data, split)
    if split is not None:
        raise UserError(f"hf:{arg}: {path} holds one dataset without splits (Dataset.save_to_disk); "
                        f"drop ':{split}'")
    return data


def _hf_streaming(datasets, arg: str, target: str, split: str | None):
    """Local data files, a folder of them, or a Hub name, streamed by datasets.load_dataset."""
    path = os.path.expanduser(target)
    if os.path.isfile(path):
        builder = _HF_BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise UserError(f"hf:{arg}: {path} is not a data file datasets reads by its extension "
                            f"({' '.join(sorted(_HF_BUILDERS))}); give such a file, a folder of them or a "
                            f"save_to_disk folder")
        args, kwargs = (builder,), {"data_files": path}
    elif os.path.isdir(path) or _HUB_NAME.fullmatch(target):
        args, kwargs = (path if os.path.isdir(path) else target,), {}
    else:
        raise UserError(f"hf:{arg}: {target} does not exist, and is no Hugging Face Hub name either")
    try:
        splits = datasets.load_dataset(*args, streaming=True, **kwargs)
    except ConnectionError as e:
        raise UserError(f"hf:{arg}: {target} is no local file or folder, and the Hugging Face Hub cannot be "
                        f"reached for it ({_first_line(e)}); check the path, or on a machine with network "
                        f"save it with save_to_disk and give that folder") from None
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise UserError(f"hf:{arg}: datasets cannot load {target} ({_first_line(e)})") from None
    return _pick_split(arg, splits, split)


def _hf_dataset(arg: str):
    """The split of one hf: source, as a datasets Dataset (save_to_disk) or IterableDataset."""
    datasets = _datasets()
    target, split = parse_hf_spec(arg)
    path = os.path.expanduser(target)
    saved = any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json"))
    with _quiet(datasets):
        if os.path.isdir(path) and saved:
            return _hf_from_disk(datasets, arg, path, split)
        return _hf_streaming(datasets, arg, target, split)


def _check_hf_column(arg: str, features, field: str) -> None:
    if field not in features:
        raise UserError(f"hf:{arg} has no column '{field}' (its columns: {', '.join(features)}); set "
                        f"data.text_field to the column that holds the documents")
    dtype = getattr(features[field], "dtype", None)
    if dtype not in ("string", "large_string", "string_view"):
        raise UserError(f"column '{field}' of hf:{arg} holds {features[field]}, not text; set data.text_field "
                        f"to the column that holds the documents")


def iter_hf_documents(arg: str, field: str):
    """The non-blank, non-null values of column `field` of one split, in stored order, a batch of
    rows at a time (save_to_disk folders are memory-mapped, the others streamed)."""
    data = _hf_dataset(arg)
    # Some builders (csv) learn their columns only from the first rows; check those when they come.
    if data.features is not None:
        _check_hf_column(arg, data.features, field)
        data = data.select_columns([field])
    for batch in data.iter(batch_size=_BATCH_ROWS):
        if field not in batch:
            raise UserError(f"hf:{arg} has no column '{field}' (its columns: {', '.join(batch)}); set "
                            f"data.text_field to the column that holds the documents")
        yield from _texts(batch[field], field, f"hf:{arg}")


def hf_documents(arg: str, field: str) -> list[str]:
    return list(iter_hf_documents(arg, field))
