"""TensorBoard event files, read with TensorBoard's own EventAccumulator: a run's files hold every
number of its metrics.jsonl, after a normal end and after SIGTERM, and only the main process writes."""

import math
import os
import signal
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gptjax import checkpoint, distributed, loop, resume, sharding
from gptjax.config import base_config
from gptjax.errors import Preempted
from gptjax.metrics import read_metrics
from gptjax.records import LogRecords
from gptjax.saving import Checkpoints
from gptjax.tensorboard import SummaryWriter, read_scalars

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def board(path) -> dict:
    """{(step, tag): value} of every scalar under `path`, as TensorBoard reads it."""
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


# --- a tiny run: one weight vector fitted by the real loop --------------------------------------

class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4,)), axes=("embed",))


def toy_loss(graphdef, params, batch, dropout_key):
    pred = batch["x"] @ nnx.merge(graphdef, params).w[...]
    return jnp.sum(jnp.square(pred - batch["y"])), {"count": jnp.asarray(batch["x"].shape[0], jnp.float32)}


class Probe(loop.Hook):
    every = loop.Every(2)

    def after(self, done, run):
        run.write({"step": done, "eval_probe": done / 3})


def toy_run(workdir, steps: int, terminate_at: int | None = None) -> None:
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    graphdef, params = nnx.split(Toy(nnx.Rngs(params=0)), nnx.Param)
    step = loop.TrainStep(partial(toy_loss, graphdef), optax.adam(0.05), optax.constant_schedule(0.05))
    runner = loop.StepRunner(mesh, graphdef, params, step, sharding.replicated(mesh))

    def batches():
        for step in range(steps):
            if step + 1 == terminate_at:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while this step runs
            x = np.random.default_rng(step).normal(size=(4, 4)).astype(np.float32)
            yield {"x": x, "y": x @ np.arange(4, dtype=np.float32)}

    checkpointer = checkpoint.Checkpointer(str(workdir))
    try:
        resume.prepare_workdir(str(workdir), resume.settings_of(base_config()), 0)
        hooks = [LogRecords(loop.Every(1), "the loss became {}"), Probe(),
                 Checkpoints(checkpointer, loop.Every(0), lambda step: {"step": step}, None)]
        loop.run(runner, batches(), hooks, loop.Run(0, steps, str(workdir)))
    finally:
        checkpointer.close()


def assert_board_holds_metrics(workdir):
    records = read_metrics(str(workdir))
    scalars = board(workdir / "tensorboard")
    checked = 0
    for r in records:
        for key, value in r.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            assert (r["step"], tag) in scalars, (r["step"], tag)
            assert np.float32(scalars[(r["step"], tag)]) == np.float32(value), (r["step"], tag)
            checked += 1
    return records, checked


def test_a_run_writes_every_metric_to_tensorboard(tmp_path):
    toy_run(tmp_path, 4)
    records, checked = assert_board_holds_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert {"eval_probe", "lr", "loss"} <= {k for r in records for k in r} and checked >= 12


def test_a_run_stopped_by_sigterm_leaves_complete_files(tmp_path):
    with pytest.raises(Preempted):
        toy_run(tmp_path, 6, terminate_at=3)
    records, _ = assert_board_holds_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    toy_run(tmp_path, 2)
    assert not os.path.exists(tmp_path / "tensorboard")


# --- the writer alone ------------------------------------------------------------------------

def test_values_round_trip_at_float32(tmp_path):
    logged = {0: {"train/loss": 6.25, "train/lr": 0.0}, 1: {"train/loss": 5.5, "lr": 3e-4, "skip": None},
              2**40: {"eval/loss": -1.0, "count": 12}, 3: {"big": 1e40, "nan": math.nan}}
    with SummaryWriter(str(tmp_path)) as tb:
        for step, values in logged.items():
            tb.scalars(step, values)
    got = board(tmp_path)
    want = {(step, tag): float(np.float32(v)) for step, values in logged.items() for tag, v in values.items()
            if v is not None and tag not in ("big", "nan")}
    assert {k: v for k, v in got.items() if k[1] not in ("big", "nan")} == want
    assert got[(3, "big")] == math.inf  # beyond float32: infinite rather than an error
    assert math.isnan(got[(3, "nan")])
    # read_scalars, kept for callers, gives the same numbers.
    assert {(s, t): v for s, t, v in read_scalars(str(tmp_path)) if t != "nan"} == \
        {k: v for k, v in got.items() if k[1] != "nan"}


def test_flush_makes_records_readable_before_close(tmp_path):
    tb = SummaryWriter(str(tmp_path))
    tb.scalars(1, {"a": 2.0})
    tb.flush()
    assert board(tmp_path) == {(1, "a"): 2.0}
    tb.scalars(2, {"a": 3.0})
    tb.close()
    tb.close()  # a second close is harmless
    assert board(tmp_path) == {(1, "a"): 2.0, (2, "a"): 3.0}


def test_writers_in_the_same_second_get_their_own_files(tmp_path, monkeypatch):
    monkeypatch.setattr("time.time", lambda: 1700000000.0)
    first, second = SummaryWriter(str(tmp_path)), SummaryWriter(str(tmp_path))
    monkeypatch.undo()
    first.scalars(1, {"x": 1.0})
    second.scalars(1, {"y": 2.0})
    first.close()
    second.close()
    assert len(os.listdir(tmp_path)) == 2
    assert sorted(read_scalars(str(tmp_path))) == [(1, "x", 1.0), (1, "y", 2.0)]
