"""A jitted function over many host rows, one padded batch at a time, on a mesh.

Fine-tuned prediction (task_predictor.py) and zero-shot scoring (zero_shot.py) both run their
forward pass this way: each batch goes on the mesh split by rows over the devices of the batch axis
(sharding.rows_to_mesh), the last batch is filled up with copies of its first row so that every
call has the same shape, and the outputs of those filler rows are dropped again.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding

from gptjax import sharding


def padded_batch_size(batch_size: int, mesh) -> int:
    """Rows each call gets: `batch_size` rounded up to a whole number of rows per device of the
    batch axis (the mesh axes RULES gives "batch")."""
    split = math.prod(mesh.shape[axis] for axis in dict(sharding.RULES)["batch"])
    return -(-batch_size // split) * split


def forward_in_batches(fn, rows: dict, batch_size: int, mesh):
    """`fn`'s outputs for every row of `rows`, in their order, with no padding row: an array
    [n, ...] per output of `fn`.

    `rows` holds host arrays of n rows each. Each call `fn(batch)` gets `batch_size` of them (the
    last call fewer, filled up with copies of its first row) as a dict of arrays on the mesh of
    padded_batch_size(batch_size, mesh) rows split over the batch axis, and returns an array or a
    tuple of arrays whose first axis is those rows. Each process reads the outputs whole, so they
    are replicated over the mesh or on a mesh of this process's own devices. In a multi-process
    job every process passes the same rows (rows_to_mesh takes its block of them)."""
    rows = {key: np.asarray(x) for key, x in rows.items()}
    counts = {len(x) for x in rows.values()}
    if len(counts) != 1:
        lengths = ", ".join(f"{key} {len(x)}" for key, x in rows.items())
        raise ValueError(f"every input needs the same number of rows; got {lengths}")
    n = counts.pop()
    size = padded_batch_size(batch_size, mesh)
    split = NamedSharding(mesh, sharding.spec(("batch",)))
    with jax.set_mesh(mesh):  # the model's activation constraints read this mesh
        if n == 0:
            # The outputs' shapes come from tracing alone: nothing is compiled or run.
            like = {key: jax.ShapeDtypeStruct((size, *x.shape[1:]), x.dtype, sharding=split)
                    for key, x in rows.items()}
            return jax.tree.map(lambda out: np.zeros((0, *out.shape[1:]), out.dtype), jax.eval_shape(fn, like))
        pieces, pending = [], None
        for start in range(0, n, batch_size):
            real = min(batch_size, n - start)
            picked = np.concatenate([np.arange(start, start + real), np.full(size - real, start)])
            out = fn(sharding.rows_to_mesh({key: x[picked] for key, x in rows.items()}, split))
            # The previous batch is read back only once this one is dispatched, so the device
            # computes while the host copies and builds the next batch.
            if pending is not None:
                pieces.append(_on_host(*pending))
            pending = (out, real)
        pieces.append(_on_host(*pending))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *pieces)


def _on_host(out, real: int):
    return jax.tree.map(lambda x: np.asarray(x)[:real], out)
