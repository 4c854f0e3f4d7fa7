"""Packing documents into fixed-length rows, and a deterministic, O(1)-seekable batch order.

Documents are concatenated with an end-of-document token after each and cut into rows of
seq_len + 1 tokens (inputs and next-token targets overlap by one). The last, partial row is
filled with padding that the loss ignores, so every token of every document is in exactly one
row. Everything a row needs besides its tokens (segment ids, positions, loss mask) follows from
where its end-of-document tokens are, so rows can be stored as bare tokens and read at random.

The order of rows is a fresh permutation per epoch derived from (seed, epoch), so the batch of
any step is produced directly from the step number: the same run always sees the same batches,
and a resumed run needs no replay.
"""

from __future__ import annotations

import threading

import numpy as np


def pack_rows(token_lists, eos_id: int, seq_len: int, pad_id: int) -> np.ndarray:
    """[num_rows, seq_len + 1] int32; the tail row is completed with pad_id."""
    stream = np.fromiter((t for doc in token_lists for t in (*doc, eos_id)), dtype=np.int32)
    width = seq_len + 1
    num_rows = -(-len(stream) // width)
    rows = np.full(num_rows * width, pad_id, np.int32)
    rows[: len(stream)] = stream
    return rows.reshape(num_rows, width)


def as_batch(rows: np.ndarray, eos_id: int, pad_id: int, document_mask: bool) -> dict:
    """Model inputs, targets, loss mask (and segment ids) from [B, seq_len + 1] rows.

    document_mask=False: contiguous chunks as GPT-1 and nanoGPT train on; attention crosses
    document boundaries and positions run 0..T-1. document_mask=True: a new segment starts after
    every end-of-document token, positions restart there, attention stays inside a segment, and
    the prediction made at an end-of-document token (the next document's first token, which it
    cannot see) does not count in the loss.
    """
    tokens, targets = rows[:, :-1], rows[:, 1:]
    loss_mask = targets != pad_id
    steps = np.arange(tokens.shape[1], dtype=np.int32)
    if not document_mask:
        positions = np.broadcast_to(steps, tokens.shape)
        return {"tokens": tokens, "targets": targets, "positions": np.ascontiguousarray(positions),
                "loss_mask": loss_mask.astype(np.float32)}
    starts = np.zeros(tokens.shape, bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos_id
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    segment_start = np.maximum.accumulate(np.where(starts, steps, 0), axis=1)
    loss_mask &= tokens != eos_id
    return {"tokens": tokens, "targets": targets, "positions": (steps - segment_start).astype(np.int32),
            "segment_ids": segment_ids, "loss_mask": loss_mask.astype(np.float32)}


class RowBatches:
    """Batches of rows in a shuffled order that is a pure function of (seed, step)."""

    def __init__(self, rows, batch_size: int, seed: int, *, eos_id: int, pad_id: int,
                 document_mask: bool = False, shuffle: bool = True, process_index: int = 0,
                 process_count: int = 1):
        """rows: an [N, seq_len + 1] array or anything indexable like one (TokenRows).

        `batch_size` is global; process p of n builds rows p, p + n, ... of each batch, so the
        processes read disjoint rows that together make the global batch."""
        if len(rows) < batch_size:
            raise ValueError(f"{len(rows)} rows cannot fill a batch of {batch_size}")
        if batch_size % process_count:
            raise ValueError(f"a batch of {batch_size} rows does not split over {process_count} processes")
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self.eos_id, self.pad_id, self.document_mask = eos_id, pad_id, document_mask
        self.process_index, self.process_count = process_index, process_count
        self._order_cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # loader threads build batches concurrently

    def __getstate__(self):
        return {**self.__dict__, "_lock": None, "_order_cache": {}}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._order_cache:
                n = len(self.rows)
                order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
                # Two epochs: batches straddling a boundary, built out of order by several threads.
                self._order_cache = {e: o for e, o in self._order_cache.items() if abs(e - epoch) <= 1}
                self._order_cache[epoch] = order
            return self._order_cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        n = len(self.rows)
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = np.divmod(flat, n)
        return np.array([self._order(int(e))[i] for e, i in zip(epochs, within)])

    def batch(self, step: int) -> dict:
        """This process's part of the batch of `step`."""
        local = self.indices(step)[self.process_index::self.process_count]
        return as_batch(self.rows[local], self.eos_id, self.pad_id, self.document_mask)
