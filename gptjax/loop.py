"""The training core both `gptjax pretrain` and `gptjax finetune` run: the train state on the
mesh, the one jitted train step built around a loss function, resume, the loop (metrics and
TensorBoard, progress bar, NaN stop, profile window, evaluation and checkpoint cadence, SIGTERM).

What differs between objectives comes in through a loss function and `Hooks`: where batches
come from, when to log, evaluate and save, what an evaluation is, what a checkpoint's metadata
holds. train.py and finetune.py give those, with their models, data and evaluation.

A loss function is `loss_fn(params, batch, dropout_key) -> (value, aux)`, `aux` a dict of
scalars. Where `aux` has "count", `value` is a sum over the batch: the step adds value, aux and
gradients over microbatches and divides the gradient and `value` by the summed count, so a batch
weighs by its target tokens however it was split. Without "count", `value` is the loss as it is
and the batch cannot be split into microbatches (grad_accum must be 1). The loss function is
written for the whole batch on every mesh; XLA's partitioner splits it.

Resume policy (`train.resume`): latest (the newest readable checkpoint, falling back past
damaged ones), <step> (that one), none (refuse a workdir that holds checkpoints). Checkpoints
newer than the one resumed are renamed aside, never deleted, and metrics.jsonl restarts at the
resumed step (the old file kept as metrics.jsonl.N).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import threading
import time
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptjax import checkpoint, config as config_lib, distributed, gradients, sharding
from gptjax.distributed import log_main
from gptjax.errors import Preempted, UserError
from gptjax.metrics import MetricsWriter
from gptjax.mfu import mfu
from gptjax.model_config import ARCHITECTURE_FIELDS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def params_on_mesh(make, mesh):
    """(abstract module, graphdef, params, param shardings) of the module `make()` builds, its
    parameters created directly in their sharded layout: no device ever holds the whole model."""
    abstract = nnx.eval_shape(make)
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    shardings = sharding.param_shardings(mesh, abstract_params)
    params = jax.jit(lambda: nnx.state(make(), nnx.Param), out_shardings=shardings)()
    return abstract, graphdef, params, shardings


def train_step(loss_fn, tx, schedule, grad_accum, seed, state: TrainState, batch):
    # The dropout key is a function of the seed and step alone, so any step can be replayed exactly.
    # Made inside the step: a key array closed over would be pinned to one device.
    key = jax.random.fold_in(jax.random.key(seed + 1), state.step)
    (value, aux), grads = gradients.batch_gradients(loss_fn, state.params, batch, key, grad_accum)
    count = aux.pop("count", None)
    if grad_accum > 1 and count is None:
        raise ValueError("a loss without aux['count'] is a mean and cannot be summed over microbatches")
    if count is not None:
        # Weighted by target tokens over the whole global batch, however it was split.
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        value = value / count
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value, **aux, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    if count is not None:
        metrics["tokens"] = count
    return TrainState(state.step + 1, params, opt_state), metrics


class StepRunner:
    """Parameters and optimizer state on the mesh, in the parameters' layout, and the jitted,
    donating train step of `loss_fn`. Subclasses add what their objective needs."""

    def __init__(self, mesh, graphdef, params, tx, schedule, loss_fn, batch_sharding, grad_accum: int, seed: int):
        self.mesh, self.graphdef, self.tx, self.schedule = mesh, graphdef, tx, schedule
        self.batch_sharding = batch_sharding
        replicated = sharding.replicated(mesh)
        opt_state = sharding.init_opt_state(tx, params, mesh)
        self.state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state)
        state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        step = partial(train_step, loss_fn, tx, schedule, grad_accum, seed)
        self._step = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                             out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    def compile(self, batch: dict) -> float:
        """Compiles the step for `batch`'s shapes ahead of its first call (so compilation is timed
        apart from running); returns the seconds it took."""
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            self._step = self._step.lower(self.state, batch).compile()
        return time.perf_counter() - start

    def step(self, batch: dict) -> dict:
        with jax.set_mesh(self.mesh):  # the model's activation constraints read this mesh
            self.state, metrics = self._step(self.state, batch)
        return metrics


@dataclasses.dataclass
class Hooks:
    """What one objective adds to the loop."""

    batch: Callable[[int], dict]  # step -> its batch, on the mesh
    log_step: Callable[[int], bool]  # is step `done` one to write a metrics record after?
    save_step: Callable[[int], bool]  # ... one to checkpoint after?
    meta: Callable[[int], dict]  # a checkpoint's metadata
    nan_message: str  # "the ... loss became {}; <what to change>"
    # After step `done`: (a record for metrics.jsonl, a line for the console), or None.
    evaluate: Callable[[int], tuple[dict, str] | None] = lambda done: None
    saved: Callable[[int, dict | None], None] = lambda done, evaluation: None  # after a cadence save
    tokens_per_step: int | None = None  # set: records carry throughput (tokens/s, step ms, MFU, ...)
    flops_per_token: float | None = None


def _flat_settings(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# What the weights are (model_config.py): any change is refused on resume.
_ARCHITECTURE = frozenset(f"model.{name}" for name in ARCHITECTURE_FIELDS)


def config_changes(saved: dict, config) -> dict:
    """{field: (saved value, current value)} for every setting that differs from the checkpoint's."""
    before = _flat_settings(config_lib.saved_values(saved))  # a run saved before a key was renamed
    now = _flat_settings(json.loads(config_lib.to_json(config)))
    return {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v and k != "train.resume"}


def resume(config, workdir: str, runner, checkpointer: checkpoint.Checkpointer) -> int:
    """Restores the checkpoint train.resume asks for into `runner`; returns its step (0: fresh)."""
    steps, mode = checkpointer.steps(), str(config.train.resume)
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
            changes = config_changes(checkpointer.read_meta(step)["config"], config)
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


def prepare_workdir(workdir: str, config, start: int) -> None:
    """WORKDIR/config.json (the effective config) and metrics.jsonl restarted at `start`; main process only."""
    if distributed.is_main():
        config_lib.write_json(os.path.join(workdir, "config.json"), config_lib.to_json(config))
        restart_metrics(workdir, start)


class StopSignal:
    """SIGTERM or Ctrl-C (SIGINT) asks the run to stop after the current step, save and exit; a
    second Ctrl-C aborts at once. One process: signal handlers. Several: JAX's preemption sync
    point, which has every process stop after the same step; Ctrl-C joins it by sending this
    process the SIGTERM that JAX's notifier listens for."""

    def __init__(self):
        self.received, self.interrupted = False, False
        self._previous = {}
        self._shared = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        if not self._shared:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def _terminate(self, signum, frame) -> None:
        self.received = True

    def _interrupt(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        self.interrupted = True
        if self._shared:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.received = True

    def __call__(self, step: int) -> bool:
        if self._shared:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def summarise(metrics: list[dict], nan_message: str) -> dict:
    """One record from the step metrics of a log interval (its one host sync): the loss, then the
    other means by name, the last learning rate, the summed target tokens; a non-finite loss
    stops the run."""
    host = jax.device_get(metrics)
    names = ["loss"] + sorted(k for k in host[0] if k not in ("loss", "lr", "tokens"))
    out = {key: float(np.mean([r[key] for r in host])) for key in names}
    out["lr"] = float(host[-1]["lr"])
    if "tokens" in host[0]:
        out["loss_tokens"] = int(float(sum(r["tokens"] for r in host)))
    if not np.isfinite(out["loss"]):
        raise UserError(nan_message.format(out["loss"]))
    return out


def run(runner, hooks: Hooks, checkpointer: checkpoint.Checkpointer, *, workdir: str, start: int, total: int,
        tokenizer_bytes: bytes | None, profile_steps=(0, 0), progress: bool = True) -> dict:
    """Steps `runner` from `start` to `total`; returns {"history", "eval", "checkpoint_blocked_s"}.
    On SIGTERM or the first Ctrl-C: saves, then raises Preempted. A checkpoint that cannot be
    written raises SaveFailed once its save has ended."""
    from tqdm.auto import tqdm

    writer = MetricsWriter(workdir) if distributed.is_main() else None
    stop = StopSignal()
    history, eval_history, pending = [], [], []
    bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    window_start, paused = time.perf_counter(), 0.0  # the first window includes compilation
    profile_from, profile_to = profile_steps
    tracing = False
    saved = start  # the newest step on disk (or being written)
    blocked, reported = [], 0  # seconds each save held up the loop; how many are in metrics.jsonl

    def save(step: int) -> None:
        meta, began = hooks.meta(step), time.perf_counter()
        checkpointer.save(step, runner.state.params, runner.state.opt_state, meta, tokenizer_bytes)
        blocked.append(round(time.perf_counter() - began, 4))  # the loop's wait; writing goes on behind it

    try:
        for step in range(start, total):
            # The window's first step, or the first step of a run resumed inside the window.
            if profile_from and not tracing and profile_from <= step + 1 <= profile_to:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                tracing = True
            pending.append(runner.step(hooks.batch(step)))
            done = step + 1
            if tracing and done == min(profile_to, total):
                jax.block_until_ready(pending[-1])
                jax.profiler.stop_trace()
                tracing = False
            if hooks.log_step(done):
                record = {"step": done, **summarise(pending, hooks.nan_message)}
                elapsed = time.perf_counter() - window_start - paused
                # Timings only where the objective asks for throughput: fine-tuning records hold
                # numbers alone, so two runs of the same job compare exactly.
                if hooks.tokens_per_step is not None:
                    tokens_per_sec = hooks.tokens_per_step * len(pending) / elapsed
                    record.update(tokens_per_sec=round(tokens_per_sec, 1),
                                  step_ms=round(1000 * elapsed / len(pending), 2))
                    memory = jax.local_devices()[0].memory_stats()  # None where the backend keeps no count
                    if memory and "bytes_in_use" in memory:
                        record["memory_gib"] = round(memory["bytes_in_use"] / 2**30, 3)
                    if done == start + 1:
                        record["first_step_s"] = round(elapsed, 3)  # compilation included: not throughput
                    else:
                        util = mfu(hooks.flops_per_token, tokens_per_sec)
                        if util is not None:
                            record["mfu"] = round(util, 4)
                    if len(blocked) > reported:  # a save since the last record
                        record["checkpoint_blocked_s"], reported = blocked[-1], len(blocked)
                pending, window_start, paused = [], time.perf_counter(), 0.0
                history.append(record)
                if writer:
                    writer.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", **({"tok_s": f"{record['tokens_per_sec']:,.0f}"}
                                                                 if "tokens_per_sec" in record else {}))
            # Time spent evaluating and saving is kept out of the training throughput.
            pause_start = time.perf_counter()
            evaluation = hooks.evaluate(done)
            if evaluation is not None:
                record, line = evaluation
                eval_history.append(record)
                if writer:
                    writer.write(record)
                    bar.write(distributed.prefix() + line)
            if hooks.save_step(done):
                save(done)
                saved = done
                hooks.saved(done, evaluation and evaluation[0])
            if done < total and stop(done):
                if saved != done:
                    save(done)
                checkpointer.wait()
                raise Preempted(done, os.path.join(checkpointer.directory, str(done)), interrupted=stop.interrupted)
            checkpointer.check()  # a save that failed in the background stops the run now, not at the next save
            paused += time.perf_counter() - pause_start
            bar.update(1)
    finally:
        if tracing:  # stopped early (an error, SIGTERM): the trace so far is still written
            jax.profiler.stop_trace()
        stop.close()
        bar.close()
        if writer:
            writer.close()
    checkpointer.wait()
    return {"history": history, "eval": eval_history, "checkpoint_blocked_s": blocked}
