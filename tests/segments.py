"""Segment ids of packed rows for the attention kernel tests.

A copy of the generator in gptjax/bench/attention.py rather than an import of it: tests of the
kernel should not depend on the benchmark package, and no product module needs random document
lengths.
"""

import numpy as np


def packed_segment_ids(rng: np.random.Generator, batch: int, seq_len: int, mean_len: int) -> np.ndarray:
    """Sorted ids 1, 1, ..., 2, 2, ... per row, document lengths uniform in [mean/2, 3*mean/2]."""
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq_len:
            lengths.append(int(rng.integers(max(1, mean_len // 2), max(2, 3 * mean_len // 2) + 1)))
        rows.append(np.repeat(np.arange(1, len(lengths) + 1), lengths)[:seq_len])
    return np.stack(rows).astype(np.int32)
