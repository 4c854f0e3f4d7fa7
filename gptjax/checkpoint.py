"""Parameter checkpoints in WORKDIR/checkpoints/<step>/params (Orbax).

Parameters are stored as a flat dict keyed by dotted names ("blocks.0.attn.qkv_kernel"): the
names are stable, readable with plain Orbax, and independent of Flax's container types.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from gptjax.errors import UserError


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten(params: nnx.State) -> dict:
    return {_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))}


def unflatten(flat: dict, like: nnx.State) -> nnx.State:
    """A copy of `like` (a state with the same names) holding the arrays of `flat`."""
    expected = flatten(like)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise UserError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}; check that model.* matches the run that saved it")
    for name, value in flat.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise UserError(f"checkpoint parameter '{name}' has shape {tuple(value.shape)} but the model "
                            f"expects {tuple(expected[name].shape)}; check model.* against the saved config.json")
    pure = nnx.to_pure_dict(like)
    names = [_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(pure)]
    pure = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(pure), [flat[n] for n in names])
    state = jax.tree.map(lambda x: x, like)  # replace_by_pure_dict writes in place; keep `like` intact
    nnx.replace_by_pure_dict(state, pure)
    return state


def _manager(directory: str):
    import orbax.checkpoint as ocp  # heavy; only when checkpoints are touched
    return ocp, ocp.CheckpointManager(os.path.abspath(directory),
                                      options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))


def save_params(workdir: str, step: int, params: nnx.State) -> str:
    ocp, manager = _manager(os.path.join(workdir, "checkpoints"))
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(flatten(params))))
    manager.wait_until_finished()
    manager.close()
    return os.path.join(workdir, "checkpoints", str(step))


def latest_step(workdir: str) -> int | None:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    _, manager = _manager(directory)
    step = manager.latest_step()
    manager.close()
    return step


def load_params(workdir: str, like: nnx.State, step: int | None = None) -> tuple[nnx.State, int]:
    """Restores the params of `step` (default: newest) into the structure of `like`."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise UserError(f"no checkpoints in {workdir} (expected {directory}/<step>/); "
                        f"train first with `gptjax pretrain --workdir {workdir}`")
    ocp, manager = _manager(directory)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise UserError(f"no complete checkpoint{'' if step is None else f' for step {step}'} in {directory}")
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flatten(like).items()}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    except (ValueError, KeyError) as e:
        raise UserError(f"checkpoint {directory}/{step} cannot be read or does not match the model "
                        f"({str(e).splitlines()[0][:200]}); check model.* against the saved config.json") from None
    finally:
        manager.close()
    return unflatten(dict(restored["params"]), like), step
