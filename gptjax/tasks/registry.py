"""The GLUE tasks (and the synthetic ones), looked up by name.

Label ids follow TFDS `glue/<task>` (and so the official files' 0/1 columns): a model trained on
one source predicts the same ids on another.
"""

from __future__ import annotations

from gptjax.errors import UserError
from gptjax.tasks.synthetic_tasks import SYNTHETIC_TASKS
from gptjax.tasks.task import SUBMISSION_HEADER, Task, TsvFile

__all__ = ["GLUE_TASKS", "SUBMISSION_HEADER", "TASKS", "Task", "TsvFile", "get_task"]

_SPLITS = ("train", "validation", "test")
_MNLI_SPLITS = ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")
# CoLA's train and dev files are the only GLUE files without a header line.
_COLA_COLUMNS = ("source", "label", "original_label", "sentence")


def _files(text, label, index, train="train.tsv", dev="dev.tsv", test="test.tsv", test_index="index"):
    """The usual train/dev/test trio: test has the same texts, no label, and an index column."""
    return (TsvFile("train", train, text, label, index),
            TsvFile("validation", dev, text, label, index),
            TsvFile("test", test, text, None, test_index))


def _sizes(*counts, splits=_SPLITS):
    return tuple(zip(splits, counts))


GLUE_TASKS: dict[str, Task] = {t.name: t for t in (
    Task("cola", "classification", ("sentence",), ("unacceptable", "acceptable"), ("matthews",), _SPLITS,
         (("test", "CoLA.tsv"),), "label_id", "glue/cola", "CoLA",
         (TsvFile("train", "train.tsv", ("sentence",), "label", None, _COLA_COLUMNS),
          TsvFile("validation", "dev.tsv", ("sentence",), "label", None, _COLA_COLUMNS),
          TsvFile("test", "test.tsv", ("sentence",), None, "index")),
         num_examples=_sizes(8551, 1043, 1063)),
    Task("sst2", "classification", ("sentence",), ("negative", "positive"), ("accuracy",), _SPLITS,
         (("test", "SST-2.tsv"),), "label_id", "glue/sst2", "SST-2",
         _files(("sentence",), "label", None),
         num_examples=_sizes(67349, 872, 1821)),
    # The MRPC files are the GPT-1 "similarity" kind: a paraphrase relation has no direction.
    Task("mrpc", "similarity", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
         ("f1", "accuracy"), _SPLITS, (("test", "MRPC.tsv"),), "label_id", "glue/mrpc", "MRPC",
         _files(("#1 String", "#2 String"), "Quality", None),
         num_examples=_sizes(3668, 408, 1725)),
    # QQP's train/dev `id` is Quora's pair id, not a row index, so idx is the row number there as
    # in TFDS; in test.tsv `id` is the index the submission must echo.
    Task("qqp", "similarity", ("question1", "question2"), ("not_duplicate", "duplicate"),
         ("f1", "accuracy"), _SPLITS, (("test", "QQP.tsv"),), "label_id", "glue/qqp", "QQP",
         _files(("question1", "question2"), "is_duplicate", None, test_index="id"),
         num_examples=_sizes(363846, 40430, 390965)),
    Task("stsb", "regression", ("sentence1", "sentence2"), (), ("pearson", "spearman"), _SPLITS,
         (("test", "STS-B.tsv"),), "float", "glue/stsb", "STS-B",
         _files(("sentence1", "sentence2"), "score", "index"),
         score_range=(0.0, 5.0), num_examples=_sizes(5749, 1500, 1379)),
    Task("mnli", "pair", ("premise", "hypothesis"), _NLI3, ("accuracy",), _MNLI_SPLITS,
         (("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv")), "label_name",
         "glue/mnli", "MNLI",
         (TsvFile("train", "train.tsv", ("sentence1", "sentence2"), "gold_label", "index"),
          TsvFile("validation_matched", "dev_matched.tsv", ("sentence1", "sentence2"), "gold_label", "index"),
          TsvFile("validation_mismatched", "dev_mismatched.tsv", ("sentence1", "sentence2"), "gold_label",
                  "index"),
          TsvFile("test_matched", "test_matched.tsv", ("sentence1", "sentence2"), None, "index"),
          TsvFile("test_mismatched", "test_mismatched.tsv", ("sentence1", "sentence2"), None, "index")),
         num_examples=_sizes(392702, 9815, 9832, 9796, 9847, splits=_MNLI_SPLITS)),
    Task("qnli", "pair", ("question", "sentence"), _NLI2, ("accuracy",), _SPLITS,
         (("test", "QNLI.tsv"),), "label_name", "glue/qnli", "QNLI",
         _files(("question", "sentence"), "label", "index"),
         num_examples=_sizes(104743, 5463, 5463)),
    Task("rte", "pair", ("sentence1", "sentence2"), _NLI2, ("accuracy",), _SPLITS,
         (("test", "RTE.tsv"),), "label_name", "glue/rte", "RTE",
         _files(("sentence1", "sentence2"), "label", "index"),
         num_examples=_sizes(2490, 277, 3000)),
    # WNLI's ids run the other way round from RTE's: not_entailment is 0.
    Task("wnli", "pair", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",),
         _SPLITS, (("test", "WNLI.tsv"),), "label_id", "glue/wnli", "WNLI",
         _files(("sentence1", "sentence2"), "label", "index"),
         num_examples=_sizes(635, 71, 146)),
    # The diagnostic set is scored by the GLUE server with R3, Matthews' correlation over the
    # three MNLI classes; its labels are never released, so a model trained on MNLI predicts it.
    Task("ax", "pair", ("premise", "hypothesis"), _NLI3, ("matthews",), ("test",),
         (("test", "AX.tsv"),), "label_name", "glue/ax", "diagnostic",
         (TsvFile("test", "diagnostic.tsv", ("sentence1", "sentence2"), None, "index"),),
         num_examples=_sizes(1104, splits=("test",))),
)}

TASKS: dict[str, Task] = {**GLUE_TASKS, **SYNTHETIC_TASKS}


def get_task(name: str | Task) -> Task:
    """The task called `name`; also accepts GLUE's spellings ("SST-2", "STS-B") and "glue/<task>"."""
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower()
    key = key.removeprefix("glue/")
    key = {"sst-2": "sst2", "sts-b": "stsb", "diagnostic": "ax"}.get(key, key)
    if key not in TASKS:
        raise UserError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[key]
