"""The batched forward (batched_forward.py): one output per input row, in order, whatever the number
of rows, equal to one call on all rows; each call's batch split by rows over the devices, not copied
to each (8 fake CPU devices, in a process of their own); the task predictor on top of it."""

import json
import math
import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import loop, sharding
from gptjax.batched_forward import forward_in_batches
from gptjax.config import load_config
from gptjax.model import init_task_model
from gptjax.model_config import ModelConfig
from gptjax.task_predictor import TaskPredictor
from gptjax.tasks import get_task, transforms

WEIGHTS = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)


@jax.jit
def _forward(batch):
    """Three outputs per row, from that row alone: its values, a flag, and which row it is."""
    x = batch["x"]
    return jnp.tanh(x @ WEIGHTS), x.sum(-1) > 0, batch["id"]


def _rows(n):
    return {"x": np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32), "id": np.arange(n, dtype=np.int32)}


@pytest.mark.parametrize("n", [0, 3, 8, 13, 16])
def test_one_output_per_row_in_order_as_one_unbatched_call(n):
    """Batches of 8 for 13 rows (the last holds 5), 3 rows (fewer than a batch), none, and whole batches."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    shapes = []

    def fn(batch):
        if not isinstance(batch["x"], jax.core.Tracer):  # run, not only traced for its output shapes
            shapes.append({key: x.shape for key, x in batch.items()})
        return _forward(batch)

    values, flags, ids = forward_in_batches(fn, _rows(n), 8, mesh)
    unbatched = [np.asarray(out) for out in _forward({key: jnp.asarray(x) for key, x in _rows(n).items()})]
    assert ids.tolist() == list(range(n))
    assert (values.shape, values.dtype, flags.shape, flags.dtype) == ((n, 3), np.float32, (n,), np.bool_)
    np.testing.assert_allclose(values, unbatched[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(flags, unbatched[1])
    # Every call has the one batch shape, the last one filled up; for no rows nothing runs.
    assert shapes == [{"x": (8, 5), "id": (8,)}] * math.ceil(n / 8)


def test_rows_of_unequal_lengths_are_refused():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with pytest.raises(ValueError, match="x 4, id 3"):
        forward_in_batches(_forward, {"x": np.zeros((4, 5), np.float32), "id": np.arange(3)}, 2, mesh)


def _task_model(task, mesh):
    """(abstract model, graphdef, params, shardings) of a small TaskModel for `task` on `mesh`."""
    config = load_config("configs/tiny.py", ["model.n_layer=1", "model.d_model=32", "model.n_head=4", "model.d_ff=64",
                                             "model.max_len=16", "model.dtype=float32", "train.seq_len=16"])
    model_config = ModelConfig.from_config(config.model)
    return loop.params_on_mesh(partial(init_task_model, model_config, task.head_outputs, task.combine, 0), mesh)


def _encoded(task, n, sequences, seed=0):
    rng = np.random.default_rng(seed)
    return transforms.Encoded(tokens=rng.integers(0, 512, (n, sequences, 16)).astype(np.int32),
                              extract=rng.integers(0, 16, (n, sequences)).astype(np.int32),
                              labels=np.zeros(n, np.int32), idx=np.arange(n), truncated=0)


def test_the_task_predictor_predicts_every_example_with_the_params_it_is_given():
    """5 examples in batches of 2 against the model on all at once; other params, other logits;
    no examples gives no rows of the task's logit width (four candidates of a choice task)."""
    task = get_task("synthetic_choice")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    _, graphdef, params, _ = _task_model(task, mesh)
    predictor = TaskPredictor(graphdef, task, mesh, 2)
    enc = _encoded(task, 5, 4)
    whole, _ = nnx.merge(graphdef, params)(jnp.asarray(enc.tokens), jnp.asarray(enc.extract))
    np.testing.assert_allclose(predictor.logits(enc, params), np.asarray(whole), rtol=1e-5, atol=1e-6)
    assert predictor.predict(enc, params).tolist() == np.asarray(whole).argmax(-1).tolist()
    other = jax.tree.map(lambda x: x * 1.5, params)
    assert not np.allclose(predictor.logits(enc, other), np.asarray(whole))
    assert predictor.logits(_encoded(task, 0, 4), params).shape == (0, 4)


_ON_EIGHT_DEVICES = """
import json, sys
sys.path.insert(0, sys.argv[1])
from gptjax import sharding
from gptjax.batched_forward import forward_in_batches, padded_batch_size
from gptjax.errors import UserError
from gptjax.task_predictor import TaskPredictor
from gptjax.tasks import get_task
from test_batched_forward import _encoded, _forward, _rows, _task_model

def layout(batch):
    held = sharding.bytes_per_device(batch)
    x = next(iter(batch.values()))
    return {"shard": list(x.sharding.shard_shape(x.shape)), "replicated": x.sharding.is_fully_replicated,
            "devices": len(held), "bytes": sorted(set(held.values())), "total": sum(v.nbytes for v in batch.values())}

out = {}
for arg in ["data=8", "data=2,fsdp=4", "data=2,tensor=4"]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    sizes.update((k, int(v)) for k, v in (kv.split("=") for kv in arg.split(",")))
    mesh = sharding.make_mesh(sizes)
    seen = []
    def fn(batch):
        seen.append(layout(batch))
        return _forward(batch)
    values, _, ids = forward_in_batches(fn, _rows(13), 8, mesh)
    task = get_task("synthetic_sentiment")
    _, graphdef, params, _ = _task_model(task, mesh)
    predictor = TaskPredictor(graphdef, task, mesh, 8)
    inner, predicted = predictor._predict, []
    def spy(params, batch):
        predicted.append(layout(batch))
        return inner(params, batch)
    predictor._predict = spy
    logits = predictor.logits(_encoded(task, 11, 1), params)
    try:
        TaskPredictor(graphdef, task, mesh, 6)
        error = None
    except UserError as e:
        error = str(e)
    out[arg] = {"seen": seen, "values": values.tolist(), "ids": ids.tolist(), "predicted": predicted,
                "logits": logits.tolist(), "padded_3": padded_batch_size(3, mesh), "error_6": error}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", _ON_EIGHT_DEVICES, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_device_logits():
    task = get_task("synthetic_sentiment")
    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    _, graphdef, params, _ = _task_model(task, one)
    return TaskPredictor(graphdef, task, one, 8).logits(_encoded(task, 11, 1), params)


# Mesh -> devices the batch axis splits over (data x fsdp); the tensor axis holds copies.
SPLITS = {"data=8": 8, "data=2,fsdp=4": 8, "data=2,tensor=4": 2}


@pytest.mark.parametrize("mesh", SPLITS)
def test_each_batch_is_split_by_rows_over_the_devices(eight_devices, one_device_logits, mesh):
    """13 rows in batches of 8: two calls, each batch's rows split over the batch axis, every
    device holding its share of the bytes and no more; the same outputs as one device."""
    run, split = eight_devices[mesh], SPLITS[mesh]
    for calls, rows in (("seen", 8), ("predicted", 8)):
        assert len(run[calls]) == 2, calls
        for layout in run[calls]:
            assert layout["shard"][0] == rows // split and not layout["replicated"]
            assert layout["devices"] == 8 and layout["bytes"] == [layout["total"] // split]
    assert run["padded_3"] == -(-3 // split) * split
    # A prediction batch that the batch axis cannot split evenly is refused (zero-shot rounds up).
    assert (run["error_6"] is None) == (6 % split == 0)
    if run["error_6"]:
        assert f"eval_batch_size (6) must be divisible by the {split} devices" in run["error_6"]
    assert run["ids"] == list(range(13))
    unbatched = np.asarray(_forward({key: jnp.asarray(x) for key, x in _rows(13).items()})[0])
    np.testing.assert_allclose(run["values"], unbatched, rtol=1e-6, atol=1e-7)
    assert np.asarray(run["logits"]).shape == (11, 2)
    np.testing.assert_allclose(run["logits"], one_device_logits, rtol=1e-5, atol=1e-6)
