"""What a fine-tuning task is: its input shape, labels, metrics, splits and where its data lives.

Reading data, building model inputs and writing submissions all key off one `Task`, so a new task
is a new `Task` value rather than new branches scattered through the code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gptjax.errors import UserError

# How the GPT-1 input transform treats the texts (see PAPER_FACTS, "Input transforms"):
#   classification   one text:            s text e
#   pair             ordered pair:        s a $ b e            (entailment, pair classification)
#   similarity       symmetric pair:      s a $ b e and s b $ a e, extract states added
#   regression       as similarity, but W_y has one output read as a float score
#   multiple_choice  one sequence per candidate, s context $ answer_i e, softmax over their
#                    scores; texts are (context, answer_0, ..., answer_k-1), the label is the
#                    index of the correct answer, and label_names name the k answer fields
TASK_TYPES = ("classification", "pair", "similarity", "regression", "multiple_choice")
METRICS = ("matthews", "accuracy", "f1", "pearson", "spearman")
# label_name: the label's name (MNLI, AX, QNLI, RTE); label_id: 0/1; float: a clipped score.
PREDICTION_FORMATS = ("label_name", "label_id", "float")
SUBMISSION_HEADER = "index\tprediction"
_COMBINE = {"classification": "single", "pair": "single", "similarity": "sum", "regression": "sum",
            "multiple_choice": "choice"}


@dataclass(frozen=True)
class TsvFile:
    """One split's file in the official GLUE folder and how its columns map onto an Example."""

    split: str
    path: str  # relative to the task's folder
    text_columns: tuple[str, ...]  # in the order of Task.text_fields
    label_column: str | None  # None: the file carries no labels (test files)
    index_column: str | None  # None: idx is the 0-based data row number, as TFDS assigns it
    # Names of the positional columns of a file without a header line; None: the first line is
    # the header and columns are looked up by name there.
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Task:
    name: str
    type: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]  # index = label id; empty for regression
    metrics: tuple[str, ...]
    splits: tuple[str, ...]
    submission_files: tuple[tuple[str, str], ...] = ()  # (split, GLUE submission file name)
    prediction_format: str = "label_id"
    tfds_name: str | None = None
    tsv_folder: str | None = None  # folder under the GLUE root, e.g. "SST-2"
    tsv_files: tuple[TsvFile, ...] = ()
    score_range: tuple[float, float] | None = None  # regression only
    num_examples: tuple[tuple[str, int], ...] = ()  # official split sizes, for sanity checks
    description: str = field(default="", compare=False)

    def __post_init__(self):
        # A malformed Task is a bug in its definition, caught when the module is imported.
        assert self.type in TASK_TYPES, self.type
        assert set(self.metrics) <= set(METRICS), self.metrics
        assert self.prediction_format in PREDICTION_FORMATS, self.prediction_format
        assert (self.type == "regression") == (not self.label_names), self.name
        assert (self.type == "regression") == (self.score_range is not None), self.name
        if self.type == "multiple_choice":
            assert len(self.text_fields) >= 3, self.name  # a context and at least two answers
            assert len(self.label_names) == len(self.text_fields) - 1, self.name
        else:
            assert len(self.text_fields) == (1 if self.type == "classification" else 2), self.name
        assert {s for s, _ in self.submission_files} <= set(self.splits), self.name
        for f in self.tsv_files:
            assert f.split in self.splits and len(f.text_columns) == len(self.text_fields), f

    @property
    def is_regression(self) -> bool:
        return self.type == "regression"

    @property
    def num_labels(self) -> int:
        """Label ids 0..num_labels-1 (classes, or answers of a multiple choice); 1 for a score."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def head_outputs(self) -> int:
        """Outputs of the task head W_y: one per class, or one score (a regression, or each
        candidate of a multiple choice)."""
        return 1 if self.type in ("regression", "multiple_choice") else len(self.label_names)

    @property
    def combine(self) -> str:
        """How the head reads the extract states of an example's sequences (model.TaskModel)."""
        return _COMBINE[self.type]

    def check_split(self, split: str) -> str:
        if split not in self.splits:
            hint = ""
            if split in ("validation", "dev", "test") and self.name == "mnli":
                hint = " (MNLI has matched and mismatched halves: add _matched or _mismatched)"
            elif split == "dev":
                hint = " (the GLUE dev files are the 'validation' split)"
            raise UserError(f"task {self.name} has no split '{split}'{hint}; "
                            f"its splits are {', '.join(self.splits)}")
        return split

    def tsv_file(self, split: str) -> TsvFile:
        self.check_split(split)
        for f in self.tsv_files:
            if f.split == split:
                return f
        raise UserError(f"task {self.name} is not part of the official GLUE folder; read it from "
                        f"{'TFDS or ' if self.tfds_name else ''}JSONL instead")

    def submission_file(self, split: str = "test") -> str:
        self.check_split(split)
        for s, name in self.submission_files:
            if s == split:
                return name
        raise UserError(f"task {self.name} has no GLUE submission file for split '{split}'; "
                        f"submissions exist for: {', '.join(s for s, _ in self.submission_files) or 'none'}")

    def parse_label(self, value) -> int | float:
        """A label given as an id, a name or (regression) a number -> its id or float score.

        Raises ValueError with the allowed values; readers add the file and line.
        """
        if self.is_regression:
            try:
                score = float(value)
            except (TypeError, ValueError):
                score = math.nan
            lo, hi = self.score_range
            if isinstance(value, bool) or not lo <= score <= hi:
                raise ValueError(f"label {value!r} is not a number in [{lo:g}, {hi:g}]")
            return score
        if isinstance(value, str) and value in self.label_names:
            return self.label_names.index(value)
        label = None
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            label = int(value)  # the official files write ids as digits
        elif hasattr(value, "__index__") and not isinstance(value, bool):
            label = value.__index__()  # int or numpy integer; 1.0 is not an id
        if label is None or not 0 <= label < len(self.label_names):
            allowed = ", ".join(f"{i} ({n})" for i, n in enumerate(self.label_names))
            raise ValueError(f"label {value!r} is not one of {allowed}")
        return label

    def format_prediction(self, prediction) -> str:
        """A predicted label id (or score) as the GLUE server expects it in the prediction column."""
        if self.prediction_format == "float":
            lo, hi = self.score_range
            return f"{min(max(float(prediction), lo), hi):.3f}"
        label = int(prediction)
        if not 0 <= label < len(self.label_names):
            raise ValueError(f"prediction {prediction!r} is not a label id of task {self.name}")
        return self.label_names[label] if self.prediction_format == "label_name" else str(label)
