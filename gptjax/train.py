"""Pretraining (`gptjax pretrain`): the LM loss, the held-out loss, and the pretraining data and
cadence around the shared training core (loop.py)."""

from __future__ import annotations

import os
import time
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import checkpoint, config as config_lib, distributed, gradients, loop, resume, run_folder, sharding
from gptjax.data import tokenizer_files
from gptjax.data.loader import Loader
from gptjax.distributed import log_main
from gptjax.errors import UserError
from gptjax.model import init_decoder
from gptjax.model_config import ModelConfig
from gptjax.optim import Schedule, lr_schedule, make_optimizer
from gptjax.profile_window import ProfileWindow
from gptjax.progress import ProgressBar
from gptjax.records import LogRecords
from gptjax.saving import Checkpoints
from gptjax.throughput import Throughput
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
    """The decoder `model` and its optimizer state on `mesh`, the jitted LM train step of train
    section `t`, held-out scoring."""

    def __init__(self, model: ModelConfig, t, mesh):
        sharding.check_divisible(model, t, mesh)
        make = partial(init_decoder, model, t.seed)
        abstract, graphdef, params, _ = loop.params_on_mesh(make, mesh)
        self.flops_per_token = abstract.flops_per_token(t.seq_len)
        schedule = lr_schedule(Schedule.of_train(t))
        step = loop.TrainStep(partial(batch_loss, graphdef), make_optimizer(t, schedule), schedule, t.grad_accum, t.seed)
        super().__init__(mesh, graphdef, params, step, sharding.batch_sharding(mesh))
        self._eval = jax.jit(partial(eval_step, graphdef, t.grad_accum))

    @classmethod
    def from_config(cls, config, mesh=None) -> "Trainer":
        """The trainer of a pretraining run config, on its mesh (or on `mesh`)."""
        return cls(ModelConfig.from_config(config.model), config.train, mesh or sharding.make_mesh(config.mesh))

    def eval_loss(self, batches: list[dict]) -> float | None:
        if not batches:
            return None
        with jax.set_mesh(self.mesh):
            sums = [self._eval(self.state.params, sharding.rows_to_mesh(batch, self.batch_sharding)) for batch in batches]
        total, count = (float(sum(x)) for x in zip(*jax.device_get(sums)))
        return total / max(count, 1.0)


class HeldOutLoss(loop.Hook):
    """The LM loss on the held-out batches, every train.eval_every steps and after the last."""

    def __init__(self, trainer: Trainer, batches: list[dict], every: loop.Every):
        self.trainer, self.batches, self.every = trainer, batches, every

    def after(self, done: int, run: loop.Run) -> None:
        began = time.perf_counter()
        eval_loss = self.trainer.eval_loss(self.batches)
        if eval_loss is None:
            return
        record = {"step": done, "eval_loss": eval_loss, "eval_seconds": round(time.perf_counter() - began, 3)}
        run.evals.append(record)
        run.write(record, f"step {done}: eval loss {eval_loss:.4f}")


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
    trainer = Trainer.from_config(config)  # first: a mesh that does not fit is reported before any data work
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
        settings = resume.settings_of(config)
        start = resume.resume(t.resume, settings, trainer, checkpointer)
        if start >= t.steps:
            raise UserError(f"train.resume={t.resume} restores step {start}, which is not before "
                            f"train.steps={t.steps}; raise train.steps")
        resume.prepare_workdir(workdir, settings, start)
        batches, eval_batches = corpus.pretraining_batches(config.data, tokenizer, workdir, **batch_settings(t),
                                                           corpus=documents)
        loader = Loader(batches, t.steps, start=start, num_workers=config.data.num_workers,
                        sharding=trainer.batch_sharding)
        meta = lambda step: {"step": step, "seed": t.seed, "loader": loader.state(),  # noqa: E731
                             "mesh": dict(trainer.mesh.shape), "config": settings, "format": 1}
        saves = Checkpoints(checkpointer, loop.Every(t.checkpoint_every, last=True), meta,
                            tokenizer_files.to_bytes(tokenizer))
        throughput = Throughput(t.batch_size * t.seq_len, trainer.flops_per_token, saves)
        hooks = [ProfileWindow(t.profile_steps),
                 LogRecords(loop.Every(t.log_every, first=True, last=True),
                            "the training loss became {}; lower train.lr or raise train.warmup_steps", [throughput]),
                 HeldOutLoss(trainer, eval_batches, loop.Every(t.eval_every, last=True)),
                 saves, ProgressBar(progress and main)]
        run = loop.run(trainer, loader, hooks, loop.Run(start, t.steps, workdir))
    finally:
        checkpointer.close()
    history = run.history
    summary = {"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "start_step": start,
               "eval": run.evals, "history": history,
               "checkpoint": os.path.join(checkpointer.directory, str(t.steps)),
               "tokens_per_sec": history[-1].get("tokens_per_sec"),
               "checkpoint_blocked_s": saves.blocked}
    if main:
        config_lib.write_json(os.path.join(workdir, "summary.json"),
                              {k: v for k, v in summary.items() if k != "history"})
    return summary
