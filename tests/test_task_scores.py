import math
import os

import numpy as np
import pytest
from scipy import stats

from gptjax.errors import UserError
from gptjax.tasks import get_task
from gptjax.tasks.scores import (accuracy, f1, glue_average, main_score, matthews, pearson, spearman,
                                 task_scores)
from gptjax.tasks.submission import write_predictions, write_submission

# A hand-made binary example: tp=3 (rows 0-2), fn=1 (row 3), tn=4 (rows 4-7), fp=2 (rows 8-9).
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PREDS = [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
TP, FN, TN, FP = 3, 1, 4, 2


def _from_confusion(confusion):
    """labels, predictions with confusion[true][predicted] examples of each pair."""
    pairs = [(t, p) for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
    return [t for t, _ in pairs], [p for _, p in pairs]


def _mcc_from_one_hot(labels, predictions, k):
    # Gorodkin's definition: the correlation of the one-hot class indicator matrices,
    # cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) with cov summed over the k indicator columns.
    x = np.eye(k)[labels] - np.eye(k)[labels].mean(axis=0)
    y = np.eye(k)[predictions] - np.eye(k)[predictions].mean(axis=0)
    return np.sum(x * y) / math.sqrt(np.sum(x * x) * np.sum(y * y))


def test_binary_matthews_matches_the_textbook_formula():
    expected = (TP * TN - FP * FN) / math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))
    assert expected == pytest.approx(10 / math.sqrt(600))
    assert matthews(LABELS, PREDS) == pytest.approx(expected, abs=1e-12)
    assert matthews(LABELS, LABELS) == pytest.approx(1.0)
    assert matthews(LABELS, [1 - p for p in LABELS]) == pytest.approx(-1.0)
    # For two classes MCC is the phi coefficient, Pearson's r of the 0/1 values.
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    assert matthews(y, p) == pytest.approx(np.corrcoef(y, p)[0, 1], abs=1e-12)


def test_multiclass_matthews_against_a_hand_worked_confusion_matrix():
    confusion = [[5, 1, 0], [2, 3, 1], [0, 1, 4]]
    labels, predictions = _from_confusion(confusion)
    # t = (6, 6, 5), p = (7, 5, 5), c = 12, s = 17:
    # (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (204 - 97) / sqrt((289 - 99)(289 - 97))
    assert matthews(labels, predictions) == pytest.approx(107 / math.sqrt(190 * 192), abs=1e-12)
    assert matthews(labels, predictions) == pytest.approx(
        _mcc_from_one_hot(labels, predictions, 3), abs=1e-12)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 1000)
    p = np.where(rng.random(1000) < 0.6, y, rng.integers(0, 3, 1000))
    assert matthews(y, p) == pytest.approx(_mcc_from_one_hot(y, p, 3), abs=1e-12)
    # Label values need not be 0..k-1 nor all present on both sides.
    assert matthews([0, 2, 2, 0], [0, 2, 1, 0]) == pytest.approx(
        _mcc_from_one_hot([0, 2, 2, 0], [0, 2, 1, 0], 3), abs=1e-12)


def test_matthews_is_zero_when_undefined():
    assert matthews(LABELS, [1] * 10) == 0.0
    assert matthews([0] * 10, PREDS) == 0.0
    assert matthews([2, 2, 2], [2, 2, 2]) == 0.0


def test_accuracy_and_f1_by_hand():
    assert accuracy(LABELS, PREDS) == pytest.approx((TP + TN) / 10)
    precision, recall = TP / (TP + FP), TP / (TP + FN)
    assert f1(LABELS, PREDS) == pytest.approx(2 * precision * recall / (precision + recall))
    assert f1(LABELS, PREDS) == pytest.approx(2 / 3)
    # Class 0 as the positive class: tp=4, fp=1, fn=2.
    assert f1(LABELS, PREDS, positive=0) == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0  # no true and no predicted positives
    assert f1([1, 1], [0, 0]) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_pearson_and_spearman_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = np.round(rng.uniform(0, 5, n) * 5) / 5  # STS-B-like scores with many ties
    predictions = np.round(labels + rng.normal(0, 1.5, n), 1)
    assert pearson(labels, predictions) == pytest.approx(stats.pearsonr(labels, predictions)[0], abs=1e-12)
    assert spearman(labels, predictions) == pytest.approx(stats.spearmanr(labels, predictions)[0], abs=1e-12)
    ints = rng.integers(0, 4, n)  # heavy ties on both sides
    assert spearman(ints, labels) == pytest.approx(stats.spearmanr(ints, labels)[0], abs=1e-12)


def test_correlations_are_zero_for_a_constant_side():
    assert pearson([1.0, 2.0, 3.0], [2.5, 2.5, 2.5]) == 0.0
    assert spearman([4.0, 4.0, 4.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)


def test_task_scores_uses_the_task_metrics_in_order():
    mrpc = task_scores("mrpc", LABELS, PREDS)
    assert list(mrpc) == ["f1", "accuracy"]
    assert mrpc == pytest.approx({"f1": 2 / 3, "accuracy": 0.7})
    assert main_score("mrpc", mrpc) == pytest.approx((2 / 3 + 0.7) / 2)
    cola = task_scores(get_task("cola"), LABELS, PREDS)
    assert cola == pytest.approx({"matthews": 10 / math.sqrt(600)})
    assert main_score("cola", cola) == pytest.approx(10 / math.sqrt(600))
    y, p = [0.0, 1.2, 2.4, 3.6, 5.0], [0.3, 1.0, 2.9, 3.1, 4.4]
    stsb = task_scores("stsb", y, p)
    assert list(stsb) == ["pearson", "spearman"]
    assert stsb["pearson"] == pytest.approx(stats.pearsonr(y, p)[0])
    assert stsb["spearman"] == pytest.approx(1.0)
    assert main_score("stsb", stsb) == pytest.approx((stsb["pearson"] + 1.0) / 2)
    assert task_scores("ax", [0, 1, 2, 2], [0, 1, 2, 1])["matthews"] == pytest.approx(
        _mcc_from_one_hot([0, 1, 2, 2], [0, 1, 2, 1], 3))


def test_task_scores_rejects_bad_input():
    with pytest.raises(UserError, match="3 predictions against 2 labels"):
        task_scores("sst2", [0, 1], [0, 1, 1])
    with pytest.raises(UserError, match="no examples"):
        task_scores("sst2", [], [])
    with pytest.raises(UserError, match="test splits have no labels"):
        task_scores("sst2", [-1, -1], [0, 1])


def test_glue_average_counts_mnli_once_and_ignores_ax_and_synthetic():
    results = {"cola": 0.5, "sst2": 0.9, "mnli_matched": 0.8, "mnli_mismatched": 0.7,
               "ax": 0.1, "synthetic_sentiment": 1.0}
    average, missing = glue_average(results)
    assert average == pytest.approx((0.5 + 0.9 + 0.75) / 3)
    assert missing == ["mrpc", "qqp", "stsb", "qnli", "rte", "wnli"]
    full = {t: 0.6 for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "qnli", "rte", "wnli")}
    average, missing = glue_average({**full, "mnli_matched": 0.9, "mnli_mismatched": 0.5})
    assert average == pytest.approx(0.6 * 8 / 9 + 0.7 / 9) and missing == []
    assert glue_average({**full, "mnli_matched": 0.6})[0] == pytest.approx(0.6)
    average, missing = glue_average({"ax": 0.3})
    assert math.isnan(average) and len(missing) == 9


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_sst2_submission_is_byte_exact_and_sorted(tmp_path):
    path = write_submission(tmp_path, "sst2", "test", [2, 0, 1], [1, 0, 1], allow_partial=True)
    assert path == os.path.join(tmp_path, "SST-2.tsv")
    assert _read(path) == b"index\tprediction\n0\t0\n1\t1\n2\t1\n"
    assert os.listdir(tmp_path) == ["SST-2.tsv"]


def test_mnli_submission_writes_label_names(tmp_path):
    path = write_submission(tmp_path, "mnli", "test_matched", np.array([5, 3, 4]), np.array([2, 0, 1]),
                            allow_partial=True)
    assert os.path.basename(path) == "MNLI-m.tsv"
    assert _read(path) == b"index\tprediction\n3\tentailment\n4\tneutral\n5\tcontradiction\n"


def test_stsb_submission_clips_scores(tmp_path):
    path = write_submission(tmp_path, "stsb", "test", [1, 0, 2], [5.7, -0.2, 2.3456], allow_partial=True)
    assert _read(path) == b"index\tprediction\n0\t0.000\n1\t5.000\n2\t2.346\n"


def test_stsb_predictions_keep_the_scores_the_submission_rounds(tmp_path):
    """The scored numbers themselves, so metrics recomputed from the file are the reported ones."""
    scores = np.array([5.7, -0.2, 2.3456789], np.float32)
    write_predictions(tmp_path / "preds.tsv", [1, 0, 2], scores, "stsb")
    assert _read(tmp_path / "preds.tsv") == b"index\tprediction\n0\t-0.2\n1\t5.7\n2\t2.3456788\n"
    assert np.float32("2.3456788") == scores[2]  # the shortest text that reads back as that float32


def test_write_predictions_rejects_a_repeated_index(tmp_path):
    path = tmp_path / "preds.tsv"
    with pytest.raises(UserError, match="index 1 has more than one prediction"):
        write_predictions(path, [0, 1, 2, 1], [0, 1, 1, 0], "sst2")
    assert list(tmp_path.iterdir()) == []


def test_submission_size_is_checked(tmp_path):
    with pytest.raises(UserError, match=r"sst2, split test: expected 1821 predictions .* got 2"):
        write_submission(tmp_path, "sst2", "test", [0, 1], [0, 1])
    assert list(tmp_path.iterdir()) == []
    path = write_submission(tmp_path, "wnli", "test", range(146), [1] * 146)
    assert _read(path).count(b"\n") == 147
    with pytest.raises(UserError, match="no GLUE submission file"):
        write_submission(tmp_path, "sst2", "validation", [0], [1])


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "preds.tsv"
    write_predictions(path, [0], [1], "sst2")
    with pytest.raises(ValueError):
        write_predictions(path, [0, 1], [1, 7], "sst2")  # 7 is no SST-2 label

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_predictions(path, [0, 1], [0, 0], "sst2")
    assert _read(path) == b"index\tprediction\n0\t1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["preds.tsv"]
