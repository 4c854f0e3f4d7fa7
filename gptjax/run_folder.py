"""What a run leaves in its workdir beside the checkpoints, read back: `config.json` (the
effective config of the run) and, for fine-tuning, `best.json` (the epoch whose validation score
was best). Every reader goes through here, so damage to either file is one clear error."""

import os

from gptjax import config as config_lib
from gptjax.errors import UserError


def saved_config(workdir: str) -> dict:
    """WORKDIR/config.json of a run as written, under today's key names ({} where there is none);
    "task" names a fine-tuning run's task and is empty for a pretraining run."""
    path = os.path.join(workdir, "config.json")
    return config_lib.saved_values(config_lib.read_json(path, fields={})) if os.path.isfile(path) else {}


def has_best(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, "best.json"))


def read_best(workdir: str) -> dict:
    path = os.path.join(workdir, "best.json")
    if not os.path.isfile(path):
        raise UserError(f"{workdir} has no best.json: no fine-tuning epoch has finished there; run "
                        f"`gptjax finetune --config configs/glue.py --config.task=... --workdir {workdir}` first")
    return config_lib.read_json(path, fields={"step": int, "epoch": int, "score": (int, float), "scores": dict})


def write_best(workdir: str, best: dict) -> None:
    config_lib.write_json(os.path.join(workdir, "best.json"), best)
