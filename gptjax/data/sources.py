"""Pretraining text sources named by `data.source`: synthetic, text:<glob>, jsonl:<glob>,
parquet:<glob>, hf:<folder, file or Hub name>[:<split>], tfds:<name>[/<config>][:<split>].

`data.source` may list several comma-separated sources; `data.weights` then says what share of
every batch each one fills (see mixture.py). jsonl:, parquet: and hf: sources take a document's
text from the column `data.text_field`. Every source streams its documents one at a time, so
`gptjax prepare` handles corpora larger than memory.

This module parses `data.source` and `data.weights`, reads the synthetic, text: and jsonl: sources
itself and hands each other kind to its own module: parquet_source.py (pyarrow),
hf_datasets_source.py (datasets) and tfds_source.py (tensorflow_datasets). It imports those inside
functions, so importing it loads none of those packages.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

from gptjax.data import synthetic
from gptjax.errors import UserError

KINDS = ("synthetic", "text", "jsonl", "parquet", "hf", "tfds")
USAGE = ("synthetic, text:<glob>, jsonl:<glob>, parquet:<glob>, hf:<folder, file or Hub name>[:<split>] "
         "or tfds:<name>[/<config>][:<split>]")
DEFAULT_TEXT_FIELD = "text"


def parse_sources(spec: str) -> list[str]:
    specs = [s.strip() for s in spec.split(",") if s.strip()]
    if not specs:
        raise UserError(f"data.source is empty; use {USAGE}")
    for s in specs:
        kind, _, arg = s.partition(":")
        if kind not in KINDS or (kind != "synthetic" and not arg.strip()):
            raise UserError(f"data.source '{s}' is not understood; use {USAGE} (several separated by commas)")
    return specs


def text_field(data_cfg) -> str:
    """The column holding a document's text in jsonl:, parquet: and hf: sources. data.jsonl_field is
    its older name, honoured while data.text_field keeps its default so that earlier configs and
    saved runs read the same column (config.validate refuses the two set to different columns)."""
    if data_cfg.text_field != DEFAULT_TEXT_FIELD:
        return data_cfg.text_field
    return data_cfg.jsonl_field


def parse_weights(text: str, count: int) -> list[float]:
    if not text.strip():
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"data.weights '{text}' must be comma-separated numbers, one per source") from None
    if len(weights) != count or any(w <= 0 for w in weights):
        raise UserError(f"data.weights '{text}' needs {count} positive numbers, one per data.source entry")
    total = sum(weights)
    return [w / total for w in weights]


def _files(pattern: str, what: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise UserError(f"data.source {what}:{pattern} matches no files; check the path or quote the glob")
    return files


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def iter_text_documents(pattern: str, split: str):
    """One document per file (split='file') or per blank-line-separated block ('blank_line')."""
    for path in _files(pattern, "text"):
        content = _read(path)
        blocks = [content] if split == "file" else re.split(r"\n\s*\n", content)
        for block in blocks:
            if block.strip():
                yield block.strip()


def text_documents(pattern: str, split: str) -> list[str]:
    return list(iter_text_documents(pattern, split))


def iter_jsonl_documents(pattern: str, field: str):
    for path in _files(pattern, "jsonl"):
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{number}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); every line must "
                                    f"be one JSON object (a file cut short ends mid-line)") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise UserError(f"{path}:{number}: no string field '{field}' (set data.text_field)")
                if record[field].strip():
                    yield record[field]


def jsonl_documents(pattern: str, field: str) -> list[str]:
    return list(iter_jsonl_documents(pattern, field))


def _source_files(kind: str, arg: str) -> list[str]:
    """The local files behind a source, in a fixed order ([] when it has none to check)."""
    if kind in ("text", "jsonl"):
        return _files(arg, kind)
    if kind == "parquet":
        from gptjax.data.parquet_source import parquet_files
        return parquet_files(arg)
    if kind == "hf":
        from gptjax.data.hf_datasets_source import hf_local_files
        return hf_local_files(arg)
    return []


def source_fingerprint(spec: str, data_cfg) -> str:
    """Changes when the local files behind a text:, jsonl:, parquet: or hf: source change (names,
    sizes, times); empty for the others (synthetic, tfds:, a Hub name)."""
    kind, _, arg = spec.partition(":")
    files = _source_files(kind, arg)
    if not files:
        return ""
    digest = hashlib.sha1()
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def iter_source_documents(spec: str, data_cfg):
    """The documents of one source, in a fixed order, one at a time."""
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return iter(synthetic.documents(data_cfg.num_documents, seed=data_cfg.seed))
    if kind == "text":
        return iter_text_documents(arg, data_cfg.text_documents)
    if kind == "jsonl":
        return iter_jsonl_documents(arg, text_field(data_cfg))
    if kind == "parquet":
        from gptjax.data.parquet_source import iter_parquet_documents
        return iter_parquet_documents(arg, text_field(data_cfg))
    if kind == "hf":
        from gptjax.data.hf_datasets_source import iter_hf_documents
        return iter_hf_documents(arg, text_field(data_cfg))
    from gptjax.data.tfds_source import iter_tfds_documents
    return iter_tfds_documents(arg, data_cfg.tfds_data_dir or None, data_cfg.tfds_text_field)


def is_held_out(index: int, eval_fraction: float) -> bool:
    """Whether document `index` belongs to the held-out set: every 1/eval_fraction-th document,
    decided from the index alone so a stream of any length splits without being counted first."""
    return int((index + 1) * eval_fraction) > int(index * eval_fraction)


def source_documents(spec: str, data_cfg) -> tuple[list[str], list[str]]:
    """(train, held-out) documents of one source, in memory."""
    train, held = [], []
    for index, doc in enumerate(iter_source_documents(spec, data_cfg)):
        (held if is_held_out(index, data_cfg.eval_fraction) else train).append(doc)
    if not train:
        raise UserError(f"data.source {spec} holds no text" + (" outside the held-out fraction (lower data.eval_fraction)" if held else ""))
    return train, held
