"""Pretraining documents from a prepared TFDS dataset, named `<name>[/<config>][:<split>]`.

Records are read through `tfds.data_source`, which opens the ArrayRecord files directly and needs
no TensorFlow. Nothing is ever downloaded: a dataset that is not prepared under the data dir is an
error that says how to prepare it on a machine with network access.
"""

from __future__ import annotations

import importlib
import os
import re

import numpy as np

from gptjax.errors import UserError

_NAME = re.compile(r"[a-z0-9_]+(/[A-Za-z0-9_.\-]+)?")
# The array_record reader answers a batch of keys far faster than one key at a time.
_CHUNK = 4096


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """`c4/en:validation` -> ("c4/en", "validation"); the split defaults to train."""
    # Split on the first colon only: slices such as `train[:1000]` contain colons too.
    name, _, split = spec.strip().partition(":")
    if not _NAME.fullmatch(name):
        raise UserError(f"tfds:{spec} is not understood; write tfds:<name>[/<config>][:<split>], "
                        f"e.g. tfds:lm1b or tfds:c4/en:validation")
    return name, split.strip() or "train"


def iter_tfds_documents(spec: str, data_dir: str | None, text_field: str = ""):
    """The non-blank text of every record of one split, in stored order, read chunk by chunk so
    that a corpus far larger than memory (c4, wikipedia) can be streamed into `gptjax prepare`."""
    tfds, source = _open(spec, data_dir)
    field = _text_field(tfds, spec, source.dataset_info.features, text_field)
    for start in range(0, len(source), _CHUNK):
        for record in source.__getitems__(list(range(start, min(start + _CHUNK, len(source))))):
            value = record[field]
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            if text.strip():
                yield text


def tfds_documents(spec: str, data_dir: str | None, text_field: str = "") -> list[str]:
    return list(iter_tfds_documents(spec, data_dir, text_field))


def tfds_record_count(spec: str, data_dir: str | None) -> int:
    """Number of records in the split, from the dataset's metadata (no record is read)."""
    return len(_open(spec, data_dir)[1])


def prepare_hint(name: str, data_dir: str) -> str:
    base = name.split("/")[0]
    return (f"prepare it on a machine with network access with `tfds build {name} "
            f"--file_format=array_record --data_dir DIR` (the tfds CLI needs tensorflow installed "
            f"there; random access needs the array_record format), copy DIR/{base} to "
            f"{os.path.join(data_dir, base)}, and point data.tfds_data_dir or TFDS_DATA_DIR at "
            f"{data_dir}")


def _open(spec: str, data_dir: str | None):
    name, split = parse_tfds_spec(spec)
    tfds = _import_tfds(name)
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    shown = data_dir or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    try:
        return tfds, tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split("/")[0]
        folder = os.path.join(shown, base)
        if os.path.isdir(folder):  # prepared from files whose builder code is not installed here
            configs = sorted(c for c in os.listdir(folder) if not c.startswith("."))
            raise UserError(f"{folder} holds no {name}; the prepared configs there are {configs}, "
                            f"so use data.source tfds:{base}/<config>") from None
        raise UserError(f"TFDS has no dataset {name} and none is prepared under {shown}; check the "
                        f"name in data.source tfds:{spec} (e.g. lm1b, tiny_shakespeare, c4/en)") from None
    except (NotImplementedError, FileNotFoundError) as e:
        # tfds reports an unprepared dataset as "TFRECORD is not supported", the format it assumes
        # for a builder that was never prepared; say what actually happened.
        what = (f"is prepared in a format without random access [tfds: {str(e).splitlines()[0]}]"
                if _is_prepared(tfds, name, data_dir) else "is not prepared")
        raise UserError(f"TFDS dataset {name} {what} under {shown}; {prepare_hint(name, shown)}") from None
    except KeyError as e:  # a split name the unprepared dataset's metadata does not list
        raise UserError(f"data.source tfds:{spec}: unknown split {e}; {prepare_hint(name, shown)}") from None
    except ValueError as e:  # unknown config or split
        message = str(e).splitlines()[0]
        if "BuilderConfig" in message:  # tfds's own message lists near matches, often none
            base, _, config = name.partition("/")
            message = f"{base} has no config {config}; its configs are {_configs(tfds, base)}"
        raise UserError(f"data.source tfds:{spec}: {message}") from None


def _import_tfds(name: str):
    try:
        tfds = importlib.import_module("tensorflow_datasets")
    except ImportError as e:
        raise UserError(f"data.source tfds:... needs tensorflow_datasets ({e}); install it with "
                        f"`pip install tensorflow-datasets array_record`") from None
    # Builders under tensorflow_datasets/datasets register themselves on lookup, but older ones
    # (c4, wikipedia, ...) only once their module is imported.
    root = os.path.dirname(tfds.__file__)
    base = name.split("/")[0]
    for category in sorted(os.listdir(root)):
        if category in ("core", "datasets", "scripts", "testing"):
            continue
        path = os.path.join(root, category, base)
        if os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py")):
            try:
                importlib.import_module(f"tensorflow_datasets.{category}.{base}")
            except Exception:  # noqa: BLE001 - a prepared copy is still readable without the code
                pass
            break
    return tfds


def _configs(tfds, base: str) -> list[str] | str:
    try:
        return [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS] or "none (drop the /config)"
    except Exception:  # noqa: BLE001 - only refines the message of an error already being raised
        return "unknown"


def _is_prepared(tfds, name: str, data_dir) -> bool:
    try:
        return tfds.builder(name, data_dir=data_dir, try_gcs=False).is_prepared()
    except Exception:  # noqa: BLE001 - only refines the message of an error already being raised
        return False


def _text_field(tfds, spec: str, features, wanted: str) -> str:
    strings = sorted(k for k, f in features.items() if isinstance(f, tfds.features.Tensor)
                     and f.shape == () and np.dtype(f.np_dtype).kind in "OSU")
    if wanted:
        if wanted not in strings:
            raise UserError(f"data.tfds_text_field '{wanted}' is not a text feature of tfds:{spec}; "
                            f"its text features are {strings or 'none'}")
        return wanted
    if "text" in strings:
        return "text"
    if len(strings) == 1:
        return strings[0]
    raise UserError(f"tfds:{spec} has {len(strings)} text features {strings}; "
                    f"set data.tfds_text_field to the one that holds the documents")
