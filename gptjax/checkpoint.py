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

import errno
import os
import re
import shutil
import time

import jax
import numpy as np
from flax import nnx

from gptjax.errors import UserError, WriteFailed


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
        self._in_flight: int | None = None  # the step of a save still being written
        self._failed = False

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
        # Orbax waits for the previous save before it starts this one anyway; waiting here first
        # reports a failure of that save under its own step, with the checkpoints before it complete.
        self.wait()
        self._in_flight = step
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 -- a failed write (a full disk, a lost mount), or the one before
            raise self._save_failed(e) from None
        return os.path.join(self.directory, str(step))

    def check(self) -> None:
        """Raises SaveFailed as soon as the save in flight has ended in an error (cheap: no wait)."""
        if self._in_flight is None:
            return
        if self._manager.is_saving_in_progress():
            if not _disk_full(self.directory):
                return
            # A full disk: Orbax's write tasks have failed, but the save they belong to may never
            # end on its own. Waiting for it now brings its error out.
            self.wait()
            return
        try:
            # Returns at once for a save that has ended; raises the error of one that failed
            # (Orbax's check_for_errors alone does not see a failed finalisation).
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from None
        self._check_written()

    def _check_written(self) -> None:
        """A save that ended must have left its step folder: Orbax can lose the errors of its
        write tasks (a full disk) and end without one."""
        step = self._in_flight
        if step is not None and not os.path.isdir(os.path.join(self.directory, str(step))):
            raise self._save_failed(OSError(errno.ENOSPC, "No space left on device") if _disk_full(self.directory)
                                    else RuntimeError("the save ended without writing it; --debug shows why"))
        self._in_flight = None

    def _save_failed(self, error: Exception) -> "SaveFailed":
        """The failed save's partial folder is removed (it can never be completed, and it holds
        the space a full disk needs); the message says which checkpoint the next run resumes from."""
        step, self._failed = self._in_flight, True
        for name in os.listdir(self.directory) if os.path.isdir(self.directory) else []:
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        complete = [s for s in complete_steps(self.directory) if s != step]
        return SaveFailed(self.directory, step, _reason(error), complete[-1] if complete else None)

    def reload(self) -> None:
        """Lists the step folders again (after some were renamed aside)."""
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until every save in flight is on disk; raises SaveFailed if one could not be written."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            if self._in_flight is None:
                raise
            raise self._save_failed(e) from None
        self._check_written()

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
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 -- a mismatch or damaged data: either way one line
            raise UserError(f"checkpoint {self.directory}/{step} cannot be read or does not match the model "
                            f"({_reason(e)[:200]}); check model.* against the saved config.json") from None
        return unflatten(dict(restored["params"]), like)

    def tokenizer_bytes(self, step: int) -> bytes | None:
        ocp = _ocp()
        if not os.path.isdir(os.path.join(self.directory, str(step), "tokenizer")):
            return None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(tokenizer=ocp.args.StandardRestore()))
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpoint(self.directory, step, e) from None
        return np.asarray(restored["tokenizer"]["model"]).tobytes()

    def close(self) -> None:
        if self._failed:  # already reported; what is left of the failed save must not raise again
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001
                pass
            return
        try:
            self.wait()
        finally:
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


def _reason(error: Exception) -> str:
    """The first line of a storage error (or of its cause), without the reader's repr that
    TensorStore appends; a full disk in plain words."""
    chain = [error]
    while len(chain) < 8 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
           or "RESOURCE_EXHAUSTED" in str(e) for e in chain):
        return "no space left on the device"
    first = next((e for e in chain if str(e).strip()), error)
    reason = (str(first).strip().splitlines() or [type(first).__name__])[0]
    return reason.split(". See full TensorStore details")[0][:300]


def _disk_full(directory: str) -> bool:
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def complete_steps(directory: str) -> list[int]:
    """Steps of complete checkpoints, from the folder names alone (Orbax renames a checkpoint to
    its bare step number only once every item is written)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


class SaveFailed(WriteFailed):
    """A checkpoint could not be written (a full disk, a lost mount): the run stops at once."""

    def __init__(self, directory: str, step: int, reason: str, resume_from: int | None):
        where = (f"the next run resumes from step {resume_from} ({directory}/{resume_from})" if resume_from is not None
                 else "there is no complete checkpoint, so the next run starts afresh")
        super().__init__(f"checkpoint {step} could not be written ({reason}); its partial files were removed and "
                         f"{where}; free space (or fix the storage) and run the same command again")
        self.step, self.resume_from = step, resume_from


class DamagedCheckpoint(UserError):
    def __init__(self, directory: str, step: int, error: Exception):
        super().__init__(f"checkpoint {directory}/{step} cannot be read ({_reason(error)})")
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
    newest = step is None
    for attempt in range(3):
        reader = Checkpointer(os.path.dirname(directory), read_only=True)
        try:
            steps = reader.steps()
            step = steps[-1] if newest and steps else step
            if step is None or step not in steps:
                raise UserError(f"no complete checkpoint{'' if step is None else f' for step {step}'} in {directory}"
                                + (f" (complete: {steps})" if steps else ""))
            return reader.restore_params(step, like), step
        except FileNotFoundError:
            # A run still training in that workdir rotated the step away while it was read:
            # the newest is then a later one.
            if not newest or attempt == 2:
                raise UserError(f"checkpoint {directory}/{step} was removed while it was read (a run still "
                                f"training there keeps only its newest); pass a step it keeps") from None
        finally:
            reader.close()
