"""Pretraining (`gptjax pretrain`): the LM loss, the held-out loss, and the pretraining data and
cadence around the shared training core (loop.py)."""

from __future__ import annotations

import json
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import checkpoint, config as config_lib, distributed, gradients, loop, run_folder, sharding
from gptjax.data import tokenizer_files
from gptjax.data.loader import Loader
from gptjax.distributed import log_main
from gptjax.errors import UserError
from gptjax.model import init_decoder
from gptjax.model_config import ModelConfig
from gptjax.optim import Schedule, lr_schedule, make_optimizer
from gptjax.workdir_lock import JobLock


def batch_loss(graphdef, params, batch, dropout_key):
    """(summed token loss, {"count": target tokens}) of one batch under `params`."""
    model = nnx.merge(graphdef, params)
    hidden = model(batch["tokens"], batch["positions"], batch.get("segment_ids"), dropout_key=dropout_key)
    total, count = model.lm_loss(hidden, batch["targets"], batch["loss_mask"])
    return total, {"count": count}


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
    return jax.lax.scan(accumulate, zeros, gradients.microbatches(batch, grad_accum))[0]


class Trainer(loop.StepRunner):
    """The decoder and its optimizer state on the mesh, the jitted LM train step, held-out scoring."""

    def __init__(self, config, mesh=None):
        self.config = config
        mesh = mesh or sharding.make_mesh(config.mesh)
        sharding.check_divisible(config, mesh)
        t = config.train
        make = partial(init_decoder, ModelConfig.from_config(config.model), t.seed)
        abstract, graphdef, params, _ = loop.params_on_mesh(make, mesh)
        self.flops_per_token = abstract.flops_per_token(t.seq_len)
        schedule = lr_schedule(Schedule.of_train(t))
        super().__init__(mesh, graphdef, params, make_optimizer(t, schedule), schedule, partial(batch_loss, graphdef),
                         sharding.batch_sharding(mesh), t.grad_accum, t.seed)
        self._eval = jax.jit(partial(eval_step, graphdef, t.grad_accum))

    def eval_loss(self, batches: list[dict]) -> float | None:
        if not batches:
            return None
        with jax.set_mesh(self.mesh):
            sums = [self._eval(self.state.params, sharding.rows_to_mesh(batch, self.batch_sharding)) for batch in batches]
        total, count = (float(sum(x)) for x in zip(*jax.device_get(sums)))
        return total / max(count, 1.0)


def batch_settings(t) -> dict:
    """What the data layer takes of train section `t`: the shape, shuffle seed and held-out size
    of its batches."""
    return {"batch_size": t.batch_size, "seq_len": t.seq_len, "seed": t.seed, "eval_batches": t.eval_batches}


def pretrain(config, workdir: str, progress: bool = True) -> dict:
    """Trains `config` into `workdir`, or resumes the run there; returns a summary (first/last
    loss, eval losses, tokens/s). On SIGTERM or Ctrl-C: saves, then raises Preempted. The run
    holds the workdir's lock throughout (workdir_lock.py)."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot use --workdir {workdir}: {e.strerror}") from None
    with JobLock(workdir, "gptjax pretrain"):
        return _pretrain(config, workdir, progress)


def _pretrain(config, workdir: str, progress: bool) -> dict:
    from gptjax.data import corpus

    t = config.train
    main = distributed.is_main()
    saved = run_folder.saved_config(workdir)
    if saved.get("task"):
        raise UserError(f"{workdir} holds a fine-tuning run (task {saved['task']}); continue it with `gptjax finetune` "
                        f"or pretrain in a new --workdir")
    trainer = Trainer(config)  # first: a mesh that does not fit is reported before any data work
    checkpointer = checkpoint.Checkpointer(workdir, keep=t.keep, keep_every=t.keep_every)
    try:
        steps = checkpointer.steps()
        if str(t.resume) == "latest" and steps and steps[-1] >= t.steps:
            log_main(f"{workdir} already holds step {steps[-1]} of train.steps={t.steps}; "
                     f"raise train.steps to train on")
            return {"finished_before": True, "step": steps[-1],
                    "checkpoint": os.path.join(checkpointer.directory, str(steps[-1]))}
        # Before resume writes anything: a tokenizer the workdir cannot take is refused first.
        documents: dict = {}  # read at most once, only if the tokenizer or an unprepared source needs them
        if main:  # trains the tokenizer if there is none; the other processes then load it
            tokenizer = corpus.workdir_tokenizer(config.data, workdir, config.model.vocab_size, documents)
        distributed.barrier("tokenizer")
        if not main:
            tokenizer = corpus.workdir_tokenizer(config.data, workdir, config.model.vocab_size, documents)
        tokenizer_bytes = tokenizer_files.to_bytes(tokenizer)
        start = loop.resume(config, workdir, trainer, checkpointer)
        if start >= t.steps:
            raise UserError(f"train.resume={t.resume} restores step {start}, which is not before "
                            f"train.steps={t.steps}; raise train.steps")
        loop.prepare_workdir(workdir, config, start)
        batches, eval_batches = corpus.pretraining_batches(config.data, tokenizer, workdir, **batch_settings(t),
                                                           corpus=documents)
        loader = Loader(batches, t.steps, start=start, num_workers=config.data.num_workers,
                        sharding=trainer.batch_sharding)

        def evaluate(done: int):
            if not ((t.eval_every and done % t.eval_every == 0) or done == t.steps):
                return None
            began = time.perf_counter()
            eval_loss = trainer.eval_loss(eval_batches)
            if eval_loss is None:
                return None
            record = {"step": done, "eval_loss": eval_loss, "eval_seconds": round(time.perf_counter() - began, 3)}
            return record, f"step {done}: eval loss {eval_loss:.4f}"

        config_json = json.loads(config_lib.to_json(config))
        hooks = loop.Hooks(
            batch=lambda step: next(loader),
            log_step=lambda done: done == start + 1 or done % t.log_every == 0 or done == t.steps,
            save_step=lambda done: bool(t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps,
            meta=lambda step: {"step": step, "seed": t.seed, "loader": loader.state(),
                               "mesh": dict(trainer.mesh.shape), "config": config_json, "format": 1},
            evaluate=evaluate, nan_message="the training loss became {}; lower train.lr or raise train.warmup_steps",
            tokens_per_step=t.batch_size * t.seq_len,  # every token a step processes, padding and all
            flops_per_token=trainer.flops_per_token)
        result = loop.run(trainer, hooks, checkpointer, workdir=workdir, start=start, total=t.steps,
                          tokenizer_bytes=tokenizer_bytes, profile_steps=t.profile_steps,
                          progress=progress and main)
    finally:
        checkpointer.close()
    history = result["history"]
    summary = {"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "start_step": start,
               "eval": result["eval"], "history": history,
               "checkpoint": os.path.join(checkpointer.directory, str(t.steps)),
               "tokens_per_sec": history[-1].get("tokens_per_sec"),
               "checkpoint_blocked_s": result["checkpoint_blocked_s"]}
    if main:
        config_lib.write_json(os.path.join(workdir, "summary.json"),
                              {k: v for k, v in summary.items() if k != "history"})
    return summary
