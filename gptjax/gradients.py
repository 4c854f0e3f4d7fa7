"""The gradient of a loss over the global batch, computed the way FSDP does.

On a mesh whose devices split only the batch (data and fsdp), the batch axes run as one program
per device (`shard_map`). Each device, for each microbatch:
- gathers the weights it holds a 1/fsdp slice of (all-gather over fsdp), whole for use;
- computes the loss and its gradient on its own rows;
- sends each gradient on by reduce-scatter over fsdp, keeping the slice its weight lives in,
  and sums that slice over data (an all-reduce of 1/fsdp of the gradient); a gradient of a
  weight that is not split (biases, LayerNorm) is summed over both;
- sums the loss and its aux scalars over all batch devices.
The caller's optimizer update then runs on each device's slice only.

Written by hand because XLA's partitioner, given the same step, sums a split weight's gradient
whole over the batch devices and then slices it; XLA's GPU and TPU pipelines fuse those two into
a reduce-scatter, its CPU pipeline does not. Here the program writes the collectives itself.
When the tensor axis splits too, the step is left to the partitioner: a hand-written collective
over the batch axes makes XLA first gather a tensor-split weight whole over tensor.

So a loss function may see one device's rows. What it returns must add up over devices to the
whole batch's value: sums do; a mean divides by the whole batch's count (`sharding.batch_sum`).
Dropout numbers rows from the device's block (`sharding.batch_block`), so every device draws its
part of the one mask of the whole batch, and a sharded step equals the unsharded one.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gptjax import sharding


def microbatches(batch: dict, count: int) -> dict:
    # Microbatch j takes rows j, j + count, ...: every device holds part of every microbatch,
    # so splitting a data-sharded batch moves nothing between devices.
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1), batch)


def _split_dims(partition: PartitionSpec):
    """(dimension, mesh axes) of each dimension `partition` splits."""
    return [(dim, entry) for dim, entry in enumerate(partition) if entry]


def _gather(param, by_hand: PartitionSpec):
    for dim, axes in _split_dims(by_hand):
        param = jax.lax.all_gather(param, axes, axis=dim, tiled=True)
    return param


def _scatter(grad, by_hand: PartitionSpec, batch_axes: tuple):
    used = set()
    for dim, axes in _split_dims(by_hand):
        grad = jax.lax.psum_scatter(grad, axes, scatter_dimension=dim, tiled=True)
        used |= {axes} if isinstance(axes, str) else set(axes)
    rest = tuple(a for a in batch_axes if a not in used)
    return jax.lax.psum(grad, rest) if rest else grad


def _accumulate(fn, params, batch: dict, key, grad_accum: int):
    """fn(params, microbatch, key_j) summed over `grad_accum` microbatches (key_j = fold_in(key, j))."""
    if grad_accum == 1:
        return fn(params, batch, key)

    def add(carry, inputs):
        index, micro = inputs
        return jax.tree.map(jnp.add, carry, fn(params, micro, jax.random.fold_in(key, index))), None

    micro = microbatches(batch, grad_accum)
    shapes = jax.eval_shape(fn, params, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(add, zeros, (jnp.arange(grad_accum), micro))[0]


def batch_gradients(loss_fn, params, batch: dict, key, grad_accum: int):
    """((value, aux), gradients) of `loss_fn(params, batch, key) -> (value, aux)` over the whole
    batch, split into `grad_accum` microbatches (microbatch j draws dropout from fold_in(key, j)).
    value, aux and gradients are sums over microbatches; the gradients come back in the
    parameters' layout. Traced under the mesh's `jax.set_mesh`."""
    mesh = jax.sharding.get_abstract_mesh()
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    # Axes of size 1 split nothing: a one-device step has no collectives to write.
    axes = tuple(a for a in sharding.BATCH_AXES if mesh.shape[a] > 1)
    others = set(mesh.axis_names) - set(sharding.BATCH_AXES)
    if not axes or any(mesh.shape[a] > 1 for a in others):
        # A collective over the batch axes of a weight that XLA also splits over tensor makes
        # XLA gather that weight whole over tensor first, which costs tensor parallelism its
        # memory; with tensor splitting, the whole step is left to the partitioner.
        return _accumulate(grad_fn, params, batch, key, grad_accum)
    by_hand = jax.tree.map(lambda p: sharding.only(p, axes), sharding.param_specs(params))

    def one(params, micro, micro_key):
        whole = jax.tree.map(_gather, params, by_hand)
        (value, aux), grads = grad_fn(whole, micro, micro_key)
        grads = jax.tree.map(partial(_scatter, batch_axes=axes), grads, by_hand)
        return jax.lax.psum((value, aux), axes), grads

    rows = PartitionSpec(axes)  # every batch array: its leading dimension over data x fsdp
    return jax.shard_map(partial(_accumulate, one, grad_accum=grad_accum), mesh=mesh,
                         in_specs=(by_hand, rows, PartitionSpec()), out_specs=(PartitionSpec(), by_hand),
                         axis_names=set(sharding.BATCH_AXES), check_vma=False)(params, batch, key)
