"""Train state, the jitted train step, and the pretraining loop (`gptjax pretrain`)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptjax import checkpoint, config as config_lib, distributed, sharding
from gptjax.distributed import log_main
from gptjax.errors import Preempted, UserError
from gptjax.data.loader import Loader
from gptjax.metrics import MetricsWriter
from gptjax.mfu import mfu
from gptjax.model import init_decoder
from gptjax.optim import lr_schedule, make_optimizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def batch_loss(graphdef, params, batch, dropout_key):
    """(summed token loss, token count) of one batch under `params`."""
    model = nnx.merge(graphdef, params)
    hidden = model(batch["tokens"], batch["positions"], batch.get("segment_ids"), dropout_key=dropout_key)
    return model.lm_loss(hidden, batch["targets"], batch["loss_mask"])


def _microbatches(batch: dict, count: int) -> dict:
    # Microbatch j takes rows j, j + count, ...: every device holds part of every microbatch,
    # so splitting a data-sharded batch moves nothing between devices.
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(graphdef, tx, schedule, grad_accum, seed, state: TrainState, batch):
    # The dropout key is a function of the seed and step alone, so any step can be replayed exactly.
    # Made inside the step: a key array closed over would be pinned to one device.
    key = jax.random.fold_in(jax.random.key(seed + 1), state.step)
    grad_fn = jax.value_and_grad(partial(batch_loss, graphdef), has_aux=True)
    if grad_accum == 1:
        (total, count), grads = grad_fn(state.params, batch, key)
    else:
        def accumulate(carry, inputs):
            index, micro = inputs
            (micro_total, micro_count), micro_grads = grad_fn(state.params, micro, jax.random.fold_in(key, index))
            total, count, grads = carry
            return (total + micro_total, count + micro_count, jax.tree.map(jnp.add, grads, micro_grads)), None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (total, count, grads), _ = jax.lax.scan(accumulate, zeros,
                                                (jnp.arange(grad_accum), _microbatches(batch, grad_accum)))
    # Weighted by target tokens over the whole global batch, however it was split.
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
               "tokens": count}
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(graphdef, grad_accum, params, batch):
    """(summed token loss, token count) of a held-out batch, scored in the train step's
    microbatches: the activations of one microbatch at a time, as in training, so a batch that
    trains within a device's memory is also scored within it."""
    def score(micro):
        model = nnx.merge(graphdef, params)
        hidden = model(micro["tokens"], micro["positions"], micro.get("segment_ids"))
        return model.lm_loss(hidden, micro["targets"], micro["loss_mask"])

    if grad_accum == 1:
        return score(batch)

    def accumulate(carry, micro):
        total, count = score(micro)
        return (carry[0] + total, carry[1] + count), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    return jax.lax.scan(accumulate, zeros, _microbatches(batch, grad_accum))[0]


class Trainer:
    """The model definition, optimizer state on the mesh, and the jitted step for one config."""

    def __init__(self, config, mesh=None):
        self.config = config
        self.mesh = mesh or sharding.make_mesh(config.mesh)
        sharding.check_divisible(config, self.mesh)
        seed = config.train.seed
        abstract = nnx.eval_shape(lambda: init_decoder(config.model, seed))
        self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        self.flops_per_token = abstract.flops_per_token(config.train.seq_len)
        param_shardings = sharding.param_shardings(self.mesh, abstract_params)
        # Created directly in its sharded layout: no device ever holds the whole model.
        params = jax.jit(lambda: nnx.state(init_decoder(config.model, seed), nnx.Param),
                         out_shardings=param_shardings)()
        self.schedule = lr_schedule(config.train)
        self.tx = make_optimizer(config.train)
        replicated = sharding.replicated(self.mesh)
        opt_state = sharding.init_opt_state(self.tx, params, self.mesh)  # in the parameters' layout
        self.state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state)
        state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        step = partial(train_step, self.graphdef, self.tx, self.schedule, config.train.grad_accum, seed)
        self._step = jax.jit(step, in_shardings=(state_shardings, self.batch_sharding),
                             out_shardings=(state_shardings, replicated), donate_argnums=(0,))
        self._eval = jax.jit(partial(eval_step, self.graphdef, config.train.grad_accum))

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

    def eval_loss(self, batches: list[dict]) -> float | None:
        if not batches:
            return None
        def local(batch):  # this process's rows, p, p + n, ...: each row is scored on one device only
            rows = {k: np.asarray(v)[jax.process_index()::jax.process_count()] for k, v in batch.items()}
            return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in rows.items()}

        with jax.set_mesh(self.mesh):
            sums = [self._eval(self.state.params, local(batch)) for batch in batches]
        total, count = (float(sum(x)) for x in zip(*jax.device_get(sums)))
        return total / max(count, 1.0)


def _summarise(records: list[dict]) -> dict:
    host = jax.device_get(records)
    out = {"loss": float(np.mean([r["loss"] for r in host])),
           "grad_norm": float(np.mean([r["grad_norm"] for r in host])),
           "lr": float(host[-1]["lr"]), "tokens": float(sum(r["tokens"] for r in host))}
    if not np.isfinite(out["loss"]):
        raise UserError(f"the training loss became {out['loss']}; lower train.lr or raise train.warmup_steps")
    return out


# Fields that fix the parameters' shapes or meaning: a checkpoint cannot continue under others.
FROZEN_ON_RESUME = tuple(f"model.{k}" for k in ("vocab_size", "vocab_pad_multiple", "n_layer", "n_head", "d_model",
                                                 "d_ff", "max_len", "block"))


def _flat_settings(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, config) -> dict:
    """{field: (saved value, current value)} for every setting that differs from the checkpoint's."""
    before, now = _flat_settings(saved), _flat_settings(json.loads(config_lib.to_json(config)))
    return {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v and k != "train.resume"}



def _resume(config, workdir: str, trainer: Trainer, checkpointer: checkpoint.Checkpointer) -> int:
    """Restores the checkpoint train.resume asks for into `trainer`; returns its step (0: fresh)."""
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
            frozen = {k: v for k, v in changes.items() if k in FROZEN_ON_RESUME}
            if frozen:
                key, (old, new) = next(iter(frozen.items()))
                raise UserError(f"{key} is {new!r} but the checkpoint at step {step} was trained with {old!r}; "
                                f"a run cannot resume with another model shape: set {key}={old} or pass a "
                                f"new --workdir")
            params, opt_state, meta = checkpointer.restore(step, trainer.state.params, trainer.state.opt_state)
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
    replicated = trainer.state.step.sharding
    trainer.state = TrainState(jax.device_put(jnp.asarray(meta["step"], jnp.int32), replicated), params, opt_state)
    log_main(f"resumed from {checkpointer.directory}/{step}")
    return int(meta["step"])


def _restart_metrics(workdir: str, step: int) -> None:
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
    number = 1
    while os.path.exists(f"{path}.{number}"):
        number += 1
    os.replace(path, f"{path}.{number}")
    with open(path, "w") as f:
        f.writelines(kept)


class _StopSignal:
    """SIGTERM asks the run to stop after the current step. One process: a signal handler. Several:
    JAX's preemption sync point, which has every process stop after the same step."""

    def __init__(self):
        self.received, self._previous = False, None
        self._shared = jax.process_count() > 1
        if not self._shared and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def __call__(self, step: int) -> bool:
        if self._shared:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def pretrain(config, workdir: str, progress: bool = True) -> dict:
    """Trains `config` into `workdir`, or resumes the run there; returns a summary (first/last
    loss, eval losses, tokens/s). On SIGTERM: saves, then raises Preempted."""
    from tqdm.auto import tqdm

    from gptjax.data import corpus

    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot use --workdir {workdir}: {e.strerror}") from None
    t = config.train
    main = distributed.is_main()
    trainer = Trainer(config)  # first: a mesh that does not fit is reported before any data work
    checkpointer = checkpoint.Checkpointer(workdir, keep=t.keep, keep_every=t.keep_every)
    try:
        steps = checkpointer.steps()
        if str(t.resume) == "latest" and steps and steps[-1] >= t.steps:
            log_main(f"{workdir} already holds step {steps[-1]} of train.steps={t.steps}; "
                     f"raise train.steps to train on")
            return {"finished_before": True, "step": steps[-1],
                    "checkpoint": os.path.join(checkpointer.directory, str(steps[-1]))}
        start = _resume(config, workdir, trainer, checkpointer)
        if start >= t.steps:
            raise UserError(f"train.resume={t.resume} restores step {start}, which is not before "
                            f"train.steps={t.steps}; raise train.steps")
        return _train(config, workdir, trainer, checkpointer, start, progress and main, tqdm, corpus)
    finally:
        checkpointer.close()


def _train(config, workdir, trainer, checkpointer, start, progress, tqdm, corpus) -> dict:
    t, main = config.train, distributed.is_main()
    if main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config) + "\n")
        _restart_metrics(workdir, start)
    documents: dict = {}  # read at most once, only if the tokenizer or an unprepared source needs them
    if main:  # trains the tokenizer if there is none; the other processes then load it
        tokenizer = corpus.workdir_tokenizer(config, workdir, documents)
    distributed.barrier("tokenizer")
    if not main:
        tokenizer = corpus.workdir_tokenizer(config, workdir, documents)
    with open(os.path.join(workdir, "tokenizer.model"), "rb") as f:
        tokenizer_bytes = f.read()
    batches, eval_batches = corpus.pretraining_batches(config, tokenizer, workdir, documents)
    loader = Loader(batches, t.steps, start=start, num_workers=config.data.num_workers,
                    sharding=trainer.batch_sharding)
    writer = MetricsWriter(workdir) if main else None
    stop = _StopSignal()
    history, eval_history, pending = [], [], []
    bar = tqdm(total=t.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    window_start, paused = time.perf_counter(), 0.0  # the first window includes compilation
    profile_from, profile_to = t.profile_steps
    tracing = False
    step_tokens = t.batch_size * t.seq_len  # every token a step processes, padding and all
    saved = start  # the newest step on disk (or being written)
    blocked, reported = [], 0  # seconds each save held up the loop; how many are in metrics.jsonl

    def save(step: int) -> str:
        meta = {"step": step, "seed": t.seed, "loader": loader.state(), "mesh": dict(trainer.mesh.shape),
                "config": json.loads(config_lib.to_json(config)), "format": 1}
        began = time.perf_counter()
        path = checkpointer.save(step, trainer.state.params, trainer.state.opt_state, meta, tokenizer_bytes)
        blocked.append(round(time.perf_counter() - began, 4))  # the loop's wait; writing goes on behind it
        return path

    try:
        for step in range(start, t.steps):
            # The window's first step, or the first step of a run resumed inside the window.
            if profile_from and not tracing and profile_from <= step + 1 <= profile_to:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                tracing = True
            pending.append(trainer.step(next(loader)))
            done = step + 1
            if tracing and done == min(profile_to, t.steps):
                jax.block_until_ready(pending[-1])
                jax.profiler.stop_trace()
                tracing = False
            if done == start + 1 or done % t.log_every == 0 or done == t.steps:
                summary = _summarise(pending)  # the one host sync of the interval
                elapsed = time.perf_counter() - window_start - paused
                loss_tokens = summary.pop("tokens")
                tokens_per_sec = step_tokens * len(pending) / elapsed
                record = {"step": done, **summary, "loss_tokens": int(loss_tokens),
                          "tokens_per_sec": round(tokens_per_sec, 1),
                          "step_ms": round(1000 * elapsed / len(pending), 2)}
                memory = jax.local_devices()[0].memory_stats()  # None where the backend keeps no count
                if memory and "bytes_in_use" in memory:
                    record["memory_gib"] = round(memory["bytes_in_use"] / 2**30, 3)
                if done == start + 1:
                    record["first_step_s"] = round(elapsed, 3)  # compilation included: not throughput
                else:
                    util = mfu(trainer.flops_per_token, tokens_per_sec)
                    if util is not None:
                        record["mfu"] = round(util, 4)
                if len(blocked) > reported:  # a save since the last record
                    record["checkpoint_blocked_s"], reported = blocked[-1], len(blocked)
                pending, window_start, paused = [], time.perf_counter(), 0.0
                history.append(record)
                if writer:
                    writer.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
            # Time spent evaluating and saving is kept out of the training throughput.
            pause_start = time.perf_counter()
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                eval_loss = trainer.eval_loss(eval_batches)
                if eval_loss is not None:
                    eval_history.append({"step": done, "eval_loss": eval_loss,
                                         "eval_seconds": round(time.perf_counter() - pause_start, 3)})
                    if writer:
                        writer.write(eval_history[-1])
                        bar.write(distributed.prefix() + f"step {done}: eval loss {eval_loss:.4f}")
            if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps:
                save(done)
                saved = done
            if done < t.steps and stop(done):
                if saved != done:
                    save(done)
                checkpointer.wait()
                raise Preempted(done, os.path.join(checkpointer.directory, str(done)))
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
    path = os.path.join(checkpointer.directory, str(t.steps))
    summary = {"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "start_step": start,
               "eval": eval_history, "history": history, "checkpoint": path,
               "tokens_per_sec": history[-1].get("tokens_per_sec"), "checkpoint_blocked_s": blocked}
    if main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=2)
    return summary
