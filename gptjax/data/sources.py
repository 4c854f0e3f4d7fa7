"""Pretraining text sources named by `data.source`: synthetic, text:<glob>, jsonl:<glob>,
tfds:<name>[/<config>][:<split>].

`data.source` may list several comma-separated sources; `data.weights` then says what share of
every batch each one fills (see mixture.py).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

from gptjax.data import synthetic
from gptjax.errors import UserError

KINDS = ("synthetic", "text", "jsonl", "tfds")


def parse_sources(spec: str) -> list[str]:
    specs = [s.strip() for s in spec.split(",") if s.strip()]
    if not specs:
        raise UserError("data.source is empty; use synthetic, text:<glob>, jsonl:<glob> or tfds:<name>[/<config>][:<split>]")
    for s in specs:
        kind = s.split(":", 1)[0]
        if kind not in KINDS or (kind != "synthetic" and ":" not in s):
            raise UserError(f"data.source '{s}' is not understood; use synthetic, text:<glob>, jsonl:<glob> or tfds:<name>[/<config>][:<split>] "
                            f"(several separated by commas)")
    return specs


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


def text_documents(pattern: str, split: str) -> list[str]:
    """One document per file (split='file') or per blank-line-separated block ('blank_line')."""
    docs = []
    for path in _files(pattern, "text"):
        content = _read(path)
        if split == "file":
            docs.append(content.strip())
        else:
            docs.extend(block.strip() for block in re.split(r"\n\s*\n", content))
    return [d for d in docs if d]


def jsonl_documents(pattern: str, field: str) -> list[str]:
    docs = []
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
                    raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise UserError(f"{path}:{number}: no string field '{field}' (set data.jsonl_field)")
                if record[field].strip():
                    docs.append(record[field])
    return docs


def source_fingerprint(spec: str, data_cfg) -> str:
    """Changes when the files behind a text:/jsonl: source change (names, sizes, times)."""
    kind, _, arg = spec.partition(":")
    if kind not in ("text", "jsonl"):
        return ""
    digest = hashlib.sha1()
    for path in _files(arg, kind):
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_documents(spec: str, data_cfg) -> list[str]:
    """All documents of one source, in a fixed order."""
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        docs = synthetic.documents(data_cfg.num_documents, seed=data_cfg.seed)
    elif kind == "text":
        docs = text_documents(arg, data_cfg.text_documents)
    elif kind == "jsonl":
        docs = jsonl_documents(arg, data_cfg.jsonl_field)
    else:
        from gptjax.data.tfds_source import tfds_documents
        docs = tfds_documents(arg, data_cfg.tfds_data_dir or None, data_cfg.tfds_text_field)
    if not docs:
        raise UserError(f"data.source {spec} holds no text")
    return docs
