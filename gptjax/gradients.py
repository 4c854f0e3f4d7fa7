"""The gradient of a loss over the global batch, summed over microbatches.

One program for every mesh: the step is written for the whole batch and XLA's partitioner splits
it by the shardings of the parameters and the batch. Under FSDP it gathers each weight before
use and sends each weight's gradient back to its shard; XLA's GPU and TPU pipelines write that as
a reduce-scatter (read from the step as compiled for those targets: tests/test_compile.py). XLA's
CPU pipeline has no pass that forms reduce-scatter, so a CPU-compiled step shows an all-reduce and
a slice instead; that program is not the one a GPU or TPU runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def microbatches(batch: dict, count: int) -> dict:
    # Microbatch j takes rows j, j + count, ...: every device holds part of every microbatch,
    # so splitting a data-sharded batch moves nothing between devices.
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1), batch)


def batch_gradients(loss_fn, params, batch: dict, key, grad_accum: int):
    """((value, aux), gradients) of `loss_fn(params, batch, key) -> (value, aux)` over the whole
    batch, split into `grad_accum` microbatches (microbatch j draws dropout from fold_in(key, j)).
    value, aux and gradients are sums over microbatches."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        return grad_fn(params, batch, key)

    def add(carry, inputs):
        index, micro = inputs
        return jax.tree.map(jnp.add, carry, grad_fn(params, micro, jax.random.fold_in(key, index))), None

    micro = microbatches(batch, grad_accum)
    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(add, zeros, (jnp.arange(grad_accum), micro))[0]
