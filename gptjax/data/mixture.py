"""Batches mixed from several sources with fixed per-batch shares.

Each source fills a fixed number of rows in every batch (its weight times the batch size,
rounded by largest remainder). Fixed quotas keep the batch of any step a pure function of the
step, like a single source, where sampling the source of each row would make a step depend on
every draw before it.
"""

from __future__ import annotations

import numpy as np

from gptjax.errors import UserError


def quotas(weights: list[float], batch_size: int, names: list[str]) -> list[int]:
    exact = [w * batch_size for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: batch_size - sum(counts)]:
        counts[i] += 1
    for name, count in zip(names, counts):
        if count == 0:
            raise UserError(f"data.weights leave source {name} no row in a batch of {batch_size}; "
                            f"raise its weight or train.batch_size")
    return counts


class MixedBatches:
    """Concatenates, for every step, each source's own batch of its quota of rows."""

    def __init__(self, parts):
        self.parts = parts
        self.batch_size = sum(p.batch_size for p in parts)

    def batch(self, step: int) -> dict:
        batches = [p.batch(step) for p in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
