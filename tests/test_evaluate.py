"""`gptjax eval`: files, scores recomputed from the written predictions, GLUE submissions, zero-shot."""

import json
import os

import numpy as np
import pytest

from gptjax import cli
from gptjax.config import load_config
from gptjax.errors import UserError
from gptjax.evaluate import evaluate, task_splits
from gptjax.finetune import finetune
from gptjax.tasks import get_task, read_tsv_split, synthetic_split
from gptjax.tasks.scores import task_scores
from gptjax.train import pretrain
from glue_folder import glue_folder

# One layer: these tests check files and scores, not what the model learns.
FT = ["model.n_layer=1", "model.dtype=float32", "train.batch_size=16", "finetune.max_examples=64",
      "finetune.epochs=1", "train.lr=1e-3", "finetune.eval_batch_size=24"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pre"))
    pretrain(load_config("configs/tiny.py", ["model.n_layer=1", "train.steps=20", "data.num_documents=400",
                                             "train.eval_every=0", "model.dtype=float32"]), workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def runs(pretrained, tmp_path_factory):
    """WORKDIR/<task> fine-tuning runs of two synthetic tasks."""
    root = str(tmp_path_factory.mktemp("runs"))
    for name in ("synthetic_relatedness", "synthetic_choice"):
        finetune(load_config("configs/tiny.py", [*FT, f"task={name}", f"init_from={pretrained}"]),
                 os.path.join(root, name), progress=False)
    return root


def _read_tsv(path):
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "index\tprediction"
    return [line.split("\t") for line in lines[1:]]


def test_scores_match_the_written_predictions(runs, capsys):
    config = load_config("configs/tiny.py", [*FT, "task=synthetic_relatedness,synthetic_choice"])
    summary = evaluate(config, runs)
    table = capsys.readouterr().out
    for name in ("synthetic_relatedness", "synthetic_choice"):
        task = get_task(name)
        metrics = json.load(open(os.path.join(runs, "eval", name, "metrics.json")))
        assert metrics["step"] == json.load(open(os.path.join(runs, name, "best.json")))["step"]
        for split in ("validation", "test"):
            rows = _read_tsv(os.path.join(runs, "eval", name, f"predictions_{split}.tsv"))
            examples = synthetic_split(task, split)
            assert [int(i) for i, _ in rows] == [ex.idx for ex in examples]  # each example once, by idx
            preds = np.array([float(p) for _, p in rows])
            expected = task_scores(task, np.array([ex.label for ex in examples]), preds)
            for metric, value in metrics["splits"][split]["scores"].items():
                assert value == pytest.approx(expected[metric], abs=1e-6)
            assert summary["tasks"][name]["splits"][split]["examples"] == len(examples)
        assert name in table
    assert summary["glue_average"] is None  # synthetic tasks are not GLUE tasks


def test_regression_predictions_are_written_at_full_precision(runs):
    """Pearson and Spearman computed by anyone else from the predictions file are metrics.json's."""
    from scipy import stats

    name = "synthetic_relatedness"
    evaluate(load_config("configs/tiny.py", [f"task={name}", "finetune.splits=validation"]), runs)
    metrics = json.load(open(os.path.join(runs, "eval", name, "metrics.json")))["splits"]["validation"]["scores"]
    rows = _read_tsv(os.path.join(runs, "eval", name, "predictions_validation.tsv"))
    preds = np.array([float(p) for _, p in rows])
    labels = np.array([ex.label for ex in synthetic_split(get_task(name), "validation")])
    assert not np.all(preds == np.round(preds, 3))  # not the 3 decimals of a GLUE submission
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(labels, preds)[0], abs=1e-6)
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(labels, preds)[0], abs=1e-6)
    # Each is the shortest text of a float32: every digit the model gave, none it did not.
    assert all(str(np.float32(p)) == p for _, p in rows)


def test_splits_cover_mnli_halves():
    assert task_splits(get_task("mnli"), "validation,test") == [
        "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"]
    assert task_splits(get_task("ax"), "validation,test") == ["test"]
    with pytest.raises(UserError, match="no split 'dev'"):
        task_splits(get_task("rte"), "dev")


def test_glue_task_from_tsv_writes_the_submission_file(pretrained, tmp_path, capsys):
    glue = glue_folder(str(tmp_path / "glue"), 146)  # WNLI's official test size
    run = str(tmp_path / "wnli")
    args = ["--config", "configs/tiny.py", "--workdir", run, "--no-progress", "--config.task=wnli",
            f"--config.task_data=tsv:{glue}", f"--config.init_from={pretrained}", *[f"--config.{o}" for o in FT]]
    assert cli.main(["finetune", *args]) == 0
    assert cli.main(["eval", *[a for a in args if a != "--no-progress"]]) == 0
    out = capsys.readouterr().out
    assert "GLUE average over 1 of 9 tasks" in out
    rows = _read_tsv(os.path.join(run, "eval", "glue_submission", "WNLI.tsv"))
    assert [int(i) for i, _ in rows] == list(range(146)) and {p for _, p in rows} <= {"0", "1"}
    metrics = json.load(open(os.path.join(run, "eval", "wnli", "metrics.json")))
    dev = read_tsv_split(glue, "wnli", "validation")
    preds = [int(p) for _, p in _read_tsv(os.path.join(run, "eval", "wnli", "predictions_validation.tsv"))]
    assert metrics["splits"]["validation"]["scores"]["accuracy"] == pytest.approx(
        np.mean(np.array(preds) == [ex.label for ex in dev]))
    assert metrics["splits"]["test"]["scores"] == {}  # the test file has no labels


def test_partial_test_split_is_refused_for_submission(pretrained, tmp_path):
    glue = glue_folder(str(tmp_path / "glue"), 10)
    run = str(tmp_path / "wnli")
    config = load_config("configs/tiny.py", [*FT, "task=wnli", f"task_data=tsv:{glue}", f"init_from={pretrained}"])
    finetune(config, run, progress=False)
    with pytest.raises(UserError, match="wnli test has 10 examples, the official split 146"):
        evaluate(config, run)
    assert not os.path.exists(os.path.join(run, "eval", "glue_submission"))  # refused before predicting


def test_a_run_saved_before_task_data_was_named_so_still_evaluates(pretrained, tmp_path):
    """Older runs' config.json holds the task data as a top-level "source"; eval reads the task there."""
    glue = glue_folder(str(tmp_path / "glue"), 10)
    run = str(tmp_path / "wnli")
    settings = [*FT, "task=wnli", "finetune.splits=validation"]
    finetune(load_config("configs/tiny.py", [*settings, f"task_data=tsv:{glue}", f"init_from={pretrained}"]),
             run, progress=False)
    path = os.path.join(run, "config.json")
    values = json.load(open(path))
    values["source"] = values.pop("task_data")
    with open(path, "w") as f:
        json.dump(values, f)
    # The eval config's task_data=auto means the run's: its tsv: folder (20 dev examples), not TFDS's WNLI.
    summary = evaluate(load_config("configs/tiny.py", settings), run)
    dev = read_tsv_split(glue, "wnli", "validation")
    assert summary["tasks"]["wnli"]["splits"]["validation"]["examples"] == len(dev) == 20


def test_zero_shot_scores_a_pretrained_model(pretrained, tmp_path):
    config = load_config("configs/tiny.py", ["task=synthetic_choice,synthetic_sentiment", "mode=zero_shot",
                                             f"init_from={pretrained}", "finetune.splits=validation"])
    summary = evaluate(config, str(tmp_path))
    choice = summary["tasks"]["synthetic_choice"]["splits"]["validation"]["scores"]
    assert set(choice) == {"accuracy", "acc_norm"} and all(0 <= v <= 1 for v in choice.values())
    assert set(summary["tasks"]["synthetic_sentiment"]["splits"]["validation"]["scores"]) == {"accuracy"}
    assert os.path.isfile(tmp_path / "eval" / "synthetic_choice" / "predictions_validation.tsv")


def test_zero_shot_skips_what_it_cannot_score(pretrained, tmp_path, capsys):
    config = load_config("configs/tiny.py", ["task=synthetic_relatedness,synthetic_sentiment", "mode=zero_shot",
                                             f"init_from={pretrained}", "finetune.splits=validation"])
    summary = evaluate(config, str(tmp_path))
    assert list(summary["tasks"]) == ["synthetic_sentiment"]
    assert "regression" in summary["skipped"]["synthetic_relatedness"]
    assert "synthetic_relatedness" in capsys.readouterr().out


def test_eval_runs_on_its_own_mesh_and_batch_size(runs):
    """A run fine-tuned on one device is scored on 1 device with another batch size, and on the
    same predictions as with the run's own settings."""
    name = "synthetic_choice"
    a = evaluate(load_config("configs/tiny.py", [f"task={name}", "finetune.splits=validation",
                                                 "finetune.eval_batch_size=7"]), runs)
    first = open(os.path.join(runs, "eval", name, "predictions_validation.tsv")).read()
    b = evaluate(load_config("configs/tiny.py", [f"task={name}", "finetune.splits=validation",
                                                 "finetune.eval_batch_size=64"]), runs)
    assert open(os.path.join(runs, "eval", name, "predictions_validation.tsv")).read() == first
    assert a["tasks"][name]["splits"] == b["tasks"][name]["splits"]


def test_missing_run_is_a_clear_error(tmp_path):
    config = load_config("configs/tiny.py", ["task=synthetic_sentiment"])
    with pytest.raises(UserError, match="gptjax finetune --config.task=synthetic_sentiment"):
        evaluate(config, str(tmp_path))
    config = load_config("configs/tiny.py", ["task=ax"])
    with pytest.raises(UserError, match="no fine-tuning run of mnli"):
        evaluate(config, str(tmp_path))


def test_mode_and_shots_must_agree():
    with pytest.raises(UserError, match="few_shot needs shots > 0"):
        load_config("configs/glue.py", ["mode=few_shot"])
    with pytest.raises(UserError, match="mode must be one of"):
        load_config("configs/glue.py", ["mode=one_shot"])


def test_eval_of_a_run_defaults_to_its_task(runs, capsys):
    config = load_config("configs/glue.py", ["finetune.splits=validation"])
    summary = evaluate(config, os.path.join(runs, "synthetic_choice"))
    assert list(summary["tasks"]) == ["synthetic_choice"]
