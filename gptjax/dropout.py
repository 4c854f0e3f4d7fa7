"""Dropout masks from a counter-based hash rather than a random-number generator.

Each element's keep/drop draw is a hash of (a seed from the step's key, the element's index).
Three reasons:
- speed: the draw is a few integer operations that XLA fuses into the op dropout sits in. A
  threefry draw is a separate pass that is much slower (on a 2-core CPU, 2.5 ms vs 74 ms for
  16 x 512 x 768 elements);
- sharding: the index is the element's global index, so a sharded step drops exactly what one
  device would;
- attention: the Pallas kernel and the XLA reference draw the same mask for the same seed
  (`attention_keep`), tile by tile in the kernel, whole in XLA. The kernel's backward pass
  recomputes the mask instead of storing a [T, T] one. On a mesh each device's kernel numbers
  its rows and heads from where its block sits in the whole batch, so the mask does not depend
  on the mesh either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mix32(x):
    """A bijective avalanche on uint32 (the "lowbias32" integer hash): every output bit depends
    on every input bit, so consecutive counters give independent-looking bits."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _threshold(rate: float):
    return jnp.uint32(min(int(rate * 2.0 ** 32), 2 ** 32 - 1))


def seed_of(key):
    """The uint32 seed a dropout key stands for."""
    return jax.random.bits(key, (), jnp.uint32)


def attention_keep(seed, row, col, rate: float):
    """Whether attention probability (row, col) survives dropout at `rate`. row numbers (batch,
    query head, query position) of the whole batch as (b * heads + h) * seq_len + q; col is the
    key position."""
    row_hash = mix32(seed.astype(jnp.uint32) ^ mix32(row.astype(jnp.uint32)))
    return mix32(row_hash ^ (col.astype(jnp.uint32) * jnp.uint32(0x9E3779B9))) >= _threshold(rate)


def dropout(x, rate: float, key):
    """Zeroes a `rate` share of x and scales the rest by 1 / (1 - rate); identity without a key."""
    if key is None or rate == 0.0:
        return x
    # The flat index built from per-dimension iotas, which a sharded step splits like x.
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for dim in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % 2 ** 32)
        stride *= x.shape[dim]
    keep = mix32(seed_of(key) ^ mix32(index)) >= _threshold(rate)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
