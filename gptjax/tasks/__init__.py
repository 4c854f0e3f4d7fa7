"""Fine-tuning tasks: the GLUE registry, readers for its three sources, and synthetic tasks.

TFDS is imported only when a TFDS split is read, so the rest works without it.
"""

from gptjax.tasks.example import Example
from gptjax.tasks.glue_jsonl import read_jsonl_split
from gptjax.tasks.glue_tfds import read_tfds_split
from gptjax.tasks.glue_tsv import read_tsv_split
from gptjax.tasks.registry import GLUE_TASKS, SUBMISSION_HEADER, TASKS, Task, TsvFile, get_task
from gptjax.tasks.synthetic_tasks import SYNTHETIC_TASKS, synthetic_example, synthetic_split

__all__ = [
    "Example", "GLUE_TASKS", "SUBMISSION_HEADER", "SYNTHETIC_TASKS", "TASKS", "Task", "TsvFile",
    "get_task", "read_jsonl_split", "read_tfds_split", "read_tsv_split", "synthetic_example",
    "synthetic_split",
]
