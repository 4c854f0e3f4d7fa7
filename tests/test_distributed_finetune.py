"""Fine-tuning and `gptjax eval` as two real processes (launch/local.sh: fsdp inside each process,
data across the two) write what one process writes with the same global batch."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from free_port import free_port

from gptjax.config import load_config
from gptjax.metrics import read_metrics
from gptjax.tasks.synthetic_tasks import SIZES
from gptjax.train import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Multiple choice: the head's bias is shared by the candidates and cancels, so even a barely trained
# model picks every answer, each from its own example's inputs (a rows mix-up shows). Labels are
# equal from scores equal to float32 rounding; a regression task's rank correlation is not where
# such a model's scores nearly tie.
TASK = "synthetic_choice"
# 28 examples in batches of 8: the last batch of each epoch holds 4, all in process 0's half.
# 200 validation and test examples in batches of 12: the last holds 8, so process 1's half of it
# is 2 examples and 4 padding rows that must be dropped again.
FINETUNE = ["finetune", "--config", "configs/glue.py", "--no-progress", f"--config.task={TASK}",
            "--config.model.dtype=float32", "--config.train.batch_size=8", "--config.finetune.max_examples=28",
            "--config.finetune.epochs=2", "--config.finetune.max_len=64", "--config.train.lr=1e-3",
            "--config.train.log_every=1", "--config.finetune.eval_batch_size=12"]
EVAL = ["eval", "--config", "configs/glue.py", "--config.finetune.eval_batch_size=12"]
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.dcn_data=2"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pre"))
    pretrain(load_config("configs/tiny.py", ["model.n_layer=1", "train.steps=4", "data.num_documents=200",
                                             "train.eval_every=0", "model.dtype=float32"]), workdir, progress=False)
    return workdir


def _start(args, processes):
    """`gptjax ARGS` as one process, or as `processes` processes of two CPU devices each."""
    command = [sys.executable, "-m", "gptjax.cli", *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if processes > 1:
        command = ["launch/local.sh", str(processes), *command]
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        env["GPTJAX_PORT"] = free_port()
    # A session of its own: on a timeout the launcher and every process it started are killed.
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _finish(proc):
    """(how it ended, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # A process left alone when the other fails waits minutes for it in a collective.
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return f"killed after {TIMEOUT} s", out, err
    return f"exit {proc.returncode}", out, err


def _both(args, two_dir, one_dir):
    """Runs ARGS as two processes and as one, side by side (most of each run waits, not computes);
    once both succeeded, returns the two-process stdout and the report of both runs."""
    two, one = _start([*args, "--workdir", two_dir, *MESH], 2), _start([*args, "--workdir", one_dir], 1)
    results = {"two processes": _finish(two), "one process": _finish(one)}
    report = "".join(f"\n--- {name}: {end} ---\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
                     for name, (end, out, err) in results.items())
    assert all(end == "exit 0" for end, _, _ in results.values()), report
    out = results["two processes"][1]
    lines = out.splitlines()
    assert lines and all(line.startswith(("[0/2] ", "[1/2] ")) for line in lines), report
    return out, report


def _assert_close_dicts(a, b, where):
    """Same keys, equal strings and ints, floats to rtol 1e-5."""
    assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
    for key in a:
        if isinstance(a[key], dict):
            _assert_close_dicts(a[key], b[key], f"{where}.{key}")
        elif isinstance(a[key], float):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f"{where}.{key}")
        else:
            assert a[key] == b[key], f"{where}.{key}: {a[key]!r} != {b[key]!r}"


def _json(path):
    with open(path) as f:
        return json.load(f)


def _predictions(path):
    with open(path) as f:
        header, *rows = f.read().splitlines()
    assert header == "index\tprediction"
    return [tuple(row.split("\t")) for row in rows]


def test_finetune_and_eval_as_two_processes_match_one(pretrained, tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    out, report = _both([*FINETUNE, f"--config.init_from={pretrained}"], two, one)
    # The run as a whole is reported once, by process 0.
    said = [line[:6] for line in out.splitlines() if " epoch 1: " in line or " best: " in line]
    assert said == ["[0/2] ", "[0/2] "], report
    a, b = read_metrics(two), read_metrics(one)
    assert len(a) == len(b) == 2 * 4 + 2, report  # a record per update and per epoch's validation
    for x, y in zip(a, b):
        _assert_close_dicts(x, y, f"metrics.jsonl step {x['step']}")
    _assert_close_dicts(*(_json(os.path.join(d, "best.json")) for d in (two, one)), "best.json")

    out, report = _both(EVAL, two, one)
    assert sum(line.startswith("[0/2] task ") for line in out.splitlines()) == 1, report  # one table
    assert not any(line.startswith("[1/2] task ") for line in out.splitlines()), report
    metrics = [_json(os.path.join(d, "eval", TASK, "metrics.json")) for d in (two, one)]
    for m, d in zip(metrics, (two, one)):
        assert m.pop("run") == d
        for entry in m["splits"].values():
            assert os.path.dirname(entry.pop("predictions")) == os.path.join(d, "eval", TASK)
    _assert_close_dicts(*metrics, "metrics.json")
    for split in ("validation", "test"):
        rows_two, rows_one = (_predictions(os.path.join(d, "eval", TASK, f"predictions_{split}.tsv"))
                              for d in (two, one))
        assert len({i for i, _ in rows_two}) == len(rows_two) == SIZES[split], split  # every example once
        assert rows_two == rows_one, split
        assert len({p for _, p in rows_one}) > 1, split  # see TASK


def test_zero_shot_eval_as_two_processes_matches_one(pretrained, tmp_path):
    """Each of two processes scores on its own two devices (the model loaded whole on both): the
    table, metrics and predictions of one process."""
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    tasks = ("synthetic_choice", "synthetic_acceptability")
    out, report = _both(["eval", "--config", "configs/tiny.py", "--config.mode=zero_shot",
                         f"--config.init_from={pretrained}", f"--config.task={','.join(tasks)}",
                         "--config.finetune.splits=validation", "--config.finetune.eval_batch_size=6"], two, one)
    assert sum(line.startswith("[0/2] task ") for line in out.splitlines()) == 1, report
    for name in tasks:
        metrics = [_json(os.path.join(d, "eval", name, "metrics.json")) for d in (two, one)]
        for m in metrics:
            m["splits"]["validation"].pop("predictions")
        _assert_close_dicts(*metrics, f"{name} metrics.json")
        rows_two, rows_one = (_predictions(os.path.join(d, "eval", name, "predictions_validation.tsv"))
                              for d in (two, one))
        assert rows_two == rows_one and len(rows_two) == SIZES["validation"], name
