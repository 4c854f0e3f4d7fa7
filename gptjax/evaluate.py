"""Batch evaluation (`gptjax eval`): fine-tuned runs, or a pretrained LM scored zero/few-shot.

    config.task   one task, a comma-separated list, or all (the nine GLUE tasks and AX)
    config.mode   finetuned: the fine-tuning run in --workdir (one task), or WORKDIR/<task> for
                  each task of a list (AX uses the MNLI run); zero_shot / few_shot: the
                  pretrained model at config.init_from (or --workdir), no training

Per task it writes WORKDIR/eval/<task>/metrics.json and predictions_<split>.tsv (`index\\tprediction`,
by idx) for every scored split, the GLUE submission file of each test split into
WORKDIR/eval/glue_submission/ (zip that folder for the GLUE server), and prints one table with
the GLUE average. Fine-tuned evaluation runs on the mesh; the last batch is padded with rows
that are dropped again, so every example is scored exactly once.
"""

from __future__ import annotations

import json
import os

import numpy as np

from gptjax import checkpoint, config as config_lib, distributed
from gptjax.errors import UserError
from gptjax.tasks import GLUE_TASKS, get_task, transforms
from gptjax.tasks.scores import glue_average, main_score, task_scores
from gptjax.tasks.splits import read_split
from gptjax.tasks.submission import write_predictions, write_submission

SUBMISSION_DIR = "glue_submission"


def _run_task(workdir: str) -> str:
    """The task of the fine-tuning run in `workdir` ("" when it is not one)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        return json.load(f).get("task", "")


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
        path = os.path.join(candidate, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                if json.load(f).get("task") == trained:
                    return candidate
    raise UserError(f"no fine-tuning run of {trained} for task {task.name}: expected "
                    f"{'--workdir or ' if single else ''}{os.path.join(workdir, trained)} to be one "
                    f"(made by `gptjax finetune --config.task={trained}`)")


class FinetunedPredictor:
    """The best checkpoint of a fine-tuning run, on the mesh."""

    def __init__(self, directory: str):
        from gptjax.data.tokenizer import Tokenizer
        from gptjax.finetune import TaskRunner, read_best

        with open(os.path.join(directory, "config.json")) as f:
            self.config = config_lib.config_from_dict(json.load(f))
        self.trained_task = get_task(self.config.task)
        best = read_best(directory)
        self.step = best["step"]
        self.runner = TaskRunner(self.config, self.trained_task)
        reader = checkpoint.Checkpointer(directory, read_only=True)
        try:
            params = reader.restore_params(self.step, self.runner.state.params)
        finally:
            reader.close()
        self.runner.state = type(self.runner.state)(self.runner.state.step, params, self.runner.state.opt_state)
        self.tokenizer = Tokenizer.load(os.path.join(directory, "tokenizer.model"))
        self.directory = directory

    def predict(self, task, examples, split: str) -> np.ndarray:
        from gptjax.finetune import input_length, predictions

        max_len = input_length(self.config)
        encoded = transforms.encode(task, examples, self.tokenizer, max_len)
        if encoded.truncated:
            distributed.log(f"{task.name} {split}: {encoded.truncated} of {len(encoded)} examples truncated to {max_len} tokens")
        return predictions(self.trained_task, self.runner.logits(encoded))


def _labelled(task, examples) -> bool:
    return bool(examples) and all(ex.label is not None for ex in examples)


def evaluate(config, workdir: str) -> dict:
    """Scores every requested task and split; returns {task: {split: scores}} plus the GLUE average."""
    spec = config.task or (_run_task(workdir) if config.mode == "finetuned" else "")
    tasks = task_list(spec)
    single = len(tasks) == 1
    main = distributed.is_main()
    lm = None
    if config.mode != "finetuned":
        from gptjax.api import GPT
        lm = GPT.from_pretrained(config.init_from or workdir)
        if lm.tokenizer is None:
            raise UserError(f"{config.init_from or workdir} has no tokenizer.model; zero/few-shot scoring needs "
                            f"the model's SentencePiece tokenizer beside it")
    results, rows = {}, []
    for task in tasks:
        splits = task_splits(task, config.finetune.splits)
        if not splits:
            continue
        predictor = FinetunedPredictor(run_dir(workdir, task, single)) if lm is None else None
        out_dir = os.path.join(workdir, "eval", task.name)
        task_result = {"mode": config.mode, "splits": {}}
        if predictor is not None:
            task_result.update(run=predictor.directory, step=predictor.step)
        for split in splits:
            examples = read_split(task, split, config.source, config.data.seed)
            if lm is None:
                preds, scores = predictor.predict(task, examples, split), None
            else:
                from gptjax import zero_shot
                train = read_split(task, "train", config.source, config.data.seed) if config.shots or \
                    task.name in ("cola", "synthetic_acceptability") else None
                scores, preds = zero_shot.evaluate(lm, task, examples, mode=config.mode, shots=config.shots,
                                                   train_examples=train, seed=config.train.seed,
                                                   batch_size=config.finetune.eval_batch_size)
            idx = np.array([ex.idx for ex in examples], np.int64)
            if scores is None and _labelled(task, examples):
                labels = np.array([ex.label for ex in examples])
                scores = task_scores(task, labels, preds)
            entry = {"examples": len(examples), "scores": scores or {}}
            if main:
                os.makedirs(out_dir, exist_ok=True)
                entry["predictions"] = os.path.join(out_dir, f"predictions_{split}.tsv")
                write_predictions(entry["predictions"], idx, preds, task)
                if dict(task.submission_files).get(split):
                    entry["submission"] = write_submission(os.path.join(workdir, "eval", SUBMISSION_DIR), task,
                                                           split, idx, preds)
            task_result["splits"][split] = entry
            rows.append((task.name, split, len(examples), scores or {}))
        if main:
            with open(os.path.join(out_dir, "metrics.json"), "w") as f:
                json.dump(task_result, f, indent=2)
        results[task.name] = task_result
    average, missing = glue_average(_main_scores(results))
    summary = {"tasks": results, "glue_average": None if np.isnan(average) else average, "glue_missing": missing}
    if main:
        _print_table(rows, summary)
    return summary


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
    if summary["glue_average"] is not None:
        counted = 9 - len(summary["glue_missing"])
        print(f"GLUE average over {counted} of 9 tasks (validation): {100 * summary['glue_average']:.1f}")
