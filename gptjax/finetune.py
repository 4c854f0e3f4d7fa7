"""Fine-tuning the GPT-1 way (`gptjax finetune`): the pretrained decoder plus a linear head on the
extract token, trained on task inputs built by tasks/transforms.py with

    loss = task loss (cross-entropy; squared error for regression) + finetune.lm_weight * LM loss

where the LM loss is the next-token loss on the task inputs themselves (every token after
[start], special tokens included, padding excluded). The recipe's schedule is linear warmup over
finetune.warmup_fraction of the updates, then linear decay to 0, over finetune.epochs epochs.

A run writes WORKDIR/config.json (the effective config: model shape from init_from), the
tokenizer, metrics.jsonl (per log interval, and the validation scores of every epoch),
checkpoints/<step> at the end of every epoch (and on SIGTERM), and best.json naming the epoch
checkpoint with the best validation score, which `gptjax eval` uses. The same command resumes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import checkpoint, config as config_lib, distributed, loop, resume, run_folder, sharding
from gptjax.data import tokenizer_files
from gptjax.data.tokenizer import PAD_ID, check_vocab
from gptjax.distributed import log_main
from gptjax.errors import UserError
from gptjax.model import init_task_model
from gptjax.model_config import ModelConfig
from gptjax.optim import Schedule, lr_schedule, make_optimizer
from gptjax.profile_window import ProfileWindow
from gptjax.progress import ProgressBar
from gptjax.records import LogRecords
from gptjax.saving import Checkpoints
from gptjax.task_predictor import TaskPredictor, check_batch_size, predictions
from gptjax.tasks import get_task, transforms
from gptjax.tasks.scores import main_score, task_scores
from gptjax.tasks.splits import read_split
from gptjax.workdir_lock import JobLock


def task_loss_sum(task_type: str, logits, labels, weights):
    """Summed task loss over the rows with weight 1 (padding rows weigh 0)."""
    if task_type == "regression":
        per_row = jnp.square(logits[:, 0] - labels)
    else:
        safe = jnp.maximum(labels, 0)  # unlabelled/padding rows hold -1; their weight is 0
        per_row = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, safe[:, None], -1)[:, 0]
    return jnp.sum(per_row * weights)


def batch_loss(graphdef, task_type, lm_weight, clf_dropout, pad_id, params, batch, dropout_key):
    model = nnx.merge(graphdef, params)
    logits, hidden = model(batch["tokens"], batch["extract"], dropout_key=dropout_key, clf_dropout=clf_dropout)
    weights = batch["weights"]
    count = jnp.maximum(weights.sum(), 1.0)
    task = task_loss_sum(task_type, logits, batch["labels"], weights) / count
    aux = {"task_loss": task}
    total = task
    if lm_weight > 0:  # static: with the weight at 0 the vocabulary projection is never computed
        b, s, t = batch["tokens"].shape
        tokens = batch["tokens"].reshape(b * s, t)
        mask = (tokens[:, 1:] != pad_id) & (jnp.repeat(weights, s)[:, None] > 0)
        lm_sum, lm_count = model.decoder.lm_loss(hidden[:, :-1], tokens[:, 1:], mask)
        aux["lm_loss"] = lm_sum / jnp.maximum(lm_count, 1.0)
        total = total + lm_weight * aux["lm_loss"]
    return total, aux


def finetune_schedule(lr: float, warmup_fraction: float, steps: int) -> Schedule:
    """Fine-tuning's learning rate over `steps` updates: `lr` (train.lr) after a warmup over
    `warmup_fraction` (finetune.warmup_fraction) of them, linear decay to 0 (the GPT-1 recipe)."""
    return Schedule(lr, steps, math.ceil(warmup_fraction * steps), "linear", 0.0)


class TaskRunner(loop.StepRunner):
    """A TaskModel and its optimizer state on the mesh, the jitted fine-tuning step, and
    prediction with the current params."""

    def __init__(self, model: ModelConfig, task, t, f, mesh, total_steps: int = 1, pad_id: int = PAD_ID):
        """`model` on `mesh`, trained by train section `t` (optimizer, seed, batch) and finetune
        section `f` (loss weights, schedule, prediction batch) over `total_steps` updates."""
        sharding.check_divisible(model, t, mesh)
        check_batch_size(f.eval_batch_size, mesh)  # before the params are built
        if t.grad_accum != 1:
            raise UserError("fine-tuning has no gradient accumulation; set train.grad_accum=1 (and lower "
                            "train.batch_size if memory is short)")
        self.model_config = model
        make = partial(init_task_model, model, task.head_outputs, task.combine, t.seed)
        _, graphdef, params, self.param_shardings = loop.params_on_mesh(make, mesh)
        self.predictor = TaskPredictor(graphdef, task, mesh, f.eval_batch_size)
        schedule = lr_schedule(finetune_schedule(t.lr, f.warmup_fraction, total_steps))
        loss_fn = partial(batch_loss, graphdef, task.type, f.lm_weight, f.clf_dropout, pad_id)
        rows = jax.sharding.NamedSharding(mesh, sharding.spec(("batch",)))
        step = loop.TrainStep(loss_fn, make_optimizer(t, schedule), schedule, 1, t.seed)
        super().__init__(mesh, graphdef, params, step, rows)

    @classmethod
    def from_config(cls, config, task, total_steps: int = 1, mesh=None, pad_id: int = PAD_ID) -> "TaskRunner":
        """The runner of a fine-tuning run config (its effective config), on its mesh (or on `mesh`)."""
        return cls(ModelConfig.from_config(config.model), task, config.train, config.finetune,
                   mesh or sharding.make_mesh(config.mesh), total_steps, pad_id)

    def load_decoder(self, decoder_params: nnx.State, added_from: int | None = None) -> None:
        """Puts pretrained decoder params (any layout) into this model's decoder, sharded. With
        `added_from`, the token-embedding rows from that id on (tokens added for fine-tuning) keep
        this model's N(0, init_std) initialisation; every other row is the pretrained one."""
        flat, mine = checkpoint.flatten(decoder_params), checkpoint.flatten(self.state.params["decoder"])
        if added_from is not None:
            old, new = jnp.asarray(flat["wte"]), jnp.asarray(mine["wte"])
            rows = jnp.arange(new.shape[0])[:, None]
            end = self.model_config.vocab_size
            pretrained = jnp.zeros_like(new).at[:old.shape[0]].set(old[:new.shape[0]])
            flat["wte"] = jnp.where((rows >= added_from) & (rows < end), new, pretrained)
        params = checkpoint.unflatten(flat, self.state.params["decoder"])
        self.state.params["decoder"] = jax.device_put(params, self.param_shardings["decoder"])

    def to_mesh(self, batch: dict) -> dict:
        """A train batch (the same host arrays on every process) on the mesh, split by rows."""
        return sharding.rows_to_mesh(batch, self.batch_sharding)

    def logits(self, encoded: transforms.Encoded) -> np.ndarray:
        """Task logits of every example under the current params."""
        return self.predictor.logits(encoded, self.state.params)


def make_batch(encoded: transforms.Encoded, rows: np.ndarray, size: int) -> dict:
    """Rows of `encoded` padded to `size` with copies of the first row that weigh 0."""
    pad = size - len(rows)
    picked = np.concatenate([rows, np.full(pad, rows[0] if len(rows) else 0)]).astype(np.int64)
    labels = encoded.labels[picked]
    weights = (np.arange(size) < len(rows)).astype(np.float32)
    if labels.dtype.kind == "f":
        weights = weights * ~np.isnan(labels)
        labels = np.nan_to_num(labels)
    else:
        weights = weights * (labels >= 0)
    return {"tokens": encoded.tokens[picked], "extract": encoded.extract[picked], "labels": labels,
            "weights": weights.astype(np.float32)}


def epoch_rows(n: int, batch_size: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """The example rows of update `index` of `epoch`: a fresh shuffle per epoch, every example
    once; a pure function of its arguments, so a resumed run sees the same batches."""
    return _epoch_order(n, seed, epoch)[index * batch_size:(index + 1) * batch_size]


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    # Shuffled once per epoch, not at every update (QQP has 364k examples).
    return np.random.default_rng([seed, epoch]).permutation(n)


def input_length(f, model) -> int:
    """Tokens per task sequence: finetune.max_len (`f`), or the model's context when it is 0."""
    return f.max_len or model.max_len


def score_text(scores: dict) -> str:
    """{"validation": {"accuracy": 0.5}} -> "validation accuracy 0.5000"."""
    return ", ".join(f"{split} {metric} {value:.4f}" for split, values in scores.items()
                     for metric, value in values.items())


def validation_splits(task) -> list[str]:
    return [s for s in task.splits if s.startswith("validation")]


def load_tokenizer(path: str, init_from: str, pretrained):
    """data.tokenizer (`path`) if set, else the pretrained model's own."""
    if path:
        from gptjax.data.hf_tokenizer import load_any
        return load_any(path)
    if pretrained is not None and pretrained.tokenizer is not None:
        return pretrained.tokenizer
    where = f"{init_from} has no tokenizer" if init_from else "init_from is empty"
    raise UserError(f"fine-tuning needs the tokenizer the model was pretrained with, and {where}; set "
                    f"data.tokenizer to that SentencePiece .model or Hugging Face tokenizer folder")


def added_rows(vocab_size: int, tokenizer) -> int:
    """Rows a token embedding of `vocab_size` gains for the tokens a Hugging Face tokenizer added
    past its own vocabulary (the paper's start, delimiter and extract tokens, and eos / pad where
    it had none); 0 for a tokenizer that fits as it is."""
    added = getattr(tokenizer, "added_tokens", {})
    if not added or tokenizer.vocab_size <= vocab_size:
        return 0
    if tokenizer.base_vocab_size > vocab_size:
        return 0  # a vocabulary the model never had: check_vocab says so
    return tokenizer.vocab_size - vocab_size


def effective_config(config, pretrained, grown: int = 0):
    """The fine-tuning config with the architecture of the pretrained model, its vocabulary
    `grown` by the rows added for fine-tuning's tokens."""
    config = config_lib.config_from_dict(config.to_dict())
    if pretrained is not None:  # what the weights are; how this run executes and regularises is its own
        config.model.update(dataclasses.asdict(pretrained.model_config.architecture()))
    config.model.vocab_size += grown
    config_lib.validate(config)
    return config


def finetune(config, workdir: str, progress: bool = True) -> dict:
    """Fine-tunes `config.task` into `workdir` (or resumes the run there); returns a summary
    with the validation scores of every epoch and the best one."""
    if not config.task:
        raise UserError("set --config.task=NAME (sst2, mnli, synthetic_sentiment, ...): the task to fine-tune on")
    if "," in config.task or config.task == "all":
        raise UserError(f"task='{config.task}': fine-tuning takes one task; run one finetune per task, each "
                        f"into WORKDIR/<task>, and `gptjax eval --config.task={config.task}` scores them together")
    task = get_task(config.task)
    if task.name == "ax":
        raise UserError("ax is MNLI's diagnostic test set with no training data: fine-tune mnli, then "
                        "`gptjax eval --config.task=ax` on that run")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot use --workdir {workdir}: {e.strerror}") from None
    with JobLock(workdir, "gptjax finetune"):
        return _finetune(config, task, workdir, progress)


def _finetune(config, task, workdir: str, progress: bool) -> dict:
    _check_workdir_holds(task, workdir)
    finished = _finished(workdir, config.train.resume, config.finetune.epochs)
    if finished is not None:
        log_main(f"{workdir} already holds the finished run (step {finished['total_steps']}); pass a new --workdir "
                 f"to fine-tune again")
        return {"finished_before": True, **finished}
    # The data first: a missing dataset is reported before minutes of loading weights.
    examples, splits = read_task_data(task, config.task_data, config.data, config.finetune.max_examples)
    pretrained, config, tokenizer, grown = _starting_model(config)
    train, valid = _encode(task, tokenizer, input_length(config.finetune, config.model), examples, splits)
    t = config.train
    per_epoch = math.ceil(len(train) / t.batch_size)
    total = config.finetune.epochs * per_epoch
    runner = TaskRunner.from_config(config, task, total, pad_id=tokenizer.pad_id)
    if pretrained is not None:
        _initialise_decoder(runner, pretrained, grown, tokenizer, config.init_from, task)
        del pretrained
    settings = resume.settings_of(config)
    checkpointer = checkpoint.Checkpointer(workdir)
    try:
        start = _resume(t.resume, settings, workdir, runner, checkpointer, tokenizer, total)
        meta = lambda step: {"step": step, "seed": t.seed, "task": task.name, "config": settings,  # noqa: E731
                             "format": 1}
        scores = EpochScores(task, runner, valid, per_epoch)
        best = KeepBest(scores, checkpointer, workdir, total, start)
        hooks = [ProfileWindow(t.profile_steps),
                 LogRecords(loop.Every((t.log_every, per_epoch), last=True),
                            "the fine-tuning loss became {}; lower train.lr"),
                 scores,
                 Checkpoints(checkpointer, loop.Every(per_epoch), meta, tokenizer_files.to_bytes(tokenizer)),
                 best,
                 ProgressBar(progress and distributed.is_main())]
        batches = (_train_batch(runner, train, t, per_epoch, step) for step in range(start, total))
        run = loop.run(runner, batches, hooks, loop.Run(start, total, workdir))
        return {"history": run.history, **best.best}
    finally:
        checkpointer.close()


def _check_workdir_holds(task, workdir: str) -> None:
    """A workdir holds one run: this task's fine-tuning, or nothing yet."""
    saved = run_folder.saved_config(workdir)
    if not saved:
        return
    before = saved.get("task")
    if before and before != task.name:
        raise UserError(f"{workdir} holds a fine-tuning run of task {before}; pass a new --workdir for {task.name}")
    if not before and os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise UserError(f"{workdir} holds a pretraining run; pass it as --config.init_from={workdir} and give "
                        f"the fine-tuning run a new --workdir")


def read_task_data(task, task_data: str, d, max_examples: int) -> tuple[list, dict]:
    """(train examples, {validation split: examples}) of the task from `task_data` (its
    task_data setting), with data section `d`'s seed and TFDS folder; at most `max_examples`
    training examples (0: all)."""
    read = partial(read_split, task, task_data=task_data, seed=d.seed, tfds_data_dir=d.tfds_data_dir)
    examples = read("train")
    if max_examples:
        examples = examples[:max_examples]
    if not examples:
        raise UserError(f"the train split of {task.name} has no examples")
    return examples, {s: read(s) for s in validation_splits(task)}


def _starting_model(config):
    """(pretrained GPT or None, the effective config, the tokenizer, token-embedding rows added)."""
    from gptjax.api import GPT

    pretrained = GPT.from_pretrained(config.init_from) if config.init_from else None
    tokenizer = load_tokenizer(config.data.tokenizer, config.init_from, pretrained)
    grown = added_rows(pretrained.model_config.vocab_size, tokenizer) if pretrained is not None else 0
    config = effective_config(config, pretrained, grown)
    check_vocab(config.model.vocab_size, tokenizer)
    return pretrained, config, tokenizer, grown


def _encode(task, tokenizer, max_len: int, examples, splits) -> tuple[transforms.Encoded, dict]:
    """The task inputs of the train and validation examples, each cut to `max_len` tokens."""
    train = transforms.encode(task, examples, tokenizer, max_len)
    valid = {s: transforms.encode(task, ex, tokenizer, max_len) for s, ex in splits.items()}
    for name, encoded in (("train", train), *valid.items()):
        if encoded.truncated:
            log_main(f"{encoded.truncated} of {len(encoded)} {name} examples were truncated to {max_len} tokens")
    return train, valid


def _initialise_decoder(runner, pretrained, grown: int, tokenizer, init_from: str, task) -> None:
    runner.load_decoder(nnx.state(pretrained.module, nnx.Param),
                        added_from=pretrained.model_config.vocab_size if grown else None)
    rows = ""
    if grown:
        names = ", ".join(sorted(tokenizer.added_tokens, key=tokenizer.added_tokens.get))
        rows = f" and {grown} token-embedding rows ({names})"
    log_main(f"initialised the decoder from {init_from}; new parameters: the task head "
             f"({runner.model_config.d_model} x {task.head_outputs} + bias){rows}")


def _resume(mode: str, settings: dict, workdir: str, runner, checkpointer, tokenizer, total: int) -> int:
    """The step this run starts from (train.resume `mode`), after checking the workdir's
    checkpoints and tokenizer fit this run; writes config.json (`settings`), metrics.jsonl and
    (new runs) the tokenizer."""
    steps = checkpointer.steps()
    if steps and steps[-1] >= total:
        raise UserError(f"{workdir} holds checkpoints up to step {steps[-1]}, but this config makes "
                        f"{total} updates (finetune.epochs, train.batch_size or finetune.max_examples "
                        f"changed); pass a new --workdir")
    held = tokenizer_files.load_folder(workdir) if steps else None
    if held is not None and tokenizer_files.to_bytes(held) != tokenizer_files.to_bytes(tokenizer):
        raise UserError(f"{workdir} holds the tokenizer its checkpoints were trained with, and this config "
                        f"brings another (init_from or data.tokenizer changed); resume with the settings in "
                        f"{workdir}/config.json, or pass a new --workdir")
    start = resume.resume(mode, settings, runner, checkpointer)
    resume.prepare_workdir(workdir, settings, start)
    if distributed.is_main() and held is None:
        tokenizer_files.save_folder(tokenizer, workdir)
    return start


def _train_batch(runner, train: transforms.Encoded, t, per_epoch: int, step: int) -> dict:
    epoch, index = divmod(step, per_epoch)
    rows = epoch_rows(len(train), t.batch_size, t.seed, epoch, index)
    return runner.to_mesh(make_batch(train, rows, t.batch_size))


class EpochScores(loop.Hook):
    """The validation scores after every epoch."""

    def __init__(self, task, runner, valid: dict, per_epoch: int):
        self.task, self.runner, self.valid, self.every = task, runner, valid, loop.Every(per_epoch)
        self.per_epoch = per_epoch
        self.scores = {}  # {split: {metric: value}} of the last epoch

    def after(self, done: int, run: loop.Run) -> None:
        task = self.task
        self.scores = {s: task_scores(task, enc.labels, predictions(task, self.runner.logits(enc)))
                       for s, enc in self.valid.items()}
        record = {"step": done, "epoch": done // self.per_epoch,
                  "eval_score": float(np.mean([main_score(task, v) for v in self.scores.values()])),
                  **{f"eval_{s}_{m}": v for s, sc in self.scores.items() for m, v in sc.items()}}
        run.evals.append(record)
        run.write(record, f"epoch {record['epoch']}: {score_text(self.scores)}")


class KeepBest(loop.Hook):
    """best.json: the epoch checkpoint with the best validation score so far, written once that
    checkpoint is on disk. Runs after the epoch's save."""

    def __init__(self, scores: EpochScores, checkpointer, workdir: str, total: int, start: int):
        self.epoch_scores, self.checkpointer, self.workdir, self.total = scores, checkpointer, workdir, total
        self.every = scores.every
        best = run_folder.read_best(workdir) if start and run_folder.has_best(workdir) else None
        self.best = None if best is not None and best["step"] > start else best  # a set-aside step is trained again

    def after(self, done: int, run: loop.Run) -> None:
        evaluation = run.evals[-1]
        if self.best is None or evaluation["eval_score"] > self.best["score"]:
            self.best = {"step": done, "epoch": evaluation["epoch"], "score": evaluation["eval_score"],
                         "scores": self.epoch_scores.scores, "total_steps": self.total}
            self.checkpointer.wait()  # best.json never names a checkpoint still being written
            if distributed.is_main():
                run_folder.write_best(self.workdir, self.best)


def _finished(workdir: str, mode: str, epochs: int) -> dict | None:
    """best.json of a run that completed all its updates (and train.resume `mode` is latest),
    else None; a finished run of another number of `epochs` is refused."""
    if str(mode) != "latest" or not run_folder.has_best(workdir):
        return None
    best = run_folder.read_best(workdir)
    done = checkpoint.latest_step(workdir)
    if done is None or done < best.get("total_steps", math.inf):
        return None
    saved = run_folder.saved_config(workdir)["finetune"]["epochs"]
    if saved != epochs:
        # The schedule decays to 0 over the planned epochs, so more of them is another run.
        raise UserError(f"{workdir} holds a finished run of {saved} epochs and finetune.epochs is "
                        f"{epochs}; pass a new --workdir to fine-tune for {epochs}")
    return best

