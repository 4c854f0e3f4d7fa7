"""The loop core (loop.py) and its hooks on a toy objective: SIGTERM then resume equals an
uninterrupted run, the NaN stop, keep rules, the resume policy, metrics restart, accumulation."""

import json
import os
import signal
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gptjax import checkpoint, loop, resume, sharding
from gptjax.config import base_config
from gptjax.errors import Preempted, UserError
from gptjax.metrics import read_metrics
from gptjax.loop import StepRunner
from gptjax.records import LogRecords
from gptjax.resume import settings_of
from gptjax.saving import Checkpoints

DIM = 8


class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (DIM,)), axes=("embed",))


def toy_loss(graphdef, keep_rate, params, batch, dropout_key):
    """Summed squared error with dropout on the inputs, so the step key matters."""
    model = nnx.merge(graphdef, params)
    keep = jax.random.bernoulli(dropout_key, keep_rate, batch["x"].shape)
    pred = (batch["x"] * keep) @ model.w[...]
    return jnp.sum(jnp.square(pred - batch["y"])), {"count": jnp.asarray(batch["x"].shape[0], jnp.float32)}


def toy_batch(step: int, rows: int = 4) -> dict:
    rng = np.random.default_rng(step)
    x = rng.normal(size=(rows, DIM)).astype(np.float32)
    return {"x": x, "y": (x @ np.arange(DIM, dtype=np.float32)).astype(np.float32)}


def make_runner(grad_accum: int = 1, keep_rate: float = 0.9) -> StepRunner:
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    graphdef, params = nnx.split(Toy(nnx.Rngs(params=0)), nnx.Param)
    step = loop.TrainStep(partial(toy_loss, graphdef, keep_rate), optax.adam(0.05), optax.constant_schedule(0.05),
                          grad_accum, seed=0)
    return StepRunner(mesh, graphdef, params, step, sharding.replicated(mesh))


class Probe(loop.Hook):
    """An evaluation every 4 steps: one record and one console line."""

    every = loop.Every(4)

    def after(self, done, run):
        record = {"step": done, "eval_probe": float(done)}
        run.evals.append(record)
        run.write(record, f"step {done}")


class AfterSaves(loop.Hook):
    """Notes each cadence save with the evaluation of its step, if there was one."""

    def __init__(self, every, calls):
        self.every, self.calls = every, calls

    def after(self, done, run):
        evaluation = run.evals[-1] if run.evals and run.evals[-1]["step"] == done else None
        self.calls.append((done, evaluation))


def toy_batches(start, total, poison=None, terminate_at=None):
    for step in range(start, total):
        if step + 1 == terminate_at:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while this step runs
        batch = toy_batch(step)
        if step + 1 == poison:
            batch["x"][0, 0] = np.nan
        yield batch


def _config(**train):
    config = base_config()
    config.train.update(train)
    return config


def _run(workdir, config, total, every=2, keep=0, keep_every=0, calls=None, **batches):
    runner = make_runner()
    checkpointer = checkpoint.Checkpointer(str(workdir), keep=keep, keep_every=keep_every)
    settings = settings_of(config)
    try:
        start = resume.resume(config.train.resume, settings, runner, checkpointer)
        resume.prepare_workdir(str(workdir), settings, start)
        saves = loop.Every(every)
        hooks = [LogRecords(loop.Every(1), "the training loss became {}; lower train.lr"), Probe(),
                 Checkpoints(checkpointer, saves, lambda step: {"step": step, "config": settings}, None)]
        if calls is not None:
            hooks.append(AfterSaves(saves, calls))
        out = loop.run(runner, toy_batches(start, total, **batches), hooks, loop.Run(start, total, str(workdir)))
    finally:
        checkpointer.close()
    return runner, out


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def test_sigterm_saves_and_resuming_equals_the_uninterrupted_run(tmp_path):
    config = _config()
    calls = []
    straight, out = _run(tmp_path / "straight", config, 8, calls=calls)
    assert [r["step"] for r in out.evals] == [4, 8]
    # Hooks run in their order: a hook after the saves sees each save with that step's evaluation.
    assert calls == [(2, None), (4, out.evals[0]), (6, None), (8, out.evals[1])]
    run = tmp_path / "run"
    with pytest.raises(Preempted) as stopped:
        _run(run, config, 8, every=4, terminate_at=3)
    assert stopped.value.step == 3
    assert checkpoint.Checkpointer(str(run), read_only=True).steps() == [3]  # saved at the stop, off-cadence
    resumed, _ = _run(run, config, 8)
    assert _losses(run) == _losses(tmp_path / "straight")  # bitwise: the same floats
    assert len(set(_losses(run).values())) == 8
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_nan_loss_stops_the_run_with_one_line(tmp_path):
    with pytest.raises(UserError, match=r"the training loss became nan; lower train.lr"):
        _run(tmp_path, _config(), 6, poison=3)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]  # the NaN record is not written


def test_keep_and_keep_every(tmp_path):
    _run(tmp_path, _config(), 12, keep=2, keep_every=4)
    assert checkpoint.Checkpointer(str(tmp_path), read_only=True).steps() == [4, 8, 10, 12]


def test_resume_policy(tmp_path, capsys):
    _run(tmp_path, _config(), 6)
    with pytest.raises(UserError, match="holds checkpoints .* train.resume=none"):
        _run(tmp_path, _config(resume="none"), 8)
    with pytest.raises(UserError, match=r"train.resume=5, but .* no complete checkpoint for step 5 \(complete: \[2, 4, 6\]\)"):
        _run(tmp_path, _config(resume="5"), 8)
    frozen = _config()
    frozen.model.n_layer = 3
    with pytest.raises(UserError, match="model.n_layer is 3 but the checkpoint at step 6 was trained with 12"):
        _run(tmp_path, frozen, 8)
    capsys.readouterr()
    _run(tmp_path, _config(resume="4", lr=1e-3), 8)
    out = capsys.readouterr().out
    assert "resuming with changed settings: train.lr 0.0006 -> 0.001" in out
    assert "kept the newer checkpoint 6 as" in out  # set aside, not deleted
    assert any(name.startswith("6.") for name in os.listdir(tmp_path / "checkpoints"))
    # metrics.jsonl restarts at step 4; the first run's records are kept beside it.
    assert [r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r] == list(range(1, 9))
    with open(tmp_path / "metrics.jsonl.1") as f:
        assert [json.loads(line)["step"] for line in f if "loss" in line] == list(range(1, 7))


def test_accumulated_microbatches_equal_the_whole_batch():
    whole, split = make_runner(1, keep_rate=1.0), make_runner(2, keep_rate=1.0)
    batch = toy_batch(0, rows=8)
    a, b = whole.step(batch), split.step(batch)
    assert float(b["tokens"]) == float(a["tokens"]) == 8.0
    np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(b["grad_norm"]), float(a["grad_norm"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(split.state.params["w"][...]), np.asarray(whole.state.params["w"][...]),
                               rtol=1e-6)
    assert not np.allclose(np.asarray(whole.state.params["w"][...]),
                           np.asarray(make_runner(1).state.params["w"][...]))  # the step moved the weights
