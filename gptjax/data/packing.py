"""Packing documents into fixed-length rows, and a deterministic, O(1)-seekable batch order.

Documents are concatenated with an end-of-document token between them and cut into rows of
seq_len + 1 tokens (inputs and next-token targets overlap by one), the contiguous chunks that
GPT-1 and nanoGPT train on. The order of rows is a fresh permutation per epoch derived from
(seed, epoch), so the batch of any step can be produced directly from the step number: the
same run always sees the same batches, and a resumed run needs no replay.
"""

from __future__ import annotations

import numpy as np


def pack_rows(token_lists, eos_id: int, seq_len: int) -> np.ndarray:
    """[num_rows, seq_len + 1] int32; the incomplete tail row is dropped."""
    stream = np.fromiter((t for doc in token_lists for t in (*doc, eos_id)), dtype=np.int32)
    num_rows = len(stream) // (seq_len + 1)
    return stream[: num_rows * (seq_len + 1)].reshape(num_rows, seq_len + 1)


class RowBatches:
    """Batches of rows in a shuffled order that is a pure function of (seed, step)."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, shuffle: bool = True):
        if len(rows) < batch_size:
            raise ValueError(f"{len(rows)} rows cannot fill a batch of {batch_size}")
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self._order_cache: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order_cache:
            n = len(self.rows)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = {epoch: order}  # only the current epoch is ever needed again
        return self._order_cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        n = len(self.rows)
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = np.divmod(flat, n)
        return np.array([self._order(int(e))[i] for e, i in zip(epochs, within)])

    def batch(self, step: int) -> dict:
        return as_batch(self.rows[self.indices(step)])


def as_batch(rows: np.ndarray) -> dict:
    """Model inputs and targets from [B, seq_len + 1] rows."""
    tokens, targets = rows[:, :-1], rows[:, 1:]
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return {"tokens": tokens, "targets": targets, "positions": np.ascontiguousarray(positions),
            "loss_mask": np.ones(tokens.shape, np.float32)}
