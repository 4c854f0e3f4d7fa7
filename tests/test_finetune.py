"""Fine-tuning: the head and loss against hand computations, the loop, resume, errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import checkpoint, finetune as ft, loop
from gptjax.api import GPT
from gptjax.config import load_config
from gptjax.data.tokenizer import PAD_ID
from gptjax.errors import Preempted, UserError
from gptjax.metrics import read_metrics
from gptjax.model import init_task_model
from gptjax.model_config import ModelConfig
from gptjax.tasks import get_task, synthetic_split, transforms
from gptjax.train import pretrain

SMALL = ["model.n_layer=1", "model.dtype=float32", "train.batch_size=16", "finetune.max_examples=96",
         "finetune.epochs=2", "train.lr=1e-3", "train.log_every=1", "finetune.eval_batch_size=32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pre"))
    config = load_config("configs/tiny.py", ["model.n_layer=1", "train.steps=20", "data.num_documents=400",
                                             "train.eval_every=0", "model.dtype=float32"])
    pretrain(config, workdir, progress=False)
    return workdir


def _config(pretrained, task, *extra):
    return load_config("configs/tiny.py", [*SMALL, f"task={task}", f"init_from={pretrained}", *extra])


def _reference_lm(model, tokens):
    """Mean next-token loss over the non-pad targets, in numpy from the model's own logits."""
    b, s, t = tokens.shape
    flat = tokens.reshape(b * s, t)
    logits = np.asarray(model.decoder.lm_logits(model.decoder(jnp.asarray(flat))))[:, :-1, :model.decoder.config.vocab_size]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets = flat[:, 1:]
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mask = targets != PAD_ID
    return -(picked * mask).sum() / mask.sum()


@pytest.mark.parametrize("name", ["synthetic_entailment", "synthetic_relatedness", "synthetic_choice"])
def test_loss_is_task_loss_plus_half_lm_loss(pretrained, name):
    task = get_task(name)
    config = _config(pretrained, name)
    tokenizer = GPT.from_pretrained(pretrained).tokenizer
    enc = transforms.encode(task, synthetic_split(task, "train", size=6), tokenizer, 128)
    model = init_task_model(ModelConfig.from_config(config.model), task.head_outputs, task.combine, 0)
    batch = ft.make_batch(enc, np.arange(5), 6)  # one padding row, which must not count
    graphdef, params = nnx.split(model, nnx.Param)
    total, aux = ft.batch_loss(graphdef, task.type, 0.5, 0.0, tokenizer.pad_id, params,
                               {k: jnp.asarray(v) for k, v in batch.items()}, None)
    logits = np.asarray(model(jnp.asarray(enc.tokens[:5]), jnp.asarray(enc.extract[:5]))[0], np.float64)
    labels = enc.labels[:5]
    if task.type == "regression":
        task_loss = np.mean((logits[:, 0] - labels) ** 2)
    else:
        logz = np.log(np.exp(logits).sum(-1))
        task_loss = np.mean(logz - logits[np.arange(5), labels])
    lm = _reference_lm(model, enc.tokens[:5])
    np.testing.assert_allclose(float(aux["task_loss"]), task_loss, rtol=1e-5)
    np.testing.assert_allclose(float(aux["lm_loss"]), lm, rtol=1e-5)
    np.testing.assert_allclose(float(total), task_loss + 0.5 * lm, rtol=1e-5)
    off, aux_off = ft.batch_loss(graphdef, task.type, 0.0, 0.0, tokenizer.pad_id, params,
                                 {k: jnp.asarray(v) for k, v in batch.items()}, None)
    assert "lm_loss" not in aux_off and float(off) == pytest.approx(task_loss, rel=1e-5)


def test_heads_read_the_extract_states(pretrained):
    """similarity: W_y(h(a$b) + h(b$a)); multiple choice: one score per candidate."""
    tokenizer = GPT.from_pretrained(pretrained).tokenizer
    config = _config(pretrained, "synthetic_paraphrase")
    for name, combine in (("synthetic_paraphrase", "sum"), ("synthetic_choice", "choice")):
        task = get_task(name)
        assert (task.combine, task.head_outputs) == (combine, 2 if combine == "sum" else 1)
        enc = transforms.encode(task, synthetic_split(task, "validation", size=3), tokenizer, 128)
        model = init_task_model(ModelConfig.from_config(config.model), task.head_outputs, combine, 1)
        logits, _ = model(jnp.asarray(enc.tokens), jnp.asarray(enc.extract))
        w, b = np.asarray(model.head_kernel[...]), np.asarray(model.head_bias[...])
        for i in range(3):
            states = [np.asarray(model.decoder(jnp.asarray(enc.tokens[i, s][None])))[0, enc.extract[i, s]]
                      for s in range(enc.tokens.shape[1])]
            expected = (sum(states) @ w + b) if combine == "sum" else np.array([st @ w + b for st in states])[:, 0]
            np.testing.assert_allclose(np.asarray(logits[i]), expected, rtol=1e-4, atol=1e-5)
        assert logits.shape == ((3, 2) if combine == "sum" else (3, 4))


def test_only_the_head_is_new(pretrained):
    config = ft.effective_config(_config(pretrained, "synthetic_sentiment"), GPT.from_pretrained(pretrained))
    runner = ft.TaskRunner.from_config(config, get_task("synthetic_sentiment"))
    source = nnx.state(GPT.from_pretrained(pretrained).module, nnx.Param)
    runner.load_decoder(source)
    loaded = checkpoint.flatten(runner.state.params)
    for name, value in checkpoint.flatten(source).items():
        np.testing.assert_array_equal(np.asarray(loaded[f"decoder.{name}"]), np.asarray(value))
    assert sorted(k for k in loaded if not k.startswith("decoder.")) == ["head_bias", "head_kernel"]


def test_prediction_batches_pad_and_drop(pretrained):
    """Every example once, whatever the batch size: batched logits equal one-at-a-time logits."""
    task = get_task("synthetic_sentiment")
    config = ft.effective_config(_config(pretrained, task.name, "finetune.eval_batch_size=8"),
                                 GPT.from_pretrained(pretrained))
    runner = ft.TaskRunner.from_config(config, task)
    enc = transforms.encode(task, synthetic_split(task, "validation", size=19), GPT.from_pretrained(pretrained).tokenizer,
                            128)
    batched = runner.logits(enc)
    assert batched.shape == (19, 2)
    model = nnx.merge(runner.graphdef, runner.state.params)
    single = np.concatenate([np.asarray(model(jnp.asarray(enc.tokens[i:i + 1]), jnp.asarray(enc.extract[i:i + 1]))[0])
                             for i in range(19)])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)


def test_epoch_rows_cover_every_example_once():
    rows = np.concatenate([ft.epoch_rows(50, 16, 0, 1, i) for i in range(4)])
    assert sorted(rows) == list(range(50))
    assert not np.array_equal(ft.epoch_rows(50, 16, 0, 0, 0), ft.epoch_rows(50, 16, 0, 1, 0))


def test_schedule_warms_up_then_decays_to_zero():
    config = load_config("configs/glue.py")
    s = ft.finetune_schedule(config.train.lr, config.finetune.warmup_fraction, 1000)
    from gptjax.optim import lr_schedule
    sched = lr_schedule(s)
    assert s.warmup_steps == 2 and s.steps == 1000  # 0.2% of 1000 updates
    assert float(sched(2)) == pytest.approx(6.25e-5) and float(sched(1000)) == pytest.approx(0.0, abs=1e-12)
    assert float(sched(501)) == pytest.approx(6.25e-5 * 499 / 998, rel=1e-4)


@pytest.fixture(scope="module")
def sentiment_run(pretrained, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ft"))
    summary = ft.finetune(_config(pretrained, "synthetic_sentiment"), workdir, progress=False)
    return workdir, summary


def test_finetune_run_learns_and_keeps_the_best_epoch(pretrained, sentiment_run):
    workdir, summary = sentiment_run
    records = [r for r in read_metrics(workdir) if "loss" in r]
    epochs = [r for r in read_metrics(workdir) if "eval_score" in r]
    assert len(epochs) == 2 and records[-1]["task_loss"] < records[0]["task_loss"]
    assert all(0.0 <= r["eval_score"] <= 1.0 for r in epochs)
    best = json.load(open(os.path.join(workdir, "best.json")))
    assert best["score"] == max(r["eval_score"] for r in epochs)
    assert best["step"] in checkpoint.Checkpointer(workdir, read_only=True).steps()
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["task"] == "synthetic_sentiment" and saved["model"]["n_layer"] == 1
    again = ft.finetune(_config(pretrained, "synthetic_sentiment"), workdir, progress=False)
    assert again["finished_before"] and again["step"] == best["step"]


def test_preempted_finetune_resumes_bitwise(pretrained, sentiment_run, tmp_path, monkeypatch):
    workdir, _ = sentiment_run
    straight = [r for r in read_metrics(workdir) if "loss" in r]

    class StopAt:  # SIGTERM arriving after update 5
        interrupted = False  # a termination signal, not Ctrl-C

        def __init__(self):
            pass

        def __call__(self, step):
            return step == 5

        def close(self):
            pass

    run = str(tmp_path / "run")
    monkeypatch.setattr(loop, "StopSignal", StopAt)
    with pytest.raises(Preempted):
        ft.finetune(_config(pretrained, "synthetic_sentiment"), run, progress=False)
    monkeypatch.undo()
    ft.finetune(_config(pretrained, "synthetic_sentiment"), run, progress=False)
    resumed = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(resumed, straight):
        assert a["loss"] == b["loss"], (a, b)
    a = checkpoint.load_params(run, _like(run))[0]
    b = checkpoint.load_params(workdir, _like(workdir))[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _like(workdir):
    from gptjax.config import config_from_dict
    config = config_from_dict(json.load(open(os.path.join(workdir, "config.json"))))
    task = get_task(config.task)
    model_config = ModelConfig.from_config(config.model)
    model = nnx.eval_shape(lambda: init_task_model(model_config, task.head_outputs, task.combine, 0))
    return nnx.split(model, nnx.Param)[1]


@pytest.mark.parametrize("task, message", [
    ("ax", "diagnostic"), ("sst2,rte", "one task"), ("nosuch", "unknown task"), ("", "set --config.task")])
def test_task_errors(pretrained, tmp_path, task, message):
    with pytest.raises(UserError, match=message):
        ft.finetune(_config(pretrained, task), str(tmp_path / "w"), progress=False)


def test_other_task_in_the_workdir_is_refused(pretrained, sentiment_run):
    with pytest.raises(UserError, match="holds a fine-tuning run of task synthetic_sentiment"):
        ft.finetune(_config(pretrained, "synthetic_acceptability"), sentiment_run[0], progress=False)


def test_no_tokenizer_is_a_clear_error(tmp_path):
    config = load_config("configs/tiny.py", [*SMALL, "task=synthetic_sentiment"])
    with pytest.raises(UserError, match="data.tokenizer"):
        ft.finetune(config, str(tmp_path / "w"), progress=False)


def test_sharded_finetuning_matches_one_device(pretrained):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "tests/finetune_worker.py", pretrained], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    base = np.array(runs["single"]["losses"])
    assert np.ptp(base) > 1e-3
    for mesh, run in runs.items():
        np.testing.assert_allclose(run["losses"], base, rtol=2e-5, err_msg=mesh)
        np.testing.assert_allclose(run["logits"], runs["single"]["logits"], rtol=1e-4, atol=1e-5, err_msg=mesh)


def test_more_epochs_on_a_finished_run_is_refused(pretrained, sentiment_run):
    with pytest.raises(UserError, match="finished run of 2 epochs and finetune.epochs is 3"):
        ft.finetune(_config(pretrained, "synthetic_sentiment", "finetune.epochs=3"), sentiment_run[0], progress=False)


def test_a_pretraining_workdir_is_not_a_finetuning_workdir(pretrained):
    with pytest.raises(UserError, match="holds a pretraining run; pass it as --config.init_from"):
        ft.finetune(_config(pretrained, "synthetic_sentiment"), pretrained, progress=False)
