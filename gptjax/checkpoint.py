"""Checkpoints in WORKDIR/checkpoints/<step>/ (Orbax): save, keep, restore onto any mesh.

A training checkpoint holds four items:

    params     the parameters, a flat dict keyed by dotted names ("blocks.0.attn.qkv_kernel"):
               stable, readable with plain Orbax, independent of Flax's container types
    opt_state  the optimizer state, a flat dict keyed by tree path ("1.0.mu.blocks.0.attn.qkv_kernel":
               chain position, state field, parameter name), restored by name after a check
               that the saved names, shapes and dtypes are exactly the optimizer's
    meta       JSON: step, seed (the dropout key is a function of seed and step), the data
               loader's state, the mesh, and the full config of the run
    tokenizer  the bytes of the SentencePiece model the run trained with

`from_pretrained` and fine-tuning read `params` alone. Orbax writes each checkpoint under a
temporary name and renames it when every item is complete, so a save cut short (kill -9, a
lost node) is never listed, never restored, and never deleted here.
"""

from __future__ import annotations

import os
import re
import time

import jax
import numpy as np
from flax import nnx

from gptjax.errors import UserError


def _name(path) -> str:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts.pop()  # the attribute step into a Flax Variable, not part of the parameter's name
    return ".".join(parts)


def opt_state_names(opt_state) -> dict:
    """{path name: array} of an optimizer state: Adam's mu and nu have identical shapes, so only
    names tell them apart."""
    return {_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)}


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


def _abstract(tree: dict) -> dict:
    """Restore targets: shape, dtype and the sharding to read into (each process reads its shards)."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
            for k, v in tree.items()}


def _ocp():
    import orbax.checkpoint as ocp  # heavy; only when checkpoints are touched
    return ocp


def checkpoint_dir(path: str) -> tuple[str, int | None]:
    """(the checkpoints directory, a step or None) for a workdir or a WORKDIR/checkpoints/<step> path."""
    path = os.path.abspath(path)
    if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
        return os.path.dirname(path), int(os.path.basename(path))
    return os.path.join(path, "checkpoints"), None


class Checkpointer:
    """The checkpoints of one run: asynchronous saves of the whole train state, retention, restore."""

    def __init__(self, workdir: str, keep: int = 0, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False):
        ocp = _ocp()
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        # read_only: nothing is created; (Orbax's own read_only flag only adds log warnings).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None, keep_period=keep_every or None, create=not read_only,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, params: nnx.State, opt_state, meta: dict, tokenizer_bytes: bytes | None) -> str:
        """Starts writing; returns once the arrays are copied off the devices, while the files are
        written in the background. Training may change the state right away."""
        ocp = _ocp()
        items = {"params": ocp.args.StandardSave(flatten(params)),
                 "opt_state": ocp.args.StandardSave(opt_state_names(opt_state)),
                 "meta": ocp.args.JsonSave(meta)}
        if tokenizer_bytes is not None:
            items["tokenizer"] = ocp.args.StandardSave({"model": np.frombuffer(tokenizer_bytes, np.uint8)})
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        return os.path.join(self.directory, str(step))

    def reload(self) -> None:
        """Lists the step folders again (after some were renamed aside)."""
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until every save in flight is on disk."""
        self._manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        ocp = _ocp()
        try:
            return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        except Exception as e:  # noqa: BLE001 -- any failure to read means a damaged checkpoint
            raise DamagedCheckpoint(self.directory, step, e) from None

    def restore(self, step: int, params: nnx.State, opt_state) -> tuple[nnx.State, object, dict]:
        """(params, opt_state, meta) of `step`, laid out like the given (sharded) templates."""
        ocp = _ocp()
        saved = self._opt_state_metadata(step)
        names = opt_state_names(opt_state)
        by_position = all(_POSITIONAL.fullmatch(name) for name in saved)  # written before names
        target = _leaves(opt_state) if by_position else names
        _check_opt_state(f"{self.directory}/{step}", saved, target,
                         list(names) if by_position else None)
        args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(flatten(params))),
                                  opt_state=ocp.args.StandardRestore(_abstract(target)),
                                  meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpoint(self.directory, step, e) from None
        arrays = restored["opt_state"]
        treedef = jax.tree.structure(opt_state)
        opt = jax.tree.unflatten(treedef, [arrays[k] for k in target])
        return unflatten(dict(restored["params"]), params), opt, dict(restored["meta"])

    def _opt_state_metadata(self, step: int) -> dict:
        """{name: (shape, dtype)} of the optimizer state saved at `step`, read without its arrays."""
        ocp = _ocp()
        try:
            with ocp.StandardCheckpointer() as reader:
                meta = reader.metadata(os.path.join(self.directory, str(step), "opt_state"))
            tree = getattr(meta, "item_metadata", meta)
            return {name: (tuple(m.shape), np.dtype(m.dtype)) for name, m in tree.items()}
        except Exception as e:  # noqa: BLE001 -- any failure to read means a damaged checkpoint
            raise DamagedCheckpoint(self.directory, step, e) from None

    def restore_params(self, step: int, like: nnx.State) -> nnx.State:
        """The params of `step` alone (never the optimizer state), laid out like `like`."""
        ocp = _ocp()
        args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(flatten(like))))
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError) as e:
            raise UserError(f"checkpoint {self.directory}/{step} cannot be read or does not match the model "
                            f"({str(e).splitlines()[0][:200]}); check model.* against the saved config.json") from None
        return unflatten(dict(restored["params"]), like)

    def tokenizer_bytes(self, step: int) -> bytes | None:
        ocp = _ocp()
        if not os.path.isdir(os.path.join(self.directory, str(step), "tokenizer")):
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(tokenizer=ocp.args.StandardRestore()))
        return np.asarray(restored["tokenizer"]["model"]).tobytes()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _leaves(tree) -> dict:
    # The layout of checkpoints written before names: zero-padded leaf indices.
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


_POSITIONAL = re.compile(r"\d{5}")


def _check_opt_state(where: str, saved: dict, target: dict, names: list[str] | None) -> None:
    """Refuses a saved optimizer state that is not exactly this optimizer's: the first name that
    is missing, extra, or of another shape or dtype. `names` gives the path names of a
    positional (older) checkpoint's leaves, for the message."""
    advice = ("the optimizer settings (train.grad_clip, the optimizer) or the model changed since it was saved; "
              "resume with the settings in its config.json, or start a new --workdir (fine-tuning and "
              "GPT.from_pretrained read the parameters alone)")
    for key in [*target, *sorted(set(saved) - set(target))]:  # the optimizer's own order first
        label = key if names is None else f"{key} ({names[int(key)] if int(key) < len(names) else 'no such leaf'})"
        if key not in saved:
            raise UserError(f"checkpoint {where} has no optimizer state '{label}'; {advice}")
        if key not in target:
            raise UserError(f"checkpoint {where} holds optimizer state '{label}', which this optimizer does not "
                            f"have; {advice}")
        shape, dtype = saved[key]
        want = target[key]
        if shape != tuple(want.shape) or dtype != np.dtype(want.dtype):
            raise UserError(f"checkpoint {where} holds optimizer state '{label}' as {dtype}{list(shape)}, this "
                            f"optimizer has {np.dtype(want.dtype)}{list(want.shape)}; {advice}")


class DamagedCheckpoint(UserError):
    def __init__(self, directory: str, step: int, error: Exception):
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = reason.split(". See full TensorStore details")[0][:300]  # the rest is a repr of the reader
        super().__init__(f"checkpoint {directory}/{step} cannot be read ({reason})")
        self.step = step


def set_aside(directory: str, step: int) -> str:
    """Renames a checkpoint out of the step sequence (kept, never deleted) so that the resumed run
    can save that step again."""
    target = os.path.join(directory, f"{step}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
    number = 1
    while os.path.exists(target):
        target, number = f"{target.split('~')[0]}~{number}", number + 1
    os.rename(os.path.join(directory, str(step)), target)
    return target


def save_params(workdir: str, step: int, params: nnx.State) -> str:
    """A params-only checkpoint (for exported or converted models), written synchronously."""
    ocp = _ocp()
    with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(flatten(params))))
        manager.wait_until_finished()
    return os.path.join(workdir, "checkpoints", str(step))


def latest_step(workdir: str) -> int | None:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    steps = [int(name) for name in os.listdir(directory)
             if name.isdigit() and os.path.isdir(os.path.join(directory, name))]
    if not steps:
        return None
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        complete = checkpointer.steps()
    finally:
        checkpointer.close()
    return complete[-1] if complete else None


def load_params(path: str, like: nnx.State, step: int | None = None) -> tuple[nnx.State, int]:
    """The params (only) of a workdir's newest checkpoint, or of `step`, or of a checkpoint path
    WORKDIR/checkpoints/<step>, into the structure (and shardings) of `like`."""
    directory, path_step = checkpoint_dir(path)
    step = path_step if step is None else step
    if not os.path.isdir(directory):
        raise UserError(f"no checkpoints in {path} (expected {directory}/<step>/); "
                        f"train first with `gptjax pretrain --workdir {path}`")
    reader = Checkpointer(os.path.dirname(directory), read_only=True)
    try:
        steps = reader.steps()
        step = steps[-1] if step is None and steps else step
        if step is None or step not in steps:
            raise UserError(f"no complete checkpoint{'' if step is None else f' for step {step}'} in {directory}"
                            + (f" (complete: {steps})" if steps else ""))
        return reader.restore_params(step, like), step
    finally:
        reader.close()
