"""Pretraining end to end on the synthetic corpus: the model and data `make demo` uses, on a shorter run."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import GPT
from gptjax.config import load_config
from gptjax.errors import UserError
from gptjax.metrics import read_metrics
from gptjax.tensorboard import read_scalars
from gptjax.train import Trainer, pretrain


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo"))
    # The demo's model, data, learning rate and warmup, on a third of its steps and half its sequence
    # length (the loss falls to about a third of the start; the demo's 300 steps take it to a sixth).
    config = load_config("configs/tiny.py", ["train.steps=100", "train.eval_every=50", "train.seq_len=64"])
    summary = pretrain(config, workdir, progress=False)
    return config, workdir, summary


def test_training_loss_falls_by_half_and_eval_loss_falls(demo_run):
    config, workdir, summary = demo_run
    records = read_metrics(workdir)
    train = [r for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    # The first step's loss is that of an untrained model over the 512-piece vocabulary.
    assert abs(train[0]["loss"] - math.log(512)) < 0.3
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert len(evals) == config.train.steps // config.train.eval_every
    assert evals[-1] < evals[0] < train[0]["loss"]
    assert evals[-1] < 0.5 * train[0]["loss"]


def test_tensorboard_holds_the_same_numbers_as_metrics_jsonl(demo_run):
    _, workdir, _ = demo_run
    records = read_metrics(workdir)
    board = {(step, tag): value for step, tag, value in read_scalars(os.path.join(workdir, "tensorboard"))}
    for r in records:
        if "eval_loss" in r:
            assert board[(r["step"], "eval/loss")] == pytest.approx(r["eval_loss"], rel=1e-6)
        else:
            assert board[(r["step"], "train/loss")] == pytest.approx(r["loss"], rel=1e-6)
            assert board[(r["step"], "train/tokens_per_sec")] == pytest.approx(r["tokens_per_sec"], rel=1e-6)


def test_workdir_contract(demo_run):
    config, workdir, summary = demo_run
    assert {"config.json", "metrics.jsonl", "tokenizer.model", "checkpoints"} <= set(os.listdir(workdir))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == config.to_dict()
    records = [r for r in read_metrics(workdir) if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == [1] + list(range(config.train.log_every, config.train.steps + 1, config.train.log_every))
    for before, r in zip(records, records[1:]):
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "loss_tokens"} <= set(r)
        assert r["tokens_per_sec"] > 0 and r["grad_norm"] > 0
        # The loss counts the unmasked targets, at most every token the interval's steps processed.
        processed = (r["step"] - before["step"]) * config.train.batch_size * config.train.seq_len
        assert 0.5 * processed < r["loss_tokens"] <= processed
        assert "mfu" not in r  # a CPU has no known peak, so no MFU rather than a wrong one
    peak_step = next(r for r in records if r["step"] == config.train.warmup_steps)
    assert peak_step["lr"] == pytest.approx(config.train.lr, rel=0.05)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(config.train.steps)]


def test_from_pretrained_reproduces_the_trained_model(demo_run):
    config, workdir, _ = demo_run
    model = GPT.from_pretrained(workdir)
    assert model.num_params() == 875264
    rows = np.random.default_rng(0).integers(0, 512, size=(2, 32))
    logits = model.logits(rows)
    assert logits.shape == (2, 32, 512) and logits.dtype == jnp.float32
    # The trained model predicts the held-out text far better than chance.
    text = "the cat that the dogs chase sleeps . anna is a tall woman . she lives near the park ."
    ids = model.tokenizer.encode(text)
    logp = jax.nn.log_softmax(model.logits(np.array([ids])), axis=-1)[0]
    nll = -float(np.mean([logp[i, ids[i + 1]] for i in range(len(ids) - 1)]))
    assert nll < 0.5 * math.log(512)
    greedy = model.generate("the cat", max_new_tokens=12, temperature=0.0)
    assert greedy == model.generate("the cat", max_new_tokens=12, temperature=0.0)
    assert len(greedy.split()) >= 3


def test_the_same_command_on_a_finished_run_changes_nothing(demo_run):
    config, workdir, _ = demo_run
    def stamps():  # the lock's holder note is rewritten by every run that takes the workdir
        return {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)
                if name != "gptjax.lock"}

    before = stamps()
    summary = pretrain(config, workdir, progress=False)
    assert summary["finished_before"] and summary["step"] == config.train.steps
    assert stamps() == before


def test_steps_are_deterministic_and_dropout_uses_the_step_key(tmp_path):
    config = load_config("configs/tiny.py", ["model.dropout=0.1", "model.attn_dropout=0.1", "train.batch_size=4",
                                             "train.seq_len=32", "model.n_layer=1"])
    rows = np.random.default_rng(1).integers(0, 512, size=(4, 33)).astype(np.int32)
    from gptjax.data.packing import as_batch
    batch = as_batch(rows, 2, 0, False)
    losses = []
    for _ in range(2):
        trainer = Trainer.from_config(config)
        losses.append([float(trainer.step(batch)["loss"]) for _ in range(3)])
    # Same seed, same batches: bit-identical losses, dropout included.
    assert losses[0] == losses[1]
    # The state a step returns has the input types of the state it took: the step compiled once.
    assert trainer._step._cache_size() == 1
    # Dropout is really applied: the same initial parameters without it give another loss.
    config_nodrop = load_config("configs/tiny.py", ["train.batch_size=4", "train.seq_len=32", "model.n_layer=1"])
    assert float(Trainer.from_config(config_nodrop).step(batch)["loss"]) != losses[0][0]


def test_profile_steps_write_a_trace_and_a_resumed_run_inside_the_window_traces_its_steps(tmp_path):
    args = ["train.profile_steps=[2, 3]", "model.n_layer=1", "data.num_documents=300", "train.batch_size=4",
            "train.seq_len=32", "train.checkpoint_every=2", "train.eval_every=0"]
    pretrain(load_config("configs/tiny.py", ["train.steps=2", *args]), str(tmp_path), progress=False)
    first = set((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(first) == 1 and next(iter(first)).stat().st_size > 0
    # Resumed at step 2, inside the window [2, 3]: a trace of step 3, not a stop without a start.
    pretrain(load_config("configs/tiny.py", ["train.steps=3", *args]), str(tmp_path), progress=False)
    second = set((tmp_path / "profile").rglob("*.xplane.pb")) - first
    assert len(second) == 1 and next(iter(second)).stat().st_size > 0
    with pytest.raises(UserError, match="train.profile_steps"):
        load_config("configs/tiny.py", ["train.profile_steps=[3, 2]"])


def test_held_out_loss_is_scored_in_the_train_steps_microbatches():
    from gptjax.data.packing import as_batch
    rows = np.random.default_rng(3).integers(6, 512, size=(16, 33)).astype(np.int32)
    batch = as_batch(rows, 2, 0, True)
    losses, temporaries = {}, {}
    for accum in (1, 4):
        config = load_config("configs/tiny.py", ["model.dtype=float32", "train.batch_size=16", "train.seq_len=32",
                                                 "model.n_layer=1", f"train.grad_accum={accum}"])
        trainer = Trainer.from_config(config)
        losses[accum] = trainer.eval_loss([batch])
        with jax.set_mesh(trainer.mesh):
            compiled = trainer._eval.lower(trainer.state.params, jax.device_put(batch)).compile()
        temporaries[accum] = compiled.memory_analysis().temp_size_in_bytes
    assert losses[4] == pytest.approx(losses[1], rel=1e-6)
    # One microbatch's activations at a time: the logits of 4 rows, not 16.
    assert temporaries[4] < temporaries[1] / 2, temporaries
