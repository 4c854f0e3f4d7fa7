"""Where a run starts: the checkpoint `train.resume` asks for, restored into the runner, and the
workdir files that follow from it.

Policy (`train.resume`): latest (the newest readable checkpoint, falling back past damaged ones),
<step> (that one), none (refuse a workdir that holds checkpoints). Checkpoints newer than the one
resumed are renamed aside, never deleted, and metrics.jsonl restarts at the resumed step (the old
file kept as metrics.jsonl.N). The architecture (model_config.py) is fixed by the weights: any
change of it is refused; every other changed setting is listed.

The run's settings come in as the JSON-ready dict of its config (`config.to_json`), the form
a checkpoint's metadata keeps them in.
"""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp

from gptjax import checkpoint, config as config_lib, distributed
from gptjax.distributed import log_main
from gptjax.errors import UserError
from gptjax.loop import TrainState
from gptjax.model_config import ARCHITECTURE_FIELDS

_ARCHITECTURE = frozenset(f"model.{name}" for name in ARCHITECTURE_FIELDS)


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_of(config) -> dict:
    """The JSON-ready settings of a run config, as its checkpoints keep them."""
    return json.loads(config_lib.to_json(config))


def config_changes(saved: dict, settings: dict) -> dict:
    """{field: (saved value, current value)} for every setting that differs from the checkpoint's."""
    before = _flat(config_lib.saved_values(saved))  # a run saved before a key was renamed
    now = _flat(settings)
    return {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v and k != "train.resume"}


def resume(mode: str, settings: dict, runner, checkpointer: checkpoint.Checkpointer) -> int:
    """Restores the checkpoint `mode` (train.resume) asks for into `runner`; returns its step (0: fresh)."""
    steps, mode, workdir = checkpointer.steps(), str(mode), os.path.dirname(checkpointer.directory)
    if mode == "none":
        if steps:
            raise UserError(f"{workdir} holds checkpoints (newest: step {steps[-1]}) and train.resume=none; "
                            f"pass a new --workdir to start afresh, or train.resume=latest to continue")
        return 0
    if mode.isdigit() and int(mode) not in steps:
        raise UserError(f"train.resume={mode}, but {checkpointer.directory} has no complete checkpoint for step "
                        f"{mode} (complete: {steps or 'none'})")
    if not steps:
        return 0
    damaged = []
    for step in [int(mode)] if mode.isdigit() else steps[::-1]:
        try:
            changes = config_changes(checkpointer.read_meta(step)["config"], settings)
            frozen = {k: v for k, v in changes.items() if k in _ARCHITECTURE}
            if frozen:
                key, (old, new) = next(iter(frozen.items()))
                raise UserError(f"{key} is {new!r} but the checkpoint at step {step} was trained with {old!r}; "
                                f"the architecture is fixed by the weights, so a run cannot resume with another: "
                                f"set {key}={old} or pass a new --workdir")
            params, opt_state, meta = checkpointer.restore(step, runner.state.params, runner.state.opt_state)
        except checkpoint.DamagedCheckpoint as e:
            if mode != "latest":
                raise UserError(f"{e}; train.resume=latest would fall back to an earlier checkpoint") from None
            log_main(f"warning: {e}; falling back to the previous complete checkpoint")
            damaged.append(step)
            continue
        break
    else:
        raise UserError(f"no checkpoint in {checkpointer.directory} can be read (steps {steps}); pass a new "
                        f"--workdir to start afresh")
    if changes:
        log_main("resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    # Newer checkpoints (unreadable, or passed over by train.resume=<step>) are in the way of the
    # steps this run saves again: renamed aside, never deleted.
    if distributed.is_main():
        for newer in (s for s in steps if s > step):
            why = "unreadable" if newer in damaged else "newer"
            log_main(f"kept the {why} checkpoint {newer} as {checkpoint.set_aside(checkpointer.directory, newer)}")
    distributed.barrier("set-aside")
    checkpointer.reload()
    step_array = jax.device_put(jnp.asarray(meta["step"], jnp.int32), runner.state.step.sharding)
    runner.state = TrainState(step_array, params, opt_state)
    log_main(f"resumed from {checkpointer.directory}/{step}")
    return int(meta["step"])


def restart_metrics(workdir: str, step: int) -> None:
    """metrics.jsonl of a (re)started run: records past `step` belong to work being redone, so the
    old file is kept as metrics.jsonl.N and the new one starts with the records up to `step`."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) == len(lines):
        return
    number = next(n for n in itertools.count(1) if not os.path.exists(f"{path}.{n}"))
    os.replace(path, f"{path}.{number}")
    with open(path, "w") as f:
        f.writelines(kept)


def prepare_workdir(workdir: str, settings: dict, start: int) -> None:
    """WORKDIR/config.json (the effective settings) and metrics.jsonl restarted at `start`; main process only."""
    if distributed.is_main():
        config_lib.write_json(os.path.join(workdir, "config.json"), json.dumps(settings, indent=2, sort_keys=True))
        restart_metrics(workdir, start)
