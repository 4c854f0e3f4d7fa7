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


class ShardWriter:
    """Appends documents' token ids (end-of-document included) to shards under `directory`."""

    def __init__(self, directory: str, vocab_size: int):
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(os.path.join(directory, "meta.json")):
            # Invalidate first: an interrupted rewrite must not leave old metadata over new shards.
            os.remove(os.path.join(directory, "meta.json"))
        self.directory = directory
        self.dtype, self.suffix = (np.uint16, "u16") if vocab_size <= 1 << 16 else (np.uint32, "u32")
        self.shard_tokens: dict[str, int] = {}
        self._buffer: list = []
        self._count = self.tokens = self.documents = 0

    def add(self, ids) -> None:
        self._buffer.append(np.asarray(ids, dtype=self.dtype))
        self._count += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        if self._count >= SHARD_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"shard-{len(self.shard_tokens):05d}.{self.suffix}"
        data = np.concatenate(self._buffer)
        tmp = os.path.join(self.directory, name + ".tmp")
        data.tofile(tmp)
        os.replace(tmp, os.path.join(self.directory, name))  # a half-written shard never has the final name
        self.shard_tokens[name] = len(data)
        self._buffer, self._count = [], 0

    def close(self, meta: dict) -> dict:
        """Writes the last shard and meta.json, which makes the directory valid; returns meta."""
        self._flush()
        meta = {**meta, "documents": self.documents, "tokens": self.tokens, "shard_tokens": self.shard_tokens}
        tmp = os.path.join(self.directory, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, os.path.join(self.directory, "meta.json"))
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
