"""Tokenized corpora on disk (`gptjax prepare`) and random-access rows over a token stream.

A prepared source is a directory of flat binary shards of token ids (uint16 when the vocabulary
fits, else uint32) holding the documents back to back, each followed by end-of-document, plus
`meta.json`. Flat memory-mapped arrays rather than ArrayRecord: a row of the packed stream is one
slice of one file, read with no decoding and no per-record overhead, the page cache does the
caching, and the row length (train.seq_len) can change without preparing again.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from gptjax.errors import UserError

SHARD_TOKENS = 1 << 26  # 64M tokens = 128 MiB of uint16 per shard


def source_dir(workdir: str, spec: str, split: str) -> str:
    digest = hashlib.sha1(spec.encode()).hexdigest()[:12]
    return os.path.join(workdir, "data", f"{digest}-{split}")


class TokenRows:
    """Rows of `seq_len + 1` tokens over a stream kept in memory or in memory-mapped shards.

    Row i is tokens [i * width, (i + 1) * width) of the stream; the last row is completed with
    padding. Shards are opened lazily, so the object pickles cheaply into loader workers.
    """

    def __init__(self, shards: list, seq_len: int, pad_id: int):
        self._shards = shards  # file paths or in-memory arrays
        self._arrays = None
        self.width = seq_len + 1
        self.pad_id = pad_id
        lengths = [self._length(s) for s in shards]
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_tokens = int(self._offsets[-1])

    @staticmethod
    def _length(shard) -> int:
        if isinstance(shard, np.ndarray):
            return len(shard)
        with open(os.path.join(os.path.dirname(shard), "meta.json")) as f:
            meta = json.load(f)
        return meta["shard_tokens"][os.path.basename(shard)]

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def _open(self):
        if self._arrays is None:
            self._arrays = [s if isinstance(s, np.ndarray) else np.memmap(s, dtype=_dtype_of(s), mode="r")
                            for s in self._shards]
        return self._arrays

    def __len__(self) -> int:
        return -(-self.num_tokens // self.width)

    def _slice(self, start: int, stop: int) -> np.ndarray:
        arrays, parts = self._open(), []
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        for k in range(first, len(arrays)):
            lo, hi = self._offsets[k], self._offsets[k + 1]
            if lo >= stop:
                break
            parts.append(arrays[k][max(start, lo) - lo: min(stop, hi) - lo])
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.atleast_1d(np.asarray(indices))
        out = np.full((len(indices), self.width), self.pad_id, np.int32)
        for j, i in enumerate(indices):
            if not 0 <= i < len(self):
                raise IndexError(f"row {i} of {len(self)}")
            row = self._slice(int(i) * self.width, min((int(i) + 1) * self.width, self.num_tokens))
            out[j, : len(row)] = row
        return out


def _dtype_of(path: str):
    return np.uint16 if path.endswith(".u16") else np.uint32


def write_prepared(directory: str, token_lists, eos_id: int, vocab_size: int, meta: dict) -> dict:
    """Writes documents (each followed by eos) into shards under `directory`; returns meta."""
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, "meta.json")):
        # Invalidate first: an interrupted rewrite must not leave old metadata over new shards.
        os.remove(os.path.join(directory, "meta.json"))
    dtype, suffix = (np.uint16, "u16") if vocab_size <= 1 << 16 else (np.uint32, "u32")
    shard_tokens, buffer, count, total, docs = {}, [], 0, 0, 0

    def flush():
        nonlocal buffer, count
        if not buffer:
            return
        name = f"shard-{len(shard_tokens):05d}.{suffix}"
        data = np.concatenate(buffer).astype(dtype)
        tmp = os.path.join(directory, name + ".tmp")
        data.tofile(tmp)
        os.replace(tmp, os.path.join(directory, name))  # a half-written shard never has the final name
        shard_tokens[name] = len(data)
        buffer, count = [], 0

    for ids in token_lists:
        buffer.append(np.asarray([*ids, eos_id], dtype=np.int64))
        count += len(ids) + 1
        total += len(ids) + 1
        docs += 1
        if count >= SHARD_TOKENS:
            flush()
    flush()
    meta = {**meta, "documents": docs, "tokens": total, "shard_tokens": shard_tokens}
    with open(os.path.join(directory, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(directory, "meta.json.tmp"), os.path.join(directory, "meta.json"))
    return meta


def read_prepared(directory: str, expect: dict) -> list[str] | None:
    """Shard paths of a prepared source whose meta matches `expect`, else None (not prepared)."""
    path = os.path.join(directory, "meta.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError:
        raise UserError(f"{path} is damaged; run `gptjax prepare` again") from None
    for key, value in expect.items():
        if meta.get(key) != value:
            raise UserError(f"{directory} was prepared with {key}={meta.get(key)!r}, but this run has "
                            f"{value!r}; run `gptjax prepare` again for this config")
    shards = [os.path.join(directory, name) for name in sorted(meta["shard_tokens"])]
    for shard in shards:
        size = os.path.getsize(shard) if os.path.isfile(shard) else -1
        if size != meta["shard_tokens"][os.path.basename(shard)] * np.dtype(_dtype_of(shard)).itemsize:
            raise UserError(f"prepared shard {shard} is missing or truncated; run `gptjax prepare` again")
    return shards
