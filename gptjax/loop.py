"""The training core both `gptjax pretrain` and `gptjax finetune` run: the train state on the
mesh, the one jitted train step around a loss function, and the loop, which steps and hands
every other concern to hooks at their cadence:

    saves = saving.Checkpoints(checkpointer, Every(t.checkpoint_every, last=True), meta, tokenizer_bytes)
    hooks = [ProfileWindow(workdir, t.profile_steps),
             LogRecords(Every(t.log_every, first=True, last=True), nan_message, [Throughput(...)]),
             evaluation, saves, ProgressBar()]
    loop.run(runner, batches, hooks, Run(start, total, workdir))

Pretraining (train.py) and fine-tuning (finetune.py) differ only in their loss function, their
batches and the hooks they register. Each hook lives in the module of its concern: metrics.py
(records), throughput.py, profile_window.py, saving.py (checkpoints), progress.py; the
evaluations in train.py and finetune.py.

A loss function is `loss_fn(params, batch, dropout_key) -> (value, aux)`, `aux` a dict of
scalars. Where `aux` has "count", `value` is a sum over the batch: the step adds value, aux and
gradients over microbatches and divides the gradient and `value` by the summed count, so a batch
weighs by its target tokens however it was split. Without "count", `value` is the loss as it is
and the batch cannot be split into microbatches (grad_accum must be 1). The loss function is
written for the whole batch on every mesh; XLA's partitioner splits it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptjax import distributed, gradients, sharding
from gptjax.errors import Preempted
from gptjax.metrics import MetricsWriter
from gptjax.stop_signal import StopSignal


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


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """One optimizer update of `loss_fn` under `tx`, over `grad_accum` microbatches; dropout
    keys from `seed`. A function of (state, batch) once built, which is what gets jitted."""

    loss_fn: Callable
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    grad_accum: int = 1
    seed: int = 0

    def __call__(self, state: TrainState, batch: dict):
        # The dropout key is a function of the seed and step alone, so any step can be replayed exactly.
        # Made inside the step: a key array closed over would be pinned to one device.
        key = jax.random.fold_in(jax.random.key(self.seed + 1), state.step)
        (value, aux), grads = gradients.batch_gradients(self.loss_fn, state.params, batch, key, self.grad_accum)
        count = aux.pop("count", None)
        if self.grad_accum > 1 and count is None:
            raise ValueError("a loss without aux['count'] is a mean and cannot be summed over microbatches")
        if count is not None:
            # Weighted by target tokens over the whole global batch, however it was split.
            count = jnp.maximum(count, 1.0)
            grads = jax.tree.map(lambda g: g / count, grads)
            value = value / count
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": value, **aux, "grad_norm": optax.tree.norm(grads), "lr": self.schedule(state.step)}
        if count is not None:
            metrics["tokens"] = count
        return TrainState(state.step + 1, params, opt_state), metrics


class StepRunner:
    """Parameters and optimizer state on the mesh, in the parameters' layout, and the jitted,
    donating `train_step`. Subclasses add what their objective needs."""

    def __init__(self, mesh, graphdef, params, train_step: TrainStep, batch_sharding):
        self.mesh, self.graphdef, self.batch_sharding = mesh, graphdef, batch_sharding
        self.tx, self.schedule = train_step.tx, train_step.schedule
        replicated = sharding.replicated(mesh)
        opt_state = sharding.init_opt_state(train_step.tx, params, mesh)
        self.state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state)
        state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self._step = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
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


@dataclasses.dataclass(frozen=True)
class Every:
    """When a hook runs: after every `steps`-th step (0: never by count; several counts: after
    the steps of each), and after the run's first or last step where asked."""

    steps: int | tuple[int, ...] = 0
    first: bool = False
    last: bool = False

    def __call__(self, done: int, run: "Run") -> bool:
        counts = self.steps if isinstance(self.steps, tuple) else (self.steps,)
        return any(n and done % n == 0 for n in counts) or (self.first and done == run.start + 1) or \
            (self.last and done == run.total)


class Hook:
    """One concern of the loop. `after` runs after each step that `every` names; the others
    around the run: `begin` before its first step, `before` before every step, `stopping` when a
    stop signal arrives (the run then raises Preempted), `end` however the run ends. The time a
    hook takes is left out of the training throughput unless `training_time` is set."""

    every = Every(1)
    training_time = False

    def begin(self, run: "Run") -> None:
        pass

    def before(self, step: int, run: "Run") -> None:
        pass

    def after(self, done: int, run: "Run") -> None:
        pass

    def stopping(self, done: int, run: "Run") -> None:
        pass

    def end(self, run: "Run", finished: bool) -> None:
        pass


class Run:
    """What the hooks of one run share: its span, the step metrics not yet in a record, the
    records written, and where they go (metrics.jsonl and TensorBoard, the console)."""

    def __init__(self, start: int, total: int, workdir: str):
        self.start, self.total, self.workdir = start, total, workdir
        self.runner = None
        self.pending: list[dict] = []  # step metrics since the last record, still on the devices
        self.history: list[dict] = []  # the step records
        self.evals: list[dict] = []  # the evaluation records
        self.checkpoint: str | None = None  # the newest checkpoint written (or being written)
        self.began = time.perf_counter()  # reset as the first step starts
        self.hook_seconds = 0.0  # spent in hooks that are not training time
        self.say = print  # a console line; the progress bar swaps in its own writer
        self._writer = None

    def open(self) -> None:
        if distributed.is_main():
            self._writer = MetricsWriter(self.workdir)

    def write(self, record: dict, line: str = "") -> None:
        """A record into metrics.jsonl and TensorBoard, and its line on the console; main process only."""
        if self._writer is None:
            return
        self._writer.write(record)
        if line:
            self.say(distributed.prefix() + line)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def run(runner: StepRunner, batches: Iterator[dict], hooks: list[Hook], run: Run) -> Run:
    """Steps `runner` from run.start to run.total on `batches`, each hook at its cadence; returns
    `run` with its records. On SIGTERM or the first Ctrl-C the hooks' `stopping` save, then
    Preempted is raised."""
    run.runner = runner
    stop = StopSignal()
    finished = False

    def call(method, *args, due=hooks) -> None:
        for hook in due:
            began = time.perf_counter()
            getattr(hook, method)(*args, run)
            if not hook.training_time:
                run.hook_seconds += time.perf_counter() - began

    try:
        run.open()  # before the first step: opening TensorBoard's writer is not step time
        call("begin")
        run.began = time.perf_counter()
        for step in range(run.start, run.total):
            call("before", step)
            run.pending.append(runner.step(next(batches)))
            done = step + 1
            call("after", done, due=[hook for hook in hooks if hook.every(done, run)])
            if done < run.total and stop(done):
                call("stopping", done)
                raise Preempted(done, run.checkpoint, interrupted=stop.interrupted)
        finished = True
    finally:
        stop.close()
        try:
            for hook in hooks:
                hook.end(run, finished)
        finally:
            run.close()
    return run
