"""The device mesh (data, fsdp, tensor) and the one table that says where every parameter lives.

Parameters carry logical axis names (model.py); RULES maps each name to a mesh axis. FSDP shards
the embedding dimension of every weight, tensor parallelism shards heads, MLP width and
vocabulary, and the batch is split over data and fsdp together. The same jitted train step then
runs on 1 CPU, 8 fake CPU devices, one GPU or a pod: only the mesh changes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

from gptjax.model_config import ModelConfig
from gptjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (None = replicated). Read top to bottom: this is the whole layout.
RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("length", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
    """Sizes of (data, fsdp, tensor); one of them may be -1 for "the rest of the devices"."""
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise UserError(f"mesh sizes {sizes} must be positive, with at most one -1 (the rest of the devices)")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise UserError(f"mesh {sizes} cannot use {num_devices} devices: {num_devices} is not a multiple "
                            f"of {fixed}; change mesh.data, mesh.fsdp or mesh.tensor")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise UserError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} needs "
                        f"{math.prod(sizes.values())} devices, but there are {num_devices}; make the product "
                        f"{num_devices} (one size may be -1)")
    return sizes


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: XLA propagates shardings from the parameters, the batch and the activation
    # constraints, rather than every op having to state its output sharding.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    groups = int(mesh_cfg.get("dcn_data", 1))
    if groups > 1:
        return jax.sharding.Mesh(_hybrid_devices(devices, sizes, groups), MESH_AXES, axis_types=axis_types)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)  # device order follows the interconnect
    return jax.sharding.Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _hybrid_devices(devices: list, sizes: dict, groups: int) -> np.ndarray:
    """Devices for a data axis whose outer `groups` factor crosses the slow network (DCN).

    Only the gradient all-reduce crosses groups; fsdp and tensor collectives, which run every
    layer, stay on the fast links inside one group (a TPU slice, or a run of whole processes)."""
    if sizes["data"] % groups:
        raise UserError(f"mesh.dcn_data ({groups}) must divide mesh.data ({sizes['data']})")
    inner = (sizes["data"] // groups, sizes["fsdp"], sizes["tensor"])
    if devices[0].platform == "tpu" and all(hasattr(d, "slice_index") for d in devices):  # multi-slice
        slices = len({d.slice_index for d in devices})
        if slices != groups:
            raise UserError(f"mesh.dcn_data ({groups}) must equal the number of TPU slices ({slices})")
        return mesh_utils.create_hybrid_device_mesh(inner, (groups, 1, 1), devices).reshape(
            sizes["data"], sizes["fsdp"], sizes["tensor"])
    # Elsewhere a group is a run of consecutive processes (nodes, when ranks are laid out by node).
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    per_group = len(ordered) // groups
    per_process = len(ordered) // len({d.process_index for d in ordered})
    # A group holds whole processes, or a process holds whole groups (one process, as in tests).
    if len(ordered) % groups or (per_group % per_process and per_process % per_group):
        raise UserError(f"mesh.dcn_data ({groups}) must split the {len(ordered)} devices into groups of whole "
                        f"processes ({per_process} devices each)")
    blocks = [mesh_utils.create_device_mesh(inner, ordered[g * per_group:(g + 1) * per_group],
                                            allow_split_physical_axes=True) for g in range(groups)]
    return np.concatenate(blocks, axis=0)


def check_model(model: ModelConfig, mesh: jax.sharding.Mesh) -> None:
    """Model dimensions a mesh axis would split unevenly, as an error before any compilation."""
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    for name, size in (("model.n_head", model.n_head), ("model.d_ff", model.d_ff),
                       ("the padded vocabulary", model.padded_vocab)):
        if size % tensor:
            raise UserError(f"{name} ({size}) is not divisible by mesh.tensor ({tensor}); pick a tensor size "
                            f"that divides it")
    if model.d_model % fsdp:
        raise UserError(f"model.d_model ({model.d_model}) is not divisible by mesh.fsdp ({fsdp})")


def check_divisible(model: ModelConfig, t, mesh: jax.sharding.Mesh) -> None:
    """The model and the batches of train section `t` against the mesh, as an error before any
    compilation."""
    check_model(model, mesh)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = t.batch_size // max(t.grad_accum, 1)
    if t.batch_size % t.grad_accum or micro % replicas:
        raise UserError(f"train.batch_size ({t.batch_size}) / train.grad_accum ({t.grad_accum}) must be a "
                        f"multiple of mesh.data x mesh.fsdp ({replicas})")


def spec(axes) -> PartitionSpec:
    """PartitionSpec of a tensor whose dimensions have these logical names."""
    table = dict(RULES)
    used, out = set(), []
    for name in axes:
        target = table.get(name) if name is not None else None
        targets = target if isinstance(target, tuple) else (target,)
        if target is None or used & set(targets):
            out.append(None)  # a mesh axis can split only one dimension of a tensor
            continue
        used |= set(targets)
        out.append(target)
    return PartitionSpec(*out)




def constrain(x, axes):
    """Pins an activation to the layout the rules give its logical `axes`.

    Active while tracing under `jax.set_mesh` (the Trainer's steps); elsewhere (generation, the
    API, tests of the bare model) there is no mesh and this returns `x` unchanged. Without these
    pins XLA may pick a layout from one weight's sharding and pay for it with extra collectives.
    Inside a kernel's own shard_map (attention.per_device) every axis is manual and nothing is pinned."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(kind == jax.sharding.AxisType.Manual for kind in mesh.axis_types):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(axes)))


def param_specs(params: nnx.State) -> nnx.State:
    """A PartitionSpec per parameter, from its `axes` metadata through RULES."""
    return jax.tree.map(lambda v: v.replace(spec(v.get_metadata()["axes"])), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(mesh, params: nnx.State) -> nnx.State:
    """A NamedSharding per parameter, from its `axes` metadata through RULES."""
    def one(variable):
        return variable.replace(NamedSharding(mesh, spec(variable.get_metadata()["axes"])))
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def opt_state_shardings(tx, params, mesh):
    """Where each leaf of `tx`'s state for `params` lives: a leaf that mirrors a parameter (Adam's
    moments, say) takes that parameter's sharding, anything else (step counters) is replicated.
    `params` may be arrays or ShapeDtypeStructs, as long as each carries its sharding."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, param: param.sharding, abstract, params,
                                 transform_non_params=lambda _: replicated(mesh))


def init_opt_state(tx, params, mesh):
    """The optimizer state of `params`, created in place on the mesh: each device only ever
    allocates its shard, so a model whose optimizer state fits only when sharded can start.
    (`tx.init` reads no parameter values, so without out_shardings its zeros would land on one
    device.) The counters are on the mesh too: one left on a bare device would reach the train
    step with another input type than the step returns, and the second step would compile again."""
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)


def bytes_per_device(tree) -> dict:
    """{device: bytes of `tree`'s arrays that device holds}, counted from the shardings (works on
    ShapeDtypeStructs too): the memory a layout costs, which equal values cannot show."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for device in leaf.sharding.device_set:
            held[device] = held.get(device, 0) + shard
    return held


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(("batch", "length")))


def rows_to_mesh(batch: dict, rows: NamedSharding, *, process_local: bool = False) -> dict:
    """Host rows as arrays on the mesh in `rows`, a sharding that splits the first axis; every
    batch goes on the mesh here. A global batch (the same host arrays on every process: held-out
    scoring, fine-tuning, evaluation): the p-th of the processes whose devices the mesh holds
    gives its contiguous block of rows, so row i of each result is row i of the input. A mesh of
    one process's own devices (zero-shot scoring's) takes that process's whole batch.
    `process_local`: each process holds its own block already (the training loader's batches)."""
    processes = sorted({device.process_index for device in rows.device_set})
    n, p = len(processes), processes.index(jax.process_index())

    def put(x):
        x = np.asarray(x)
        if process_local:
            return jax.make_array_from_process_local_data(rows, x)
        if len(x) % n:
            raise ValueError(f"a batch of {len(x)} rows does not split over {n} processes")
        block = len(x) // n
        return jax.make_array_from_process_local_data(rows, x[p * block:(p + 1) * block])

    return {k: put(v) for k, v in batch.items()}


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
