"""Batch evaluation (`gptjax eval`): fine-tuned runs, or a pretrained LM scored zero/few-shot.

    config.task   one task, a comma-separated list, or all (the nine GLUE tasks and AX)
    config.mode   finetuned: the fine-tuning run in --workdir (one task), or WORKDIR/<task> for
                  each task of a list (AX uses the MNLI run); zero_shot / few_shot: the
                  pretrained model at config.init_from (or --workdir), no training

Per task it writes WORKDIR/eval/<task>/metrics.json and predictions_<split>.tsv (`index\\tprediction`,
by idx; regression scores exactly as scored, so metrics recomputed from the file are metrics.json's)
for every scored split, the GLUE submission file of each test split into
WORKDIR/eval/glue_submission/ (scores clipped and rounded as the server wants; zip that folder for
the GLUE server), and prints one table with the GLUE average. Fine-tuned evaluation runs on the
mesh; the last batch is padded with rows that are dropped again, so every example is scored
exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial

import jax
import ml_collections
import numpy as np
from flax import nnx

from gptjax import checkpoint, config as config_lib, distributed, sharding
from gptjax.distributed import log_main
from gptjax.data import tokenizer_files
from gptjax.errors import UserError
from gptjax.finetune import input_length
from gptjax.model import init_task_model
from gptjax.model_config import ModelConfig
from gptjax.run_folder import read_best, saved_config
from gptjax.task_predictor import TaskPredictor, check_batch_size
from gptjax.tasks import GLUE_TASKS, Task, get_task, transforms
from gptjax.tasks.scores import glue_average, main_score, task_scores
from gptjax.tasks.splits import read_split
from gptjax.tasks.submission import write_predictions, write_submission

SUBMISSION_DIR = "glue_submission"


def task_list(spec: str) -> list:
    spec = spec.strip()
    if not spec:
        raise UserError("set --config.task to a task, a comma-separated list, or all")
    if spec == "all":
        return list(GLUE_TASKS.values())
    return [get_task(name) for name in spec.split(",") if name.strip()]


def task_splits(task, wanted: str) -> list[str]:
    """The task's splits among `wanted` ("validation,test"); MNLI's names cover both halves."""
    out = []
    for name in (w.strip() for w in wanted.split(",") if w.strip()):
        matches = [s for s in task.splits if s == name or s.startswith(name + "_")]
        if not matches and name not in ("validation", "test", "train"):
            task.check_split(name)  # the error that lists the task's splits
        out += [m for m in matches if m not in out]
    return out


def run_dir(workdir: str, task, single: bool) -> str:
    """The fine-tuning run that predicts `task`: WORKDIR itself or WORKDIR/<task>."""
    trained = "mnli" if task.name == "ax" else task.name
    for candidate in ([workdir] if single else []) + [os.path.join(workdir, trained)]:
        if saved_config(candidate).get("task") == trained:
            return candidate
    raise UserError(f"no fine-tuning run of {trained} for task {task.name}: expected "
                    f"{'--workdir or ' if single else ''}{os.path.join(workdir, trained)} to be one "
                    f"(made by `gptjax finetune --config.task={trained}`)")


@dataclasses.dataclass(frozen=True)
class FinetunedRun:
    """The best checkpoint of a fine-tuning run, loaded for prediction: its params on a mesh (no
    optimizer state), with the run's own config (model, input length, data) and tokenizer."""

    directory: str
    config: ml_collections.ConfigDict  # the run's saved config
    task: Task  # the task it was fine-tuned on (mnli for ax)
    step: int  # its best (best.json)
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: object  # SentencePiece or Hugging Face (data/tokenizer_files.py)


def load_finetuned(directory: str, mesh) -> FinetunedRun:
    """The fine-tuning run in `directory` at its best step (best.json), its params read onto
    `mesh` in the rules' layout, whatever mesh it trained on."""
    config = config_lib.config_from_dict(saved_config(directory), source=os.path.join(directory, "config.json"))
    task = get_task(config.task)
    best = read_best(directory)
    step = best["step"]
    latest = checkpoint.latest_step(directory)
    if latest is not None and latest < best.get("total_steps", 0):
        log_main(f"warning: {directory} has not finished fine-tuning (step {latest} of {best['total_steps']}); "
                 f"scoring its best epoch so far (step {step})")
    model_config = ModelConfig.from_config(config.model)
    sharding.check_model(model_config, mesh)
    # The model's structure alone: its parameters are read, never initialised.
    make = partial(init_task_model, model_config, task.head_outputs, task.combine, config.train.seed)
    graphdef, abstract = nnx.split(nnx.eval_shape(make), nnx.Param)
    like = jax.tree.map(lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
                        abstract, sharding.param_shardings(mesh, abstract))
    reader = checkpoint.Checkpointer(directory, read_only=True)
    try:
        params = reader.restore_params(step, like)
    finally:
        reader.close()
    return FinetunedRun(directory, config, task, step, graphdef, params, tokenizer_files.load_folder(directory))


def data_settings(run_config, eval_config) -> dict:
    """Where a fine-tuning run read its task (unless the eval config names its own task_data)."""
    task_data = eval_config.task_data if eval_config.task_data != "auto" else run_config.task_data
    return {"task_data": task_data, "seed": run_config.data.seed,
            "tfds_data_dir": eval_config.data.tfds_data_dir or run_config.data.tfds_data_dir}


def predict_finetuned(run: FinetunedRun, predictor: TaskPredictor, task, examples, split: str) -> np.ndarray:
    """The run's predictions for `examples` of `task` (for ax, the mnli run's), encoded with the
    run's tokenizer and input length."""
    max_len = input_length(run.config.finetune, run.config.model)
    encoded = transforms.encode(task, examples, run.tokenizer, max_len)
    if encoded.truncated:
        log_main(f"{task.name} {split}: {encoded.truncated} of {len(encoded)} examples truncated to "
                 f"{max_len} tokens")
    return predictor.predict(encoded, run.params)


def _labelled(task, examples) -> bool:
    return bool(examples) and all(ex.label is not None for ex in examples)


def _check_submission_size(task, split: str, examples) -> None:
    """Before any prediction, on every process: a GLUE submission must cover the whole split."""
    expected = dict(task.num_examples).get(split)
    if dict(task.submission_files).get(split) and expected is not None and len(examples) != expected:
        raise UserError(f"{task.name} {split} has {len(examples)} examples, the official split {expected}: the "
                        f"GLUE server needs every one; evaluate the full split, or leave the test splits out "
                        f"with --config.finetune.splits=validation")


def evaluate(config, workdir: str) -> dict:
    """Scores every requested task and split; returns {task: {split: scores}} plus the GLUE average."""
    spec = config.task or (saved_config(workdir).get("task", "") if config.mode == "finetuned" else "")
    tasks = task_list(spec)
    main = distributed.is_main()
    if config.mode == "finetuned":
        score, skipped = _finetuned_scorer(config, workdir, tasks), {}
    else:
        score, skipped = _zero_shot_scorer(config, workdir, tasks)
        tasks = [t for t in tasks if t.name not in skipped]
    results, rows = {}, []
    for task in tasks:
        splits = task_splits(task, config.finetune.splits)
        if not splits:
            continue
        task_result = {"mode": config.mode, "splits": {}}
        for split, (examples, preds, scores) in score(task, splits, task_result).items():
            entry = _split_result(workdir, task, split, examples, preds, scores, main)
            task_result["splits"][split] = entry
            rows.append((task.name, split, len(examples), entry["scores"]))
        if main:
            with open(os.path.join(workdir, "eval", task.name, "metrics.json"), "w") as f:
                json.dump(task_result, f, indent=2)
        results[task.name] = task_result
    average, missing = glue_average(_main_scores(results))
    summary = {"tasks": results, "glue_average": None if np.isnan(average) else average, "glue_missing": missing,
               "skipped": skipped}
    if main:
        _print_table(rows, summary)
    return summary


def _finetuned_scorer(config, workdir: str, tasks):
    """score(task, splits, task_result) -> {split: (examples, predictions, None)} by each task's
    fine-tuning run, on the eval command's mesh and batch size whatever the runs trained with."""
    # Every run is found before the first prediction: a missing one fails in seconds, not hours.
    runs = {task.name: run_dir(workdir, task, len(tasks) == 1) for task in tasks}
    mesh = sharding.make_mesh(config.mesh)
    check_batch_size(config.finetune.eval_batch_size, mesh)

    def score(task, splits, task_result):
        run = load_finetuned(runs[task.name], mesh)
        task_result.update(run=run.directory, step=run.step)
        predictor = TaskPredictor(run.graphdef, run.task, mesh, config.finetune.eval_batch_size)
        split_examples = _read_splits(task, splits, data_settings(run.config, config))
        return {split: (examples, predict_finetuned(run, predictor, task, examples, split), None)
                for split, examples in split_examples.items()}

    return score


def _zero_shot_scorer(config, workdir: str, tasks):
    """(score(task, splits, task_result) -> {split: (examples, predictions, scores)} by the
    pretrained LM at init_from (or --workdir) without training, {task: why it is not scored})."""
    from gptjax import zero_shot
    from gptjax.api import GPT

    lm = GPT.from_pretrained(config.init_from or workdir)
    if lm.tokenizer is None:
        raise UserError(f"{config.init_from or workdir} has no tokenizer; zero/few-shot scoring needs the "
                        f"model's tokenizer beside it (tokenizer.model, or a Hugging Face tokenizer.json "
                        f"or vocab.json + merges.txt)")
    skipped = {task.name: zero_shot.unsupported(task, config.shots) for task in tasks}
    data = {"task_data": config.task_data, "seed": config.data.seed, "tfds_data_dir": config.data.tfds_data_dir}

    def score(task, splits, task_result):
        split_examples = _read_splits(task, splits, data)
        train = None
        if (config.shots or task.name in zero_shot.ACCEPTABILITY_TASKS) and "train" in task.splits:
            train = read_split(task, "train", **data)
        out = {}
        for split, examples in split_examples.items():
            scores, preds = zero_shot.evaluate(lm, task, examples, mode=config.mode, shots=config.shots,
                                               train_examples=train, seed=config.train.seed,
                                               batch_size=config.finetune.eval_batch_size)
            out[split] = (examples, preds, scores)
        return out

    return score, {name: reason for name, reason in skipped.items() if reason}


def _read_splits(task, splits: list[str], data: dict) -> dict:
    """{split: examples}, every split read and checked before the first prediction."""
    split_examples = {split: read_split(task, split, **data) for split in splits}
    for split, examples in split_examples.items():
        _check_submission_size(task, split, examples)
    return split_examples


def _split_result(workdir: str, task, split: str, examples, preds, scores, main: bool) -> dict:
    """One split's entry of metrics.json: its scores (from the labels where the scorer gave none)
    and, from the main process, the predictions file and the GLUE submission file it wrote."""
    if scores is None and _labelled(task, examples):
        scores = task_scores(task, np.array([ex.label for ex in examples]), preds)
    entry = {"examples": len(examples), "scores": scores or {}}
    if main:
        idx = np.array([ex.idx for ex in examples], np.int64)
        out_dir = os.path.join(workdir, "eval", task.name)
        os.makedirs(out_dir, exist_ok=True)
        entry["predictions"] = os.path.join(out_dir, f"predictions_{split}.tsv")
        write_predictions(entry["predictions"], idx, preds, task)
        if dict(task.submission_files).get(split):
            entry["submission"] = write_submission(os.path.join(workdir, "eval", SUBMISSION_DIR), task,
                                                   split, idx, preds)
    return entry


def _main_scores(results: dict) -> dict:
    """The number each task contributes to the GLUE average: its validation score (MNLI: two)."""
    out = {}
    for name, result in results.items():
        task = get_task(name)
        for split, entry in result["splits"].items():
            if split.startswith("validation") and entry["scores"] and set(task.metrics) <= set(entry["scores"]):
                key = name if split == "validation" else f"{name}_{split.removeprefix('validation_')}"
                out[key] = main_score(task, entry["scores"])
    return out


def _print_table(rows, summary) -> None:
    print(f"{'task':<26} {'split':<22} {'examples':>8}  scores")
    for name, split, count, scores in rows:
        text = "  ".join(f"{m} {100 * v:.1f}" for m, v in scores.items()) or "(no labels: predictions written)"
        print(f"{name:<26} {split:<22} {count:>8}  {text}")
    for name, reason in summary["skipped"].items():
        print(f"{name:<26} {'-':<22} {'-':>8}  not scored: {reason}")
    if summary["glue_average"] is not None:
        counted = 9 - len(summary["glue_missing"])
        print(f"GLUE average over {counted} of 9 tasks (validation): {100 * summary['glue_average']:.1f}")
